"""The proxy in-process on free ports, driven by real WebSocket and HTTP clients (docs/design.md §4-5)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import aiohttp
import msgpack
import orjson
import pytest

from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT, vector

T0 = 1_795_463_406_000


def tx(uuid: str, n_atomic: int = 1) -> list[dict[str, Any]]:
    """A small whole transaction as a client sends it."""
    ev = [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "name": "/t", "timestamp": T0}
    ]
    for i in range(n_atomic):
        ev.append(
            {
                "clazz": "atomicEvent",
                "uuid": uuid,
                "event": str(i + 2),
                "parent": "1",
                "msg": f"m{i}",
                "timestamp": T0 + 1 + i,
            }
        )
    ev.append(
        {
            "clazz": "end",
            "uuid": uuid,
            "event": "1",
            "parent": "0",
            "status": "0",
            "timestamp": T0 + 9,
        }
    )
    return ev


def shape(node: dict) -> tuple:
    kids = tuple(shape(c) for c in node.get("children", ()))
    return (
        node["kind"],
        node.get("type"),
        node.get("name"),
        node.get("msg"),
        node.get("status"),
        node.get("duration"),
        kids,
    )


ORIGINAL_TREE = (
    "transaction",
    "URL",
    "/orig",
    None,
    "0",
    7,
    (
        (
            "transaction",
            "API",
            "svc",
            None,
            "0",
            3,
            (("atomicEvent", "DB", "q", "select 1", None, None, ()),),
        ),
        ("atomicEvent", "INFO", "note", "hello", None, None, ()),
    ),
)


async def wait_for(publisher: MemoryPublisher, predicate: Any) -> Any:
    return await asyncio.to_thread(publisher.wait_for, predicate, TIMEOUT)


async def until(predicate: Any, what: str) -> None:
    """Poll in-process state that has no event to wait on, for at most TIMEOUT seconds."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def connect(
    session: aiohttp.ClientSession, server: LogCluster, **kw: Any
) -> aiohttp.ClientWebSocketResponse:
    kw.setdefault("protocols", ("log-protocol",))
    ws = await session.ws_connect(
        f"ws://127.0.0.1:{server.port}/", timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT), **kw
    )
    ready = await ws.receive(timeout=TIMEOUT)
    assert ready.type is aiohttp.WSMsgType.TEXT and ready.data == "ready"
    return ws


