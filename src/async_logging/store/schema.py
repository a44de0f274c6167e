"""The store's file: schema, versions and migration, and the rows made from a record.

Schema (version :data:`SCHEMA_VERSION`)::

    trees(id, ts, kind, uuid, type, name, status, failed, duration, complete, reason,
          flags, nodes, body)      indexes: ts, uuid, (type, ts), (name, ts);
                                   partial: ts where failed, ts where complete = 0
    spans(tree_id, seq, ts, type, name, failed, duration, depth)
                                   primary key (tree_id, seq), no other index
    follow(source, inode, offset, head, lines)
                                   where the store's follower is in each JSON-lines
                                   file it follows, written with the rows it read

``ts`` is the record's ``timestamp`` (ms since the epoch); ``failed`` is 1 when the
record has a ``status`` other than ``"0"`` (CAL convention: a root without a status is
``"-1"``, a failure); ``flags`` lists, space-separated, the flags of :data:`FLAGS` found
anywhere in the tree, in that order. A tree costs five B-tree inserts (the row and four
indexes; a failed or incomplete one one more) plus one per transaction node in ``spans``,
whose rows follow each other in the table (ids only grow). The summary finds spans
through ``trees.ts``.

Versions: 1 (before 2026-12-03) had full indexes on ``failed`` and ``duration`` and an
index on ``spans.ts``; :func:`connect` migrates a version-1 file in place (one
transaction: indexes dropped and made, the ``follow`` table added). A file of any other
version is refused with a message saying so, never misread.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from typing import Any, Final, NamedTuple

import orjson

from ..buffer import Record
from ..exceptions import ConfigError

__all__ = [
    "BUSY_TIMEOUT",
    "FLAGS",
    "PAGE_SIZE",
    "SCHEMA_VERSION",
    "SETUP_RETRY",
    "WAL_SIZE_LIMIT",
    "SpanRow",
    "TreeRow",
    "connect",
    "load_body",
    "rows_of",
]

SCHEMA_VERSION: Final = 2
#: Bytes the WAL file is truncated to after a checkpoint (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
#: Page size of a new store file. Measured with 12-event trees (2.3 kB of JSON): 16 KiB
#: pages write 1.45x faster than SQLite's default 4 KiB and take 40 % less space (a record
#: and its index entries share pages instead of spilling over several).
PAGE_SIZE: Final = 16384
#: Seconds a connection waits for another writer before failing.
BUSY_TIMEOUT: Final = 10.0
#: Seconds between two tries at setting up a file another process is setting up too
#: (within ``busy_timeout`` in all).
SETUP_RETRY: Final = 0.02
#: Flags of the reassembly engine (docs/design.md §3) recorded in ``trees.flags``.
FLAGS: Final = (
    "late",
    "orphan",
    "missing_end",
    "missing_begin",
    "cycle",
    "depth_cut",
    "conflict",
)

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
CREATE INDEX IF NOT EXISTS trees_failed_ts ON trees(ts) WHERE failed = 1;
CREATE INDEX IF NOT EXISTS trees_incomplete_ts ON trees(ts) WHERE complete = 0;
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
CREATE TABLE IF NOT EXISTS follow (
    source TEXT PRIMARY KEY,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    head BLOB NOT NULL,
    lines INTEGER NOT NULL
);
"""

#: Version 1 to 2, in one transaction.
_MIGRATE_1_TO_2: Final = """
DROP INDEX IF EXISTS trees_failed;
DROP INDEX IF EXISTS trees_duration;
DROP INDEX IF EXISTS spans_ts;
"""

_I64_MAX: Final = (1 << 63) - 1
_I64_FLOAT: Final = float(1 << 63)
_FLAG_SET: Final = frozenset(FLAGS)
_dumps: Final = orjson.dumps


class TreeRow(NamedTuple):
    """One row of ``trees``: a published record's indexed values and its JSON body.

    ``id`` is relative to the batch being written (1, 2, ...); the writer adds its base.
    """

    id: int
    ts: int
    kind: str
    uuid: str | None
    type: str | None
    name: str | None
    status: str | None
    failed: int
    duration: float | None
    complete: int | None
    reason: str | None
    flags: str
    nodes: int
    body: bytes


class SpanRow(NamedTuple):
    """One row of ``spans``: a transaction node of a tree, for the summary."""

    tree_id: int
    seq: int
    ts: int
    type: str | None
    name: str | None
    failed: int
    duration: float
    depth: int


def connect(path: str, *, create: bool, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the schema in place (migrated); translate errors.

    Raises:
        ConfigError: the file cannot be opened or set up, or has a version this code does
            not read.
    """
    try:
        if create:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        conn = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,  # explicit BEGIN / COMMIT: one transaction per batch
            check_same_thread=False,  # built on one thread, used by one worker thread
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
                # Several processes setting up one new file at once: SQLite answers a lock
                # upgrade that could deadlock with "database is locked" at once, without
                # waiting (a quarter of three-way races, measured). Retry.
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
    """The file's settings, its schema, and the migration of an older version."""
    # Only takes effect on a new, empty file (before WAL mode and the first table).
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL with synchronous=NORMAL loses at most the last commits on a power cut, never
    # corrupts: the store is a view of what the JSON-lines file holds, and its follower
    # reads again whatever was not committed.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return  # set up already: no write lock (another process may hold it for long)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise ConfigError(
                f"store {path!r} has schema version {version}, this version reads 1 and "
                f"{SCHEMA_VERSION}: move it away or point the store elsewhere"
            )
        if version == 1:
            _run(conn, _MIGRATE_1_TO_2)
        if version != SCHEMA_VERSION:
            _run(conn, _SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def load_body(body: bytes) -> Any:
    """A stored record's JSON back as Python values: orjson, or the standard module for
    an integer past 64 bits (which the JSON-lines sink's fallback writes)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _run(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script``'s statements inside the open transaction (``executescript`` would
    commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


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


def rows_of(i: int, record: Record, body: bytes, spans: list[SpanRow]) -> TreeRow:
    """The ``trees`` row of ``record`` (id ``i``, relative to its batch); appends its spans.

    Args:
        i: the record's id within its batch (from 1).
        record: the published record (a dict, as read back from its JSON line).
        body: the record's JSON (stored as it is).
        spans: receives a :class:`SpanRow` per transaction node, root first (depth-first).

    One walk over the transaction nodes gives the spans, the flags and the node count;
    atomic children are only looked at for the one flag they can carry (``orphan``).
    """
    ts = _int64(record.get("timestamp"), 0)
    status = record.get("status")
    kind = record.get("kind")
    nodes = 1
    flagged = not _FLAG_SET.isdisjoint(record)
    if kind == "transaction":
        stack: list[tuple[Record, int]] = [(record, 0)]
        seq = 0
        add = spans.append
        while stack:
            node, depth = stack.pop()
            if depth and not flagged:
                flagged = not _FLAG_SET.isdisjoint(node)
            add(
                SpanRow(
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
    return TreeRow(
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
