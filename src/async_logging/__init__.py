"""async-logging: restore transaction trees from asynchronously emitted log events.

The reassembly engine (:class:`LogBuffer`) is I/O-free; the proxy server
(``async-logging serve``) and the client library are thin shells around it.
"""

from __future__ import annotations

from .buffer import BufferLimits, Fed, LogBuffer, Record
from .client import LogClient, configure, event, heartbeat, transaction
from .emitter import EmitterBuffer, EventEmitter
from .exceptions import (
    AsyncLoggingError,
    BadInput,
    ConfigError,
    DecodeError,
    InvalidEvent,
    LimitExceeded,
    UsageError,
)
from .model import ATOMIC, BEGIN, END, HEARTBEAT, default_mapper

__version__ = "0.1.0"

__all__ = [
    "ATOMIC",
    "BEGIN",
    "END",
    "HEARTBEAT",
    "AsyncLoggingError",
    "BadInput",
    "BufferLimits",
    "ConfigError",
    "DecodeError",
    "EmitterBuffer",
    "EventEmitter",
    "Fed",
    "InvalidEvent",
    "LimitExceeded",
    "LogBuffer",
    "LogClient",
    "Record",
    "UsageError",
    "__version__",
    "configure",
    "default_mapper",
    "event",
    "heartbeat",
    "transaction",
]
