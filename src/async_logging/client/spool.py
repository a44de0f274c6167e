"""The client's spool (``LogClient(spool_dir=...)``): unsent events survive a restart.

Every envelope the core cuts is appended to a file *before* it is written to the network;
acknowledged envelopes are marked done by an ack watermark (a *checkpoint*). A client that
starts with the same ``spool_dir`` resends whatever a dead or closed client spooled and
never got acknowledged (at-least-once: the proxy drops the duplicates it still remembers).
Only the sender thread touches these files.

Layout (one subdirectory per live client, so clients never share files)::

    <spool_dir>/
        c-<pid>-<random>/              one client's spool, flock-ed on .lock while it lives
            .lock
            checkpoint                 the ack watermark (a position), replaced atomically
            seg-<start position>.log   records [kind u8][length u32][events u32][crc32 u32][payload]

A *position* counts the bytes ever appended to one spool, across its segments (a segment is
named after the position of its first byte), so "everything before position P is acked" is
one integer. ``payload`` is the envelope exactly as sent (``{"seq": n, "logs": [...]}``
in MessagePack). A record cut short or damaged (a ``kill -9`` in the middle of a write, a
full disk) fails its length or CRC check and ends the replay of its segment.

A new client creates its directory under a staging name (``.new-…``), locks it and only
then renames it to ``c-…``, so another client never mistakes it for an abandoned one. At
start it *adopts* every ``c-…`` directory whose lock is free (its client closed or died):
it copies the records past that directory's checkpoint into its own spool, queues them for
sending, and deletes the directory. A client that closes with everything acknowledged
deletes its own directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_SPOOL_MAX_BYTES",
    "ClientSpool",
    "Orphan",
]

#: Unacknowledged bytes a spool holds at most (records and their headers).
DEFAULT_SPOOL_MAX_BYTES: Final = 64 * 1024 * 1024
#: A spool starts a new segment past this size (old ones are deleted once acked whole).
MAX_SEGMENT_BYTES: Final = 8 * 1024 * 1024
MIN_SEGMENT_BYTES: Final = 64 * 1024
#: Record kind of an encoded envelope (the only one so far).
ENVELOPE: Final = 1
_HEADER = struct.Struct(">BIII")  # kind, payload length, event count, crc32(payload)
_SEGMENT = re.compile(r"seg-(\d{20})\.log$")
OWN_PREFIX: Final = "c-"
STAGING_PREFIX: Final = ".new-"
LOCK: Final = ".lock"
CHECKPOINT: Final = "checkpoint"


class ClientSpool:
    """One client's spool directory, created fresh and locked for the client's lifetime.

    Args:
        root: the ``spool_dir`` shared by the clients of an application (created).
        max_bytes: unacknowledged bytes (from the watermark to the end) at most; an append
            that would pass it is refused (:meth:`append` returns 0).
        segment_bytes: size past which a new segment starts (default: an eighth of
            ``max_bytes``, between 64 KiB and 8 MiB).

    Raises:
        OSError: the directory cannot be created or locked.
    """

    def __init__(
        self, root: str | os.PathLike[str], max_bytes: int, *, segment_bytes: int | None = None
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(
            MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, max_bytes // 8)
        )
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.root))
        fd = _try_lock(staging)
        if fd is None:  # pragma: no cover - nobody else knows a fresh staging name
            raise OSError(f"cannot lock the new spool directory {staging}")
        self.dir = self.root / (OWN_PREFIX + staging.name[len(STAGING_PREFIX) :])
        try:
            os.rename(staging, self.dir)
        except OSError:
            os.close(fd)
            raise
        self._lock_fd: int | None = fd
        self._fd: int | None = None
        #: Start positions of this spool's segment files, oldest first (the last is current).
        self._segments: deque[int] = deque()
        self._seg_size = 0
        #: Position after the last record appended.
        self.end = 0
        #: Position before which every record is done (acknowledged or refused for good).
        self.acked_to = 0
        self._saved = 0
        self._open: deque[int] = deque()
        self._done: set[int] = set()

    # ------------------------------------------------------------------ writing

    @property
    def pending_bytes(self) -> int:
        """Bytes from the watermark to the end: what a restart would replay."""
        return self.end - self.acked_to

    def append(self, payload: bytes, count: int, *, force: bool = False) -> int:
        """Write one envelope; return its position (after it), or 0 when the spool is full.

        Args:
            payload: the encoded envelope.
            count: how many events it holds.
            force: write it even past ``max_bytes``.

        Raises:
            OSError: the write failed (the partial record is cut off when possible and the
                next append starts a new segment).
        """
        size = _HEADER.size + len(payload)
        if not force and self.end - self.acked_to + size > self.max_bytes:
            return 0
        if self._fd is None or (self._seg_size and self._seg_size + size > self.segment_bytes):
            self._new_segment()
        fd = self._fd
        assert fd is not None
        header = _HEADER.pack(ENVELOPE, len(payload), count, zlib.crc32(payload))
        try:
            written = os.writev(fd, (header, payload))
            while written < size:  # pragma: no cover - regular files write whole
                written += os.write(fd, (header + payload)[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._seg_size)
            self._close_segment()
            raise
        self._seg_size += size
        self.end += size
        self._open.append(self.end)
        return self.end

    def done(self, position: int) -> None:
        """The record ending at ``position`` needs no resend; advance the watermark."""
        if position <= self.acked_to:
            return
        self._done.add(position)
        pending = self._open
        done = self._done
        while pending and pending[0] in done:
            p = pending.popleft()
            done.discard(p)
            self.acked_to = p

    def checkpoint(self) -> bool:
        """Write the watermark if it moved and delete the segments acked whole.

        Returns:
            Whether a checkpoint was written.
        """
        if self.acked_to == self._saved:
            return False
        tmp = self.dir / (CHECKPOINT + ".tmp")
        tmp.write_text(f"{self.acked_to}\n")
        os.replace(tmp, self.dir / CHECKPOINT)
        self._saved = self.acked_to
        segs = self._segments
        while len(segs) > 1 and segs[1] <= self.acked_to:
            (self.dir / _name(segs.popleft())).unlink(missing_ok=True)
        return True

    def close(self) -> bool:
        """Checkpoint and release the directory; delete it when nothing is left to resend.

        Returns:
            Whether the directory was deleted (everything was acknowledged).
        """
        empty = self.acked_to == self.end
        try:
            if not empty:
                self.checkpoint()
        finally:
            self._close_segment()
            if empty:
                _remove(self.dir, [_name(s) for s in self._segments])
                self._segments.clear()
            self._unlock()
        return empty

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptors, leaving the parent's lock."""
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None

    def _new_segment(self) -> None:
        self._close_segment()
        start = self.end
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.dir / _name(start), flags, 0o600)
        if not self._segments or self._segments[-1] != start:
            self._segments.append(start)
        self._seg_size = 0

    def _close_segment(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ adopting

    def orphans(self) -> Iterator[Orphan]:
        """The other clients' directories under the root whose lock is free, locked now.

        Each one yielded is locked until :meth:`Orphan.remove` or :meth:`Orphan.release`.
        """
        try:
            names = sorted(p.name for p in self.root.iterdir())
        except OSError:
            return
        for name in names:
            d = self.root / name
            if not name.startswith(OWN_PREFIX) or d == self.dir or not d.is_dir():
                continue
            fd = _try_lock(d)
            if fd is not None:
                yield Orphan(d, fd)


class Orphan:
    """The spool directory of a client that closed or died, locked by the adopter.

    Attributes:
        dir: the directory.
        torn: records found cut short or damaged (each ends its segment's replay).
    """

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.dir = directory
        self._lock_fd: int | None = lock_fd
        self.torn = 0
        try:
            self.checkpointed = int((directory / CHECKPOINT).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            self.checkpointed = 0
        self._names: list[tuple[int, str]] = []
        try:
            for p in directory.iterdir():
                m = _SEGMENT.match(p.name)
                if m:
                    self._names.append((int(m.group(1)), p.name))
        except OSError:
            pass
        self._names.sort()

    def records(self) -> Iterator[tuple[bytes, int, int]]:
        """Yield ``(payload, events, position after it)`` for every record past the checkpoint."""
        names = self._names
        for i, (start, name) in enumerate(names):
            next_start = names[i + 1][0] if i + 1 < len(names) else None
            if next_start is not None and next_start <= self.checkpointed:
                continue
            try:
                data = (self.dir / name).read_bytes()
            except OSError:
                self.torn += 1
                continue
            pos = max(0, self.checkpointed - start)
            while pos < len(data):
                if pos + _HEADER.size > len(data):
                    self.torn += 1
                    break
                kind, length, count, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                payload = data[pos + _HEADER.size : end]
                if kind != ENVELOPE or end > len(data) or zlib.crc32(payload) != crc:
                    self.torn += 1
                    break
                yield payload, count, start + end
                pos = end

    def save(self, position: int) -> None:
        """Record that everything before ``position`` was taken over (a partial adoption)."""
        tmp = self.dir / (CHECKPOINT + ".tmp")
        tmp.write_text(f"{position}\n")
        os.replace(tmp, self.dir / CHECKPOINT)

    def remove(self) -> None:
        """Delete the directory (its records were taken over) and drop the lock."""
        try:
            _remove(self.dir, [n for _, n in self._names])
        finally:
            self.release()

    def release(self) -> None:
        """Drop the lock, leaving the directory for a later client."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def _name(start: int) -> str:
    return f"seg-{start:020d}.log"


def _remove(directory: Path, segments: list[str]) -> None:
    """Delete a spool directory: segments first, the lock last (see the module docstring)."""
    for name in [*segments, CHECKPOINT + ".tmp", CHECKPOINT, LOCK]:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on ``directory/.lock``; None when it is held or the directory is gone."""
    try:
        fd = os.open(
            directory / LOCK, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
