"""Faults with real processes on loopback (issue 5, items 3 and 4), each bounded in time.

``kill -9`` of the proxy under load while clients reconnect, with and without the spool;
publishers that raise or stall; more connections than the threshold; malformed frames among
good ones. Every assertion message carries the events sent against the events published.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil
import pytest

from async_logging.server import LogCluster
from async_logging.server.spool import MSGPACK, Spool
from async_logging.testing import MemoryPublisher
from helpers import (
    TIMEOUT,
    AckedLoad,
    Served,
    Stream,
    answer,
    connect,
    fetch_metrics,
    free_port,
    published_events,
    send_acked,
    serve,
    split_tree,
    tx,
    walk,
)


def streams(tag: str, clients: int, trees: int) -> list[Stream]:
    """Clients each sending ``trees`` transactions split over two frames, one tree behind.

    The frames go A0 A1 B0 A2 B1 ...: most of the time some trees are open in the buffer.
    """
    out = []
    for c in range(clients):
        halves = [split_tree(f"{tag}-c{c}-t{k}") for k in range(trees)]
        frames = [halves[0][0]]
        for k in range(trees):
            if k + 1 < trees:
                frames.append(halves[k + 1][0])
            frames.append(halves[k][1])
        out.append(Stream(f"{tag}-c{c}", frames))
    return out


def wait_until(predicate: Any, what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` (state in another process has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ====================================================================== kill -9


def kill_under_load(
    tmp_path: Path, procs: list[Served], tag: str, *flags: str
) -> tuple[AckedLoad, dict[str, Any]]:
    """Serve, load with 4 reconnecting clients, kill -9 at 40 %, restart on the same port, drain.

    Returns the load and what was observed: the file's events right after the kill, the
    final file's events (all copies and copies not flagged replayed), the first server's pid
    and the second server's metrics.
    """
    port = free_port()
    first = serve(tmp_path, "--port", str(port), *flags)
    procs.append(first)
    load = AckedLoad(port, streams(tag, clients=4, trees=150))
    total = sum(len(s.frames) for s in load.streams)
    with load:
        load.wait_acks(int(total * 0.4))
        first.proc.kill()
        first.proc.wait(TIMEOUT)
        load.generation = 2  # no server listens until the next one starts
        before, _ = published_events(first.records())
        second = serve(tmp_path, "--port", str(port), *flags)
        procs.append(second)
        load.join()
    assert second.mon_port
    metrics = fetch_metrics(second.mon_port)
    assert second.stop() == 0
    every, fresh = published_events(second.records())  # the same file, appended to
    return load, {
        "before": before,
        "every": every,
        "fresh": fresh,
        "first_pid": first.proc.pid,
        "metrics": metrics,
    }


def figures(load: AckedLoad, seen: dict[str, Any]) -> str:
    sent, published = load.sent_events(), set(seen["every"])
    acked1, acked2 = load.acked_events(1), load.acked_events(2)
    return (
        f"atomic events sent {len(sent)}, acked by the killed proxy {len(acked1)} and by its "
        f"successor {len(acked2)}; published before the kill {len(seen['before'])}, in the end "
        f"{len(published)} distinct ({sum(seen['every'].values())} copies, "
        f"{sum(seen['every'].values()) - sum(seen['fresh'].values())} flagged replayed); "
        f"acked but never published {len(acked1 - published) + len(acked2 - published)}; "
        f"reconnects {sum(s.reconnects for s in load.streams)}"
    )


def test_kill_9_without_spool_measures_what_was_acked_but_not_yet_published(
    tmp_path: Path, procs: list[Served]
) -> None:
    """Without a spool a kill -9 loses at most what the killed proxy acked but had not published; what it had published and all its successor acked is in the file."""
    load, seen = kill_under_load(tmp_path, procs, "nospool")
    report = figures(load, seen)
    print(report)
    sent, every, before = load.sent_events(), seen["every"], seen["before"]
    acked1, acked2 = load.acked_events(1), load.acked_events(2)
    assert acked1 and acked2, f"the kill did not fall under load: {report}"
    assert sum(s.reconnects for s in load.streams) >= len(load.streams), report
    # Published before the kill: still in the file after the restart (appended, not clobbered).
    assert all(every[k] >= n for k, n in before.items()), report
    # Acked by the proxy that lived on: published (it drained on SIGTERM).
    assert not acked2 - set(every), f"{len(acked2 - set(every))} lost by the survivor; {report}"
    # The loss is only ever acked-by-the-killed-proxy and not yet published.
    lost = (acked1 | acked2) - set(every)
    assert lost <= acked1 - set(before), report
    # Nothing invented; a second copy only of a frame the client had to resend.
    assert set(every) <= sent, report
    assert {k for k, n in every.items() if n > 1} <= load.resent_events(), report


def test_kill_9_with_spool_loses_nothing_that_was_acked(
    tmp_path: Path, procs: list[Served]
) -> None:
    """With --spool a kill -9 under load loses no acked event: the next proxy adopts the spool and replays it, extra copies flagged replayed."""
    spool = tmp_path / "spool"
    load, seen = kill_under_load(tmp_path, procs, "spool", "--spool", str(spool))
    report = figures(load, seen)
    replayed = seen["metrics"].get("async_logging_spool_replayed_total")
    report += f"; events replayed from the spool {replayed:.0f}"
    print(report)
    every, fresh, before = seen["every"], seen["fresh"], seen["before"]
    acked = load.acked_events()
    assert load.acked_events(1) and load.acked_events(2), (
        f"the kill did not fall under load: {report}"
    )
    missing = acked - set(every)
    assert not missing, f"{len(missing)} acked events lost, e.g. {sorted(missing)[:3]}; {report}"
    assert all(every[k] >= n for k, n in before.items()), report
    assert set(every) <= load.sent_events(), report
    # Duplicates are the spool's at-least-once replay (flagged), or the client's own resends.
    unflagged_dups = {k for k, n in fresh.items() if n > 1}
    assert unflagged_dups <= load.resent_events(), report
    assert replayed > 0, report
    assert not (spool / f"w-{seen['first_pid']}").exists(), "the dead proxy's spool was not adopted"


def test_kill_9_leaves_no_process_of_the_server_behind(tmp_path: Path, procs: list[Served]) -> None:
    """After kill -9 of `serve` (with its defaults: the store on) no process it started lives on: one that did would keep the store and the log file open, beside the next server's."""
    s = serve(tmp_path)
    procs.append(s)
    asyncio.run(send_acked(s.port, [tx("before-kill")]))
    started = [p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)]
    s.proc.kill()
    s.proc.wait(TIMEOUT)
    assert s.stderr_closed(TIMEOUT), (
        f"processes started by the killed server (of {started}) still hold its stderr"
    )


