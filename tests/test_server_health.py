"""/ecv tells the truth: a proxy that does not ack answers 503 with the reason (issue 12,
item 6): the publish queue full, the publisher stalled, the spool full."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from async_logging.server import LogCluster
from conftest import TIMEOUT
from helpers import Gate, serve, tx


def tree(uuid: str) -> list[dict[str, Any]]:
    return [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0"},
        {"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "status": "0"},
    ]


async def ecv(session: aiohttp.ClientSession, cluster: LogCluster) -> tuple[int, Any]:
    async with session.get(f"http://127.0.0.1:{cluster.mon_port}/ecv") as resp:
        return resp.status, await resp.json()


async def post(session: aiohttp.ClientSession, cluster: LogCluster, logs: Any) -> int:
    async with session.post(f"http://127.0.0.1:{cluster.port}/log", json=logs) as resp:
        return resp.status


async def until(done: Callable[[], bool]) -> None:
    """Wait, bounded, for a state of the in-process server (checked every 10 ms)."""
    for _ in range(int(TIMEOUT / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never got there")


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as s:
        yield s


async def start(gate: Gate, **options: Any) -> LogCluster:
    cluster = LogCluster(
        host="127.0.0.1", port=0, mon_port=0, heartbeat_interval=0, store="",
        publisher=gate, **options,
    )  # fmt: skip
    await cluster.start()
    return cluster


async def test_a_full_publish_queue_makes_ecv_503_until_it_drains(
    gate: Gate, session: aiohttp.ClientSession
) -> None:
    """With the publisher held and its queue full, ingest waits and /ecv says 503
    publish_queue_full; once the publisher goes on, 200 again and every tree published."""
    cluster = await start(gate)
    try:
        assert cluster.pipeline is not None
        cluster.pipeline.publish_queue = 3  # below what the option allows: a small test
        assert (await ecv(session, cluster))[0] == 200
        sends = [asyncio.create_task(post(session, cluster, tree(f"q{i}"))) for i in range(6)]
        pipeline = cluster.pipeline
        assert pipeline is not None
        await until(lambda: pipeline.queued >= pipeline.publish_queue)  # the queue filled up
        status, body = await ecv(session, cluster)
        assert (status, body["status"], body["reason"]) == (
            503,
            "UNAVAILABLE",
            "publish_queue_full",
        )
        gate.open.set()
        assert await asyncio.wait_for(asyncio.gather(*sends), TIMEOUT) == [200] * 6
        await until(lambda: not pipeline.queued)
        status, body = await ecv(session, cluster)
        assert status == 200 and "reason" not in body
    finally:
        gate.open.set()
        await cluster.stop()
    assert gate.published == 6


async def test_a_stalled_publisher_makes_ecv_503_on_the_pipelines_clock(
    gate: Gate, session: aiohttp.ClientSession
) -> None:
    """Records waiting and none published for longer than stall_after (an injected clock):
    503 publisher_stalled; published again: 200."""
    cluster = await start(gate)
    now = [1000.0]
    try:
        pipeline = cluster.pipeline
        assert pipeline is not None
        pipeline.clock = lambda: now[0]
        assert await post(session, cluster, tree("s1")) == 200
        assert await asyncio.to_thread(gate.entered.wait, TIMEOUT)
        assert (await ecv(session, cluster))[0] == 200  # waiting, not yet stalled
        now[0] += pipeline.stall_after + 1
        status, body = await ecv(session, cluster)
        assert (status, body["reason"]) == (503, "publisher_stalled")
        gate.open.set()
        await until(lambda: not pipeline.queued)
        assert (await ecv(session, cluster))[0] == 200
    finally:
        gate.open.set()
        await cluster.stop()


async def test_a_full_spool_makes_ecv_503_spool_full(
    tmp_path: Path, gate: Gate, session: aiohttp.ClientSession
) -> None:
    """When the spool refuses a batch (503 spool_full to the client), /ecv says so too."""
    gate.open.set()
    cluster = await start(gate, spool=str(tmp_path / "spool"), spool_max_bytes=2048)
    try:
        # An open tree pins what the spool holds: send until it refuses.
        statuses = []
        for i in range(40):
            begin = [{"clazz": "begin", "uuid": f"o{i}", "event": "1", "parent": "0"}]
            statuses.append(await post(session, cluster, begin))
            if statuses[-1] != 200:
                break
        assert statuses[-1] == 503, statuses
        status, body = await ecv(session, cluster)
        assert (status, body["reason"]) == (503, "spool_full")
    finally:
        await cluster.stop()


async def test_a_drain_answers_the_frame_it_is_taking_before_it_closes(
    gate: Gate, session: aiohttp.ClientSession
) -> None:
    """A frame being taken when the server drains (here: waiting for room in the publish
    queue) is acked before the connection closes with 1001: a client never resends a
    batch the server took, so nothing is published twice (the recycled-worker duplicate)."""
    cluster = await start(gate)
    pipeline = cluster.pipeline
    assert pipeline is not None
    try:
        ws = await session.ws_connect(
            f"ws://127.0.0.1:{cluster.port}/", protocols=("log-protocol",)
        )
        assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
        await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tree("first")}))
        assert (await ws.receive(timeout=TIMEOUT)).json() == {"ack": 1}
        await asyncio.to_thread(gate.entered.wait, TIMEOUT)  # the publisher holds "first"
        await ws.send_bytes(msgpack.packb({"seq": 2, "logs": tree("second")}))
        assert (await ws.receive(timeout=TIMEOUT)).json() == {"ack": 2}
        pipeline.publish_queue = 2  # full: the next frame waits for room, being taken
        await ws.send_bytes(msgpack.packb({"seq": 3, "logs": tree("third")}))
        await until(lambda: pipeline.stats.backpressure_waits == 1)
        stopping = asyncio.create_task(cluster.stop())
        await until(lambda: cluster.draining)
        gate.open.set()  # room again: the frame is taken, then answered, then closed
        answer = await ws.receive(timeout=TIMEOUT)
        assert (answer.type, answer.json()) == (aiohttp.WSMsgType.TEXT, {"ack": 3})
        closing = await ws.receive(timeout=TIMEOUT)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        gate.open.set()
        await cluster.stop()
    assert gate.published == 3


def test_the_supervisor_says_503_when_every_worker_refuses(
    tmp_path: Path, procs: list[Any]
) -> None:
    """With workers, /ecv is the supervisor's: once every worker refuses batches (here its
    spool is full), it answers 503 with the reason, each worker's in ``workers``."""
    s = serve(
        tmp_path, "--workers", "2", "--spool", str(tmp_path / "spool"), "--spool-max-bytes", "100"
    )
    procs.append(s)
    url = f"http://127.0.0.1:{s.port}/log"

    def post() -> int:
        body = orjson.dumps({"logs": tx("refused")})
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def health() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.mon_port}/ecv", timeout=TIMEOUT) as r:
                return int(r.status), orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    deadline = time.monotonic() + TIMEOUT
    while health()[0] != 200:  # the workers are starting
        assert time.monotonic() < deadline, health()
        time.sleep(0.05)
    while True:  # new connections spread over the workers: refuse until both have
        assert post() == 503
        status, body = health()
        if status == 503:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body["reason"] == "spool_full" and body["status"] == "UNAVAILABLE"
    assert [w.get("refusing") for w in body["workers"]] == ["spool_full", "spool_full"]
