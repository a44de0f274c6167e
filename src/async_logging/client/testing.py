"""Helpers for testing code that logs through a :class:`~async_logging.client.LogClient`.

:class:`CaptureTransport` replaces the network: it decodes every envelope the client
would send, keeps it, and acknowledges it at once, so a test can assert on exactly what
would reach the proxy, with no server and no sleeps::

    from async_logging.client import LogClient, transaction, event
    from async_logging.client.testing import CaptureTransport

    capture = CaptureTransport()
    client = LogClient(transport=capture, default=True)
    with transaction("URL", "/x"):
        event("DB", "select")
    client.flush()
    assert [e["clazz"] for e in capture.events] == ["begin", "atomicEvent", "end"]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import msgspec

from .transports import Connection, Listener, Transport

__all__ = ["CaptureTransport"]

T = TypeVar("T")


class CaptureTransport(Transport):
    """A transport that records what it is given, decoded, and acks it; thread-safe.

    Attributes:
        envelopes: every envelope received, decoded (``{"seq": …, "logs": [...]}``).
        events: the events of all envelopes, in order.
        connects: how many connections were opened.
    """

    name = "capture"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.envelopes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.connects = 0

    async def connect(
        self, session: aiohttp.ClientSession, url: str, listener: Listener
    ) -> Connection:
        """Open an in-memory connection."""
        with self._cond:
            self.connects += 1
        return _CaptureConnection(self, listener)

    def _record(self, envelope: dict[str, Any]) -> None:
        with self._cond:
            self.envelopes.append(envelope)
            self.events.extend(envelope["logs"])
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[CaptureTransport], T], timeout: float = 5.0) -> T:
        """Block until ``predicate(self)`` is truthy and return it (runs under the lock).

        Raises:
            TimeoutError: the predicate was still falsy after ``timeout`` seconds.
        """
        with self._cond:
            result = self._cond.wait_for(lambda: predicate(self), timeout)
            if not result:
                raise TimeoutError(
                    f"condition not met after {timeout} s; captured {len(self.events)} events "
                    f"in {len(self.envelopes)} envelopes"
                )
            return result

    def clear(self) -> None:
        """Forget everything captured."""
        with self._cond:
            self.envelopes.clear()
            self.events.clear()


class _CaptureConnection(Connection):
    def __init__(self, owner: CaptureTransport, listener: Listener) -> None:
        self._owner = owner
        self._listener = listener
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, seq: int, payload: bytes) -> None:
        envelope = msgspec.msgpack.decode(payload)
        self._owner._record(envelope)
        self._listener.on_ack(seq, 0)

    async def close(self) -> None:
        self._closed = True
