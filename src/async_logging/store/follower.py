"""The store's follower: it reads the JSON-lines file the server writes into the store.

Sinks that can fall behind follow published records instead of sitting on the ingest
path (docs/design.md §5). The SQLite store is the first: the server writes every record
to its JSON-lines file anyway, at the ingest rate; the follower, in a process of its own
(started by the server, one for all its workers), tails that file across rotations and
stores what it reads in batches of its own (:meth:`SqliteStore.add_lines
<async_logging.store.writer.SqliteStore.add_lines>`). Ingest never waits for the store.

- **Where it is** is committed with the rows (:class:`~.writer.FollowPosition`: the
  file's inode, the offset, the file's first bytes, the lines read): killed at any point,
  the next follower reads again exactly what was not stored. A new store starts where the
  file is when the server starts (:func:`start_position`), not at its beginning.
- **Its queue is the file**, bounded by its rotation (``log_max_bytes`` ×
  (``log_backup_count`` + 1)). At that limit, a follower more than ``log_backup_count``
  rotations behind finds the file it was reading deleted: it finishes that file (it holds
  it open) and goes on with the oldest file still there; the files deleted in between are
  lost to the store (never to the JSON-lines output) and counted (``rotated_away``).
- **Its lag** is measured, not guessed: a second reader, ahead of it, counts lines as they
  appear (``lines_seen``) and when it first saw them. ``lag_records`` is lines seen but
  not stored; ``lag_seconds`` is how long ago the oldest of them was first seen (0 when
  caught up), to within :data:`POLL_INTERVAL`.
- It runs in Linux's idle CPU and I/O scheduling classes (elsewhere at the lowest
  priority, :data:`FOLLOWER_NICE`): on a busy machine ingest wins and the store catches up
  after the burst.

:class:`StoreFollower` is the process shell (start, status, stop); :func:`follow` is the
loop it runs, usable in a thread of a test.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from ..exceptions import ConfigError
from .writer import FollowPosition, SqliteStore

__all__ = [
    "FOLLOWER_NICE",
    "HEAD_BYTES",
    "POLL_INTERVAL",
    "READ_BYTES",
    "FileTail",
    "FollowerStatus",
    "StoreFollower",
    "follow",
    "start_position",
]

#: Bytes read (and stored in one transaction) at a time; a longer line is read whole.
READ_BYTES: Final = 1024 * 1024
#: Longest line the follower reads; a longer one is skipped and counted (``too_long``).
MAX_LINE_BYTES: Final = 256 * 1024 * 1024
#: Seconds between two looks at a file that had nothing new.
POLL_INTERVAL: Final = 0.05
#: Seconds between two updates of the status the server reads.
STATUS_INTERVAL: Final = 0.25
#: First bytes of a file kept in its position (tells a file from a later one that got the
#: same inode number).
HEAD_BYTES: Final = 64
#: The follower's niceness where the idle scheduling class is not to be had.
FOLLOWER_NICE: Final = 19
#: Backoff (seconds) between retries of a batch SQLite refused (locked, disk full).
RETRY_BACKOFF: Final = (0.05, 0.2, 1.0, 5.0)
#: (time, lines seen) samples kept for ``lag_seconds``; past it every other is dropped.
MAX_SAMPLES: Final = 4096

log = logging.getLogger("async_logging.store")


def _head(fd: int) -> bytes:
    return os.pread(fd, HEAD_BYTES, 0)


def _candidates(path: str, backups: int) -> list[str]:
    """The file and its backups, oldest first: ``path.N`` … ``path.1``, ``path``."""
    return [f"{path}.{n}" for n in range(backups, 0, -1)] + [path]


class FileTail:
    """Reads whole lines appended to a JSON-lines file that rotates like
    :class:`~async_logging.publishers.jsonl.JsonLinesPublisher` does.

    Args:
        path: the file the server writes (its backups are ``path.1`` … ``path.N``).
        backups: how many backups the server keeps (``log_backup_count``).
        position: where to start (a :class:`FollowPosition` of this path); None: at the
            start of the oldest file there is.

    Attributes:
        lines: lines read in all (the position's ``lines`` plus this tail's).
        rotated_away: times the file being read had been deleted by rotation when it was
            finished (files between it and the next one may be lost).
        too_long: lines past :data:`MAX_LINE_BYTES`, skipped.
        torn: torn last lines of rotated files (a write cut short), skipped.
    """

    def __init__(self, path: str, backups: int, position: FollowPosition | None) -> None:
        self.path = os.path.abspath(path)
        self.backups = backups
        self.lines = position.lines if position is not None else 0
        self.rotated_away = 0
        self.too_long = 0
        self.torn = 0
        self._fd: int | None = None
        self._ino = 0
        self._offset = 0
        self._head = b""
        if position is not None and self._resume(position):
            return
        if position is not None and position.inode:
            self.rotated_away += 1  # its file was deleted before it was read to the end
        self._open_oldest()

    # -- opening --------------------------------------------------------------------------

    def _resume(self, position: FollowPosition) -> bool:
        for name in _candidates(self.path, self.backups):
            fd = self._open(name)
            if fd is None:
                continue
            st = os.fstat(fd)
            head = _head(fd)
            if (
                st.st_ino == position.inode
                and st.st_size >= position.offset
                and head[: len(position.head)] == position.head
            ):
                self._adopt(fd, st.st_ino, position.offset, head)
                return True
            os.close(fd)
        return False

    @staticmethod
    def _open(name: str) -> int | None:
        try:
            return os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None

    def _adopt(self, fd: int, ino: int, offset: int, head: bytes) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._ino, self._offset, self._head = fd, ino, offset, head

    def _open_oldest(self, after: int | None = None) -> bool:
        """Open the oldest file there is (newer than inode ``after``'s place when it is
        still there); False when there is none yet."""
        names = _candidates(self.path, self.backups)
        if after is not None:
            inodes: list[int | None] = []
            for name in names:
                try:
                    inodes.append(os.stat(name).st_ino)
                except FileNotFoundError:
                    inodes.append(None)
            if after in inodes:
                names = names[inodes.index(after) + 1 :]
            else:
                self.rotated_away += 1
        for name in names:
            fd = self._open(name)
            if fd is None:
                continue
            st = os.fstat(fd)
            if st.st_ino == after:
                os.close(fd)
                continue
            self._adopt(fd, st.st_ino, 0, _head(fd))
            return True
        return False

    # -- reading --------------------------------------------------------------------------

    @property
    def position(self) -> FollowPosition:
        """Where this tail is (what to store with the lines it returned)."""
        return FollowPosition(self.path, self._ino, self._offset, self._head, self.lines)

    def read(self, max_bytes: int = READ_BYTES) -> list[bytes]:
        """The next whole lines (without their newlines), at most about ``max_bytes`` of
        them (one longer line is read whole); ``[]`` when there is nothing new yet."""
        data = self._next(max_bytes)
        if not data:
            return []
        lines = data[:-1].split(b"\n")
        self.lines += len(lines)
        return lines

    def skip(self, max_bytes: int = READ_BYTES) -> int:
        """Like :meth:`read`, but only counts the lines (how the lag is measured)."""
        data = self._next(max_bytes)
        n = data.count(b"\n")
        self.lines += n
        return n

    def _next(self, max_bytes: int) -> bytes:
        """The next bytes up to and including the last newline in reach; b"" for none."""
        if self._fd is None and not self._open_oldest():
            return b""
        assert self._fd is not None
        size = max_bytes
        while True:
            data = os.pread(self._fd, size, self._offset)
            end = data.rfind(b"\n")
            if end >= 0:
                break
            if len(data) < size:  # no whole line yet: at the end of this file
                return self._at_end(data, max_bytes)
            if size >= MAX_LINE_BYTES:  # a line past the limit: skip to its end
                self._skip_long_line()
                return b""
            size *= 2
        if self._offset == 0 and len(self._head) < HEAD_BYTES:
            self._head = data[:HEAD_BYTES]
        self._offset += end + 1
        return data[: end + 1]

    def _skip_long_line(self) -> None:
        assert self._fd is not None
        self.too_long += 1
        while True:
            data = os.pread(self._fd, READ_BYTES, self._offset)
            if not data:
                return
            end = data.find(b"\n")
            if end >= 0:
                self._offset += end + 1
                return
            self._offset += len(data)

    def _at_end(self, rest: bytes, max_bytes: int) -> bytes:
        """At the end of the current file: move to the next one once it was rotated."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return b""  # between the rename and the new file
        if current == self._ino:
            return b""  # still the file being written: wait
        # Rotated: a writer that had it open may still have appended; read that first.
        assert self._fd is not None
        again = os.pread(self._fd, READ_BYTES, self._offset)
        if again.find(b"\n") >= 0:
            return self._next(max_bytes)
        if rest:
            self.torn += 1
        ino = self._ino
        os.close(self._fd)
        self._fd = None
        if self._open_oldest(after=ino):
            return self._next(max_bytes)  # the next file (rotations are few: no deep recursion)
        return b""

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def start_position(store: SqliteStore, log_file: str, backups: int) -> FollowPosition:
    """Where the follower of ``log_file`` starts: where it stopped, or for a new store the
    end of the file now (recorded, so records written before the follower runs count)."""
    source = os.path.abspath(log_file)
    saved = store.position(source)
    if saved is not None:
        return saved
    # The end of the file now: what it holds already is history, not the store's.
    position = FollowPosition(source, 0, 0, b"", 0)
    fd = FileTail._open(source)
    if fd is not None:
        try:
            st = os.fstat(fd)
            tail_start = max(0, st.st_size - READ_BYTES)
            last = os.pread(fd, st.st_size - tail_start, tail_start)
            # After the last whole line (a write in progress is read when it is whole).
            end = last.rfind(b"\n")
            start = tail_start + end + 1 if end >= 0 else st.st_size
            position = FollowPosition(source, st.st_ino, start, _head(fd), 0)
        finally:
            os.close(fd)
    store.set_position(position)
    return position


