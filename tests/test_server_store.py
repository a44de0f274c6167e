"""`async-logging serve` with its store, as real processes: the store follows the server's
output off the ingest path, every worker's trees reach one store and one live tail, the lag
is reported while the store is held up, and a killed follower is replaced without loss."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from conftest import TIMEOUT
from helpers import Metrics
from test_server_process import Served, send_acked, serve, tx

#: The trees of test_server_process are stamped in the past: keep them whatever their age.
KEEP = ("--store-max-age", "0")


def get_json(port: int, path: str) -> Any:
    async def fetch() -> Any:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as resp,
        ):
            return await resp.json()

    return asyncio.run(fetch())


def metrics(port: int) -> Metrics:
    async def fetch() -> str:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            return await resp.text()

    return Metrics(asyncio.run(fetch()))


def wait_for_metrics(port: int, done: Any, what: str) -> Metrics:
    """Poll ``/metrics`` until ``done(m)``: the follower is another process (bounded)."""
    deadline = time.monotonic() + TIMEOUT * 3
    while True:
        m = metrics(port)
        if done(m):
            return m
        assert time.monotonic() < deadline, f"{what}: {m.text}"
        time.sleep(0.05)


def stored_uuids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT uuid FROM trees WHERE uuid IS NOT NULL")]
    finally:
        conn.close()


def follower_pid(server: Served) -> int:
    """The store's follower: the server's spawned child that is not multiprocessing's
    resource tracker."""
    for child in psutil.Process(server.proc.pid).children():
        cmdline = " ".join(child.cmdline())
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            return child.pid
    raise AssertionError("no follower process")


def test_every_workers_trees_reach_the_one_store_and_the_live_tail(
    tmp_path: Path, procs: list[Served]
) -> None:
    """With two workers, trees sent over many connections all reach the one store, and a
    live tail opened on the supervisor's viewer streams every one of them."""
    s = serve(tmp_path, "--workers", "2", *KEEP)
    procs.append(s)
    assert s.mon_port
    uuids = {f"w-{i}" for i in range(30)}

    async def run() -> set[str]:
        seen: set[str] = set()
        timeout = aiohttp.ClientTimeout(total=TIMEOUT * 3)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{s.mon_port}/api/live") as resp,
        ):
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"retry:")
            # One connection per tree: the kernel spreads them over both workers.
            await asyncio.gather(*(send_acked(s.port, [tx(u)]) for u in sorted(uuids)))
            while not uuids <= seen:
                line = await resp.content.readline()
                assert line, "the live stream ended"
                if line.startswith(b"data: "):
                    seen.add(orjson.loads(line[6:]).get("uuid"))
        return seen

    assert uuids <= asyncio.run(run())
    found = get_json(s.mon_port, "/api/search?limit=1000")["results"]
    assert sorted(r["uuid"] for r in found) == sorted(uuids)
    assert get_json(s.mon_port, "/ecv")["store"]["running"] is True
    assert s.stop() == 0


def test_ingest_goes_on_while_the_store_is_held_up_and_the_lag_is_reported(
    tmp_path: Path, procs: list[Served]
) -> None:
    """A store whose file another process keeps locked holds up nothing: every tree is
    acked and written; /metrics counts them as the store's lag, in records and seconds;
    once the lock goes the store catches up and the lag is 0."""
    s = serve(tmp_path, *KEEP)
    procs.append(s)
    assert s.mon_port
    db = tmp_path / "log" / "trees.sqlite"
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the follower's writes now wait
    n = 200
    try:
        asyncio.run(send_acked(s.port, [tx(f"l-{i}") for i in range(n)]))
        # Acked is accepted; the publisher thread writes them a moment later.
        deadline = time.monotonic() + TIMEOUT
        while len([r for r in s.records() if r.get("uuid", "").startswith("l-")]) < n:
            assert time.monotonic() < deadline, "the acked trees were not all written"
            time.sleep(0.02)
        m = wait_for_metrics(
            s.mon_port,
            lambda m: (
                m.get("async_logging_store_lag_records") == n
                and m.get("async_logging_store_lag_seconds") > 0.2
            ),
            "the lag of a held-up store",
        )
        assert m.get("async_logging_store_records_total") == 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for_metrics(
        s.mon_port,
        lambda m: (
            m.get("async_logging_store_records_total") == n
            and m.get("async_logging_store_lag_records") == 0
        ),
        "the store catching up",
    )
    assert get_json(s.mon_port, "/ecv")["store"]["lag_seconds"] == 0
    assert sorted(stored_uuids(db)) == sorted(f"l-{i}" for i in range(n))
    assert s.stop() == 0


def test_a_killed_follower_is_replaced_and_the_store_gets_everything_once(
    tmp_path: Path, procs: list[Served]
) -> None:
    """kill -9 of the store's follower: the server starts another, which goes on from the
    position committed with the last rows: every tree is stored, none twice."""
    s = serve(tmp_path, *KEEP)
    procs.append(s)
    assert s.mon_port
    db = tmp_path / "log" / "trees.sqlite"
    asyncio.run(send_acked(s.port, [tx(f"k-{i}") for i in range(50)]))
    wait_for_metrics(
        s.mon_port, lambda m: m.get("async_logging_store_records_total") == 50, "first trees"
    )
    os.kill(follower_pid(s), signal.SIGKILL)
    asyncio.run(send_acked(s.port, [tx(f"k-{i}") for i in range(50, 100)]))
    wait_for_metrics(
        s.mon_port,
        lambda m: (
            m.get("async_logging_store_restarts_total") == 1
            and m.get("async_logging_store_records_total") == 100
            and m.get("async_logging_store_lag_records") == 0
            and m.get("async_logging_store_up") == 1
        ),
        "a new follower caught up",
    )
    assert sorted(stored_uuids(db)) == sorted(f"k-{i}" for i in range(100))
    assert s.stop() == 0
