"""Benchmark: end-to-end ingest of the proxy (DESIGN §7, issue 3).

Starts ``async-logging serve`` as a subprocess (one worker, JSON lines to a temporary file,
and by default the SQLite store beside it, as ``serve`` runs; ``--server-arg=--store=``
turns the store off, leaving the path the issue's target is about), drives it with several WebSocket connections sending pre-encoded MessagePack frames of
whole shuffled 12-event transactions, waits until every tree is in the output file, and
prints events/s end to end beside the bare msgpack-decode rate of the same frames measured
in the same run, as a ratio. Then it checks every tree in the output.

Run: ``python bench/ingest.py [--transactions N] [--connections C] [--tx-per-frame K]
[--server-arg=--store=]``.
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
from pathlib import Path

import aiohttp
import msgpack
import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import EVENTS_PER_TX, shuffled_transactions

ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/")


def start_server(out: Path, extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "async_logging.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--mon-port",
        "-1",
        "--heartbeat-interval",
        "0",
        "--log-file",
        str(out),
        # the store (on by default) beside the log file: a fresh one each run, not ./log/
        "--store",
        str(out.with_name("trees.sqlite")),
        "--log-max-bytes",
        "0",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = ANNOUNCE.search(line)
        if m:
            return proc, int(m.group(1))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Past max_published_memory (100,000 uuids): the steady state of a server that has
    # been up a while, evicting the oldest remembered tree for each new one.
    ap.add_argument("--transactions", type=int, default=200_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--tx-per-frame", type=int, default=10)
    ap.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = ap.parse_args()
    n, k = args.transactions, args.tx_per_frame
    # Stamped now: with an old fixed time the store's age retention would delete every tree.
    txs = shuffled_transactions(n, t0=int(time.time() * 1000))
    frames = [msgpack.packb([e for tx in txs[i : i + k] for e in tx]) for i in range(0, n, k)]
    events = n * EVENTS_PER_TX
    mp_rate, ms_rate = bare_decode_rate(frames, events)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all.log"
        proc, port = start_server(out, args.server_arg)
        try:
            t0 = time.perf_counter()
            asyncio.run(drive(port, frames, args.connections))
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
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        check(out, n)
    rate = events / elapsed
    store = not any(a in ("--store=", "--store=''") for a in args.server_arg)
    print(
        f"ingest bench: {n} transactions x {EVENTS_PER_TX} events, {k} per frame, "
        f"{args.connections} WebSocket connections, 1 worker, JSONL file"
        + (" and the SQLite store (the default)" if store else " only (store off)")
        + (f"; serve {' '.join(args.server_arg)}" if args.server_arg else "")
    )
    print(f"  bare msgpack-python unpackb  : {mp_rate:>12,.0f} events/s")
    print(f"  bare msgspec decode          : {ms_rate:>12,.0f} events/s")
    print(
        f"  server end to end            : {rate:>12,.0f} events/s "
        f"(all sent after {t_sent:.2f} s, all written after {elapsed:.2f} s)"
    )
    print(f"  end to end / msgpack-python  : {rate / mp_rate:>12.2f}x")
    print(f"  end to end / msgspec         : {rate / ms_rate:>12.2f}x")
    print(f"  every tree checked           : {n} complete, correct, once each")
    print(f"  (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
