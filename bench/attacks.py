"""Benchmark: faults and attacks against a real ``async-logging serve``, as one table.

Each class of fault or attack runs against a fresh server process (JSON-lines output,
no store), with a well-behaved client posting ordinary trees beside it. Printed per class:
the cases tried, events acknowledged versus events published (read back from the output
file after the server stopped; ``lost`` counts acknowledged events missing from it and
``dup`` unflagged copies), the server's RSS before, at its peak and after, and the longest
the event loop was held (``async_logging_loop_stall_max_seconds``), beside the 100 ms
bound of docs/design.md §7. The good client's worst ack time is the reference measured in
the same run: what an ordinary client waited while the attack ran. RSS "after" is read 12 s
after the attack, once the server has handed freed heap pages back (server/gctune.py).

Run: ``python bench/attacks.py [--only NAME ...] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import serve_command  # the server as bench/ingest.py starts it

T0 = 1_700_000_000_000
TIMEOUT = aiohttp.ClientTimeout(total=60)
ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/.*monitoring (?:http://[^:]+:(\d+)|off)")
MSGPACK = {"Content-Type": "application/x-msgpack"}
#: Seconds waited after an attack before RSS is read "after": past the clean loop's next
#: malloc_trim (every TRIM_EVERY = 10 ticks of a second).
SETTLE = 12.0


# --------------------------------------------------------------------------- the server


class Server:
    """A ``serve`` subprocess: where it listens, its output, its resources."""

    def __init__(self, root: Path, *args: str, fsize: int | None = None) -> None:
        self.root = root
        self.out = root / "log" / "all.log"
        self.args = args
        self.fsize = fsize
        self.stderr: list[str] = []
        self.peak = 0
        self._sampling = False
        self.proc: subprocess.Popen[str] | None = None
        self.port = self.mon_port = 0

    def start(self) -> Server:
        cmd = serve_command(self.out, "", self.args)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        if self.fsize is not None:  # Python ignores SIGXFSZ: a write past it fails (EFBIG)
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (self.fsize, self.fsize))
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr.append(line)
            m = ANNOUNCE.search(line)
            if m:
                self.port, self.mon_port = int(m.group(1)), int(m.group(2))
                threading.Thread(target=self._drain, daemon=True).start()
                self._sampling = True
                threading.Thread(target=self._sample, daemon=True).start()
                return self
        raise RuntimeError("server did not start: " + "".join(self.stderr[-20:]))

    def wait_for(self, text: str, timeout: float = 120.0) -> bool:
        """Whether a line of the server's standard error says ``text`` within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stderr):
                return True
            time.sleep(0.05)
        return False

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _sample(self) -> None:
        while self._sampling:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def fds(self) -> int:
        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).num_fds())

    async def metrics(self) -> dict[str, float]:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            s.get(f"http://127.0.0.1:{self.mon_port}/metrics") as r,
        ):
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self._sampling = False
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            (self.root / "stderr.log").write_text("".join(self.stderr))  # kept with --keep

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        return [orjson.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


# --------------------------------------------------------------------------- events


def tx(uuid: str, children: int = 2, msg: str = "m", close: bool = True) -> list[dict[str, Any]]:
    ev: list[dict[str, Any]] = [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T0}
    ]
    ev += [
        {
            "clazz": "atomicEvent",
            "uuid": uuid,
            "event": str(i + 2),
            "parent": "1",
            "msg": msg,
            "timestamp": T0 + 1 + i,
        }
        for i in range(children)
    ]
    if close:
        ev.append({"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T0 + 99})
    return ev


def nodes(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [record]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("children") or ())


def event_keys(records: list[dict[str, Any]]) -> tuple[Counter[tuple[Any, ...]], int]:
    """Published events (a transaction node is its begin and its end) by identity, with
    copies not flagged ``replayed``; and how many records are flagged incomplete."""
    seen: Counter[tuple[Any, ...]] = Counter()
    incomplete = 0
    for record in records:
        flagged = bool(record.get("replayed"))
        if record.get("complete") is False:
            incomplete += 1
        for n in nodes(record):
            uuid, eid = n.get("uuid"), n.get("event")
            if n.get("kind") == "transaction":
                if not n.get("missing_end"):
                    seen["end", uuid, eid, flagged] += 1
                if not n.get("missing_begin"):
                    seen["begin", uuid, eid, flagged] += 1
            else:
                seen["atomic", uuid, eid, n.get("parent"), n.get("n"), flagged] += 1
    return seen, incomplete


# --------------------------------------------------------------------------- a run


@dataclass
class Row:
    name: str
    cases: str
    acked: int = 0
    refused: int = 0
    published: int = 0
    lost: int = 0
    dup: int = 0
    rss: tuple[int, int, int] = (0, 0, 0)
    stall: float = 0.0
    good_worst: float = 0.0
    notes: list[str] = field(default_factory=list)


class Run:
    """One attack against one server, with the good client beside it."""

    def __init__(self, server: Server, row: Row) -> None:
        self.server = server
        self.row = row
        self.acked: set[tuple[Any, ...]] = set()
        self._good_stop = asyncio.Event()

    def take_answer(self, events: list[dict[str, Any]], answer: dict[str, Any]) -> None:
        """Count the events of a batch the server acked (minus those it refused)."""
        refused = {r.get("index") for r in answer.get("rejected", ())}
        refused_n = answer.get("rejected_count", len(refused))
        self.row.refused += refused_n
        for i, e in enumerate(events):
            if i in refused:
                continue
            clazz = e.get("clazz", "atomicEvent")
            if clazz in ("begin", "end"):
                self.acked.add((clazz, e["uuid"], e["event"], False))
            else:
                self.acked.add(
                    ("atomic", e.get("uuid"), e.get("event"), e.get("parent"), e.get("n"), False)
                )

    async def post(
        self, session: aiohttp.ClientSession, events: list[dict[str, Any]], *, as_json: bool = False
    ) -> int:
        if as_json:  # the standard module: integers past 64 bits too
            body, headers = (
                json.dumps({"logs": events}).encode(),
                {"Content-Type": "application/json"},
            )
        else:
            body, headers = msgpack.packb(events), MSGPACK
        async with session.post(self.server.url + "/log", data=body, headers=headers) as r:
            if r.status == 200:
                self.take_answer(events, await r.json())
            else:
                self.row.refused += len(events)
            return r.status

    async def good_client(self) -> None:
        """Ordinary trees, one post every 50 ms, each ack timed."""
        worst = 0.0
        i = 0
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            while not self._good_stop.is_set():
                t = time.perf_counter()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await self.post(s, tx(f"good-{i}", 3))
                worst = max(worst, time.perf_counter() - t)
                i += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._good_stop.wait(), 0.05)
        self.row.good_worst = worst

    async def run(self, attack: Callable[[Run], Awaitable[None]]) -> Row:
        server, row = self.server, self.row
        before = server.rss()
        good = asyncio.create_task(self.good_client())
        try:
            await attack(self)
        finally:
            self._good_stop.set()
            await good
        metrics = await server.metrics()
        row.stall = metrics.get("async_logging_loop_stall_max_seconds", float("nan"))
        await asyncio.sleep(SETTLE)  # "after" is once the server has handed freed pages back
        after = server.rss()
        server.stop()
        published, incomplete = event_keys(server.records())
        row.rss = (before, server.peak, after)
        self.account(published)
        if incomplete:
            row.notes.append(f"{incomplete} records published incomplete (flagged)")
        return row

    def account(self, published: Counter[tuple[Any, ...]]) -> None:
        """Acked, published, lost (acked, not published) and unflagged duplicates."""
        row = self.row
        row.acked = len(self.acked)
        row.published = sum(published.values())
        keys = {(*k[:-1], False) for k in published}
        row.lost = len({k for k in self.acked if k not in keys})
        row.dup = sum(n - 1 for k, n in published.items() if n > 1 and k[-1] is False)


# --------------------------------------------------------------------------- the attacks


async def shared_key(run: Run) -> None:
    """Frames of 10,000 atomic events sharing id, parent, timestamp and msg."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for f in range(5):
            events = tx(f"shared-{f}", 0)
            events[1:1] = [
                {
                    "uuid": f"shared-{f}",
                    "event": "2",
                    "parent": "1",
                    "timestamp": T0,
                    "msg": "same",
                    "n": i,
                }
                for i in range(9_998)
            ]
            await run.post(s, events)


async def open_big_trees(run: Run) -> None:
    """250 trees of 3.9 MB each, never closed."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for t in range(250):
            await run.post(s, tx(f"open-{t}", 65, "o" * 60_000, close=False))


async def complete_big_trees(run: Run) -> None:
    """200 complete trees of 3.9 MB each, then each resent (duplicates)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for t in range(200):
            await run.post(s, tx(f"big-{t}", 65, "c" * 60_000))
        for t in range(0, 200, 20):
            await run.post(s, tx(f"big-{t}", 65, "c" * 60_000))


async def nulls(run: Run) -> None:
    """A 4 MiB frame: one event carrying ~4 million nils, and a good event beside it."""
    good = tx("beside-nulls", 1)
    bad = {"uuid": "nulls", "parent": "0", "timestamp": T0, "data": [None] * 4_000_000}
    body = msgpack.packb([bad, *good])
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.post(run.server.url + "/log", data=body, headers=MSGPACK) as r,
    ):
        if r.status == 200:
            run.take_answer([bad, *good], await r.json())
        else:
            run.row.refused += 4
            run.row.notes.append(f"nulls frame: HTTP {r.status}")


async def drip(run: Run) -> None:
    """300 multipart bodies dripped one byte a second (request timeout 5 s)."""
    head = (
        b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    socks: list[socket.socket] = []
    fds0 = run.server.fds()
    for _ in range(300):
        with contextlib.suppress(OSError):
            sk = socket.create_connection(("127.0.0.1", run.server.port), timeout=5)
            sk.setblocking(False)
            sk.send(head)
            socks.append(sk)
    peak_fds = run.server.fds()
    closed = 0
    for _ in range(15):
        for sk in socks:
            with contextlib.suppress(OSError):
                sk.send(b"1\r\n-\r\n")
        await asyncio.sleep(1)
    for sk in socks:
        with contextlib.suppress(OSError):
            if sk.recv(1) == b"":
                closed += 1
                continue
            closed += 1  # an answer (408) arrived
    after_fds = run.server.fds()
    for sk in socks:
        sk.close()
    run.row.notes.append(
        f"drip: {len(socks)} opened, fds {fds0}->{peak_fds}->{after_fds} after 15 s, "
        f"{closed} answered or closed"
    )


async def big_bodies(run: Run) -> None:
    """300 bodies of 4 MiB posted at once."""
    body_events = tx("big-body", 65, "b" * 60_000)
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            events = tx(f"big-body-{i}", 65, "b" * 60_000)
            try:
                statuses[await run.post(s, events)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1  # type: ignore[index]

        await asyncio.gather(*(one(i) for i in range(300)))
    del body_events
    run.row.notes.append("big bodies: " + ", ".join(f"{k}: {v}" for k, v in statuses.items()))


async def out_of_range(run: Run) -> None:
    """Timestamps of 1e30 and 1e300, a negative duration, a 31-digit id (as JSON: no
    MessagePack integer holds it): refused at the door, the good events beside them taken."""
    bad = [
        {"uuid": "r1", "parent": "0", "timestamp": 1e30},
        {"uuid": "r2", "parent": "0", "timestamp": T0, "duration": -5},
        {"uuid": "r3", "parent": "0", "timestamp": T0, "event": 10**30},
        {"uuid": "r4", "parent": "0", "timestamp": 1e300},
    ]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for i in range(50):
            await run.post(s, [*bad, *tx(f"beside-{i}", 1)], as_json=True)


async def short_writes(run: Run) -> None:
    """The spool under a 2 MB file-size limit: appends fail short; then kill -9 and a
    restart without the limit replays the spool."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for i in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                await run.post(s, tx(f"spooled-{i}", 20, "s" * 500))


ATTACKS: dict[str, tuple[str, Callable[[Run], Awaitable[None]], tuple[str, ...], int | None]] = {
    "shared-key frames": ("5 x 10,000 events", shared_key, (), None),
    "open big trees": ("250 x 3.9 MB, never closed", open_big_trees, (), None),
    "complete big trees": ("200 x 3.9 MB + 10 resent", complete_big_trees, (), None),
    "frame of nils": ("1 x 4 MiB, 4M nils + good", nulls, (), None),
    "dripped multipart": ("300 x 1 B/s", drip, ("--request-timeout", "5"), None),
    "big bodies at once": ("300 x 4 MiB", big_bodies, (), None),
    "big bodies, 64 MiB in flight": (
        "300 x 4 MiB",
        big_bodies,
        ("--max-inflight-bytes", str(64 << 20)),
        None,
    ),
    "out-of-range values": ("50 x 4 bad + good", out_of_range, (), None),
    "spool short writes, kill -9": (
        "300 posts, 2 MB limit",
        short_writes,
        ("--spool", "spool"),
        2_000_000,
    ),
}


async def main_async(only: list[str], keep: Path | None) -> list[Row]:
    rows = []
    for name, (cases, attack, args, fsize) in ATTACKS.items():
        if only and not any(o in name for o in only):
            continue
        root = Path(tempfile.mkdtemp(prefix="attack-", dir=keep))
        server = Server(root, *args, fsize=fsize).start()
        run = Run(server, Row(name, cases))
        if fsize is not None:  # the crash case: kill -9, then replay without the limit
            await _with_restart(run, attack, args)
        else:
            await run.run(attack)
        rows.append(run.row)
        print(f"  done: {name}", file=sys.stderr)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return rows


async def _with_restart(
    run: Run, attack: Callable[[Run], Awaitable[None]], args: tuple[str, ...]
) -> None:
    server = run.server
    before = server.rss()
    await attack(run)
    stall = (await server.metrics()).get("async_logging_loop_stall_max_seconds", float("nan"))
    server.stop(signal.SIGKILL)
    again = Server(server.root, *args).start()
    replayed = again.wait_for("replayed ")  # the replay runs while the server serves
    again.stop()
    published, incomplete = event_keys(again.records())
    run.account(published)
    row = run.row
    row.rss = (before, server.peak, again.peak)
    row.stall = stall
    row.notes.append(
        f"{incomplete} incomplete; replayed copies are flagged"
        + ("" if replayed else "; the restart never said it had replayed")
    )


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="run the attacks whose name has this")
    ap.add_argument("--keep", type=Path, help="keep each server's directory under this one")
    opts = ap.parse_args()
    rows = asyncio.run(main_async(opts.only, opts.keep))
    print(
        "| attack | cases | acked | refused | published | lost | unflagged dup "
        "| RSS MB before / peak / after | worst loop hold | good client's worst ack |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r.name} | {r.cases} | {r.acked:,} | {r.refused:,} "
            f"| {r.published:,} | {r.lost:,} | {r.dup:,} "
            f"| {mb(r.rss[0])} / {mb(r.rss[1])} / {mb(r.rss[2])} "
            f"| {r.stall * 1000:,.0f} ms | {r.good_worst * 1000:,.0f} ms |"
        )
    for r in rows:
        for note in r.notes:
            print(f"- {r.name}: {note}")
    print("bound: no loop hold over 100 ms, 0 lost, 0 unflagged duplicates")


if __name__ == "__main__":
    main()
