"""DjangoMiddleware in a real Django (minimal settings configured here), sync and async.

Requests go through Django's test clients; the middleware logs through a client over the
in-memory CaptureTransport, so what is asserted is exactly what would reach the proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import path

from async_logging.client import LogClient, event, transaction
from async_logging.client.testing import CaptureTransport
from client_trees import (
    assert_error_child,
    assert_request,
    capturing_client,
    check_shop,
    fail,
    request_trees,
)

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="test-only",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["async_logging.client.django_middleware.DjangoMiddleware"],
        INSTALLED_APPS=[],
        LOGGING_CONFIG=None,  # Django's 500 log lines stay out of the test's output
    )
    django.setup()

from django.test import AsyncClient, Client


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    event("DB", "row", msg=str(item_id))
    return JsonResponse({"id": item_id})


def missing(request: HttpRequest) -> JsonResponse:
    raise Http404("no such page")


def boom(request: HttpRequest) -> JsonResponse:
    with transaction("API", "charge"):
        fail()
    raise AssertionError("not reached")


async def async_item(request: HttpRequest, item_id: int) -> JsonResponse:
    await asyncio.sleep(0)
    event("DB", "row", msg=str(item_id))
    return JsonResponse({"id": item_id})


async def async_boom(request: HttpRequest) -> JsonResponse:
    await asyncio.sleep(0)
    fail()
    raise AssertionError("not reached")


urlpatterns = [
    path("items/<int:item_id>", item),
    path("missing", missing),
    path("boom", boom),
    path("async/items/<int:item_id>", async_item),
    path("async/boom", async_boom),
]


@pytest.fixture
def client() -> Iterator[tuple[LogClient, CaptureTransport]]:
    with capturing_client() as pair:
        yield pair


def test_django_sync_requests_and_the_500_page(client: tuple[LogClient, CaptureTransport]) -> None:
    """Django's own 500 page (the exception turned into a response inside) carries
    X-Request-ID, and the tree has status_code 500 and the Exception child with its cause,
    got from got_request_exception; names are the URL routes; 200 and 404 carry their code;
    a given X-Request-ID is the uuid and is not echoed."""
    http = Client(raise_request_exception=False)
    responses = {p: http.get(p) for p in ("/items/5", "/missing", "/boom")}
    given = http.get("/items/6", headers={"X-Request-ID": "given-6"})
    assert [r.status_code for r in responses.values()] == [200, 404, 500]
    assert all(r.headers.get("X-Request-ID") for r in responses.values())
    assert given.status_code == 200 and "X-Request-ID" not in given.headers
    ids = [r.headers["X-Request-ID"] for r in responses.values()]
    roots = check_shop(*client, ids, "/items/<int:item_id>", "5")
    [charge] = roots[ids[2]].nested()
    assert charge.end is not None and charge.end["status"] == "CheckoutError"
    assert_request(roots["given-6"], "/items/<int:item_id>", "0", 200)


async def test_django_async_requests_and_the_500_page(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """Through Django's async stack (ASGI handler, async views) the middleware runs as a
    coroutine: children of async views join the request, and the 500 is reported alike."""
    http = AsyncClient(raise_request_exception=False)
    ok_response = await http.get("/async/items/8")
    error_response = await http.get("/async/boom")
    assert (ok_response.status_code, error_response.status_code) == (200, 500)
    roots: dict[str, Any] = await asyncio.to_thread(request_trees, *client)
    ok = roots[ok_response.headers["X-Request-ID"]]
    assert_request(ok, "/async/items/<int:item_id>", "0", 200)
    assert [c["msg"] for c in ok.atomic("DB")] == ["8"]
    error = roots[error_response.headers["X-Request-ID"]]
    assert_request(error, "/async/boom", "CheckoutError", 500)
    assert_error_child(error)


def test_django_joins_the_callers_tree_from_traceparent(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """A W3C traceparent: the request's transaction takes the trace id as uuid and the
    caller's span as parent, and the response names its own span in traceresponse."""
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = Client().get("/items/3", headers={"traceparent": f"00-{trace}-{span}-01"})
    assert client[0].flush(5)
    [begin] = [e for e in client[1].events if e["clazz"] == "begin"]
    assert (begin["uuid"], begin["parent"], begin["name"]) == (trace, span, "/items/3")
    assert response.headers["traceresponse"] == f"00-{trace}-{begin['event']}-01"
    assert response.headers["X-Request-ID"] == trace
