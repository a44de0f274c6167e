"""OTLP traces a request holds whole skip the engine (server/otlp.py, docs/design.md §12).

The cut (:func:`split_whole`), the settle holding whole trees as MessagePack
(:class:`Settle`), and the oracle: whatever the requests, their split, their order, the
settle and the time between them, a pipeline whose engine has the native fast path (whole
trees skip the engine) publishes exactly the records of one without it (every span through
the engine, the reference path).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from async_logging import LogBuffer
from async_logging.exceptions import LimitExceeded
from async_logging.server.otlp import PROTOBUF, OtlpIngest, Settle, map_traces, split_whole
from async_logging.server.pipeline import Pipeline
from async_logging.testing import MemoryPublisher
from async_logging.wire import WireLimits
from conftest import TIMEOUT
from helpers import fetch_metrics
from test_otlp_ingest import (
    T0_NS,
    FakeTime,
    logs_body,
    post,
    proxy,
    published,
    sid,
    span,
    traces,
)

pytestmark = pytest.mark.skipif(
    not LogBuffer().native, reason="the native fast path (_speedups) is not built"
)


def trace_id(n: int) -> bytes:
    return (n + 1).to_bytes(16, "big")


def events_of(*spans: Span) -> list[dict[str, Any]]:
    """The events map_traces makes of a request of ``spans``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    req = ExportTraceServiceRequest()
    req.ParseFromString(traces(*spans))
    return map_traces(req, WireLimits()).events


# ---------------------------------------------------------------------- the cut


def test_a_trace_with_its_root_and_every_parent_is_whole() -> None:
    """Root, children and grandchildren in one request: whole, one tree, nothing left."""
    events = events_of(span(3, 2), span(2, 1), span(1))
    cut = split_whole(events, lambda _: False, hold_roots=True)
    assert cut.whole == events and cut.trees == 1
    assert cut.rest == [] and cut.held == []


def test_a_trace_missing_a_parent_or_its_root_or_open_is_not() -> None:
    """A span whose parent is elsewhere, a trace with no root, a trace the engine has open:
    the rest, in their order; with hold_roots the ends of their root spans are held."""
    other = trace_id(7)
    missing_parent = events_of(span(1), span(3, 2))  # span 2 is in another request
    no_root = events_of(span(4, 1, trace=other))
    for events, is_open in (
        (missing_parent, lambda _: False),
        (no_root, lambda _: False),
        (events_of(span(1), span(2, 1)), lambda _: True),
    ):
        cut = split_whole(events, is_open, hold_roots=False)
        assert cut.whole == [] and cut.trees == 0 and cut.rest == events
    cut = split_whole(missing_parent, lambda _: False, hold_roots=True)
    root_end = [e for e in missing_parent if e["clazz"] == "end" and e["parent"] == "0"]
    assert cut.held == root_end
    assert cut.rest == [e for e in missing_parent if e not in root_end]


def test_traces_are_cut_apart_whatever_their_interleaving() -> None:
    """Two traces interleaved in a request, one whole and one not: each goes its way whole,
    its events in the order they came."""
    a, b = trace_id(1), trace_id(2)
    events = events_of(span(2, 1, trace=a), span(5, 4, trace=b), span(1, trace=a))
    cut = split_whole(events, lambda _: False, hold_roots=False)
    assert cut.whole == [e for e in events if e["uuid"] == a.hex()] and cut.trees == 1
    assert cut.rest == [e for e in events if e["uuid"] == b.hex()]


# ---------------------------------------------------------------------- the settle


def test_the_settle_holds_ends_and_whole_trees_in_order() -> None:
    """Ends and trees come due in the order held; the count is root spans, the bytes those
    of the trees; shedding lets the oldest go until the rest fit."""
    settle = Settle(2.0)
    end = {"clazz": "end", "uuid": "u", "event": "1", "parent": "0"}
    settle.hold([end], 10.0)
    settle.hold([], 10.5, b"x" * 100, roots=3)
    settle.hold([], 11.0, b"y" * 50, roots=1)
    assert (settle.count, settle.nbytes, settle.next_due) == (5, 150, 12.0)
    assert settle.due(11.9) == ([], [])
    assert settle.due(12.5) == ([end], [b"x" * 100])
    assert (settle.count, settle.nbytes) == (1, 50)
    settle.hold([], 12.0, b"z" * 60, roots=2)
    assert settle.shed(60) == ([], [b"y" * 50])  # the oldest goes first, before it is due
    assert (settle.count, settle.nbytes, settle.next_due) == (2, 60, 14.0)
    assert settle.take_all() == ([], [b"z" * 60])
    assert (settle.count, settle.nbytes, settle.next_due) == (0, 0, None)


