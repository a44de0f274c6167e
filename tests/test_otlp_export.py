"""The OTLP exporter: published trees out as spans over OTLP/HTTP (issue 14, item 2).

An OTLP receiver runs inside the tests (aiohttp on a free port) and decodes every request
with the official ``opentelemetry-proto`` classes; the span trees it got are checked
against what was published. Also: retries of 429/502/503/504 with ``Retry-After``, drops
of refused requests, the bounded queue that never makes a publisher wait, the shutdown,
the counters on ``/metrics``, and the options.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from async_logging.exceptions import ConfigError
from async_logging.publishers.otlp import OtlpExporter, retry_after, span_id, trace_id
from async_logging.server import LogCluster, ServerConfig
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import fetch_metrics, post_logs
from test_otlp_ingest import LOG_TREE, TRACE, post, proxy, sid, span, traces

T = 1_700_000_000_000.5  # ms


class Receiver:
    """An OTLP/HTTP receiver: decodes what it gets, answers as scripted (then 200)."""

    def __init__(self) -> None:
        self.traces: list[Any] = []
        self.logs: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self.hang: asyncio.Event | None = None  # set: requests wait for it
        self.got = threading.Condition()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        with self.got:
            self.arrivals.append(time.monotonic())
            self.got.notify_all()
        body = await request.read()  # aiohttp inflates a gzip body
        if self.hang is not None:
            await self.hang.wait()
        status, headers, answer = self.script.pop(0) if self.script else (200, {}, b"")
        if status == 200:
            if request.path == "/v1/traces":
                message: Any = ExportTraceServiceRequest()
                message.ParseFromString(body)
                self.traces.append(message)
            else:
                message = ExportLogsServiceRequest()
                message.ParseFromString(body)
                self.logs.append(message)
        with self.got:
            self.headers.append(dict(request.headers))
            self.got.notify_all()
        return web.Response(
            status=status, headers=headers, body=answer, content_type="application/x-protobuf"
        )

    def spans(self) -> list[tuple[Any, Any]]:
        """(resource, span) of every span received."""
        return [
            (rs.resource, s)
            for req in self.traces
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]

    def log_records(self) -> list[Any]:
        return [
            r
            for req in self.logs
            for rl in req.resource_logs
            for sl in rl.scope_logs
            for r in sl.log_records
        ]

    async def wait(self, predicate: Any) -> None:
        """Until ``predicate(self)`` holds (the exporter posts from its own thread)."""

        def block() -> None:
            with self.got:
                assert self.got.wait_for(lambda: predicate(self), TIMEOUT), "receiver timeout"

        await asyncio.to_thread(block)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rx.handle)
    app.router.add_post("/v1/logs", rx.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rx.port = runner.addresses[0][1]
    try:
        yield rx
    finally:
        if rx.hang is not None:
            rx.hang.set()
        await runner.cleanup()


def tree(uuid: str = "order-42") -> dict[str, Any]:
    """A published tree as the engine makes it: a root, a nested call, atomic events."""
    return {
        "kind": "transaction",
        "uuid": uuid,
        "event": "1",
        "parent": "0",
        "type": "URL",
        "name": "/checkout",
        "timestamp": T,
        "duration": 12.25,
        "status": "0",
        "pool": "shop",
        "machine": "web-1",
        "complete": True,
        "children": [
            {
                "kind": "transaction",
                "uuid": uuid,
                "event": "2",
                "parent": "1",
                "type": "SQL",
                "name": "SELECT cart",
                "timestamp": T + 1,
                "duration": 3,
                "status": "timeout",
                "complete": True,
                "children": [
                    {
                        "kind": "atomicEvent",
                        "uuid": uuid,
                        "parent": "2",
                        "type": "LOG",
                        "name": "db",
                        "msg": "slow",
                        "level": "WARN",
                        "timestamp": T + 2,
                    }
                ],
            },
            {
                "kind": "atomicEvent",
                "uuid": uuid,
                "parent": "1",
                "type": "INFO",
                "name": "paid",
                "timestamp": T + 5,
            },
        ],
    }


async def close(exporter: OtlpExporter) -> None:
    await asyncio.to_thread(exporter.close)


async def test_a_published_tree_arrives_as_spans_with_its_parent_links(
    receiver: Receiver,
) -> None:
    """Each transaction node is a span of one trace, parents linked as the events said, times in ns, status, CAL keys as cal.* attributes, atomic children as span events; stand-alone records and heartbeats as log records; gzip and the configured headers on every request."""
    exporter = OtlpExporter(
        f"http://127.0.0.1:{receiver.port}", ["Authorization=Bearer t0k"], backoff=(0.01, 0.02)
    )
    heartbeat = {"kind": "heartbeat", "type": "heartbeat", "name": "app", "timestamp": T,
                 "cpu_percent": 3.5, "pid": 7}  # fmt: skip
    alone = {"kind": "atomicEvent", "type": "LOG", "name": "boot", "msg": "up", "level": "INFO",
             "timestamp": T, "uuid": "u9", "parent": "0"}  # fmt: skip
    exporter.publish_many([tree(), heartbeat, alone])
    await receiver.wait(lambda r: len(r.spans()) == 2 and len(r.log_records()) == 2)
    await close(exporter)
    spans = {s.name: (res, s) for res, s in receiver.spans()}
    res, root = spans["/checkout"]
    _, db = spans["SELECT cart"]
    assert root.trace_id == db.trace_id == trace_id("order-42") and len(root.trace_id) == 16
    assert root.span_id == span_id("order-42", "1") and root.parent_span_id == b""
    assert db.parent_span_id == root.span_id and db.span_id == span_id("order-42", "2")
    assert root.kind == Span.SPAN_KIND_SERVER and db.kind == Span.SPAN_KIND_CLIENT
    assert root.start_time_unix_nano == 1_700_000_000_000_500_000
    assert root.end_time_unix_nano - root.start_time_unix_nano == 12_250_000
    assert root.status.code == Status.STATUS_CODE_UNSET
    assert (db.status.code, db.status.message) == (Status.STATUS_CODE_ERROR, "timeout")
    attrs = {kv.key: kv.value for kv in root.attributes}
    assert attrs["cal.type"].string_value == "URL" and attrs["cal.complete"].bool_value is True
    assert {kv.key: kv.value.string_value for kv in res.attributes} == {
        "service.name": "shop",
        "host.name": "web-1",
    }
    [paid] = root.events
    assert paid.name == "paid" and paid.time_unix_nano == 1_700_000_000_005_500_000
    [slow] = db.events
    assert {kv.key: kv.value.string_value for kv in slow.attributes}["cal.msg"] == "slow"
    logs = {r.body.string_value: r for r in receiver.log_records()}
    assert logs["up"].trace_id == trace_id("u9") and logs["up"].span_id == b""
    assert logs["up"].severity_number == 9
    hb = {kv.key: kv.value for kv in logs["app"].attributes}
    assert hb["cal.cpu_percent"].double_value == 3.5 and hb["cal.type"].string_value == "heartbeat"
    assert all(h["Authorization"] == "Bearer t0k" for h in receiver.headers)
    assert all(h["Content-Encoding"] == "gzip" for h in receiver.headers)
    assert exporter.snapshot()["spans"] == 2 and exporter.snapshot()["log_records"] == 2


async def test_otlp_in_and_out_keeps_the_ids_names_times_and_resource(
    receiver: Receiver,
) -> None:
    """Spans taken over OTLP and published as a tree go out with the trace, span and parent ids, names, times and resource they came with (spans below a local parent, kept without it, get their ancestor's)."""
    url = f"http://127.0.0.1:{receiver.port}"
    cluster = proxy(MemoryPublisher(), otlp_settle=0, otlp_endpoint=url)
    await cluster.start()
    try:
        local = 0x100  # the SDK's flags: the parent is in this process (no resource kept)
        sent = [
            span(1, 0, "GET /", 0, 900, kind=2),
            span(2, 1, "db", 5, 100, flags=local),
            span(3, 2, "x", flags=local),
        ]
        status, _, _ = await post(cluster, "/v1/traces", traces(*sent, service="api"))
        assert status == 200
        await receiver.wait(lambda r: len(r.spans()) == 3)
    finally:
        await cluster.stop()
    got = {s.span_id: (res, s) for res, s in receiver.spans()}
    for want in sent:
        res, s = got[want.span_id]
        assert s.trace_id == TRACE and s.parent_span_id == want.parent_span_id
        assert (s.name, s.kind) == (want.name, want.kind)
        # to the microsecond (the event model keeps float ms)
        assert abs(s.start_time_unix_nano - want.start_time_unix_nano) < 1000
        assert abs(s.end_time_unix_nano - want.end_time_unix_nano) < 1000
        assert {kv.key: kv.value.string_value for kv in res.attributes} == {"service.name": "api"}
    assert got[sid(1)][1].parent_span_id == b""


async def test_retryable_answers_are_retried_honouring_retry_after(receiver: Receiver) -> None:
    """503 with Retry-After: 1 waits that second; 429 without one backs off; then the 200: the request is delivered once, the retries counted."""
    receiver.script = [(503, {"Retry-After": "1"}, b""), (429, {}, b"")]
    exporter = OtlpExporter(f"http://127.0.0.1:{receiver.port}", backoff=(0.01, 0.02))
    exporter.publish_many([tree()])
    await receiver.wait(lambda r: len(r.traces) == 1)
    await close(exporter)
    assert len(receiver.arrivals) == 3
    assert receiver.arrivals[1] - receiver.arrivals[0] >= 0.95  # Retry-After honoured
    snap = exporter.snapshot()
    assert (snap["requests"], snap["retries"], snap["spans"]) == (3, 2, 2)
    assert sum(snap["dropped"].values()) == 0


async def test_a_status_not_retried_drops_the_request_counted(receiver: Receiver) -> None:
    """A 400 is not retried: its records are dropped, counted refused; the next batch goes on."""
    receiver.script = [(400, {}, b"")]
    exporter = OtlpExporter(f"http://127.0.0.1:{receiver.port}", backoff=(0.01, 0.02))
    exporter.publish_many([tree("a")])
    await receiver.wait(lambda r: len(r.headers) == 1)
    exporter.publish_many([tree("b")])
    await receiver.wait(lambda r: len(r.traces) == 1)
    await close(exporter)
    snap = exporter.snapshot()
    assert snap["dropped"]["refused"] == 1 and snap["retries"] == 0 and snap["spans"] == 2
    assert receiver.spans()[0][1].trace_id == trace_id("b")


async def test_retries_stop_after_retry_for_and_are_counted(receiver: Receiver) -> None:
    """A receiver that keeps answering 503 gets the request until retry_for has passed; then it is given up, counted retry_exhausted."""
    receiver.script = [(503, {}, b"")] * 100
    exporter = OtlpExporter(
        f"http://127.0.0.1:{receiver.port}", backoff=(0.02, 0.05), retry_for=0.3
    )
    exporter.publish_many([tree()])
    assert await asyncio.to_thread(exporter.wait_idle, TIMEOUT)
    await close(exporter)
    snap = exporter.snapshot()
    assert snap["dropped"]["retry_exhausted"] == 1 and snap["retries"] >= 2
    assert not receiver.traces


async def test_partial_success_rejections_are_counted(receiver: Receiver) -> None:
    """A 200 whose partial_success rejects spans counts them rejected, the rest exported."""
    answer = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=1, error_message="no")
    ).SerializeToString()
    receiver.script = [(200, {}, answer)]
    exporter = OtlpExporter(f"http://127.0.0.1:{receiver.port}")
    exporter.publish_many([tree()])
    await receiver.wait(lambda r: len(r.traces) == 1)
    await close(exporter)
    snap = exporter.snapshot()
    assert (snap["rejected"], snap["spans"]) == (1, 1)


