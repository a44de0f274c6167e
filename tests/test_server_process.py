"""`async-logging serve` as a real subprocess: start-up, signals, workers, recycling, CLI errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson

from conftest import TIMEOUT

T0 = 1_795_463_406_000
ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/.*monitoring (?:http://[^:]+:(\d+)|off)")


class Served:
    """A running `async-logging serve` subprocess and where it listens and writes."""

    def __init__(self, proc: subprocess.Popen[str], port: int, mon_port: int | None, out: Path):
        self.proc, self.port, self.mon_port, self.out = proc, port, mon_port, out
        self.stderr: list[str] = []
        # Keep reading stderr so the server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def close(self) -> None:
        """Kill the server and every process it started (its session), then stop reading."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers, the store's follower
        # Closing the pipe under a reader still blocked in it would hang: fail loudly instead.
        assert self.stderr_closed(TIMEOUT), f"serve (pid {self.proc.pid}): stderr still open"
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def stderr_closed(self, timeout: float) -> bool:
        """Whether every process holding the server's standard error (the server and what it
        started) has exited within ``timeout`` seconds."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def records(self) -> list[dict[str, Any]]:
        """The records in the output file, but for a last line still being written."""
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        return [orjson.loads(line) for line in whole.splitlines() if line]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=TIMEOUT * 3)


def serve(tmp_path: Path, *args: str) -> Served:
    out = tmp_path / "log" / "all.log"
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
        "0",
        "--heartbeat-interval",
        "0",
        "--log-file",
        str(out),
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: close() reaps all it started
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + TIMEOUT * 3
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = ANNOUNCE.search(line)
        if m:
            return Served(proc, int(m.group(1)), int(m.group(2)) if m.group(2) else None, out)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError(f"server did not announce itself: {''.join(lines)}")


def tx(uuid: str, n_atomic: int = 2, close: bool = True) -> list[dict[str, Any]]:
    ev = [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "name": "/p", "timestamp": T0}
    ]
    ev += [
        {
            "clazz": "atomicEvent",
            "uuid": uuid,
            "event": str(i + 2),
            "parent": "1",
            "msg": f"m{i}",
            "timestamp": T0 + 1 + i,
        }
        for i in range(n_atomic)
    ]
    if close:
        ev.append(
            {
                "clazz": "end",
                "uuid": uuid,
                "event": "1",
                "parent": "0",
                "status": "0",
                "timestamp": T0 + 9,
            }
        )
    return ev


async def send_acked(port: int, batches: list[list[dict[str, Any]]], pace: float = 0.0) -> int:
    """Send each batch in an envelope until acked, reconnecting (with resends) when closed.

    ``pace`` spreads the load over time (seconds between frames) so that server-side events
    such as worker recycling happen in the middle of the stream.
    """
    pending = dict(enumerate(batches))
    reconnects = 0
    deadline = time.monotonic() + TIMEOUT * 6
    async with aiohttp.ClientSession() as session:
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} batches never acked"
            try:
                ws = await session.ws_connect(
                    f"ws://127.0.0.1:{port}/", protocols=("log-protocol",)
                )
            except (aiohttp.ClientError, OSError):
                reconnects += 1
                await asyncio.sleep(0.05)
                continue
            try:
                ready = await ws.receive(timeout=TIMEOUT)
                if ready.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionError("no ready")
                for seq in sorted(pending):
                    if pace:
                        await asyncio.sleep(pace)
                    await ws.send_bytes(msgpack.packb({"seq": seq, "logs": pending[seq]}))
                    msg = await ws.receive(timeout=TIMEOUT)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise ConnectionError("closed")
                    ack = orjson.loads(msg.data)
                    assert ack == {"ack": seq}, ack
                    del pending[seq]
            except (TimeoutError, ConnectionError, aiohttp.ClientError, OSError):
                reconnects += 1
            finally:
                await ws.close()
    return reconnects


async def post_acked(port: int, batches: list[list[dict[str, Any]]]) -> int:
    """``POST /log`` each batch until it is answered 200, retrying on any failure (a
    connection closed by a draining worker); returns the retries."""
    retries = 0
    deadline = time.monotonic() + TIMEOUT * 6
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        for batch in batches:
            while True:
                assert time.monotonic() < deadline, "a batch was never acked"
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/log",
                        data=msgpack.packb(batch),
                        headers={"Content-Type": "application/x-msgpack"},
                    ) as r:
                        if r.status == 200:
                            break
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                retries += 1
                await asyncio.sleep(0.01)
    return retries


def test_sigterm_publishes_an_open_transaction_incomplete(
    tmp_path: Path, procs: list[Served]
) -> None:
    """SIGTERM drains: an open transaction reaches the file flagged shutdown, not lost."""
    s = serve(tmp_path)
    procs.append(s)
    asyncio.run(send_acked(s.port, [tx("open-1", close=False), tx("closed-1")]))
    assert s.stop() == 0
    recs = {r["uuid"]: r for r in s.records()}
    assert recs["closed-1"]["complete"] is True
    assert recs["open-1"]["complete"] is False and recs["open-1"]["reason"] == "shutdown"
    assert len(recs["open-1"]["children"]) == 2


def test_sigint_drains_the_same_way(tmp_path: Path, procs: list[Served]) -> None:
    """SIGINT (Ctrl-C) drains and flushes like SIGTERM."""
    s = serve(tmp_path)
    procs.append(s)
    asyncio.run(send_acked(s.port, [tx("int-1", close=False)]))
    assert s.stop(signal.SIGINT) == 0
    (rec,) = s.records()
    assert rec["reason"] == "shutdown"


def ecv(port: int) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/ecv") as resp,
        ):
            return await resp.json()  # type: ignore[no-any-return]

    return asyncio.run(get())


def test_killed_worker_is_restarted(tmp_path: Path, procs: list[Served]) -> None:
    """kill -9 of a worker: the supervisor starts another and the port keeps serving."""
    s = serve(tmp_path, "--workers", "2")
    procs.append(s)
    assert s.mon_port
    before = ecv(s.mon_port)
    pids = {w["pid"] for w in before["workers"]}
    assert len(pids) == 2 and before["status"] == "AVAILABLE"
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT * 3
    while True:
        now = ecv(s.mon_port)
        live = {w["pid"] for w in now["workers"] if w["ready"]}
        if victim not in live and len(live) == 2:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert now["restarts"] == 1
    asyncio.run(send_acked(s.port, [tx(f"after-{i}") for i in range(20)]))
    assert s.stop() == 0
    assert sorted(r["uuid"] for r in s.records()) == sorted(f"after-{i}" for i in range(20))


def test_recycled_workers_lose_no_accepted_event(tmp_path: Path, procs: list[Served]) -> None:
    """Workers recycled every 100 frames under load: every acked tree is in the file, once."""
    s = serve(tmp_path, "--workers", "2", "--max-messages", "100")
    procs.append(s)
    n = 1000
    reconnects = asyncio.run(send_acked(s.port, [tx(f"r-{i}") for i in range(n)], pace=0.003))
    assert s.mon_port
    state = ecv(s.mon_port)
    assert s.stop() == 0
    recs = s.records()
    uuids = [r["uuid"] for r in recs]
    assert len(uuids) == len(set(uuids)) == n, (len(uuids), len(set(uuids)))
    assert all(r["complete"] for r in recs)
    assert state["recycles"] >= 1 and reconnects >= 1


def test_many_recycles_publish_every_acked_tree_exactly_once(
    tmp_path: Path, procs: list[Served]
) -> None:
    """The stress version: workers recycled every 20 frames, at least 8 times under load
    from two WebSockets and an HTTP poster at once; every acked tree is in the file
    exactly once."""
    s = serve(tmp_path, "--workers", "2", "--max-messages", "20")
    procs.append(s)
    assert s.mon_port
    sent, reconnects, clients, rounds = 0, 0, 3, 0
    deadline = time.monotonic() + TIMEOUT * 6
    while ecv(s.mon_port)["recycles"] < 8:
        rounds += 1
        assert time.monotonic() < deadline, f"{ecv(s.mon_port)['recycles']} recycles in {rounds}"
        shares = [[tx(f"s-{sent + c * 30 + i}") for i in range(30)] for c in range(clients)]
        sent += 30 * clients

        async def load(shares: list[list[list[dict[str, Any]]]] = shares) -> int:
            *ws, http = shares  # the last share goes over HTTP posts
            done = await asyncio.gather(
                *(send_acked(s.port, share, 0.002) for share in ws), post_acked(s.port, http)
            )
            return sum(done)

        reconnects += asyncio.run(load())
    assert s.stop() == 0
    uuids = Counter(r["uuid"] for r in s.records())
    twice = {u: k for u, k in uuids.items() if k > 1}
    assert not twice, f"{len(twice)} trees written more than once: {list(twice)[:5]}"
    missing = {f"s-{i}" for i in range(sent)} - set(uuids)
    assert not missing, f"acked but not written: {sorted(missing)[:10]} {''.join(s.stderr)}"
    assert reconnects >= 1  # recycles caught connections mid-stream


def test_bad_option_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    """A wrong flag value or an unknown config key is refused with exit status 2."""
    run = [sys.executable, "-m", "async_logging.cli", "serve"]
    r = subprocess.run(
        [*run, "--port", "notaport"], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "--port" in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nportt = 3000\n")
    r = subprocess.run(
        [*run, "--config", str(cfg)], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "unknown option 'portt'" in r.stderr
    cfg.write_text("port = 'x'\n")
    r = subprocess.run(
        [*run, "--config", str(cfg)], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "port must be int" in r.stderr
    r = subprocess.run(
        [*run, "--workers", "0"], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "workers must be at least 1" in r.stderr
    # The engine's caps: its own rules, told under the option's name.
    r = subprocess.run(
        [*run, "--max-tree-depth", "101"], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "option max_tree_depth must be <= 100" in r.stderr
    cfg.write_text("max_open = 0\n")
    r = subprocess.run(
        [*run, "--config", str(cfg)], capture_output=True, text=True, timeout=TIMEOUT * 3
    )
    assert r.returncode == 2 and "max_open must be at least 1" in r.stderr


def test_config_file_sets_options_and_flags_win(tmp_path: Path, procs: list[Served]) -> None:
    """TOML keys in snake_case or the seed's camelCase configure the server; flags override them."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('connThreshold = 5\nmachine_name = "from-file"\nport = 1\n')
    s = serve(tmp_path, "--config", str(cfg))  # --port 0 from the helper wins over port = 1
    procs.append(s)
    assert s.port != 1 and s.mon_port
    assert ecv(s.mon_port)["machine"] == "from-file"
    assert s.stop() == 0