def test_unhold_gives_back_a_requests_trees_but_their_root_ends() -> None:
    """More of a trace held whole came: its request's trees come back as the events to feed
    now, their root spans' ends stay held, due as before; other requests stay as they are."""
    a, b = trace_id(0), trace_id(1)
    first = events_of(span(2, 1, trace=a), span(1, trace=a), span(1, trace=b))
    other = events_of(span(1, trace=trace_id(2)))
    settle = Settle(2.0)
    settle.hold([], 10.0, msgspec.msgpack.encode(first), roots=2, uuids=[a.hex(), b.hex()])
    settle.hold([], 11.0, msgspec.msgpack.encode(other), roots=1, uuids=[trace_id(2).hex()])
    fed = settle.unhold({b.hex()})
    root_ends = [e for e in first if e["clazz"] == "end" and e["parent"] == "0"]
    assert fed == [e for e in first if e not in root_ends] and len(root_ends) == 2
    assert settle.uuids == {trace_id(2).hex()} and settle.count == 3
    assert settle.nbytes == len(msgspec.msgpack.encode(other))
    assert settle.unhold({b.hex()}) == []  # nothing of it is held whole any more
    assert settle.due(12.0) == (root_ends, [])
    assert settle.due(13.0) == ([], [msgspec.msgpack.encode(other)])


# ---------------------------------------------------------------------- the oracle


#: A request in a scenario: spans (``traces``) or log records (``logs``).
Request = tuple[str, list[Any]]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Request], list[float], float]:
    """Requests of spans of a few traces (children first, as an SDK exports, or any order),
    cut anyhow, some sent twice (the same, or changed: a conflict), log records inside the
    trees; the seconds before each request; the settle."""
    spans: list[Span] = []
    for t in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 6))
        parents = [0] + [draw(st.integers(1, k)) for k in range(1, n)]
        mine = [
            span(k + 1, parents[k], start_us=10 * k, dur_us=100 - k, trace=trace_id(t))
            for k in range(n)
        ]
        if draw(st.booleans()):
            mine.reverse()  # children first, the root last
        else:
            mine = draw(st.permutations(mine))
        spans.extend(mine)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(spans) - 1)), max_size=3)))
    requests: list[Request] = [
        ("traces", spans[i:j]) for i, j in zip([0, *cuts], [*cuts, len(spans)], strict=True)
    ]
    for _ in range(draw(st.integers(0, 2))):  # resends, maybe changed
        _, again = draw(st.sampled_from(requests))
        if draw(st.booleans()):
            again = [copy_renamed(s) for s in again]
        requests.insert(draw(st.integers(0, len(requests))), ("traces", again))
    for _ in range(draw(st.integers(0, 2))):  # a log record in one of the spans
        s = draw(st.sampled_from(spans))
        record = LogRecord(
            time_unix_nano=s.start_time_unix_nano + 1000, trace_id=s.trace_id, span_id=s.span_id
        )
        requests.insert(draw(st.integers(0, len(requests))), ("logs", [record]))
    gaps = [draw(st.sampled_from([0.0, 1.0, 40.0])) for _ in requests]
    return requests, gaps, draw(st.sampled_from([0.0, 30.0]))


def copy_renamed(s: Span) -> Span:
    changed = Span()
    changed.CopyFrom(s)
    changed.name = s.name + "-again"
    return changed