async def test_a_stalled_receiver_never_holds_the_publisher_and_the_queue_stays_bounded(
    receiver: Receiver,
) -> None:
    """While the receiver does not answer, publish_many returns at once every time; past max_queue records the oldest are dropped (counted queue_full); close() gives up the rest after close_timeout, counted shutdown."""
    receiver.hang = asyncio.Event()
    exporter = OtlpExporter(
        f"http://127.0.0.1:{receiver.port}", max_queue=10, timeout=30, close_timeout=0
    )
    exporter.publish_many([tree("first")])
    await receiver.wait(lambda r: len(r.arrivals) == 1)  # the thread holds it, waiting
    for i in range(25):  # the receiver still answers nothing: none of these may wait
        exporter.publish_many([tree(f"t{i}")])
    assert exporter.queued == 10
    assert exporter.dropped["queue_full"] == 15
    closing = asyncio.ensure_future(close(exporter))
    # close_timeout 0: the thread is told to give up at once, while the request hangs
    assert await asyncio.to_thread(exporter._stop.wait, TIMEOUT)
    receiver.hang.set()
    await asyncio.wait_for(closing, TIMEOUT)
    snap = exporter.snapshot()
    assert snap["dropped"]["queue_full"] == 15
    assert snap["dropped"]["shutdown"] == 10  # the queued ones (the one in flight went out)
    assert snap["queue"] == 0


