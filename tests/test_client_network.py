"""The client against a real proxy (LogCluster on free ports) and real web apps.

Every wait is bounded by TIMEOUT (conftest) and waits on a condition (the publisher's
``wait_for``, a flush, a logging handler's event), never on a fixed sleep. Flushes run in a
worker thread (``aflush``) because the proxy shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from async_logging.client import (
    AsyncLoggingMiddleware,
    HeartbeatMonitor,
    HttpTransport,
    LogClient,
    LogHandler,
    WebSocketOtherwiseHttpTransport,
    aiohttp_middleware,
    backoff,
    event,
    registry,
    transaction,
)
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import free_port


def fast_backoff() -> Iterator[float]:
    """Reconnection delays short enough for tests (10 ms doubling to 200 ms)."""
    return backoff(0.01, 2.0, 0.2, jitter=0.5)


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., LogClient]]:
    """Builds clients that become the default one; closes them and restores the default after."""
    previous = registry.default.client
    made: list[LogClient] = []

    def make(url: str, **options: Any) -> LogClient:
        options.setdefault("drain_interval", 0.01)
        options.setdefault("backoff", fast_backoff)
        client = LogClient(url=url, exit_timeout=0, default=True, **options)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.aclose(1.0)
        registry.default.client = previous


async def wait_for(publisher: MemoryPublisher, predicate: Callable[[MemoryPublisher], Any]) -> Any:
    return await asyncio.to_thread(publisher.wait_for, predicate, TIMEOUT)


def children_ids(node: dict[str, Any]) -> list[str]:
    """Every event id below ``node``, recursively (duplicates kept, to find them)."""
    out = []
    for child in node.get("children", ()):
        out.append(child["event"])
        out.extend(children_ids(child))
    return out


def log_tree(i: int) -> None:
    """One request-shaped tree of 7 events: root, 2 events, a nested transaction with 1 event."""
    with transaction("URL", f"/r{i}"):
        event("DB", "a", msg=str(i))
        event("DB", "b")
        with transaction("API", "inner"):
            event("HTTP", "c")


def check_tree(tx: dict[str, Any], i: int | None = None) -> None:
    """The shape log_tree() logs, complete, each child once."""
    assert tx["complete"] is True and tx["status"] == "0", tx
    if i is not None:
        assert tx["name"] == f"/r{i}"
    kinds = [(c["kind"], c["name"]) for c in tx["children"]]
    assert sorted(kinds) == [("atomicEvent", "a"), ("atomicEvent", "b"), ("transaction", "inner")]
    inner = next(c for c in tx["children"] if c["kind"] == "transaction")
    assert [c["name"] for c in inner["children"]] == ["c"] and inner["complete"] is True
    ids = children_ids(tx)
    assert len(ids) == len(set(ids)) == 4


# --------------------------------------------------------------------------- transports


async def test_websocket_client_delivers_complete_trees(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """Over the default WebSocket transport, each transaction is published as one complete tree."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    for i in range(20):
        log_tree(i)
    event("LOG", "alone", msg="stand-alone")
    assert await client.aflush(TIMEOUT)
    txs = await wait_for(
        publisher, lambda p: len(p.transactions) >= 20 and p.atomic_events and p.transactions
    )
    for i, tx in enumerate(sorted(txs, key=lambda t: int(t["name"][2:]))):
        check_tree(tx, i)
        assert tx["pid"] and tx["machine"] == client.machine
    [alone] = publisher.atomic_events
    assert alone["msg"] == "stand-alone" and "uuid" not in alone
    s = client.stats
    assert s.sent == s.acked == 20 * 7 + 1 and s.queued == 0 and s.connected
    assert server.stats.frames["ws"] >= 1


