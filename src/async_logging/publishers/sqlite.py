"""The queryable store behind the viewer: published records in SQLite (issue 6).

:class:`SqliteStore` is a publisher. Each :meth:`~SqliteStore.publish_many` batch is
written in **one** transaction: a row per record in ``trees`` (indexed columns plus the
record itself as JSON) and a row per transaction node, root or nested, in ``spans`` (what
the CAL-like summary aggregates). The file is in WAL mode, so readers (the viewer) never
block the writer, and several server workers may write the same file (``busy_timeout``
serialises them).

:class:`StoreReader` is the query side: :meth:`~StoreReader.search`,
:meth:`~StoreReader.get` and :meth:`~StoreReader.summary`. It is synchronous; the viewer
runs it in a thread of its own.

Schema (version :data:`SCHEMA_VERSION`)::

    trees(id, ts, kind, uuid, type, name, status, failed, duration, complete, reason,
          flags, nodes, body)      indexes: ts, uuid, (type, ts), (name, ts),
                                   (failed, ts), duration
    spans(tree_id, seq, ts, type, name, failed, duration, depth)
                                   primary key (tree_id, seq); index: ts

``ts`` is the record's ``timestamp`` (ms since the epoch); ``failed`` is 1 when the
record has a ``status`` other than ``"0"`` (CAL convention: a root without a status is
``"-1"``, a failure); ``flags`` lists, space-separated, the flags of :data:`FLAGS` found
anywhere in the tree, in that order.

Limits, each named here and overridable by the constructor:

- retention by age (``max_age``, the server's ``store_max_age``, default 7 days): rows
  whose ``ts`` is older are deleted every :data:`AGE_SWEEP_INTERVAL` seconds. A record
  stamped by a client whose clock is far behind is therefore deleted early.
- retention by size (``max_bytes``, the server's ``store_max_bytes``, default 1 GiB):
  checked every :data:`SIZE_CHECK_INTERVAL` seconds; past it, the oldest trees (by
  insertion) are deleted until the pages in use are under :data:`SIZE_LOW_WATER` of it.
  Freed pages are reused, so the file stops growing near ``max_bytes``; the WAL file
  beside it is truncated to at most :data:`WAL_SIZE_LIMIT` after checkpoints.
- deletes run in chunks of :data:`DELETE_CHUNK` rows so that one sweep never holds the
  write lock for long.
- a search returns at most :data:`SEARCH_MAX_LIMIT` rows; a summary reads at most
  :data:`SUMMARY_MAX_SPANS` spans (the most recent of the window) and reports at most
  :data:`SUMMARY_MAX_GROUPS` (type, name) groups, saying so when it was cut.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import orjson

from ..buffer import Record
from ..encoded import EncodedRecords
from ..exceptions import AsyncLoggingError, ConfigError, UsageError
from .base import BatchPublisher
from .jsonl import encode_line

__all__ = [
    "AGE_SWEEP_INTERVAL",
    "BUSY_TIMEOUT",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PATH",
    "DELETE_CHUNK",
    "FLAGS",
    "INSERT_CHUNK",
    "PAGE_SIZE",
    "QUERY_TIMEOUT",
    "SCHEMA_VERSION",
    "SEARCH_DEFAULT_LIMIT",
    "SEARCH_MAX_LIMIT",
    "SETUP_RETRY",
    "SIZE_CHECK_INTERVAL",
    "SIZE_LOW_WATER",
    "SUMMARY_MAX_GROUPS",
    "SUMMARY_MAX_SPANS",
    "WAL_SIZE_LIMIT",
    "SqliteStore",
    "StoreError",
    "StoreReader",
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
#: Bytes the WAL file is truncated to after a checkpoint (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
#: Page size of a new store file. Measured with 12-event trees (2.3 kB of JSON): 16 KiB
#: pages write 1.45x faster than SQLite's default 4 KiB and take 40 % less space (a record
#: and its index entries share pages instead of spilling over several).
PAGE_SIZE: Final = 16384
#: Seconds a connection waits for another writer (another worker) before failing.
BUSY_TIMEOUT: Final = 10.0
#: Seconds between two tries at setting up a file another process is setting up too
#: (within ``busy_timeout`` in all).
SETUP_RETRY: Final = 0.02
#: Rows a search returns when no limit is given, and at most.
SEARCH_DEFAULT_LIMIT: Final = 100
SEARCH_MAX_LIMIT: Final = 1000
#: Spans one summary reads at most (the most recent of its window).
SUMMARY_MAX_SPANS: Final = 500_000
#: (type, name) groups one summary reports at most (the busiest).
SUMMARY_MAX_GROUPS: Final = 1000
#: Flags of the reassembly engine (DESIGN §3) recorded in ``trees.flags``.
FLAGS: Final = (
    "late",
    "orphan",
    "missing_end",
    "missing_begin",
    "cycle",
    "depth_cut",
    "conflict",
)
SCHEMA_VERSION: Final = 1

log = logging.getLogger("async_logging.store")
#: Seconds one query of a :class:`StoreReader` may run before it is interrupted.
QUERY_TIMEOUT: Final = 10.0

_I64_MAX: Final = (1 << 63) - 1
_I64_FLOAT: Final = float(1 << 63)
_FLAG_SET: Final = frozenset(FLAGS)
_dumps: Final = orjson.dumps

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS trees (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    uuid TEXT,
    type TEXT,
    name TEXT,
    status TEXT,
    failed INTEGER NOT NULL,
    duration REAL,
    complete INTEGER,
    reason TEXT,
    flags TEXT NOT NULL,
    nodes INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS trees_ts ON trees(ts);
CREATE INDEX IF NOT EXISTS trees_uuid ON trees(uuid);
CREATE INDEX IF NOT EXISTS trees_type ON trees(type, ts);
CREATE INDEX IF NOT EXISTS trees_name ON trees(name, ts);
CREATE INDEX IF NOT EXISTS trees_failed ON trees(failed, ts);
CREATE INDEX IF NOT EXISTS trees_duration ON trees(duration);
CREATE TABLE IF NOT EXISTS spans (
    tree_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    type TEXT,
    name TEXT,
    failed INTEGER NOT NULL,
    duration REAL NOT NULL,
    depth INTEGER NOT NULL,
    PRIMARY KEY (tree_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_ts ON spans(ts);
"""