class FollowerStatus(NamedTuple):
    """What the follower reports (read by the server for ``/metrics``, ``/ecv``, the viewer).

    Attributes:
        running: the follower process is alive.
        stored: records stored since the store began following this file (lines read
            over every follower, less the unreadable ones this follower met).
        lines_seen: lines seen in the file (read or counted ahead).
        lag_records: lines seen and not yet stored.
        lag_seconds: how long ago the oldest of those was first seen (0: caught up).
        batches: transactions written.
        errors: batches SQLite refused (retried).
        rotated_away: files rotated away before the store read them.
        unreadable: lines the store skipped: not a JSON object, longer than
            :data:`MAX_LINE_BYTES`, or torn at the end of a rotated file.
        updated: when this status was made (seconds since the epoch): a follower that
            stopped reporting (stopped, or stuck) shows as an old one.
    """

    running: bool
    stored: int
    lines_seen: int
    lag_records: int
    lag_seconds: float
    batches: int
    errors: int
    rotated_away: int
    unreadable: int
    updated: float


_FIELDS: Final = len(FollowerStatus._fields) - 1  # every field but ``running``
_DRAIN: Final = 0  # the follower's flags: catch up, then stop
_STOP: Final = 1  # stop now


class _Lag:
    """Lines counted ahead of the reader, with when they were first seen."""

    def __init__(self, path: str, backups: int, position: FollowPosition) -> None:
        self._ahead = FileTail(path, backups, position)
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def seen(self) -> int:
        return self._ahead.lines

    def count(self, now: float) -> None:
        """Count the lines that appeared since the last call."""
        before = self._ahead.lines
        while self._ahead.skip(8 * READ_BYTES):
            pass
        if self._ahead.lines != before:
            samples = self._samples
            samples.append((now, self._ahead.lines))
            if len(samples) > MAX_SAMPLES:  # coarser, never wrong by more than a sample
                self._samples = deque(s for k, s in enumerate(samples) if k % 2 == 0)

    def seconds(self, stored: int, now: float) -> float:
        """How long ago the oldest line not stored (line number ``stored``) was seen."""
        samples = self._samples
        while samples and samples[0][1] <= stored:
            samples.popleft()
        if not samples or stored >= self._ahead.lines:
            return 0.0
        return max(0.0, now - samples[0][0])

    def close(self) -> None:
        self._ahead.close()


