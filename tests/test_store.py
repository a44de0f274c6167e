"""The SQLite store (issue 6): batched writes, indexes, retention, search and the summary."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from async_logging import LogBuffer
from async_logging.exceptions import ConfigError, UsageError
from async_logging.server import LogCluster
from async_logging.store import SqliteStore, StoreError, StoreReader
from async_logging.store import summary as summary_mod
from async_logging.store.reader import SEARCH_MAX_LIMIT
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT

NOW = 1_795_000_000.0  # seconds; the injected clock of these tests
T = int(NOW * 1000)


def tx(
    uuid: str,
    ts: int,
    duration: float,
    *,
    type: str = "URL",
    name: str = "/a",
    status: str = "0",
    children: list[dict[str, Any]] | None = None,
    complete: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A published transaction record as the engine makes it."""
    return {
        "kind": "transaction",
        "uuid": uuid,
        "request": uuid,
        "event": "1",
        "parent": "0",
        "type": type,
        "name": name,
        "timestamp": ts,
        "duration": duration,
        "status": status,
        "complete": complete,
        "children": children or [],
        **extra,
    }


def event(ts: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "atomicEvent", "type": "INFO", "name": "e", "timestamp": ts, **extra}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "trees.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(path, clock=lambda: NOW)
    yield s
    s.close()


@pytest.fixture
def reader(store: SqliteStore) -> Iterator[StoreReader]:
    r = StoreReader(store.path, clock=lambda: NOW)
    yield r
    r.close()


# ------------------------------------------------------------------ the file