def open_tree(uuid: str, **extra: Any) -> list[dict[str, Any]]:
    """A begin and an atomic event whose end never comes: held in the buffer, unpublished."""
    begin, atomic = tx(uuid, 1)[:2]
    atomic.update(extra)
    return [begin, atomic]


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def test_spool_replays_batches_accepted_under_raised_limits(
    tmp_path: Path, procs: list[Served]
) -> None:
    """A batch acked under --max-depth 64 (deeper than the default 32) is replayed after kill -9, not skipped."""
    flags = ("--spool", str(tmp_path / "spool"), "--max-depth", "64")
    first = serve(tmp_path, *flags)
    procs.append(first)
    asyncio.run(send_acked(first.port, [open_tree("plain"), open_tree("deep", data=nested(40))]))
    first.proc.kill()
    first.proc.wait(TIMEOUT)
    assert first.records() == []  # both trees were open: nothing was published
    second = serve(tmp_path, *flags)
    procs.append(second)
    assert second.stop() == 0
    uuids = sorted(r["uuid"] for r in second.records())
    assert uuids == ["deep", "plain"], f"2 trees acked, published after replay: {uuids}"


def test_clean_restart_on_the_spool_replays_nothing(tmp_path: Path, procs: list[Served]) -> None:
    """After a SIGTERM drain the spool holds nothing to replay: a restart publishes no second copy."""
    flags = ("--spool", str(tmp_path / "spool"))
    first = serve(tmp_path, *flags)
    procs.append(first)
    trees = [tx(f"clean-{i}") for i in range(20)] + [open_tree("clean-open")]
    asyncio.run(send_acked(first.port, trees))
    assert first.stop() == 0
    assert (tmp_path / "spool" / f"w-{first.proc.pid}").is_dir()  # left for a successor
    second = serve(tmp_path, *flags)
    procs.append(second)
    assert second.mon_port
    replayed = fetch_metrics(second.mon_port).get("async_logging_spool_replayed_total")
    assert second.stop() == 0
    recs = second.records()
    uuids = sorted(r["uuid"] for r in recs)
    assert uuids == sorted([f"clean-{i}" for i in range(20)] + ["clean-open"]), uuids
    assert replayed == 0 and not any(r.get("replayed") for r in recs)
    assert not (tmp_path / "spool" / f"w-{first.proc.pid}").exists()


