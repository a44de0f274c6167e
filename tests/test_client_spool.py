"""The client's spool (``LogClient(spool_dir=...)``) against a real proxy and real processes.

The proxy is "down" by pointing the client at a free port nothing listens on, and "up" by
starting a LogCluster on that port later. Waits are bounded by TIMEOUT and wait on a
condition: ``flush(spooled=True)`` returns once everything enqueued is in the spool,
``close()`` once the sender wrote what was left, the publisher's ``wait_for`` once records
arrived, a child process's printed line once it reached a point.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from async_logging.client import LogClient, registry
from async_logging.exceptions import UsageError
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from test_client_network import check_tree, fast_backoff, free_port, log_tree, wait_for

TREE = 7  # events per log_tree()

#: The tree log_tree() logs, for a child process (same names, so check_tree() applies).
CHILD_PRELUDE = """
import json, sys
from async_logging.client import LogClient, event, transaction

def tree(i):
    with transaction("URL", f"/r{i}"):
        event("DB", "a", msg=str(i))
        event("DB", "b")
        with transaction("API", "inner"):
            event("HTTP", "c")
"""


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., LogClient]]:
    """Builds spooling clients that become the default one; closes them and restores the default after."""
    previous = registry.default.client
    made: list[LogClient] = []

    def make(url: str, spool_dir: Path, **options: Any) -> LogClient:
        options.setdefault("drain_interval", 0.01)
        options.setdefault("backoff", fast_backoff)
        options.setdefault("exit_timeout", 0)
        options.setdefault("default", True)
        client = LogClient(url=url, spool_dir=spool_dir, **options)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.aclose(1.0)
        registry.default.client = previous


@asynccontextmanager
async def proxy(port: int, publisher: MemoryPublisher) -> AsyncIterator[LogCluster]:
    """A proxy on ``port`` publishing into ``publisher``, stopped (and drained) on exit."""
    server = LogCluster(
        host="127.0.0.1", port=port, mon_port=-1, heartbeat_interval=0, publisher=publisher
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client_dirs(spool: Path) -> list[Path]:
    """The per-client subdirectories of a spool_dir."""
    return sorted(p for p in spool.iterdir() if p.name.startswith("c-"))


def segments(spool: Path) -> list[Path]:
    """Every segment file under a spool_dir."""
    return sorted(spool.glob("c-*/seg-*.log"))


def tree_via(client: LogClient, name: str) -> None:
    """log_tree()'s shape, logged through ``client`` rather than the default one."""
    with client.transaction("URL", name):
        client.event("DB", "a")
        client.event("DB", "b")
        with client.transaction("API", "inner"):
            client.event("HTTP", "c")