async def test_the_cluster_exports_and_counts_on_metrics(receiver: Receiver) -> None:
    """--otlp-endpoint wires the exporter as one more sink: a tree posted to /log reaches the receiver, and /metrics has the async_logging_otlp_export_* counters."""
    url = f"http://127.0.0.1:{receiver.port}/v1/traces"  # a signal's URL: its base is used
    cluster = proxy(MemoryPublisher(), mon_port=0, otlp_endpoint=url, otlp_headers=("X-Tenant=7",))
    await cluster.start()
    try:
        await post_logs(cluster, LOG_TREE)
        await receiver.wait(lambda r: len(r.spans()) == 1)
        assert cluster.otlp_exporter is not None
        assert await asyncio.to_thread(cluster.otlp_exporter.wait_idle, TIMEOUT)
        metrics = await asyncio.to_thread(fetch_metrics, cluster.mon_port)
    finally:
        await cluster.stop()
    assert metrics.get("async_logging_otlp_export_spans_total") == 1
    assert metrics.get("async_logging_otlp_export_requests_total") == 1
    assert metrics.get("async_logging_otlp_export_dropped_total", reason="queue_full") == 0
    assert receiver.headers[0]["X-Tenant"] == "7"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After as delay-seconds or an HTTP date (RFC 9110 §10.2.3); anything else: none."""
    assert retry_after("7") == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_hex_ids_go_out_as_they_are_and_others_are_hashed_stably() -> None:
    """A W3C trace id (32 hex) and span id (16 hex) are kept byte for byte; other ids hash to the right sizes, the same for the same uuid and id."""
    assert trace_id("0af7651916cd43dd8448eb211c80319c").hex() == "0af7651916cd43dd8448eb211c80319c"
    assert span_id("u", "b7ad6b7169203331").hex() == "b7ad6b7169203331"
    assert trace_id("order-42") == trace_id("order-42") != trace_id("order-43")
    assert len(span_id("u", "1")) == 8 and span_id("u", "1") != span_id("v", "1")


def test_the_options_in_flags_toml_and_keywords() -> None:
    """--otlp-header is repeatable; TOML takes a list or a table; a header without = or an endpoint that is not http(s) is refused, named."""
    assert ServerConfig(otlp_headers={"A": "1", "B": "x=y"}).otlp_headers == ("A=1", "B=x=y")
    assert ServerConfig(otlp_headers="A=1, B=2").otlp_headers == ("A=1", "B=2")
    with pytest.raises(ConfigError, match="otlp_headers"):
        ServerConfig(otlp_headers=["nope"])
    with pytest.raises(ConfigError, match="otlp_endpoint"):
        ServerConfig(otlp_endpoint="grpc://collector:4317")
    from async_logging import cli

    seen: dict[str, Any] = {}

    def fake_run(self: LogCluster) -> int:
        seen["config"] = self.config
        return 0

    mp = pytest.MonkeyPatch()
    mp.setattr(LogCluster, "run", fake_run)
    try:
        result = CliRunner().invoke(
            cli.main,
            ["serve", "--otlp-endpoint", "http://c:4318", "--otlp-header", "A=1",
             "--otlp-header", "B=2", "--otlp-settle", "0.5", "--otlp-export-queue", "9"],
        )  # fmt: skip
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.otlp_endpoint, config.otlp_headers) == ("http://c:4318", ("A=1", "B=2"))
    assert (config.otlp_settle, config.otlp_export_queue) == (0.5, 9)