# ====================================================================== spool bounds (in-process)


class Gated(MemoryPublisher):
    """A publisher that blocks until its gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def publish_many(self, records: Any) -> None:
        self.gate.wait(TIMEOUT * 3)
        super().publish_many(records)


async def test_full_spool_refuses_new_batches_until_published(tmp_path: Path) -> None:
    """At spool_max_bytes of unpublished batches new ones get spool_full (error frame, HTTP 503, counted) instead of an ack; once published they are taken."""
    pub = Gated()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=pub,
        store="",
        spool=str(tmp_path / "spool"),
        spool_max_bytes=4096,
    )
    await cluster.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, cluster)  # type: ignore[arg-type]
            acked = 0
            while True:
                await ws.send_bytes(msgpack.packb({"seq": acked, "logs": tx(f"full-{acked}")}))
                ans = await answer(ws)
                if "error" in ans:
                    break
                assert ans == {"ack": acked}
                acked += 1
                assert acked < 100, "the spool never filled"
            assert (ans["error"], ans["seq"]) == ("spool_full", acked)
            async with session.post(
                f"http://127.0.0.1:{cluster.port}/log", json=tx("full-http")
            ) as resp:
                assert resp.status == 503 and (await resp.json())["error"] == "spool_full"
            assert cluster.stats.bad_input == {"spool_full": 2}
            pub.gate.set()
            await asyncio.to_thread(pub.wait_for, lambda p: len(p.transactions) == acked, TIMEOUT)
            for _ in range(100):  # the client resends until the checkpoint has moved
                await ws.send_bytes(msgpack.packb({"seq": acked, "logs": tx(f"full-{acked}")}))
                ans = await answer(ws)
                if ans == {"ack": acked}:
                    break
                assert ans["error"] == "spool_full"
                await asyncio.sleep(0.02)
            assert ans == {"ack": acked}, ans
            await ws.close()
        got = await asyncio.to_thread(
            pub.wait_for, lambda p: len(p.transactions) == acked + 1 and p.transactions, TIMEOUT
        )
        assert sorted(t["uuid"] for t in got) == sorted(f"full-{i}" for i in range(acked + 1))
        assert 4 <= acked < 20, acked  # ~300-byte batches against 4 KiB
    finally:
        pub.gate.set()
        await cluster.stop()


async def test_one_open_tree_does_not_fill_the_spool_with_published_batches(
    tmp_path: Path,
) -> None:
    """With one tree left open, batches already published do not count toward spool_max_bytes."""
    pub = MemoryPublisher()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=pub,
        store="",
        spool=str(tmp_path / "spool"),
        spool_max_bytes=8192,
    )
    await cluster.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, cluster)  # type: ignore[arg-type]
            await ws.send_bytes(msgpack.packb({"seq": 0, "logs": open_tree("long-request")}))
            assert await answer(ws) == {"ack": 0}
            for seq in range(1, 61):  # ~18 KB of whole trees, each published at once
                await ws.send_bytes(msgpack.packb({"seq": seq, "logs": tx(f"short-{seq}")}))
                ans = await answer(ws)
                assert ans == {"ack": seq}, f"batch {seq} of 60 refused: {ans}"
                await asyncio.to_thread(
                    pub.wait_for, lambda p, n=seq: len(p.transactions) == n, TIMEOUT
                )
            await ws.close()
    finally:
        await cluster.stop()


class FullDisk:
    """Stands in for the ``os`` module inside the spool: every write fails with ENOSPC."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_spool_write_failure_is_a_clear_counted_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the spool cannot write (disk full), a batch gets an error frame or a 503 and is counted, the connection stays up, and a resend is acked once the disk has room."""
    from async_logging.server import spool as spool_module

    pub = MemoryPublisher()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=pub,
        store="",
        spool=str(tmp_path / "spool"),
    )
    await cluster.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, cluster)  # type: ignore[arg-type]
            monkeypatch.setattr(spool_module, "os", FullDisk())
            await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("disk-full")}))
            msg = await ws.receive(timeout=TIMEOUT)
            assert msg.type is aiohttp.WSMsgType.TEXT, f"connection closed: {msg}"
            err = orjson.loads(msg.data)
            assert "error" in err and err["seq"] == 1 and "ack" not in err, err
            async with session.post(
                f"http://127.0.0.1:{cluster.port}/log", json=tx("disk-full-http")
            ) as resp:
                assert resp.status in (503, 507), resp.status
                assert "error" in await resp.json()
            assert sum(cluster.snapshot()["bad_input"].values()) == 2
            monkeypatch.undo()
            await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("disk-full")}))
            assert await answer(ws) == {"ack": 1}
            await ws.close()
    finally:
        monkeypatch.undo()
        await cluster.stop()