def once_each(txs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The transactions by name, asserting each name was published once and complete."""
    counts = Counter(tx["name"] for tx in txs)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    for tx in txs:
        check_tree(tx)
    return {tx["name"]: tx for tx in txs}


@pytest.fixture
def spool_warnings() -> Iterator[list[logging.LogRecord]]:
    """Warnings of the client logger that are about the spool."""
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "spool" in record.getMessage():
                caught.append(record)

    catch = Catch(logging.WARNING)
    own = logging.getLogger("async_logging.client")
    own.addHandler(catch)
    try:
        yield caught
    finally:
        own.removeHandler(catch)


async def test_events_unsent_at_close_are_spooled_and_a_new_client_delivers_each_tree_once(
    tmp_path: Path, publisher: MemoryPublisher, clients: Callable[..., LogClient]
) -> None:
    """Events a client could not deliver before close() stay in its spool, and a new client on the same spool_dir delivers each of them once."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    spool = tmp_path / "spool"
    n = 50
    first = clients(url, spool)
    for i in range(n):
        log_tree(i)
    first.event("LOG", "stand-alone", msg="s")
    assert not await first.aclose(0.3)  # the proxy is down: nothing acknowledged
    s = first.stats
    assert s.acked == 0 and s.lost == 0 and s.spool_dropped == 0, s
    assert s.spooled == n * TREE + 1, s
    [left] = client_dirs(spool)
    assert segments(spool) and (left / ".lock").exists()

    async with proxy(port, publisher):
        second = clients(url, spool)
        assert await second.aflush(TIMEOUT)
        s2 = second.stats
        assert s2.replayed == n * TREE + 1 and s2.acked == n * TREE + 1 and s2.lost == 0, s2
        await wait_for(publisher, lambda p: len(p.transactions) >= n and p.atomic_events)
        assert await second.aclose(TIMEOUT)
    by_name = once_each(publisher.transactions)
    assert set(by_name) == {f"/r{i}" for i in range(n)}
    assert [e["name"] for e in publisher.atomic_events] == ["stand-alone"]
    assert client_dirs(spool) == []  # everything acknowledged: no directory left behind


async def test_past_spool_max_bytes_envelopes_are_counted_not_spooled_with_one_warning(
    tmp_path: Path,
    clients: Callable[..., LogClient],
    spool_warnings: list[logging.LogRecord],
) -> None:
    """A tiny spool_max_bytes spools what fits, counts the rest in spool_dropped (lost at close) with one warning, and a later client resends exactly what fitted."""
    url = f"ws://127.0.0.1:{free_port()}/"
    spool = tmp_path / "spool"
    limit = 4096
    client = clients(url, spool, spool_max_bytes=limit, batch_size=TREE)  # one tree per envelope
    n = 40
    for i in range(n):
        log_tree(i)
    assert not await client.aclose(0.3)
    s = client.stats
    assert s.spooled > 0 and s.spool_dropped > 0, s
    assert s.spooled % TREE == 0 and s.spooled + s.spool_dropped == n * TREE, s
    assert s.lost == s.spool_dropped, s  # kept in memory only, so lost when the client stopped
    assert sum(p.stat().st_size for p in segments(spool)) <= limit
    full = [r for r in spool_warnings if "is full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in spool_warnings]

    later = clients(url, spool, spool_max_bytes=limit)
    assert await later.aflush(TIMEOUT, spooled=True)  # adopted, and in its own spool
    assert later.stats.replayed == s.spooled and later.stats.spool_dropped == 0
    assert not await later.aclose(0.2)


KILLED_CHILD = (
    CHILD_PRELUDE
    + """
url, spool, n, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = LogClient(url=url, spool_dir=spool, drain_interval=0.01, exit_timeout=0)
for i in range(n):  # the proxy is up: acknowledged, so never resent
    tree(i)
assert client.flush(timeout)
print("acked", flush=True)
assert sys.stdin.readline().strip() == "down"  # the proxy is stopped now
for i in range(n, 2 * n):
    tree(i)
assert client.flush(timeout, spooled=True)
print(client.stats.spooled, flush=True)
i = 2 * n
while True:  # still producing (and spooling) when the kill comes
    tree(i)
    i += 1
    if i == 3 * n:
        print("more", flush=True)
"""
)

RESENDING_CHILD = (
    CHILD_PRELUDE
    + """
url, spool, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = LogClient(url=url, spool_dir=spool, drain_interval=0.01, exit_timeout=0)
ok = client.flush(timeout)
s = client.stats
closed = client.close(timeout)
print(json.dumps({"ok": ok, "closed": closed, "replayed": s.replayed, "acked": s.acked}))
"""
)


async def test_a_process_killed_with_sigkill_loses_nothing_it_spooled_and_resends_nothing_acked(
    tmp_path: Path, publisher: MemoryPublisher
) -> None:
    """A process killed with SIGKILL while the proxy is down leaves its spool, and a new process on the same spool_dir delivers every spooled tree once and none acked before."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    spool = tmp_path / "spool"
    n = 200
    async with proxy(port, publisher):
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_CHILD,
            url,
            str(spool),
            str(n),
            str(TIMEOUT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert await asyncio.wait_for(child.stdout.readline(), TIMEOUT) == b"acked\n"
            await wait_for(publisher, lambda p: len(p.transactions) >= n)
        except BaseException:
            child.kill()
            await child.wait()
            raise
    try:
        child.stdin.write(b"down\n")
        await child.stdin.drain()
        spooled = int(await asyncio.wait_for(child.stdout.readline(), TIMEOUT))
        assert spooled >= 2 * n * TREE  # the acked ones are in the spool too (until acked)
        assert await asyncio.wait_for(child.stdout.readline(), TIMEOUT) == b"more\n"
    finally:
        child.kill()  # SIGKILL
        assert await asyncio.wait_for(child.wait(), TIMEOUT) == -signal.SIGKILL
    assert len(client_dirs(spool)) == 1 and segments(spool)

    async with proxy(port, publisher):
        resender = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            RESENDING_CHILD,
            url,
            str(spool),
            str(TIMEOUT),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(resender.communicate(), 3 * TIMEOUT)
        assert resender.returncode == 0
        result = json.loads(out)
        assert result["ok"] and result["closed"], result
        replayed = result["replayed"]
        assert replayed >= n * TREE and replayed % TREE == 0 and result["acked"] == replayed
        await wait_for(publisher, lambda p: len(p.transactions) >= n + replayed // TREE)
    by_name = once_each(publisher.transactions)  # nothing acked before the kill came twice
    # Everything spooled before the signal arrived, and whatever else was spooled, whole.
    assert {f"/r{i}" for i in range(2 * n)} <= set(by_name)
    assert len(by_name) == n + replayed // TREE
    assert client_dirs(spool) == []


async def test_two_live_clients_on_one_spool_dir_keep_apart_and_a_later_client_adopts_both(
    tmp_path: Path, publisher: MemoryPublisher, clients: Callable[..., LogClient]
) -> None:
    """Two live clients on one spool_dir spool into their own locked subdirectories, a new client adopts only the closed one's, and a later one delivers everything once."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    spool = tmp_path / "spool"
    n = 10
    a = clients(url, spool, default=False)
    b = clients(url, spool, default=False)
    for i in range(n):
        tree_via(a, f"/a{i}")
        tree_via(b, f"/b{i}")
    assert await a.aflush(TIMEOUT, spooled=True)
    assert await b.aflush(TIMEOUT, spooled=True)
    assert a.stats.replayed == b.stats.replayed == 0  # neither took the other's live spool
    assert len(client_dirs(spool)) == 2

    assert not await a.aclose(0.2)
    c = clients(url, spool, default=False)
    assert await c.aflush(TIMEOUT, spooled=True)
    assert c.stats.replayed == n * TREE  # a's (closed), not b's (alive)
    assert len(client_dirs(spool)) == 2  # b's and c's; a's was taken over and deleted

    assert not await b.aclose(0.2)
    assert not await c.aclose(0.2)
    async with proxy(port, publisher):
        d = clients(url, spool, default=False)
        assert await d.aflush(TIMEOUT)
        assert d.stats.replayed == 2 * n * TREE
        await wait_for(publisher, lambda p: len(p.transactions) >= 2 * n)
        assert await d.aclose(TIMEOUT)
    by_name = once_each(publisher.transactions)
    assert set(by_name) == {f"/{k}{i}" for k in "ab" for i in range(n)}
    assert client_dirs(spool) == []


async def test_an_unusable_spool_dir_is_a_usage_error_at_construction(tmp_path: Path) -> None:
    """A spool_dir that cannot be created (a file is in the way) raises UsageError and leaves no default client behind."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    previous = registry.default.client
    with pytest.raises(UsageError, match="cannot spool"):
        LogClient(url=f"ws://127.0.0.1:{free_port()}/", spool_dir=blocker / "spool")
    assert registry.default.client is previous
    with pytest.raises(UsageError, match="spool_max_bytes"):
        LogClient(spool_dir=tmp_path, spool_max_bytes=0, start=False)


EXITING_CHILD = (
    CHILD_PRELUDE
    + """
url, spool, n, exit_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
# No drain before the exit (a long interval, fewer events than a batch): only the exit-time
# close can spool them.
LogClient(url=url, spool_dir=spool, drain_interval=60, exit_timeout=exit_timeout)
for i in range(n):
    tree(i)
# no flush, no close: the interpreter exits with the events still queued
"""
)


@pytest.mark.parametrize("exit_timeout", [0.2, 0.0])
async def test_events_undelivered_within_the_exit_timeout_land_in_the_spool(
    tmp_path: Path,
    publisher: MemoryPublisher,
    clients: Callable[..., LogClient],
    exit_timeout: float,
) -> None:
    """A script that exits while the proxy is down spools what the exit-time flush could not deliver (none attempted with exit_timeout=0), and the next client delivers it."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    spool = tmp_path / "spool"
    n = 20
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXITING_CHILD, url, str(spool), str(n), str(exit_timeout)
    )
    assert await asyncio.wait_for(child.wait(), TIMEOUT) == 0
    assert len(client_dirs(spool)) == 1
    async with proxy(port, publisher):
        client = clients(url, spool)
        assert await client.aflush(TIMEOUT)
        assert client.stats.replayed == n * TREE
        await wait_for(publisher, lambda p: len(p.transactions) >= n)
    assert set(once_each(publisher.transactions)) == {f"/r{i}" for i in range(n)}


async def test_a_record_torn_by_a_crash_ends_the_replay_and_the_records_before_it_are_resent(
    tmp_path: Path, clients: Callable[..., LogClient]
) -> None:
    """A segment cut in the middle of its last record (a write interrupted by a kill) replays the whole records before it and skips the torn one."""
    url = f"ws://127.0.0.1:{free_port()}/"
    spool = tmp_path / "spool"
    first = clients(url, spool, batch_size=TREE)
    for i in range(5):
        log_tree(i)
    assert await first.aflush(TIMEOUT, spooled=True)
    assert not await first.aclose(0.2)
    [segment] = segments(spool)
    data = segment.read_bytes()
    segment.write_bytes(data[:-10])
    second = clients(url, spool)
    assert await second.aflush(TIMEOUT, spooled=True)
    assert second.stats.replayed == 4 * TREE
    assert not await second.aclose(0.2)


async def test_a_client_with_a_smaller_spool_adopts_what_fits_and_leaves_the_rest_for_later(
    tmp_path: Path, clients: Callable[..., LogClient]
) -> None:
    """Adoption stops at the adopter's spool_max_bytes and records where it stopped, so a later client takes the rest: every spooled event is replayed once."""
    url = f"ws://127.0.0.1:{free_port()}/"
    spool = tmp_path / "spool"
    first = clients(url, spool, batch_size=TREE)
    for i in range(60):
        log_tree(i)
    assert not await first.aclose(0.2)
    assert first.stats.spooled == 60 * TREE
    small = clients(url, spool, spool_max_bytes=8192)
    assert await small.aflush(TIMEOUT, spooled=True)
    taken = small.stats.replayed
    assert 0 < taken < 60 * TREE
    assert not await small.aclose(0.2)
    assert len(client_dirs(spool)) == 2  # the rest of first's, and small's copy
    last = clients(url, spool)
    assert await last.aflush(TIMEOUT, spooled=True)
    assert last.stats.replayed == 60 * TREE
    assert not await last.aclose(0.2)
    assert len(client_dirs(spool)) == 1  # last's own, holding everything
