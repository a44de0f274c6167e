"""Benchmark: reassembly over the bus (docs/design.md §8, issue 15) beside one process.

Starts a lone JetStream server (``nats-server -js``, a temporary store, one replica: on one
machine a three-node cluster would only measure replication on the same cores), then for
1, 2 and 4 *pairs* starts that many ``serve --bus`` ingest nodes and as many
``reassemble --member K/N`` nodes, drives them with WebSocket connections sending
pre-encoded MessagePack frames of whole shuffled 12-event transactions (spread over the
ingest nodes), and times the burst from the first frame sent to the last tree stored on the
trees stream. Beside it, the same frames through one ``serve`` without a bus (JSON lines
only), timed to the last tree written. For each it prints events/s, the ratio to the
single process, and the CPU time every process spent per event (ingest nodes,
reassemblers, nats-server): what the bus costs per event. Then it reads the trees stream
back and checks every tree: complete, correct, once, and says how much smaller compression
made its messages. The bus runs use the default ``bus_compression = "zstd"``; one more run
of one pair with ``none`` shows what the figure owes to compression. The bench's events are
far more alike than real logs (the same names, hosts and messages over and over), so they
compress far better than real ones would: real figures lie between the two runs.

Run: ``python bench/scale.py [--transactions N] [--pairs 1,2,4] [--partitions P]
[--connections C] [--tx-per-frame K] [--rounds R] [--no-plain]``. Each figure is the best of
``--rounds`` runs (2), every run listed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgpack
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import EVENTS_PER_TX, shuffled_transactions
from ingest import ANNOUNCE, check, count_lines, drive, start_server

REASSEMBLING = re.compile(r"reassembling partitions")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu(procs: list[psutil.Process]) -> float:
    """CPU seconds (user + system) the processes spent so far."""
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def no_bus(frames: list[bytes], n: int, connections: int) -> tuple[float, float]:
    """One ``serve`` (JSON lines only): events/s and its CPU seconds per event."""
    events = n * EVENTS_PER_TX
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all.log"
        proc, port, _ = start_server(out, False, [])
        try:
            p = psutil.Process(proc.pid)
            before = cpu([p])
            t0 = time.perf_counter()
            asyncio.run(drive(port, frames, connections))
            offset = lines = 0
            while lines < n:
                offset, lines = count_lines(out, offset, lines)
                if lines < n:
                    time.sleep(0.002)
            elapsed = time.perf_counter() - t0
            spent = cpu([p]) - before
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        check(out, n)
    return events / elapsed, spent / events


def node(args: list[str], pattern: re.Pattern[str]) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start ``async-logging <args>`` and wait for its announcement."""
    cmd = [sys.executable, "-m", "async_logging.cli", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = pattern.search(line)
        if m:
            return proc, m
    raise SystemExit(f"{args[0]} did not start (exit {proc.wait()})")


async def stream_made(url: str) -> None:
    """Wait until an ingest node made the events stream."""
    import nats

    nc = await nats.connect(url)
    try:
        for _ in range(500):
            try:
                await nc.jetstream().stream_info("ALOG_EVENTS")
                return
            except Exception:
                await asyncio.sleep(0.02)
        raise SystemExit("the ingest nodes did not make the events stream")
    finally:
        await nc.close()


async def wait_trees(url: str, timeout: float = 600) -> None:
    """Until the reassemblers took every event: every message of the events stream acked
    (a work queue: it is then empty) and every partition's consumer caught up; once so,
    every tree is stored (a message is acked after its trees are)."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = await js.stream_info("ALOG_EVENTS")
            if info.state.messages == 0 and info.state.last_seq > 0:
                consumers = await js.consumers_info("ALOG_EVENTS")
                if all(c.num_pending == 0 and c.num_ack_pending == 0 for c in consumers):
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"the events were not all taken after {timeout:g} s")
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


async def message_counts(url: str) -> tuple[int, int]:
    """Messages published to the events stream and to the trees stream."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        events = (await js.stream_info("ALOG_EVENTS")).state.last_seq
        trees = (await js.stream_info("ALOG_TREES")).state.last_seq
        return int(events), int(trees)
    finally:
        await nc.close()


async def check_trees(url: str, n: int) -> float:
    """Every tree on the trees stream: complete, the expected shape, each uuid once.
    Returns how many times smaller its messages are than the lines they hold."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from async_logging.bus.codec import decode

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "alog.trees.*", stream="ALOG_TREES", config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        total = (await js.stream_info("ALOG_TREES")).state.messages
        seen: set[str] = set()
        read = sent = plain = 0
        while read < total:
            for msg in await sub.fetch(min(200, total - read), timeout=30):
                read += 1
                lines = decode(msg.data, msg.headers)
                sent += len(msg.data)
                plain += len(lines)
                for line in lines.splitlines():
                    rec = orjson.loads(line)
                    assert rec["kind"] == "transaction" and rec["complete"] is True, rec
                    assert len(rec["children"]) == 4 and rec["duration"] == 12, rec
                    assert rec["uuid"] not in seen, rec["uuid"]
                    seen.add(rec["uuid"])
        assert len(seen) == n, f"{len(seen)} of {n} trees on the bus"
        return plain / sent
    finally:
        await nc.close()


def drive_acked(ports: list[int], frames: list[bytes], connections: int) -> None:
    """Send every frame as an envelope over ``connections`` WebSockets spread round-robin
    over the ingest nodes' ports, and wait until each is acked (stored on the bus)."""

    async def one(session: aiohttp.ClientSession, port: int, chunk: list[bytes]) -> None:
        ws = await session.ws_connect(
            f"ws://127.0.0.1:{port}/", protocols=("log-protocol",), max_msg_size=0
        )
        assert (await ws.receive()).data == "ready"

        async def answers() -> None:
            for _ in chunk:
                answer = orjson.loads((await ws.receive()).data)
                assert "error" not in answer, answer

        reading = asyncio.create_task(answers())
        for frame in chunk:
            await ws.send_bytes(frame)
        await reading
        await ws.close()

    async def all_of_them() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(
                    one(session, ports[i % len(ports)], frames[i::connections])
                    for i in range(connections)
                )
            )

    asyncio.run(all_of_them())