async def run(native: bool, requests: list[Request], gaps: list[float], settle: float) -> Any:
    """Take the requests in order, time moving as said; every record published, as JSON."""
    sink = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(native=native), sink)
    pipeline.start()
    clock = FakeTime()
    ingest = OtlpIngest(pipeline, settle=settle, clock=clock)
    try:
        for (signal, items), gap in zip(requests, gaps, strict=True):
            clock.now += gap
            ingest.release_due()
            body = traces(*items) if signal == "traces" else logs_body(*items)
            response = await ingest.take(signal, PROTOBUF, body)
            assert response.status == 200
        await ingest.release_all()
    finally:
        ingest.close()
        await pipeline.close()
    return sorted(orjson.dumps(r) for r in sink.records), pipeline.stats.native_frames


#: Found by the property below: a root alone, sent again after its tree was published, then
#: its other spans (late). The resend must meet the published memory when it comes.
RESENT_AFTER_PUBLISHED = (
    [
        ("traces", [span(1, trace=trace_id(0))]),
        ("traces", [span(1, trace=trace_id(0))]),
        (
            "traces",
            [
                span(3, 2, trace=trace_id(0)),
                span(2, 1, trace=trace_id(0)),
                span(4, 1, trace=trace_id(0)),
            ],
        ),
    ],
    [0.0, 40.0, 0.0],
    30.0,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
@example(RESENT_AFTER_PUBLISHED)
def test_whole_trees_skipping_the_engine_publish_what_the_engine_would(
    scenario: tuple[list[Request], list[float], float],
) -> None:
    """The same records, byte for byte (complete trees, late spans, duplicates dropped,
    conflicts flagged, log records in their spans), with whole traces skipping the engine
    as with every span fed to it."""
    requests, gaps, settle = scenario
    fast, native_frames = asyncio.run(run(True, requests, gaps, settle))
    event(f"whole trees skipped the engine: {native_frames > 0}")
    reference, none = asyncio.run(run(False, requests, gaps, settle))
    assert none == 0
    assert fast == reference


def test_the_oracle_sees_the_fast_path_taken() -> None:
    """A scenario where whole trees take the native path (the oracle above compares
    something): one request of two whole traces, held, then published natively."""
    spans = [span(2, 1, trace=trace_id(0)), span(1, trace=trace_id(0)), span(1, trace=trace_id(1))]
    requests: list[Request] = [("traces", spans)]
    fast, native_frames = asyncio.run(run(True, requests, [0.0], 30.0))
    reference, _ = asyncio.run(run(False, requests, [0.0], 30.0))
    assert native_frames == 1 and fast == reference and len(fast) == 2


# ---------------------------------------------------------------------- the server


async def test_with_no_settle_whole_trees_go_natively_the_rest_to_the_engine() -> None:
    """otlp_settle 0: a request's whole trace is published through the fast path at once,
    its other trace (a parent elsewhere) waits in the engine for the rest."""
    sink = MemoryPublisher()
    server = proxy(sink, otlp_settle=0)
    await server.start()
    try:
        assert server.pipeline is not None
        stats = server.pipeline.stats
        body = traces(
            span(2, 1, trace=trace_id(0)), span(1, trace=trace_id(0)), span(5, 4, trace=trace_id(1))
        )
        status, _, _ = await post(server, "/v1/traces", body)
        [tree] = await published(sink)
        assert status == 200 and tree["uuid"] == trace_id(0).hex() and tree["complete"] is True
        assert stats.native_frames == 1 and server.pipeline.buffer.is_open(trace_id(1).hex())
        await post(server, "/v1/traces", traces(span(4, trace=trace_id(1))))
        [_, other] = await published(sink, 2)
        assert other["uuid"] == trace_id(1).hex() and other["complete"] is True
    finally:
        await server.stop()


async def test_held_whole_trees_past_max_open_bytes_go_early_counted() -> None:
    """The settle holds whole trees within the engine's max_open_bytes: past it the oldest
    request's trees are published before their settle, complete, and counted."""
    sink = MemoryPublisher()
    server = proxy(sink, otlp_settle=3600.0, max_open_bytes=1500, mon_port=0)
    await server.start()
    try:
        assert server.listener is not None
        ingest = server.listener.otlp
        first = traces(span(1, trace=trace_id(0)), span(2, 1, trace=trace_id(0)))
        await post(server, "/v1/traces", first)
        assert ingest.settle.count == 1 and 0 < ingest.settle.nbytes <= 1500
        assert not sink.records
        second = traces(span(1, trace=trace_id(1)), span(2, 1, trace=trace_id(1)))
        await post(server, "/v1/traces", second)
        [early] = await published(sink)
        assert early["uuid"] == trace_id(0).hex() and early["complete"] is True
        assert ingest.released_early == 1 and ingest.settle.count == 1
        metrics = await asyncio.to_thread(fetch_metrics, server.mon_port)
        assert metrics.get("async_logging_otlp_released_early_total") == 1
        assert metrics.get("async_logging_otlp_held_bytes") == ingest.settle.nbytes
    finally:
        await server.stop()
    assert [t["uuid"] for t in sink.transactions] == [trace_id(0).hex(), trace_id(1).hex()]


async def test_after_a_drain_began_nothing_is_held() -> None:
    """Once the settle let everything go for a drain, a request still taken is fed at once
    (it could otherwise wait past the pipeline's close)."""
    sink = MemoryPublisher()
    server = proxy(sink, otlp_settle=3600.0)
    await server.start()
    try:
        assert server.listener is not None
        await server.listener.otlp.release_all()
        await post(server, "/v1/traces", traces(span(1), span(2, 1)))
        [tree] = await published(sink)
        assert tree["complete"] is True and server.listener.otlp.settle.count == 0
    finally:
        await server.stop()


def test_a_held_request_decodes_back_to_its_events() -> None:
    """What the settle holds is the request's whole traces as MessagePack, which decode to
    the very events the mapping made (the reference path's input when the fast path
    declines)."""
    events = events_of(span(2, 1), span(1))
    cut = split_whole(events, lambda _: False, hold_roots=True)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(cut.whole)) == events


