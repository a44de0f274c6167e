"""The bus end to end on real JetStream (docs/design.md §8): ingest nodes, reassemblers and
sinks over ``nats-server`` processes that each test starts (one node, or a cluster of
three) and tears down.

Each test says which failure it survives; all check the same thing: every event a client
had acked is in exactly one published tree, and no tree is published twice.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install nats-py)")

from async_logging.bus import Reassembler, partition_of
from async_logging.bus.sink import make_sink
from async_logging.server import LogCluster, ServerConfig
from bus_nats import NatsCluster, needs_nats, wait_trees
from conftest import TIMEOUT
from helpers import T0, Metrics, serve, tx, walk

pytestmark = [needs_nats, pytest.mark.timeout(90)]

#: Seconds JetStream waits for a reassembler's ack in these tests (a replacement waits as
#: long for the messages of the one it replaces).
ACK_WAIT = 2.0


def tree(uuid: str, children: int = 3) -> list[dict[str, Any]]:
    """A transaction with ``children`` atomic events and a counted end (childCount): its
    tree is complete however its events are split."""
    events = tx(uuid, children)
    events[-1]["childCount"] = children
    return events


def options(urls: str, tmp_path: Path, **more: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "mon_port": 0,
        "heartbeat_interval": 0,
        "bus": urls,
        "partitions": 4,
        "bus_ack_wait": ACK_WAIT,
        "bus_timeout": TIMEOUT,
        "store": "",
        "log_file": str(tmp_path / "log" / "all.log"),
    }
    return ServerConfig(**{**values, **more})


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats", size=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats", size=3).start()
    yield cluster
    cluster.stop()


async def started_ingest(c: ServerConfig, nodes: list[Any]) -> LogCluster:
    """An in-process ``serve --bus`` once its bus link is ready (stopped by ``nodes``)."""
    ingest = LogCluster(c)
    await ingest.start()
    nodes.append(ingest)
    assert ingest.bus is not None
    await ingest.bus.link.wait(TIMEOUT)
    return ingest


async def started_reassembler(c: ServerConfig, nodes: list[Any]) -> Reassembler:
    """An in-process reassembler of every partition (stopped by ``nodes``)."""
    reassembler = Reassembler(c, range(c.partitions))
    await reassembler.start()
    nodes.append(reassembler)
    return reassembler


async def post(port: int, logs: list[dict[str, Any]], seq: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"logs": logs}
    if seq is not None:
        body["seq"] = seq
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.post(f"http://127.0.0.1:{port}/log", json=body) as resp,
    ):
        answer: dict[str, Any] = await resp.json()
        answer["status"] = resp.status
        return answer


async def post_acked(port: int, logs: list[dict[str, Any]]) -> int:
    """Post until the batch is acked, as a client does (it resends what the bus refused:
    503 overloaded); returns how many times it was refused."""
    for refused in range(400):
        try:
            answer = await post(port, logs)
        except (aiohttp.ClientError, TimeoutError):
            answer = {"status": 0}
        if answer["status"] == 200:
            return refused
        assert answer["status"] in (0, 503), answer
        await asyncio.sleep(0.05)
    raise AssertionError("never acked")


async def get_metrics(port: int) -> Metrics:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return Metrics(await resp.text())


async def get_ecv(port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.get(f"http://127.0.0.1:{port}/ecv") as resp,
    ):
        return resp.status, await resp.json()


async def until(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait (polling: the condition lives in another process or thread) until ``check()``."""
    deadline = time.monotonic() + timeout
    for _ in itertools.count():
        if check():
            return
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


