"""Benchmark: end-to-end ingest of the proxy, store on (the default) beside JSON lines only
(docs/design.md §7, issue 11).

Starts ``async-logging serve`` as a subprocess (one worker, JSON lines to a temporary
file), drives it with several WebSocket connections sending pre-encoded MessagePack frames
of whole shuffled 12-event transactions, and waits until every tree is in the output file:
that is the burst, timed from the first frame sent to the last tree written. It does so
with the store off (JSON lines only) and with the defaults (the SQLite store on, following
the file in its own process), ``--rounds`` times each, alternating, and prints the best of
each beside the bare msgpack-decode rate of the same frames measured in the same run. With
the store on it also prints the store's lag when the burst ended (from ``/metrics``) and
how long the store took after it to catch up. Then it checks every tree in the output
(and, with the store on, that the store holds every one).

Run: ``python bench/ingest.py [--transactions N] [--connections C] [--tx-per-frame K]
[--rounds R] [--server-arg=FLAG ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgpack
import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import EVENTS_PER_TX, shuffled_transactions

ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/.*monitoring http://[^:]+:(\d+)")


def serve_command(out: Path, store: str, extra: Sequence[str]) -> list[str]:
    """``async-logging serve`` on free loopback ports, heartbeats off, JSON lines to ``out``
    (never rotated), the store at ``store`` (``""``: off), then ``extra``."""
    return [
        sys.executable,
        "-m",
        "async_logging.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--mon-port",
        "0",
        "--heartbeat-interval",
        "0",
        "--log-file",
        str(out),
        "--store",
        store,
        "--log-max-bytes",
        "0",
        *extra,
    ]


def start_server(
    out: Path, store: bool, extra: list[str]
) -> tuple[subprocess.Popen[str], int, int]:
    # the store (on by default) beside the log file: a fresh one each run, not ./log/
    cmd = serve_command(out, str(out.with_name("trees.sqlite")) if store else "", extra)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = ANNOUNCE.search(line)
        if m:
            return proc, int(m.group(1)), int(m.group(2))
    raise SystemExit(f"server did not start (exit {proc.wait()})")


async def drive(port: int, frames: list[bytes], connections: int) -> None:
    """Send every frame, spread over ``connections`` WebSockets, as fast as they take them."""
    async with aiohttp.ClientSession() as session:

        async def one(chunk: list[bytes]) -> None:
            ws = await session.ws_connect(
                f"ws://127.0.0.1:{port}/", protocols=("log-protocol",), max_msg_size=0
            )
            assert (await ws.receive()).data == "ready"
            for frame in chunk:
                await ws.send_bytes(frame)
            await ws.close()

        await asyncio.gather(*(one(frames[i::connections]) for i in range(connections)))


def count_lines(path: Path, offset: int, count: int) -> tuple[int, int]:
    if not path.exists():
        return offset, count
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    return offset + len(data), count + data.count(b"\n")


def check(path: Path, n: int) -> None:
    """Every transaction exactly once, complete, with the expected shape."""
    seen = set()
    for line in path.read_bytes().splitlines():
        rec = orjson.loads(line)
        assert rec["kind"] == "transaction" and rec["complete"] is True, rec
        kids = rec["children"]
        assert [c["kind"] for c in kids] == [
            "transaction",
            "transaction",
            "atomicEvent",
            "atomicEvent",
        ]
        assert all(len(c["children"]) == 2 and c["complete"] for c in kids[:2])
        assert rec["duration"] == 12 and rec["status"] == "0"
        assert rec["uuid"] not in seen
        seen.add(rec["uuid"])
    assert len(seen) == n, f"{len(seen)} of {n} trees in the output"


def bare_decode_rate(frames: list[bytes], events: int) -> tuple[float, float]:
    best_mp = best_ms = float("inf")
    dec = msgspec.msgpack.Decoder()
    for _ in range(3):
        t = time.perf_counter()
        for f in frames:
            msgpack.unpackb(f)
        best_mp = min(best_mp, time.perf_counter() - t)
        t = time.perf_counter()
        for f in frames:
            dec.decode(f)
        best_ms = min(best_ms, time.perf_counter() - t)
    return events / best_mp, events / best_ms


def store_status(mon_port: int) -> dict[str, float]:
    """The store's samples from ``/metrics`` (``async_logging_store_*``)."""
    from prometheus_client.parser import text_string_to_metric_families

    async def fetch() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{mon_port}/metrics") as resp,
        ):
            return await resp.text()

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(asyncio.run(fetch())):
        for sample in family.samples:
            if sample.name.startswith("async_logging_store_"):
                out[sample.name[len("async_logging_store_") :]] = sample.value
    return out