async def answer(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return orjson.loads(msg.data)  # type: ignore[no-any-return]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


# ------------------------------------------------------------------ the original client


async def test_original_ws_frames_give_the_listed_records(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """The Node client's two captured frames publish the tree, the stand-alone event and the heartbeat."""
    frames = [vector("ws-frame-1.msgpack"), vector("ws-frame-2.msgpack")]  # skips before connecting
    ws = await connect(session, server)
    assert ws.protocol == "log-protocol"
    for frame in frames:
        await ws.send_bytes(frame)
    await wait_for(publisher, lambda p: len(p.records) >= 3)
    await ws.close()
    (tree,) = publisher.transactions
    assert tree["uuid"] == "orig-ws-1" and shape(tree) == ORIGINAL_TREE
    assert tree["complete"] is True and tree["timestamp"] == 1795463406040
    (solo,) = publisher.atomic_events
    assert (solo["type"], solo["name"], solo["msg"]) == ("INFO", "standalone", "no uuid here")
    (hb,) = publisher.heartbeats
    assert hb["name"] == "hb"


async def test_original_http_form_post_gives_the_listed_tree(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """The Node HTTP transport's form post (every value a string) publishes the same tree."""
    raw = vector("http-post-1.txt")
    body = raw.split(b"\n\n", 1)[1] if b"\r\n\r\n" not in raw else raw.split(b"\r\n\r\n", 1)[1]
    async with session.post(
        f"http://127.0.0.1:{server.port}/log",
        data=body.strip(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["accepted"] == 6
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    assert tree["uuid"] == "orig-http-1" and shape(tree) == ORIGINAL_TREE
    assert tree["pid"] == 7627 and tree["timestamp"] == 1795463406040


async def test_client_asking_for_no_subprotocol_is_accepted(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A WebSocket client that names no subprotocol is served the same way, on any path."""
    ws = await session.ws_connect(f"ws://127.0.0.1:{server.port}/some/path")
    assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
    await ws.send_str(orjson.dumps(tx("np")).decode())
    await wait_for(publisher, lambda p: p.transactions)
    await ws.close()


# ------------------------------------------------------------------ envelopes and errors


async def test_envelope_is_acked_after_the_buffer_took_it(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """{"seq", "logs"} gets {"ack": seq}; msgpack and JSON frames alike."""
    ws = await connect(session, server)
    await ws.send_bytes(msgpack.packb({"seq": 41, "logs": tx("a")}))
    assert await answer(ws) == {"ack": 41}
    await ws.send_str(orjson.dumps({"seq": 42, "logs": tx("b")}).decode())
    assert await answer(ws) == {"ack": 42}
    await wait_for(publisher, lambda p: len(p.transactions) == 2)
    await ws.close()


async def test_bad_frame_gets_an_error_frame_and_the_connection_stays_up(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Undecodable frames are answered with a named error (and seq when readable), then work goes on."""
    ws = await connect(session, server)
    await ws.send_bytes(b"\xc1\xc1 not msgpack")
    err = await answer(ws)
    assert err["error"] == "bad_msgpack" and err["seq"] is None and err["detail"]
    await ws.send_str('{"seq": 7, "logs": [}')
    err = await answer(ws)
    assert err["error"] == "bad_json"
    await ws.send_str('{"seq": "x", "logs": []}')
    assert (await answer(ws))["error"] == "bad_envelope"
    await ws.send_bytes(msgpack.packb({"seq": 8, "logs": tx("ok")}))
    assert await answer(ws) == {"ack": 8}
    await wait_for(publisher, lambda p: p.transactions)
    await ws.close()
    assert server.stats.bad_input["bad_msgpack"] == 1
    assert server.stats.bad_input["bad_json"] == 1


async def test_bad_events_in_a_good_frame_are_listed_and_the_rest_published(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """One bad event never costs the good ones beside it; the answer names it by index."""
    ws = await connect(session, server)
    logs: list[Any] = tx("mixed")
    logs.insert(1, {"clazz": "bogus"})
    logs.insert(0, "not a map")
    await ws.send_bytes(msgpack.packb({"seq": 3, "logs": logs}))
    ans = await answer(ws)
    assert ans["ack"] == 3 and ans["error"] == "invalid_events"
    assert [(r["index"], r["error"]) for r in ans["rejected"]] == [
        (0, "not_a_map"),
        (2, "unknown_clazz"),
    ]
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    assert tree["complete"] is True and len(tree["children"]) == 1
    await ws.close()
    assert server.snapshot()["bad_input"] == {"not_a_map": 1, "unknown_clazz": 1}


async def test_an_answer_lists_the_first_100_refusals_and_counts_them_all(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A frame of 5,000 nils (10 KB) is answered with 100 refusals and their count, not a
    list 80 times the frame's size; POST answers the same way."""
    ws = await connect(session, server)
    payload = msgpack.packb({"seq": 4, "logs": [None] * 5000})
    await ws.send_bytes(payload)
    msg = await ws.receive(timeout=TIMEOUT)
    ans = orjson.loads(msg.data)
    assert (ans["ack"], ans["error"], ans["rejected_count"]) == (4, "invalid_events", 5000)
    assert [r["index"] for r in ans["rejected"]] == list(range(100))
    assert len(msg.data) < 10 * len(payload)
    await ws.close()
    async with session.post(
        f"http://127.0.0.1:{server.port}/log",
        data=payload,
        headers={"Content-Type": "application/msgpack"},
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["rejected_count"] == 5000 and len(body["rejected"]) == 100


@pytest.mark.parametrize("server_options", [{"max_message_bytes": 2048}])
async def test_frame_over_the_size_limit_closes_with_1009(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A frame over max_message_bytes is a protocol violation: close code 1009, counted."""
    ws = await connect(session, server)
    await ws.send_bytes(msgpack.packb([{"msg": "x" * 4096}]))
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 1009
    await until(lambda: server.stats.bad_input["message_too_big"], "the refusal counted")
    assert server.stats.bad_input["message_too_big"] == 1


@pytest.mark.parametrize("server_options", [{"conn_threshold": 2}])
async def test_connection_over_the_threshold_is_refused_with_503(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """conn_threshold connections are served; the next upgrade gets 503 naming the limit."""
    a = await connect(session, server)
    b = await connect(session, server)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(f"ws://127.0.0.1:{server.port}/")
    assert info.value.status == 503
    await a.close()
    await until(lambda: server.stats.connections < 2, "the server to notice the close")
    c = await connect(session, server)
    await b.close()
    await c.close()
    assert server.stats.connections_refused["conn_threshold"] == 1


@pytest.mark.parametrize("server_options", [{"idle_timeout": 0.2}])
async def test_idle_connection_is_closed(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A WebSocket with no frame for idle_timeout seconds is closed by the server (1000, idle)."""
    ws = await connect(session, server)
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1000 and msg.extra == "idle"


# ------------------------------------------------------------------ HTTP


async def post(
    session: aiohttp.ClientSession, server: LogCluster, body: bytes, ctype: str
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"http://127.0.0.1:{server.port}/log", data=body, headers={"Content-Type": ctype}
    ) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("encode", "ctype"),
    [
        (lambda logs: orjson.dumps({"logs": logs}), "application/json"),
        (lambda logs: orjson.dumps(logs), "application/json; charset=utf-8"),
        (lambda logs: msgpack.packb(logs), "application/msgpack"),
        (lambda logs: msgpack.packb({"logs": logs}), "application/x-msgpack"),
    ],
)
async def test_post_log_accepts_json_and_msgpack(
    server: LogCluster,
    publisher: MemoryPublisher,
    session: aiohttp.ClientSession,
    encode: Any,
    ctype: str,
) -> None:
    """POST /log takes {"logs": [...]} or a bare array as JSON or MessagePack; 200 with the count."""
    status, body = await post(session, server, encode(tx("h", 2)), ctype)
    assert (status, body) == (200, {"accepted": 4})
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    assert [c["msg"] for c in tree["children"]] == ["m0", "m1"]


async def test_post_form_with_a_logs_json_field(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A url-encoded or multipart form whose logs field is JSON is accepted."""
    async with session.post(
        f"http://127.0.0.1:{server.port}/log", data={"logs": orjson.dumps(tx("f1")).decode()}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["accepted"] == 3
    form = aiohttp.FormData()
    form.add_field("logs", orjson.dumps(tx("f2")).decode())
    form.add_field("file", b"ignored", filename="x.bin")
    async with session.post(f"http://127.0.0.1:{server.port}/log", data=form) as resp:
        assert resp.status == 200, await resp.text()
    await wait_for(publisher, lambda p: len(p.transactions) == 2)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "reason"),
    [
        (b"{not json", "application/json", 400, "bad_json"),
        (b"\xc1", "application/msgpack", 400, "bad_msgpack"),
        (b"42", "application/json", 400, "bad_payload"),
        (b"<logs/>", "application/xml", 415, "unsupported_media_type"),
        (b'[{"clazz": "nope"}]', "application/json", 400, "unknown_clazz"),
    ],
)
async def test_post_bad_body_gets_a_status_naming_what_is_wrong(
    server: LogCluster,
    session: aiohttp.ClientSession,
    body: bytes,
    ctype: str,
    status: int,
    reason: str,
) -> None:
    """Each bad body gets its HTTP status and a JSON error with the reason, and is counted."""
    got_status, got = await post(session, server, body, ctype)
    assert got_status == status and got["error"] == reason and got["detail"]
    assert server.snapshot()["bad_input"][reason] == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("ctype", ["application/json", "application/msgpack"])
async def test_a_compressed_body_that_does_not_inflate_gets_400_bad_gzip(
    server: LogCluster,
    session: aiohttp.ClientSession,
    ctype: str,
    encoding: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A body whose Content-Encoding it does not match is refused 400 ``bad_gzip``,
    counted, and the connection closed; nothing is logged as an error (it was a 500 and
    two tracebacks)."""
    async with session.post(
        f"http://127.0.0.1:{server.port}/log",
        data=b"not compressed at all",
        headers={"Content-Type": ctype, "Content-Encoding": encoding},
    ) as resp:
        assert resp.status == 400 and resp.headers.get("Connection") == "close"
        got = await resp.json()
    assert got["error"] == "bad_gzip" and "does not inflate" in got["detail"]
    assert server.snapshot()["bad_input"]["bad_gzip"] == 1
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("server_options", [{"max_message_bytes": 1024}])
async def test_post_over_the_size_limit_gets_413(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A body over max_message_bytes is refused with 413 before it is decoded."""
    status, body = await post(
        session, server, orjson.dumps([{"msg": "x" * 2000}]), "application/json"
    )
    assert status == 413 and body["error"] == "message_too_big"


async def test_get_ws_answers_the_websocket_url(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """GET /ws tells websocket-otherwise-HTTP clients where to connect."""
    async with session.get(f"http://127.0.0.1:{server.port}/ws") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"url": f"ws://127.0.0.1:{server.port}/", "protocol": "log-protocol"}
    ws = await session.ws_connect(body["url"], protocols=(body["protocol"],))
    assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
    await ws.close()


# ------------------------------------------------------------------ MonApp, heartbeats, drain


async def test_ecv_and_metrics(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """/ecv says AVAILABLE; /metrics counts events, frames, bad input and published trees."""
    ws = await connect(session, server)
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("m", 3)}))
    await answer(ws)
    await ws.send_bytes(b"\xc1")
    await answer(ws)
    await wait_for(publisher, lambda p: p.transactions)
    base = f"http://127.0.0.1:{server.mon_port}"
    async with session.get(f"{base}/ecv") as resp:
        assert resp.status == 200
        ecv = await resp.json()
    assert ecv["status"] == "AVAILABLE" and ecv["connections"] == 1
    await ws.close()
    # The publisher thread counts a batch just after the sink took it: read until it has.
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
        if "async_logging_publish_latency_seconds_count 1.0" in text:
            break
        assert asyncio.get_running_loop().time() < deadline, text
        await asyncio.sleep(0.01)
    for line in (
        "async_logging_events_received_total 5.0",
        'async_logging_frames_received_total{transport="ws"} 2.0',
        'async_logging_bad_input_total{reason="bad_msgpack"} 1.0',
        'async_logging_transactions_published_total{complete="true"} 1.0',
        'async_logging_records_published_total{kind="transaction"} 1.0',
        "async_logging_open_transactions 0.0",
        "async_logging_publish_latency_seconds_count 1.0",
    ):
        assert line in text, line


@pytest.mark.parametrize("server_options", [{"ecv": False}])
async def test_ecv_switched_off_answers_503(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """With ecv off the health check takes the server out of rotation."""
    async with session.get(f"http://127.0.0.1:{server.mon_port}/ecv") as resp:
        assert resp.status == 503 and (await resp.json())["status"] == "UNAVAILABLE"


@pytest.mark.parametrize("server_options", [{"heartbeat_interval": 0.05, "machine_name": "box-1"}])
async def test_server_publishes_its_own_heartbeats(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """Every heartbeat_interval the server publishes a heartbeat record about itself."""
    hbs = await wait_for(publisher, lambda p: len(p.heartbeats) >= 2 and p.heartbeats)
    hb = hbs[0]
    assert hb["machine"] == "box-1" and hb["name"] == "async-logging"
    assert hb["rss_bytes"] > 0 and "cpu_percent" in hb


async def test_stop_publishes_open_trees_flagged_shutdown(
    publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Draining publishes an open transaction as incomplete (shutdown) and flushes the publisher."""
    cluster = LogCluster(
        host="127.0.0.1", port=0, mon_port=-1, heartbeat_interval=0, publisher=publisher
    )
    await cluster.start()
    ws = await connect(session, cluster)  # type: ignore[arg-type]
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("open")[:-1]}))
    assert await answer(ws) == {"ack": 1}
    await cluster.stop()
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001  # going away
    (tree,) = publisher.transactions
    assert tree["complete"] is False and tree["reason"] == "shutdown"
    assert len(tree["children"]) == 1
    assert publisher.flushed >= 1 and publisher.closed == 1


async def test_slow_publisher_applies_backpressure_instead_of_growing(
    session: aiohttp.ClientSession,
) -> None:
    """With the publish queue full, ingest waits (acks are held) and the wait is counted.

    Decided by the server's state, not by a quiet spell: once it waits for room, the frames
    it took are all it takes until the publisher moves, and exactly those are acked.
    """
    import threading

    gate = threading.Event()

    class Stalled(MemoryPublisher):
        def publish_many(self, records: Any) -> None:
            gate.wait(TIMEOUT)
            super().publish_many(records)

    pub = Stalled()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=pub,
        publish_queue=100,
    )
    await cluster.start()
    try:
        ws = await connect(session, cluster)  # type: ignore[arg-type]
        for seq in range(300):
            await ws.send_bytes(msgpack.packb({"seq": seq, "logs": tx(f"bp{seq}")}))
        await until(lambda: cluster.stats.backpressure_waits >= 1, "ingest to wait for room")
        taken = cluster.stats.events // 3  # frames (3 events each); final while gated
        assert 100 <= taken < 300, taken  # the queue filled; the server stopped taking frames
        assert [(await answer(ws))["ack"] for _ in range(taken)] == list(range(taken))
        assert cluster.stats.events == taken * 3
        assert cluster.pipeline is not None and cluster.pipeline.queued <= 100 + 1
        gate.set()
        rest = [(await answer(ws))["ack"] for _ in range(300 - taken)]
        assert rest == list(range(taken, 300))
        await asyncio.to_thread(pub.wait_for, lambda p: len(p.transactions) == 300, TIMEOUT)
        await ws.close()
    finally:
        gate.set()
        await cluster.stop()


# ------------------------------------------------------------------ plug-ins


class CountingBuffer:
    """A buffer plug-in: wraps the engine and counts batches (any object with its API works)."""

    built_with: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        from async_logging import LogBuffer

        CountingBuffer.built_with = options
        self.inner = LogBuffer(**options)
        self.batches = 0

    def feed_many(self, events: Any) -> Any:
        self.batches += 1
        return self.inner.feed_many(events)

    def expire(self, now: Any = None) -> Any:
        return self.inner.expire(now)

    def flush_all(self, reason: str = "shutdown") -> Any:
        return self.inner.flush_all(reason)

    @property
    def open_count(self) -> int:
        return self.inner.open_count

    @property
    def stats(self) -> Any:
        return self.inner.stats

    @property
    def rejected(self) -> Any:
        return self.inner.rejected

    @property
    def incomplete(self) -> Any:
        return self.inner.incomplete


@pytest.mark.parametrize(
    "server_options", [{"buffer": "test_server:CountingBuffer", "clean_duration": 7.0}]
)
async def test_buffer_plugin_by_module_attr(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A "module:attr" buffer class is built with the clean-cycle options and fed every batch."""
    ws = await connect(session, server)
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("plug")}))
    assert await answer(ws) == {"ack": 1}
    await wait_for(publisher, lambda p: p.transactions)
    await ws.close()
    assert server.pipeline is not None
    buf = server.pipeline.buffer
    assert isinstance(buf, CountingBuffer) and buf.batches == 1
    assert CountingBuffer.built_with["clean_duration"] == 7.0


async def test_listener_plugin_instance_feeds_the_pipeline(publisher: MemoryPublisher) -> None:
    """A custom listener (here: no sockets at all) plugs in and feeds logs through the pipeline."""

    class InlineListener:
        def __init__(self, pipeline: Any, config: Any) -> None:
            self.pipeline = pipeline
            self.frames_seen = 0

        async def start(self, *, reuse_port: bool = False) -> int:
            await self.pipeline.accept(tx("inline"))
            return 0

        async def stop_accepting(self) -> None: ...

        async def close_connections(self, timeout: float = 5.0) -> None: ...

        async def cleanup(self) -> None: ...

    cluster = LogCluster(
        listener=InlineListener, mon_port=-1, heartbeat_interval=0, publisher=publisher
    )
    await cluster.start()
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    await cluster.stop()
    assert tree["uuid"] == "inline" and tree["complete"] is True


async def test_seed_emitter_receives_published_records(
    publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """LogCluster(options, emitter) emits each published record on the emitter under its kind."""
    from async_logging import EventEmitter

    emitter = EventEmitter()
    got: list[tuple[str, str]] = []
    emitter.on("transaction", lambda r: got.append(("transaction", r["uuid"])))
    emitter.on("atomicEvent", lambda r: got.append(("atomicEvent", r["name"])))
    cluster = LogCluster(
        None,
        emitter,
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
    )
    await cluster.start()
    ws = await connect(session, cluster)
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": [*tx("em"), {"name": "solo"}]}))
    assert await answer(ws) == {"ack": 1}
    await wait_for(publisher, lambda p: p.transactions and p.atomic_events)
    await ws.close()
    await cluster.stop()
    assert sorted(got) == [("atomicEvent", "solo"), ("transaction", "em")]


async def test_bad_plugin_is_a_clear_config_error() -> None:
    """A plug-in string that does not import is refused with a ConfigError naming it."""
    from async_logging.exceptions import ConfigError

    with pytest.raises(ConfigError, match="no_such_module"):
        await LogCluster(buffer="no_such_module:Buffer", mon_port=-1).start()


# ------------------------------------------------------------------ the engine's caps


def opened(uuid: str) -> list[dict[str, Any]]:
    """A begin and an atomic event whose end has not come: a tree held open."""
    return tx(uuid)[:-1]


@pytest.mark.parametrize("server_options", [{"max_open": 2}])
async def test_max_open_reaches_the_engine(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """LogCluster(max_open=2): a third open tree pushes the oldest out, published evicted and counted in /metrics."""
    ws = await connect(session, server)
    for seq, uuid in enumerate(["open-a", "open-b", "open-c"]):
        await ws.send_bytes(msgpack.packb({"seq": seq, "logs": opened(uuid)}))
        assert await answer(ws) == {"ack": seq}
    await ws.close()
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    assert (tree["uuid"], tree["complete"], tree["reason"]) == ("open-a", False, "evicted")
    assert server.snapshot()["open_transactions"] == 2
    async with session.get(f"http://127.0.0.1:{server.mon_port}/metrics") as resp:
        text = await resp.text()
    assert "async_logging_evicted_total 1.0" in text
    assert 'async_logging_incomplete_transactions_total{reason="evicted"} 1.0' in text


@pytest.mark.parametrize(
    "server_options",
    [
        {
            "buffer": "test_server:CountingBuffer",
            "max_open": 7,
            "max_events_per_tx": 8,
            "max_tree_depth": 9,
            "max_published_memory": 10,
        }
    ],
)
async def test_a_buffer_class_taking_options_gets_the_engines_caps(server: LogCluster) -> None:
    """A buffer class taking **options is built with every engine limit, under the engine's names."""
    assert server.pipeline is not None and isinstance(server.pipeline.buffer, CountingBuffer)
    built = CountingBuffer.built_with
    assert (built["max_open"], built["max_events_per_tx"]) == (7, 8)
    assert (built["max_depth"], built["max_published_memory"]) == (9, 10)
    assert server.pipeline.buffer.inner.limits.max_depth == 9


class SeedBuffer(CountingBuffer):
    """A buffer plug-in that takes only the seed's three options."""

    def __init__(self, clean_duration: float, clean_cycles: int, settle: float) -> None:
        super().__init__(clean_duration=clean_duration, clean_cycles=clean_cycles, settle=settle)


async def test_a_buffer_class_without_the_caps_works_unless_one_is_set(
    publisher: MemoryPublisher,
) -> None:
    """A buffer class that does not take the caps is built as before; setting a cap it cannot take is a ConfigError, not a cap silently lost."""
    from async_logging.exceptions import ConfigError

    options: dict[str, Any] = {"mon_port": -1, "heartbeat_interval": 0, "store": ""}
    cluster = LogCluster(port=0, buffer=SeedBuffer, publisher=publisher, **options)
    await cluster.start()
    assert cluster.pipeline is not None
    await cluster.pipeline.accept(tx("seed"))
    (tree,) = await wait_for(publisher, lambda p: p.transactions)
    await cluster.stop()
    assert tree["uuid"] == "seed"
    assert set(SeedBuffer.built_with) == {"clean_duration", "clean_cycles", "settle"}
    with pytest.raises(ConfigError, match="SeedBuffer does not take option max_open"):
        await LogCluster(port=0, buffer=SeedBuffer, max_open=5, **options).start()
