"""Publishers: where published records go (docs/design.md §5).

- :class:`JsonLinesPublisher`, the default: JSON lines in ``./log/all.log``, rotated by size;
- :class:`StdoutPublisher`: JSON lines to standard output or any stream;
- :class:`MultiPublisher`: several at once;
- :class:`CalTextPublisher`: the worked example of a custom publisher (CAL-like text);
- the plug-in interface, :class:`Publisher` / :class:`BasePublisher`, and
  :func:`load_publisher`, which turns the ``publisher`` option (a class, an instance, a
  ``"module:attr"`` string or a built-in name) into a publisher.

An in-memory publisher for tests is :class:`async_logging.testing.MemoryPublisher`.
"""

from __future__ import annotations

from .base import (
    BUILTIN_PUBLISHERS,
    PUBLISHER_METHODS,
    BasePublisher,
    BatchPublisher,
    MultiPublisher,
    Publisher,
    import_object,
    load_publisher,
)
from .examples import CalTextPublisher
from .jsonl import JsonLinesPublisher, LineEncoder, encode_line
from .stdout import StdoutPublisher

__all__ = [
    "BUILTIN_PUBLISHERS",
    "PUBLISHER_METHODS",
    "BasePublisher",
    "BatchPublisher",
    "CalTextPublisher",
    "JsonLinesPublisher",
    "LineEncoder",
    "MultiPublisher",
    "Publisher",
    "StdoutPublisher",
    "encode_line",
    "import_object",
    "load_publisher",
]
