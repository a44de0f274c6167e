"""Benchmark: OTLP/HTTP ingest, end to end, beside the bare protobuf decode of the same bodies
(docs/design.md §7 and §12, issue 14).

Builds ``ExportTraceServiceRequest`` bodies with the official ``opentelemetry-proto``
classes, 512 spans a request, in trees of 12 spans (a server root, three calls, eight
database or HTTP spans under them, with the attributes instrumentations set and a
resource of five attributes), spans in the order an SDK exports them (children first) and
trees running over from one request into the next, each span's ``flags`` saying its parent
is local as the SDK's exporter writes them (so the resource goes on the root only). Starts
``async-logging serve`` as a subprocess (one worker, JSON lines to a temporary file), posts
the bodies over several
connections as fast as they are answered, and waits until every tree is in the file: spans
per second from the first request to the last tree written. It does so with
``--otlp-settle 0`` and with the default settle (a root waits 2 s for the rest of its
trace: the last trees come out that much later), ``--rounds`` times each, and prints the
best of each beside the bare decode rate (``ParseFromString`` of every body) and the rate
of a decode that also reads every field into Python values, measured in the same run, and
of the engine's native fast path alone on the same spans (mapped beforehand, as MessagePack
frames of whole trees): the fastest code here, which does a fraction of the work. Then
it checks every tree in the output: complete, 12 spans, once.

Run: ``python bench/otlp.py [--spans N] [--connections C] [--rounds R] [--gzip]
[--server-arg=FLAG ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from async_logging import LogBuffer
from async_logging.server.otlp import decode_request, map_traces
from async_logging.wire import DEFAULT_LIMITS
from ingest import count_lines, start_server  # the server as bench/ingest.py starts it

SPANS_PER_TREE = 12
#: A span's ``flags`` as the OpenTelemetry SDK's OTLP exporter writes them for a span whose
#: parent (if any) is in the same process: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, not remote.
LOCAL_PARENT = 0x100
SPANS_PER_REQUEST = 512
DEFAULT_SETTLE = 2.0


def kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def tree(n: int, t0_ns: int) -> list[Span]:
    """The 12 spans of trace ``n``, children before their parents (the SDK's export order)."""
    trace_id = (n + 1).to_bytes(16, "big")

    def sid(k: int) -> bytes:
        return ((n + 1) * 16 + k).to_bytes(8, "big")

    def span(k: int, parent: int, name: str, kind: int, start_us: int, dur_us: int,
             attrs: list[KeyValue]) -> Span:  # fmt: skip
        return Span(
            trace_id=trace_id,
            span_id=sid(k),
            parent_span_id=sid(parent) if parent else b"",
            name=name,
            kind=kind,
            start_time_unix_nano=t0_ns + start_us * 1000,
            end_time_unix_nano=t0_ns + (start_us + dur_us) * 1000,
            attributes=attrs,
            flags=LOCAL_PARENT,  # as the SDK's exporter sets them: the parent is not remote
        )

    spans: list[Span] = []
    k = 2
    for call in range(3):  # three calls under the root, 2 or 3 spans under each (8 in all)
        parent = k
        k += 1
        kids = 3 if call < 2 else 2
        for j in range(kids):
            if j % 2:
                attrs = [kv("db.system", "postgresql"), kv("db.statement", "SELECT 1"),
                         kv("db.name", "shop")]  # fmt: skip
                spans.append(span(k, parent, "SELECT orders", 3, 100 * call + 10 * j, 8, attrs))
            else:
                attrs = [kv("http.request.method", "GET"), kv("url.full", f"http://inv/{n}"),
                         kv("http.response.status_code", 200)]  # fmt: skip
                spans.append(span(k, parent, "GET", 3, 100 * call + 10 * j, 8, attrs))
            k += 1
        spans.append(span(parent, 1, f"call-{call}", 1, 100 * call, 90, [kv("step", call)]))
    root_attrs = [kv("http.request.method", "POST"), kv("http.route", "/orders"),
                  kv("http.response.status_code", 200), kv("user.id", n % 1000)]  # fmt: skip
    spans.append(span(1, 0, "POST /orders", 2, 0, 400, root_attrs))
    assert len(spans) == SPANS_PER_TREE
    return spans


def bodies(n_spans: int, compress: bool) -> tuple[list[bytes], int]:
    """Request bodies of 512 spans each (trees run over into the next); the trees."""
    trees = -(-n_spans // SPANS_PER_TREE)
    t0_ns = time.time_ns()
    resource = Resource(
        attributes=[
            kv("service.name", "shop"),
            kv("service.version", "1.4.2"),
            kv("host.name", "web-1"),
            kv("telemetry.sdk.language", "python"),
            kv("telemetry.sdk.name", "opentelemetry"),
        ]
    )
    all_spans = [s for n in range(trees) for s in tree(n, t0_ns + n * 1000)]
    out = []
    for i in range(0, len(all_spans), SPANS_PER_REQUEST):
        req = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(
                    resource=resource,
                    scope_spans=[ScopeSpans(spans=all_spans[i : i + SPANS_PER_REQUEST])],
                )
            ]
        )
        body = req.SerializeToString()
        out.append(gzip.compress(body, 6) if compress else body)
    return out, trees


