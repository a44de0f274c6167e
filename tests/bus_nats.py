"""NATS JetStream servers for the bus tests: real ``nats-server`` processes on loopback.

Each test starts its own: one node, or a cluster of three (each ``-js -sd <tmp>`` with a
``server_name``, routes to the others on free ports), waits until JetStream answers (a
meta leader is elected), and tears them down. Without ``nats-server`` on the PATH (Debian:
``apt-get install nats-server``; ``.ci/run`` installs it) the tests that need it skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TIMEOUT
from helpers import free_port

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)

needs_nats = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server is not installed (apt-get install nats-server)"
)


class NatsNode:
    """One ``nats-server`` process (restartable on the same ports and store)."""

    def __init__(self, name: str, root: Path, routes: list[str] | None) -> None:
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port() if routes is not None else 0
        self.store = root / name
        self.store.mkdir(parents=True, exist_ok=True)
        self.routes = routes
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS_SERVER is not None
        cmd = [
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store),
            "--server_name",
            self.name,
        ]
        if self.routes is not None:
            cmd += [
                "--cluster_name",
                "alog-test",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(self.routes),
            ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class NatsCluster:
    """``size`` nats-server nodes (1: a lone JetStream server; 3: a JetStream cluster)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes = [NatsNode(f"n{i}", root, None if size == 1 else []) for i in range(size)]
        if size > 1:
            for node in self.nodes:
                node.routes = [
                    f"nats://127.0.0.1:{other.cluster_port}"
                    for other in self.nodes
                    if other is not node
                ]

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated (what ``--bus`` takes)."""
        return ",".join(n.url for n in self.nodes)

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start()
        asyncio.run(self.wait_ready())
        return self

    async def wait_ready(self, node: int = 0) -> None:
        """Until JetStream answers on ``node`` (in a cluster: a meta leader is elected and
        every peer is known), or fail with the servers' logs."""
        import nats

        deadline = time.monotonic() + TIMEOUT * 3
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(
                    self.nodes[node].url,
                    connect_timeout=1,
                    max_reconnect_attempts=0,
                    allow_reconnect=False,
                    error_cb=_quiet,
                )
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.1)
                continue
            try:
                js = nc.jetstream(timeout=2)
                await js.account_info()
                if len(self.nodes) > 1:
                    # A replicated stream can be made: a meta leader and every peer.
                    await js.add_stream(
                        name="READY_PROBE", subjects=["ready.probe"], num_replicas=len(self.nodes)
                    )
                    await js.delete_stream("READY_PROBE")
                return
            except Exception as exc:
                last = exc
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()
            await asyncio.sleep(0.1)
        logs = "\n".join(n.log.read_text(errors="replace")[-2000:] for n in self.nodes)
        raise AssertionError(f"JetStream not ready: {last}\n{logs}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def read_trees(urls: str) -> list[dict[str, object]]:
    """Every record on the trees stream now, in order (an ephemeral consumer's read; a
    message holds one JSON line or more)."""
    import nats
    import orjson
    from nats.js.api import AckPolicy, ConsumerConfig

    from async_logging.bus import TREES_STREAM
    from async_logging.bus.codec import decode

    nc = await nats.connect(urls.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=TIMEOUT)
        total = (await js.stream_info(TREES_STREAM)).state.messages
        sub = await js.pull_subscribe(
            "alog.trees.*",
            stream=TREES_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=5.0),
        )
        out: list[dict[str, object]] = []
        read = 0
        while read < total:
            for msg in await sub.fetch(min(1000, total - read), timeout=TIMEOUT):
                read += 1
                out.extend(
                    orjson.loads(line) for line in decode(msg.data, msg.headers).splitlines()
                )
        return out
    finally:
        await nc.close()


async def wait_trees(
    urls: str, uuids: set[str], timeout: float = TIMEOUT * 3
) -> list[dict[str, object]]:
    """The trees stream's records once a record of every uuid in ``uuids`` is there, and
    :data:`QUIET` seconds more have passed without a new one (so duplicates show)."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            records = await read_trees(urls)
            if uuids <= {str(r.get("uuid")) for r in records}:
                await asyncio.sleep(QUIET)
                again = await read_trees(urls)
                if len(again) == len(records):
                    return again
                continue
        except Exception:  # JetStream busy electing a leader: ask again
            pass
        await asyncio.sleep(0.1)
    got = {str(r.get("uuid")) for r in records}
    raise AssertionError(f"trees never published: {sorted(uuids - got)[:10]} ...")


#: Seconds without a new record after which the trees stream is taken as settled.
QUIET = 0.5


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback while a server is not up yet: nothing to report."""
