"""Benchmark: the client's cost on the application thread and its sender's throughput.

Prints, in one run (docs/design.md §7, issue 4):

1. the median cost per call, on the application thread, of ``event()`` inside a
   transaction (the client connected to a real proxy, its sender draining meanwhile),
   beside a stdlib ``logger.info`` to a ``NullHandler``, a ``logger.info`` through a
   ``QueueHandler`` (drained by a ``QueueListener``) and an OpenTelemetry SDK span
   start + end (no-op exporter, batch processor), with the ratios;
2. the events/s that one process's sender delivers (acknowledged) while the application
   thread keeps producing 12-event transactions in a loop: to a real proxy, and to an
   ack-only WebSocket sink (this same script with ``--sink``), which shows the client's
   own ceiling when the proxy is the bottleneck (the proxy's CPU time is printed too).

The proxy and the sink run in subprocesses (the proxy as ``async-logging serve`` writing
JSON lines to a temporary file, the SQLite store off) so they do not share this process's GIL. Costs are medians of
batches of calls: wall time per call, and the application thread's CPU time per call
(``time.thread_time``), which leaves out the time the thread waited for the GIL while the
sender thread ran; the sender thread's own CPU time per event is printed beside them.

Run: ``python bench/client.py [--calls N] [--seconds S]``.
Targets: ``event()`` at most 1/4 of ``logger.info`` → ``NullHandler``; at least 20× cheaper
than an OpenTelemetry span; at least 300k events/s delivered.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from async_logging.client import LogClient, configure, event, transaction

ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/")


def start_server(sink: bool = False, log_dir: str = ".") -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable, "-m", "async_logging.cli", "serve", "--host", "127.0.0.1",
        "--port", "0", "--mon-port", "-1", "--heartbeat-interval", "0",
        # the default sink, in a temporary directory; the SQLite store off (bench/ingest.py
        # measures the proxy with it)
        "--log-file", os.path.join(log_dir, "all.log"), "--log-max-bytes", "0", "--store", "",
    ]  # fmt: skip
    if sink:
        cmd = [sys.executable, __file__, "--sink"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = ANNOUNCE.search(line)
        if m:
            # Keep reading its stderr so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def run_sink() -> None:
    """An ack-only WebSocket endpoint: reads each envelope's seq, answers the ack, keeps nothing."""
    import asyncio

    import msgspec
    from aiohttp import web

    class Seq(msgspec.Struct):
        seq: int = -1

    decode = msgspec.msgpack.Decoder(Seq).decode

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("log-protocol",), max_msg_size=0)
        await ws.prepare(request)
        await ws.send_str("ready")
        async for msg in ws:
            await ws.send_str(f'{{"ack":{decode(msg.data).seq}}}')
        return ws

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on ws://127.0.0.1:{port}/", file=sys.stderr, flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