def test_engine_caps_from_toml_and_flags_reach_the_engine(
    tmp_path: Path, procs: list[Served]
) -> None:
    """`max_open` from the config file and --max-events-per-tx on the command line cap the engine of a real `serve`: trees past them are published evicted."""
    from helpers import fetch_metrics  # helpers imports this module: not at the top

    cfg = tmp_path / "caps.toml"
    cfg.write_text("[server]\nmax_open = 1\n")
    s = serve(tmp_path, "--config", str(cfg), "--max-events-per-tx", "4")
    procs.append(s)
    batches = [tx("held-1", close=False), tx("held-2", close=False), tx("big", n_atomic=5)]
    asyncio.run(send_acked(s.port, batches))
    assert s.mon_port
    evicted = fetch_metrics(s.mon_port).get("async_logging_evicted_total")
    assert s.stop() == 0
    reasons: dict[str, list[Any]] = {}
    for r in s.records():
        reasons.setdefault(r["uuid"], []).append(r.get("reason"))
    # held-2 pushed held-1 out (max_open 1), big pushed held-2 out; big had 7 events against
    # 4: published evicted at its 5th, the rest came out late, each on its own.
    assert reasons["held-1"] == ["evicted"] and reasons["held-2"] == ["evicted"], reasons
    assert reasons["big"][0] == "evicted" and len(reasons["big"]) == 4, reasons
    assert evicted == 3, evicted


def test_help_documents_every_option() -> None:
    """`serve --help` lists every ServerConfig option as a flag."""
    from async_logging.server import ServerConfig

    r = subprocess.run(
        [sys.executable, "-m", "async_logging.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert r.returncode == 0
    singular = {"otlp_headers": "--otlp-header"}  # a repeatable flag, one header each
    for field in ServerConfig.__dataclass_fields__:
        assert singular.get(field, "--" + field.replace("_", "-")) in r.stdout, field