async def test_http_transport_posts_envelopes(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """HttpTransport posts MessagePack envelopes to /log; the 200 answers are the acks."""
    client = make_client(f"http://127.0.0.1:{server.port}", transport=HttpTransport())
    for i in range(5):
        log_tree(i)
    assert await client.aflush(TIMEOUT)
    txs = await wait_for(publisher, lambda p: len(p.transactions) >= 5 and p.transactions)
    for tx in txs:
        check_tree(tx)
    assert client.stats.acked == 35
    assert server.stats.frames["http"] >= 1 and server.stats.frames["ws"] == 0


async def test_websocket_otherwise_http_uses_the_discovered_websocket_or_falls_back(
    publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """The fallback transport finds the WebSocket with GET /ws, and posts to /log when the upgrade is refused."""
    server = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        conn_threshold=1,
    )
    await server.start()
    try:
        ws_way = WebSocketOtherwiseHttpTransport()
        client = make_client(f"http://127.0.0.1:{server.port}/", transport=ws_way)
        log_tree(0)
        assert await client.aflush(TIMEOUT)
        assert ws_way.last_used == "websocket"
        await client.aclose(TIMEOUT)
        # The only WebSocket slot is taken: the upgrade gets 503, the client posts instead.
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"ws://127.0.0.1:{server.port}/", protocols=("log-protocol",)
            ) as blocker,
        ):
            assert (await blocker.receive(timeout=TIMEOUT)).data == "ready"
            http_way = WebSocketOtherwiseHttpTransport()
            client2 = make_client(f"ws://127.0.0.1:{server.port}/", transport=http_way)
            log_tree(1)
            assert await client2.aflush(TIMEOUT)
            assert http_way.last_used == "http"
        txs = await wait_for(publisher, lambda p: len(p.transactions) >= 2 and p.transactions)
        assert sorted(t["name"] for t in txs) == ["/r0", "/r1"]
        assert server.stats.frames["http"] >= 1
    finally:
        await server.stop()


async def test_events_the_proxy_refuses_are_counted_not_retried(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """An event the proxy rejects is counted in stats.rejected while the rest of its frame is delivered."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    client.log({"clazz": "bogus", "msg": "bad"})
    client.log({"clazz": "atomicEvent", "msg": "good"})
    assert await client.aflush(TIMEOUT)
    [good] = await wait_for(publisher, lambda p: p.atomic_events)
    assert good["msg"] == "good"
    s = client.stats
    assert (s.acked, s.rejected, s.queued) == (1, 1, 0)


# --------------------------------------------------------------------------- web apps


def starlette_app(client: LogClient) -> Starlette:
    app_log = logging.getLogger("app.asgi")

    async def item(request: Request) -> JSONResponse:
        item_id = request.path_params["item_id"]
        async with transaction("DB", "select item"):
            await asyncio.sleep(0)  # a real await: the context must survive it
            event("DB", "row", msg=item_id)
        app_log.info("served %s", item_id)
        return JSONResponse({"id": item_id})

    async def missing(request: Request) -> JSONResponse:
        raise HTTPException(404)

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("boom")

    async def thing(request: Request) -> JSONResponse:
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/missing", missing),
            Route("/boom", boom),
            Mount("/api", routes=[Route("/things/{tid}", thing)]),
        ],
        middleware=[Middleware(AsyncLoggingMiddleware, client=client)],
    )


@pytest.fixture
def app_logging() -> Iterator[None]:
    """Sends the app's stdlib log records through LogHandler."""
    logger = logging.getLogger("app.asgi")
    handler = LogHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)