def new_sender(before: set[threading.Thread]) -> int | None:
    """The native id of the sender thread started since ``before`` was taken (by its name)."""
    for t in threading.enumerate():
        if t not in before and t.name == "async-logging-sender":
            return t.native_id
    return None


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds used so far by the thread ``native_id`` of this process (0 if unknown)."""
    for t in psutil.Process().threads():
        if t.id == native_id:
            return float(t.user_time + t.system_time)
    return 0.0


def per_call(fn: Callable[[], Any], calls: int, batches: int = 15) -> tuple[float, float]:
    """Median (wall ns, app-thread CPU ns) per call over ``batches`` batches of ``calls``."""
    walls, cpus = [], []
    for _ in range(batches):
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - w0) / calls * 1e9)
        cpus.append((time.thread_time() - c0) / calls * 1e9)
    return statistics.median(walls), statistics.median(cpus)


def otel_span_cost(calls: int) -> tuple[float, float] | None:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return None

    class NoopExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoopExporter()))
    tracer = provider.get_tracer("bench")
    try:
        with tracer.start_as_current_span("request"):

            def span() -> None:
                with tracer.start_as_current_span("select"):
                    pass

            return per_call(span, calls)
    finally:
        provider.shutdown()


def costs(port: int, calls: int) -> None:
    # A queue big enough that no call of the measure takes the drop path.
    before = set(threading.enumerate())
    client = configure(
        LogClient(
            url=f"ws://127.0.0.1:{port}/",
            exit_timeout=0,
            max_queue_events=4 * 15 * calls,
            max_queue_bytes=1 << 30,
        )
    )
    if not client.flush(10):
        raise SystemExit("the client could not reach the proxy")

    sender = new_sender(before)
    with transaction("URL", "/bench"):

        def ev() -> None:
            event("DB", "select", "hello", "INFO")

        s0 = thread_cpu(sender)
        ev_wall, ev_cpu = per_call(ev, calls)
    client.flush(30)
    sender_ns = (thread_cpu(sender) - s0) / max(client.stats.acked, 1) * 1e9
    dropped = client.stats.dropped
    client.close(10)

    null_logger = logging.getLogger("bench.null")
    null_logger.addHandler(logging.NullHandler())
    null_logger.propagate = False
    null_logger.setLevel(logging.INFO)
    null_wall, null_cpu = per_call(lambda: null_logger.info("hello %s", "world"), calls)

    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, logging.NullHandler())
    listener.start()
    q_logger = logging.getLogger("bench.queue")
    q_logger.addHandler(logging.handlers.QueueHandler(q))
    q_logger.propagate = False
    q_logger.setLevel(logging.INFO)
    q_wall, q_cpu = per_call(lambda: q_logger.info("hello %s", "world"), calls)
    listener.stop()

    otel = otel_span_cost(calls)

    print(f"cost per call, median of batches of {calls} (wall ns / app-thread CPU ns):")
    print(f"  event() in a transaction      {ev_wall:8.0f} / {ev_cpu:8.0f}   (dropped {dropped})")
    print(
        f"    + the sender thread's CPU   {'':8} / {sender_ns:8.0f}   per event, off the app thread"
    )
    print(f"  logger.info -> NullHandler    {null_wall:8.0f} / {null_cpu:8.0f}")
    print(f"  logger.info -> QueueHandler   {q_wall:8.0f} / {q_cpu:8.0f}")
    if otel is None:
        print("  OpenTelemetry SDK span        n/a (pip install opentelemetry-sdk)")
    else:
        print(f"  OpenTelemetry SDK span        {otel[0]:8.0f} / {otel[1]:8.0f}")
    print("ratios (wall / CPU):")
    print(
        f"  event / logger.info(Null)     {ev_wall / null_wall:8.3f} / {ev_cpu / null_cpu:8.3f}"
        "   target <= 0.25"
    )
    print(f"  event / logger.info(Queue)    {ev_wall / q_wall:8.3f} / {ev_cpu / q_cpu:8.3f}")
    if otel is not None:
        print(
            f"  OTel span / event             {otel[0] / ev_wall:8.1f}x / {otel[1] / ev_cpu:7.1f}x"
            "   target >= 20x"
        )


def throughput(port: int, seconds: float, label: str, peer: subprocess.Popen[str]) -> None:
    before = set(threading.enumerate())
    client = configure(LogClient(url=f"ws://127.0.0.1:{port}/", exit_timeout=0))
    if not client.flush(10):
        raise SystemExit(f"the client could not reach {label}")
    sender = new_sender(before)
    s0, a0 = thread_cpu(sender), time.thread_time()
    peer_cpu = psutil.Process(peer.pid).cpu_times()
    produced = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            with transaction("URL", "/checkout"):
                for _i in range(5):
                    event("DB", "select", "row", "INFO")
                with transaction("API", "payment"):
                    for _i in range(3):
                        event("HTTP", "post", "ok", "INFO")
        produced += 100 * 12
    t_produced = time.perf_counter() - t0
    ok = client.flush(120)
    elapsed = time.perf_counter() - t0
    app_cpu, sender_cpu = time.thread_time() - a0, thread_cpu(sender) - s0
    peer_after = psutil.Process(peer.pid).cpu_times()
    peer_s = peer_after.user - peer_cpu.user + peer_after.system - peer_cpu.system
    s = client.stats
    client.close(10)
    print(f"sender throughput to {label} (app thread producing for {seconds:.0f} s):")
    print(
        f"  produced {produced:,} events in {t_produced:.2f} s ({produced / t_produced:,.0f}/s on "
        f"the app thread), dropped {s.dropped:,} (queue full)"
    )
    print(
        f"  acknowledged {s.acked:,} events in {elapsed:.2f} s: {s.acked / elapsed:,.0f} events/s"
        f" delivered by one process   target >= 300,000"
    )
    print(
        f"  (flushed: {ok}; {s.frames} frames, {s.bytes / max(s.acked, 1):.0f} B/event; CPU s: app "
        f"thread {app_cpu:.2f}, sender {sender_cpu:.2f} = {sender_cpu / max(s.sent, 1) * 1e9:.0f}"
        f" ns/event, peer process {peer_s:.2f} in {elapsed:.2f} s wall)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sink", action="store_true", help="run the ack-only sink (internal)")
    args = parser.parse_args()
    if args.sink:
        run_sink()
        return
    with tempfile.TemporaryDirectory() as log_dir:
        proc, port = start_server(log_dir=log_dir)
        sink, sink_port = start_server(sink=True)
        try:
            costs(port, args.calls)
            label = "a real proxy (async-logging serve, JSON-lines sink)"
            throughput(port, args.seconds, label, proc)
            throughput(sink_port, args.seconds, "an ack-only sink (the client's own ceiling)", sink)
        finally:
            for p in (proc, sink):
                p.terminate()
                p.wait(30)


if __name__ == "__main__":
    main()
