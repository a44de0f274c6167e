"""Context that crosses services (issue 14, item 3): W3C ``traceparent`` in the web
middlewares, outgoing calls instrumented (httpx, requests, aiohttp's client), and
OpenTelemetry's current span joined.

The network tests run real services on free ports (aiohttp's test server, a Flask app on
``wsgiref``), each logging through its own :class:`LogClient` to one real in-process proxy,
and read the trees the proxy publishes: a request through two services is ONE tree, the
downstream's ``URL`` transaction below the caller's ``HTTP`` one, complete, nothing
``late``, whichever service's frame reaches the proxy first; a call to a service that does
not join holds nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import aiohttp
import httpx
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer
from flask import Flask
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from async_logging.client import (
    AsyncLoggingMiddleware,
    LogClient,
    aiohttp_setup,
    flask_setup,
    registry,
)
from async_logging.client import propagation as prop
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from client_trees import capturing_client
from conftest import TIMEOUT
from helpers import walk

#: Well under the engine's timeout (180 s by default): a tree held for a child that never
#: comes could not be published within it.
PROMPT = 5.0

CALLER_SPAN = "00f067aa0ba902b7"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-{CALLER_SPAN}-01"


@pytest.fixture(autouse=True)
def instrumented() -> Iterator[None]:
    prop.instrument_httpx()
    prop.instrument_requests()
    try:
        yield
    finally:
        prop.uninstrument()
        prop.use_opentelemetry(False)


class Services:
    """Clients of the proxy on ``port`` and apps on free ports, all closed after the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.clients: list[LogClient] = []
        self.servers: list[TestServer] = []

    def client(self, **options: Any) -> LogClient:
        """A client to the proxy (never the default one: each service passes its own)."""
        options = {"drain_interval": 0.01, "exit_timeout": 0, **options}
        self.clients.append(LogClient(url=f"ws://127.0.0.1:{self.port}/", **options))
        return self.clients[-1]

    async def serve(self, app: web.Application) -> str:
        """Run ``app`` on a free port; its base URL."""
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
        for client in self.clients:
            await client.aclose(1.0)


@pytest.fixture
async def services(server: LogCluster) -> AsyncIterator[Services]:
    previous = registry.default.client
    made = Services(server.port)
    try:
        yield made
    finally:
        await made.close()
        registry.default.client = previous


def the_tree(publisher: MemoryPublisher, uuid: str) -> dict[str, Any]:
    """The one record of ``uuid`` the proxy published: nothing else of it, nothing late."""
    mine = [r for r in publisher.records if r.get("uuid") == uuid]
    assert len(mine) == 1, mine
    assert not any(n.get("late") for n in walk(mine[0]))
    return mine[0]


async def wait_tree(publisher: MemoryPublisher, uuid: str) -> dict[str, Any]:
    await asyncio.to_thread(
        publisher.wait_for, lambda p: any(r.get("uuid") == uuid for r in p.records), TIMEOUT
    )
    return the_tree(publisher, uuid)


def only(node: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [c for c in node["children"] if c["kind"] == kind]


# --------------------------------------------------------------------------- headers


def test_a_valid_traceparent_parses_and_a_later_version_may_append_fields() -> None:
    assert prop.parse_traceparent(TRACEPARENT) == (TRACE, CALLER_SPAN, "01")
    assert prop.parse_traceparent(f"cc-{TRACE}-{CALLER_SPAN}-00-what-next") == (
        TRACE,
        CALLER_SPAN,
        "00",
    )


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("x" * (prop.MAX_TRACEPARENT_LENGTH + 1), "too_long"),
        (f"00-{TRACE.upper()}-{CALLER_SPAN}-01", "bad_format"),
        (f"00-{TRACE}-{CALLER_SPAN}", "bad_format"),
        (f"00-{TRACE}-{CALLER_SPAN}-01-extra", "bad_version"),
        (f"ff-{TRACE}-{CALLER_SPAN}-01", "bad_version"),
        (f"00-{'0' * 32}-{CALLER_SPAN}-01", "zero_trace_id"),
        (f"00-{TRACE}-{'0' * 16}-01", "zero_span_id"),
    ],
)
def test_a_bad_traceparent_is_ignored_and_counted_by_reason(header: str, reason: str) -> None:
    before = dict(prop.refused)
    assert prop.parse_traceparent(header) is None
    assert prop.incoming("rid", header) == ("rid", None, None)
    assert {k: v - before[k] for k, v in prop.refused.items() if v != before[k]} == {reason: 2}


