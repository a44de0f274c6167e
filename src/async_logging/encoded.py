"""Records published already encoded, by the engine's native fast path.

For a MessagePack frame of whole trees, :meth:`LogBuffer.prepare_msgpack
<async_logging.buffer.LogBuffer.prepare_msgpack>` has the C extension
``async_logging._speedups`` produce the records as JSON lines straight from the frame's
bytes, the very lines the JSON-lines sink would write for the records
:meth:`~async_logging.buffer.LogBuffer.feed_many` publishes, with no Python object built
per event. :class:`EncodedRecords` carries them: it *is* a sequence of records (indexing
or iterating decodes the lines, once), so every publisher works unchanged, and a
publisher that writes JSON lines takes :attr:`EncodedRecords.lines` as they are.

This module has no I/O; it only knows whether the extension could be imported
(:data:`NATIVE`). Setting the environment variable ``ASYNC_LOGGING_PURE=1`` before the
import turns the fast path off (every frame then takes the reference path).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, Final, overload

import orjson

__all__ = ["NATIVE", "EncodedRecords", "native_module"]

Record = dict[str, Any]


def _load() -> ModuleType | None:
    if os.environ.get("ASYNC_LOGGING_PURE", "").strip() not in ("", "0"):
        return None
    try:
        from . import _speedups  # type: ignore[attr-defined]
    except ImportError:  # not compiled here (no C compiler at install time)
        return None
    return _speedups  # type: ignore[no-any-return]


_NATIVE_MODULE: Final = _load()
#: Whether the native fast path is available (compiled, and not turned off).
NATIVE: Final = _NATIVE_MODULE is not None


def native_module() -> ModuleType | None:
    """The ``_speedups`` extension, or None when it is unavailable or turned off."""
    return _NATIVE_MODULE


class EncodedRecords(Sequence[Record]):
    """A batch of published records held as JSON lines (one object per line, each ending
    in ``\\n``), in one or more chunks of whole lines.

    A read-only sequence of record dicts: ``len()`` is free; indexing, iterating or
    comparing decodes every line once (with orjson) and keeps the dicts, which are shared
    like any published record (publishers must not mutate them).

    Attributes:
        chunks: the JSON lines, as chunks of whole lines (what ``writev`` takes).
        kinds: how many records of each kind (``transaction``, ``atomicEvent``,
            ``heartbeat``) the batch holds.
    """

    __slots__ = ("_count", "_decoded", "chunks", "kinds", "nbytes")

    def __init__(self, lines: bytes, kinds: Mapping[str, int]) -> None:
        self.chunks: list[bytes] = [lines] if lines else []
        #: Total size of the chunks in bytes.
        self.nbytes = len(lines)
        self.kinds = {k: n for k, n in kinds.items() if n}
        self._count = sum(self.kinds.values())
        self._decoded: list[Record] | None = None

    @classmethod
    def _made(cls, lines: bytes, kinds: dict[str, int], count: int) -> EncodedRecords:
        """A batch from parts the caller vouches for (``kinds`` without zeros, ``count``
        their sum): the per-frame path, without the checks of ``__init__``."""
        self = cls.__new__(cls)
        self.chunks = [lines] if lines else []
        self.nbytes = len(lines)
        self.kinds = kinds
        self._count = count
        self._decoded = None
        return self

    @classmethod
    def join(cls, batches: Iterable[EncodedRecords]) -> EncodedRecords:
        """One batch holding the records of ``batches``, in order (their chunks, not copied)."""
        batches = list(batches)
        if len(batches) == 1:
            return batches[0]
        joined = cls(b"", {})
        kinds = joined.kinds
        for b in batches:
            joined.chunks.extend(b.chunks)
            joined.nbytes += b.nbytes
            for kind, n in b.kinds.items():
                kinds[kind] = kinds.get(kind, 0) + n
        joined._count = sum(kinds.values())
        return joined

    @property
    def lines(self) -> bytes:
        """All the JSON lines as one ``bytes`` (joins the chunks)."""
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def decoded(self) -> list[Record]:
        """The records as dicts (decoded on first use, then kept)."""
        records = self._decoded
        if records is None:
            loads = orjson.loads
            records = self._decoded = [
                loads(line) for chunk in self.chunks for line in chunk.splitlines()
            ]
        return records

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        return self.decoded()[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedRecords):
            return self.lines == other.lines
        if isinstance(other, list | tuple):
            return self.decoded() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like a list

    def __repr__(self) -> str:
        return f"EncodedRecords({self._count} records, {self.nbytes} bytes)"


def as_records(records: Sequence[Record]) -> Sequence[Record]:
    """``records`` itself, or the decoded list when it is an :class:`EncodedRecords`."""
    return records.decoded() if isinstance(records, EncodedRecords) else records
