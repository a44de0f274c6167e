"""The client library: ship log events to the proxy without blocking (docs/design.md §6).

.. code-block:: python

    from async_logging.client import LogClient, transaction, event, heartbeat

    LogClient(url="ws://proxy:3000/")      # the first client is the default one

    with transaction("URL", "/checkout"):
        event("DB", "select cart", msg="3 rows", level="INFO")

Pieces: :class:`LogClient` (``client.py``: its inbox, ``inbox.py``, its sender thread,
``sender.py``, around the sans-I/O ``core.py``, and ``transports.py``), the items it queues
(``items.py``), :class:`Transaction` and bound scopes (``scopes.py``), :func:`transaction` /
:func:`event` / :func:`heartbeat` (``api.py``, the module-level API on the default client of
``registry.py``), :func:`wrap` (``context.py``: carry the context into threads),
:class:`LogHandler` (stdlib ``logging``, structlog, loguru), the web middlewares (one ``URL``
transaction per request: :class:`AsyncLoggingMiddleware` for ASGI, :func:`aiohttp_setup`,
:class:`WSGIMiddleware` and :func:`flask_setup`, :class:`DjangoMiddleware`),
:class:`HeartbeatMonitor` (CPU, memory and GC heartbeats). The states of a client and its
sender are in ``lifecycle.py``.
"""

from __future__ import annotations

from .api import (
    bind,
    close,
    configure,
    event,
    flush,
    get_client,
    heartbeat,
    log,
    transaction,
)
from .client import ClientStats, LogClient
from .context import current_scope, current_uuid, new_uuid, wrap
from .core import CoreLimits
from .django_middleware import DjangoMiddleware
from .logging_handler import LogHandler, loguru_sink, structlog_processor
from .middleware import AsyncLoggingMiddleware, aiohttp_middleware, aiohttp_setup
from .monitor import HeartbeatMonitor
from .propagation import (
    aiohttp_trace_config,
    instrument_httpx,
    instrument_requests,
    traced_transport,
    uninstrument,
    use_opentelemetry,
)
from .scopes import Transaction
from .transports import (
    ConnectionLost,
    HttpTransport,
    ServerRefused,
    Transport,
    TransportError,
    WebSocketOtherwiseHttpTransport,
    WebSocketTransport,
    backoff,
    is_retryable,
)
from .wsgi import WSGIMiddleware, flask_setup

__all__ = [
    "AsyncLoggingMiddleware",
    "ClientStats",
    "ConnectionLost",
    "CoreLimits",
    "DjangoMiddleware",
    "HeartbeatMonitor",
    "HttpTransport",
    "LogClient",
    "LogHandler",
    "ServerRefused",
    "Transaction",
    "Transport",
    "TransportError",
    "WSGIMiddleware",
    "WebSocketOtherwiseHttpTransport",
    "WebSocketTransport",
    "aiohttp_middleware",
    "aiohttp_setup",
    "aiohttp_trace_config",
    "backoff",
    "bind",
    "close",
    "configure",
    "current_scope",
    "current_uuid",
    "event",
    "flask_setup",
    "flush",
    "get_client",
    "heartbeat",
    "instrument_httpx",
    "instrument_requests",
    "is_retryable",
    "log",
    "loguru_sink",
    "new_uuid",
    "structlog_processor",
    "traced_transport",
    "transaction",
    "uninstrument",
    "use_opentelemetry",
    "wrap",
]