# ---------------------------------------------------------------------- at the limits


class GatedSink(MemoryPublisher):
    """A sink that publishes nothing until its gate opens: the publish queue stays full."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def publish_many(self, records: Any) -> None:
        self.gate.wait(TIMEOUT)
        super().publish_many(records)


async def a_request_waiting_for_room(
    held: bytes, waiting: bytes, buffer: LogBuffer | None = None
) -> tuple[Pipeline, GatedSink, asyncio.Task[Any]]:
    """A pipeline whose settle holds ``held`` and whose publish queue is then full (one log
    record for a stuck sink), the request ``waiting`` for room in it, and a drain begun."""
    sink = GatedSink()
    pipeline = Pipeline(buffer or LogBuffer(), sink, publish_queue=1, wait_for_publisher=TIMEOUT)
    pipeline.start()
    ingest = OtlpIngest(pipeline, settle=30.0, clock=FakeTime())
    assert (await ingest.take("traces", PROTOBUF, held)).status == 200
    lone = logs_body(LogRecord(time_unix_nano=T0_NS))  # no trace: published at once
    assert (await ingest.take("logs", PROTOBUF, lone)).status == 200
    waiting_task = asyncio.create_task(ingest.take("traces", PROTOBUF, waiting))
    await asyncio.sleep(0)  # one turn: the request runs (all synchronous) up to its wait
    assert pipeline.stats.backpressure_waits == 1 and not waiting_task.done()
    await ingest.release_all()  # a drain: the settle lets go, then the pipeline closes
    return pipeline, sink, waiting_task


async def refused_at_the_close(
    pipeline: Pipeline, sink: GatedSink, waiting: asyncio.Task[Any]
) -> list[dict[str, Any]]:
    """Close the pipeline: the request ``waiting`` is refused (503, to send again); then
    let the sink publish. The transactions published."""
    closing = asyncio.create_task(pipeline.close())
    with pytest.raises(LimitExceeded, match="shutting_down"):
        await waiting
    sink.gate.set()
    await closing
    return sink.transactions


async def test_a_request_waiting_at_a_drain_is_refused_whole_and_costs_nothing_held() -> None:
    """A straggler of a held trace waits for room when the drain comes: it is refused (503,
    to send again), and the held request it touches is published complete, not unheld
    half-way and lost."""
    t = trace_id(0)
    pipeline, sink, straggler = await a_request_waiting_for_room(
        traces(span(2, 1, trace=t), span(1, trace=t)), traces(span(3, 2, trace=t))
    )
    [tree] = await refused_at_the_close(pipeline, sink, straggler)
    assert tree["complete"] is True and tree["uuid"] == t.hex()
    assert [c["event"] for c in tree["children"]] == [sid(2).hex()]


async def test_trees_a_request_would_shed_are_published_at_a_drain() -> None:
    """A request waiting for room whose trees would push the held bytes past
    max_open_bytes (shedding the oldest) when the drain comes: it is refused, and the
    trees held are published complete by the drain, not let go into a closing pipeline."""
    t, u = trace_id(0), trace_id(1)
    pipeline, sink, request = await a_request_waiting_for_room(
        traces(span(2, 1, trace=t), span(1, trace=t)),
        traces(span(2, 1, trace=u), span(1, trace=u)),
        LogBuffer(max_open_bytes=1500),
    )
    [tree] = await refused_at_the_close(pipeline, sink, request)
    assert tree["uuid"] == t.hex() and tree["complete"] is True


async def test_a_request_is_taken_whole_or_not_at_all_when_the_pipeline_closes() -> None:
    """With no settle, a request of a whole trace and a partial one, while the queue fills
    and the pipeline closes: either it is answered and both parts are published, or it is
    refused (to send again) and neither is (a resend would publish its whole trace twice)."""
    sink = GatedSink()
    pipeline = Pipeline(LogBuffer(), sink, publish_queue=1, wait_for_publisher=TIMEOUT)
    pipeline.start()
    ingest = OtlpIngest(pipeline, settle=0.0)
    a, b = trace_id(0), trace_id(1)
    body = traces(span(2, 1, trace=a), span(1, trace=a), span(5, 4, trace=b))
    request = asyncio.create_task(ingest.take("traces", PROTOBUF, body))
    await asyncio.sleep(0)  # one turn: the request runs up to its first wait, if any
    closing = asyncio.create_task(pipeline.close())
    try:
        taken = (await request).status == 200
    except LimitExceeded:
        taken = False
    sink.gate.set()
    await closing
    published_uuids = {t["uuid"] for t in sink.transactions}
    assert published_uuids == ({a.hex(), b.hex()} if taken else set())


async def test_a_request_past_the_frame_limits_still_takes_the_fast_path() -> None:
    """A span is two events or more, and its MessagePack bigger than its protobuf: the
    request's whole trees go through the fast path whatever the per-frame limits."""
    sink = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), sink, wire_limits=WireLimits(max_events_per_frame=8))
    pipeline.start()
    ingest = OtlpIngest(pipeline, settle=0.0)
    try:
        body = traces(span(1), *(span(n, 1) for n in range(2, 7)))  # 6 spans, 12 events
        assert (await ingest.take("traces", PROTOBUF, body)).status == 200
    finally:
        await pipeline.close()
    [tree] = sink.transactions
    assert len(tree["children"]) == 5 and pipeline.stats.native_frames == 1


class PluginBuffer:
    """A buffer plug-in with only what the server requires of one (no native path)."""

    def __init__(self) -> None:
        self._engine = LogBuffer()
        self.stats = self._engine.stats
        self.rejected = self._engine.rejected
        self.incomplete = self._engine.incomplete

    def feed_many(self, events: Any) -> Any:
        return self._engine.feed_many(events)

    def expire(self) -> Any:
        return self._engine.expire()

    def flush_all(self, reason: str = "shutdown") -> Any:
        return self._engine.flush_all(reason)


async def test_a_buffer_plug_in_takes_otlp_as_before() -> None:
    """A plug-in that has no native path (nor says so) takes OTLP spans through its
    feed_many, as before whole traces could skip the engine."""
    sink = MemoryPublisher()
    server = proxy(sink, buffer=PluginBuffer(), otlp_settle=0)
    await server.start()
    try:
        status, _, _ = await post(server, "/v1/traces", traces(span(2, 1), span(1)))
        [tree] = await published(sink)
        assert status == 200 and tree["complete"] is True
    finally:
        await server.stop()
