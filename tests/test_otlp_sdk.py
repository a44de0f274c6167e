"""The real thing: the OpenTelemetry SDK exporting to the proxy over OTLP/HTTP (issue 14, item 4).

Two services in the test, each with its own ``TracerProvider`` and ``LoggerProvider`` and
the SDK's OTLP/HTTP exporters pointed at the proxy: the first handles two orders at once
with nested spans and calls the second through an httpx client instrumented by
``opentelemetry-instrumentation-httpx`` (which sends ``traceparent``); the second continues
the trace from that header. Both log through the standard library into the OTel logs
bridge. Every provider is flushed (in the order a real deployment gives no guarantee of),
and the proxy publishes one complete tree per trace, both services' spans and every log
record inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import walk


@dataclass
class Service:
    """One instrumented service: its tracer and logger providers, a tracer, a logger."""

    tracer_provider: TracerProvider
    logger_provider: LoggerProvider
    tracer: trace.Tracer
    log: logging.Logger

    def flush(self) -> None:
        assert self.tracer_provider.force_flush(int(TIMEOUT * 1000))
        assert self.logger_provider.force_flush(int(TIMEOUT * 1000))

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()


@contextlib.contextmanager
def instrumented(name: str, port: int) -> Iterator[Service]:
    """A service exporting its spans and logs to the proxy on ``port``."""
    resource = Resource.create({"service.name": name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    )
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"http://127.0.0.1:{port}/v1/logs"))
    )
    log = logging.getLogger(f"shop.{name}")
    handler = LoggingHandler(level=logging.INFO, logger_provider=logger_provider)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    service = Service(tracer_provider, logger_provider, tracer_provider.get_tracer(name), log)
    try:
        yield service
    finally:
        log.removeHandler(handler)
        service.shutdown()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server_options() -> dict[str, Any]:
    # Long enough that nothing comes out before the test moves the settle's clock.
    return {"otlp_settle": 60.0}


@pytest.fixture
async def pricing(server: LogCluster) -> AsyncIterator[tuple[Service, int]]:
    """The second service: an aiohttp app continuing the trace from ``traceparent``."""
    with instrumented("pricing", server.port) as service:

        async def price(request: web.Request) -> web.Response:
            context = propagate.extract(request.headers)
            with service.tracer.start_as_current_span(
                "GET /price",
                context=context,
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": "GET", "http.route": "/price"},
            ):
                with service.tracer.start_as_current_span(
                    "HGET prices", kind=trace.SpanKind.CLIENT, attributes={"db.system": "redis"}
                ):
                    service.log.info("price of %s", request.query["item"])
                return web.json_response({"price": 7})

        app = web.Application()
        app.router.add_get("/price", price)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield service, runner.addresses[0][1]
        finally:
            await runner.cleanup()


async def test_the_sdk_with_an_httpx_call_to_a_second_app_gives_one_tree_per_trace(
    server: LogCluster, publisher: MemoryPublisher, pricing: tuple[Service, int]
) -> None:
    """Two orders handled at once: each trace is one complete tree: the shop's server span, its nested span and logs, the auto-instrumented httpx client span, the pricing service's server span with its own nested span and log, parents linked, types from kind and attributes, every record inside."""
    assert server.listener is not None
    ingest = server.listener.otlp
    ingest.clock = clock = FakeTime()
    prices, pricing_port = pricing
    with instrumented("shop", server.port) as shop:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=shop.tracer_provider)

            async def order(n: int) -> str:
                with shop.tracer.start_as_current_span(
                    "POST /orders",
                    kind=trace.SpanKind.SERVER,
                    attributes={"http.request.method": "POST", "http.route": "/orders"},
                ) as root:
                    shop.log.info("order %d received", n)
                    with shop.tracer.start_as_current_span("validate"):
                        shop.log.warning("order %d: address unchecked", n)
                        resp = await client.get(
                            f"http://127.0.0.1:{pricing_port}/price", params={"item": f"sku-{n}"}
                        )
                        assert resp.json() == {"price": 7}
                    return format(root.get_span_context().trace_id, "032x")

            trace_ids = await asyncio.gather(order(1), order(2))
        # The downstream service exports last, as it may in life: the settle waits for it.
        await asyncio.to_thread(shop.flush)
        await asyncio.to_thread(prices.flush)
    assert not publisher.transactions  # the roots' ends are held for the settle
    clock.now += 60.0
    ingest.release_due()
    trees = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) >= 2 and list(p.transactions), TIMEOUT
    )
    assert sorted(t["uuid"] for t in trees) == sorted(trace_ids)
    assert not publisher.atomic_events  # every log record is inside its tree
    for tree in trees:
        nodes = list(walk(tree))
        assert all("late" not in n and "orphan" not in n for n in nodes)
        assert tree["complete"] is True and all(
            n["complete"] for n in nodes if n["kind"] == "transaction"
        )
        assert (tree["type"], tree["name"], tree["pool"]) == ("URL", "POST /orders", "shop")
        received, validate = tree["children"]
        n = received["msg"].split()[1]
        assert (received["kind"], received["type"], received["level"]) == (
            "atomicEvent",
            "LOG",
            "INFO",
        )
        assert (validate["type"], validate["name"]) == ("SPAN", "validate")
        warning, call = validate["children"]
        assert warning["msg"] == f"order {n}: address unchecked" and warning["level"] == "WARN"
        assert (call["type"], call["spanKind"], call["pool"]) == ("HTTP", "client", "shop")
        [served] = call["children"]
        assert (served["type"], served["name"], served["pool"]) == ("URL", "GET /price", "pricing")
        assert served["parent"] == call["event"]
        [redis] = served["children"]
        assert (redis["type"], redis["name"]) == ("SQL", "HGET prices")
        [logged] = redis["children"]
        assert logged["msg"] == f"price of sku-{n}" and logged["pool"] == "pricing"
        assert logged["logger"] == "shop.pricing"
        # Times: children inside their parents, to the microsecond.
        assert tree["timestamp"] <= call["timestamp"] <= served["timestamp"]
        assert served["timestamp"] + served["duration"] <= call["timestamp"] + call["duration"]
