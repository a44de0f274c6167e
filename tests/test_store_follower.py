"""The store's follower: it tails the JSON-lines file into the store, exactly once, across
rotations and restarts, reports its lag, and the store's schema is migrated or refused."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from async_logging.exceptions import ConfigError
from async_logging.publishers.jsonl import JsonLinesPublisher
from async_logging.store import SqliteStore, StoreFollower, StoreReader
from async_logging.store import follower as follower_mod
from async_logging.store.follower import FileTail, follow, start_position
from async_logging.store.schema import SCHEMA_VERSION

T = 1_700_000_000_000


def tx(uuid: str, i: int = 0, **extra: Any) -> dict[str, Any]:
    """A published transaction record with one nested transaction."""
    return {
        "kind": "transaction",
        "uuid": uuid,
        "event": "1",
        "parent": "0",
        "type": "URL",
        "name": f"/r{i}",
        "timestamp": T + i,
        "duration": 5,
        "status": "0",
        "complete": True,
        "children": [
            {
                "kind": "transaction",
                "event": "2",
                "parent": "1",
                "type": "DB",
                "name": "q",
                "timestamp": T + i + 1,
                "duration": 2,
                "status": "0",
                "complete": True,
                "children": [],
            }
        ],
        **extra,
    }


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "log" / "all.log"), str(tmp_path / "log" / "trees.sqlite")


def stored_uuids(store_path: str) -> list[str]:
    with sqlite3.connect(store_path) as conn:
        rows = conn.execute("SELECT uuid FROM trees ORDER BY id").fetchall()
    conn.close()
    return [r[0] for r in rows]


def drain(store: SqliteStore, log_file: str, backups: int = 5) -> Any:
    """Follow until caught up (no threads, no sleeps)."""
    return follow(store, log_file, backups, drain=lambda: True, sleep=lambda s: None)


def test_a_new_store_starts_at_the_end_of_the_file_and_stores_what_follows(
    paths: tuple[str, str],
) -> None:
    """Records written before the store existed are history; every one written after is
    stored once, with its spans, and the position is committed with them."""
    log_file, store_path = paths
    sink = JsonLinesPublisher(log_file)
    sink.publish_many([tx("old")])
    store = SqliteStore(store_path, max_age=0)
    start_position(store, log_file, 5)
    sink.publish_many([tx(f"u{i}", i) for i in range(10)])
    status = drain(store, log_file)
    assert stored_uuids(store_path) == [f"u{i}" for i in range(10)]
    assert (status.stored, status.lag_records, status.lag_seconds) == (10, 0, 0.0)
    position = store.position(os.path.abspath(log_file))
    assert position is not None and position.lines == 10
    assert position.offset == os.path.getsize(log_file)
    reader = StoreReader(store_path)
    assert reader.summary(10**9, until=T + 100)["spans"] == 20
    reader.close()
    sink.close()
    store.close()


def test_a_follower_stopped_part_way_is_resumed_by_the_next_without_loss_or_repeat(
    paths: tuple[str, str],
) -> None:
    """The position commits with the rows: a follower stopped after its first batch and a
    new one on the same store store every record exactly once."""
    log_file, store_path = paths
    sink = JsonLinesPublisher(log_file)
    store = SqliteStore(store_path, max_age=0)
    start_position(store, log_file, 5)
    # Enough lines for several batches of READ_BYTES.
    n = 3 * follower_mod.READ_BYTES // len(orjson.dumps(tx("u0000"))) + 10
    sink.publish_many([tx(f"u{i:04d}", i) for i in range(n)])
    first = follow(
        store,
        log_file,
        5,
        should_stop=lambda: store.stats["batches"] >= 1,  # after the first transaction
        sleep=lambda s: None,
    )
    assert 0 < first.stored < n
    store.close()
    store = SqliteStore(store_path, max_age=0)
    second = drain(store, log_file)
    assert second.stored == n  # over both followers
    assert stored_uuids(store_path) == [f"u{i:04d}" for i in range(n)]
    sink.close()
    store.close()


def test_the_follower_goes_on_across_rotations(paths: tuple[str, str]) -> None:
    """Files rotated while the store was behind are read in order, then the new file."""
    log_file, store_path = paths
    sink = JsonLinesPublisher(log_file, max_bytes=4096, backup_count=20)
    store = SqliteStore(store_path, max_age=0)
    start_position(store, log_file, 20)
    sink.publish_many([tx(f"a{i:03d}", i) for i in range(40)])  # several rotations
    assert os.path.exists(log_file + ".3")
    drain(store, log_file, 20)
    sink.publish_many([tx(f"b{i:03d}", i) for i in range(40)])
    status = drain(store, log_file, 20)
    want = [f"a{i:03d}" for i in range(40)] + [f"b{i:03d}" for i in range(40)]
    assert stored_uuids(store_path) == want
    assert status.rotated_away == 0
    sink.close()
    store.close()


def test_a_follower_past_the_rotation_limit_counts_what_it_lost_and_goes_on(
    paths: tuple[str, str],
) -> None:
    """More rotations behind than there are backups: the file being read is finished (it is
    held open), the ones deleted unread are counted (``rotated_away``), and it goes on."""
    log_file, _ = paths
    sink = JsonLinesPublisher(log_file, max_bytes=4096, backup_count=1)
    sink.publish_many([tx("first")])
    tail = FileTail(log_file, 1, None)
    assert [orjson.loads(line)["uuid"] for line in tail.read()] == ["first"]
    sink.publish_many([tx(f"x{i:03d}", i) for i in range(60)])  # many rotations
    got: list[str] = []
    while lines := tail.read():
        got.extend(orjson.loads(line)["uuid"] for line in lines)
    assert tail.rotated_away == 1
    assert got[0] == "x000" and got[-1] == "x059"  # the held file, then the newest ones
    assert len(got) < 60  # the files rotated away in between never reached the follower
    assert got == sorted(got)
    tail.close()
    sink.close()


def test_a_saved_position_in_a_file_rotated_away_is_counted(paths: tuple[str, str]) -> None:
    """A store whose file was deleted by rotation while no follower ran starts again at the
    oldest file there is, and says it lost the ones in between."""
    log_file, store_path = paths
    sink = JsonLinesPublisher(log_file, max_bytes=4096, backup_count=1)
    sink.publish_many([tx("first")])
    store = SqliteStore(store_path, max_age=0)
    start_position(store, log_file, 1)
    sink.publish_many([tx(f"x{i:03d}", i) for i in range(60)])
    status = drain(store, log_file, 1)
    assert status.rotated_away == 1
    got = stored_uuids(store_path)
    assert got[-1] == "x059" and 0 < len(got) < 60
    sink.close()
    store.close()


def test_lag_counts_lines_seen_and_how_long_ago_the_oldest_unstored_was_seen(
    paths: tuple[str, str],
) -> None:
    """The counter ahead of the reader gives lag in records and, from when lines were
    first seen, in seconds (an injected clock)."""
    log_file, store_path = paths
    sink = JsonLinesPublisher(log_file)
    store = SqliteStore(store_path, max_age=0)
    position = start_position(store, log_file, 5)
    lag = follower_mod._Lag(log_file, 5, position)
    sink.publish_many([tx(f"u{i}", i) for i in range(10)])
    lag.count(100.0)
    sink.publish_many([tx(f"v{i}", i) for i in range(5)])
    lag.count(105.0)
    assert lag.seen == 15
    assert lag.seconds(0, 107.0) == 7.0  # line 0 was first seen at 100
    assert lag.seconds(10, 107.0) == 2.0  # line 10 at 105
    assert lag.seconds(15, 107.0) == 0.0  # caught up
    lag.close()
    sink.close()
    store.close()


def test_a_line_that_is_not_a_json_object_is_skipped_and_counted(paths: tuple[str, str]) -> None:
    """A torn or foreign line costs nothing beside it: it is counted ``unreadable``."""
    log_file, store_path = paths
    os.makedirs(os.path.dirname(log_file))
    store = SqliteStore(store_path, max_age=0)
    start_position(store, log_file, 5)
    with open(log_file, "ab") as f:
        f.write(orjson.dumps(tx("a")) + b"\n{not json\n[1, 2]\n" + orjson.dumps(tx("b")) + b"\n")
    status = drain(store, log_file)
    assert stored_uuids(store_path) == ["a", "b"]
    assert (status.stored, status.unreadable) == (2, 2)
    store.close()


#: The version-1 schema (before the store followed the file), as that version wrote it.
V1_SCHEMA = """
CREATE TABLE trees (id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL,
    kind TEXT NOT NULL, uuid TEXT, type TEXT, name TEXT, status TEXT,
    failed INTEGER NOT NULL, duration REAL, complete INTEGER, reason TEXT,
    flags TEXT NOT NULL, nodes INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX trees_ts ON trees(ts);
CREATE INDEX trees_uuid ON trees(uuid);
CREATE INDEX trees_type ON trees(type, ts);
CREATE INDEX trees_name ON trees(name, ts);
CREATE INDEX trees_failed ON trees(failed, ts);
CREATE INDEX trees_duration ON trees(duration);
CREATE TABLE spans (tree_id INTEGER NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
    type TEXT, name TEXT, failed INTEGER NOT NULL, duration REAL NOT NULL,
    depth INTEGER NOT NULL, PRIMARY KEY (tree_id, seq)) WITHOUT ROWID;
CREATE INDEX spans_ts ON spans(ts);
PRAGMA user_version = 1;
"""


def test_a_version_1_store_is_migrated_in_place_and_keeps_its_trees(tmp_path: Path) -> None:
    """A store written by the previous version is migrated (indexes replaced, the follow
    table added) and what it held is still found, failures included."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    body = orjson.dumps(tx("old", status="500"))
    conn.execute(
        "INSERT INTO trees VALUES (1, ?, 'transaction', 'old', 'URL', '/r0', '500', 1, 5.0, 1,"
        " NULL, '', 2, ?)",
        (T, body),
    )
    conn.execute("INSERT INTO spans VALUES (1, 0, ?, 'URL', '/r0', 1, 5.0, 0)", (T,))
    conn.commit()
    conn.close()
    store = SqliteStore(path, max_age=0)
    store.publish_many([tx("new", 1)])
    reader = StoreReader(path)
    assert [r["uuid"] for r in reader.search(failures_only=True)] == ["old"]
    assert {r["uuid"] for r in reader.search()} == {"old", "new"}
    assert reader.summary(10**9, until=T + 100)["spans"] == 3
    reader.close()
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "follow" in names and "trees_duration" not in names and "spans_ts" not in names


def test_a_store_of_an_unknown_version_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """A file of a version this code does not read is never misread: ConfigError says so."""
    path = tmp_path / "future.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99, this version reads 1 and 2"):
        SqliteStore(path)


def test_the_follower_process_stores_what_the_server_writes_and_reports_it(
    paths: tuple[str, str],
) -> None:
    """The real process: started before the writes, it stores them, reports its status
    through shared memory, catches up and exits on stop()."""
    log_file, store_path = paths
    follower = StoreFollower(store_path, log_file, 5, max_age=0, max_bytes=0)
    follower.start()
    sink = JsonLinesPublisher(log_file)
    try:
        sink.publish_many([tx(f"u{i}", i) for i in range(50)])
        deadline = time.monotonic() + 30
        while follower.status().stored < 50:
            assert time.monotonic() < deadline, follower.status()
            assert follower.running
            time.sleep(0.02)
        status = follower.status()
        assert (status.lines_seen, status.lag_records) == (50, 0)
    finally:
        assert follower.stop(10.0)
        sink.close()
    assert not follower.running
    assert len(stored_uuids(store_path)) == 50