def follow(
    store: SqliteStore,
    log_file: str,
    backups: int,
    *,
    report: Callable[[FollowerStatus], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    drain: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report_interval: float = STATUS_INTERVAL,
) -> FollowerStatus:
    """Follow ``log_file`` into ``store`` until ``should_stop()``, or until caught up once
    ``drain()`` is true. Returns the last status.

    Args:
        store: the store (its ``follow`` table says where to start; see
            :func:`start_position`).
        log_file: the JSON-lines file the server writes.
        backups: its rotation's backup count.
        report: called with the status every ``report_interval`` seconds from a thread of
            its own (so a store blocked on a lock or a slow disk still reports its lag),
            when caught up, and at the end.
        should_stop: polled between batches: stop now (what was stored is committed).
        drain: polled when caught up: stop then.
        clock, sleep: injected by tests.
        report_interval: seconds between two reports.
    """
    position = start_position(store, log_file, backups)
    tail = FileTail(log_file, backups, position)
    lag = _Lag(log_file, backups, position)
    committed = position.lines  # lines whose rows (and position) are committed
    batches = errors = reported = 0
    lock = threading.Lock()

    def status() -> FollowerStatus:
        with lock:
            now = clock()
            lag.count(now)
            # Lines read but not JSON objects were counted in ``committed``; too long and
            # torn ones never were.
            not_json = int(store.stats["unreadable"])
            unreadable = not_json + tail.too_long + tail.torn
            return FollowerStatus(
                True,
                committed - not_json,
                lag.seen,
                max(0, lag.seen - committed),
                lag.seconds(committed, now),
                batches,
                errors,
                tail.rotated_away,
                unreadable,
                time.time(),
            )

    done = threading.Event()
    reporter = None
    if report is not None:
        send = report

        def reporting() -> None:
            while not done.wait(report_interval):
                send(status())

        reporter = threading.Thread(target=reporting, name="store-follower-report", daemon=True)
        reporter.start()
    try:
        while not should_stop():
            lines = tail.read()
            if not lines:
                if report is not None and batches != reported:
                    reported = batches  # caught up: say so now, not at the next interval
                    report(status())
                if drain():
                    break
                sleep(POLL_INTERVAL)
                continue
            attempt = 0
            while True:
                try:
                    store.add_lines(lines, tail.position)
                    batches += 1
                    committed = tail.lines
                    break
                except sqlite3.OperationalError as exc:
                    errors += 1
                    log.warning("store: a batch failed (%s); retrying", exc)
                    if should_stop():
                        break  # not stored: the next follower reads these lines again
                    sleep(RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)])
                    attempt += 1
        done.set()
        if reporter is not None:
            reporter.join()
        final = status()
        if report is not None:
            report(final)
        return final
    finally:
        done.set()
        tail.close()
        lag.close()


