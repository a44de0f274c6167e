"""The store's query side: :class:`StoreReader` searches, fetches and summarises.

Synchronous; the viewer runs it in a thread of its own. It reads WAL snapshots, so it
never blocks the writer. A search returns at most :data:`SEARCH_MAX_LIMIT` rows; every
query is interrupted past ``query_timeout`` (:data:`QUERY_TIMEOUT` by default).
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from ..exceptions import AsyncLoggingError, UsageError
from .schema import connect, load_body
from .summary import summarize

__all__ = [
    "QUERY_TIMEOUT",
    "SEARCH_DEFAULT_LIMIT",
    "SEARCH_MAX_LIMIT",
    "SINCE_MAX_ROWS",
    "StoreError",
    "StoreReader",
]

#: Seconds one query of a :class:`StoreReader` may run before it is interrupted.
QUERY_TIMEOUT: Final = 10.0
#: Rows a search returns when no limit is given, and at most.
SEARCH_DEFAULT_LIMIT: Final = 100
SEARCH_MAX_LIMIT: Final = 1000
#: Records one :meth:`StoreReader.since` returns at most (one poll of the live tail).
SINCE_MAX_ROWS: Final = 2000

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
        self._conn: sqlite3.Connection | None = connect(self.path, create=True)
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
        return load_body(raw)  # type: ignore[no-any-return]

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
        """Counts, failure rates and duration percentiles by type and name (see
        :func:`~.summary.summarize`, which this runs with the reader's clock and deadline).

        Raises:
            UsageError: ``window`` is not positive.
        """
        now = int(self.clock() * 1000)
        return summarize(
            self._execute, window, until=until, now=now, type=type, roots_only=roots_only
        )

    def since(self, after_id: int, limit: int = SINCE_MAX_ROWS) -> list[tuple[int, bytes]]:
        """Records stored after id ``after_id``, oldest first: ``(id, body)`` pairs.

        What the live tail follows. At most ``limit`` (up to :data:`SINCE_MAX_ROWS`).
        """
        limit = max(1, min(limit, SINCE_MAX_ROWS))
        rows = self._execute(
            "SELECT id, body FROM trees WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [(row[0], bytes(row[1])) for row in rows]

    def last_id(self) -> int:
        """The id of the newest record stored (0 when none)."""
        ((last,),) = self._execute("SELECT coalesce(max(id), 0) FROM trees")
        return int(last)

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