def on_bus(
    envelopes: list[bytes],
    n: int,
    pairs: int,
    partitions: int,
    connections: int,
    nats_bin: str,
    compression: str = "zstd",
) -> dict[str, float]:
    """``pairs`` ingest nodes and reassemblers on one JetStream server: events/s and CPU
    seconds per event of each kind of process."""
    events = n * EVENTS_PER_TX
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"nats://127.0.0.1:{port}"
        server = subprocess.Popen(
            [nats_bin, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs: list[subprocess.Popen[str]] = []
        try:
            time.sleep(0.5)
            bus = ["--bus", url, "--bus-compression", compression, "--partitions", str(partitions)]
            ingest_ports = []
            ingest, reasm = [], []
            for _ in range(pairs):
                proc, m = node(
                    ["serve", "--host", "127.0.0.1", "--port", "0", "--mon-port", "0",
                     "--heartbeat-interval", "0", "--log-file", f"{tmp}/unused.log", *bus],
                    ANNOUNCE,
                )  # fmt: skip
                procs.append(proc)
                ingest.append(psutil.Process(proc.pid))
                ingest_ports.append(int(m.group(1)))
            asyncio.run(stream_made(url))  # reassemblers read the partitions from it
            for k in range(1, pairs + 1):
                proc, _ = node(
                    ["reassemble", "--member", f"{k}/{pairs}", "--mon-port", "-1", *bus[:4]],
                    REASSEMBLING,
                )
                procs.append(proc)
                reasm.append(psutil.Process(proc.pid))
            nats_proc = [psutil.Process(server.pid)]
            time.sleep(1.0)  # every node connected, consumers bound
            before = [cpu(ingest), cpu(reasm), cpu(nats_proc)]
            t0 = time.perf_counter()
            drive_acked(ingest_ports, envelopes, connections)
            t_acked = time.perf_counter() - t0
            asyncio.run(wait_trees(url))
            elapsed = time.perf_counter() - t0
            after = [cpu(ingest), cpu(reasm), cpu(nats_proc)]
            shrunk = asyncio.run(check_trees(url, n))
            counts = asyncio.run(message_counts(url))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
            server.terminate()
            server.wait(timeout=30)
    spent = [(a - b) / events for a, b in zip(after, before, strict=True)]
    return {
        "rate": events / elapsed,
        "acked_rate": events / t_acked,
        "ingest": spent[0],
        "reassemble": spent[1],
        "nats": spent[2],
        "event_messages": counts[0],
        "tree_messages": counts[1],
        "shrunk": shrunk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transactions", type=int, default=40_000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--tx-per-frame", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--pairs", default="1,2,4", help="comma-separated numbers of pairs")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each; the best is printed")
    ap.add_argument(
        "--no-plain",
        dest="plain",
        action="store_false",
        help="skip the run of one pair with bus_compression = none",
    )
    args = ap.parse_args()
    nats_bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(nats_bin):
        raise SystemExit("nats-server is not installed (Debian: apt-get install nats-server)")
    n, k = args.transactions, args.tx_per_frame
    txs = shuffled_transactions(n, t0=int(time.time() * 1000))
    frames = [msgpack.packb([e for tx in txs[i : i + k] for e in tx]) for i in range(0, n, k)]
    # The same frames as envelopes: the bus runs wait for each ack (stored on the bus).
    envelopes = [
        msgpack.packb({"seq": j, "logs": [e for tx in txs[i : i + k] for e in tx]})
        for j, i in enumerate(range(0, n, k))
    ]
    # Each figure is the best of --rounds runs (the machine is shared: single runs swing).
    singles = [no_bus(frames, n, args.connections) for _ in range(args.rounds)]
    single, single_cpu = max(singles)
    print(
        f"scale bench: {n} transactions x {EVENTS_PER_TX} events, {k} per frame, "
        f"{args.connections} WebSocket connections, {args.partitions} partitions, one "
        f"nats-server (JetStream, file store, 1 replica); {os.cpu_count()} cores"
    )
    print(
        f"  one process, no bus            : {single:>10,.0f} events/s   "
        f"cpu {single_cpu * 1e6:5.2f} us/event; runs: {', '.join(f'{r:,.0f}' for r, _ in singles)}"
    )
    runs = [(int(p), "zstd") for p in args.pairs.split(",")]
    if args.plain:
        runs.append((1, "none"))
    for pairs, compression in runs:
        tries = [
            on_bus(envelopes, n, pairs, args.partitions, args.connections, nats_bin, compression)
            for _ in range(args.rounds)
        ]
        r = max(tries, key=lambda t: t["rate"])
        total = r["ingest"] + r["reassemble"] + r["nats"]
        label = f"{pairs} pair{'s' if pairs > 1 else ' '} on the bus" + (
            ", uncompressed" if compression == "none" else ""
        )
        print(
            f"  {label:<31}: "
            f"{r['rate']:>10,.0f} events/s   {r['rate'] / single:4.2f}x   "
            f"cpu {total * 1e6:5.2f} us/event (ingest {r['ingest'] * 1e6:.2f}, "
            f"reassemble {r['reassemble'] * 1e6:.2f}, nats-server {r['nats'] * 1e6:.2f}); "
            f"bus cost {(total - single_cpu) * 1e6:+.2f} us/event; "
            f"clients acked at {r['acked_rate']:,.0f} events/s; "
            f"{r['event_messages']:,} + {r['tree_messages']:,} bus messages, trees "
            f"{r['shrunk']:.1f}x smaller than their lines; runs: "
            + ", ".join(f"{t['rate']:,.0f}" for t in tries)
        )
    print("  every tree checked on the trees stream: complete, correct, once each")


if __name__ == "__main__":
    main()