async def test_1000_concurrent_asgi_requests_each_give_one_complete_correct_tree(
    server: LogCluster,
    publisher: MemoryPublisher,
    make_client: Callable[..., LogClient],
    app_logging: None,
) -> None:
    """1,000 concurrent Starlette requests produce 1,000 complete trees, each with its own children only."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    app = starlette_app(client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as http:
        responses = await asyncio.gather(*(http.get(f"/items/{i}") for i in range(1000)))
    assert all(r.status_code == 200 for r in responses)
    request_ids = {r.headers["x-request-id"]: r.json()["id"] for r in responses}
    assert len(request_ids) == 1000
    assert await client.aflush(TIMEOUT)
    txs = await wait_for(publisher, lambda p: len(p.transactions) >= 1000 and p.transactions)
    assert len(txs) == 1000
    for tx in txs:
        item_id = request_ids[tx["uuid"]]
        assert tx["complete"] is True and tx["kind"] == "transaction"
        assert (tx["type"], tx["name"], tx["status"]) == ("URL", "/items/{item_id}", "0")
        assert (tx["method"], tx["path"], tx["status_code"]) == ("GET", f"/items/{item_id}", 200)
        db = next(c for c in tx["children"] if c["kind"] == "transaction")
        line = next(c for c in tx["children"] if c["kind"] == "atomicEvent")
        assert len(tx["children"]) == 2
        assert db["name"] == "select item" and db["complete"] and db["status"] == "0"
        assert [(c["name"], c["msg"]) for c in db["children"]] == [("row", item_id)]
        assert (line["type"], line["level"], line["msg"]) == ("LOG", "INFO", f"served {item_id}")
        assert line["logger"] == "app.asgi"
    assert client.stats.dropped == 0


async def test_asgi_status_names_and_request_ids(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """Route templates name the transactions (mounts too); 4xx and exceptions set the status; a given X-Request-ID is the uuid."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    app = starlette_app(client)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        missing = await http.get("/missing")
        boom = await http.get("/boom")
        mounted = await http.get("/api/things/7", headers={"X-Request-ID": "req-given-1"})
        unrouted = await http.get("/nowhere")
    assert (missing.status_code, boom.status_code, unrouted.status_code) == (404, 500, 404)
    assert "x-request-id" not in mounted.headers  # given by the caller: not echoed
    assert await client.aflush(TIMEOUT)
    txs = await wait_for(publisher, lambda p: len(p.transactions) >= 4 and p.transactions)
    by_name = {t["name"]: t for t in txs}
    assert by_name["/missing"]["status"] == "404"
    assert by_name["/missing"]["uuid"] == missing.headers["x-request-id"]
    assert by_name["/boom"]["status"] == "RuntimeError"
    assert by_name["/api/things/{tid}"]["uuid"] == "req-given-1"
    assert by_name["/api/things/{tid}"]["status"] == "0"
    assert by_name["/nowhere"]["status"] == "404"


