"""The public surface is deliberate: a change to it must be a change to this test."""

from __future__ import annotations

import async_logging


def test_all_is_pinned() -> None:
    """async_logging.__all__ lists exactly the supported names, each importable."""
    assert sorted(async_logging.__all__) == sorted(
        [
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
    )
    for name in async_logging.__all__:
        assert hasattr(async_logging, name), name
