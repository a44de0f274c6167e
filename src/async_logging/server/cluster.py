"""LogCluster: the proxy service (docs/design.md §5) in one process: listener → buffer → publishers.

The listener, the buffer, the publisher thread and the MonApp share one event loop. With
``workers > 1`` (or ``max_life`` / ``max_messages`` set) :meth:`LogCluster.run` hands over
to the :class:`~async_logging.server.supervisor.Supervisor`, whose worker processes each run
a LogCluster on the shared port. Draining (on SIGTERM / SIGINT, or when a worker is
recycled) is: stop accepting, close WebSockets with 1001 so clients reconnect elsewhere,
publish everything buffered (incomplete trees flagged), give the publishers
``wait_for_publisher`` seconds, exit. Nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import wire
from ..buffer import LogBuffer
from ..emitter import EventEmitter
from ..exceptions import ConfigError, LimitExceeded
from ..publishers import (
    BasePublisher,
    JsonLinesPublisher,
    MultiPublisher,
    Publisher,
    StdoutPublisher,
    load_publisher,
)
from ..publishers.base import import_object
from ..publishers.otlp import OtlpExporter
from .config import ENGINE_OPTIONS, ServerConfig, announcement
from .delivery import DeadLetters
from .followers import Followers
from .gctune import GC_FULL_EVERY, collect_on_tick, tune_gc
from .lifecycle import Service, ServiceState, stop_signal
from .listener import Ingest, LogListener
from .live import LiveHub
from .loopwatch import LoopWatch
from .monapp import MonApp
from .pipeline import Pipeline, Stats, process_rss
from .spool import Spool, SpoolFormatError
from .supervisor import Supervisor
from .viewer import Viewer

if TYPE_CHECKING:
    from ..bus.ingest import BusIngest

__all__ = ["GC_FULL_EVERY", "ClusterState", "DrainReport", "LogCluster", "Supervisor", "tune_gc"]

log = logging.getLogger("async_logging.server")


class EmitterPublisher(BasePublisher):
    """Emits each published record on a seed-style emitter under its kind."""

    def __init__(self, emitter: EventEmitter) -> None:
        self.emitter = emitter

    def publish_many(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self.emitter.emit(record["kind"], record)


#: Where a :class:`LogCluster` is in its life (see :class:`~.lifecycle.ServiceState`).
ClusterState = ServiceState


@dataclasses.dataclass(frozen=True, slots=True)
class DrainReport:
    """What a drain published: the trees the engine still held (and those of frames
    answered while it closed connections), and what the publishers refused to the end.

    Attributes:
        trees: transaction trees published during the drain.
        incomplete: those published incomplete, by reason (``shutdown``, ``recycled``...).
        dropped: records given up past ``wait_for_publisher`` (the publisher failing).
    """

    trees: int = 0
    incomplete: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dropped: int = 0

    @classmethod
    def between(
        cls, before: tuple[int, Mapping[str, int], int], after: tuple[int, Mapping[str, int], int]
    ) -> DrainReport:
        """The report of a drain from two :meth:`LogCluster._published_counts`."""
        incomplete = {k: n - before[1].get(k, 0) for k, n in after[1].items()}
        return cls(
            after[0] - before[0],
            {k: n for k, n in sorted(incomplete.items()) if n},
            after[2] - before[2],
        )

    def summary(self) -> str:
        """One line for ``serve`` to print at exit."""
        n = sum(self.incomplete.values())
        line = f"the drain published {self.trees} tree{'' if self.trees == 1 else 's'}"
        if n:
            reasons = ", ".join(f"{k} {v}" for k, v in self.incomplete.items())
            line += f", {n} of them incomplete ({reasons})"
        if self.dropped:
            line += f"; {self.dropped} records given up (the publisher failed)"
        return line


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
        #: How long the event loop was held at worst (``/metrics``).
        self.loopwatch = LoopWatch()
        self.pipeline: Pipeline | None = None
        #: With ``bus`` set, what the listener hands batches to instead (docs/design.md §8).
        self.bus: BusIngest | None = None
        self.listener: LogListener | None = None
        self.monapp: MonApp | None = None
        self.port = config.port
        self.mon_port = config.mon_port
        self._lifecycle = Service("LogCluster")
        self.recycle_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Replays the spools of stopped processes while the server serves (with a spool).
        self.replaying: asyncio.Task[None] | None = None
        self._shared_output = False
        self._started_at = time.monotonic()
        #: The store's follower and the live hub (one process only; a supervisor runs
        #: them for its workers): set by :meth:`start`.
        self.followers: Followers | None = None
        self.viewer: Viewer | None = None
        #: The OTLP exporter, a publisher, when ``otlp_endpoint`` is set.
        self.otlp_exporter: OtlpExporter | None = None
        #: What the drain published (set once :meth:`stop` has run).
        self.drained: DrainReport | None = None

    # ------------------------------------------------------------------ building blocks

    def _make_buffer(self) -> LogBuffer:
        spec = _plugin(self.config.buffer, "buffer", LogBuffer)
        if isinstance(spec, type):
            options = _buffer_options(spec, self.config)
            try:
                spec = spec(**options)
            except TypeError as exc:
                raise ConfigError(f"buffer {spec.__name__} cannot be built: {exc}") from exc
        return _require(spec, "buffer", ("feed_many", "expire", "flush_all"))  # type: ignore[no-any-return]

    def _make_publisher(self) -> Publisher:
        c = self.config
        specs = c.publisher
        publishers: list[Publisher] = []
        # The default sink; with the store on it is written whatever plug-ins are given:
        # the store follows it.
        if specs is None or c.store:
            publishers.append(
                JsonLinesPublisher(
                    c.log_file,
                    max_bytes=c.log_max_bytes,
                    backup_count=c.log_backup_count,
                    shared=self._shared_output,
                )
            )
        if specs is not None:
            for spec in specs if isinstance(specs, list | tuple) else [specs]:
                publishers.append(load_publisher(spec))
        if c.stdout:
            publishers.append(StdoutPublisher())
        if c.otlp_endpoint:  # follows the published records on a queue and thread of its own
            self.otlp_exporter = OtlpExporter(
                c.otlp_endpoint,
                c.otlp_headers,
                max_queue=c.otlp_export_queue,
                close_timeout=c.wait_for_publisher,
            )
            publishers.append(self.otlp_exporter)
        if self.emitter is not None:
            publishers.append(EmitterPublisher(self.emitter))
        return publishers[0] if len(publishers) == 1 else MultiPublisher(publishers)

    def _make_listener(self, pipeline: Ingest) -> LogListener:
        spec = _plugin(self.config.listener, "listener", LogListener)
        listener = spec(pipeline, self.config) if isinstance(spec, type) else spec
        methods = ("start", "stop_accepting", "close_connections", "cleanup")
        return _require(listener, "listener", methods)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> ClusterState:
        """Where the cluster is in its life (see :class:`ClusterState`)."""
        return self._lifecycle.state

    @property
    def draining(self) -> bool:
        """Whether :meth:`stop` has begun (draining or stopped)."""
        return self._lifecycle.stopping

    async def start(
        self, *, reuse_port: bool = False, monitor: bool = True, follow: bool = True
    ) -> None:
        """Build the pipeline, listen, start the clean cycle, heartbeats and the MonApp.

        Args:
            reuse_port: a worker sharing the port (and the output files) with others.
            monitor: serve the MonApp (and the viewer) on ``mon_port``.
            follow: run the store's follower (a supervisor runs it for its workers).

        Raises:
            ConfigError: an option is unusable (a plug-in, the store, the spool, a port);
                what was built is released and the cluster is stopped.
            LifecycleError: it was started before.
        """
        await self._lifecycle.start(
            functools.partial(self._start, reuse_port, monitor, follow),
            functools.partial(self._release, "shutdown"),
        )

    async def _start(self, reuse_port: bool, monitor: bool, follow: bool) -> None:
        c = self.config
        self._shared_output = reuse_port  # workers append to one file
        if follow and not c.bus:  # with the bus, the store is a sink's (docs/design.md §8)
            # Before anything is published: the store starts where the file is now.
            self.followers = Followers(c)
            self.followers.start()
        buffer = self._make_buffer()
        publisher = self._make_publisher()
        # A spool the disk refuses does not stop the server: it serves and refuses batches
        # (spool_unavailable, logged, in /ecv) until the disk takes them.
        spool = Spool.for_process(c.spool, c.spool_max_bytes) if c.spool else None
        self.pipeline = Pipeline(
            buffer,
            publisher,
            publish_queue=c.publish_queue,
            wait_for_publisher=c.wait_for_publisher,
            stats=self.stats,
            spool=spool,
            dead_letters=DeadLetters(c.dead_letter_file(), shared=reuse_port),
            wire_limits=wire.WireLimits(
                max_message_bytes=c.max_message_bytes,
                max_events_per_frame=c.max_events_per_frame,
                max_depth=c.max_depth,
                max_string_length=c.max_string_length,
                max_keys_per_map=c.max_keys_per_map,
                max_array_length=c.max_array_length,
                max_record_bytes=c.max_record_bytes,
            ),
        )
        self.pipeline.start()
        if c.bus:  # serve --bus: batches go to the bus, reassemblers take them from there
            from ..bus.ingest import BusIngest

            self.bus = BusIngest.for_config(c, self.stats, self.pipeline.wire_limits)
            self.bus.start()
        self.listener = self._make_listener(self.bus or self.pipeline)
        try:
            self.port = await self.listener.start(reuse_port=reuse_port)
            if monitor and c.mon_port >= 0:
                self.viewer = Viewer.for_followers(self.followers)
                self.monapp = MonApp(self.snapshot, self.health, viewer=self.viewer, config=c)
                self.mon_port = await self.monapp.start(c.mon_host, c.mon_port)
        except OSError as exc:
            raise ConfigError(f"cannot listen: {exc}") from exc
        self._tasks = [
            asyncio.create_task(self._clean_loop(), name="clean-cycle"),
            asyncio.create_task(self.loopwatch.run(), name="loop-watch"),
        ]
        if c.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if c.max_life > 0 or c.max_messages > 0:
            self._tasks.append(asyncio.create_task(self._recycle_watch(), name="recycle"))
        if spool is not None:
            # After listening: the port opens at once, however much there is to replay.
            self.replaying = asyncio.create_task(self._replay_spools(), name="spool-replay")
            self._tasks.append(self.replaying)

    async def stop(self, reason: str = "shutdown") -> None:
        """Drain: stop accepting, close connections, publish everything, stop publishers.

        Once only: stopping a draining or stopped cluster returns at once; a cluster never
        started just becomes stopped.
        """
        await self._lifecycle.stop(functools.partial(self._release, reason))

    async def _release(self, reason: str) -> None:
        """Take down what :meth:`start` built, in order (after a failed start, what it had
        built so far): publish everything held flagged ``reason``, release the ports."""
        listener, pipeline = self.listener, self.pipeline
        before = self._published_counts()
        if listener is not None and self._lifecycle.state is ClusterState.DRAINING:
            await listener.stop_accepting()
            await listener.close_connections()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.bus is not None:  # every batch taken was answered: nothing in flight
            await self.bus.close()
        if pipeline is not None:
            release_held = getattr(listener, "release_held", None)
            if release_held is not None:  # OTLP root spans held for the settle
                await release_held()
            await pipeline.close(reason)
        self.drained = DrainReport.between(before, self._published_counts())
        if listener is not None:
            await listener.cleanup()
        if self.monapp is not None:
            await self.monapp.cleanup()
        if self.viewer is not None:
            await self.viewer.close()
        if self.followers is not None and not await self.followers.stop():
            log.warning(
                "the store had not caught up after %g s; it goes on from there at the next start",
                self.config.wait_for_publisher,
            )

    def _published_counts(self) -> tuple[int, Mapping[str, int], int]:
        """Trees published so far, the incomplete ones by reason, records given up."""
        buffer = self.pipeline.buffer if self.pipeline is not None else None
        stats: Mapping[str, int] = getattr(buffer, "stats", None) or {}
        incomplete: Mapping[str, int] = getattr(buffer, "incomplete", None) or {}
        trees = stats.get("published_complete", 0) + stats.get("published_incomplete", 0)
        return trees, dict(incomplete), self.stats.records_dropped

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/metrics`` (and the supervisor)."""
        p = self.pipeline
        snap = self.stats.snapshot(p.buffer if p else None, p.queued if p else 0)
        snap["loop_stall_max_seconds"] = self.loopwatch.worst
        snap["loop_stalls"] = self.loopwatch.stalls
        otlp = getattr(self.listener, "otlp", None)
        if otlp is not None:
            snap["otlp"] = otlp.snapshot()
        if self.otlp_exporter is not None:
            snap["otlp_export"] = self.otlp_exporter.snapshot()
        store = self.followers.snapshot() if self.followers is not None else None
        if store is not None:
            snap["store"] = store
        bus = self._bus_side()
        if bus is not None:
            snap["bus"] = bus.snapshot()
        return snap

    def _bus_side(self) -> Any:
        """What this node does on the bus (an ingest node's publisher, a sink's consumer)."""
        return self.bus if self.bus is not None else getattr(self.listener, "bus", None)

    def health(self) -> dict[str, Any]:
        """What ``/ecv`` reports."""
        p = self.pipeline
        # A proxy that does not ack (publish queue full, publisher stalled, spool full) must
        # not look AVAILABLE: the load balancer sends traffic elsewhere.
        refusing = p.refusing() if p is not None else None
        if not refusing and (bus := self._bus_side()) is not None:
            refusing = bus.refusing()  # the bus is down (or refused a batch just now)
        running = self._lifecycle.state is ClusterState.RUNNING
        return {
            "available": self.config.ecv and running and not refusing,
            **({"reason": refusing} if refusing else {}),
            "machine": self.config.machine_name,
            "pid": os.getpid(),
            "connections": self.stats.connections,
            "open_transactions": p.buffer.open_count if p else 0,
            "publish_queue": p.queued if p else 0,
            **({"store": store} if (store := self._store_health()) else {}),
        }

    @property
    def live_hub(self) -> LiveHub | None:
        """The live tail's hub (fed from the store by the viewer), or None without a store."""
        return self.followers.hub if self.followers is not None else None

    def _store_health(self) -> dict[str, Any] | None:
        return self.followers.health() if self.followers is not None else None

    # ------------------------------------------------------------------ background tasks

    async def _replay_spools(self) -> None:
        """Adopt and replay the spool of every stopped process (see Pipeline.adopt)."""
        c, pipeline = self.config, self.pipeline
        assert pipeline is not None and pipeline.spool is not None
        for orphan in Spool.orphans(c.spool):
            if pipeline.spool.error is not None:
                log.error("spool %s left for a later start: %s", orphan, pipeline.spool.error)
                continue
            try:
                old = Spool(orphan, c.spool_max_bytes)
            except OSError:
                continue  # another process adopted it first
            log.warning("replaying the spool of a stopped process (%s) while serving", orphan)
            began = time.monotonic()
            try:
                n = await pipeline.adopt(old)
            except (SpoolFormatError, LimitExceeded) as exc:
                log.error("spool %s left for a later start: %s", orphan, exc)
                continue
            except Exception:  # never expected; the server serves on
                log.exception("spool %s left for a later start", orphan)
                continue
            log.warning(
                "replayed %d events from %s in %.1f s%s",
                n,
                orphan,
                time.monotonic() - began,
                f"; {old.torn} damaged records skipped ({old.skipped_bytes} bytes)"
                if old.torn
                else "",
            )

    async def _clean_loop(self) -> None:
        c = self.config
        tick = min(1.0, c.clean_duration, c.settle) if c.settle else min(1.0, c.clean_duration)
        assert self.pipeline is not None
        ticks = 0
        while True:
            await asyncio.sleep(tick)
            self.pipeline.expire()
            if self.followers is not None:
                self.followers.check()
            ticks += 1
            collect_on_tick(ticks)  # when serve runs the collector itself (tune_gc)

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
            try:
                await (self.bus or self.pipeline).accept([hb])
            except LimitExceeded as exc:  # the bus (or the spool) cannot take it now
                log.debug("heartbeat not taken: %s", exc)

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
        stop = stop_signal()
        tune_gc()
        await self.start()
        print(announcement(self.config, self.port, self.mon_port), file=sys.stderr, flush=True)
        await stop.wait()
        print("async-logging: draining…", file=sys.stderr, flush=True)
        await self.stop("shutdown")
        if self.drained is not None:
            print(f"async-logging: {self.drained.summary()}", file=sys.stderr, flush=True)
        return 0


