"""The Supervisor: worker processes sharing one port, watched, restarted and recycled.

With ``workers > 1`` (or ``max_life`` / ``max_messages`` set) ``serve`` runs a supervisor
instead of a single :class:`~async_logging.server.LogCluster`. It reserves the port, spawns
worker processes that each run a LogCluster on it with SO_REUSEPORT, restarts any that dies,
and recycles them: a worker that reaches its ``max_life`` or ``max_messages`` asks for a
replacement, the supervisor starts it, waits until it listens, then tells the old one to
drain. Workers report their counters every :data:`STATS_INTERVAL` seconds; the supervisor's
MonApp serves their sum and the viewer of the shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from ..exceptions import ConfigError
from .config import ServerConfig, announcement
from .followers import Followers
from .gctune import tune_gc
from .lifecycle import Lifecycle, Service, ServiceState, stop_signal
from .monapp import MonApp
from .pipeline import Stats, merge_snapshots

__all__ = [
    "REPLACEMENT_TIMEOUT",
    "RESTART_BACKOFF",
    "STATS_INTERVAL",
    "Supervisor",
    "SupervisorState",
    "WorkerState",
]

log = logging.getLogger("async_logging.server")

#: Seconds between workers' stats reports to the supervisor.
STATS_INTERVAL = 1.0
#: Seconds the supervisor waits for a replacement worker to listen before draining the old one.
REPLACEMENT_TIMEOUT = 30.0
#: Seconds between the supervisor's checks of its workers.
WATCH_INTERVAL = 0.2
#: Fastest restart rate of a crashing worker (seconds between restarts of one slot).
RESTART_BACKOFF = 1.0


# ---------------------------------------------------------------------- a worker process


def _worker_main(config: ServerConfig, wid: int, reports: Any) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {wid}: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is handled in the loop
        asyncio.run(_worker(config, wid, reports))


async def _worker(config: ServerConfig, wid: int, reports: Any) -> None:
    # The worker runs the cluster the supervisor stands in for (imported here: cluster.py
    # hands ``serve`` to the supervisor, so it imports this module).
    from .cluster import LogCluster

    stop = stop_signal()
    cluster = LogCluster(config)
    tune_gc()
    await cluster.start(reuse_port=True, monitor=False, follow=False)
    reports.put(("ready", wid, os.getpid(), cluster.port))

    async def report() -> None:
        while True:
            # Its counters, and why it does not ack now (None: it does), for /ecv.
            reports.put(("stats", wid, cluster.snapshot(), cluster.health().get("reason")))
            await asyncio.sleep(STATS_INTERVAL)

    async def recycle_now() -> None:
        await cluster.recycle_wanted.wait()
        reports.put(("recycle", wid))

    reporter = asyncio.create_task(report())
    asker = asyncio.create_task(recycle_now())
    await stop.wait()
    asker.cancel()
    reporter.cancel()
    reason = "recycled" if cluster.recycle_wanted.is_set() else "shutdown"
    await cluster.stop(reason)
    if cluster.drained is not None:  # serve says what each worker's drain published
        print(f"async-logging: worker {wid}: {cluster.drained.summary()}", file=sys.stderr)
    reports.put(("stats", wid, cluster.snapshot()))
    reports.put(("bye", wid))


# ---------------------------------------------------------------------- the supervisor


class WorkerState(enum.Enum):
    """Where a worker process is, as the supervisor sees it."""

    STARTING = "starting"  # spawned, not yet listening
    READY = "ready"  # listening on the shared port
    DRAINING = "draining"  # told to drain (SIGTERM); gone once its process ends


_WORKER_MOVES = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.DRAINING}),
    WorkerState.READY: frozenset({WorkerState.DRAINING}),
}


class _Slot:
    """One worker process as the supervisor sees it."""

    def __init__(self, wid: int, process: Any) -> None:
        self.wid = wid
        self.process = process
        self.pid: int | None = None
        self.lifecycle = Lifecycle(f"worker {wid}", _WORKER_MOVES, WorkerState.STARTING)
        self.retiring_for: int | None = None  # the replacement being waited for
        self.started = time.monotonic()

    @property
    def ready(self) -> bool:
        """Listening and not draining."""
        return self.lifecycle.state is WorkerState.READY

    @property
    def draining(self) -> bool:
        return self.lifecycle.state is WorkerState.DRAINING


#: Where a :class:`Supervisor` is in its life (see :class:`~.lifecycle.ServiceState`).
SupervisorState = ServiceState


class Supervisor:
    """Spawns, watches, restarts and recycles worker processes sharing one port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.slots: dict[int, _Slot] = {}
        self._next_wid = 0
        self._ctx = multiprocessing.get_context("spawn")
        self.reports: Any = self._ctx.Queue()
        self.live: dict[int, dict[str, Any]] = {}
        # Why each worker does not ack now (None: it does), as it last reported.
        self.refusing: dict[int, str | None] = {}
        self.retired: dict[str, Any] = {}
        self.restarts = 0
        self.recycles = 0
        self._lifecycle = Service("Supervisor")
        self.port = config.port
        self.mon_port = config.mon_port
        #: What each worker runs: the config on the reserved port, without a MonApp.
        self.worker_config = config
        self._reserve: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._watch: asyncio.Task[None] | None = None
        self.monapp: MonApp | None = None
        self.viewer: Any = None
        #: The store's follower and the live hub, one for every worker's trees.
        self.followers = Followers(config)

    @property
    def state(self) -> SupervisorState:
        """Where the supervisor is in its life (see :class:`SupervisorState`)."""
        return self._lifecycle.state

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has begun (draining or stopped)."""
        return self._lifecycle.stopping

    def run(self) -> int:
        """Run until SIGTERM / SIGINT; drain every worker; return the exit status."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        stop = stop_signal()
        await self.start()
        print(
            announcement(self.config, self.port, self.mon_port, self.config.workers),
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        print("async-logging: draining workers…", file=sys.stderr, flush=True)
        await self.stop()
        return 0

    async def start(self) -> None:
        """Reserve the port, spawn the workers, wait until they all listen.

        Raises:
            ConfigError: the port cannot be had, or the workers did not listen in time;
                what was started is drained and released, and the supervisor is stopped.
            LifecycleError: it was started before.
        """
        await self._lifecycle.start(self._start, self._release)

    async def _start(self) -> None:
        c = self.config
        self._reserve = _reserve_port(c.host, c.port)
        self.port = self._reserve.getsockname()[1]
        self.worker_config = c.replace(port=self.port, mon_port=-1, workers=1)
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_reports, daemon=True)
        self._reader.start()
        # Before any worker publishes: the store starts where the file is now.
        self.followers.start()
        for _ in range(c.workers):
            self._spawn()
        deadline = time.monotonic() + REPLACEMENT_TIMEOUT
        while not all(s.ready for s in self.slots.values()):
            if time.monotonic() > deadline:
                raise ConfigError("workers did not start listening in time")
            await asyncio.sleep(0.05)
        if c.mon_port >= 0:
            from .viewer import Viewer

            # Workers write one JSON-lines file; one follower stores it, the viewer reads
            # the store and its live tail follows it: every worker's trees are seen.
            self.viewer = Viewer.for_followers(self.followers)
            self.monapp = MonApp(self.snapshot, self.health, viewer=self.viewer, config=c)
            self.mon_port = await self.monapp.start(c.mon_host, c.mon_port)
        self._watch = asyncio.create_task(self._watch_loop())

    async def stop(self) -> None:
        """SIGTERM every worker, wait for their drain, then release everything (once)."""
        await self._lifecycle.stop(self._release)

    async def _release(self) -> None:
        """Drain every worker, then release the MonApp, the store's follower and the port
        (after a failed start, whatever it had started)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for slot in list(self.slots.values()):
            self._drain(slot)
        grace = self.config.wait_for_publisher + 15.0
        deadline = time.monotonic() + grace
        for slot in list(self.slots.values()):
            remaining = max(0.1, deadline - time.monotonic())
            await asyncio.get_running_loop().run_in_executor(None, slot.process.join, remaining)
            if slot.process.is_alive():
                log.error("worker %d did not drain in %.0fs; killing it", slot.wid, grace)
                slot.process.kill()
        if self._reader is not None:
            await asyncio.sleep(0.2)  # let the last reports arrive
            self.reports.put(None)
        if self.monapp is not None:
            await self.monapp.cleanup()
        if self.viewer is not None:
            await self.viewer.close()
        if not await self.followers.stop():
            log.warning("the store had not caught up; it goes on from there at the next start")
        if self._reserve is not None:
            self._reserve.close()

    def _spawn(self) -> _Slot:
        wid = self._next_wid
        self._next_wid += 1
        process = self._ctx.Process(
            target=_worker_main,
            args=(self.worker_config, wid, self.reports),
            name=f"async-logging-worker-{wid}",
            daemon=False,
        )
        process.start()
        slot = self.slots[wid] = _Slot(wid, process)
        slot.pid = process.pid
        return slot

    def _drain(self, slot: _Slot) -> None:
        if not slot.draining and slot.process.is_alive():
            slot.lifecycle.to(WorkerState.DRAINING)
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)

    def _read_reports(self) -> None:
        while True:
            try:
                msg = self.reports.get()
            except (EOFError, OSError):  # pragma: no cover - the queue went away
                return
            if msg is None:
                return
            assert self._loop is not None  # set before this thread starts
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_report, msg)

    def _on_report(self, msg: tuple[Any, ...]) -> None:
        kind, wid = msg[0], msg[1]
        slot = self.slots.get(wid)
        if kind == "ready" and slot is not None:
            slot.pid = msg[2]
            if slot.lifecycle.state is WorkerState.STARTING:  # not told to drain meanwhile
                slot.lifecycle.to(WorkerState.READY)
        elif kind == "stats":
            self.live[wid] = msg[2]
            if len(msg) > 3:
                self.refusing[wid] = msg[3]
        elif kind == "recycle" and slot is not None and slot.retiring_for is None:
            if self.stopping or slot.draining:
                return
            self.recycles += 1
            replacement = self._spawn()
            slot.retiring_for = replacement.wid
        elif kind == "bye":
            self._retire_stats(wid)

    def _retire_stats(self, wid: int) -> None:
        self.refusing.pop(wid, None)
        snap = self.live.pop(wid, None)
        if snap is not None:
            for gauge in (
                "connections",
                "open_transactions",
                "open_bytes",
                "published_memory_digests",
                "publish_queue",
            ):
                snap.pop(gauge, None)
            self.retired = merge_snapshots([self.retired, snap])

    async def _watch_loop(self) -> None:
        last_restart: dict[int, float] = {}
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.followers.check()
            for wid, slot in list(self.slots.items()):
                if slot.retiring_for is not None and not slot.draining:
                    new = self.slots.get(slot.retiring_for)
                    if new is not None and new.ready:
                        self._drain(slot)
                    elif time.monotonic() - slot.started > REPLACEMENT_TIMEOUT + 3600:
                        self._drain(slot)  # pragma: no cover - replacement never came up
                if slot.process.is_alive():
                    continue
                del self.slots[wid]
                self._retire_stats(wid)
                if slot.draining:
                    continue  # a recycled worker that finished draining
                # A crash: start another in its place, not faster than the backoff.
                self.restarts += 1
                code = slot.process.exitcode
                log.error("worker %d (pid %s) died with %s; restarting", wid, slot.pid, code)
                wait = RESTART_BACKOFF - (time.monotonic() - last_restart.get(wid, 0.0))
                if wait > 0:
                    await asyncio.sleep(wait)
                new = self._spawn()
                last_restart[new.wid] = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        # An empty Stats snapshot first gives every key its zero before any worker reported.
        snap = merge_snapshots([Stats().snapshot(), self.retired, *self.live.values()])
        snap["workers"] = sum(1 for s in self.slots.values() if s.process.is_alive())
        snap["worker_restarts"] = self.restarts
        snap["worker_recycles"] = self.recycles
        store = self.followers.snapshot()
        if store is not None:
            snap["store"] = store
        return snap

    def health(self) -> dict[str, Any]:
        """What ``/ecv`` reports: available while some ready worker acks. When every ready
        worker refuses (its publish queue full, its publisher stalled, its spool full), the
        proxy acks nothing: 503 with the first worker's ``reason`` (each worker's is in
        ``workers``)."""
        ready = [s for s in self.slots.values() if s.ready]
        reasons = [self.refusing.get(s.wid) for s in ready]
        refusing = bool(ready) and all(reasons)
        return {
            "available": self.config.ecv
            and self._lifecycle.state is SupervisorState.RUNNING
            and bool(ready)
            and not refusing,
            **({"reason": reasons[0]} if refusing else {}),
            "machine": self.config.machine_name,
            "pid": os.getpid(),
            "workers": [
                {
                    "id": s.wid,
                    "pid": s.pid,
                    "ready": s.ready,
                    "draining": s.draining,
                    **({"refusing": r} if (r := self.refusing.get(s.wid)) else {}),
                }
                for s in sorted(self.slots.values(), key=lambda s: s.wid)
            ],
            "restarts": self.restarts,
            "recycles": self.recycles,
            **({"store": store} if (store := self.followers.health()) else {}),
        }


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) to fix the port the workers will share with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port}: {exc}") from exc
    return sock


def _absolute(path: str) -> str:
    """``path`` made absolute against the current directory (resolved once, at start)."""
    return os.path.abspath(path)
