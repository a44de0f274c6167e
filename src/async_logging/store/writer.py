"""The store's writing side: :class:`SqliteStore` keeps published records in SQLite.

Each batch is written in **one** transaction: a :class:`~.schema.TreeRow` per record and
a :class:`~.schema.SpanRow` per transaction node. The rows are made here, from the records
(the engine and its native path know nothing of the store). The file is in WAL mode, so
readers (the viewer) never block the writer.

In the server the store is not a publisher on the ingest path: its follower
(:mod:`.follower`) reads the JSON-lines file the server writes, in its own process, and
hands each chunk of lines to :meth:`SqliteStore.add_lines`, which stores them and where
they ended in the same transaction. :meth:`SqliteStore.publish_many` remains for using the
store as an ordinary publisher (a plug-in, a test).

Limits, each named here and overridable by the constructor:

- retention by age (``max_age``, the server's ``store_max_age``, default 7 days): rows
  whose ``ts`` is older are deleted every :data:`AGE_SWEEP_INTERVAL` seconds. A record
  stamped by a client whose clock is far behind is therefore deleted early.
- retention by size (``max_bytes``, the server's ``store_max_bytes``, default 1 GiB):
  checked every :data:`SIZE_CHECK_INTERVAL` seconds; past it, the oldest trees (by
  insertion) are deleted until the pages in use are under :data:`SIZE_LOW_WATER` of it.
  Freed pages are reused, so the file stops growing near ``max_bytes``; the WAL file
  beside it is truncated to at most :data:`~.schema.WAL_SIZE_LIMIT` after checkpoints.
- deletes run in chunks of :data:`DELETE_CHUNK` rows so that one sweep never holds the
  write lock for long.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from ..buffer import Record
from ..encoded import EncodedRecords
from ..exceptions import ConfigError, UsageError
from ..publishers.base import BatchPublisher
from ..publishers.jsonl import encode_line
from .schema import BUSY_TIMEOUT, SpanRow, TreeRow, connect, load_body, rows_of

if TYPE_CHECKING:
    from .reader import StoreReader

__all__ = [
    "AGE_SWEEP_INTERVAL",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PATH",
    "DELETE_CHUNK",
    "INSERT_CHUNK",
    "SIZE_CHECK_INTERVAL",
    "SIZE_LOW_WATER",
    "FollowPosition",
    "SqliteStore",
]

DEFAULT_PATH: Final = "./log/trees.sqlite"
#: Seconds of records kept by default (the server's ``store_max_age``).
DEFAULT_MAX_AGE: Final = 7 * 24 * 3600.0
#: Bytes of pages in use past which the oldest trees are deleted (``store_max_bytes``).
DEFAULT_MAX_BYTES: Final = 1024 * 1024 * 1024
#: Seconds between two sweeps of records older than ``max_age``.
AGE_SWEEP_INTERVAL: Final = 30.0
#: Seconds between two checks of the size against ``max_bytes``.
SIZE_CHECK_INTERVAL: Final = 1.0
#: A size sweep deletes until the pages in use are under this fraction of ``max_bytes``.
SIZE_LOW_WATER: Final = 0.9
#: Rows deleted by one retention statement.
DELETE_CHUNK: Final = 10_000
#: Rows inserted by one statement: multi-row VALUES make one ``sqlite3_step`` (and one
#: release of the GIL) per chunk instead of per row (14 columns by 256 rows stay far
#: under SQLite's 32766 parameters).
INSERT_CHUNK: Final = 256

log = logging.getLogger("async_logging.store")

_dumps: Final = orjson.dumps
_TREES_INSERT: Final = (
    "INSERT INTO trees (id, ts, kind, uuid, type, name, status, failed, duration, complete, "
    "reason, flags, nodes, body) VALUES "
)
_SPANS_INSERT: Final = "INSERT INTO spans VALUES "


class FollowPosition(NamedTuple):
    """Where a follower is in a JSON-lines file it follows (stored with the rows read).

    Attributes:
        source: the followed path (absolute), the key of the ``follow`` table.
        inode: the file being read (rotation renames files: the inode names one).
        offset: bytes of it read (whole lines).
        head: its first bytes (up to 64), to tell it from a later file given the same
            inode number once it was deleted.
        lines: lines read from the source in all, over its files.
    """

    source: str
    inode: int
    offset: int
    head: bytes
    lines: int


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, columns: int, rows: int) -> str:
    """``head`` + ``rows`` value tuples whose first column is ``?1`` (the id base) plus a row id."""
    row = "(?1 + ?" + ", ?" * (columns - 1) + ")"
    return head + ", ".join([row] * rows)


def _insert_rows(
    conn: sqlite3.Connection, head: str, columns: int, base: int, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` (their first value an id relative to ``base``), a chunk per statement."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        params: list[Any] = [base]
        params.extend(itertools.chain.from_iterable(chunk))
        conn.execute(_values_sql(head, columns, len(chunk)), params)


class SqliteStore(BatchPublisher):
    """Keeps published records in a queryable SQLite file (see the module's docstring).

    Thread-safe (calls are serialised by a lock). Each batch is one transaction, so a
    batch is stored whole or not at all, and a failed batch (retried) is not stored twice.

    Args:
        path: the SQLite file; its directory is created if missing.
        max_age: seconds of records kept (by their ``timestamp``); 0 keeps them forever.
        max_bytes: bytes of pages in use past which the oldest trees are deleted; 0 = no
            limit.
        clock: returns seconds since the epoch (injected by tests).
        busy_timeout: seconds a write waits for another writer (another worker process)
            before it fails (and the server retries the batch).

    Attributes:
        path: the absolute path of the file.
        stats: counters: ``records`` and ``spans`` written, ``batches``, ``deleted_age``
            and ``deleted_size`` (trees deleted by retention), ``fallbacks`` (records
            orjson refused, stored with a fallback encoding), ``refused`` (records SQLite
            would not take, skipped so that the rest of their batch is stored),
            ``unreadable`` (lines :meth:`add_lines` could not read as a JSON object,
            skipped).

    Values no column can hold (a timestamp past 64 bits, an infinite or NaN number) are
    clamped in the indexed columns; the record itself is stored as it came.

    Raises:
        ConfigError: an option is out of range, or the file cannot be opened or has an
            unknown schema.

    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        if max_age < 0:
            raise ConfigError(f"store max_age must be >= 0, not {max_age}")
        if max_bytes < 0:
            raise ConfigError(f"store max_bytes must be >= 0, not {max_bytes}")
        self.path = os.path.abspath(os.fspath(path))
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.clock = clock
        self.stats: Counter[str] = Counter(records=0, spans=0, batches=0)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = connect(
            self.path, create=True, busy_timeout=busy_timeout
        )
        self._page_size: int = self._conn.execute("PRAGMA page_size").fetchone()[0]
        self._next_age_sweep = 0.0
        self._next_size_check = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def publish_many(self, records: Sequence[Record]) -> None:
        """Store a batch in one transaction, then apply retention when it is due.

        Args:
            records: the batch.

        Raises:
            UsageError: the store is closed.
            sqlite3.Error: the write failed (disk full, locked past the busy timeout);
                nothing of the batch is stored.
        """
        if not records:
            return
        trees: list[TreeRow] = []
        spans: list[SpanRow] = []
        if type(records) is EncodedRecords:
            # Encoded by the engine's fast path: each line is the body already.
            bodies = [line for chunk in records.chunks for line in chunk.splitlines()]
            for i, record in enumerate(records, 1):
                trees.append(rows_of(i, record, bodies[i - 1], spans))
        else:
            for i, record in enumerate(records, 1):
                trees.append(rows_of(i, record, self._body(record), spans))
        self._write(trees, spans, None)

    def add_lines(self, lines: Sequence[bytes], position: FollowPosition | None = None) -> int:
        """Store records given as JSON lines (no newline), and ``position`` with them.

        The follower's entry: the rows and where the follower got to are committed in one
        transaction, so after a crash it reads again exactly what was not stored. A line
        that is not a JSON object is skipped and counted (``unreadable``).

        Returns:
            The records stored.

        Raises:
            UsageError: the store is closed.
            sqlite3.OperationalError: the write failed (disk full, locked past the busy
                timeout); nothing of the batch is stored, nor the position.
        """
        trees: list[TreeRow] = []
        spans: list[SpanRow] = []
        i = 0
        for line in lines:
            try:
                record = load_body(line)
            except ValueError:
                record = None
            if type(record) is not dict:
                self.stats["unreadable"] += 1
                continue
            i += 1
            trees.append(rows_of(i, record, line, spans))
        self._write(trees, spans, position)
        return len(trees)

    def position(self, source: str) -> FollowPosition | None:
        """Where the follower of ``source`` got to, or None when it never stored anything."""
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT source, inode, offset, head, lines FROM follow WHERE source = ?",
                    (source,),
                )
                .fetchone()
            )
        return None if row is None else FollowPosition._make(row)

    def set_position(self, position: FollowPosition) -> None:
        """Record ``position`` alone (where a new follower starts)."""
        self._write([], [], position)

    def _body(self, record: Record) -> bytes:
        try:
            return _dumps(record)
        except TypeError:  # an odd value from a custom mapper: the file sink's fallbacks
            return encode_line(record, self.stats)[:-1]

    def _write(
        self, trees: list[TreeRow], spans: list[SpanRow], position: FollowPosition | None
    ) -> None:
        with self._lock:
            conn = self._connection()
            try:
                self._insert(conn, trees, spans, position)
            except sqlite3.OperationalError:
                raise  # locked, disk full, I/O: nothing is stored, the server retries
            except (sqlite3.Error, OverflowError, ValueError, TypeError):
                # A record SQLite will not take: store the others one by one and skip it,
                # rather than fail the batch, which the server would retry forever.
                self._insert_each(conn, trees, spans)
                if position is not None:
                    self._insert(conn, [], [], position)
            if trees:
                self.stats["batches"] += 1
            self._retain_if_due()

    def _insert(
        self,
        conn: sqlite3.Connection,
        trees: list[TreeRow],
        spans: list[SpanRow],
        position: FollowPosition | None = None,
    ) -> None:
        """Insert rows (ids relative to the batch) and ``position`` in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Ids are given here, under the write lock, so spans can name their tree
            # without one statement per record; AUTOINCREMENT keeps them increasing.
            base = conn.execute(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'trees'), 0)"
            ).fetchone()[0]
            _insert_rows(conn, _TREES_INSERT, 14, base, trees)
            _insert_rows(conn, _SPANS_INSERT, 8, base, spans)
            if position is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO follow (source, inode, offset, head, lines) "
                    "VALUES (?, ?, ?, ?, ?)",
                    position,
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.stats["records"] += len(trees)
        self.stats["spans"] += len(spans)

    def _insert_each(
        self, conn: sqlite3.Connection, trees: list[TreeRow], spans: list[SpanRow]
    ) -> None:
        """Insert record by record, skipping (and counting as ``refused``) those that fail."""
        by_tree: dict[int, list[SpanRow]] = {}
        for span in spans:
            by_tree.setdefault(span.tree_id, []).append(span)
        for row in trees:
            own = [span._replace(tree_id=1) for span in by_tree.get(row.id, ())]
            try:
                self._insert(conn, [row._replace(id=1)], own)
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                self.stats["refused"] += 1
                log.warning(
                    "store: skipped a record SQLite refused (%s: %s)", type(exc).__name__, exc
                )

    def flush(self) -> None:
        """Move the WAL into the main file when no reader holds it (a passive checkpoint)."""
        with self._lock:
            if self._conn is not None:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Close the file; later writes raise :class:`UsageError`. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def reader(self) -> StoreReader:
        """A :class:`~.reader.StoreReader` on the same file (with its own connection)."""
        from .reader import StoreReader

        return StoreReader(self.path)

    # -- retention ------------------------------------------------------------------------

    def retain(self) -> dict[str, int]:
        """Apply both retention rules now; returns the trees deleted by ``age`` and ``size``."""
        with self._lock:
            return {"age": self._sweep_age(), "size": self._sweep_size()}

    def used_bytes(self) -> int:
        """Bytes of pages in use (the file's size less its free pages)."""
        with self._lock:
            return self._used_bytes(self._connection())

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageError(f"{self!r} is closed")
        return self._conn

    def _retain_if_due(self) -> None:
        now = time.monotonic()
        if self.max_age and now >= self._next_age_sweep:
            self._next_age_sweep = now + AGE_SWEEP_INTERVAL
            self._sweep_age()
        if self.max_bytes and now >= self._next_size_check:
            self._next_size_check = now + SIZE_CHECK_INTERVAL
            self._sweep_size()

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * self._page_size)

    def _sweep_age(self) -> int:
        if not self.max_age:
            return 0
        cutoff = int((self.clock() - self.max_age) * 1000)
        return self._delete_where("ts < ?", (cutoff,), "deleted_age")

    def _sweep_size(self) -> int:
        if not self.max_bytes:
            return 0
        conn = self._connection()
        used = self._used_bytes(conn)
        if used <= self.max_bytes:
            return 0
        target = self.max_bytes * SIZE_LOW_WATER
        deleted = 0
        while used > target:
            lo, hi = conn.execute("SELECT min(id), max(id) FROM trees").fetchone()
            if lo is None:
                break
            # Ids grow with insertion: delete the oldest share that should bring us under.
            share = min(1.0, (used - target) / used + 0.01)
            bound = lo + max(1, math.ceil((hi - lo + 1) * share))
            n = self._delete_where("id < ?", (bound,), "deleted_size")
            deleted += n
            used = self._used_bytes(conn)
            if n == 0:
                break
        return deleted

    def _delete_where(
        self,
        where: str,
        args: tuple[Any, ...],
        counter: str,
    ) -> int:
        """Delete trees matching ``where`` (and their spans) in chunks; returns how many."""
        conn = self._connection()
        total = 0
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    row[0]
                    for row in conn.execute(
                        f"DELETE FROM trees WHERE id IN (SELECT id FROM trees WHERE {where} "
                        f"LIMIT {DELETE_CHUNK}) RETURNING id",
                        args,
                    ).fetchall()
                ]
                conn.executemany("DELETE FROM spans WHERE tree_id = ?", ((i,) for i in ids))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            total += len(ids)
            self.stats[counter] += len(ids)
            if len(ids) < DELETE_CHUNK:
                return total