async def test_a_torn_record_ends_the_replay_without_a_crash(tmp_path: Path) -> None:
    """A spool whose last record was cut short (a crash mid-write) replays the whole records before it, flagged, and the server serves on."""
    root = tmp_path / "spool"
    dead = Spool(root / "w-999999999", 1 << 20)
    for i in range(3):
        dead.append(MSGPACK, msgpack.packb({"seq": i, "logs": tx(f"torn-{i}")}))
    dead.close()
    (segment,) = (root / "w-999999999").glob("spool-*.log")
    os.truncate(segment, segment.stat().st_size - 5)  # the last record loses its tail
    pub = MemoryPublisher()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=pub,
        spool=str(root),
        store="",
    )
    await cluster.start()
    try:
        assert cluster.replaying is not None
        await asyncio.wait_for(cluster.replaying, TIMEOUT)
        got = await asyncio.to_thread(
            pub.wait_for, lambda p: len(p.transactions) == 2 and p.transactions, TIMEOUT
        )
        assert [t["uuid"] for t in got] == ["torn-0", "torn-1"]
        assert all(t["replayed"] is True and t["complete"] for t in got)
        assert cluster.stats.spool_replayed == 8
        assert not (root / "w-999999999").exists()
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, cluster)  # type: ignore[arg-type]
            await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("after-torn")}))
            assert await answer(ws) == {"ack": 1}
            await ws.close()
        await asyncio.to_thread(pub.wait_for, lambda p: len(p.transactions) == 3, TIMEOUT)
        assert "replayed" not in pub.transactions[-1]
    finally:
        await cluster.stop()


# ====================================================================== publishers that fail

PLUGIN = '''
"""Publishers for the fault tests: they misbehave while the file $FAULT_FLAG exists."""
import os
import time

from async_logging.publishers import JsonLinesPublisher


def _down():
    return os.path.exists(os.environ["FAULT_FLAG"])


class RaisingPublisher(JsonLinesPublisher):
    def __init__(self):
        super().__init__(os.environ["FAULT_OUT"], max_bytes=0)

    def publish_many(self, records):
        if _down():
            raise RuntimeError("the sink is down")
        super().publish_many(records)


class StallingPublisher(JsonLinesPublisher):
    def __init__(self):
        super().__init__(os.environ["FAULT_OUT"], max_bytes=0)

    def publish_many(self, records):
        while _down():
            time.sleep(0.01)
        super().publish_many(records)
'''


