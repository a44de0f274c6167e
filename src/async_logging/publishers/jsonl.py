"""The default publisher: JSON lines in a size-rotated file (docs/design.md §5).

One published record per line, as orjson writes it, in ``./log/all.log`` by default (the
seed's winston default path). Built for the server's batches: :meth:`publish_many`
serialises a batch with ``orjson.dumps`` run by ``map`` (no Python code per record) and
hands it to the OS in one ``writev`` call, so it keeps up with the ingest rate
(docs/design.md §7).

Rotation works like :class:`logging.handlers.RotatingFileHandler`: when the next line
would take the file past ``max_bytes``, ``all.log`` becomes ``all.log.1``, ``all.log.1``
becomes ``all.log.2`` and so on up to ``all.log.<backup_count>``; the oldest is deleted.
A file never exceeds ``max_bytes`` unless a single line is longer than that, and rotation
splits batches at line boundaries.

A write that fails part-way (disk full, a file size limit, an I/O error) never leaves a torn
line behind: the bytes of the line it was writing are cut off again (``ftruncate``), and the
error says how many whole lines went out (:func:`~async_logging.publishers.base.mark_published`),
so the retry continues with the next record: every line parses, every record once.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Final

import orjson

from ..buffer import Record
from ..encoded import EncodedRecords
from ..exceptions import ConfigError, UsageError
from .base import BatchPublisher, mark_published

__all__ = [
    "DEFAULT_BACKUP_COUNT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PATH",
    "JsonLinesPublisher",
    "LineEncoder",
    "encode_line",
]

DEFAULT_PATH: Final = "./log/all.log"
DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUP_COUNT: Final = 5

#: Bytes of JSON joined into one buffer before the next one is started. Measured on the
#: 2-core machines with 12-event trees (2.3 kB a line): joins of ~128 lines run at twice
#: the rate of joins of 500+, which leave the CPU caches and the allocator's fast path.
CHUNK_BYTES: Final = 256 * 1024
_MIN_CHUNK: Final = 8
_MAX_CHUNK: Final = 4096
#: Buffers per writev call (POSIX guarantees at least 16; Linux and macOS allow 1024).
_IOV_MAX: Final = 1024

_line = partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)
_FALLBACK_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
_writev: Callable[[int, Sequence[bytes | memoryview]], int] | None = getattr(
    os, "writev", None
)  # os.writev is missing on Windows


def encode_line(record: Record, stats: Counter[str] | None = None) -> bytes:
    """Serialise one record as a JSON line (ending in ``\\n``), never raising.

    A record orjson refuses (a value of an odd type from a custom mapper, a non-string key,
    an integer past 64 bits, a reference cycle) is not lost: it is written with
    ``default=str`` (odd values become their ``str()``), then by the standard
    :mod:`json` module, and as a last resort as
    ``{"kind": ..., "uuid": ..., "unserialisable": "<error>", "repr": "<repr(record)>"}``.

    Args:
        record: the record to serialise.
        stats: when given, ``stats["fallbacks"]`` counts records that needed a fallback and
            ``stats["unserialisable"]`` those that needed the last resort.

    Returns:
        The line, as UTF-8 bytes.
    """
    try:
        return _line(record)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _fallback_line(record, stats)


def _fallback_line(record: Record, stats: Counter[str] | None) -> bytes:
    if stats is not None:
        stats["fallbacks"] += 1
    try:
        return orjson.dumps(record, default=str, option=_FALLBACK_OPTIONS)
    except TypeError:
        pass
    try:
        # The stdlib copes with integers past 64 bits; ensure_ascii keeps lone surrogates valid.
        text = json.dumps(record, default=str, allow_nan=False, separators=(",", ":"))
        return text.encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if stats is not None:
        stats["unserialisable"] += 1
    try:
        text = repr(record)
    except Exception as exc:  # a value whose __repr__ fails: still write a line
        text = f"<unrepresentable {type(record).__name__}: {type(exc).__name__}>"
    get = record.get if isinstance(record, dict) else {}.get
    kind, uuid = get("kind"), get("uuid")
    return _line(
        {
            "kind": kind if isinstance(kind, str) else None,
            "uuid": uuid if isinstance(uuid, str) else None,
            "unserialisable": error,
            "repr": text,
        }
    )


class LineEncoder:
    """Serialise batches of records into JSON-lines chunks of about :data:`CHUNK_BYTES`.

    Attributes:
        stats: counts ``fallbacks`` and ``unserialisable`` records (see :func:`encode_line`).
    """

    __slots__ = ("_chunk", "stats")

    def __init__(self, stats: Counter[str] | None = None) -> None:
        self.stats: Counter[str] = Counter() if stats is None else stats
        self._chunk = 128  # records per chunk, adapted to the size of the records seen

    def encode(self, records: Sequence[Record]) -> tuple[list[bytes], int]:
        """Serialise ``records``, one line each, in order.

        Args:
            records: the batch (a list or tuple).

        Returns:
            The chunks (each a run of whole lines) and their total size in bytes.
        """
        if type(records) is EncodedRecords:  # the engine's fast path encoded them already
            return records.chunks, records.nbytes
        n = len(records)
        if n == 1:
            line = encode_line(records[0], self.stats)
            return [line], len(line)
        parts: list[bytes] = []
        total = 0
        step = self._chunk
        i = 0
        while i < n:
            chunk = records[i : i + step]
            try:
                data = b"".join(map(_line, chunk))
            except TypeError:  # one odd record: redo this chunk line by line
                data = b"".join([encode_line(r, self.stats) for r in chunk])
            parts.append(data)
            total += len(data)
            i += step
            step = max(_MIN_CHUNK, min(_MAX_CHUNK, CHUNK_BYTES * len(chunk) // len(data)))
        self._chunk = step
        return parts, total


class JsonLinesPublisher(BatchPublisher):
    """Write records as JSON lines to a file rotated by size.

    Each :meth:`publish_many` call serialises the batch and writes it with one system
    call (``writev``), so the records are in the OS page cache when it returns and survive
    a crash of this process; :meth:`flush` also asks the OS to put them on disk. The file
    is opened in append mode (``O_APPEND``), so restarting keeps what was written.
    Thread-safe: calls are serialised by a lock.

    A batch that fails part-way raises the :class:`OSError` marked with the number of
    records written whole (:func:`~async_logging.publishers.base.published_count`); the
    start of a line it could not finish is cut off the file first. While that cut fails
    (the disk is gone), every call raises before writing. Sharing the file, a torn line is
    cut only if it is still the end of the file; after another process's line it stays,
    counted in ``torn_lines``.

    Args:
        path: the log file; its directory is created if missing. Relative paths are
            resolved once, here, so a later ``chdir`` does not move the log.
        max_bytes: size at which the file is rotated; 0 never rotates.
        backup_count: rotated files kept (``path.1`` ... ``path.N``); 0 never rotates (as
            with :class:`~logging.handlers.RotatingFileHandler`).
        shared: other processes append to the same file (server workers): before each
            batch, notice a rotation one of them did (one ``stat``) and follow it.

    Attributes:
        path: the absolute path of the current file.
        stats: counters: ``records`` and ``bytes`` written, ``rotations``, ``fallbacks``
            (records orjson refused, written with a fallback, see :func:`encode_line`),
            ``unserialisable`` (written as an error line), ``rotation_errors``,
            ``torn_cut`` (torn lines cut off after a failed write) and ``torn_lines``
            (torn lines that had to stay: another process wrote after them).

    Raises:
        ConfigError: an option is out of range, or the directory or file cannot be created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
        *,
        shared: bool = False,
    ) -> None:
        if max_bytes < 0:
            raise ConfigError(f"max_bytes must be >= 0, not {max_bytes}")
        if backup_count < 0:
            raise ConfigError(f"backup_count must be >= 0, not {backup_count}")
        self.path = os.path.abspath(os.fspath(path))
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.shared = shared
        self.stats: Counter[str] = Counter(records=0, bytes=0, rotations=0, fallbacks=0)
        self._encoder = LineEncoder(self.stats)
        self._lock = threading.Lock()
        self._closed = False
        self._fd: int | None = None
        self._size = 0
        # Bytes of the current batch the OS took so far, and the start of a line a failed
        # write left at the end of the file, not yet cut off (with the file's identity).
        self._done = 0
        self._torn: tuple[bytes, tuple[int, int]] | None = None
        self._ident = (0, 0)  # (st_dev, st_ino) of the open file
        try:
            self._open()
        except OSError as exc:
            raise ConfigError(f"cannot open log file {self.path!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def publish_many(self, records: Sequence[Record]) -> None:
        """Write a batch of records, one line each, in order, with one system call.

        Args:
            records: the batch.

        Raises:
            UsageError: the publisher is closed.
            OSError: the write failed (disk full, ...). The records it says were published
                (:func:`~async_logging.publishers.base.published_count`) are in the file
                as whole lines; nothing of the others is.
        """
        if not isinstance(records, list | tuple | EncodedRecords):
            records = list(records)
        if not records:
            return
        with self._lock:
            if self._closed:
                raise UsageError(f"{self!r} is closed")
            if self._torn is not None:  # a torn line is still there: nothing after it
                self._cut(*self._torn)
            if self._fd is None:  # a failed rotation left no file open: try again
                self._open()
            parts, nbytes = self._encoder.encode(records)
            self._done = 0
            try:
                rotating = self.max_bytes and self.backup_count
                if rotating and self.shared:
                    self._follow()
                if rotating and self._size + nbytes > self.max_bytes:
                    self._write_rotating(parts)
                else:
                    self._write(parts)
                    self._size += nbytes
            except OSError as exc:
                mark_published(exc, self._failed(parts))
                raise
            self.stats["records"] += len(records)
            self.stats["bytes"] += nbytes

    def flush(self) -> None:
        """Ask the OS to put everything written so far on disk (``fsync``).

        Records reach the OS on every write already; this is for durability against a
        machine crash and costs a disk round trip: call it at shutdown or before
        acknowledging in a durable mode, not after every batch.
        """
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self) -> None:
        """Flush and close the file; later writes raise :class:`UsageError`. Idempotent."""
        with self._lock:
            self._closed = True
            if self._torn is not None:  # a last chance to cut a torn line off
                with contextlib.suppress(OSError):
                    self._cut(*self._torn)
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # -- internals (called with the lock held) --------------------------------------------

    def _failed(self, parts: Sequence[bytes]) -> int:
        """After a write raised: cut off the line it left torn; return the lines written."""
        done, lines, torn = self._done, 0, b""
        for part in parts:  # each part is a run of whole lines
            if done >= len(part):
                lines += part.count(b"\n")
                done -= len(part)
                continue
            if done:
                lines += part.count(b"\n", 0, done)
                torn = part[part.rfind(b"\n", 0, done) + 1 : done]
            break
        self.stats["records"] += lines
        self.stats["bytes"] += self._done - len(torn)
        fd = self._fd
        if torn:
            self._torn = (torn, self._ident)
            with contextlib.suppress(OSError):  # then the next call tries again, first
                self._cut(torn, self._ident)
        if fd is not None:
            with contextlib.suppress(OSError):
                self._size = os.fstat(fd).st_size
        return lines

    def _cut(self, torn: bytes, ident: tuple[int, int]) -> None:
        """Cut ``torn``, the start of a line, off the end of the file ``ident`` names.

        Raises:
            OSError: the file cannot be read or truncated (the caller raises it: nothing
                is written after a torn line that could still be cut).
        """
        fd = self._fd
        st = os.fstat(fd) if fd is not None and ident == self._ident else None
        if st is None or not self._ends_with(st, torn):
            # The file was reopened, or another process wrote after the torn line: cutting
            # would take its lines too.
            self.stats["torn_lines"] += 1
        else:
            assert fd is not None
            os.ftruncate(fd, st.st_size - len(torn))
            self._size = st.st_size - len(torn)
            self.stats["torn_cut"] += 1
        self._torn = None

    def _ends_with(self, st: os.stat_result, torn: bytes) -> bool:
        """Whether the file (``st``, ours) still ends with ``torn``."""
        if st.st_size < len(torn):
            return False
        if not self.shared:
            return True  # nobody else appends
        try:
            rfd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, PermissionError):  # rotated away, or not ours to read
            return False
        try:
            mine = os.fstat(rfd)
            if (mine.st_dev, mine.st_ino) != (st.st_dev, st.st_ino):
                return False
            return os.pread(rfd, len(torn), st.st_size - len(torn)) == torn
        finally:
            os.close(rfd)

    def _follow(self) -> None:
        """Follow a rotation done by another process writing the same file (server workers).

        Several workers append to one file (``O_APPEND`` keeps each batch whole); the one
        that rotates renames it, so the others notice the path now names another file and
        reopen it, and learn its size, which the others grew too.
        """
        fd = self._fd
        assert fd is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is None or current.st_ino != mine.st_ino or current.st_dev != mine.st_dev:
            os.close(fd)
            self._fd = None
            self._open()
        else:
            self._size = mine.st_size

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        st = os.fstat(fd)
        self._size, self._ident = st.st_size, (st.st_dev, st.st_ino)
        self._fd = fd

    def _write(self, parts: Sequence[bytes | memoryview]) -> None:
        fd = self._fd
        assert fd is not None
        if not parts:
            return
        if len(parts) == 1 or _writev is None:
            self._write_all(fd, parts[0] if len(parts) == 1 else b"".join(parts))
            return
        for i in range(0, len(parts), _IOV_MAX):
            group = parts[i : i + _IOV_MAX]
            written = _writev(fd, group)
            self._done += written
            if written < sum(map(len, group)):  # a short write: finish it plainly
                self._write_all(fd, b"".join(group)[written:])

    def _write_all(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            self._done += written
            view = view[written:]

    def _write_rotating(self, parts: list[bytes]) -> None:
        """Write ``parts``, rotating at line boundaries so no file exceeds max_bytes."""
        limit = self.max_bytes
        pending: list[memoryview] = []
        size = self._size
        rotating = True
        for part in parts:
            view = memoryview(part)
            start, end = 0, len(part)
            while start < end:
                room = limit - size
                if end - start <= room or not rotating:
                    pending.append(view[start:])
                    size += end - start
                    break
                # The last line end that still fits (lines hold no raw newline: JSON escapes it).
                cut = part.rfind(b"\n", start, start + room) if room > 0 else -1
                if cut < 0 and size == 0:  # a single line longer than max_bytes: alone
                    cut = part.index(b"\n", start)
                if cut >= 0:
                    pending.append(view[start : cut + 1])
                    size += cut + 1 - start
                    start = cut + 1
                    continue
                self._write(pending)
                pending = []
                # If rotation fails, the rest of the batch goes to the current file.
                rotating = self._rotate()
                size = self._size
        self._write(pending)
        self._size = size

    def _rotate(self) -> bool:
        """Shift the backups, start a new file; False when the renames failed.

        Holds an advisory lock (``.<name>.lock`` beside the file) so that of several processes sharing the
        file only one rotates; the others find the new file and write on.
        """
        with _rotation_lock(self.path):
            fd = self._fd
            if fd is not None:
                try:
                    current = os.stat(self.path)
                    mine = os.fstat(fd)
                except FileNotFoundError:
                    current = None
                if current is not None and (current.st_ino, current.st_dev) != (
                    mine.st_ino,
                    mine.st_dev,
                ):
                    # Another process rotated already: write on in the file it started.
                    os.close(fd)
                    self._fd = None
                    self._open()
                    return True
            return self._rotate_locked()

    def _rotate_locked(self) -> bool:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            for i in range(self.backup_count - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):  # deleted under us: nothing to shift
                os.replace(self.path, f"{self.path}.1")
        except OSError:
            # Keep logging into the same file rather than lose lines; retried next time.
            self.stats["rotation_errors"] += 1
            self._open()
            return False
        self.stats["rotations"] += 1
        self._open()
        return True


@contextlib.contextmanager
def _rotation_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    head, tail = os.path.split(path)
    fd = os.open(
        os.path.join(head, f".{tail}.lock"),
        os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
        0o666,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