def decode_rates(bodies: list[bytes], spans: int, compress: bool) -> tuple[float, float]:
    """Spans/s of ``ParseFromString`` alone, and of a decode that reads every field."""
    raw = [gzip.decompress(b) for b in bodies] if compress else bodies
    best_bare = best_read = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for b in raw:
            ExportTraceServiceRequest().ParseFromString(b)
        best_bare = min(best_bare, time.perf_counter() - t)
        t = time.perf_counter()
        for b in raw:
            req = ExportTraceServiceRequest()
            req.ParseFromString(b)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        (s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                         s.kind, s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                         {a.key: getattr(a.value, a.value.WhichOneof("value"))
                          for a in s.attributes})  # fmt: skip
        best_read = min(best_read, time.perf_counter() - t)
    return spans / best_bare, spans / best_read


def native_rate(bodies: list[bytes], spans: int, compress: bool) -> float:
    """Spans/s of the engine's native fast path alone on the same spans, mapped beforehand
    (untimed) and encoded as MessagePack frames of whole trees (about 1,024 events each, as
    the OTLP ingest hands them to it): no HTTP, no protobuf, no mapping, no writing. What the
    fastest code in this project does per span, to set beside the bare decode."""
    events = []
    for b in bodies:
        raw = gzip.decompress(b) if compress else b
        request = decode_request("traces", raw, "application/x-protobuf")
        events.extend(map_traces(request, DEFAULT_LIMITS, body_bytes=len(raw)).events)
    by_trace: dict[str, list[dict[str, object]]] = {}
    for e in events:
        by_trace.setdefault(str(e["uuid"]), []).append(e)
    frames: list[bytes] = []
    chunk: list[dict[str, object]] = []
    for mine in by_trace.values():
        chunk.extend(mine)
        if len(chunk) >= 1024:
            frames.append(msgspec.msgpack.encode(chunk))
            chunk = []
    if chunk:
        frames.append(msgspec.msgpack.encode(chunk))
    best = float("inf")
    for _ in range(3):
        buffer = LogBuffer()
        t = time.perf_counter()
        for frame in frames:
            if buffer.feed_msgpack(frame) is None:
                raise SystemExit("the native fast path declined a frame of whole trees")
        best = min(best, time.perf_counter() - t)
    return spans / best


async def drive(port: int, bodies: list[bytes], connections: int, compress: bool) -> None:
    """Post every body in order over ``connections`` connections, each as soon as one is free
    (in order: a tree running over into the next request stays children-first)."""
    headers = {"Content-Type": "application/x-protobuf"}
    if compress:
        headers["Content-Encoding"] = "gzip"
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/traces", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"HTTP {resp.status}: {await resp.text()}")

        await asyncio.gather(*(worker() for _ in range(connections)))