def _plugin(spec: Any, what: str, default: type) -> Any:
    """A plug-in option resolved: ``"module:attr"`` imported, None replaced by the default."""
    if isinstance(spec, str):
        spec = import_object(spec, what=what)
    return default if spec is None else spec


#: The engine's options every buffer class is built with (as in the seed), taken or not.
_SEED_BUFFER_OPTIONS = ("clean_duration", "clean_cycles", "settle")


def _buffer_options(cls: type, config: ServerConfig) -> dict[str, Any]:
    """The engine's limits as keywords for a buffer class (:class:`LogBuffer`'s names).

    The seed's three (``clean_duration``, ``clean_cycles``, ``settle``) always; the caps
    (``max_open``, ...) when the class takes them: by name or as ``**options``. A class
    that does not take a cap is built without it, unless that cap was set to another value
    than the default, which is then a :class:`ConfigError` rather than a cap silently lost.
    """
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: the seed's keywords only
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    options: dict[str, Any] = {}
    for option, name in ENGINE_OPTIONS.items():
        value = getattr(config, option)
        if name in _SEED_BUFFER_OPTIONS or takes_any or name in params:
            options[name] = value
        elif value != defaults[option]:
            raise ConfigError(f"buffer {cls.__name__} does not take option {option}")
    return options


def _require(obj: Any, what: str, methods: tuple[str, ...]) -> Any:
    """``obj`` itself, once it is known to have every method a ``what`` plug-in needs."""
    for method in methods:
        if not callable(getattr(obj, method, None)):
            raise ConfigError(f"{what} {obj!r} has no {method}() method")
    return obj
