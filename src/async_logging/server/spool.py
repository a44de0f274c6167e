"""The write-ahead spool (``--spool DIR``): nothing acked is lost to a ``kill -9``.

Every accepted batch is appended to the spool *before* it is fed to the buffer and acked.
The append is one ``write`` to a file opened with ``O_APPEND``, so once it returns the batch
is in the kernel and survives the death of the process (``fsync=True`` also survives the
machine's). A *checkpoint* records the spool position before which everything has been
published: the pipeline takes one whenever the buffer holds no open tree (else at the
oldest batch that opened a tree still open), and the publisher thread writes it once the
records up to there are written. On start the server replays the spool from the
checkpoint, so trees that were accepted but not yet published come out; a tree published
between the last checkpoint and the crash can come out twice, flagged ``replayed: true``
(at-least-once).

**A failed append leaves the spool as it was.** A write cut short (disk full, a file-size
limit: ``RLIMIT_FSIZE``, where Python ignores ``SIGXFSZ`` and the write fails ``EFBIG``)
is truncated back to where the record began, and the batch is refused (``spool_unavailable``,
HTTP 503 / an error frame; the client keeps it and resends). When the file is too big
(``EFBIG``) the record is tried once more in a new segment. When even the truncation fails,
the segment is closed and the next append starts a new one, so a torn record is only ever
the last of its segment and no acked record is written after it.

**Every record is checksummed**, so replay also gets past damage it did not cause: a record
whose header or payload does not match its CRC-32 (``zlib.crc32``) is skipped, the replay
*resynchronises* at the next valid record (found by its magic bytes and header checksum),
and the bytes skipped are counted (:attr:`Spool.torn`, :attr:`Spool.skipped_bytes`) and
logged.

**One open tree does not pin the spool.** The pipeline writes the events of the trees still
open again at the tail (a ``REBASE`` record) once the region a restart would replay passes
:meth:`Spool.rebase_threshold`: ``max(REBASE_MIN_BYTES, REBASE_FACTOR x`` the last rebase
record) capped at half of ``max_bytes``, and never below twice the last rebase record. The
checkpoint then moves to the rebase record; the work stays linear (a rebase copies at most
``REBASE_FACTOR / (REBASE_FACTOR - 1)`` bytes per byte appended since the last one) and
what a crash replays stays near that threshold instead of everything acked since the tree
opened.

**No extra incomplete copy of a published tree.** A batch with events of a tree the engine
has already published (late events, a client's resend) is spooled behind a ``SETTLED``
record naming those uuids. A replay starts with an empty engine: an event of such a uuid
that the replay has not met before (its tree came out before the replayed part of the
spool) is published on its own, flagged ``late`` and ``replayed``, instead of opening a new
tree that would come out incomplete at the timeout.

Each server process spools into its own directory ``DIR/w-<pid>`` (``w-<pid>.<n>`` when
that name is taken, as by a process of an earlier container with the same pid) and holds a
lock on it while it lives; at start a process *adopts* every directory whose lock is free
(its process died): it re-spools and replays those batches, then deletes the directory. So
it works the same with one process or with workers, after a crash or a clean stop. The
server listens first and replays afterwards, :data:`REPLAY_SLICE_BYTES` at a time with the
event loop served between slices, so its port opens at once however big the spool is.

Layout: ``<dir>/spool-<n>.log`` segments and ``<dir>/checkpoint`` (``<segment> <offset>``,
replaced atomically). Segments wholly before the checkpoint are deleted. A segment starts
with :data:`SEGMENT_MAGIC` (format version 2), then records::

    magic   2 bytes  a5 5c
    kind    u8       1 MessagePack, 2 JSON (the frame as received), 3 SETTLED, 4 REBASE
    length  u32 BE   of the payload
    crc     u32 BE   CRC-32 of the payload
    hcrc    u32 BE   CRC-32 of the 11 bytes before it
    payload

Version 1 segments (written before checksums: no segment header, records
``[kind u8][length u32 BE][payload]``) still replay, up to their first torn record; a
segment in neither format is refused with :class:`SpoolFormatError` and left on disk.
New appends always go to a new segment, never after what an earlier process wrote.

At ``max_bytes`` of unpublished data new batches are refused (``spool_full``, HTTP 503 / an
error frame): the clients keep them and resend, nothing is acked that is not spooled. A
spool that cannot be written (the directory cannot be made, the disk is full) is not fatal:
the server serves, refuses batches with ``spool_unavailable`` (and ``/ecv`` says so), and
tries the disk again at the next batch.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from ..exceptions import LimitExceeded

__all__ = [
    "JSON",
    "MSGPACK",
    "REBASE",
    "REBASE_FACTOR",
    "REBASE_MIN_BYTES",
    "REFUSAL_REASONS",
    "REPLAY_SLICE_BYTES",
    "SEGMENT_BYTES",
    "SEGMENT_MAGIC",
    "SETTLED",
    "Entry",
    "Spool",
    "SpoolBusy",
    "SpoolFormatError",
    "settled_uuids",
    "split_settled",
]

log = logging.getLogger("async_logging.server")

#: Every reason the spool refuses a batch with (503; ``bad_input{reason}``, exported at 0
#: from the start): full (clients resend later), or the disk refuses the write.
REFUSAL_REASONS: Final = ("spool_full", "spool_unavailable")

#: A batch as received: a MessagePack frame.
MSGPACK = 1
#: A batch as received: a JSON frame or body.
JSON = 2
#: The uuids of the next record's events whose tree was published before it was fed
#: (a MessagePack array of strings).
SETTLED = 3
#: Events held in open trees, written again at the tail (a MessagePack array of maps).
REBASE = 4
_KINDS = frozenset({MSGPACK, JSON, SETTLED, REBASE})
#: Size at which a new segment is started (old ones are deleted whole).
SEGMENT_BYTES = 64 * 1024 * 1024
#: The first bytes of a segment in the current format (version 2: checksummed records).
SEGMENT_MAGIC = b"ALSPOOL\x02"
#: A pinned region (what a restart would replay) below this is never rebased.
REBASE_MIN_BYTES = 4 * 1024 * 1024
#: A rebase waits until the pinned region is this many times the last rebase record.
REBASE_FACTOR = 4
#: Bytes of spool a replay feeds between two yields to the event loop (the server serves
#: while it replays: the port is open before the replay begins).
REPLAY_SLICE_BYTES = 256 * 1024

_RECORD_MAGIC = b"\xa5\x5c"
# magic, kind, payload length, CRC-32 of the payload, CRC-32 of the 11 bytes before.
_RECORD = struct.Struct(">2sBIII")
_CHECKED = _RECORD.size - 4
_HEAD = struct.Struct(">2sBII")
_U32 = struct.Struct(">I")
_V1_HEADER = struct.Struct(">BI")
_SEGMENT = re.compile(r"spool-(\d{10})\.log$")
#: Positions are (segment << _SHIFT) + offset, so they compare as plain ints.
_SHIFT = 40
_MASK = (1 << _SHIFT) - 1
# Names tried for this process's directory (``w-<pid>``, ``w-<pid>.1``, ...).
_MAX_NAMES = 100


class SpoolBusy(OSError):
    """The spool directory is locked by another live process."""


class SpoolFormatError(ValueError):
    """A segment is in no format this version reads (it is left on disk, untouched)."""


class Entry(NamedTuple):
    """One record met by :meth:`Spool.replay`."""

    kind: int
    payload: bytes
    #: The spool position just after the record.
    position: int


class Spool:
    """An append-only, checkpointed, checksummed log of accepted batches.

    Args:
        directory: where the segments live (created).
        max_bytes: unpublished bytes at which :meth:`append` refuses new batches.
        fsync: also ``fsync`` every append (survives a machine crash, costs a disk flush).
        segment_bytes: size at which a new segment starts.

    Raises:
        SpoolBusy: another process holds the directory.
        OSError: the directory cannot be made or read (see :meth:`for_process` for a
            spool that tolerates it).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = False,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self._init(Path(directory), max_bytes, fsync=fsync, segment_bytes=segment_bytes)
        self._attach()

    def _init(
        self,
        directory: Path,
        max_bytes: int,
        *,
        fsync: bool = False,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self.checkpointed = 0
        # The segment appends go to, and the offset after its last whole record.
        self._segment = 0
        self._offset = 0
        # Logical start (bytes of all the segments before it) of each segment still known:
        # sizes between positions in O(1), without listing the directory per batch.
        self._base: dict[int, int] = {0: 0}
        #: Batches appended, and refused (``spool_full`` or ``spool_unavailable``).
        self.appended = 0
        self.refused = 0
        #: Records skipped by :meth:`replay` (torn or damaged), and the bytes they held.
        self.torn = 0
        self.skipped_bytes = 0
        #: Why the spool cannot be written right now (None: it can).
        self.error: str | None = None

    @classmethod
    def for_process(cls, root: str | os.PathLike[str], max_bytes: int, **options: Any) -> Spool:
        """This process's spool under ``root``: ``w-<pid>``, or ``w-<pid>.<n>`` when taken
        (``options`` as for :class:`Spool`).

        Its first segment is made at once, so a disk that refuses is known at start. Never
        raises for the disk: a spool that cannot be made or written comes back with
        :attr:`error` set (and logged), refuses batches with ``spool_unavailable``, and
        tries the disk again at each batch.
        """
        root = Path(root)
        base = f"w-{os.getpid()}"
        directory = root / base
        failure: OSError | None = None
        for n in range(_MAX_NAMES):
            directory = root / (base if n == 0 else f"{base}.{n}")
            if directory.exists():
                continue  # left by a dead process of the same pid (adopted later), or in use
            try:
                directory.mkdir(parents=True)
                spool = cls(directory, max_bytes, **options)
            except (FileExistsError, SpoolBusy):
                continue
            except OSError as exc:
                failure = exc
                break
            try:
                spool._next_segment()
            except OSError as exc:
                spool._refuse_from(exc)
            return spool
        spool = cls.__new__(cls)
        spool._init(directory, max_bytes, **options)
        spool._refuse_from(failure or OSError(errno.EEXIST, f"{_MAX_NAMES} names taken"))
        return spool

    # ------------------------------------------------------------------ writing

    @property
    def position(self) -> int:
        """The position just after the last appended batch."""
        return (self._segment << _SHIFT) + self._offset

    @property
    def pending_bytes(self) -> int:
        """Bytes appended since the checkpoint (what a restart would replay)."""
        return self.bytes_since(self.checkpointed)

    @property
    def written(self) -> int:
        """Bytes appended to this spool's segments so far (from its first segment on)."""
        return self._logical(self.position)

    def bytes_since(self, position: int) -> int:
        """Bytes appended after ``position`` (one this spool handed out)."""
        return self._logical(self.position) - self._logical(position)

    def rebase_threshold(self, open_bytes: int) -> int:
        """Pinned bytes past which the open trees (``open_bytes`` when last written) are
        worth writing again at the tail; see the module's docstring."""
        proportionate = max(REBASE_MIN_BYTES, REBASE_FACTOR * open_bytes)
        return max(2 * open_bytes, min(self.max_bytes // 2, proportionate))

    def append(
        self, kind: int, payload: bytes, *, force: bool = False, settled: bytes | None = None
    ) -> int:
        """Write one batch (behind its ``SETTLED`` record, in the same write); return the
        position after it.

        Raises:
            LimitExceeded: ``spool_full`` (status 503) when the unpublished data would pass
                ``max_bytes`` (unless ``force``); ``spool_unavailable`` (status 503) when the
                disk refuses the write, which then left the spool as it was.
        """
        data = _record(kind, payload)
        if settled is not None:
            data = _record(SETTLED, settled) + data
        if not force and self.pending_bytes + len(data) > self.max_bytes:
            self.refused += 1
            raise LimitExceeded(
                "spool_full",
                f"the spool holds {self.max_bytes} bytes not yet published; retry later",
                status=503,
            )
        try:
            if self._lock_fd is None:
                self._attach()
            if self._fd is None or (
                self._offset + len(data) > self.segment_bytes and self._offset > len(SEGMENT_MAGIC)
            ):
                self._next_segment()
            try:
                self._write(data)
            except OSError as exc:
                self._undo()
                if exc.errno != errno.EFBIG or self._offset <= len(SEGMENT_MAGIC):
                    raise
                # The file is too big (RLIMIT_FSIZE): a new segment may take the record.
                self._next_segment()
                try:
                    self._write(data)
                except OSError:
                    self._undo()
                    raise
        except OSError as exc:
            self.refused += 1
            reason = self._refuse_from(exc)
            raise LimitExceeded("spool_unavailable", reason, status=503) from exc
        if self.error is not None:
            log.warning("the spool %s can be written again; batches are taken", self.dir)
            self.error = None
        self._offset += len(data)
        self.appended += 1
        return self.position

    def _refuse_from(self, exc: OSError) -> str:
        """Remember (and log, once) why the spool cannot be written."""
        reason = f"cannot write the spool {self.dir}: {exc.strerror or exc}"
        if self.error is None:
            log.error("%s; batches are refused (spool_unavailable) until it can", reason)
        self.error = reason
        return reason

    def checkpoint(self, position: int) -> None:
        """Everything before ``position`` is published: remember it, drop old segments.

        Called from the publisher thread.
        """
        with self._lock:
            if position <= self.checkpointed:
                return
            tmp = self.dir / "checkpoint.tmp"
            tmp.write_text(f"{position >> _SHIFT} {position & _MASK}\n")
            os.replace(tmp, self.dir / "checkpoint")
            self.checkpointed = position
            for n in self._segments():
                if n < position >> _SHIFT:
                    (self.dir / _name(n)).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the current segment and release the directory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Close and delete this spool (after its batches were taken over)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def orphans(root: str | os.PathLike[str]) -> list[Path]:
        """Per-process spool directories under ``root`` whose process is gone."""
        root = Path(root)
        if not root.is_dir():
            return []
        found = []
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name.startswith("w-"):
                fd = _try_lock(d)
                if fd is not None:
                    os.close(fd)
                    found.append(d)
        return found

    # ------------------------------------------------------------------ replay

    def replay(self) -> Iterator[Entry]:
        """Every record after the checkpoint, in order.

        A record that does not check (torn by a crash, damaged) is skipped, counted in
        :attr:`torn` and :attr:`skipped_bytes`, and logged; the replay goes on at the next
        valid record. In a version 1 segment (no checksums) a torn record ends the segment.

        Raises:
            SpoolFormatError: a segment is in no format this version reads.
        """
        start_seg = self.checkpointed >> _SHIFT
        start_off = self.checkpointed & _MASK
        for n in self._segments():
            if n < start_seg:
                continue
            path = self.dir / _name(n)
            data = path.read_bytes()
            pos = start_off if n == start_seg else 0
            if data.startswith(SEGMENT_MAGIC):
                yield from self._replay_v2(path, n, data, max(pos, len(SEGMENT_MAGIC)))
            elif len(data) < len(SEGMENT_MAGIC) and SEGMENT_MAGIC.startswith(data):
                continue  # a segment whose header was never written whole: empty
            elif data[0] in (MSGPACK, JSON):
                yield from _replay_v1(n, data, pos)
            else:
                raise SpoolFormatError(
                    f"{path} is not a spool segment this version reads "
                    f"(it begins {data[:8]!r}); the directory is left as it is"
                )

    def _replay_v2(self, path: Path, n: int, data: bytes, pos: int) -> Iterator[Entry]:
        end = len(data)
        while pos < end:
            found = _parse(data, pos)
            if found is not None:
                kind, start, stop = found
                yield Entry(kind, data[start:stop], (n << _SHIFT) + stop)
                pos = stop
                continue
            after = _resync(data, pos + 1)
            skipped = (end if after is None else after) - pos
            self.torn += 1
            self.skipped_bytes += skipped
            log.warning(
                "spool %s: %d bytes at offset %d are not a whole record (torn or damaged); "
                "skipped%s",
                path,
                skipped,
                pos,
                "" if after is None else f", replay goes on at offset {after}",
            )
            if after is None:
                return
            pos = after

    # ------------------------------------------------------------------ files

    def _attach(self) -> None:
        """Make and lock the directory, read the checkpoint, size the segments."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(self.dir)
        if fd is None:
            raise SpoolBusy(errno.EBUSY, f"spool directory {self.dir} is in use by another process")
        self._lock_fd = fd
        self.checkpointed = self._read_checkpoint()
        base = 0
        segments = self._segments()
        for n in segments:
            self._base[n] = base
            base += (self.dir / _name(n)).stat().st_size
        # Appends never go after what is there (another version, a torn tail): a new segment.
        self._segment = max(segments[-1] + 1 if segments else 0, self.checkpointed >> _SHIFT)
        self._offset = 0
        self._base[self._segment] = base

    def _next_segment(self) -> None:
        """Start a new segment (its header written) for the appends that follow."""
        size = self._offset
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            n = self._segment + 1
            self._base[n] = self._base.get(self._segment, 0) + size
            self._segment, self._offset = n, 0
        path = self.dir / _name(self._segment)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        try:
            if os.write(fd, SEGMENT_MAGIC) != len(SEGMENT_MAGIC):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._offset = len(SEGMENT_MAGIC)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        written = os.write(self._fd, data)
        view = memoryview(data)[written:]
        while view:  # the rest of a write cut short: its error (ENOSPC, EFBIG) comes now
            written = os.write(self._fd, view)
            if written <= 0:  # never for a regular file; do not spin if it happens
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def _undo(self) -> None:
        """Cut the segment back to its last whole record after a failed write; when that
        fails too, close it: the next append starts a new segment (the torn record stays
        the last of this one, where replay's checksums find it)."""
        fd = self._fd
        assert fd is not None
        try:
            os.ftruncate(fd, self._offset)
        except OSError:
            log.error("spool %s: cannot truncate a failed write; a new segment follows", self.dir)
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = self._offset
            os.close(fd)
            self._fd = None
            n = self._segment + 1
            self._base[n] = self._base.get(self._segment, 0) + size
            self._segment, self._offset = n, 0

    def _logical(self, position: int) -> int:
        seg = position >> _SHIFT
        base = self._base.get(seg)
        if base is None:  # a segment dropped since (before the checkpoint): nothing before
            base = 0 if seg < self._segment else self._base[self._segment]
        return base + (position & _MASK)

    def _segments(self) -> list[int]:
        found = []
        for p in self.dir.iterdir():
            m = _SEGMENT.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _read_checkpoint(self) -> int:
        try:
            seg, off = (self.dir / "checkpoint").read_text().split()
        except (FileNotFoundError, ValueError):
            return 0
        return (int(seg) << _SHIFT) + int(off)


def settled_uuids(logs: Iterable[Any], published: Any) -> bytes | None:
    """The ``SETTLED`` payload for a batch: the uuids of its events that ``published``
    (the engine's memory of published trees: supports ``in``) holds; None when none."""
    uuids = {e.get("uuid") for e in logs if isinstance(e, dict)}
    found = sorted(u for u in uuids if u.__class__ is str and u in published)
    return msgspec.msgpack.encode(found) if found else None


def split_settled(
    logs: list[Any], settled: bytes | None, seen: set[str]
) -> tuple[list[Any], list[Any]]:
    """Split a replayed batch into the events to feed and those to publish ``late``.

    Late: the events of a ``settled`` uuid the replay has not met before (not in
    ``seen``): their tree was published before the replayed part of the spool began.
    ``seen`` is updated with the uuids of the events to feed.
    """
    late_uuids = set(msgspec.msgpack.decode(settled, type=list[str])) if settled else set()
    late_uuids -= seen
    feed: list[Any] = []
    late: list[Any] = []
    for e in logs:
        uuid = e.get("uuid") if isinstance(e, dict) else None
        if uuid in late_uuids:
            late.append(e)
        else:
            feed.append(e)
            if uuid.__class__ is str:
                seen.add(uuid)
    return feed, late


def _record(kind: int, payload: bytes) -> bytes:
    head = _HEAD.pack(_RECORD_MAGIC, kind, len(payload), zlib.crc32(payload))
    return b"".join((head, _U32.pack(zlib.crc32(head)), payload))


def _parse(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """``(kind, payload start, payload end)`` of a valid record at ``pos``, else None."""
    if pos + _RECORD.size > len(data):
        return None
    magic, kind, length, crc, hcrc = _RECORD.unpack_from(data, pos)
    if magic != _RECORD_MAGIC or kind not in _KINDS:
        return None
    view = memoryview(data)
    if zlib.crc32(view[pos : pos + _CHECKED]) != hcrc:
        return None
    start = pos + _RECORD.size
    stop = start + length
    if stop > len(data) or zlib.crc32(view[start:stop]) != crc:
        return None
    return kind, start, stop


def _resync(data: bytes, start: int) -> int | None:
    """The offset of the next valid record at or after ``start``, or None."""
    at = data.find(_RECORD_MAGIC, start)
    while at != -1:
        if _parse(data, at) is not None:
            return at
        at = data.find(_RECORD_MAGIC, at + 1)
    return None


def _replay_v1(n: int, data: bytes, pos: int) -> Iterator[Entry]:
    """Records of a version 1 segment (no checksums): a torn record ends it."""
    while pos + _V1_HEADER.size <= len(data):
        kind, length = _V1_HEADER.unpack_from(data, pos)
        end = pos + _V1_HEADER.size + length
        if end > len(data):
            break
        yield Entry(kind, data[pos + _V1_HEADER.size : end], (n << _SHIFT) + end)
        pos = end


def _name(n: int) -> str:
    return f"spool-{n:010d}.log"


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on ``directory/.lock``, or None when another process holds it."""
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