def test_incoming_joins_the_trace_and_keeps_the_request_id_that_stands_for_it() -> None:
    """traceparent: the trace id (or the X-Request-ID whose trace id it is) as uuid, the
    caller's span as parent, a new 16-hex span id; X-Request-ID alone: as before."""
    join = prop.incoming(None, TRACEPARENT)
    assert (join.uuid, join.parent, join.joined) == (TRACE, CALLER_SPAN, True)
    assert join.event is not None and len(join.event) == 16 and int(join.event, 16)
    hashed = prop.trace_id_of("order-42")
    assert len(hashed) == 32 and hashed != TRACE
    assert prop.incoming("order-42", f"00-{hashed}-{CALLER_SPAN}-01").uuid == "order-42"
    assert prop.incoming("order-42", TRACEPARENT).uuid == TRACE  # another trace's id
    assert prop.incoming(TRACE.upper(), TRACEPARENT).uuid == TRACE.upper()
    assert prop.incoming("order-42", None) == ("order-42", None, None)


def test_asgi_middleware_joins_the_callers_tree_and_answers_traceresponse() -> None:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({})

    async def call(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as h:
            return await h.get("/item", headers=headers)

    with capturing_client() as (client, capture):
        app = AsyncLoggingMiddleware(Starlette(routes=[Route("/item", item)]), client=client)
        joined = asyncio.run(call({"traceparent": TRACEPARENT}))
        alone = asyncio.run(call({}))
        assert client.flush(TIMEOUT)
        begins = [e for e in capture.events if e["clazz"] == "begin"]
    assert [(b["uuid"], b["parent"]) for b in begins] == [
        (TRACE, CALLER_SPAN),
        (begins[1]["uuid"], 0),
    ]
    assert joined.headers["traceresponse"] == f"00-{TRACE}-{begins[0]['event']}-01"
    assert joined.headers["x-request-id"] == TRACE
    assert "traceresponse" not in alone.headers


def test_a_wrapped_asgi_transport_carries_the_context_into_the_app() -> None:
    """``traced_transport``: a call through ``httpx.ASGITransport`` (not a default transport,
    so ``instrument_httpx`` does not see it) made inside a transaction is an ``HTTP``
    transaction, and the ASGI app's middleware joins it: one tree."""

    async def item(request: Request) -> JSONResponse:
        return JSONResponse({})

    with capturing_client() as (client, capture):
        app = AsyncLoggingMiddleware(Starlette(routes=[Route("/item", item)]), client=client)

        async def call() -> httpx.Response:
            transport = prop.traced_transport(httpx.ASGITransport(app=app))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as h:
                with client.transaction("URL", "/caller"):
                    return await h.get("/item")

        assert asyncio.run(call()).status_code == 200
        assert client.flush(TIMEOUT)
        begins = [e for e in capture.events if e["clazz"] == "begin"]
    assert len(begins) == 3
    caller, http, downstream = (
        next(b for b in begins if b["name"] == "/caller"),
        next(b for b in begins if b["type"] == "HTTP"),
        next(b for b in begins if b["name"] == "/item"),
    )
    assert caller["uuid"] == http["uuid"] == downstream["uuid"]
    assert http["parent"] == caller["event"] and downstream["parent"] == http["event"]


def test_a_wrapped_sync_transport_sends_traceparent_and_a_default_one_is_not_wrapped() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(204)

    with capturing_client() as (client, capture):
        with httpx.Client(transport=prop.traced_transport(httpx.MockTransport(handler))) as h:
            with client.transaction("URL", "/c"):
                assert h.get("http://x/y").status_code == 204
            h.get("http://x/outside")  # no transaction: no header
        assert client.flush(TIMEOUT)
        (http,) = [e for e in capture.events if e["clazz"] == "begin" and e["type"] == "HTTP"]
    assert seen == [f"00-{http['uuid']}-{http['event']}-01", None]
    default = httpx.HTTPTransport()  # instrument_httpx patched its class already
    assert prop.traced_transport(default) is default
    with pytest.raises(TypeError, match="not an httpx transport"):
        prop.traced_transport(object())


# --------------------------------------------------------------------------- two services


async def get(url: str, headers: dict[str, str] | None = None, **session: Any) -> Any:
    """GET ``url`` with aiohttp's client; the response's status and headers."""
    async with aiohttp.ClientSession(**session) as s, s.get(url, headers=headers) as r:
        return r.status, r.headers


def stock_service(client_b: LogClient) -> web.Application:
    """Service B: a nested DB transaction with a row event, per request."""

    async def stock(request: web.Request) -> web.Response:
        with client_b.transaction("DB", "select stock"):
            client_b.event("LOG", "row", msg=request.match_info["item"])
        return web.json_response({"item": request.match_info["item"], "stock": 3})

    app = web.Application()
    app.router.add_get("/stock/{item}", stock)
    aiohttp_setup(app, client_b)
    return app


def shop_service(client_a: LogClient, downstream: str) -> web.Application:
    """Service A: calls ``downstream`` with instrumented httpx inside its request."""

    async def order(request: web.Request) -> web.Response:
        client_a.event("LOG", "calling", msg=downstream)
        async with httpx.AsyncClient(timeout=TIMEOUT) as h:
            r = await h.get(f"{downstream}/stock/{request.match_info['item']}")
        return web.json_response({"stock": r.status_code})

    app = web.Application()
    app.router.add_get("/order/{item}", order)
    aiohttp_setup(app, client_a)
    return app


def check_two_services(tree: dict[str, Any], item: str) -> dict[str, Any]:
    """A's URL root > [LOG calling, HTTP] ; HTTP > B's URL > DB > LOG row; all complete."""
    assert tree["complete"] is True and tree["type"] == "URL" and tree["name"] == "/order/{item}"
    [call] = only(tree, "transaction")
    assert [c["name"] for c in only(tree, "atomicEvent")] == ["calling"]
    assert call["type"] == "HTTP" and call["name"].startswith("GET http://127.0.0.1:")
    assert call["status_code"] == 200 and call["childCount"] == 1
    [downstream] = call["children"]
    assert downstream["type"] == "URL" and downstream["name"] == "/stock/{item}"
    assert downstream["parent"] == call["event"] and downstream["status_code"] == 200
    [db] = downstream["children"]
    assert db["name"] == "select stock" and [c["msg"] for c in db["children"]] == [item]
    assert all(n["complete"] for n in walk(tree) if n["kind"] == "transaction")
    return downstream


@pytest.mark.parametrize("first", ["caller", "downstream"])
async def test_a_request_through_two_services_is_one_complete_tree_in_either_order(
    services: Services, publisher: MemoryPublisher, first: str
) -> None:
    """Both clients hold their events until flushed, in the order given: the caller's
    frame first (its HTTP end counts the remote child, so the tree waits for it instead of
    coming out without it) or the downstream's first (its root waits for its parent). One
    tree either way, complete, published at once after the second frame, nothing late."""
    client_a = services.client(drain_interval=TIMEOUT)
    client_b = services.client(drain_interval=TIMEOUT)
    a = await services.serve(shop_service(client_a, await services.serve(stock_service(client_b))))
    status, headers = await get(f"{a}/order/7")
    assert status == 200
    uuid = headers["X-Request-ID"]
    one, two = (client_a, client_b) if first == "caller" else (client_b, client_a)
    assert await one.aflush(TIMEOUT)
    assert not [r for r in publisher.records if r.get("uuid") == uuid]
    t0 = time.monotonic()
    assert await two.aflush(TIMEOUT)
    tree = await wait_tree(publisher, uuid)
    took = time.monotonic() - t0
    assert took < PROMPT, took
    check_two_services(tree, "7")
    assert len(uuid) == 32 and tree["uuid"] == uuid


async def test_an_x_request_id_that_is_not_a_trace_id_still_makes_one_tree(
    services: Services, publisher: MemoryPublisher
) -> None:
    """A's tree took its uuid from an X-Request-ID ("order-42", not 32 hex): the call
    carries it beside a traceparent of its hashed trace id, and B joins that uuid."""
    b = await services.serve(stock_service(services.client()))
    a = await services.serve(shop_service(services.client(), b))
    status, headers = await get(f"{a}/order/8", {"X-Request-ID": "order-42"})
    assert status == 200 and "traceresponse" not in headers
    tree = await wait_tree(publisher, "order-42")
    downstream = check_two_services(tree, "8")
    assert downstream["uuid"] == "order-42"


async def test_a_call_to_a_service_that_does_not_join_holds_nothing(
    services: Services, publisher: MemoryPublisher
) -> None:
    """The downstream gets the traceparent but logs nothing and answers no traceresponse:
    the caller's HTTP end counts no child and its tree is published as soon as it is in."""
    seen: list[str | None] = []

    async def stock(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({})

    plain = web.Application()
    plain.router.add_get("/stock/{item}", stock)
    client_a = services.client(drain_interval=TIMEOUT)
    a = await services.serve(shop_service(client_a, await services.serve(plain)))
    uuid = (await get(f"{a}/order/9"))[1]["X-Request-ID"]
    t0 = time.monotonic()
    assert await client_a.aflush(TIMEOUT)
    tree = await wait_tree(publisher, uuid)
    took = time.monotonic() - t0
    assert took < PROMPT, took
    [call] = only(tree, "transaction")
    assert call["childCount"] == 0 and call["children"] == [] and tree["complete"] is True
    assert seen == [f"00-{uuid}-{call['event']}-01"]


# --------------------------------------------------------------------------- requests, aiohttp


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flask_service() -> Iterator[Callable[[LogClient], str]]:
    """A Flask service B (flask_setup) on wsgiref in a thread; yields a starter."""
    servers: list[Any] = []

    def start(client_b: LogClient) -> str:
        app = Flask("stock")

        @app.get("/stock/<item>")
        def stock(item: str) -> dict[str, Any]:
            client_b.event("LOG", "row", msg=item)
            return {"item": item}

        flask_setup(app, client_b)
        httpd = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
        httpd.timeout = TIMEOUT
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}"

    try:
        yield start
    finally:
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()


async def test_requests_calls_carry_the_context_to_a_wsgi_service(
    services: Services, publisher: MemoryPublisher, flask_service: Callable[[LogClient], str]
) -> None:
    client_a = services.client()
    base = flask_service(services.client())

    def job() -> str:
        with client_a.transaction("API", "nightly job") as tx:
            assert requests.get(f"{base}/stock/5", timeout=TIMEOUT).status_code == 200
        return tx.uuid

    uuid = await asyncio.to_thread(job)
    tree = await wait_tree(publisher, uuid)
    [call] = only(tree, "transaction")
    assert call["type"] == "HTTP" and call["childCount"] == 1
    [downstream] = call["children"]
    assert downstream["name"] == "/stock/<item>" and downstream["parent"] == call["event"]
    assert [c["msg"] for c in downstream["children"]] == ["5"] and tree["complete"] is True


async def test_aiohttp_client_counts_every_hop_of_a_redirect(
    services: Services, publisher: MemoryPublisher
) -> None:
    """aiohttp_trace_config(): one HTTP transaction for the request; B answers the old
    URL with a redirect and the new one with the item, both joined below it, both
    counted (the redirect's traceresponse too), one complete tree."""
    client_a, client_b = services.client(), services.client()

    async def old(request: web.Request) -> web.Response:
        raise web.HTTPFound("/new")

    async def new(request: web.Request) -> web.Response:
        client_b.event("LOG", "served")
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/old", old)
    app.router.add_get("/new", new)
    aiohttp_setup(app, client_b)
    b = await services.serve(app)
    async with client_a.transaction("API", "sync") as tx:
        status, _ = await get(f"{b}/old", trace_configs=[prop.aiohttp_trace_config()])
        assert status == 200
    tree = await wait_tree(publisher, tx.uuid)
    [call] = only(tree, "transaction")
    assert call["childCount"] == 2 and call["status_code"] == 200
    assert sorted(c["name"] for c in call["children"]) == ["/new", "/old"]
    assert all(c["parent"] == call["event"] for c in call["children"])


def test_a_call_outside_every_transaction_is_left_alone() -> None:
    headers: dict[str, str] = {}
    assert prop.begin_call("GET", "http://x/", headers) is None and headers == {}


# --------------------------------------------------------------------------- OpenTelemetry


async def test_a_transaction_inside_an_opentelemetry_span_joins_its_trace(
    server: LogCluster, services: Services, publisher: MemoryPublisher
) -> None:
    """use_opentelemetry(): the transaction takes the current span's trace id and span id;
    the SDK exports the span to the proxy over OTLP; one tree, the span its root and the
    transaction below it."""
    client = services.client()
    provider = TracerProvider()
    endpoint = f"http://127.0.0.1:{server.port}/v1/traces"
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer = provider.get_tracer("shop")
    prop.use_opentelemetry()

    def work() -> tuple[str, str]:
        with tracer.start_as_current_span("checkout") as span:
            with client.transaction("API", "reserve") as tx:
                client.event("LOG", "reserved")
            assert client.flush(TIMEOUT)  # the transaction reaches the proxy first
            ctx = span.get_span_context()
            assert (tx.uuid, tx.parent) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
        return tx.uuid, f"{ctx.span_id:016x}"

    try:
        uuid, span_id = await asyncio.to_thread(work)
        tree = await wait_tree(publisher, uuid)
    finally:
        provider.shutdown()
    assert tree["name"] == "checkout" and tree["event"] == span_id and tree["complete"] is True
    [reserve] = only(tree, "transaction")
    assert reserve["name"] == "reserve" and [c["name"] for c in reserve["children"]] == ["reserved"]