_ROW_COLUMNS: Final = (
    "id, ts, kind, uuid, type, name, status, failed, duration, complete, reason, flags, nodes"
)


class StoreError(AsyncLoggingError):
    """The store could not answer a query (a sub-class of the package's root error).

    Attributes:
        reason: ``query_timeout`` (the query ran past its deadline) or ``store_error``
            (SQLite failed: a damaged file, a full disk, locked past the busy timeout).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


TreeRow = tuple[Any, ...]
SpanRow = tuple[Any, ...]


def _connect(path: str, *, create: bool, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the schema in place; translate sqlite errors."""
    try:
        if create:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        conn = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,  # explicit BEGIN / COMMIT: one transaction per batch
            check_same_thread=False,  # built on the loop thread, used by one worker thread
        )
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open store {path!r}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                _set_up(conn, path)
                break
            except sqlite3.OperationalError as exc:
                # Several processes (server workers) setting up one new file at once: SQLite
                # answers a lock upgrade that could deadlock with "database is locked" at
                # once, without waiting (a quarter of three-way races, measured). Retry.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(SETUP_RETRY)
    except sqlite3.Error as exc:
        conn.close()
        raise ConfigError(f"cannot use store {path!r}: {exc}") from exc
    except ConfigError:
        conn.close()
        raise
    return conn


def _set_up(conn: sqlite3.Connection, path: str) -> None:
    """The file's settings and schema (idempotent)."""
    # Only takes effect on a new, empty file (before WAL mode and the first table).
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL with synchronous=NORMAL loses at most the last commits on a power cut, never
    # corrupts: the store is a view of what the file sink already holds.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    conn.executescript(_SCHEMA)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    elif version != SCHEMA_VERSION:
        raise ConfigError(
            f"store {path!r} has schema version {version}, this version reads "
            f"{SCHEMA_VERSION}: move it away or point the store elsewhere"
        )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _int64(value: Any, default: int) -> int:
    """``value`` as an integer a 64-bit column holds (clamped), or ``default``; never raises."""
    kind = type(value)
    if kind is int:
        return value if -_I64_MAX <= value <= _I64_MAX else (_I64_MAX if value > 0 else -_I64_MAX)
    if kind is float:
        if math.isnan(value):
            return default
        if value >= _I64_FLOAT or value <= -_I64_FLOAT:
            return _I64_MAX if value > 0 else -_I64_MAX
        return int(value)
    return default


