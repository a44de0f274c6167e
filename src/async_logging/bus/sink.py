"""TreesConsumer: a sink node's side of the bus (``async-logging sink``; docs/design.md §8).

A sink is a :class:`~async_logging.server.LogCluster` whose listener is this consumer
instead of the WebSocket and HTTP port: it reads the trees stream with a durable consumer
of its own (``alog-sink-<name>``: every sink gets every record; two processes with one
name share the work) and hands the records to the cluster's pipeline, so they reach the
very publishers ``serve`` writes to (the JSON-lines file, the store that follows it and
the viewer, the OTLP exporter, plug-ins), with the same retries, dead letters and
backpressure. A message is acked once its records are published (and no poison record of
it is still held aside): a sink killed at any point loses nothing; what it had published
without acking comes out again after a restart (at least once, the file's last lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar, Final

from ..server.config import ServerConfig
from .codec import Unreadable, decode
from .jetstream import TREES_STREAM, BusLink, BusSettings
from .partition import TREES_SUBJECT
from .records import Joiner

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ..server.cluster import LogCluster
    from ..server.pipeline import Pipeline

__all__ = ["SINK_BATCH", "TreesConsumer", "make_sink", "run_sink"]

log = logging.getLogger("async_logging.bus")

#: Records one fetch takes at most.
SINK_BATCH: Final = 1000
#: Seconds a fetch waits for a record.
SINK_WAIT: Final = 0.25
#: Seconds between two looks at whether the publishers took a batch.
PUBLISHED_POLL: Final = 0.002


class TreesConsumer:
    """Consumes the trees stream into a cluster's pipeline (a listener plug-in; see
    :meth:`bound` for the bus it reads).

    Args:
        pipeline: the cluster's pipeline (its publishers are the sink's).
        config: the cluster's options (``bus_ack_wait``, ``mon_port``...).
    """

    settings: ClassVar[BusSettings | None] = None
    sink_name: ClassVar[str] = "default"

    @classmethod
    def bound(cls, settings: BusSettings, name: str) -> type[TreesConsumer]:
        """This class for one bus and one consumer name (what ``listener=`` takes)."""
        return type(cls.__name__, (cls,), {"settings": settings, "sink_name": name})

    def __init__(self, pipeline: Pipeline, config: ServerConfig) -> None:
        assert self.settings is not None, "use TreesConsumer.bound(settings, name)"
        self.pipeline = pipeline
        self.config = config
        self.durable = f"alog-sink-{self.sink_name}"
        self.link = BusLink(
            self.settings, f"async-logging-sink-{self.sink_name}-{os.getpid()}", streams=False
        )
        self.joiner = Joiner()
        self.counts: Counter[str] = Counter()
        self.lag = 0
        self.frames_seen = 0  # the cluster's recycle watch reads it
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unacked: list[Msg] = []
        #: The bus side of this node, for the cluster's ``/metrics`` and ``/ecv``.
        self.bus = self

    # ------------------------------------------------------------------ listener API

    async def start(self, *, reuse_port: bool = False) -> int:
        """Connect in the background and consume; returns 0 (no port)."""
        self.link.start()
        self._task = asyncio.create_task(self._run(), name="trees-consumer")
        return 0

    async def stop_accepting(self) -> None:
        """Take no more records."""
        self._stopping.set()

    async def close_connections(self, timeout: float = 5.0) -> None:
        """Finish the batch in hand (published and acked)."""
        self._stopping.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(task, timeout + self.config.wait_for_publisher)

    async def cleanup(self) -> None:
        """Close the bus connection."""
        self._stopping.set()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.link.close()

    # ------------------------------------------------------------------ the bus side

    def refusing(self) -> str | None:
        """``bus_unavailable`` while the bus cannot be used (``/ecv`` 503)."""
        return None if self.link.up else "bus_unavailable"

    def snapshot(self) -> dict[str, Any]:
        """The bus's counters for ``/metrics``."""
        return {
            "up": int(self.link.up),
            "errors": dict(self.link.errors),
            "consumers": {
                self.durable: {
                    "lag": self.lag,
                    "held": len(self._unacked) + self.joiner.waiting,
                    "redelivered": self.counts["redelivered"],
                    "messages": self.counts["messages"],
                    "unreadable": self.counts["unreadable"],
                }
            },
        }

    # ------------------------------------------------------------------ consuming

    async def _bind(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self.link.wait()
        js = self.link.js
        assert js is not None and self.settings is not None
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=f"{TREES_SUBJECT}.*",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.settings.max_ack_pending,
        )
        try:
            await js.add_consumer(TREES_STREAM, config)
        except Exception as exc:  # made before with other settings: use it as it is
            log.warning("sink: consumer %s kept as it is (%s)", self.durable, exc)
        return await js.pull_subscribe_bind(self.durable, stream=TREES_STREAM)

    async def _run(self) -> None:
        while True:
            try:
                sub = await self._bind()
                break
            except Exception as exc:  # no JetStream leader yet, the bus just went away...
                self.link.errors["bind"] += 1
                log.warning("sink: cannot bind its consumer yet (%s)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
                if self._stopping.is_set():
                    return
        assert self.settings is not None
        progress_every = self.settings.ack_wait / 3
        loop = asyncio.get_running_loop()
        next_progress = loop.time() + progress_every
        next_look = 0.0
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(SINK_BATCH, timeout=SINK_WAIT)
            except TimeoutError:
                msgs = []
            except Exception as exc:  # the connection is down or reconnecting
                self.link.errors["fetch"] += 1
                log.debug("sink: fetch failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), SINK_WAIT)
                continue
            if msgs:
                await self._take(msgs)
            now = loop.time()
            if now >= next_progress:
                next_progress = now + progress_every
                for msg in self._unacked:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
            if now >= next_look:
                next_look = now + 2.0
                await self._look()

    async def _take(self, msgs: list[Msg]) -> None:
        counts = self.counts
        counts["messages"] += len(msgs)
        msgs.sort(key=lambda m: int(m.metadata.sequence.stream))
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                counts["redelivered"] += 1
        readable: list[tuple[str, bytes, dict[str, str] | None, Msg]] = []
        for m in msgs:
            try:
                readable.append((m.subject, decode(m.data, m.headers), m.headers, m))
            except Unreadable as exc:
                counts["unreadable"] += 1
                log.error("sink: message %s is unreadable (%s); dropped", m.subject, exc)
                with contextlib.suppress(Exception):
                    await m.term()
        joined = self.joiner.take(readable)
        pipeline = self.pipeline
        if len(joined.records):
            pipeline.emit(joined.records)
            # The publisher thread sets no event when its queue empties: poll it.
            while pipeline.queued:  # noqa: ASYNC110  # published (or given up) once it drops
                await asyncio.sleep(PUBLISHED_POLL)
        self._unacked.extend(joined.tokens)
        if pipeline.delivery.holding:
            return  # a poison record of these is held aside: acked once it is settled
        unacked, self._unacked = self._unacked, []
        for msg in unacked:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def _look(self) -> None:
        js = self.link.js
        if js is None or not self.link.up:
            return
        with contextlib.suppress(Exception):
            info = await js.consumer_info(TREES_STREAM, self.durable)
            self.lag = info.num_pending or 0


def make_sink(config: ServerConfig, name: str = "default") -> LogCluster:
    """A sink node: a :class:`~async_logging.server.LogCluster` (its publishers, store,
    viewer and monitoring port as ``config`` says) reading the trees stream of
    ``config.bus`` with the consumer ``alog-sink-<name>`` instead of listening."""
    from ..server.cluster import LogCluster

    settings = BusSettings.from_config(config)
    listener = TreesConsumer.bound(settings, name)
    return LogCluster(config.replace(bus="", listener=listener, workers=1))


def run_sink(config: ServerConfig, name: str = "default") -> int:
    """Run a sink until SIGTERM / SIGINT, then drain (what it holds is published and
    acked). Returns the exit status.

    Raises:
        ConfigError: it cannot start (a publisher, the store, the monitoring port).
    """
    return asyncio.run(_run_sink(config, name))


async def _run_sink(config: ServerConfig, name: str) -> int:
    import sys

    from ..server.gctune import tune_gc
    from ..server.lifecycle import stop_signal

    stop = stop_signal()
    tune_gc()
    node = make_sink(config, name)
    await node.start()
    print(_announcement(node, name), file=sys.stderr, flush=True)
    await stop.wait()
    print("async-logging: draining…", file=sys.stderr, flush=True)
    await node.stop("shutdown")
    return 0


def _announcement(node: LogCluster, name: str) -> str:
    """The line ``sink`` prints once it runs: where it reads, writes and is monitored."""
    c = node.config
    listener = node.listener
    settings = getattr(listener, "settings", None)
    servers = ", ".join(settings.servers) if settings is not None else "?"
    sinks = os.path.abspath(c.log_file) if c.publisher is None or c.store else str(c.publisher)
    return (
        f"async-logging: sink {name} reading {servers}, writing {sinks}"
        + (f", store {os.path.abspath(c.store)}" if c.store else "")
        + (
            f", monitoring http://{c.mon_host}:{node.mon_port}/ecv /metrics"
            if c.mon_port >= 0
            else ""
        )
    )