def atomic_events(records: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """(uuid, event) of every atomic event in the records, with how often it appears."""
    return Counter(
        (str(n["uuid"]), str(n["event"]))
        for r in records
        for n in walk(r)
        if n.get("kind") == "atomicEvent"
    )


@pytest.fixture
async def nodes() -> AsyncIterator[list[Any]]:
    """In-process nodes a test starts; stopped at its end, last started first."""
    started: list[Any] = []
    yield started
    for node in reversed(started):
        await node.stop()


async def test_a_tree_split_over_two_ingest_nodes_is_one_tree(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """Half a transaction posted to one ingest node and the rest to another: one reassembler
    publishes one complete tree, and a sink writes it to its file once."""
    c = options(one_node.urls, tmp_path)
    a, b = await started_ingest(c, nodes), await started_ingest(c, nodes)
    events = tree("split-1", children=4)
    first = await post(a.port, events[:3])
    second = await post(b.port, [*events[3:], {"clazz": "nonsense"}])
    assert first == {"accepted": 3, "status": 200}
    assert second["accepted"] == 3 and second["rejected"][0]["error"] == "unknown_clazz"
    reassembler = await started_reassembler(c, nodes)
    out = tmp_path / "sink" / "all.log"
    sink = make_sink(c.replace(log_file=str(out)))
    await sink.start()
    nodes.append(sink)
    records = await wait_trees(one_node.urls, {"split-1"})
    assert len(records) == 1
    (record,) = records
    assert record["complete"] is True and len(record["children"]) == 4
    await until(lambda: out.exists() and bool(out.read_bytes()))
    lines = out.read_bytes().splitlines()
    assert [orjson.loads(line)["uuid"] for line in lines] == ["split-1"]
    metrics = await get_metrics(reassembler.mon_port)
    assert metrics.get("async_logging_bus_up") == 1
    assert metrics.total("async_logging_bus_messages_total") == 2  # one per post
    assert metrics.total("async_logging_bus_held") == 0
    assert metrics.total("async_logging_bus_published_messages_total") == 1


# ---------------------------------------------------------------------- a reassembler process

ANNOUNCED = re.compile(r"reassembling partitions .* monitoring http://[^:]+:(\d+)/ecv")


class ReassemblerProcess:
    """``async-logging reassemble`` as a process of its own (to kill -9)."""

    def __init__(self, urls: str, *args: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "async_logging.cli",
            "reassemble",
            "--bus",
            urls,
            "--mon-port",
            "0",
            "--bus-ack-wait",
            str(ACK_WAIT),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        deadline = time.monotonic() + TIMEOUT * 2
        self.mon_port = 0
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = ANNOUNCED.search(line)
            if m:
                self.mon_port = int(m.group(1))
                break
        assert self.mon_port, f"reassemble did not start: {''.join(self.lines)}"

    def kill(self) -> None:
        """kill -9: nothing is flushed, nothing handed back."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def terminate(self) -> int:
        """SIGTERM: the drain; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(TIMEOUT * 2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture
def processes() -> Iterator[list[ReassemblerProcess]]:
    started: list[ReassemblerProcess] = []
    yield started
    for p in started:
        p.kill()


def same_partition(count: int, partitions: int, prefix: str) -> list[str]:
    """``count`` uuids that all land in one partition."""
    out: list[str] = []
    for i in itertools.count():
        uuid = f"{prefix}-{i}"
        if partition_of(uuid, partitions) == 0:
            out.append(uuid)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")


async def test_a_killed_reassembler_is_replaced_with_nothing_lost_or_twice(
    tmp_path: Path,
    three_nodes: NatsCluster,
    nodes: list[Any],
    processes: list[ReassemblerProcess],
) -> None:
    """kill -9 of a reassembler with trees open and a published tree's message still held
    (it shares a message with an open tree): its replacement replays the unacked messages,
    completes the open trees, and the tree published before is dropped as a duplicate by
    its message id. Every acked event is in exactly one tree; no tree comes out twice."""
    urls = three_nodes.urls
    c = options(urls, tmp_path, partitions=2, bus_replicas=3)
    ingest = await started_ingest(c, nodes)
    first = ReassemblerProcess(urls, "--partitions", "0-1")
    processes.append(first)
    mixed, *halves = same_partition(4, 2, "open")
    whole = [f"whole-{i}" for i in range(30)]
    # One message holds a whole tree (published at once) and the first half of an open
    # one: the message stays unacked while the open tree waits.
    open_tree = tree(halves[0], children=4)
    assert (await post(ingest.port, tree(mixed) + open_tree[:3]))["accepted"] == 8
    for uuid in halves[1:]:
        assert (await post(ingest.port, tree(uuid, children=4)[:3]))["accepted"] == 3
    for uuid in whole[:15]:
        assert (await post(ingest.port, tree(uuid)))["accepted"] == 5
    await wait_trees(urls, {mixed, *whole[:15]})
    first.kill()
    # Acked while no reassembler runs: the bus holds them.
    for uuid in whole[15:]:
        assert (await post(ingest.port, tree(uuid)))["accepted"] == 5
    for uuid in halves:
        assert (await post(ingest.port, tree(uuid, children=4)[3:]))["accepted"] == 3
    second = ReassemblerProcess(urls, "--partitions", "0-1")
    processes.append(second)
    records = await wait_trees(urls, {mixed, *halves, *whole}, timeout=TIMEOUT * 4)
    by_uuid = Counter(str(r["uuid"]) for r in records)
    assert by_uuid == Counter({u: 1 for u in (mixed, *halves, *whole)})
    assert all(r["complete"] is True for r in records)
    events = atomic_events(records)
    expected = {(u, str(i + 2)) for u in (mixed, *whole) for i in range(3)} | {
        (u, str(i + 2)) for u in halves for i in range(4)
    }
    assert set(events) == expected and set(events.values()) == {1}
    metrics = await get_metrics(second.mon_port)
    # The whole tree that shared a message with an open one was built again and dropped.
    assert metrics.get("async_logging_bus_duplicates_total") >= 1
    assert second.terminate() == 0


async def test_a_drained_reassembler_hands_its_open_trees_back_at_once(
    tmp_path: Path,
    three_nodes: NatsCluster,
    nodes: list[Any],
    processes: list[ReassemblerProcess],
) -> None:
    """SIGTERM with trees open: the reassembler publishes what it finished and gives the
    open trees' messages back (nak), so its replacement replays them at once, not after
    ack_wait (30 s here, longer than this test may take)."""
    urls = three_nodes.urls
    c = options(urls, tmp_path, bus_replicas=3)
    ingest = await started_ingest(c, nodes)
    slow = ("--partitions", "0-3", "--bus-ack-wait", "30")
    first = ReassemblerProcess(urls, *slow)
    processes.append(first)
    halves = [f"drain-{i}" for i in range(8)]
    for uuid in halves:
        assert (await post(ingest.port, tree(uuid)[:2]))["accepted"] == 2
    assert (await post(ingest.port, tree("drain-whole")))["accepted"] == 5
    await wait_trees(urls, {"drain-whole"})
    assert first.terminate() == 0
    began = time.monotonic()
    second = ReassemblerProcess(urls, *slow)
    processes.append(second)
    for uuid in halves:
        assert (await post(ingest.port, tree(uuid)[2:]))["accepted"] == 3
    records = await wait_trees(urls, {*halves, "drain-whole"})
    assert time.monotonic() - began < 25  # no wait for ack_wait: the messages came back
    assert Counter(str(r["uuid"]) for r in records) == Counter(
        {u: 1 for u in (*halves, "drain-whole")}
    )
    assert all(r["complete"] is True and len(r["children"]) == 3 for r in records)


async def test_a_nats_node_killed_and_restarted_under_load_loses_nothing(
    tmp_path: Path, three_nodes: NatsCluster, nodes: list[Any]
) -> None:
    """The events stream's leader is killed -9 under load and started again: batches the
    bus could not store are refused (overloaded) and resent by the client, and every acked
    event ends in exactly one tree."""
    from nats.js.api import ClusterInfo

    from async_logging.bus import EVENTS_STREAM

    urls = three_nodes.urls
    c = options(urls, tmp_path, bus_replicas=3, bus_timeout=2.0)
    ingest = await started_ingest(c, nodes)
    await started_reassembler(c, nodes)
    uuids = [f"load-{i}" for i in range(240)]
    acked: set[str] = set()
    refused = 0

    async def load() -> None:
        nonlocal refused
        for i in range(0, len(uuids), 4):
            batch = uuids[i : i + 4]
            refused += await post_acked(ingest.port, [e for u in batch for e in tree(u)])
            acked.update(batch)
            await asyncio.sleep(0.005)

    sending = asyncio.create_task(load())
    await until(lambda: len(acked) >= 40)
    link = ingest.bus.link
    assert link.js is not None
    cluster: ClusterInfo | None = (await link.js.stream_info(EVENTS_STREAM)).cluster
    leader = cluster.leader if cluster is not None else None
    victim = next(n for n in three_nodes.nodes if n.name == leader)
    victim.kill()
    await until(lambda: len(acked) >= 120, timeout=TIMEOUT * 3)
    victim.start()
    await asyncio.wait_for(sending, TIMEOUT * 6)
    assert acked == set(uuids)
    records = await wait_trees(urls, set(uuids), timeout=TIMEOUT * 4)
    assert Counter(str(r["uuid"]) for r in records) == Counter({u: 1 for u in uuids})
    events = atomic_events(records)
    assert set(events.values()) == {1} and len(events) == 3 * len(uuids)
    metrics = await get_metrics(ingest.mon_port)
    assert metrics.get("async_logging_bus_up") == 1


async def test_one_uuid_posted_to_different_workers_is_one_tree(
    tmp_path: Path, three_nodes: NatsCluster, nodes: list[Any]
) -> None:
    """serve --workers 2 --bus: each event of a transaction posted on a connection of its
    own (the kernel spreads them over both workers) comes out in one tree, via the bus."""
    urls = three_nodes.urls
    served = serve(
        tmp_path, "--workers", "2", "--bus", urls, "--partitions", "4", "--bus-replicas", "3"
    )
    try:
        uuids = [f"worker-{i}" for i in range(12)]
        for uuid in uuids:
            for event in tree(uuid):
                await post_acked(served.port, [event])  # a session (connection) each
        await started_reassembler(options(urls, tmp_path, bus_replicas=3), nodes)
        records = await wait_trees(urls, set(uuids))
        assert Counter(str(r["uuid"]) for r in records) == Counter({u: 1 for u in uuids})
        assert all(r["complete"] is True and len(r["children"]) == 3 for r in records)
    finally:
        served.close()


async def test_without_the_bus_batches_are_refused_and_everything_resumes_after(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """The only NATS server goes down: the ingest node refuses batches (503 overloaded,
    bus_unavailable: clients keep and resend them) and both nodes' /ecv say 503; the
    reassembler acks nothing meanwhile. Once the server is back (its store kept), both
    resume: what was acked before and after comes out once, complete."""
    c = options(one_node.urls, tmp_path)
    ingest = await started_ingest(c, nodes)
    reassembler = await started_reassembler(c, nodes)
    assert (await post(ingest.port, tree("before") + tree("open")[:2]))["accepted"] == 7
    await wait_trees(one_node.urls, {"before"})
    (server,) = one_node.nodes
    server.kill()
    await until(lambda: not ingest.bus.link.up)  # type: ignore[union-attr]
    answer = await post(ingest.port, tree("during"))
    assert answer["status"] == 503 and answer["error"] == "overloaded"
    assert answer["detail"].startswith("bus_unavailable")
    for port in (ingest.mon_port, reassembler.mon_port):
        status, ecv = await get_ecv(port)
        assert status == 503 and ecv["reason"] == "bus_unavailable", ecv
    server.start()
    await until(lambda: ingest.bus.link.up and reassembler.link.up, timeout=TIMEOUT * 2)  # type: ignore[union-attr]
    await post_acked(ingest.port, tree("during"))
    await post_acked(ingest.port, tree("open")[2:])
    records = await wait_trees(one_node.urls, {"before", "during", "open"})
    assert Counter(str(r["uuid"]) for r in records) == Counter(
        {"before": 1, "during": 1, "open": 1}
    )
    assert all(r["complete"] is True for r in records)
    for _ in range(int(TIMEOUT * 20)):  # 503 for REFUSED_HOLD seconds after a refusal
        status, _ = await get_ecv(ingest.mon_port)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200
    metrics = await get_metrics(ingest.mon_port)
    assert metrics.get("async_logging_bus_refused_total", reason="bus_unavailable") >= 1
    assert metrics.get("async_logging_bus_errors_total", kind="disconnected") >= 1


async def test_an_open_tree_beside_a_published_one_is_carried_and_survives_a_kill(
    tmp_path: Path,
    three_nodes: NatsCluster,
    nodes: list[Any],
    processes: list[ReassemblerProcess],
) -> None:
    """One message holds a whole tree and half of another: after a quarter of the duplicate
    window (0.5 s here) the open half is carried to a new message and the first one acked.
    Killed then, the reassembler's replacement replays only the copy: the open tree comes
    out whole, once, and the published one is not built again."""
    urls = three_nodes.urls
    window = ("--bus-duplicate-window", "2")
    c = options(urls, tmp_path, partitions=1, bus_replicas=3, bus_duplicate_window=2.0)
    ingest = await started_ingest(c, nodes)
    first = ReassemblerProcess(urls, "--partitions", "0", *window)
    processes.append(first)
    open_tree = tree("carried-open", children=4)
    assert (await post(ingest.port, tree("carried-whole") + open_tree[:3]))["accepted"] == 8
    await wait_trees(urls, {"carried-whole"})
    for _ in range(int(TIMEOUT * 20)):
        metrics = await get_metrics(first.mon_port)
        if metrics.get("async_logging_bus_carried_total") >= 1:
            break
        await asyncio.sleep(0.05)
    assert metrics.get("async_logging_bus_carried_total") == 1
    first.kill()
    assert (await post(ingest.port, open_tree[3:]))["accepted"] == 3
    second = ReassemblerProcess(urls, "--partitions", "0", *window)
    processes.append(second)
    records = await wait_trees(urls, {"carried-whole", "carried-open"})
    assert Counter(str(r["uuid"]) for r in records) == Counter(
        {"carried-whole": 1, "carried-open": 1}
    )
    (done,) = (r for r in records if r["uuid"] == "carried-open")
    assert done["complete"] is True and len(done["children"]) == 4
    metrics = await get_metrics(second.mon_port)
    assert metrics.get("async_logging_bus_duplicates_total") == 0  # nothing built twice


async def post_msgpack(port: int, logs: list[dict[str, Any]]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.post(
            f"http://127.0.0.1:{port}/log",
            data=io.BytesIO(msgpack.packb({"seq": 1, "logs": logs})),
            headers={"Content-Type": "application/msgpack"},
        ) as resp,
    ):
        answer: dict[str, Any] = await resp.json()
        answer["status"] = resp.status
        return answer


async def test_a_frame_of_whole_trees_goes_as_it_came_and_lands_where_its_mapped_uuid_would(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """A MessagePack frame of whole, valid trees is published as its events came (no map
    per event at the ingest node): an integer uuid lands in the partition of its string
    form, where the reassembler maps it; a straggler sent later as JSON with the string
    uuid meets the published tree there (published alone, flagged late). A frame with a
    bad event takes the mapping path and its refusal is answered as ever."""
    c = options(one_node.urls, tmp_path)
    ingest = await started_ingest(c, nodes)
    await started_reassembler(c, nodes)
    whole = tree("4242") + tree("raw-1")
    for e in whole[:5]:
        e["uuid"] = 4242  # an integer uuid: the mapper makes it "4242"
    answer = await post_msgpack(ingest.port, whole)
    assert answer == {"accepted": 10, "ack": 1, "status": 200}
    assert ingest.bus is not None and ingest.bus.counts["raw_frames"] == 1
    bad = await post_msgpack(ingest.port, [*tree("raw-2"), {"clazz": "nonsense"}])
    assert bad["accepted"] == 5 and bad["rejected"][0]["error"] == "unknown_clazz"
    assert ingest.bus.counts["raw_frames"] == 1  # that one was mapped
    straggler = {
        "clazz": "atomicEvent",
        "uuid": "4242",
        "event": "99",
        "parent": "1",
        "msg": "late",
        "timestamp": T0 + 60,
    }
    await wait_trees(one_node.urls, {"4242", "raw-1", "raw-2"})
    assert (await post(ingest.port, [straggler]))["accepted"] == 1
    for _ in range(int(TIMEOUT * 20)):  # the straggler's record, then nothing more
        records = await wait_trees(one_node.urls, {"4242", "raw-1", "raw-2"})
        if any(r["kind"] == "atomicEvent" for r in records):
            break
        await asyncio.sleep(0.05)
    trees = [r for r in records if r["kind"] == "transaction"]
    assert Counter(str(r["uuid"]) for r in trees) == Counter({"4242": 1, "raw-1": 1, "raw-2": 1})
    assert all(r["complete"] is True and len(r["children"]) == 3 for r in trees)
    (late,) = (r for r in records if r["kind"] == "atomicEvent")
    assert late["uuid"] == "4242" and late["late"] is True


async def test_compressed_and_plain_nodes_share_the_bus_and_an_unreadable_message_is_dropped(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """One ingest node publishes plain (``bus_compression = "none"``), another compressed
    (the default): the events stream holds one of each, the reassembler reads both into one
    tree and publishes it compressed, and a message it cannot read (a damaged frame) is
    dropped and counted without costing the tree beside it."""
    import nats

    from async_logging.bus import EVENTS_STREAM
    from async_logging.bus.codec import ENCODING_HEADER

    c = options(one_node.urls, tmp_path)
    plain = await started_ingest(c.replace(bus_compression="none"), nodes)
    packed = await started_ingest(c, nodes)
    events = tree("mixed-1", children=6)
    assert (await post(plain.port, events[:4]))["status"] == 200
    assert (await post(packed.port, events[4:]))["status"] == 200
    nc = await nats.connect(one_node.urls.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=TIMEOUT)
        stored = [await js.get_msg(EVENTS_STREAM, seq) for seq in (1, 2)]
        encodings = [(m.headers or {}).get(ENCODING_HEADER) for m in stored]
        assert encodings == [None, "zstd"]
        part = partition_of("mixed-1", c.partitions)
        await js.publish(
            f"alog.events.{part}", b"\x28\xb5\x2f\xfd damaged", headers={ENCODING_HEADER: "zstd"}
        )
    finally:
        await nc.close()
    reassembler = await started_reassembler(c, nodes)
    (record,) = await wait_trees(one_node.urls, {"mixed-1"})
    assert record["complete"] is True and len(record["children"]) == 6
    metrics = await get_metrics(reassembler.mon_port)
    assert metrics.total("async_logging_bus_unreadable_total") == 1
    assert metrics.total("async_logging_bus_messages_total") == 3
    assert metrics.total("async_logging_bus_held") == 0
    sent = metrics.get("async_logging_bus_sent_bytes_total")
    assert 0 < sent < metrics.get("async_logging_bus_payload_bytes_total")
    plain_metrics = await get_metrics(plain.mon_port)
    assert plain_metrics.get("async_logging_bus_sent_bytes_total") == plain_metrics.get(
        "async_logging_bus_payload_bytes_total"
    )


async def test_a_second_reassembler_of_the_same_partitions_waits_then_takes_over(
    tmp_path: Path,
    one_node: NatsCluster,
    nodes: list[Any],
    processes: list[ReassemblerProcess],
) -> None:
    """Two processes started for the same partitions: the second holds none of them (its
    /ecv says 503 ``partition_owned``, naming the first), so no tree is split between two
    engines. Once the first is killed -9 the second takes the partitions over after the
    lease's TTL and replays what the first left open: every tree whole, once."""
    urls = one_node.urls
    c = options(urls, tmp_path, partitions=2)
    ingest = await started_ingest(c, nodes)
    first = ReassemblerProcess(urls, "--partitions", "0-1")
    processes.append(first)
    await until_async(lambda: ecv_field(first.mon_port, "leased"), [0, 1])
    second = ReassemblerProcess(urls, "--partitions", "0-1")
    processes.append(second)
    await until_async(lambda: ecv_field(second.mon_port, "reason"), "partition_owned")
    status, ecv = await get_ecv(second.mon_port)
    assert status == 503 and ecv["leased"] == []
    assert set(ecv["holders"]) == {"0", "1"}
    assert all(f"pid {first.proc.pid} " in h for h in ecv["holders"].values())
    metrics = await get_metrics(second.mon_port)
    assert metrics.total("async_logging_bus_lease_waiting") == 2
    assert (await get_ecv(first.mon_port))[0] == 200
    whole = [f"owned-{i}" for i in range(10)]
    halves = [f"half-{i}" for i in range(4)]
    for uuid in whole:
        assert (await post(ingest.port, tree(uuid)))["accepted"] == 5
    for uuid in halves:
        assert (await post(ingest.port, tree(uuid, children=4)[:3]))["accepted"] == 3
    await wait_trees(urls, set(whole))
    assert (await get_metrics(second.mon_port)).total("async_logging_bus_messages_total") == 0
    first.kill()
    for uuid in halves:
        assert (await post(ingest.port, tree(uuid, children=4)[3:]))["accepted"] == 3
    records = await wait_trees(urls, {*whole, *halves}, timeout=TIMEOUT * 4)
    assert Counter(str(r["uuid"]) for r in records) == Counter({u: 1 for u in (*whole, *halves)})
    assert all(r["complete"] is True for r in records)
    await until_async(lambda: ecv_status(second.mon_port), 200)
    assert (await get_metrics(second.mon_port)).total("async_logging_bus_lease_waiting") == 0
    assert second.terminate() == 0


async def test_a_reassembler_that_loses_its_lease_drops_the_partition_until_it_is_free(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """Another process took the partition's lease (as if this one had been cut off past its
    TTL): the reassembler drops what its engine held and waits; once the lease is free it
    takes the partition back and replays its unacked messages: the open tree comes out
    whole, once."""
    import nats

    from async_logging.bus.owners import OWNERS_BUCKET

    urls = one_node.urls
    c = options(urls, tmp_path, partitions=1)
    ingest = await started_ingest(c, nodes)
    reassembler = await started_reassembler(c, nodes)
    events = tree("leased-1", children=4)
    assert (await post(ingest.port, events[:3]))["accepted"] == 3
    await until(lambda: reassembler.parts[0].buffer.open_count == 1)
    nc = await nats.connect(urls.split(","), connect_timeout=2)
    try:
        kv = await nc.jetstream(timeout=TIMEOUT).key_value(OWNERS_BUCKET)
        await kv.purge("p0")
        await kv.create("p0", b"intruder")
        await until(lambda: reassembler.parts[0].waiting_for == "intruder")
        status, ecv = await get_ecv(reassembler.mon_port)
        assert status == 503 and ecv["holders"] == {"0": "intruder"}
        metrics = await get_metrics(reassembler.mon_port)
        assert metrics.total("async_logging_bus_leases_lost_total") == 1
        assert reassembler.parts[0].buffer.open_count == 0  # its state is gone
        await kv.delete("p0")
    finally:
        await nc.close()
    await until(lambda: reassembler.parts[0].waiting_for is None)
    assert (await post(ingest.port, events[3:]))["accepted"] == 3
    (record,) = await wait_trees(urls, {"leased-1"}, timeout=TIMEOUT * 3)
    assert record["complete"] is True and len(record["children"]) == 4


async def ecv_status(port: int) -> int:
    return (await get_ecv(port))[0]


async def ecv_field(port: int, name: str) -> Any:
    return (await get_ecv(port))[1].get(name)


async def until_async(
    probe: Callable[[], Any], expected: Any, timeout: float = TIMEOUT * 3
) -> None:
    """Wait until ``await probe()`` returns ``expected``."""
    deadline = time.monotonic() + timeout
    while (got := await probe()) != expected:
        assert time.monotonic() < deadline, f"still {got!r}, not {expected!r}"
        await asyncio.sleep(0.05)


async def test_otlp_spans_of_one_trace_in_two_requests_meet_behind_the_bus_with_a_settle(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """OTLP behind the bus: the ingest nodes hold no root span's end (the bus holds what
    they ack), so a span exported after its root by another service comes out late unless
    the reassemblers wait for stragglers: with ``settle`` (``reassemble --settle``) the
    trace's two requests, sent to two ingest nodes, make one complete tree."""
    from test_otlp_ingest import post as otlp_post
    from test_otlp_ingest import span, traces

    trace_id = bytes(range(1, 17))

    c = options(one_node.urls, tmp_path, partitions=2)
    a, b = await started_ingest(c, nodes), await started_ingest(c, nodes)
    await started_reassembler(c.replace(settle=2.0), nodes)
    # The caller's service exports its root and its client span first...
    root = span(1, 0, start_us=0, dur_us=900, kind=2, trace=trace_id)
    call = span(2, 1, start_us=100, dur_us=700, kind=3, trace=trace_id)
    assert (await otlp_post(a, "/v1/traces", traces(root, call, service="front")))[0] == 200
    await asyncio.sleep(0.3)
    # ...the service it called exports its server span (a child of span 2) later.
    downstream = span(3, 2, start_us=200, dur_us=500, kind=2, trace=trace_id)
    assert (await otlp_post(b, "/v1/traces", traces(downstream, service="back")))[0] == 200
    (record,) = await wait_trees(one_node.urls, {trace_id.hex()}, timeout=TIMEOUT * 2)
    assert record["complete"] is True and record["event"] == (1).to_bytes(8, "big").hex()
    (client,) = record["children"]
    (server,) = client["children"]
    assert server["event"] == (3).to_bytes(8, "big").hex() and server["pool"] == "back"


async def test_a_frame_whose_partition_outgrows_a_bus_message_is_cut_to_fit(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """A MessagePack frame with nothing to refuse but 1.5 MB of events for one partition
    (more than a NATS message holds, 1 MiB): it takes the mapping path, which cuts them
    into messages that fit; every tree comes out whole (it was a 503 for the whole flush)."""
    c = options(one_node.urls, tmp_path)
    ingest = await started_ingest(c, nodes)
    await started_reassembler(c, nodes)
    uuids = same_partition(30, c.partitions, "big")
    logs = []
    for uuid in uuids:
        events = tree(uuid)
        for e in events:
            if e["clazz"] == "atomicEvent":
                e["msg"] = "x" * 16_000
        logs.extend(events)
    answer = await post_msgpack(ingest.port, logs)
    assert answer == {"accepted": len(logs), "ack": 1, "status": 200}
    assert ingest.bus is not None and ingest.bus.counts["raw_frames"] == 0
    records = await wait_trees(one_node.urls, set(uuids), timeout=TIMEOUT * 2)
    assert Counter(str(r["uuid"]) for r in records) == Counter(dict.fromkeys(uuids, 1))
    assert all(r["complete"] is True and len(r["children"]) == 3 for r in records)


async def test_a_reassembler_stuck_publishing_when_its_lease_goes_publishes_and_acks_nothing(
    tmp_path: Path, one_node: NatsCluster, nodes: list[Any]
) -> None:
    """The trees stream refuses a reassembler's trees (no leader, say) for longer than its
    lease lasts, and another process takes the partition meanwhile: the reassembler gives
    up the publish, acks nothing, drops its state and waits; once the partition is free it
    takes it back and the tree comes out once."""
    import nats

    from async_logging.bus import BusUnavailable
    from async_logging.bus.owners import OWNERS_BUCKET
    from bus_nats import read_trees

    urls = one_node.urls
    c = options(urls, tmp_path, partitions=1)
    ingest = await started_ingest(c, nodes)
    reassembler = await started_reassembler(c, nodes)
    part = reassembler.parts[0]
    await until(lambda: part.lease.held)
    publisher = reassembler.link.publisher
    assert publisher is not None
    original = publisher.publish
    tried = asyncio.Event()

    async def refused(messages: Any, timeout: float) -> Any:
        tried.set()
        raise BusUnavailable("bus_unavailable", "the trees stream has no leader (test)")

    publisher.publish = refused  # type: ignore[method-assign]
    assert (await post(ingest.port, tree("stuck-1")))["accepted"] == 5
    await asyncio.wait_for(tried.wait(), TIMEOUT)
    nc = await nats.connect(urls.split(","), connect_timeout=2)
    try:
        kv = await nc.jetstream(timeout=TIMEOUT).key_value(OWNERS_BUCKET)
        await kv.purge("p0")
        await kv.create("p0", b"intruder")
        await until(lambda: part.waiting_for == "intruder")
        publisher.publish = original  # type: ignore[method-assign]
        metrics = await get_metrics(reassembler.mon_port)
        assert metrics.total("async_logging_bus_leases_lost_total") == 1
        assert not [r for r in await read_trees(urls) if r["uuid"] == "stuck-1"]
        await kv.delete("p0")
    finally:
        await nc.close()
    records = await wait_trees(urls, {"stuck-1"}, timeout=TIMEOUT * 3)
    assert Counter(str(r["uuid"]) for r in records) == Counter({"stuck-1": 1})
    assert records[0]["complete"] is True
