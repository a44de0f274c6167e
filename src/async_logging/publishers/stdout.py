"""A publisher that writes JSON lines to a stream (standard output by default).

Handy in containers, where the platform collects standard output, and for piping the
proxy into ``jq``. Lines are the same as the file sink's (:func:`~.jsonl.encode_line`).
"""

from __future__ import annotations

import io
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any

from ..buffer import Record
from ..encoded import EncodedRecords
from .base import BasePublisher
from .jsonl import LineEncoder

__all__ = ["StdoutPublisher"]


class StdoutPublisher(BasePublisher):
    """Write records as JSON lines to a text or binary stream, one write per batch.

    Args:
        stream: where to write. ``None`` (the default) means whatever :data:`sys.stdout`
            is at the time of each write, so redirections made later are followed. A binary
            stream (an :class:`io.BufferedIOBase`, such as ``sys.stdout.buffer`` or
            :class:`io.BytesIO`) gets bytes, any other stream gets text.
        close_stream: close ``stream`` in :meth:`close`. Off by default: the stream belongs
            to the caller (and standard output is never closed).

    Attributes:
        stats: counters: ``records``, ``bytes``, ``fallbacks`` and ``unserialisable`` (see
            :func:`~.jsonl.encode_line`), ``dropped`` (records published while
            :data:`sys.stdout` was ``None``, as under ``pythonw``).
    """

    def __init__(self, stream: IO[Any] | None = None, *, close_stream: bool = False) -> None:
        self.stream = stream
        self.close_stream = close_stream and stream is not None
        self.stats: Counter[str] = Counter(records=0, bytes=0, fallbacks=0)
        self._encoder = LineEncoder(self.stats)
        self._lock = threading.Lock()

    def transaction(self, record: Record) -> None:
        """Write one transaction record."""
        self.publish_many((record,))

    def atomic_event(self, record: Record) -> None:
        """Write one atomic event record."""
        self.publish_many((record,))

    def heartbeat(self, record: Record) -> None:
        """Write one heartbeat record."""
        self.publish_many((record,))

    def publish_many(self, records: Sequence[Record]) -> None:
        """Write a batch of records, one line each, in one ``write`` call.

        Args:
            records: the batch.
        """
        if not isinstance(records, list | tuple | EncodedRecords):
            records = list(records)
        if not records:
            return
        with self._lock:
            stream = self.stream if self.stream is not None else sys.stdout
            if stream is None:
                self.stats["dropped"] += len(records)
                return
            parts, nbytes = self._encoder.encode(records)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if isinstance(stream, io.BufferedIOBase):
                stream.write(data)
            else:
                stream.write(data.decode())
            self.stats["records"] += len(records)
            self.stats["bytes"] += nbytes

    def flush(self) -> None:
        """Flush the stream."""
        with self._lock:
            stream = self.stream if self.stream is not None else sys.stdout
            if stream is not None:
                stream.flush()

    def close(self) -> None:
        """Flush, and close the stream if ``close_stream`` was set."""
        self.flush()
        if self.close_stream and self.stream is not None:
            self.stream.close()