#: The plug-in publishers write the file the tests read; no store beside them.
NO_STORE = ("--store", "")


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plug-in module the server subprocess imports; returns the flag file that breaks it."""
    (tmp_path / "fault_publishers.py").write_text(PLUGIN)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + (os.pathsep + path if path else ""))
    flag = tmp_path / "sink-down"
    monkeypatch.setenv("FAULT_FLAG", str(flag))
    monkeypatch.setenv("FAULT_OUT", str(tmp_path / "log" / "all.log"))
    flag.touch()
    return flag


def test_raising_publisher_is_retried_and_loses_nothing(
    tmp_path: Path, procs: list[Served], faulty: Path
) -> None:
    """A plug-in publisher that raises for a while: ingest goes on, errors are counted, and once it recovers every tree is published exactly once."""
    s = serve(tmp_path, "--publisher", "fault_publishers:RaisingPublisher", *NO_STORE)
    procs.append(s)
    assert s.mon_port
    n = 200
    asyncio.run(send_acked(s.port, [tx(f"raise-{i}") for i in range(n)]))
    errors = wait_until(
        lambda: fetch_metrics(s.mon_port).get("async_logging_publish_errors_total") >= 2,
        "publish errors",
    )
    assert errors and s.records() == []  # the sink is down: nothing written yet
    faulty.unlink()
    wait_until(lambda: len(s.records()) >= n, "the recovered publisher")
    m = fetch_metrics(s.mon_port)
    assert s.stop() == 0
    uuids = [r["uuid"] for r in s.records()]
    report = f"sent {n} trees ({n * 4} events), published {len(uuids)} ({len(set(uuids))} distinct)"
    print(report, f"after {m.get('async_logging_publish_errors_total'):.0f} publish errors")
    assert sorted(uuids) == sorted(f"raise-{i}" for i in range(n)), report
    assert m.get("async_logging_publish_errors_total") >= 2
    assert m.get("async_logging_records_dropped_total") == 0
    assert m.get("async_logging_events_received_total") == n * 4


def test_stalled_publisher_pushes_back_with_bounded_memory(
    tmp_path: Path, procs: list[Served], faulty: Path
) -> None:
    """A publisher that stalls: once the publish queue is full ingest pauses, every frame taken is acked and no other, the client cannot push more than the socket buffers hold, the server's resident memory stays bounded, and all is published once it resumes.

    Decided by events, not by seconds: the server reports the pause (backpressure_waits),
    and what it had taken then is all it takes until the sink comes back.
    """
    s = serve(
        tmp_path,
        "--publisher",
        "fault_publishers:StallingPublisher",
        "--publish-queue",
        "1000",
        *NO_STORE,
    )
    procs.append(s)
    mon_port = s.mon_port
    assert mon_port
    server = psutil.Process(s.proc.pid)
    rss0 = server.memory_info().rss
    padding = "x" * 200
    state = {"sent": 0, "acked": 0, "bytes": 0}
    stop = threading.Event()
    failure: list[BaseException] = []

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{s.port}/")
            assert (await ws.receive(timeout=TIMEOUT)).data == "ready"

            async def reader() -> None:
                while state["acked"] < state["sent"] or not stop.is_set():
                    msg = await ws.receive(timeout=TIMEOUT * 3)
                    assert msg.type is aiohttp.WSMsgType.TEXT, msg
                    assert "ack" in orjson.loads(msg.data)
                    state["acked"] += 1

            task = asyncio.create_task(reader())
            while not stop.is_set():  # as fast as the server lets it
                logs = tx(f"stall-{state['sent']}", 10)
                for e in logs:
                    e["pad"] = padding
                frame = msgpack.packb({"seq": state["sent"], "logs": logs})
                await ws.send_bytes(frame)
                state["sent"] += 1
                state["bytes"] += len(frame)
            await asyncio.wait_for(task, TIMEOUT * 3)
            await ws.close()

    def run() -> None:
        try:
            asyncio.run(client())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # The server pauses ingest once the stalled publisher holds a full queue, and stays
    # paused until the sink comes back: what it had taken then is final.
    paused = wait_until(
        lambda: (
            (m := fetch_metrics(mon_port)).get("async_logging_backpressure_waits_total") >= 1 and m
        ),
        "ingest to pause on the full publish queue",
    )
    taken = int(paused.get("async_logging_events_received_total")) // 12  # frames
    wait_until(lambda: state["acked"] >= taken, "the acks of the frames taken")
    m = fetch_metrics(mon_port)
    acked, sent_bytes = state["acked"], state["bytes"]
    unacked_bytes = sent_bytes - acked * (state["bytes"] // max(state["sent"], 1))
    grown = server.memory_info().rss - rss0
    faulty.unlink()  # the sink comes back
    stop.set()
    thread.join(TIMEOUT * 3)
    assert not failure, failure
    assert not thread.is_alive()
    wait_until(lambda: len(s.records()) >= state["sent"], "publication after the stall")
    assert s.stop() == 0
    uuids = [r["uuid"] for r in s.records()]
    report = (
        f"while stalled the server took {taken} frames and acked {acked}; the client had sent "
        f"{sent_bytes / 1e6:.1f} MB, {unacked_bytes / 1e6:.1f} MB of it unacked; server rss "
        f"grew {grown / 1e6:.1f} MB; in all {state['sent']} frames ({state['sent'] * 12} "
        f"events) sent, {len(uuids)} trees published ({len(set(uuids))} distinct)"
    )
    print(report)
    assert acked == taken, f"acks went on while the publisher stalled: {report}"
    assert m.get("async_logging_events_received_total") == taken * 12, report
    assert unacked_bytes < 32 * 1024 * 1024, f"the client could push on: {report}"
    assert grown < 100 * 1024 * 1024, report
    assert m.get("async_logging_publish_queue") <= 1000 + 12, report
    assert sorted(uuids) == sorted(f"stall-{i}" for i in range(state["sent"])), report


# ====================================================================== connections


def test_1050_connections_against_a_threshold_of_1000(tmp_path: Path, procs: list[Served]) -> None:
    """With conn_threshold 1000, of 1,050 concurrent WebSockets exactly 1,000 are served and 50 refused with 503 (counted); freed slots are served again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    s = serve(tmp_path, "--conn-threshold", "1000")
    procs.append(s)
    assert s.mon_port
    mon_port = s.mon_port

    async def run() -> dict[str, Any]:
        url = f"ws://127.0.0.1:{s.port}/"
        gate = asyncio.Semaphore(200)  # handshakes in flight at once (the accept backlog)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one() -> aiohttp.ClientWebSocketResponse | int:
                async with gate:
                    try:
                        ws = await session.ws_connect(url, protocols=("log-protocol",))
                    except aiohttp.WSServerHandshakeError as exc:
                        return exc.status
                    assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
                    return ws

            got = await asyncio.gather(*(one() for _ in range(1050)))
            served = [g for g in got if not isinstance(g, int)]
            refused = [g for g in got if isinstance(g, int)]
            for i, ws in enumerate(served):
                await ws.send_bytes(msgpack.packb({"seq": i, "logs": tx(f"conn-{i}", 1)}))
            acks = await asyncio.gather(*(answer(ws) for ws in served))
            m = await asyncio.to_thread(fetch_metrics, mon_port)
            for ws in served[:50]:
                await ws.close()
            await asyncio.to_thread(
                wait_until,
                lambda: fetch_metrics(mon_port).get("async_logging_connections") == 950,
                "the server to notice 50 closes",
            )
            again = await asyncio.gather(*(one() for _ in range(50)))
            late = [g for g in again if not isinstance(g, int)]
            for ws in served[50:] + late:
                await ws.close()
            return {
                "served": len(served),
                "refused": refused,
                "acks": acks,
                "m": m,
                "again": len(late),
            }

    r = asyncio.run(run())
    m = r["m"]
    report = f"served {r['served']}, refused {len(r['refused'])} ({set(r['refused'])}); served after 50 closed {r['again']}"
    print(report)
    assert r["served"] == 1000 and r["refused"] == [503] * 50, report
    assert [a["ack"] for a in r["acks"]] == list(range(1000))
    assert m.get("async_logging_connections") == 1000
    assert m.by_label("async_logging_connections_refused_total", "reason") == {"conn_threshold": 50}
    assert r["again"] == 50, report
    assert s.stop() == 0
    assert len(s.records()) == 1000


