"""The write-ahead spool (``--spool DIR``): nothing acked is lost to a ``kill -9``.

Every accepted batch is appended to the spool *before* it is fed to the buffer and acked.
The append is one ``write`` to a file opened with ``O_APPEND``, so once it returns the batch
is in the kernel and survives the death of the process (``fsync=True`` also survives the
machine's). A *checkpoint* records the spool position before which everything has been
published: the pipeline takes one whenever the buffer holds no open tree, and the publisher
thread writes it once the records up to there are written. On start the server replays the
spool from the checkpoint, so trees that were accepted but not yet published come out; a
tree published between the last checkpoint and the crash can come out twice, flagged
``replayed: true`` (at-least-once).

Each server process spools into its own directory ``DIR/w-<pid>`` and holds a lock on it
while it lives; at start a process *adopts* every directory whose lock is free (its process
died): it re-spools and replays those batches, then deletes the directory. So it works the
same with one process or with workers, after a crash or a clean stop.

Layout: ``<dir>/spool-<n>.log`` segments of records ``[kind: u8][length: u32 BE][payload]``
(``kind`` 1 = MessagePack, 2 = JSON, the frame as it was received), and ``DIR/checkpoint``
(``<segment> <offset>``), replaced atomically. Segments wholly before the checkpoint are
deleted. At ``max_bytes`` of unpublished data new batches are refused (``spool_full``,
HTTP 503 / an error frame): the clients keep them and resend, nothing is acked that is not
spooled.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from ..exceptions import LimitExceeded

__all__ = ["JSON", "MSGPACK", "SEGMENT_BYTES", "Spool"]

MSGPACK = 1
JSON = 2
#: Size at which a new segment is started (old ones are deleted whole).
SEGMENT_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">BI")
_SEGMENT = re.compile(r"spool-(\d{10})\.log$")
#: Positions are (segment << _SHIFT) + offset, so they compare as plain ints.
_SHIFT = 40


class Spool:
    """An append-only, checkpointed log of accepted batches.

    Args:
        directory: where the segments live (created).
        max_bytes: unpublished bytes at which :meth:`append` refuses new batches.
        fsync: also ``fsync`` every append (survives a machine crash, costs a disk flush).
        segment_bytes: size at which a new segment starts.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = False,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _try_lock(self.dir)
        if self._lock_fd is None:
            raise OSError(f"spool directory {self.dir} is in use by another process")
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self.checkpointed = self._read_checkpoint()
        segments = self._segments()
        self._segment = max(segments[-1] if segments else 0, self.checkpointed >> _SHIFT)
        self._fd = self._open(self._segment)
        self._offset = os.fstat(self._fd).st_size
        self.appended = 0
        self.refused = 0

    # ------------------------------------------------------------------ writing

    @property
    def position(self) -> int:
        """The position just after the last appended batch."""
        return (self._segment << _SHIFT) + self._offset

    @property
    def pending_bytes(self) -> int:
        """Bytes appended since the checkpoint (what a restart would replay)."""
        seg, off = self.checkpointed >> _SHIFT, self.checkpointed & ((1 << _SHIFT) - 1)
        if seg == self._segment:
            return self._offset - off
        total = self._offset
        for n in self._segments():
            if seg <= n < self._segment:
                total += (self.dir / _name(n)).stat().st_size - (off if n == seg else 0)
        return total

    def append(self, kind: int, payload: bytes, *, force: bool = False) -> int:
        """Write one batch; return the position after it.

        Raises:
            LimitExceeded: ``spool_full`` (status 503) when the unpublished data would pass
                ``max_bytes``.
        """
        size = _HEADER.size + len(payload)
        if not force and self.pending_bytes + size > self.max_bytes:
            self.refused += 1
            raise LimitExceeded(
                "spool_full",
                f"the spool holds {self.max_bytes} bytes not yet published; retry later",
                status=503,
            )
        if self._offset + size > self.segment_bytes and self._offset > 0:
            os.close(self._fd)
            self._segment += 1
            self._fd = self._open(self._segment)
            self._offset = 0
        data = _HEADER.pack(kind, len(payload)) + payload
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # pragma: no cover - regular files write whole
                written += os.write(self._fd, data[written:])
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            # Disk full or gone: refuse the batch (the client keeps it) rather than ack it
            # without it being durable. A partial record at the tail ends replay there.
            self.refused += 1
            self._offset = os.fstat(self._fd).st_size
            raise LimitExceeded(
                "spool_unavailable", f"cannot write the spool: {exc.strerror}", status=503
            ) from exc
        self._offset += size
        self.appended += 1
        return self.position

    def checkpoint(self, position: int) -> None:
        """Everything before ``position`` is published: remember it, drop old segments.

        Called from the publisher thread.
        """
        with self._lock:
            if position <= self.checkpointed:
                return
            tmp = self.dir / "checkpoint.tmp"
            tmp.write_text(f"{position >> _SHIFT} {position & ((1 << _SHIFT) - 1)}\n")
            os.replace(tmp, self.dir / "checkpoint")
            self.checkpointed = position
            for n in self._segments():
                if n < position >> _SHIFT:
                    (self.dir / _name(n)).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the current segment and release the directory."""
        os.close(self._fd)
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

    def replay(self) -> Iterator[tuple[int, bytes, int]]:
        """Yield ``(kind, payload, position after it)`` for every batch after the checkpoint.

        A record cut short by a crash ends the replay of its segment.
        """
        start_seg = self.checkpointed >> _SHIFT
        start_off = self.checkpointed & ((1 << _SHIFT) - 1)
        for n in self._segments():
            if n < start_seg:
                continue
            data = (self.dir / _name(n)).read_bytes()
            pos = start_off if n == start_seg else 0
            while pos + _HEADER.size <= len(data):
                kind, length = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if end > len(data):
                    break
                yield kind, data[pos + _HEADER.size : end], (n << _SHIFT) + end
                pos = end

    # ------------------------------------------------------------------ files

    def _segments(self) -> list[int]:
        found = []
        for p in self.dir.iterdir():
            m = _SEGMENT.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _open(self, n: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return os.open(self.dir / _name(n), flags, 0o644)

    def _read_checkpoint(self) -> int:
        try:
            seg, off = (self.dir / "checkpoint").read_text().split()
        except (FileNotFoundError, ValueError):
            return 0
        return (int(seg) << _SHIFT) + int(off)


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
