"""Exceptions raised by async-logging.

One root, two branches: the caller misused the API, or a peer sent bad data.
Each bad-data error carries a short machine ``reason`` (used as the label of the
``bad input`` counters and in error frames) and an HTTP status hint, mapped to a
WebSocket close code in one place (:data:`CLOSE_CODES`).

.. code-block:: text

    AsyncLoggingError
    ├── UsageError                  the caller misused the API (bad option, bad plug-in)
    │   └── ConfigError             a configuration value or file is wrong
    └── BadInput                    a peer sent data we refuse (status hint 400)
        ├── InvalidEvent            one log map is not a valid event (others in the batch survive)
        ├── DecodeError             a frame or body could not be decoded at all
        └── LimitExceeded           a named limit was exceeded (status hint 413 for sizes)
"""

from __future__ import annotations

__all__ = [
    "CLOSE_CODES",
    "AsyncLoggingError",
    "BadInput",
    "ConfigError",
    "DecodeError",
    "InvalidEvent",
    "LimitExceeded",
    "UsageError",
]


class AsyncLoggingError(Exception):
    """Root of every exception this package raises on purpose."""


class UsageError(AsyncLoggingError):
    """The caller misused the API: a wrong option, plug-in or call order."""


class ConfigError(UsageError):
    """A configuration value, flag or file is wrong."""


class BadInput(AsyncLoggingError):
    """A peer sent data that is refused.

    Attributes:
        reason: short snake_case label naming what is wrong (a metrics label).
        detail: human-readable explanation.
        status: the HTTP status this maps to.
    """

    status = 400

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason.replace("_", " ")
        super().__init__(f"{reason}: {self.detail}" if detail else reason)

    def to_dict(self) -> dict[str, str]:
        """The error as a wire-friendly map (``{"error": reason, "detail": ...}``)."""
        return {"error": self.reason, "detail": self.detail}


class InvalidEvent(BadInput):
    """One log map is not a valid event; the rest of its batch is still accepted."""


class DecodeError(BadInput):
    """A frame or request body could not be decoded (not MessagePack/JSON/form)."""


class LimitExceeded(BadInput):
    """A named limit (size, events per frame, depth, ...) was exceeded."""

    def __init__(self, reason: str, detail: str = "", status: int = 413) -> None:
        super().__init__(reason, detail)
        self.status = status


#: WebSocket close codes by exception type (RFC 6455 §7.4.1): 1007 invalid payload
#: data, 1009 message too big, 1008 policy violation.
CLOSE_CODES: dict[type[BadInput], int] = {
    DecodeError: 1007,
    InvalidEvent: 1007,
    LimitExceeded: 1009,
    BadInput: 1008,
}