def test_store_is_a_wal_file_with_the_named_indexes(store: SqliteStore, path: Path) -> None:
    """The store creates its directory and a WAL-mode file indexed on time, uuid, type and
    name, with partial indexes for failed and incomplete trees, and no index on spans."""
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {
            name: sql
            for name, sql in conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
    conn.close()
    assert indexes.keys() == {
        "trees_ts",
        "trees_uuid",
        "trees_type",
        "trees_name",
        "trees_failed_ts",
        "trees_incomplete_ts",
    }
    for name, column in (
        ("trees_ts", "(ts)"),
        ("trees_uuid", "(uuid)"),
        ("trees_type", "(type, ts)"),
        ("trees_name", "(name, ts)"),
        ("trees_failed_ts", "(ts) WHERE failed = 1"),
        ("trees_incomplete_ts", "(ts) WHERE complete = 0"),
    ):
        assert indexes[name].endswith(column), name


def test_searches_use_the_indexes(store: SqliteStore) -> None:
    """Searching by uuid, by type and by name is answered from an index, not a table scan."""
    with sqlite3.connect(store.path) as conn:
        for where, index in (
            ("uuid = 'x'", "trees_uuid"),
            ("type = 'URL'", "trees_type"),
            ("name = '/a'", "trees_name"),
            ("failed = 1", "trees_failed"),
        ):
            plan = " ".join(
                str(row[-1])
                for row in conn.execute(
                    f"EXPLAIN QUERY PLAN SELECT id FROM trees WHERE {where} ORDER BY ts DESC LIMIT 5"
                )
            )
            assert index in plan, (where, plan)
    conn.close()


def test_a_batch_is_one_transaction_and_a_failed_batch_stores_nothing(path: Path) -> None:
    """A batch that cannot be written (another writer holds the lock) stores nothing, and its retry stores it exactly once."""
    store = SqliteStore(path, clock=lambda: NOW, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        batch = [tx(f"u{i}", T + i, 1) for i in range(50)]
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.publish_many(batch)
        blocker.execute("ROLLBACK")
        store.publish_many(batch)  # what the server's retry does
        with _reader(path) as reader:
            rows = reader.search(limit=1000)
        assert sorted(r["uuid"] for r in rows) == sorted(f"u{i}" for i in range(50))
        assert store.stats["batches"] == 1
    finally:
        blocker.close()
        store.close()


@contextlib.contextmanager
def _reader(path: Path) -> Iterator[StoreReader]:
    """A StoreReader on ``path``, closed on exit."""
    reader = StoreReader(path, clock=lambda: NOW)
    try:
        yield reader
    finally:
        reader.close()


@pytest.mark.parametrize("bad", [2**63, -(2**70), 1e300, float("inf"), float("nan"), 10**400])
def test_numbers_no_column_holds_are_clamped_not_fatal(path: Path, bad: Any) -> None:
    """A timestamp or duration past 64 bits, infinite or NaN is stored clamped, and the rest of the batch with it."""
    store = SqliteStore(path, max_age=0)  # kept forever: a clamped time is far in the past
    reader = StoreReader(path)
    store.publish_many(
        [
            tx("hostile", bad, bad, children=[tx("hostile", bad, bad, type="DB")]),
            tx("after", T, 1),
        ]
    )
    rows = {r["uuid"]: r for r in reader.search(limit=10)}
    assert set(rows) == {"hostile", "after"} and store.stats["refused"] == 0
    assert -(2**63) < rows["hostile"]["ts"] < 2**63
    assert reader.get(rows["hostile"]["id"])["uuid"] == "hostile"
    reader.close()
    store.close()


def test_a_record_sqlite_refuses_is_skipped_and_the_batch_stored(
    store: SqliteStore, reader: StoreReader
) -> None:
    """A record whose text SQLite cannot encode (a lone surrogate) is skipped and counted; the others of its batch are stored."""
    store.publish_many(
        [tx("before", T, 1), tx("bad", T + 1, 1, name="\ud800"), tx("after", T + 2, 1)]
    )
    assert [r["uuid"] for r in reader.search()] == ["after", "before"]
    assert store.stats["refused"] == 1 and store.stats["records"] == 2


def test_another_schema_version_is_refused(path: Path) -> None:
    """A store file written by another schema version is refused with a ConfigError naming both versions."""
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        SqliteStore(path)


def _open_at_once(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        SqliteStore(path).close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))


def test_processes_setting_up_one_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Server workers open one new store file at the same moment: none fails (SQLite refuses
    one of two racing lock upgrades at once, without waiting; setting up retries). Three
    processes raced 30 times: without the retry a quarter of the races failed."""
    ctx = multiprocessing.get_context("fork")
    for n in range(30):
        path = str(tmp_path / f"race-{n}" / "trees.sqlite")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=TIMEOUT) for _ in procs]
        for p in procs:
            p.join(TIMEOUT)
        assert outcomes == ["ok"] * 3, (n, outcomes)


def test_closed_store_refuses_writes(store: SqliteStore) -> None:
    """Publishing to a closed store raises UsageError instead of writing somewhere unknown."""
    store.close()
    store.close()  # idempotent
    with pytest.raises(UsageError):
        store.publish_many([tx("u", T, 1)])


# ------------------------------------------------------------------ what a row holds


def test_rows_carry_flags_reason_and_node_count_from_anywhere_in_the_tree(
    store: SqliteStore, reader: StoreReader
) -> None:
    """A row lists the engine's flags found at any depth, the incomplete reason and the number of nodes."""
    orphan_child = event(T + 2, orphan=True, uuid="a")
    nested = tx("a", T + 1, 3, type="API", name="svc", missing_end=True, complete=False)
    deep_cut = tx("d", T + 9, 1, type="DB", depth_cut=True)  # two levels in, the only flag
    store.publish_many(
        [
            tx("a", T, 10, children=[nested, orphan_child], complete=False, reason="timeout"),
            event(T + 5, uuid="a", late=True),
            tx("b", T + 6, 1, msg='a "late":true in a message is not a flag'),
            tx("c", T + 7, 1, children=[event(T + 8, orphan=True)]),  # complete, one orphan
            tx("d", T + 9, 1, children=[tx("d", T + 9, 1, type="DB", children=[deep_cut])]),
        ]
    )
    deep, orphaned, plain, late, tree = reader.search(limit=10)  # newest first
    assert (deep["uuid"], deep["flags"], deep["nodes"]) == ("d", ["depth_cut"], 3)
    assert (orphaned["uuid"], orphaned["flags"], orphaned["nodes"]) == ("c", ["orphan"], 2)
    assert (plain["uuid"], plain["flags"]) == ("b", [])
    assert late["kind"] == "atomicEvent" and late["flags"] == ["late"]
    assert tree["flags"] == ["orphan", "missing_end"]  # in the order of FLAGS
    assert (tree["complete"], tree["reason"], tree["nodes"]) == (False, "timeout", 3)


def test_get_returns_the_whole_tree_as_published(store: SqliteStore, reader: StoreReader) -> None:
    """get(id) gives back the record exactly as it was published, nested children included."""
    buf = LogBuffer()
    events = [
        {"clazz": "begin", "uuid": "r", "event": "1", "parent": "0", "type": "URL", "name": "/x", "timestamp": T},
        {"clazz": "begin", "uuid": "r", "event": "2", "parent": "1", "type": "DB", "name": "q", "timestamp": T + 1},
        {"clazz": "atomicEvent", "uuid": "r", "event": "3", "parent": "2", "msg": "select", "timestamp": T + 2},
        {"clazz": "end", "uuid": "r", "event": "2", "parent": "1", "status": "7", "timestamp": T + 5},
        {"clazz": "end", "uuid": "r", "event": "1", "parent": "0", "status": "0", "timestamp": T + 9, "extra": {"k": [1, 2]}},
    ]  # fmt: skip
    (record,) = buf.feed_many(events).records
    store.publish_many([record])
    (row,) = reader.search()
    assert reader.get(row["id"]) == record
    assert reader.get(row["id"] + 1) is None


# ------------------------------------------------------------------ search


@pytest.fixture
def corpus(store: SqliteStore) -> list[dict[str, Any]]:
    """Ten records with known types, names, statuses, durations and times."""
    records = [
        tx("u0", T - 9000, 5, name="/home"),
        tx("u1", T - 8000, 50, name="/checkout", status="1"),
        tx("u2", T - 7000, 500, name="/checkout/pay"),
        tx("u3", T - 6000, 20, type="API", name="svc"),
        tx("u4", T - 5000, 80, name="/home", complete=False, reason="timeout", status="-1"),
        event(T - 4000, uuid="u5", name="ev"),
        tx("u6", T - 3000, 7, type="API", name="svc", status="500"),
        tx("u7", T - 2000, 700, name="/checkout"),
        {"kind": "heartbeat", "type": "heartbeat", "name": "hb", "timestamp": T - 1000},
        tx("u9", T, 1, name="/home"),
    ]
    store.publish_many(records[:5])
    store.publish_many(records[5:])
    return records


@pytest.mark.parametrize(
    ("filters", "uuids"),
    [
        ({}, ["u9", None, "u7", "u6", "u5", "u4", "u3", "u2", "u1", "u0"]),
        ({"uuid": "u3"}, ["u3"]),
        ({"type": "API"}, ["u6", "u3"]),
        ({"name": "/checkout"}, ["u7", "u1"]),
        ({"name": "/checkout*"}, ["u7", "u2", "u1"]),
        ({"kind": "transaction", "failures_only": True}, ["u6", "u4", "u1"]),
        ({"incomplete_only": True}, ["u4"]),
        ({"min_duration": 80}, ["u7", "u4", "u2"]),
        ({"since": T - 5000, "until": T - 2000}, ["u6", "u5", "u4"]),
        ({"kind": "atomicEvent"}, ["u5"]),
        ({"limit": 2}, ["u9", None]),
        ({"type": "URL", "name": "/home", "min_duration": 5, "since": T - 9000}, ["u4", "u0"]),
    ],
)
def test_search_filters_combine_and_return_newest_first(
    corpus: list[dict[str, Any]], reader: StoreReader, filters: dict[str, Any], uuids: list[str]
) -> None:
    """Every search filter narrows the result, they combine with AND, and results come newest first."""
    assert [r["uuid"] for r in reader.search(**filters)] == uuids


def test_search_limit_is_bounded(reader: StoreReader) -> None:
    """A search asks for at most SEARCH_MAX_LIMIT rows and at least one."""
    for bad in (0, SEARCH_MAX_LIMIT + 1):
        with pytest.raises(UsageError, match="limit"):
            reader.search(limit=bad)


# ------------------------------------------------------------------ summary


def test_summary_counts_failures_and_nearest_rank_percentiles_by_type_and_name(
    store: SqliteStore, reader: StoreReader
) -> None:
    """The summary gives count, failures, failure rate, avg, p50, p95 and max per type and name, nested calls included."""
    records = []
    for i in range(1, 21):  # durations 1..20 ms; every fifth fails
        db = tx(f"d{i}", T - 1000 + i, 2 * i, type="DB", name="q", status="0")
        records.append(
            tx(
                f"u{i}",
                T - 1000 + i,
                i,
                name="/a",
                status="1" if i % 5 == 0 else "0",
                children=[db],
            )
        )
    store.publish_many(records)
    s = reader.summary(60)
    rows = {(r["type"], r["name"]): r for r in s["rows"]}
    a = rows[("URL", "/a")]
    assert (a["count"], a["failures"], a["failure_rate"]) == (20, 4, 0.2)
    assert (a["p50"], a["p95"], a["max"], a["avg"]) == (10, 19, 20, 10.5)
    q = rows[("DB", "q")]
    assert (q["count"], q["failures"], q["p50"], q["p95"]) == (20, 0, 20, 38)
    assert {t["type"]: t["count"] for t in s["types"]} == {"URL": 20, "DB": 20}
    assert (s["spans"], s["sampled"], s["truncated"]) == (40, False, False)
    roots = reader.summary(60, roots_only=True)
    assert [(r["type"], r["count"]) for r in roots["rows"]] == [("URL", 20)]
    assert [r["type"] for r in reader.summary(60, type="DB")["rows"]] == ["DB"]


def test_summary_window_excludes_older_spans(store: SqliteStore, reader: StoreReader) -> None:
    """Only spans inside [until - window, until) count."""
    store.publish_many([tx("old", T - 120_000, 1), tx("new", T - 1_000, 1), tx("future", T + 5, 1)])
    s = reader.summary(60)
    assert s["spans"] == 1 and s["until"] == T and s["since"] == T - 60_000
    assert reader.summary(3600, until=T + 10)["spans"] == 3


def test_summary_reads_a_bounded_number_of_spans(
    store: SqliteStore, reader: StoreReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SUMMARY_MAX_SPANS in the window only the most recent are read and the answer says it was sampled."""
    monkeypatch.setattr(summary_mod, "SUMMARY_MAX_SPANS", 10)
    monkeypatch.setattr(summary_mod, "SUMMARY_MAX_GROUPS", 2)
    store.publish_many([tx(f"u{i}", T - 100 + i, i, name=f"/n{i % 3}") for i in range(30)])
    s = reader.summary(60)
    assert (s["spans"], s["sampled"], s["truncated"]) == (10, True, True)
    assert len(s["rows"]) == 2 and min(r["p50"] for r in s["rows"]) >= 20


def test_a_query_past_its_deadline_is_interrupted(store: SqliteStore, path: Path) -> None:
    """A query running past query_timeout is interrupted with StoreError('query_timeout') instead of running on."""
    store.publish_many([tx(f"u{i}", T - 1000 + i % 900, 1) for i in range(3000)])
    slow = StoreReader(path, clock=lambda: NOW, query_timeout=1e-9)
    try:
        with pytest.raises(StoreError) as info:
            slow.summary(60)
        assert info.value.reason == "query_timeout"
    finally:
        slow.close()


# ------------------------------------------------------------------ retention


def test_age_retention_deletes_old_trees_and_their_spans(path: Path) -> None:
    """Records older than max_age (by timestamp) are deleted with their spans by the write that finds them due, newer ones stay."""
    now = [NOW]
    store = SqliteStore(path, max_age=3600, clock=lambda: now[0])
    try:
        store.publish_many([tx("old", T - 7_200_000, 1), tx("new", T - 60_000, 1)])
        assert store.stats["deleted_age"] == 1  # the first write sweeps at once
        with _reader(path) as reader:
            assert [r["uuid"] for r in reader.search()] == ["new"]
            assert reader.summary(3 * 3600)["spans"] == 1
            now[0] += 3600
            assert store.retain() == {"age": 1, "size": 0}
            assert reader.search() == []
            assert reader.summary(3 * 3600, until=T)["spans"] == 0
    finally:
        store.close()


def test_size_retention_keeps_the_store_under_max_bytes_and_deletes_oldest_first(
    path: Path,
) -> None:
    """Past max_bytes the oldest trees go until the pages in use are under the limit; the newest stay and ids are not reused."""
    limit = 400_000
    store = SqliteStore(path, max_bytes=limit, clock=lambda: NOW)
    try:
        filler = "x" * 2000
        for batch in range(40):
            store.publish_many(
                [tx(f"u{batch:02d}-{i:02d}", T + batch * 100 + i, 1, msg=filler) for i in range(20)]
            )
            store.retain()
            assert store.used_bytes() <= limit
        assert store.stats["deleted_size"] > 0
        with _reader(path) as reader:
            rows = reader.search(limit=1000)
        uuids = [r["uuid"] for r in rows]
        written = [f"u{batch:02d}-{i:02d}" for batch in range(40) for i in range(20)]
        assert 0 < len(uuids) < len(written)
        assert uuids == written[::-1][: len(uuids)]  # the newest run survived, oldest went first
        assert rows[0]["id"] == 800  # ids kept increasing through the deletes
    finally:
        store.close()


def test_options_out_of_range_are_refused(path: Path) -> None:
    """Negative retention limits are a ConfigError."""
    with pytest.raises(ConfigError, match="max_age"):
        SqliteStore(path, max_age=-1)
    with pytest.raises(ConfigError, match="max_bytes"):
        SqliteStore(path, max_bytes=-1)


# ------------------------------------------------------------------ through the server


async def test_the_server_keeps_its_trees_in_the_store_by_config(tmp_path: Path) -> None:
    """A server with the store option stores every published tree in that file (its
    follower catches up at shutdown), and the store off runs no follower."""
    db = tmp_path / "s" / "trees.sqlite"
    publisher = MemoryPublisher()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        store=str(db),
        store_max_age=3600.0,
        store_max_bytes=10_000_000,
    )
    await cluster.start()
    try:
        assert cluster.followers is not None and cluster.followers.follower is not None
        follower = cluster.followers.follower
        assert (follower.max_age, follower.max_bytes) == (3600.0, 10_000_000)
        logs = [
            {"clazz": "begin", "uuid": f"s{i}", "event": "1", "parent": "0", "name": "/s"}
            for i in range(3)
        ] + [
            {"clazz": "end", "uuid": f"s{i}", "event": "1", "parent": "0", "status": "0"}
            for i in range(3)
        ]
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{cluster.port}/log", json={"logs": logs}) as resp,
        ):
            assert resp.status == 200
        await asyncio.to_thread(publisher.wait_for, lambda p: len(p.transactions) == 3, TIMEOUT)
    finally:
        await cluster.stop()
    with _reader(db) as reader:
        assert sorted(r["uuid"] for r in reader.search()) == ["s0", "s1", "s2"]
    off = LogCluster(host="127.0.0.1", port=0, mon_port=-1, publisher=MemoryPublisher(), store="")
    await off.start()
    await off.stop()
    assert off.followers is not None and off.followers.follower is None