def _yield_to_ingest() -> None:
    """Run only on CPU and disk time ingest leaves: the idle scheduling class where Linux
    has it (a lowest niceness elsewhere), and the idle I/O class."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(FOLLOWER_NICE)
    with contextlib.suppress(Exception):
        import psutil

        psutil.Process().ionice(psutil.IOPRIO_CLASS_IDLE)


def _follower_main(  # noqa: PLR0917 (a process target takes its arguments by position)
    store_path: str,
    log_file: str,
    backups: int,
    max_age: float,
    max_bytes: int,
    shared: Any,
    flags: Any,
    server: Any,
) -> None:
    """The follower process: lower priority, SIGTERM/SIGINT stop it between batches."""
    _yield_to_ingest()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def report(status: FollowerStatus) -> None:
        shared[:] = [float(v) for v in status[1:]]

    store = SqliteStore(store_path, max_age=max_age, max_bytes=max_bytes)
    try:
        follow(
            store,
            log_file,
            backups,
            report=report,
            # The server gone (kill -9 leaves no one to stop it): stop too, at once.
            # ``server`` reads the end of a pipe only the server writes: EOF (poll() true)
            # once it is gone, even by kill -9 (then no one would stop the follower).
            should_stop=lambda: stopping or bool(flags[_STOP]) or server.poll(),
            drain=lambda: bool(flags[_DRAIN]),
        )
    finally:
        store.close()


class StoreFollower:
    """The follower's process, as the server runs it: start, read its status, stop.

    Args:
        store_path: the SQLite store.
        log_file: the JSON-lines file the server writes.
        backups: the file's rotation backup count.
        max_age, max_bytes: the store's retention (see :class:`SqliteStore`).

    The store file and the starting position are set up in :meth:`start`, before it
    returns, so every record the server writes after that reaches the store.

    Raises:
        ConfigError: the store cannot be opened or has an unknown schema (from
            :meth:`start`).
    """

    def __init__(
        self, store_path: str, log_file: str, backups: int, *, max_age: float, max_bytes: int
    ) -> None:
        self.store_path = os.path.abspath(store_path)
        self.log_file = os.path.abspath(log_file)
        self.backups = backups
        self.max_age = max_age
        self.max_bytes = max_bytes
        ctx = multiprocessing.get_context("spawn")
        self._ctx = ctx
        self._shared: Any = ctx.Array("d", _FIELDS, lock=False)
        # Lock-free flags, not multiprocessing Events: a server killed while holding an
        # Event's lock would leave the follower waiting on it forever.
        self._flags: Any = ctx.Array("b", 2, lock=False)
        self._draining = False
        self._server_end: Any = None  # kept open while the server lives (see _follower_main)
        self._process: Any = None
        #: Times the follower process was found dead and started again.
        self.restarts = 0

    def start(self) -> None:
        """Set the store up (in this process, so errors are the caller's) and start."""
        store = SqliteStore(self.store_path, max_age=self.max_age, max_bytes=self.max_bytes)
        try:
            start_position(store, self.log_file, self.backups)
        finally:
            store.close()
        self._spawn()

    def _spawn(self) -> None:
        if self._server_end is not None:
            self._server_end.close()
        reader, self._server_end = self._ctx.Pipe(duplex=False)
        self._process = self._ctx.Process(
            target=_follower_main,
            args=(
                self.store_path,
                self.log_file,
                self.backups,
                self.max_age,
                self.max_bytes,
                self._shared,
                self._flags,
                reader,
            ),
            name="async-logging-store",
            daemon=True,
        )
        self._process.start()
        reader.close()

    def ensure_running(self) -> bool:
        """Start the follower again if it died (a crash); True when it had to."""
        if self._process is None or self._process.is_alive() or self._draining:
            return False
        log.error(
            "the store's follower exited (code %s); starting it again", self._process.exitcode
        )
        self.restarts += 1
        self._spawn()
        return True

    @property
    def running(self) -> bool:
        """The follower process is alive."""
        return self._process is not None and bool(self._process.is_alive())

    def status(self) -> FollowerStatus:
        """The follower's last report (updated every :data:`STATUS_INTERVAL` seconds)."""
        values = list(self._shared)
        return FollowerStatus(
            self.running,
            int(values[0]),
            int(values[1]),
            int(values[2]),
            values[3],
            int(values[4]),
            int(values[5]),
            int(values[6]),
            int(values[7]),
            values[8],
        )

    def stop(self, timeout: float) -> bool:
        """Let the follower catch up (for at most ``timeout`` seconds), then stop it.

        Whatever it did not store by then stays in the file and is stored by the next
        follower (its position is committed with the rows). True when it caught up.
        """
        process = self._process
        if process is None:
            return True
        self._draining = True
        self._flags[_DRAIN] = 1
        process.join(max(timeout, 0.01))
        caught_up = not process.is_alive()
        if not caught_up:
            self._flags[_STOP] = 1
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        self._process = None
        self._server_end.close()
        self._server_end = None
        return caught_up


def check_follows(log_file: str | None, store: str | None) -> None:
    """Refuse a store without the JSON-lines file it follows.

    Raises:
        ConfigError: ``store`` is set and ``log_file`` is empty.
    """
    if store and not log_file:
        raise ConfigError(
            "the store follows the JSON-lines file: set log_file, or turn the store off "
            "with store = ''"
        )
