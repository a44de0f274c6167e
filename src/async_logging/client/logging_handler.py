"""Bridges from logging libraries: stdlib ``logging``, structlog and loguru.

:class:`LogHandler` turns ordinary ``logging`` calls into events: inside a transaction
they become its atomic children (so a request's log lines land in its tree), outside one
they are stand-alone events. Each event carries ``level`` (the level name), ``msg`` (the
formatted message), ``name`` and ``logger`` (the logger's name), ``type`` ``"LOG"``, the
time (inside a transaction the time it is handed over, on the tree's clock, so it lies
within its parent; outside, the record's own), and ``exception`` (the traceback text,
keeping its end when cut to the client's ``max_string_length``) when the record has one::

    import logging
    from async_logging.client import LogClient, LogHandler

    LogClient(url="ws://proxy:3000/")
    logging.getLogger().addHandler(LogHandler())

Records of the ``async_logging`` loggers are never sent (the client's own warnings would
otherwise feed back into the queue they warn about).

**structlog.** Either route structlog through the stdlib (``structlog.stdlib.LoggerFactory``
and the handler above), or add :func:`structlog_processor` to the processor chain, before
the renderer; it sends the event dict's keys as extra data and passes the dict on::

    structlog.configure(processors=[
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        async_logging.client.structlog_processor,
        structlog.processors.JSONRenderer(),
    ])

**loguru.** Add :func:`loguru_sink` as a sink: ``logger.add(loguru_sink)``. loguru calls
sinks in the logging thread, so records inside a transaction become its children; with
``enqueue=True`` loguru calls them from its own thread and the context is lost (use
``bind(uuid, parent)`` there, or leave ``enqueue`` off: the client never blocks anyway).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Final

from ..model import ATOMIC
from .context import _scope
from .items import cut_traceback, make_item
from .registry import default as _default

if TYPE_CHECKING:
    from .client import LogClient

__all__ = ["LogHandler", "loguru_sink", "structlog_processor"]

_get_scope = _scope.get
#: The CAL type of events made from log records.
LOG_TYPE: Final = "LOG"
_OWN: Final = "async_logging"
_OWN_PREFIX: Final = "async_logging."
_STRUCTLOG_KEYS: Final = frozenset({"event", "level", "logger", "timestamp", "exc_info"})


def _own(name: str) -> bool:
    return name == _OWN or name.startswith(_OWN_PREFIX)


class LogHandler(logging.Handler):
    """A ``logging.Handler`` that sends records as events through a :class:`LogClient`.

    Args:
        client: the client (default: the default client at each record).
        level: the handler's level.
        type: the CAL type of the events.

    ``emit`` only appends to the client's queue, so it takes no lock (``handle`` is
    overridden to skip the handler lock) and never blocks.
    """

    def __init__(
        self, client: LogClient | None = None, level: int = logging.NOTSET, *, type: str = LOG_TYPE
    ) -> None:
        super().__init__(level)
        self.client = client
        self.type = type
        self._exc_formatter = logging.Formatter()

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter, then emit without the handler lock (emit is thread-safe)."""
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        """Send ``record`` as an atomic event (a child of the current transaction, if any)."""
        name = record.name
        if _own(name):
            return
        client = self.client or _default.client
        if client is None:
            return
        try:
            msg = record.getMessage()
            data: dict[str, Any] = {"logger": name}
            if record.exc_info and not record.exc_text:
                fmt = self.formatter or self._exc_formatter
                record.exc_text = fmt.formatException(record.exc_info)
            if record.exc_text:
                data["exception"] = cut_traceback(record.exc_text, client.limits.max_string_length)
            if record.stack_info:
                data["stack"] = record.stack_info
            scope = _get_scope()
            client.inbox.put(
                make_item(
                    ATOMIC,
                    scope,
                    self.type,
                    name,
                    record.levelname,
                    msg,
                    data,
                    None if scope is not None else int(record.created * 1e9),
                )
            )
        except Exception:
            self.handleError(record)


def structlog_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that also sends each log entry as an event.

    The ``event`` key is the message, ``level`` (or the method name) the level, ``logger``
    the name; ``exception`` (from ``format_exc_info``) and every other key go as extra data.
    The event dict is returned unchanged for the next processor.
    """
    client = _default.client
    if client is None:
        return event_dict
    name = event_dict.get("logger")
    if isinstance(name, str) and _own(name):
        return event_dict
    level = event_dict.get("level") or method_name
    data = {k: v for k, v in event_dict.items() if k not in _STRUCTLOG_KEYS}
    client.inbox.put(
        make_item(
            ATOMIC,
            _get_scope(),
            LOG_TYPE,
            name if isinstance(name, str) else "structlog",
            str(level).upper(),
            event_dict.get("event"),
            data,
        )
    )
    return event_dict


def loguru_sink(message: Any, client: LogClient | None = None) -> None:
    """A loguru sink sending each record as an event: ``logger.add(loguru_sink)``.

    Uses ``message.record``: level name, message, logger name, time (outside a
    transaction; inside, the tree's clock), ``extra`` (as extra data) and the exception (as
    ``exception`` text).
    """
    client = client or _default.client
    if client is None:
        return
    record = message.record
    name = str(record.get("name") or "loguru")
    if _own(name):
        return
    data: dict[str, Any] = {"logger": name}
    extra = record.get("extra")
    if extra:
        data.update(extra)
    exc = record.get("exception")
    if exc is not None and getattr(exc, "type", None) is not None:
        data["exception"] = cut_traceback(
            "".join(traceback.format_exception(exc.type, exc.value, exc.traceback)).rstrip(),
            client.limits.max_string_length,
        )
    scope = _get_scope()
    when = record.get("time")
    created = int(when.timestamp() * 1e9) if scope is None and hasattr(when, "timestamp") else None
    level = record.get("level")
    client.inbox.put(
        make_item(
            ATOMIC,
            scope,
            LOG_TYPE,
            name,
            str(getattr(level, "name", level)),
            record.get("message"),
            data,
            created,
        )
    )