async def test_aiohttp_middleware_logs_one_transaction_per_request(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """The aiohttp middleware names transactions by resource, takes statuses from responses and exceptions, echoes ids."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")

    async def user(request: web.Request) -> web.Response:
        event("DB", "user", msg=request.match_info["uid"])
        return web.json_response({})

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def boom(request: web.Request) -> web.Response:
        raise ValueError("boom")

    app = web.Application(middlewares=[aiohttp_middleware(client)])
    app.router.add_get("/users/{uid}", user)
    app.router.add_get("/missing", missing)
    app.router.add_get("/boom", boom)
    async with TestServer(app) as test_server, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{test_server.port}"
        async with session.get(f"{base}/users/42") as r1:
            assert r1.status == 200
            uid = r1.headers["X-Request-ID"]
        async with session.get(f"{base}/missing") as r2:
            assert r2.status == 404 and r2.headers["X-Request-ID"]
        async with session.get(f"{base}/boom") as r3:
            assert r3.status == 500
        async with session.get(f"{base}/users/7", headers={"X-Request-ID": "given-7"}) as r4:
            assert r4.status == 200 and "X-Request-ID" not in r4.headers
    assert await client.aflush(TIMEOUT)
    txs = await wait_for(publisher, lambda p: len(p.transactions) >= 4 and p.transactions)
    users = [t for t in txs if t["name"] == "/users/{uid}"]
    assert {t["uuid"] for t in users} == {uid, "given-7"}
    first = next(t for t in users if t["uuid"] == uid)
    assert first["status"] == "0" and [c["msg"] for c in first["children"]] == ["42"]
    assert next(t for t in txs if t["name"] == "/missing")["status"] == "404"
    assert next(t for t in txs if t["name"] == "/boom")["status"] == "ValueError"


async def test_a_root_end_a_frame_ahead_of_its_children_waits_for_them(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """The root logs through one client, its children through another flushed later, so the
    root's end reaches the proxy a frame before the children it counted (childCount): the
    proxy holds the tree instead of publishing it, then publishes it whole, nothing late."""
    url = f"ws://127.0.0.1:{server.port}/"
    roots = make_client(url)
    make_client(url)  # the default one now: event() and the nested transaction use it
    with transaction("URL", "/split", client=roots) as root:
        event("DB", "select")
        with transaction("API", "inner"):
            event("HTTP", "call")
    assert await roots.aflush(TIMEOUT)  # begin and end of the root: acked, so fed
    assert server.pipeline is not None and server.pipeline.buffer.open_count == 1
    assert publisher.records == []
    assert await registry.default.client.aflush(TIMEOUT)  # type: ignore[union-attr]
    [tx] = await wait_for(publisher, lambda p: p.transactions)
    assert tx["uuid"] == root.uuid and tx["complete"] is True and tx["childCount"] == 2
    assert sorted(c["name"] for c in tx["children"]) == ["inner", "select"]
    inner = next(c for c in tx["children"] if c["kind"] == "transaction")
    assert [c["name"] for c in inner["children"]] == ["call"] and inner["complete"] is True
    assert len(publisher.records) == 1 and not any(r.get("late") for r in publisher.records)


# --------------------------------------------------------------------------- delivery


async def test_proxy_restart_midstream_loses_no_acked_event_and_doubles_no_child(
    publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """Stopping the proxy mid-stream and starting a new one on its port loses no acked event and doubles no child."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "mon_port": -1,
        "heartbeat_interval": 0,
        "publisher": publisher,
    }
    first = LogCluster(port=0, **options)
    await first.start()
    port = first.port
    client = make_client(f"ws://127.0.0.1:{port}/")
    stop = asyncio.Event()
    produced = 0

    async def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            log_tree(produced)
            produced += 1
            if client.stats.queued > 2000:
                # Backpressure (the queue must not overflow: drops would spoil the count).
                await client.aflush(TIMEOUT)
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    second: LogCluster | None = None
    try:
        await wait_for(publisher, lambda p: len(p.transactions) >= 300)
        await first.stop()
        published_by_first = len(publisher.transactions)
        second = LogCluster(port=port, **options)
        await second.start()
        await wait_for(publisher, lambda p: len(p.transactions) >= published_by_first + 300)
        stop.set()
        await producer
        assert await client.aflush(TIMEOUT)
    finally:
        stop.set()
        await producer
        if second is not None:
            await second.stop()
    s = client.stats
    assert s.dropped == 0 and s.lost == 0 and s.reconnects >= 1, s
    assert s.acked == produced * 7, s
    by_name: dict[str, list[dict[str, Any]]] = {}
    for tx in publisher.transactions:
        by_name.setdefault(tx["name"], []).append(tx)
    # Every tree acked reached a sink, complete; a resent frame whose ack was lost may
    # publish a tree twice (at-least-once), but never a tree with a doubled child.
    assert set(by_name) == {f"/r{i}" for i in range(produced)}
    for name, copies in by_name.items():
        for tx in copies:
            check_tree(tx, int(name[2:]))


def unreachable_client() -> LogClient:
    """A client of 1000 queued events at most whose proxy never answers."""
    return LogClient(
        url=f"ws://127.0.0.1:{free_port()}/",
        max_queue_events=1000,
        backoff=fast_backoff,
        drain_interval=0.01,
        exit_timeout=0,
        default=False,
    )