def _number(value: Any) -> float | None:
    """``value`` as a float column value (clamped, NaN as None); never raises."""
    kind = type(value)
    if kind is float:
        return None if math.isnan(value) else value
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # an integer past what a double holds
            return sys.float_info.max if value > 0 else -sys.float_info.max
    return None


def _flags(record: Record) -> str:
    """The engine's flags set anywhere in ``record``, space-separated, in FLAGS order (rare)."""
    found: set[str] = set()
    stack = [record]
    while stack:
        node = stack.pop()
        found.update(flag for flag in FLAGS if node.get(flag))
        children = node.get("children")
        if children and type(children) is list:
            stack.extend(c for c in children if type(c) is dict)
    return " ".join(flag for flag in FLAGS if flag in found)


def _failed(status: Any) -> int:
    return 0 if status is None or status in ("0", 0) else 1


#: Rows inserted by one statement. Each statement releases and retakes the GIL once (around
#: ``sqlite3_step``); one per row made the publisher thread wait for the event loop's
#: thread at every row, which halved the server's ingest rate. Multi-row VALUES keep the
#: hand-overs to one per chunk (14 columns by 256 rows stay far under SQLite's 32766
#: parameters).
INSERT_CHUNK: Final = 256
_TREES_INSERT: Final = (
    "INSERT INTO trees (id, ts, kind, uuid, type, name, status, failed, duration, complete, "
    "reason, flags, nodes, body) VALUES "
)
_SPANS_INSERT: Final = "INSERT INTO spans VALUES "


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, columns: int, rows: int) -> str:
    """``head`` + ``rows`` value tuples whose first column is ``?1`` (the id base) plus a row id."""
    row = "(?1 + ?" + ", ?" * (columns - 1) + ")"
    return head + ", ".join([row] * rows)


