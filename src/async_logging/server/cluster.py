"""LogCluster: the proxy service (DESIGN §5), in one process or as supervised workers.

One process by default: the listener, the buffer, the publisher thread and the MonApp share
one event loop. With ``workers > 1`` (or ``max_life`` / ``max_messages`` set) a supervisor
spawns worker processes that share the main port with SO_REUSEPORT, restarts any that dies,
and recycles them: a worker that reaches its ``max_life`` or ``max_messages`` asks for a
replacement, the supervisor starts it, waits until it listens, then tells the old one to
drain. Draining (also on SIGTERM / SIGINT) is: stop accepting, close WebSockets with 1001 so
clients reconnect elsewhere, publish everything buffered (incomplete trees flagged), give
the publishers ``wait_for_publisher`` seconds, exit. Nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import wire
from ..buffer import LogBuffer
from ..emitter import EventEmitter
from ..exceptions import ConfigError
from ..publishers import (
    BasePublisher,
    JsonLinesPublisher,
    MultiPublisher,
    Publisher,
    StdoutPublisher,
    load_publisher,
)
from ..publishers.base import import_object
from .config import ServerConfig
from .listener import LogListener
from .monapp import MonApp
from .pipeline import Pipeline, Stats, merge_snapshots, process_rss
from .spool import Spool

__all__ = ["GC_FULL_EVERY", "LogCluster", "Supervisor", "tune_gc"]

log = logging.getLogger("async_logging.server")

#: Seconds between workers' stats reports to the supervisor.
STATS_INTERVAL = 1.0
#: Seconds the supervisor waits for a replacement worker to listen before draining the old one.
REPLACEMENT_TIMEOUT = 30.0
#: Seconds between the supervisor's checks of its workers.
WATCH_INTERVAL = 0.2
#: Fastest restart rate of a crashing worker (seconds between restarts of one slot).
RESTART_BACKOFF = 1.0


class EmitterPublisher(BasePublisher):
    """Emits each published record on a seed-style emitter under its kind."""

    def __init__(self, emitter: EventEmitter) -> None:
        self.emitter = emitter

    def publish_many(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self.emitter.emit(record["kind"], record)


class LogCluster:
    """The log proxy.

    Args:
        config: a :class:`ServerConfig`; keyword ``options`` override its fields (or build one).
        emitter: optional seed-style emitter; every published record is also emitted on it
            under its kind (``'transaction'``, ``'atomicEvent'``, ``'heartbeat'``), from the
            publisher thread.

    In-process use (tests, embedding)::

        cluster = LogCluster(port=0, mon_port=0, publisher=MemoryPublisher())
        await cluster.start()
        ...  # cluster.port, cluster.mon_port
        await cluster.stop()

    From the command line, :meth:`run` blocks until SIGTERM / SIGINT and drains.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        emitter: EventEmitter | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = ServerConfig(**options)
        elif options:
            config = config.replace(**options)
        self.config = config
        self.emitter = emitter
        self.stats = Stats()
        self.pipeline: Pipeline | None = None
        self.listener: LogListener | None = None
        self.monapp: MonApp | None = None
        self.port = config.port
        self.mon_port = config.mon_port
        self.draining = False
        self.recycle_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._shared_output = False
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ building blocks

    def _make_buffer(self) -> LogBuffer:
        c = self.config
        spec = _plugin(c.buffer, "buffer", LogBuffer)
        if isinstance(spec, type):
            try:
                spec = spec(
                    clean_duration=c.clean_duration, clean_cycles=c.clean_cycles, settle=c.settle
                )
            except TypeError as exc:
                raise ConfigError(f"buffer {spec.__name__} cannot be built: {exc}") from exc
        return _require(spec, "buffer", ("feed_many", "expire", "flush_all"))  # type: ignore[no-any-return]

    def _make_publisher(self) -> Publisher:
        c = self.config
        specs = c.publisher
        publishers: list[Publisher] = []
        if specs is None:
            publishers.append(
                JsonLinesPublisher(
                    c.log_file,
                    max_bytes=c.log_max_bytes,
                    backup_count=c.log_backup_count,
                    shared=self._shared_output,
                )
            )
        else:
            for spec in specs if isinstance(specs, list | tuple) else [specs]:
                publishers.append(load_publisher(spec))
        if c.stdout:
            publishers.append(StdoutPublisher())
        if self.emitter is not None:
            publishers.append(EmitterPublisher(self.emitter))
        # The viewer's store and live hub (issue 6) come after the configured sinks, the hub
        # last: a record seen live is already in the store.
        from ..publishers.sqlite import SqliteStore
        from .live import LiveHub

        self.store: SqliteStore | None = None
        if c.store:
            self.store = SqliteStore(c.store, max_age=c.store_max_age, max_bytes=c.store_max_bytes)
            publishers.append(self.store)
        self.live_hub = LiveHub()
        publishers.append(self.live_hub)
        return publishers[0] if len(publishers) == 1 else MultiPublisher(publishers)

    def _make_listener(self, pipeline: Pipeline) -> LogListener:
        spec = _plugin(self.config.listener, "listener", LogListener)
        listener = spec(pipeline, self.config) if isinstance(spec, type) else spec
        methods = ("start", "stop_accepting", "close_connections", "cleanup")
        return _require(listener, "listener", methods)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, reuse_port: bool = False, monitor: bool = True) -> None:
        """Build the pipeline, listen, start the clean cycle, heartbeats and the MonApp."""
        from .viewer import Viewer

        c = self.config
        self._shared_output = reuse_port  # workers append to one file
        self.viewer: Viewer | None = None
        buffer = self._make_buffer()
        publisher = self._make_publisher()
        spool = None
        if c.spool:
            try:
                spool = Spool(Path(c.spool) / f"w-{os.getpid()}", c.spool_max_bytes)
            except OSError as exc:
                raise ConfigError(f"cannot use spool directory {c.spool}: {exc}") from exc
        self.pipeline = Pipeline(
            buffer,
            publisher,
            publish_queue=c.publish_queue,
            wait_for_publisher=c.wait_for_publisher,
            stats=self.stats,
            spool=spool,
            wire_limits=wire.WireLimits(
                max_message_bytes=c.max_message_bytes,
                max_events_per_frame=c.max_events_per_frame,
                max_depth=c.max_depth,
                max_string_length=c.max_string_length,
                max_keys_per_map=c.max_keys_per_map,
            ),
        )
        self.pipeline.start()
        if spool is not None:
            for orphan in Spool.orphans(c.spool):
                try:
                    old = Spool(orphan, c.spool_max_bytes)
                except OSError:
                    continue  # another process adopted it first
                n = self.pipeline.adopt(old)
                log.warning("replayed %d events from the spool of a stopped process", n)
        self.listener = self._make_listener(self.pipeline)
        try:
            self.port = await self.listener.start(reuse_port=reuse_port)
            if monitor and c.mon_port >= 0:
                store = self.store
                self.viewer = Viewer(store.path if store else None, self.live_hub)
                self.monapp = MonApp(self.snapshot, self.health, viewer=self.viewer)
                self.mon_port = await self.monapp.start(c.mon_host, c.mon_port)
        except OSError as exc:
            await self.pipeline.close("shutdown")
            if self.listener is not None:
                await self.listener.cleanup()
            raise ConfigError(f"cannot listen: {exc}") from exc
        self._tasks = [asyncio.create_task(self._clean_loop(), name="clean-cycle")]
        if c.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if c.max_life > 0 or c.max_messages > 0:
            self._tasks.append(asyncio.create_task(self._recycle_watch(), name="recycle"))

    async def stop(self, reason: str = "shutdown") -> None:
        """Drain: stop accepting, close connections, publish everything, stop publishers."""
        if self.draining:
            return
        self.draining = True
        listener, pipeline = self.listener, self.pipeline
        if listener is not None:
            await listener.stop_accepting()
            await listener.close_connections()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if pipeline is not None:
            await pipeline.close(reason)
        if listener is not None:
            await listener.cleanup()
        if self.monapp is not None:
            await self.monapp.cleanup()
        viewer = getattr(self, "viewer", None)
        if viewer is not None:
            await viewer.close()

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/metrics`` (and the supervisor)."""
        p = self.pipeline
        return self.stats.snapshot(p.buffer if p else None, p.queued if p else 0)

    def health(self) -> dict[str, Any]:
        """What ``/ecv`` reports."""
        p = self.pipeline
        return {
            "available": self.config.ecv and not self.draining and p is not None,
            "machine": self.config.machine_name,
            "pid": os.getpid(),
            "connections": self.stats.connections,
            "open_transactions": p.buffer.open_count if p else 0,
            "publish_queue": p.queued if p else 0,
        }

    # ------------------------------------------------------------------ background tasks

    async def _clean_loop(self) -> None:
        c = self.config
        tick = min(1.0, c.clean_duration, c.settle) if c.settle else min(1.0, c.clean_duration)
        assert self.pipeline is not None
        ticks = 0
        while True:
            await asyncio.sleep(tick)
            self.pipeline.expire()
            if not gc.isenabled():  # serve runs the collector itself (tune_gc)
                ticks += 1
                gc.collect(2 if ticks % GC_FULL_EVERY == 0 else 1)

    async def _heartbeat_loop(self) -> None:
        assert self.pipeline is not None
        import psutil

        proc = psutil.Process()
        proc.cpu_percent(None)
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            snap = self.snapshot()
            hb = {
                "clazz": "heartbeat",
                "type": "heartbeat",
                "name": "async-logging",
                "machine": self.config.machine_name,
                "pid": os.getpid(),
                "level": "INFO",
                "msg": "server heartbeat",
                "cpu_percent": proc.cpu_percent(None),
                "rss_bytes": process_rss(),
                "connections": snap["connections"],
                "open_transactions": snap.get("open_transactions", 0),
                "events": snap["events"],
                "uptime": round(time.monotonic() - self._started_at, 3),
            }
            await self.pipeline.accept([hb])

    async def _recycle_watch(self) -> None:
        c = self.config
        deadline = time.monotonic() + c.max_life * (1 + random.random()) if c.max_life > 0 else None
        assert self.listener is not None
        while True:
            await asyncio.sleep(0.05)
            if (deadline is not None and time.monotonic() >= deadline) or (
                c.max_messages > 0 and self.listener.frames_seen >= c.max_messages
            ):
                self.recycle_wanted.set()
                return

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT, then drain. Returns the exit status."""
        c = self.config
        if c.workers > 1 or c.max_life > 0 or c.max_messages > 0:
            return Supervisor(c).run()
        return asyncio.run(self._run_single())

    async def _run_single(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tune_gc()
        await self.start()
        _announce(self.config, self.port, self.mon_port)
        await stop.wait()
        print("async-logging: draining…", file=sys.stderr, flush=True)
        await self.stop("shutdown")
        return 0


#: Clean-loop ticks between full collections when the server runs the collector itself.
GC_FULL_EVERY = 60


def tune_gc() -> None:
    """Let the server run the cycle collector on its own schedule (``serve`` only).

    Ingest allocates a dict per event and frees nearly all of them by reference counting,
    yet the automatic collector, triggered by allocation counts, ran every few frames and
    took a third of the server's time. So the serving process freezes its start-up objects
    and turns automatic collection off; the clean loop then collects the young generations
    every tick (about a second) and everything every :data:`GC_FULL_EVERY` ticks, which
    keeps memory held by reference cycles bounded.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def _announce(c: ServerConfig, port: int, mon_port: int, workers: int = 1) -> None:
    if c.publisher is None:
        sink = os.path.abspath(c.log_file)
    else:
        sink = ", ".join(map(str, c.publisher if isinstance(c.publisher, list) else [c.publisher]))
    mon = f"http://{c.mon_host}:{mon_port}/ecv /metrics" if c.mon_port >= 0 else "off"
    s = "s" if c.tls_cert else ""
    print(
        f"async-logging: listening on ws{s}://{c.host}:{port}/ and http{s}://{c.host}:{port}/log "
        f"({workers} worker{'s' if workers != 1 else ''}), monitoring {mon}, "
        f"writing {sink}{' and stdout' if c.stdout else ''}"
        + (f", store {_absolute(c.store)}" if c.store else "")
        + (f", viewer http://{c.mon_host}:{mon_port}/ui/" if c.store and c.mon_port >= 0 else ""),
        file=sys.stderr,
        flush=True,
    )


# ---------------------------------------------------------------------- workers


def _worker_main(config: ServerConfig, wid: int, reports: Any) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {wid}: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is handled in the loop
        asyncio.run(_worker(config, wid, reports))


async def _worker(config: ServerConfig, wid: int, reports: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = LogCluster(config)
    tune_gc()
    await cluster.start(reuse_port=True, monitor=False)
    reports.put(("ready", wid, os.getpid(), cluster.port))

    async def report() -> None:
        while True:
            reports.put(("stats", wid, cluster.snapshot()))
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
    reports.put(("stats", wid, cluster.snapshot()))
    reports.put(("bye", wid))


class _Slot:
    """One worker process as the supervisor sees it."""

    def __init__(self, wid: int, process: Any) -> None:
        self.wid = wid
        self.process = process
        self.pid: int | None = None
        self.ready = False
        self.draining = False
        self.retiring_for: int | None = None  # the replacement being waited for
        self.started = time.monotonic()


class Supervisor:
    """Spawns, watches, restarts and recycles worker processes sharing one port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.slots: dict[int, _Slot] = {}
        self._next_wid = 0
        self._ctx = multiprocessing.get_context("spawn")
        self.reports: Any = self._ctx.Queue()
        self.live: dict[int, dict[str, Any]] = {}
        self.retired: dict[str, Any] = {}
        self.restarts = 0
        self.recycles = 0
        self.stopping = False
        self.port = config.port
        self.mon_port = config.mon_port
        self._reserve: socket.socket | None = None
        self.monapp: MonApp | None = None
        self.viewer: Any = None

    def run(self) -> int:
        """Run until SIGTERM / SIGINT; drain every worker; return the exit status."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        _announce(self.config, self.port, self.mon_port, self.config.workers)
        await stop.wait()
        print("async-logging: draining workers…", file=sys.stderr, flush=True)
        await self.stop()
        return 0

    async def start(self) -> None:
        """Reserve the port, spawn the workers, wait until they all listen."""
        c = self.config
        self._reserve = _reserve_port(c.host, c.port)
        self.port = self._reserve.getsockname()[1]
        self.worker_config = c.replace(port=self.port, mon_port=-1, workers=1)
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_reports, daemon=True)
        self._reader.start()
        for _ in range(c.workers):
            self._spawn()
        deadline = time.monotonic() + REPLACEMENT_TIMEOUT
        while not all(s.ready for s in self.slots.values()):
            if time.monotonic() > deadline:
                raise ConfigError("workers did not start listening in time")
            await asyncio.sleep(0.05)
        if c.mon_port >= 0:
            from .viewer import Viewer

            # Workers write one SQLite store; the viewer reads it (no live tail here).
            self.viewer = Viewer(_absolute(c.store) if c.store else None, None)
            self.monapp = MonApp(self.snapshot, self.health, viewer=self.viewer)
            self.mon_port = await self.monapp.start(c.mon_host, c.mon_port)
        self._watch = asyncio.create_task(self._watch_loop())

    async def stop(self) -> None:
        """SIGTERM every worker, wait for their drain, then release everything."""
        self.stopping = True
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
        await asyncio.sleep(0.2)  # let the last reports arrive
        self.reports.put(None)
        if self.monapp is not None:
            await self.monapp.cleanup()
        if self.viewer is not None:
            await self.viewer.close()
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
            slot.draining = True
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
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_report, msg)

    def _on_report(self, msg: tuple[Any, ...]) -> None:
        kind, wid = msg[0], msg[1]
        slot = self.slots.get(wid)
        if kind == "ready" and slot is not None:
            slot.ready = True
            slot.pid = msg[2]
        elif kind == "stats":
            self.live[wid] = msg[2]
        elif kind == "recycle" and slot is not None and slot.retiring_for is None:
            if self.stopping or slot.draining:
                return
            self.recycles += 1
            replacement = self._spawn()
            slot.retiring_for = replacement.wid
        elif kind == "bye":
            self._retire_stats(wid)

    def _retire_stats(self, wid: int) -> None:
        snap = self.live.pop(wid, None)
        if snap is not None:
            for gauge in ("connections", "open_transactions", "publish_queue"):
                snap.pop(gauge, None)
            self.retired = merge_snapshots([self.retired, snap])

    async def _watch_loop(self) -> None:
        last_restart: dict[int, float] = {}
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
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
        return snap

    def health(self) -> dict[str, Any]:
        ready = [s for s in self.slots.values() if s.ready and not s.draining]
        return {
            "available": self.config.ecv and not self.stopping and bool(ready),
            "machine": self.config.machine_name,
            "pid": os.getpid(),
            "workers": [
                {"id": s.wid, "pid": s.pid, "ready": s.ready, "draining": s.draining}
                for s in sorted(self.slots.values(), key=lambda s: s.wid)
            ],
            "restarts": self.restarts,
            "recycles": self.recycles,
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


def _plugin(spec: Any, what: str, default: type) -> Any:
    """A plug-in option resolved: ``"module:attr"`` imported, None replaced by the default."""
    if isinstance(spec, str):
        spec = import_object(spec, what=what)
    return default if spec is None else spec


def _require(obj: Any, what: str, methods: tuple[str, ...]) -> Any:
    """``obj`` itself, once it is known to have every method a ``what`` plug-in needs."""
    for method in methods:
        if not callable(getattr(obj, method, None)):
            raise ConfigError(f"{what} {obj!r} has no {method}() method")
    return obj


def _absolute(path: str) -> str:
    """``path`` made absolute against the current directory (resolved once, at start)."""
    return os.path.abspath(path)
