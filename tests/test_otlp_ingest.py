"""OTLP/HTTP ingest on the main port: ``POST /v1/traces`` and ``/v1/logs`` (issue 14, item 1).

Requests are built with the official ``opentelemetry-proto`` classes (and in OTLP/JSON by
hand, as the specification writes it), sent to a real server on a free port, and the
published trees are checked: ids, parents, types, times, statuses, attributes, span events,
log records inside their span's tree; the answers (partial success, 400/401/413/415 with a
``Status``), the counters, the settle that lets spans in later requests join their tree,
and the spool.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from async_logging import LogBuffer
from async_logging.buffer import Fed
from async_logging.server import LogCluster
from async_logging.server.otlp import PROTOBUF, OtlpIngest, map_traces
from async_logging.server.pipeline import Pipeline, Stats
from async_logging.server.spool import Spool
from async_logging.testing import MemoryPublisher
from async_logging.wire import WireLimits
from conftest import TIMEOUT
from helpers import fetch_metrics, post_logs, walk

T0_NS = 1_700_000_000_123_456_789  # start of the test traces, in ns
#: A tree sent with POST /log.
LOG_TREE = [
    {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "name": "a"},
    {"clazz": "end", "uuid": "u", "event": "1", "parent": "0"},
]
TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
TRACE_HEX = TRACE.hex()


def sid(n: int) -> bytes:
    """Span id number ``n`` (8 bytes)."""
    return n.to_bytes(8, "big")


def attrs(**values: Any) -> list[KeyValue]:
    out = []
    for k, v in values.items():
        key = k.replace("__", ".")
        if isinstance(v, bool):
            out.append(KeyValue(key=key, value=AnyValue(bool_value=v)))
        elif isinstance(v, int):
            out.append(KeyValue(key=key, value=AnyValue(int_value=v)))
        else:
            out.append(KeyValue(key=key, value=AnyValue(string_value=str(v))))
    return out


def span(
    n: int,
    parent: int = 0,
    name: str = "",
    start_us: int = 0,
    dur_us: int = 1000,
    kind: int = 1,
    trace: bytes = TRACE,
    **kw: Any,
) -> Span:
    """A span ``n`` of ``trace``, starting ``start_us`` µs after T0, lasting ``dur_us``."""
    s = Span(
        trace_id=trace,
        span_id=sid(n),
        parent_span_id=sid(parent) if parent else b"",
        name=name or f"span-{n}",
        kind=kind,
        start_time_unix_nano=T0_NS + start_us * 1000,
        end_time_unix_nano=T0_NS + (start_us + dur_us) * 1000,
        **kw,
    )
    return s


def traces(*spans: Span, service: str = "shop") -> bytes:
    """A protobuf request of ``spans``, from ``service``, scope ``tests``."""
    group = ResourceSpans(resource=Resource(attributes=attrs(service__name=service)))
    group.scope_spans.add(scope=InstrumentationScope(name="tests"), spans=spans)
    return ExportTraceServiceRequest(resource_spans=[group]).SerializeToString()


def logs_body(*records: LogRecord, service: str = "shop") -> bytes:
    """A protobuf request of log ``records``, from ``service``, logger ``app.orders``."""
    group = ResourceLogs(resource=Resource(attributes=attrs(service__name=service)))
    group.scope_logs.add(scope=InstrumentationScope(name="app.orders"), log_records=records)
    return ExportLogsServiceRequest(resource_logs=[group]).SerializeToString()


def proxy(publisher: MemoryPublisher, **options: Any) -> LogCluster:
    """A proxy on free ports (no monitoring port unless asked), publishing to ``publisher``."""
    defaults = {"host": "127.0.0.1", "port": 0, "mon_port": -1, "heartbeat_interval": 0}
    return LogCluster(**{**defaults, "store": "", "publisher": publisher, **options})


async def post(
    server: LogCluster,
    path: str,
    body: bytes,
    ctype: str = PROTOBUF,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.post(
            f"http://127.0.0.1:{server.port}{path}",
            data=body,
            headers={"Content-Type": ctype, **(headers or {})},
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def status_of(body: bytes, ctype: str = PROTOBUF) -> Any:
    st = status_pb2.Status()
    if ctype == PROTOBUF:
        st.ParseFromString(body)
    else:
        from google.protobuf import json_format

        json_format.Parse(body, st)
    return st


async def published(publisher: MemoryPublisher, n: int = 1) -> list[dict[str, Any]]:
    """The first ``n`` transactions, waited for (off the event loop the server runs on)."""
    txs: list[dict[str, Any]] = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) >= n and p.transactions, TIMEOUT
    )
    return txs


@pytest.fixture
def server_options() -> dict[str, Any]:
    return {"otlp_settle": 0}


# ---------------------------------------------------------------------- spans → trees


def shop_request() -> bytes:
    """One trace: an HTTP server root, an HTTP client call, a database call with an event,
    a message sent, a span typed by ``cal.type``, one that failed with an exception."""
    failed = span(7, 1, "charge", 900, 50)
    failed.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="card declined"))
    failed.events.add(
        time_unix_nano=T0_NS + 920_000,
        name="exception",
        attributes=attrs(exception__type="ValueError", exception__message="declined"),
    )
    db = span(3, 1, "SELECT orders", 100, 200, kind=3, attributes=attrs(db__system="postgresql"))
    db.flags = 0x300  # its parent is said to be remote
    db.events.add(time_unix_nano=T0_NS + 150_000, name="rows", attributes=attrs(count=3))
    return traces(
        span(
            1,
            0,
            "GET /orders",
            0,
            1_500,
            kind=2,
            attributes=attrs(http__request__method="GET", http__route="/orders"),
        ),
        span(
            2,
            1,
            "GET",
            10,
            80,
            kind=3,
            attributes=attrs(http__method="GET", http__url="x"),
            flags=0x100,  # its parent is said to be local
        ),
        db,
        span(4, 1, "publish", 400, 10, kind=4, attributes=attrs(messaging__system="kafka")),
        span(5, 1, "risk", 500, 10, attributes=attrs(cal__type="API")),
        span(6, 5, "score", 501, 5),
        failed,
    )


async def test_the_spans_of_a_request_make_one_tree_with_types_times_statuses_and_events(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """A trace's spans become one complete tree: trace id as uuid, span ids as events, parents linked, types from kind and attributes (URL, HTTP, SQL, MQ, cal.type, SPAN), float-ms times with microseconds, statuses, attributes, resource, span events as atomic children."""
    status, headers, body = await post(server, "/v1/traces", shop_request())
    assert status == 200 and headers["Content-Type"] == PROTOBUF
    answer = ExportTraceServiceResponse()
    answer.ParseFromString(body)
    assert not answer.HasField("partial_success")
    [root] = await published(publisher)
    assert root["complete"] is True and root["uuid"] == TRACE_HEX
    assert (root["event"], root["parent"], root["type"], root["name"]) == (
        sid(1).hex(),
        "0",
        "URL",
        "GET /orders",
    )
    assert root["timestamp"] == pytest.approx(1_700_000_000_123.456789, abs=1e-3)
    assert root["duration"] == pytest.approx(1.5) and root["status"] == "0"
    assert root["spanKind"] == "server" and root["pool"] == "shop"
    assert root["resource"] == {"service.name": "shop"} and root["scope"] == "tests"
    assert root["attributes"] == {"http.request.method": "GET", "http.route": "/orders"}
    nodes = {n.get("event"): n for n in walk(root) if n["kind"] == "transaction"}
    assert {e: n["type"] for e, n in nodes.items()} == {
        sid(1).hex(): "URL",
        sid(2).hex(): "HTTP",
        sid(3).hex(): "SQL",
        sid(4).hex(): "MQ",
        sid(5).hex(): "API",
        sid(6).hex(): "SPAN",
        sid(7).hex(): "SPAN",
    }
    # The resource goes where a service's part begins: not under a parent said to be local.
    assert "resource" not in nodes[sid(2).hex()] and nodes[sid(2).hex()]["pool"] == "shop"
    assert nodes[sid(3).hex()]["resource"] == {"service.name": "shop"}
    assert nodes[sid(6).hex()]["parent"] == sid(5).hex()
    assert [c["event"] for c in nodes[sid(5).hex()]["children"]] == [sid(6).hex()]
    assert [c.get("event") for c in root["children"]] == [sid(n).hex() for n in (2, 3, 4, 5, 7)]
    assert nodes[sid(7).hex()]["status"] == "card declined"
    [exc] = nodes[sid(7).hex()]["children"]
    assert (exc["kind"], exc["type"], exc["name"], exc["level"], exc["msg"]) == (
        "atomicEvent",
        "EVENT",
        "exception",
        "ERROR",
        "declined",
    )
    [rows] = nodes[sid(3).hex()]["children"]
    assert rows["attributes"] == {"count": 3} and rows["parent"] == sid(3).hex()
    assert rows["timestamp"] == pytest.approx(1_700_000_000_123.606789, abs=1e-3)
    assert nodes[sid(3).hex()]["duration"] == pytest.approx(0.2)