def check(path: Path, trees: int) -> None:
    """Every tree exactly once, complete, with its 12 spans."""
    seen = set()
    for line in path.read_bytes().splitlines():
        rec = orjson.loads(line)
        assert rec["kind"] == "transaction" and rec["complete"] is True, rec.get("reason")
        stack, spans = [rec], 0
        while stack:
            node = stack.pop()
            spans += 1
            stack.extend(node["children"])
        assert spans == SPANS_PER_TREE, spans
        assert rec["uuid"] not in seen
        seen.add(rec["uuid"])
    assert len(seen) == trees, f"{len(seen)} of {trees} trees in the output"


def burst(bodies: list[bytes], trees: int, spans: int, settle: float, connections: int,
          compress: bool, extra: list[str]) -> tuple[float, float, float]:  # fmt: skip
    """One run: spans/s to the last tree written; seconds to the last answer and to it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all.log"
        proc, port, _ = start_server(out, False, ["--otlp-settle", str(settle), *extra])
        try:
            t0 = time.perf_counter()
            asyncio.run(drive(port, bodies, connections, compress))
            sent = time.perf_counter() - t0
            offset = lines = 0
            deadline = time.monotonic() + 300
            while lines < trees:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {lines} of {trees} trees written after 300 s")
                offset, lines = count_lines(out, offset, lines)
                if lines < trees:
                    time.sleep(0.002)
            written = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        check(out, trees)
    return spans / written, sent, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=300_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="bursts of each configuration")
    ap.add_argument("--gzip", action="store_true", help="gzip the bodies (as SDKs may)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = ap.parse_args()
    body_list, trees = bodies(args.spans, args.gzip)
    spans = trees * SPANS_PER_TREE
    bare, read = decode_rates(body_list, spans, args.gzip)
    native = native_rate(body_list, spans, args.gzip)
    runs: dict[float, list[tuple[float, float, float]]] = {0.0: [], DEFAULT_SETTLE: []}
    for _ in range(args.rounds):
        for settle, results in runs.items():
            results.append(
                burst(body_list, trees, spans, settle, args.connections, args.gzip, args.server_arg)
            )
    size = sum(map(len, body_list)) / len(body_list)
    print(
        f"otlp bench: {spans} spans in {trees} trees of {SPANS_PER_TREE}, "
        f"{SPANS_PER_REQUEST} spans a request ({len(body_list)} requests, {size / 1024:.0f} KiB "
        f"each{', gzip' if args.gzip else ''}), {args.connections} connections, 1 worker; "
        f"best of {args.rounds} bursts each, alternating"
        + (f"; serve {' '.join(args.server_arg)}" if args.server_arg else "")
    )
    print(f"  bare protobuf decode (ParseFromString)   : {bare:>12,.0f} spans/s")
    print(f"  protobuf decode reading every field      : {read:>12,.0f} spans/s")
    print(
        f"  native fast path alone, same spans       : {native:>12,.0f} spans/s "
        f"({native / bare:.2f}x bare decode; frames of whole trees, mapped beforehand: no "
        f"HTTP, protobuf, mapping nor writing)"
    )
    best = {}
    for settle, all_runs in runs.items():
        rate, sent, written = best[settle] = max(all_runs, key=lambda r: r[0])
        rates = ", ".join(f"{r[0]:,.0f}" for r in all_runs)
        print(
            f"  end to end, --otlp-settle {settle:<3g}          : {rate:>12,.0f} spans/s "
            f"(all answered after {sent:.2f} s: {spans / sent:,.0f} spans/s; all written after "
            f"{written:.2f} s; runs: {rates})"
        )
    print(
        f"  settle 0 / bare decode                   : {best[0.0][0] / bare:>12.2f}x   target >= 0.5"
    )
    print(f"  settle 0 / decode reading every field    : {best[0.0][0] / read:>12.2f}x")
    print(
        f"  settle 0, spans/s on one worker          : {best[0.0][0]:>12,.0f}    target >= 100,000"
    )
    print(f"  every tree checked                       : {trees} complete, 12 spans, once each")
    print(f"  (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