# ====================================================================== malformed among good

BAD_FRAMES: list[tuple[str, Any, str]] = [
    ("bytes", b"\xc1", "bad_msgpack"),
    ("bytes", b"", "bad_msgpack"),
    ("text", "", "bad_json"),
    ("text", '{"seq": 1, "logs": [}', "bad_json"),
    ("raw-text", b'[{"msg": "\xff"}]', "bad_utf8"),
    ("bytes", msgpack.packb(42), "bad_payload"),
    ("text", '"just a string"', "bad_payload"),
    ("bytes", msgpack.packb({"seq": -1, "logs": []}), "bad_envelope"),
    ("bytes", msgpack.packb({"logs": "nope"}), "bad_envelope"),
    ("bytes", msgpack.packb([{"e": msgpack.ExtType(3, b"x")}]), "msgpack_ext"),
    ("bytes", b"\xdb\xff\xff\xff\xff", "bad_msgpack"),
    ("bytes", msgpack.packb([{1: "an int key"}]), "bad_key"),
    ("bytes", msgpack.packb({"seq": 5, "logs": tx("cut")})[:-7], "bad_msgpack"),
    ("text", '[{"d": ' + "[" * 100 + "]" * 100 + "}]", "too_deep"),
]


def test_malformed_frames_among_good_ones_cost_no_good_event(
    tmp_path: Path, procs: list[Served]
) -> None:
    """On one connection to a real proxy, each malformed frame gets its error and is counted, and every good event around them is published."""
    s = serve(tmp_path)
    procs.append(s)
    assert s.mon_port
    rounds = 3

    async def run() -> tuple[int, int]:
        bad = rejected = 0
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{s.port}/", protocols=("log-protocol",))
            assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
            seq = 0
            for r in range(rounds):
                for i, (kind, data, reason) in enumerate(BAD_FRAMES):
                    await ws.send_bytes(msgpack.packb({"seq": seq, "logs": tx(f"good-{r}-{i}")}))
                    assert await answer(ws) == {"ack": seq}
                    seq += 1
                    if kind == "bytes":
                        await ws.send_bytes(data)
                    elif kind == "text":
                        await ws.send_str(data)
                    else:
                        await ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                    err = await answer(ws)
                    assert err["error"] == reason, (data, err)
                    bad += 1
                # Bad events inside a good frame: refused one by one, the rest published.
                mixed: list[Any] = ["not a map", *tx(f"mixed-{r}"), {"clazz": "bogus"}]
                await ws.send_bytes(msgpack.packb({"seq": seq, "logs": mixed}))
                ans = await answer(ws)
                assert ans["ack"] == seq and [x["index"] for x in ans["rejected"]] == [0, 5]
                rejected += 2
                seq += 1
            assert not ws.closed
            await ws.close()
        return bad, rejected

    bad, rejected = asyncio.run(run())
    m = fetch_metrics(s.mon_port)
    assert s.stop() == 0
    recs = s.records()
    good = {f"good-{r}-{i}" for r in range(rounds) for i in range(len(BAD_FRAMES))}
    good |= {f"mixed-{r}" for r in range(rounds)}
    published = {r["uuid"] for r in recs if r.get("complete")}
    events = sum(1 for r in recs for n in walk(r) if n["kind"] == "atomicEvent")
    report = (
        f"sent {len(good)} good trees ({len(good) * 4} events), {bad} malformed frames and "
        f"{rejected} bad events; published {len(published)} complete trees, {events} atomic events; "
        f"bad_input counted {m.total('async_logging_bad_input_total'):.0f}"
    )
    print(report)
    assert published == good and len(recs) == len(good), report
    assert events == 2 * len(good), report
    assert m.total("async_logging_bad_input_total") == bad + rejected, report
    assert m.get("async_logging_events_received_total") == len(good) * 4, report