def otlp_json(spans: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]
                    },
                    "scopeSpans": [{"scope": {"name": "tests"}, "spans": spans}],
                }
            ]
        }
    )


async def test_otlp_json_with_hex_ids_gives_the_tree_protobuf_gives(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """OTLP/JSON (hex ids, camelCase, integer enums, 64-bit integers as strings, unknown fields) is read as the specification says, and answered in JSON."""
    body = otlp_json(
        [
            {
                "traceId": TRACE_HEX,
                "spanId": sid(1).hex(),
                "name": "GET /orders",
                "kind": 2,
                "startTimeUnixNano": str(T0_NS),
                "endTimeUnixNano": str(T0_NS + 2_000_000),
                "attributes": [{"key": "http.route", "value": {"stringValue": "/orders"}}],
                "futureField": {"ignored": True},
            },
            {
                "traceId": TRACE_HEX,
                "spanId": sid(2).hex(),
                "parentSpanId": sid(1).hex(),
                "name": "child",
                "startTimeUnixNano": T0_NS + 1000,
                "endTimeUnixNano": T0_NS + 2000,
                "status": {"code": 2},
            },
        ]
    )
    status, headers, answer = await post(server, "/v1/traces", body, "application/json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert orjson.loads(answer) == {}
    [root] = await published(publisher)
    assert (root["uuid"], root["event"], root["type"]) == (TRACE_HEX, sid(1).hex(), "URL")
    [child] = root["children"]
    assert (child["event"], child["parent"], child["status"]) == (
        sid(2).hex(),
        sid(1).hex(),
        "ERROR",
    )


async def test_a_gzip_body_is_inflated(server: LogCluster, publisher: MemoryPublisher) -> None:
    """Content-Encoding: gzip (what SDKs send with compression on) is taken."""
    body = gzip.compress(traces(span(1, 0, "root")))
    status, _, _ = await post(server, "/v1/traces", body, headers={"Content-Encoding": "gzip"})
    assert status == 200
    [root] = await published(publisher)
    assert root["name"] == "root" and root["complete"] is True


async def test_refused_spans_are_counted_in_partial_success_and_the_others_published(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """Bad spans (a short trace id, a zero span id, an end before its start, a name past the string limit) are refused alone: 200 with partial_success naming them, the good span published, each reason counted."""
    bad_trace = span(2, trace=b"\x01" * 8)
    zero = span(3)
    zero.span_id = bytes(8)
    backwards = span(4, start_us=10, dur_us=-5)
    long_name = span(5, name="x" * 70_000)
    body = traces(span(1, 0, "good"), bad_trace, zero, backwards, long_name)
    status, _, answer = await post(server, "/v1/traces", body)
    assert status == 200
    response = ExportTraceServiceResponse()
    response.ParseFromString(answer)
    assert response.partial_success.rejected_spans == 4
    message = response.partial_success.error_message
    assert message.startswith("4 spans refused (span 1: bad_trace_id")
    assert "span 2: bad_span_id" in message and "span 3: bad_duration" in message
    [good] = await published(publisher)
    assert good["name"] == "good"
    metrics = await asyncio.to_thread(fetch_metrics, server.mon_port)
    bad = metrics.by_label("async_logging_bad_input_total", "reason")
    for reason in ("bad_trace_id", "bad_span_id", "bad_duration", "string_too_long"):
        assert bad[reason] == 1, reason
    assert metrics.get("async_logging_otlp_received_total", signal="spans") == 1
    assert metrics.get("async_logging_frames_received_total", transport="otlp") == 1


async def test_a_request_whose_every_span_is_refused_is_a_400_with_a_status(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """As for POST /log, nothing taken is a 400; the body is a google.rpc.Status naming the reason."""
    status, _, answer = await post(server, "/v1/traces", traces(span(1, trace=bytes(16))))
    assert status == 400
    st = status_of(answer)
    assert st.code == 3 and st.message.startswith("bad_trace_id: 1 spans refused")
    assert not publisher.records


@pytest.mark.parametrize(
    "server_options",
    [{"otlp_settle": 0, "max_message_bytes": 4096, "max_events_per_frame": 5}],
)
@pytest.mark.parametrize(
    ("body", "ctype", "headers", "status", "reason"),
    [
        (b"\xff\xff\xff", PROTOBUF, {}, 400, "bad_protobuf"),
        (b"[1, 2]", "application/json", {}, 400, "bad_json"),
        (b"{", "application/json", {}, 400, "bad_json"),
        (b"x", "text/plain", {}, 415, "unsupported_media_type"),
        (b"x", PROTOBUF, {"Content-Encoding": "snappy"}, 415, "unsupported_encoding"),
        (b"x" * 5000, PROTOBUF, {}, 413, "message_too_big"),
        (
            gzip.compress(b"\0" * 5000),
            PROTOBUF,
            {"Content-Encoding": "gzip"},
            413,
            "message_too_big",
        ),
        (b"not gzip", PROTOBUF, {"Content-Encoding": "gzip"}, 400, "bad_gzip"),
        (traces(*(span(n) for n in range(1, 7))), PROTOBUF, {}, 413, "too_many_events"),
    ],
)
async def test_a_request_refused_whole_gets_its_status_a_reason_and_a_count(
    server: LogCluster,
    body: bytes,
    ctype: str,
    headers: dict[str, str],
    status: int,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bad protobuf or JSON 400, another content type or encoding 415, a body (compressed or inflated) over max_message_bytes or more spans than max_events_per_frame 413: each answered with a Status in the request's encoding and counted by reason, and nothing logged as an error (a body that does not inflate is not read on after the answer)."""
    got, _, answer = await post(server, "/v1/traces", body, ctype, headers)
    assert got == status
    await asyncio.sleep(0)  # the server's handler finishes after the answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    st = status_of(answer, "application/json" if ctype == "application/json" else PROTOBUF)
    assert st.message.startswith(reason + ":"), st.message
    metrics = await asyncio.to_thread(fetch_metrics, server.mon_port)
    assert metrics.get("async_logging_bad_input_total", reason=reason) == 1


@pytest.mark.parametrize("server_options", [{"otlp_settle": 0, "tokens": "s3cret"}])
async def test_the_tokens_of_post_log_guard_the_otlp_routes(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """Without a token: 401 with a Status and WWW-Authenticate, counted; with the bearer token an SDK sends as a header: taken."""
    status, headers, answer = await post(server, "/v1/logs", logs_body(LogRecord()))
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    assert status_of(answer).message.startswith("unauthorized:")
    status, _, _ = await post(
        server, "/v1/traces", traces(span(1)), headers={"Authorization": "Bearer s3cret"}
    )
    assert status == 200
    await published(publisher)
    metrics = await asyncio.to_thread(fetch_metrics, server.mon_port)
    assert metrics.get("async_logging_connections_refused_total", reason="unauthorized") == 1


async def test_while_draining_a_request_is_answered_503_to_send_again(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """Once the server drains, a request on a kept-alive connection is not taken: 503 shutting_down with a Status and Retry-After (a status OTLP clients retry), the connection closed."""
    assert server.listener is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        url = f"http://127.0.0.1:{server.port}/v1/traces"
        headers = {"Content-Type": PROTOBUF}
        async with session.post(url, data=traces(span(1)), headers=headers) as resp:
            assert resp.status == 200
        await server.listener.stop_accepting()
        async with session.post(
            url, data=traces(span(9, trace=b"\x09" * 16)), headers=headers
        ) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert status_of(await resp.read()).message.startswith("shutting_down:")
    [taken] = await published(publisher)
    assert taken["uuid"] == TRACE_HEX


# ---------------------------------------------------------------------- log records


async def test_log_records_with_trace_and_span_ids_are_events_of_that_span(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """A log record with a trace and span id is an atomic child of that span; one with a trace id alone, or none, is published on its own."""
    in_span = LogRecord(
        time_unix_nano=T0_NS + 500_000,
        severity_number=13,
        body=AnyValue(string_value="slow query"),
        trace_id=TRACE,
        span_id=sid(2),
        attributes=attrs(rows=3),
    )
    trace_only = LogRecord(
        observed_time_unix_nano=T0_NS, severity_text="INFO", trace_id=TRACE, body=AnyValue()
    )
    plain = LogRecord(time_unix_nano=T0_NS, body=AnyValue(int_value=7))
    status, _, answer = await post(server, "/v1/logs", logs_body(in_span, trace_only, plain))
    assert status == 200
    response = ExportLogsServiceResponse()
    response.ParseFromString(answer)
    assert not response.HasField("partial_success")
    status, _, _ = await post(server, "/v1/traces", traces(span(1, 0, "root"), span(2, 1, "db")))
    assert status == 200
    [root] = await published(publisher)
    [db] = root["children"]
    [log] = db["children"]
    assert (log["kind"], log["type"], log["name"], log["logger"]) == (
        "atomicEvent",
        "LOG",
        "app.orders",
        "app.orders",
    )
    assert (log["level"], log["msg"], log["attributes"], log["pool"]) == (
        "WARN",
        "slow query",
        {"rows": 3},
        "shop",
    )
    alone = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.atomic_events) >= 2 and p.atomic_events, TIMEOUT
    )
    by_msg = {e.get("msg"): e for e in alone}
    assert by_msg["7"]["body"] == 7 and "uuid" not in by_msg["7"]
    assert by_msg[None]["uuid"] == TRACE_HEX and by_msg[None]["level"] == "INFO"
    metrics = await asyncio.to_thread(fetch_metrics, server.mon_port)
    assert metrics.get("async_logging_otlp_received_total", signal="log_records") == 3


# ---------------------------------------------------------------------- the settle


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("server_options", [{"otlp_settle": 30.0}])
async def test_spans_in_a_later_request_join_their_tree_within_the_settle(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """The root's end is held otlp_settle seconds: a span of another service arriving in a later request (and a log record) joins the tree, which comes out once the settle has passed, complete."""
    assert server.listener is not None
    ingest = server.listener.otlp
    ingest.clock = clock = FakeTime()
    await post(server, "/v1/traces", traces(span(1, 0, "root", 0, 5_000), span(2, 1, "call")))
    # The downstream service's span (child of the call) and a log, later, from elsewhere.
    await post(server, "/v1/traces", traces(span(3, 2, "GET /api", 10, 50, kind=2), service="api"))
    log = LogRecord(time_unix_nano=T0_NS + 20_000, trace_id=TRACE, span_id=sid(3))
    await post(server, "/v1/logs", logs_body(log, service="api"))
    assert not publisher.records and ingest.settle.count == 1
    clock.now += 29.0
    ingest.release_due()
    assert ingest.settle.count == 1  # not yet due
    clock.now += 1.0
    ingest.release_due()
    [root] = await published(publisher)
    assert root["complete"] is True and "late" not in root
    [call] = root["children"]
    [downstream] = call["children"]
    assert (downstream["name"], downstream["pool"]) == ("GET /api", "api")
    assert downstream["children"][0]["kind"] == "atomicEvent"
    assert ingest.settle.count == 0


async def test_without_a_settle_a_span_in_a_later_request_comes_out_late(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """otlp_settle 0 (this module's default): the root closes its tree at once, and a child arriving afterwards is published apart, flagged late (the engine's rule: its begin and its end each alone); what the settle is for."""
    await post(server, "/v1/traces", traces(span(1, 0, "root", 0, 5_000)))
    [root] = await published(publisher)
    assert root["children"] == []
    await post(server, "/v1/traces", traces(span(3, 1, "straggler", 10, 50)))
    records = await published(publisher, 3)
    late = records[1:]
    assert all(r["late"] is True and r["name"] == "straggler" for r in late)
    assert {("missing_end" in r, "missing_begin" in r) for r in late} == {
        (True, False),
        (False, True),
    }


@pytest.mark.parametrize("server_options", [{"otlp_settle": 0.05}])
async def test_the_settle_timer_publishes_the_tree_by_itself(
    server: LogCluster, publisher: MemoryPublisher
) -> None:
    """With the event loop's clock, the held end is fed when the settle has passed."""
    await post(server, "/v1/traces", traces(span(1, 0, "root"), span(2, 1, "kid")))
    [root] = await published(publisher)
    assert root["complete"] is True and len(root["children"]) == 1


async def test_log_trees_are_not_held_by_the_otlp_settle() -> None:
    """A POST /log tree comes out at once, whatever otlp_settle: the settle is OTLP's."""
    publisher = MemoryPublisher()
    cluster = proxy(publisher, otlp_settle=3600.0)
    await cluster.start()
    try:
        await post_logs(cluster, LOG_TREE)
        [tx] = await published(publisher)
        assert tx["complete"] is True
    finally:
        await cluster.stop()


async def test_a_drain_feeds_the_held_ends_so_the_trees_come_out_complete() -> None:
    """Stopping the server with root spans held publishes their trees complete, not flagged shutdown."""
    publisher = MemoryPublisher()
    cluster = proxy(publisher, otlp_settle=3600.0)
    await cluster.start()
    try:
        status, _, _ = await post(cluster, "/v1/traces", traces(span(1, 0, "root"), span(2, 1)))
        assert status == 200 and not publisher.records
    finally:
        await cluster.stop()
    [root] = publisher.transactions
    assert root["complete"] is True and "reason" not in root


class BusLike:
    """An ingest that is not the server's own engine (as ``serve --bus`` hands batches)."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.wire_limits = WireLimits()
        self.spool = None
        self.closed = False
        self.batches: list[list[dict[str, Any]]] = []

    async def accept(self, logs: list[Any], raw: Any = None) -> Fed:
        self.batches.append(logs)
        return Fed([], [])


async def test_behind_a_bus_every_end_goes_with_its_request() -> None:
    """With no engine behind the listener (a bus, whose ack says it holds the batch), a root's end is not held back: the request goes whole."""
    bus = BusLike()
    ingest = OtlpIngest(bus, settle=60.0)  # type: ignore[arg-type]
    response = await ingest.take("traces", PROTOBUF, traces(span(1), span(2, 1)))
    assert response.status == 200 and ingest.settle.count == 0
    [batch] = bus.batches
    assert [e["clazz"] for e in batch] == ["begin", "end", "begin", "end"]


# ---------------------------------------------------------------------- spool


async def test_a_spooled_request_replays_whole_with_the_held_end(tmp_path: Path) -> None:
    """With a spool, an OTLP request is spooled as its mapped events (the held root end included) before it is fed: a process that dies before the settle passed loses nothing, and the replay publishes the tree complete."""
    root = tmp_path / "spool"
    sink = MemoryPublisher()
    dead = Pipeline(LogBuffer(), sink, spool=Spool(root / "w-1", 1 << 20))
    ingest = OtlpIngest(dead, settle=3600.0, clock=FakeTime())
    # 10 spans: more mapped events than the wire's per-frame limit of this pipeline's
    # replay would take from a MessagePack frame (the record is the server's own).
    dead.wire_limits = WireLimits(max_events_per_frame=5)
    response = await ingest.take(
        "traces", PROTOBUF, traces(span(1), *(span(n, 1) for n in range(2, 11)))
    )
    assert response.status == 200 and ingest.settle.count == 1 and not sink.records
    dead.spool.close()  # the process dies: nothing published, no checkpoint
    replayer = MemoryPublisher()
    alive = Pipeline(LogBuffer(), replayer, spool=Spool(root / "w-2", 1 << 20))
    alive.wire_limits = WireLimits(max_events_per_frame=5)
    alive.start()
    try:
        assert await alive.adopt(Spool(root / "w-1", 1 << 20)) == 20
    finally:
        await alive.close()
    [tree] = replayer.transactions
    assert tree["complete"] is True and tree["replayed"] is True
    assert len(tree["children"]) == 9


# ---------------------------------------------------------------------- the mapping alone


def test_every_kind_of_attribute_value_maps_to_its_plain_value() -> None:
    """Strings (the empty one too), booleans, integers and doubles (false and zero too), an
    unset value, bytes, arrays and maps: each becomes the value OTLP/JSON would write."""
    nested = AnyValue()
    nested.kvlist_value.values.add(key="in").value.string_value = ""
    listed = AnyValue()
    listed.array_value.values.extend(
        [AnyValue(string_value="x"), AnyValue(bool_value=False), AnyValue(double_value=0.0)]
    )
    values = {
        "s": AnyValue(string_value="GET"),
        "empty": AnyValue(string_value=""),
        "yes": AnyValue(bool_value=True),
        "no": AnyValue(bool_value=False),
        "n": AnyValue(int_value=-7),
        "zero": AnyValue(int_value=0),
        "d": AnyValue(double_value=2.5),
        "dzero": AnyValue(double_value=0.0),
        "unset": AnyValue(),
        "b": AnyValue(bytes_value=b"\x01"),
        "list": listed,
        "map": nested,
    }
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.append(
        span(1, attributes=[KeyValue(key=k, value=v) for k, v in values.items()])
    )
    mapped = map_traces(req, WireLimits())
    assert not mapped.refused
    got = mapped.events[0]["attributes"]
    assert got == {
        "s": "GET",
        "empty": "",
        "yes": True,
        "no": False,
        "n": -7,
        "zero": 0,
        "d": 2.5,
        "dzero": 0.0,
        "unset": None,
        "b": "AQ==",
        "list": ["x", False, 0.0],
        "map": {"in": ""},
    }
    assert [type(got[k]) for k in ("empty", "no", "zero", "dzero")] == [str, bool, int, float]


def test_attribute_values_past_the_wire_limits_refuse_their_span_alone() -> None:
    """Nesting, keys per map, items per array and string lengths are checked in attributes, resource and events like in a /log event; bytes become base64, as OTLP/JSON writes them."""
    limits = WireLimits(max_depth=3, max_keys_per_map=2, max_array_length=2, max_string_length=8)
    deep = AnyValue()
    deep.kvlist_value.values.add(key="a").value.kvlist_value.values.add(key="b").value.int_value = 1
    wide = attrs(a=1, b=2, c=3)
    long_list = AnyValue()
    long_list.array_value.values.extend([AnyValue(int_value=i) for i in range(3)])
    ok = AnyValue(bytes_value=b"\x00\xff")
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    ss.spans.extend(
        [
            span(1, attributes=[KeyValue(key="k", value=deep)]),
            span(2, attributes=wide),
            span(3, attributes=[KeyValue(key="k", value=long_list)]),
            span(4, attributes=attrs(k="123456789")),
            span(5, attributes=[KeyValue(key="k", value=ok)]),
        ]
    )
    mapped = map_traces(req, limits)
    assert [(i, e.reason) for i, e in mapped.refused] == [
        (0, "too_deep"),
        (1, "too_many_keys"),
        (2, "array_too_long"),
        (3, "string_too_long"),
    ]
    assert mapped.events[0]["attributes"] == {"k": base64.b64encode(b"\x00\xff").decode()}
    assert mapped.item_of(1) == 4  # the end of the one span taken


def test_the_spool_record_is_the_mapped_events() -> None:
    """What the spool keeps decodes back to the events fed (and the held ends)."""
    mapped = map_traces(
        ExportTraceServiceRequest.FromString(traces(span(1), span(2, 1))),
        WireLimits(),
        hold_roots=True,
    )
    record = msgspec.msgpack.encode(mapped.events + mapped.held)
    back = msgspec.msgpack.decode(record)
    assert [e["clazz"] for e in back] == ["begin", "begin", "end", "end"]
    assert back[-1]["parent"] == "0" and len(mapped.held) == 1


def test_mapped_spans_skip_the_engines_mapper_and_publish_the_same_records() -> None:
    """The ingest maps spans as the engine's mapper would (``request`` included), so the
    engine may skip its mapper for them (``premapped``): the records are the same."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(shop_request())
    limits = WireLimits()
    skipped = LogBuffer(native=False).feed_owned(map_traces(request, limits).events, premapped=True)
    mapped = LogBuffer(native=False).feed_owned(map_traces(request, limits).events)
    assert skipped.records and not skipped.rejected
    assert orjson.dumps(skipped.records) == orjson.dumps(mapped.records)