def _insert_rows(
    conn: sqlite3.Connection, head: str, columns: int, base: int, rows: list[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` (their first value an id relative to ``base``), a chunk per statement."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        params: list[Any] = [base]
        params.extend(itertools.chain.from_iterable(chunk))
        conn.execute(_values_sql(head, columns, len(chunk)), params)


class SqliteStore(BatchPublisher):
    """A publisher that keeps every published record in a queryable SQLite file.

    Thread-safe (calls are serialised by a lock); the server calls it from its publisher
    thread. Each batch is one transaction, so a batch is stored whole or not at all, and a
    failed batch (the server retries it) is not stored twice.

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
            would not take, skipped so that the rest of their batch is stored).

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
        self._conn: sqlite3.Connection | None = _connect(
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
        row = self._row
        if type(records) is EncodedRecords:
            # Encoded by the engine's fast path: each line is the body already.
            bodies = [line for chunk in records.chunks for line in chunk.splitlines()]
            for i, record in enumerate(records, 1):
                trees.append(row(i, record, spans, bodies[i - 1]))
        else:
            for i, record in enumerate(records, 1):
                trees.append(row(i, record, spans))
        with self._lock:
            conn = self._connection()
            try:
                self._insert(conn, trees, spans)
            except sqlite3.OperationalError:
                raise  # locked, disk full, I/O: nothing is stored, the server retries
            except (sqlite3.Error, OverflowError, ValueError, TypeError):
                # A record SQLite will not take: store the others one by one and skip it,
                # rather than fail the batch, which the server would retry forever.
                self._insert_each(conn, trees, spans)
            self.stats["batches"] += 1
            self._retain_if_due()

    def _insert(self, conn: sqlite3.Connection, trees: list[TreeRow], spans: list[SpanRow]) -> None:
        """Insert rows (ids relative to the batch) in one transaction, or none of them."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Ids are given here, under the write lock, so spans can name their tree
            # without one statement per record; AUTOINCREMENT keeps them increasing.
            base = conn.execute(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'trees'), 0)"
            ).fetchone()[0]
            _insert_rows(conn, _TREES_INSERT, 14, base, trees)
            _insert_rows(conn, _SPANS_INSERT, 8, base, spans)
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
            by_tree.setdefault(span[0], []).append(span)
        for row in trees:
            own = [(1, *span[1:]) for span in by_tree.get(row[0], ())]
            try:
                self._insert(conn, [(1, *row[1:])], own)
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                self.stats["refused"] += 1
                log.warning(
                    "store: skipped a record SQLite refused (%s: %s)", type(exc).__name__, exc
                )

    def _row(
        self, i: int, record: Record, spans: list[SpanRow], body: bytes | None = None
    ) -> TreeRow:
        """The ``trees`` row of ``record`` (ids relative to the batch); appends its spans.

        Every Python step here runs under the GIL that the server's event loop needs too,
        so it is what decides how much the store slows ingest (DESIGN §7): one walk over
        the transaction nodes gives the spans, the flags and the node count; atomic
        children are only looked at for the one flag they can carry (``orphan``).
        """
        if body is None:
            try:
                body = _dumps(record)
            except TypeError:  # an odd value from a custom mapper: the file sink's fallbacks
                body = encode_line(record, self.stats)[:-1]
        ts = _int64(record.get("timestamp"), 0)
        status = record.get("status")
        kind = record.get("kind")
        nodes = 1
        flagged = not _FLAG_SET.isdisjoint(record)
        if kind == "transaction":
            stack: list[tuple[Record, int]] = [(record, 0)]
            seq = 0
            while stack:
                node, depth = stack.pop()
                if depth and not flagged:
                    flagged = not _FLAG_SET.isdisjoint(node)
                spans.append(
                    (
                        i,
                        seq,
                        _int64(node.get("timestamp"), ts),
                        _text(node.get("type")),
                        _text(node.get("name")),
                        _failed(node.get("status")),
                        _number(node.get("duration")) or 0.0,
                        depth,
                    )
                )
                seq += 1
                children = node.get("children")
                if children and type(children) is list:
                    nodes += len(children)
                    for child in children:
                        if type(child) is dict:
                            if child.get("kind") == "transaction":
                                stack.append((child, depth + 1))
                            elif not flagged and "orphan" in child:
                                flagged = True
        complete = record.get("complete")
        return (
            i,
            ts,
            _text(kind) or "atomicEvent",
            _text(record.get("uuid")),
            _text(record.get("type")),
            _text(record.get("name")),
            _text(status),
            _failed(status),
            _number(record.get("duration")),
            None if complete is None else int(bool(complete)),
            _text(record.get("reason")),
            _flags(record) if flagged else "",
            nodes,
            body,
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
        """A :class:`StoreReader` on the same file (with its own connection)."""
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


class StoreReader:
    """Queries over a store file: search, one tree, and the CAL-like summary.

    Synchronous, and meant for one thread at a time (the viewer gives it a thread of its
    own). It reads a WAL snapshot, so it never blocks the writers.

    Args:
        path: the SQLite file (created, empty, if missing, so a viewer can start before
            the first record is written).
        clock: returns seconds since the epoch (the summary window ends now by default).
        query_timeout: seconds one query may run before it is interrupted
            (:class:`StoreError` ``query_timeout``); 0 = no limit.

    Raises:
        ConfigError: the file cannot be opened or has an unknown schema.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        query_timeout: float = QUERY_TIMEOUT,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.clock = clock
        self.query_timeout = query_timeout
        self._deadline = math.inf
        self._conn: sqlite3.Connection | None = _connect(self.path, create=True)
        self._conn.execute("PRAGMA query_only = ON")
        # SQLite calls this every 10k VM steps; a non-zero answer interrupts the query.
        self._conn.set_progress_handler(lambda: int(time.monotonic() > self._deadline), 10_000)

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Run one query under the deadline; translate SQLite's errors."""
        conn = self._connection()
        if self.query_timeout:
            self._deadline = time.monotonic() + self.query_timeout
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise StoreError(
                    "query_timeout", f"the query ran past {self.query_timeout:g} s"
                ) from exc
            raise StoreError("store_error", str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError("store_error", str(exc)) from exc
        finally:
            self._deadline = math.inf

    def close(self) -> None:
        """Close the connection. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageError("the store reader is closed")
        return self._conn

    def search(
        self,
        *,
        uuid: str | None = None,
        type: str | None = None,
        name: str | None = None,
        kind: str | None = None,
        failures_only: bool = False,
        incomplete_only: bool = False,
        min_duration: float | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = SEARCH_DEFAULT_LIMIT,
    ) -> list[dict[str, Any]]:
        """The newest stored records matching every filter given, newest first.

        Args:
            uuid: the request id (exact).
            type: the CAL type (exact).
            name: the name, exact, or a prefix when it ends with ``*``.
            kind: ``transaction``, ``atomicEvent`` or ``heartbeat``.
            failures_only: only records with a status other than ``"0"``.
            incomplete_only: only trees published with ``complete: false``.
            min_duration: only records lasting at least this many ms.
            since, until: the time range, ms since the epoch (``since`` included,
                ``until`` excluded).
            limit: rows returned, 1 to :data:`SEARCH_MAX_LIMIT`.

        Returns:
            One dict per record: ``id`` (for :meth:`get`), ``ts``, ``kind``, ``uuid``,
            ``type``, ``name``, ``status``, ``failed``, ``duration``, ``complete``,
            ``reason``, ``flags`` (a list) and ``nodes`` (events in the tree).

        Raises:
            UsageError: ``limit`` is out of range.
        """
        if not 1 <= limit <= SEARCH_MAX_LIMIT:
            raise UsageError(f"limit must be between 1 and {SEARCH_MAX_LIMIT}, not {limit}")
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("uuid", uuid), ("type", type), ("kind", kind)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if name:
            if name.endswith("*"):
                prefix = name[:-1]
                # A range, not LIKE, so the (name, ts) index serves it.
                where.append("name >= ? AND name < ?")
                args += [prefix, prefix + "\U0010ffff"]
            else:
                where.append("name = ?")
                args.append(name)
        if failures_only:
            where.append("failed = 1")
        if incomplete_only:
            where.append("complete = 0")
        if min_duration is not None:
            where.append("duration >= ?")
            args.append(min_duration)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        sql = f"SELECT {_ROW_COLUMNS} FROM trees"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        args.append(limit)
        return [_summary_row(row) for row in self._execute(sql, args)]

    def get_raw(self, tree_id: int) -> bytes | None:
        """The stored record ``tree_id`` as JSON bytes, or None when it is not (or no longer) there."""
        rows = self._execute("SELECT body FROM trees WHERE id = ?", (tree_id,))
        return bytes(rows[0][0]) if rows else None

    def get(self, tree_id: int) -> dict[str, Any] | None:
        """The stored record ``tree_id`` (the whole tree), or None."""
        raw = self.get_raw(tree_id)
        if raw is None:
            return None
        try:
            return orjson.loads(raw)  # type: ignore[no-any-return]
        except orjson.JSONDecodeError:  # an integer past a double, written by the fallback
            return json.loads(raw)  # type: ignore[no-any-return]

    def row(self, tree_id: int) -> dict[str, Any] | None:
        """The indexed columns of record ``tree_id`` (as :meth:`search` gives them), or None."""
        rows = self._execute(f"SELECT {_ROW_COLUMNS} FROM trees WHERE id = ?", (tree_id,))
        return _summary_row(rows[0]) if rows else None

    def summary(
        self,
        window: float = 3600.0,
        *,
        until: int | None = None,
        type: str | None = None,
        roots_only: bool = False,
    ) -> dict[str, Any]:
        """Counts, failure rates and duration percentiles by type and name, like a CAL report.

        Every transaction node counts, nested ones too (a DB call inside a URL), unless
        ``roots_only``. Percentiles are nearest-rank over the durations in the window.

        Args:
            window: seconds before ``until``.
            until: end of the window, ms since the epoch (default: now).
            type: only this CAL type.
            roots_only: only the root transactions of the trees.

        Returns:
            ``{"since", "until", "spans", "sampled", "truncated", "types", "rows"}``: each
            of ``types`` (one per type) and ``rows`` (one per type and name, the busiest
            :data:`SUMMARY_MAX_GROUPS`) has ``type``, ``name`` (absent in ``types``),
            ``count``, ``failures``, ``failure_rate``, ``avg``, ``p50``, ``p95`` and
            ``max`` (ms). ``sampled`` is true when the window held more than
            :data:`SUMMARY_MAX_SPANS` spans and only the most recent were read.

        Raises:
            UsageError: ``window`` is not positive.
        """
        if not window > 0:
            raise UsageError(f"window must be positive, not {window}")
        end = int(self.clock() * 1000) if until is None else until
        start = end - int(window * 1000)
        sql = "SELECT type, name, failed, duration FROM spans WHERE ts >= ? AND ts < ?"
        args: list[Any] = [start, end]
        if type:
            sql += " AND type = ?"
            args.append(type)
        if roots_only:
            sql += " AND depth = 0"
        sql += " ORDER BY ts DESC LIMIT ?"
        args.append(SUMMARY_MAX_SPANS + 1)
        spans = self._execute(sql, args)
        sampled = len(spans) > SUMMARY_MAX_SPANS
        if sampled:
            spans.pop()
        groups: dict[tuple[str | None, str | None], tuple[list[float], list[int]]] = {}
        for stype, sname, failed, duration in spans:
            group = groups.get((stype, sname))
            if group is None:
                group = groups[(stype, sname)] = ([], [0])
            group[0].append(duration)
            group[1][0] += failed
        by_type: dict[str | None, tuple[list[float], list[int]]] = {}
        for (stype, _), (durations, failures) in groups.items():
            agg = by_type.setdefault(stype, ([], [0]))
            agg[0].extend(durations)
            agg[1][0] += failures[0]
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1][0]))
        truncated = len(ordered) > SUMMARY_MAX_GROUPS
        rows = [
            {"type": t, "name": n, **_stats(d, f[0])}
            for (t, n), (d, f) in ordered[:SUMMARY_MAX_GROUPS]
        ]
        rows.sort(key=lambda r: (r["type"] or "", -r["count"], r["name"] or ""))
        types = [{"type": t, **_stats(d, f[0])} for t, (d, f) in by_type.items()]
        types.sort(key=lambda r: (-r["count"], r["type"] or ""))
        return {
            "since": start,
            "until": end,
            "spans": len(spans),
            "sampled": sampled,
            "truncated": truncated,
            "types": types,
            "rows": rows,
        }

    def status(self) -> dict[str, Any]:
        """What the store holds: ``records``, ``oldest`` and ``newest`` ts, ``bytes`` of the file."""
        ((count, oldest, newest),) = self._execute("SELECT count(*), min(ts), max(ts) FROM trees")
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = 0
        return {
            "path": self.path,
            "records": count,
            "oldest": oldest,
            "newest": newest,
            "bytes": size,
        }


def _summary_row(row: Iterable[Any]) -> dict[str, Any]:
    (
        tree_id,
        ts,
        kind,
        uuid,
        type_,
        name,
        status,
        failed,
        duration,
        complete,
        reason,
        flags,
        nodes,
    ) = row
    return {
        "id": tree_id,
        "ts": ts,
        "kind": kind,
        "uuid": uuid,
        "type": type_,
        "name": name,
        "status": status,
        "failed": bool(failed),
        "duration": duration,
        "complete": None if complete is None else bool(complete),
        "reason": reason,
        "flags": flags.split() if flags else [],
        "nodes": nodes,
    }


def _stats(durations: list[float], failures: int) -> dict[str, Any]:
    durations.sort()
    n = len(durations)

    def rank(q: float) -> float:
        return durations[max(0, math.ceil(q * n) - 1)]

    return {
        "count": n,
        "failures": failures,
        "failure_rate": failures / n if n else 0.0,
        "avg": sum(durations) / n if n else 0.0,
        "p50": rank(0.50) if n else 0.0,
        "p95": rank(0.95) if n else 0.0,
        "max": durations[-1] if n else 0.0,
    }
