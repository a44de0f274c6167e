"""The web middlewares in real frameworks: Starlette (ASGI), aiohttp, Flask and bare WSGI.

Each app runs in-process (httpx's ASGI transport, aiohttp's test server on a free port,
werkzeug's test client) and logs through a client over the in-memory CaptureTransport, so
what is asserted is exactly what would reach the proxy: for every request a tree whose
root carries the response's status_code, and for an unhandled exception its ``Exception``
child (class, message, traceback with the cause), the 500 response carrying X-Request-ID.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from flask import Flask, abort, stream_with_context
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.test import Client

from async_logging.client import (
    AsyncLoggingMiddleware,
    LogClient,
    WSGIMiddleware,
    aiohttp_setup,
    event,
    flask_setup,
    transaction,
)
from async_logging.client.testing import CaptureTransport
from client_trees import (
    CheckoutError,
    assert_error_child,
    assert_request,
    capturing_client,
    check_shop,
    fail,
    request_trees,
)
from conftest import TIMEOUT


@pytest.fixture
def client() -> Iterator[tuple[LogClient, CaptureTransport]]:
    with capturing_client() as pair:
        yield pair


# --------------------------------------------------------------------------- ASGI (Starlette)


async def item(request: Request) -> JSONResponse:
    event("DB", "row", msg=request.path_params["item_id"])
    return JSONResponse({"id": request.path_params["item_id"]})


async def missing(request: Request) -> JSONResponse:
    raise HTTPException(404)


async def boom(request: Request) -> JSONResponse:
    event("DB", "before the error")
    fail()
    raise AssertionError("not reached")


ROUTES = [Route("/items/{item_id}", item), Route("/missing", missing), Route("/boom", boom)]


async def get_all(app: Any) -> dict[str, httpx.Response]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=TIMEOUT) as h:
        return {p: await h.get(p) for p in ("/items/7", "/missing", "/boom")}


async def test_asgi_wrapping_the_app_puts_the_request_id_on_the_500_and_reports_the_error(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """AsyncLoggingMiddleware(Starlette(...)), the documented one line: the 500 page from
    Starlette's ServerErrorMiddleware carries X-Request-ID; the tree has status_code 500
    and the Exception child with its cause; 200 and 404 carry their status_code."""
    app = AsyncLoggingMiddleware(Starlette(routes=ROUTES), client=client[0])
    responses = await get_all(app)
    assert [r.status_code for r in responses.values()] == [200, 404, 500]
    assert all(r.headers.get("x-request-id") for r in responses.values())
    ids = [r.headers["x-request-id"] for r in responses.values()]
    roots = await asyncio.to_thread(check_shop, *client, ids, "/items/{item_id}", "7")
    error = roots[ids[2]]
    assert [c["name"] for c in error.atomic("DB")] == ["before the error"]


async def test_asgi_added_inside_the_framework_still_reports_the_error(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """app.add_middleware(): inside ServerErrorMiddleware the 500 goes out without the id
    (as documented), but the tree still has status_code 500 and the Exception child."""
    app = Starlette(routes=ROUTES)
    app.add_middleware(AsyncLoggingMiddleware, client=client[0])
    responses = await get_all(app)
    assert responses["/boom"].status_code == 500
    assert "x-request-id" not in responses["/boom"].headers
    roots = await asyncio.to_thread(request_trees, *client)
    [error] = [t for t in roots.values() if t.begin and t.begin["path"] == "/boom"]
    assert_request(error, "/boom", "CheckoutError", 500)
    assert_error_child(error)


# --------------------------------------------------------------------------- aiohttp


async def test_aiohttp_setup_puts_the_request_id_on_aiohttps_own_500(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """aiohttp_setup(app): aiohttp answers the unhandled exception outside every middleware,
    yet its 500 carries X-Request-ID; the tree has status_code 500 and the Exception child;
    a TimeoutError is answered 504 and logged so; 200 and 404 carry their status_code."""

    async def user(request: web.Request) -> web.Response:
        event("DB", "user", msg=request.match_info["uid"])
        return web.json_response({})

    async def nowhere(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def crash(request: web.Request) -> web.Response:
        fail()
        raise AssertionError("not reached")

    async def slow(request: web.Request) -> web.Response:
        raise TimeoutError

    app = web.Application()
    app.router.add_get("/users/{uid}", user)
    app.router.add_get("/missing", nowhere)
    app.router.add_get("/boom", crash)
    app.router.add_get("/slow", slow)
    aiohttp_setup(app, client[0])
    codes: dict[str, int] = {}
    ids: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        TestServer(app, host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        for path in ("/users/42", "/missing", "/boom", "/slow"):
            async with session.get(f"http://127.0.0.1:{server.port}{path}") as r:
                codes[path], ids[path] = r.status, r.headers["X-Request-ID"]
    assert codes == {"/users/42": 200, "/missing": 404, "/boom": 500, "/slow": 504}
    roots = await asyncio.to_thread(request_trees, *client)
    assert_request(roots[ids["/users/42"]], "/users/{uid}", "0", 200)
    assert_request(roots[ids["/missing"]], "/missing", "404", 404)
    assert roots[ids["/missing"]].atomic("Exception") == []
    error = roots[ids["/boom"]]
    assert_request(error, "/boom", "CheckoutError", 500)
    assert_error_child(error)
    timed_out = roots[ids["/slow"]]
    assert_request(timed_out, "/slow", "TimeoutError", 504)
    assert [e["name"] for e in timed_out.atomic("Exception")] == ["TimeoutError"]


# --------------------------------------------------------------------------- Flask and WSGI


def flask_app() -> Flask:
    app = Flask("shop")

    @app.get("/items/<int:item_id>")
    def flask_item(item_id: int) -> dict[str, int]:
        event("DB", "row", msg=str(item_id))
        return {"id": item_id}

    @app.get("/missing")
    def flask_missing() -> str:
        abort(404)

    @app.get("/boom")
    def flask_boom() -> str:
        with transaction("API", "charge"):
            fail()
        return "not reached"

    @app.get("/stream")
    def flask_stream() -> Any:
        def body() -> Iterator[str]:
            yield "a"
            event("STREAM", "between chunks")
            yield "b"

        return stream_with_context(body())

    return app


def test_flask_setup_reports_the_exception_flask_turns_into_its_500(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """flask_setup(app), one line: Flask's own 500 page carries X-Request-ID; the request's
    tree has status_code 500, the Exception child with its cause (and so has the nested
    transaction it left), transactions named by URL rule; 200 and 404 carry their code."""
    app = flask_app()
    flask_setup(app, client[0])
    http = app.test_client()
    responses = {p: http.get(p) for p in ("/items/3", "/missing", "/boom")}
    for r in responses.values():
        r.close()  # what a WSGI server does once the body is sent: the transaction ends
    assert [r.status_code for r in responses.values()] == [200, 404, 500]
    assert all(r.headers.get("X-Request-ID") for r in responses.values())
    ids = [r.headers["X-Request-ID"] for r in responses.values()]
    roots = check_shop(*client, ids, "/items/<int:item_id>", "3")
    [charge] = roots[ids[2]].nested()
    assert charge.end is not None and charge.end["status"] == "CheckoutError"
    assert_error_child(charge)


def test_a_streamed_flask_body_belongs_to_its_request(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """The transaction lasts until the server closes the body: an event logged between two
    chunks is a child of the request."""
    app = flask_app()
    flask_setup(app, client[0])
    response = app.test_client().get("/stream")
    assert response.get_data() == b"ab"
    response.close()
    [root] = request_trees(*client).values()
    assert_request(root, "/stream", "0", 200)
    assert [c["name"] for c in root.atomic("STREAM")] == ["between chunks"]


def test_bare_wsgi_an_exception_escaping_the_app_or_its_body_is_reported(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """A WSGI app with no error handling of its own: an exception escaping the call (the
    server answers 500) gives status_code 500 and the Exception child; one raised while the
    body is iterated keeps the status already sent and reports the exception too; a given
    X-Request-ID is the uuid and is not echoed."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        path = environ["PATH_INFO"]
        if path == "/boom":
            fail()
        start_response("200 OK", [("Content-Type", "text/plain")])
        if path == "/broken-body":
            return broken_body()
        return iter([b"ok"])

    def broken_body() -> Iterator[bytes]:
        yield b"half"
        fail()

    http = Client(WSGIMiddleware(app, client[0]))
    ok = http.get("/fine", headers={"X-Request-ID": "given-1"})
    assert ok.status_code == 200 and "X-Request-ID" not in ok.headers
    ok.close()
    with pytest.raises(CheckoutError):
        http.get("/boom")
    broken = http.get("/broken-body")
    with pytest.raises(CheckoutError):
        broken.get_data()
    broken.close()
    roots = request_trees(*client)
    assert_request(roots["given-1"], "/fine", "0", 200)
    [boom_tx] = [t for t in roots.values() if t.begin and t.begin["path"] == "/boom"]
    assert_request(boom_tx, "/boom", "CheckoutError", 500)
    assert_error_child(boom_tx)
    [half] = [t for t in roots.values() if t.begin and t.begin["path"] == "/broken-body"]
    assert_request(half, "/broken-body", "CheckoutError", 200)
    assert_error_child(half)