async def test_the_room_shrinks_before_the_queue_is_emptied() -> None:
    """When the sender moves queued events into its core, the room the app's threads fill
    against already counts them: queued, held and still admissible events never exceed
    max_queue_events (with the old room, the app could admit another max_queue_events
    between the queue emptying and the core's count growing)."""
    client = unreachable_client()
    core = client._sender.core
    feed = core.feed
    worst: list[int] = []
    drained = threading.Event()

    def watching(items: list[Any], now: float) -> Any:
        # the queue was just emptied into `items`; the core does not hold them yet
        worst.append(client.inbox.room + core.pending_events + len(items) + len(client.inbox))
        drained.set()
        return feed(items, now)

    core.feed = watching  # type: ignore[method-assign]
    try:
        for i in range(600):
            client.event("LOG", "x", msg="m", n=i)
        assert await asyncio.to_thread(drained.wait, TIMEOUT)
    finally:
        await client.aclose(0)
    assert worst and max(worst) <= 1000, worst


@pytest.fixture
async def stalled_proxy() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A proxy that takes the connection and answers nothing until its gate opens:
    ``(url, entered, gate)``; ``entered`` is set once a client is waiting on it."""
    entered = asyncio.Event()
    gate = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        entered.set()
        await gate.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"ws://127.0.0.1:{server.port}/", entered, gate
    finally:
        gate.set()
        await server.close()


async def test_a_full_queue_drops_counts_warns_once_and_never_blocks(
    stalled_proxy: tuple[str, asyncio.Event, asyncio.Event],
) -> None:
    """With the sender stuck waiting on the proxy, every log() call returns (before the
    proxy's gate opens), drops past the queue limit are counted, one warning per burst."""
    url, entered, gate = stalled_proxy
    warnings: list[logging.LogRecord] = []
    warned = threading.Event()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "queue full" in record.getMessage():
                warnings.append(record)
                warned.set()

    catch = Catch(logging.WARNING)
    own = logging.getLogger("async_logging.client")
    own.addHandler(catch)
    client = LogClient(
        url=url,
        max_queue_events=1000,
        backoff=fast_backoff,
        drain_interval=0.01,
        exit_timeout=0,
        default=False,
    )
    calls = 20_000

    def log_all() -> None:
        for i in range(calls):
            client.event("LOG", "x", msg="m", n=i)

    try:
        await asyncio.wait_for(entered.wait(), TIMEOUT)  # the sender waits on the network
        # A call that waited on the network would wait for the gate, opened only after.
        await asyncio.wait_for(asyncio.to_thread(log_all), TIMEOUT)
        assert not gate.is_set()
        assert client.stats.dropped >= calls - 1000 - 100
        assert await asyncio.to_thread(warned.wait, TIMEOUT)
        assert not await client.aclose(0.2)  # nothing can be acknowledged
    finally:
        own.removeHandler(catch)
        if not client.closed:  # a failed assertion must not leave its thread retrying
            await client.aclose(0)
    s = client.stats
    assert s.dropped + s.lost == calls and s.acked == 0
    assert s.lost_at_close == s.lost
    [warning] = warnings
    assert f"not connected to {url} yet" in warning.getMessage()


async def test_a_non_retryable_error_makes_the_client_give_up_loudly() -> None:
    """When is_retryable says no, the client records the error, stops sending and counts what it abandons."""
    client = LogClient(
        url=f"ws://127.0.0.1:{free_port()}/",
        is_retryable=lambda exc: False,
        drain_interval=0.01,
        exit_timeout=0,
        default=False,
    )
    client.event("LOG", "x")
    assert not await client.aflush(TIMEOUT)
    assert isinstance(client.error, OSError | aiohttp.ClientError)
    client.event("LOG", "after")
    await client.aclose(TIMEOUT)
    s = client.stats
    assert s.lost + s.dropped == 2 and s.acked == 0


async def test_heartbeat_monitor_sends_cpu_memory_and_gc(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """The monitor logs periodic heartbeats carrying CPU, memory and GC measures."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    monitor = HeartbeatMonitor(client, interval=0.05, service="test")
    with monitor:
        beats = await wait_for(publisher, lambda p: len(p.heartbeats) >= 2 and p.heartbeats)
    hb = beats[0]
    assert hb["kind"] == "heartbeat" and hb["service"] == "test"
    for key in (
        "cpu_percent",
        "rss_bytes",
        "memory_percent",
        "threads",
        "gc_collections",
        "gc_pause_ms",
    ):
        assert key in hb, key
    assert hb["rss_bytes"] > 0 and len(hb["gc_collections"]) == 3
    assert monitor.beats >= 2


async def test_a_token_is_presented_and_a_refused_one_makes_the_client_give_up(
    publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """token= is sent as a Bearer token; a proxy refusing it (401) is not retried: the client gives up loudly."""
    server = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        tokens=("s3cret",),
    )
    await server.start()
    try:
        good = make_client(f"ws://127.0.0.1:{server.port}/", token="s3cret")
        log_tree(0)
        assert await good.aflush(TIMEOUT)
        bad = make_client(f"ws://127.0.0.1:{server.port}/", token="wrong")
        log_tree(1)
        assert not await bad.aflush(TIMEOUT)
        assert isinstance(bad.error, aiohttp.WSServerHandshakeError) and bad.error.status == 401
        assert bad.stats.lost == 7 and bad.stats.acked == 0
        [tx] = await wait_for(publisher, lambda p: p.transactions)
        assert tx["name"] == "/r0"
    finally:
        await server.stop()


async def test_a_full_proxy_spool_delays_frames_instead_of_dropping_them(
    tmp_path: Any, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """An error frame saying spool_full keeps the frame for a later resend: nothing is counted rejected."""
    server = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        spool=str(tmp_path / "spool"),
        spool_max_bytes=64,  # smaller than any frame: every frame is refused for now
    )
    await server.start()
    try:
        client = make_client(f"ws://127.0.0.1:{server.port}/")
        log_tree(0)
        assert not await client.aflush(0.5)
        s = client.stats
        assert s.rejected == 0 and s.acked == 0 and s.queued == 7
        assert s.sent >= 7 * 2 and s.resent >= 7  # tried again, after a backoff
    finally:
        await server.stop()


async def test_a_forked_child_gets_a_sender_of_its_own(
    server: LogCluster, publisher: MemoryPublisher, make_client: Callable[..., LogClient]
) -> None:
    """After os.fork() (a pre-forking server) the child's client starts its own sender and delivers."""
    client = make_client(f"ws://127.0.0.1:{server.port}/")
    event("LOG", "parent")
    assert await client.aflush(TIMEOUT)

    def fork_and_wait() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
        if pid == 0:  # the child: only this thread exists here
            code = 1
            try:
                event("LOG", "child", msg=str(os.getpid()))
                code = 0 if client.flush(TIMEOUT) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    assert await asyncio.to_thread(fork_and_wait) == 0
    records = await wait_for(publisher, lambda p: len(p.atomic_events) >= 2 and p.atomic_events)
    child = next(r for r in records if r["name"] == "child")
    parent = next(r for r in records if r["name"] == "parent")
    assert child["pid"] == int(child["msg"]) != parent["pid"] == os.getpid()


async def test_events_still_queued_at_interpreter_exit_are_flushed(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """A script that logs and exits without close() still delivers: the exit-time flush sends it."""
    script = (
        "import sys\n"
        "from async_logging.client import LogClient, transaction, event\n"
        "LogClient(url=sys.argv[1])\n"
        "with transaction('URL', '/at-exit'):\n"
        "    event('DB', 'last words')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, f"ws://127.0.0.1:{server.port}/"
    )
    assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    [tx] = await wait_for(publisher, lambda p: p.transactions)
    assert tx["name"] == "/at-exit" and [c["name"] for c in tx["children"]] == ["last words"]
