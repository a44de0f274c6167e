"""The seed's pluggable wiring: a tiny event emitter and a buffer adapter around it.

In the 2013 module a listener emits ``'log'`` events on an emitter, the ``LogBuffer``
listens to them and emits ``'transaction'``, ``'atomicEvent'`` and ``'heartbeat'``, and the
publishers listen to those. :class:`EmitterBuffer` gives that shape to the I/O-free
:class:`~async_logging.buffer.LogBuffer`, so a custom listener, buffer or publisher written
against the emitter plugs in as it did in the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .buffer import LogBuffer, Record

__all__ = ["EmitterBuffer", "EventEmitter"]

Listener = Callable[..., object]


class EventEmitter:
    """A minimal synchronous emitter (``on``, ``off``, ``emit``), like Node's ``EventEmitter``."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}

    def on(self, name: str, listener: Listener) -> Listener:
        """Call ``listener(*args)`` on every ``emit(name, *args)``; returns the listener."""
        self._listeners.setdefault(name, []).append(listener)
        return listener

    def off(self, name: str, listener: Listener) -> None:
        """Stop calling ``listener`` for ``name`` (no error if it was not registered)."""
        listeners = self._listeners.get(name, [])
        if listener in listeners:
            listeners.remove(listener)

    def emit(self, name: str, *args: Any) -> int:
        """Call every listener of ``name`` in order; returns how many were called."""
        listeners = tuple(self._listeners.get(name, ()))
        for listener in listeners:
            listener(*args)
        return len(listeners)


class EmitterBuffer:
    """Wires a :class:`LogBuffer` to an emitter as the seed's ``new LogBuffer(emitter, mapper)``.

    Listens to ``'log'`` (one map or a list of maps), emits each published record under its
    ``kind`` (``'transaction'``, ``'atomicEvent'``, ``'heartbeat'``) and each refused event
    as ``'rejected'`` with the :class:`~async_logging.exceptions.InvalidEvent`. ``'clean'``
    runs a clean cycle and ``'flush'`` publishes everything held (``reason`` optional).
    """

    def __init__(
        self,
        emitter: EventEmitter,
        mapper: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        buffer: LogBuffer | None = None,
    ) -> None:
        self.emitter = emitter
        self.buffer = buffer if buffer is not None else LogBuffer(mapper)
        emitter.on("log", self._on_log)
        emitter.on("clean", self._on_clean)
        emitter.on("flush", self._on_flush)

    def _emit_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.emitter.emit(record["kind"], record)

    def _on_log(self, logs: Any) -> None:
        fed = self.buffer.feed_many(logs if isinstance(logs, list) else (logs,))
        for _, error in fed.rejected:
            self.emitter.emit("rejected", error)
        self._emit_all(fed.records)

    def _on_clean(self, now: int | None = None) -> None:
        self._emit_all(self.buffer.expire(now))

    def _on_flush(self, reason: str = "shutdown") -> None:
        self._emit_all(self.buffer.flush_all(reason))