class Run:
    """One burst: its rate and, with the store on, the store's lag and catch-up time."""

    def __init__(self, rate: float, sent: float, written: float) -> None:
        self.rate, self.sent, self.written = rate, sent, written
        self.lag_records = self.lag_seconds = self.catch_up = 0.0


def burst(frames: list[bytes], n: int, events: int, connections: int, store: bool,
          extra: list[str]) -> Run:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all.log"
        proc, port, mon_port = start_server(out, store, extra)
        try:
            t0 = time.perf_counter()
            asyncio.run(drive(port, frames, connections))
            t_sent = time.perf_counter() - t0
            offset = lines = 0
            deadline = time.monotonic() + 300
            while lines < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {lines} of {n} trees written after 300 s")
                offset, lines = count_lines(out, offset, lines)
                if lines < n:
                    time.sleep(0.002)
            elapsed = time.perf_counter() - t0
            run = Run(events / elapsed, t_sent, elapsed)
            if store:
                st = store_status(mon_port)
                run.lag_records, run.lag_seconds = st["lag_records"], st["lag_seconds"]
                t_end = time.perf_counter()
                while st["records_total"] < n:
                    if time.perf_counter() - t_end > 300:
                        raise SystemExit(f"the store took {st['records_total']} of {n} in 300 s")
                    time.sleep(0.02)
                    st = store_status(mon_port)
                run.catch_up = time.perf_counter() - t_end
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        check(out, n)
        if store:
            import sqlite3

            conn = sqlite3.connect(out.with_name("trees.sqlite"))
            stored = conn.execute("SELECT count(DISTINCT uuid) FROM trees").fetchone()[0]
            conn.close()
            assert stored == n, f"{stored} of {n} trees in the store"
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Past max_published_memory (100,000 uuids): the steady state of a server that has
    # been up a while, evicting the oldest remembered tree for each new one.
    ap.add_argument("--transactions", type=int, default=200_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--tx-per-frame", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="bursts of each configuration")
    ap.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = ap.parse_args()
    n, k = args.transactions, args.tx_per_frame
    # Stamped now: with an old fixed time the store's age retention would delete every tree.
    txs = shuffled_transactions(n, t0=int(time.time() * 1000))
    frames = [msgpack.packb([e for tx in txs[i : i + k] for e in tx]) for i in range(0, n, k)]
    events = n * EVENTS_PER_TX
    mp_rate, ms_rate = bare_decode_rate(frames, events)
    runs: dict[bool, list[Run]] = {False: [], True: []}
    for _ in range(args.rounds):
        for store in (False, True):
            runs[store].append(burst(frames, n, events, args.connections, store, args.server_arg))
    jsonl = max(runs[False], key=lambda r: r.rate)
    default = max(runs[True], key=lambda r: r.rate)
    print(
        f"ingest bench: {n} transactions x {EVENTS_PER_TX} events, {k} per frame, "
        f"{args.connections} WebSocket connections, 1 worker; best of {args.rounds} bursts "
        "each, alternating" + (f"; serve {' '.join(args.server_arg)}" if args.server_arg else "")
    )
    print(f"  bare msgpack-python unpackb      : {mp_rate:>12,.0f} events/s")
    print(f"  bare msgspec decode              : {ms_rate:>12,.0f} events/s")
    for name, best, all_runs in (
        ("JSON lines only (store off)", jsonl, runs[False]),
        ("defaults (store on)", default, runs[True]),
    ):
        rates = ", ".join(f"{r.rate:,.0f}" for r in all_runs)
        print(
            f"  {name:<33}: {best.rate:>12,.0f} events/s (all sent after {best.sent:.2f} s, "
            f"all written after {best.written:.2f} s; runs: {rates})"
        )
    print(f"  JSON lines only / msgpack-python : {jsonl.rate / mp_rate:>12.2f}x   target >= 0.8")
    print(
        f"  defaults / JSON lines only       : {default.rate / jsonl.rate:>12.2f}x   target >= 0.9"
    )
    for r in runs[True]:
        print(
            f"  store at the end of a burst      : {r.lag_records:>12,.0f} records behind, "
            f"{r.lag_seconds:.2f} s; caught up {r.catch_up:.2f} s after the burst"
        )
    print(f"  every tree checked               : {n} complete, correct, once each (and stored)")
    print(f"  (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
