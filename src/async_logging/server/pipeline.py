"""The ingest pipeline: listeners hand it decoded logs; it owns the buffer and the publisher.

Listener tasks ──accept(logs) / accept_msgpack(payload)──▶ LogBuffer (event-loop thread)
──records──▶ bounded queue ──▶ publisher thread (``publish_many``) ──▶ sinks.

A MessagePack payload first goes to the buffer's native fast path
(:meth:`LogBuffer.prepare_msgpack <async_logging.buffer.LogBuffer.prepare_msgpack>`),
which publishes whole trees as JSON lines (:class:`~async_logging.encoded.EncodedRecords`)
without a Python object per event; a payload it declines is decoded and fed as before.

The publisher runs in its own thread so a blocking sink never stalls the event loop. The
queue between them is bounded (``publish_queue`` records): when it is full, ``accept`` waits
before feeding the buffer, so listeners stop reading their sockets and TCP pushes back on
the clients (counted as ``backpressure_waits``). A publisher that raises is retried with
backoff (counted as ``publish_errors``), so a failing sink slows ingest instead of losing
what was accepted; only at shutdown, past ``wait_for_publisher``, is what remains given up,
counted as ``records_dropped`` and logged. A record a sink refuses on its own while it takes
others (a poison record) is set aside into the dead-letter file, counted as
``dead_letters`` (:mod:`async_logging.server.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from .. import wire
from ..buffer import Fed, LogBuffer, Prepared, Record
from ..encoded import EncodedRecords
from ..exceptions import BadInput, LimitExceeded
from ..publishers import Publisher
from .delivery import DeadLetters, Delivery
from .lifecycle import Lifecycle
from .spool import (
    JSON,
    MSGPACK,
    REBASE,
    REPLAY_SLICE_BYTES,
    SETTLED,
    Spool,
    settled_uuids,
    split_settled,
)

__all__ = ["LATENCY_BUCKETS", "REFUSAL_REASONS", "Pipeline", "PipelineState", "Stats"]

log = logging.getLogger("async_logging.server")

#: Buckets (seconds) of the publish-latency histogram: accepted → written by the publisher.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
#: uuids of replayed trees remembered so their later records are flagged too.
REPLAYED_MEMORY = 100_000
#: Seconds replayed uuids are remembered when the buffer does not say its timeout.
REPLAYED_KEEP = 180.0
#: Seconds the publisher may hold records without publishing any before the proxy says it
#: is stalled (``/ecv`` 503, ``publisher_stalled``).
PUBLISHER_STALL = 10.0
#: Seconds after the spool refused a batch during which ``/ecv`` still says ``spool_full``.
SPOOL_FULL_HOLD = 5.0
#: Backoff (seconds) between retries of a batch whose publisher raised.
RETRY_BACKOFF = (0.05, 0.2, 1.0, 5.0)
#: Why the pipeline itself refuses a batch (503, ``bad_input{reason}``, exported at 0 from
#: the start; the spool's reasons are the spool's).
REFUSAL_REASONS = ("shutting_down",)


class Stats:
    """The server's counters, kept as plain numbers (cheap on the hot path).

    :meth:`snapshot` turns them into one JSON-able dict: the MonApp exports it to Prometheus,
    and workers send it to the supervisor, which sums them.
    """

    def __init__(self) -> None:
        self.frames: Counter[str] = Counter()  # by transport: ws, http
        self.bytes: Counter[str] = Counter()
        self.events = 0
        self.bad_input: Counter[str] = Counter()  # by reason
        self.records: Counter[str] = Counter()  # published, by kind
        self.connections = 0
        self.connections_total = 0
        self.connections_refused: Counter[str] = Counter()  # by reason
        self.http_connections = 0  # open on the main port and not WebSockets
        self.inflight_bytes = 0  # bytes of bodies and frames held (max_inflight_bytes)
        self.accept_errors = 0  # failed accepts (e.g. out of file descriptors)
        self.backpressure_waits = 0
        self.rate_limited = 0
        self.spool_replayed = 0
        self.native_frames = 0
        self.spool_rebases = 0
        self.publish_errors = 0
        self.records_dropped = 0
        self.dead_letters = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe_latency(self, seconds: float) -> None:
        """Record one publish latency in the histogram."""
        i = 0
        for i, bound in enumerate(LATENCY_BUCKETS):  # noqa: B007
            if seconds <= bound:
                break
        else:
            i = len(LATENCY_BUCKETS)
        self.latency_buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def snapshot(self, buffer: LogBuffer | None = None, queued: int = 0) -> dict[str, Any]:
        """All counters (and the buffer's) as one JSON-able dict."""
        snap: dict[str, Any] = {
            "frames": dict(self.frames),
            "bytes": dict(self.bytes),
            "events": self.events,
            "bad_input": dict(self.bad_input),
            "records": dict(self.records),
            "connections": self.connections,
            "connections_total": self.connections_total,
            "connections_refused": dict(self.connections_refused),
            "http_connections": self.http_connections,
            "inflight_bytes": self.inflight_bytes,
            "accept_errors": self.accept_errors,
            "backpressure_waits": self.backpressure_waits,
            "rate_limited": self.rate_limited,
            "spool_replayed": self.spool_replayed,
            "native_frames": self.native_frames,
            "spool_rebases": self.spool_rebases,
            "publish_errors": self.publish_errors,
            "records_dropped": self.records_dropped,
            "dead_letters": self.dead_letters,
            "latency_buckets": list(self.latency_buckets),
            "latency_sum": self.latency_sum,
            "latency_count": self.latency_count,
            "publish_queue": queued,
        }
        if buffer is not None:
            bad = snap["bad_input"]
            for reason, n in buffer.rejected.items():
                bad[reason] = bad.get(reason, 0) + n
            snap["buffer"] = dict(buffer.stats)
            snap["incomplete"] = dict(buffer.incomplete)
            snap["open_transactions"] = buffer.open_count
            snap["open_bytes"] = getattr(buffer, "open_bytes", 0)
            memory = getattr(buffer, "published_memory", None)
            snap["published_memory_digests"] = memory.digests if memory is not None else 0
        return snap


def merge_snapshots(snaps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum several workers' snapshots (numbers add, dicts add per key, lists add per index;
    a number whose key ends in ``_max_seconds`` is a worst case: the largest is kept)."""
    total: dict[str, Any] = {}
    for snap in snaps:
        _add_into(total, snap)
    return total


def _add_into(total: dict[str, Any], snap: dict[str, Any]) -> None:
    for key, value in snap.items():
        if isinstance(value, dict):
            _add_into(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            cur = total.setdefault(key, [0] * len(value))
            total[key] = [a + b for a, b in zip(cur, value, strict=False)]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if key.endswith("_max_seconds"):
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)


class PipelineState(enum.Enum):
    """Where a :class:`Pipeline` is in its life."""

    NEW = "new"
    RUNNING = "running"  # the publisher thread takes what the buffer publishes
    CLOSING = "closing"  # everything flushed to the queue; the thread finishes it
    ABANDONING = "abandoning"  # past wait_for_publisher: what still fails is given up
    CLOSED = "closed"  # the publisher flushed and closed


_PIPELINE_MOVES = {
    PipelineState.NEW: frozenset({PipelineState.RUNNING, PipelineState.CLOSING}),
    PipelineState.RUNNING: frozenset({PipelineState.CLOSING}),
    PipelineState.CLOSING: frozenset({PipelineState.ABANDONING, PipelineState.CLOSED}),
    PipelineState.ABANDONING: frozenset({PipelineState.CLOSED}),
}


class Pipeline:
    """Feeds the buffer on the event loop and hands its records to the publisher thread.

    Args:
        buffer: the reassembly engine (a :class:`LogBuffer` or anything with its API).
        publisher: the sink(s) (see :mod:`async_logging.publishers`).
        publish_queue: records allowed to wait for the publisher before ``accept`` pauses.
        wait_for_publisher: seconds given to the publisher to finish at :meth:`close`.
        dead_letters: where records a publisher refuses on their own go (None: dropped,
            counted and logged).
    """

    def __init__(
        self,
        buffer: LogBuffer,
        publisher: Publisher,
        *,
        publish_queue: int = 50_000,
        wait_for_publisher: float = 3.0,
        stats: Stats | None = None,
        spool: Spool | None = None,
        wire_limits: wire.WireLimits = wire.DEFAULT_LIMITS,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.buffer = buffer
        self.spool = spool
        self.wire_limits = wire_limits
        # (wire_limits, the same unbounded in bytes and events per frame): feed_trees's.
        self._own_limits: tuple[wire.WireLimits, wire.WireLimits] | None = None
        # (buffer batch number, spool position before it) of spooled batches not yet
        # known to be published, oldest first.
        self._spooled: deque[tuple[int, int]] = deque()
        # Spool bytes of the last rebase record (the open trees when last written again).
        self._rebased_bytes = 0
        # After a rebase the spool could not write: the position the checkpoint must not
        # pass (the open trees' events are only there) until a rebase succeeds or no tree
        # is open; and the spool size before which no rebase is tried again.
        self._pinned: int | None = None
        self._rebase_after = 0
        # uuids of trees replayed from a spool: their records are flagged ``replayed``.
        # uuid -> when it was replayed (the clock's seconds); forgotten once every tree
        # opened by the replay has been published (the engine's timeout, at the latest).
        self._replayed: OrderedDict[str, float] = OrderedDict()
        self.publisher = publisher
        self.stats = stats or Stats()
        self.publish_queue = publish_queue
        self.wait_for_publisher = wait_for_publisher
        # (time queued, records, spool checkpoint reached once they are published)
        self._queue: deque[tuple[float, Sequence[Record], int | None]] = deque()
        self._queued = 0
        # Guards the queue and the moves the publisher thread waits on (CLOSING, ABANDONING).
        self._cond = threading.Condition()
        self._lifecycle = Lifecycle("Pipeline", _PIPELINE_MOVES, PipelineState.NEW)
        self._room: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        #: Seconds without progress after which queued records count as stalled.
        self.stall_after = PUBLISHER_STALL
        self.clock: Callable[[], float] = time.monotonic
        # When the publisher last made progress (or records started waiting for it).
        self._progress_at = 0.0
        # When the spool last refused a batch (-inf: never).
        self._spool_refused_at = -math.inf
        #: Hands records to the sinks: retries, poison records set aside.
        self.delivery = Delivery(
            publisher,
            self.stats,
            dead_letters=dead_letters,
            backoff=RETRY_BACKOFF,
            giving_up=lambda: (
                self._lifecycle.state in (PipelineState.ABANDONING, PipelineState.CLOSED)
            ),
            on_progress=self._progressed,
        )

    def refusing(self) -> str | None:
        """Why the proxy does not ack now, or None: ``publish_queue_full`` (ingest waits for
        the publisher), ``publisher_stalled`` (records waiting and none published for
        :attr:`stall_after` seconds), ``spool_unavailable`` (the spool cannot be written:
        disk full, directory unusable) or ``spool_full`` (the spool refuses batches). What
        ``/ecv`` answers 503 for: a load balancer's signal to send traffic elsewhere."""
        if self._queued >= self.publish_queue:
            return "publish_queue_full"
        now = self.clock()
        waiting = self._queued or self.delivery.holding  # held aside: waiting too
        if waiting and now - self._progress_at > self.stall_after:
            return "publisher_stalled"
        spool = self.spool
        if spool is not None and spool.error is not None:
            return "spool_unavailable"
        if spool is not None and (
            spool.pending_bytes >= spool.max_bytes or now - self._spool_refused_at < SPOOL_FULL_HOLD
        ):
            return "spool_full"
        return None

    @property
    def queued(self) -> int:
        """Records waiting for the publisher."""
        return self._queued

    @property
    def state(self) -> PipelineState:
        """Where the pipeline is in its life (see :class:`PipelineState`)."""
        return self._lifecycle.state

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun (nothing more is taken)."""
        return self._lifecycle.state not in (PipelineState.NEW, PipelineState.RUNNING)

    def start(self) -> None:
        """Start the publisher thread; call from the event loop that will call accept."""
        self._lifecycle.to(PipelineState.RUNNING)
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._room.set()
        self._thread = threading.Thread(
            target=self._publish_loop, name="async-logging-publisher", daemon=True
        )
        self._thread.start()

    async def _room_to_feed(self) -> None:
        """Wait while the publish queue is full (backpressure: the caller stops reading).

        Callers check ``self._queued >= self.publish_queue`` first, which saves a
        coroutine per frame when there is room.
        """
        self.stats.backpressure_waits += 1
        room = self._room
        assert room is not None, "Pipeline.start() was not called"
        while self._queued >= self.publish_queue and not self.closed:
            room.clear()
            await room.wait()

    async def accept(
        self, logs: list[Any], raw: tuple[int, bytes] | None = None, *, premapped: bool = False
    ) -> Fed:
        """Feed a batch to the buffer (waiting first while the publish queue is full).

        Args:
            logs: the decoded log maps.
            raw: ``(kind, payload)`` as received, appended to the spool (when there is one)
                before the buffer sees the batch.
            premapped: the maps follow the default mapper's rules already (the OTLP
                ingest's): a buffer that can skips its mapper for them
                (:meth:`LogBuffer.feed_owned <async_logging.buffer.LogBuffer.feed_owned>`).

        Raises:
            LimitExceeded: ``spool_full``, or ``shutting_down`` (503) once :meth:`close`
                began; the batch was not taken.
        """
        await self.wait_for_room()
        return self.feed_now(logs, raw, premapped=premapped)

    async def wait_for_room(self) -> None:
        """Wait while the publish queue is full, then check that batches are still taken.

        What the caller then feeds with no await in between (:meth:`feed_now`,
        :meth:`feed_trees`) is taken whole: the pipeline cannot start closing meanwhile.

        Raises:
            LimitExceeded: ``shutting_down`` (503) once :meth:`close` began.
        """
        if self._queued >= self.publish_queue:
            await self._room_to_feed()
        self.check_open()

    def feed_now(
        self, logs: list[Any], raw: tuple[int, bytes] | None = None, *, premapped: bool = False
    ) -> Fed:
        """:meth:`accept` without the wait for room (after :meth:`wait_for_room`, or for
        what was taken already and is bounded: the OTLP settle's held spans)."""
        self.check_open()
        fed = self._feed(functools.partial(_feed_owned(self.buffer, premapped), logs), raw, logs)
        self.stats.events += len(logs) - len(fed.rejected)
        return fed

    async def accept_msgpack(self, payload: bytes) -> tuple[int | None, int, Fed]:
        """Feed one MessagePack payload (a binary frame or an HTTP body).

        Whole trees go through the buffer's native fast path when it has one; anything it
        declines is decoded (:func:`~async_logging.wire.decode_msgpack`) and fed like
        :meth:`accept` does. Same waiting, spooling and errors either way.

        Returns:
            The envelope's ``seq`` (or None), the number of log items, and what was fed.

        Raises:
            BadInput: the payload does not decode or breaks a wire limit.
            LimitExceeded: ``spool_full``, or ``shutting_down`` (503) once :meth:`close`
                began; the batch was not taken.
        """
        await self.wait_for_room()
        buffer = self.buffer
        reassemble = getattr(buffer, "reassemble_msgpack", None)
        # Inline on the event loop: handing frames to a worker thread, with the GIL released
        # in the extension, measured slower on 2 cores (the GIL hand-overs cost more).
        result = reassemble(payload, self.wire_limits) if reassemble is not None else None
        # No await from here on: the buffer cannot change between prepare and feed.
        prepared = buffer.prepare_reassembled(result) if result is not None else None
        if prepared is None:
            frame = wire.decode_msgpack(payload, self.wire_limits)
            return frame.seq, len(frame.logs), self.feed_now(frame.logs, (MSGPACK, payload))
        return prepared.seq, prepared.events, self._feed_prepared(prepared, (MSGPACK, payload))

    def feed_trees(self, payload: bytes) -> Fed:
        """Feed whole trees this server mapped itself: a MessagePack array of events made
        by the default mapper's rules (the OTLP ingest's, :func:`.otlp.split_whole`).

        The buffer's native fast path takes them when it can, as it takes a frame
        (:meth:`accept_msgpack`), with no limit on the frame's bytes or events (the
        server's own encoding of events checked already: a request's spans take more
        events and bytes as MessagePack than as protobuf). What it declines is decoded and
        fed premapped, as :meth:`accept` does. Never spooled: the caller uses this only
        when the pipeline has no spool. No wait for room, as :meth:`feed_now`.

        Raises:
            LimitExceeded: ``shutting_down`` (503) once :meth:`close` began.
        """
        self.check_open()
        buffer = self.buffer
        result = buffer.reassemble_msgpack(payload, self._own_frame_limits())
        prepared = buffer.prepare_reassembled(result) if result is not None else None
        if prepared is None:
            return self.feed_now(msgspec.msgpack.decode(payload), premapped=True)
        return self._feed_prepared(prepared, None)

    def _feed_prepared(self, prepared: Prepared, raw: tuple[int, bytes] | None) -> Fed:
        """Feed a frame the native fast path reassembled (prepared against the buffer with
        no await since)."""
        fed = self._feed(functools.partial(self.buffer.feed_prepared, prepared), raw)
        self.stats.events += prepared.events
        self.stats.native_frames += 1
        return fed

    def _own_frame_limits(self) -> wire.WireLimits:
        """The wire limits with no bound on a frame's bytes or events (:meth:`feed_trees`)."""
        cached = self._own_limits
        if cached is None or cached[0] is not self.wire_limits:
            unbounded = dataclasses.replace(
                self.wire_limits, max_message_bytes=sys.maxsize, max_events_per_frame=sys.maxsize
            )
            cached = self._own_limits = (self.wire_limits, unbounded)
        return cached[1]

    def check_open(self) -> None:
        """Refuse a batch once :meth:`close` began: what it would publish could reach the
        queue after the publisher thread's last look, and be acked but never written."""
        if self.closed:
            raise LimitExceeded(
                "shutting_down", "the server is shutting down; send it again", status=503
            )

    def _feed(
        self, feed: Callable[[], Fed], raw: tuple[int, bytes] | None, logs: list[Any] | None = None
    ) -> Fed:
        """Run ``feed`` (which feeds the buffer) after spooling ``raw``; queue what it publishes.

        ``logs`` (the batch's log maps, when the reference path takes it) lets the spool
        note beside the batch the uuids of trees already published (a ``SETTLED`` record),
        so that a replay never makes their late events or resends a new incomplete tree.
        """
        spool = self.spool
        if spool is not None and raw is not None:
            before = spool.position
            memory = getattr(self.buffer, "published_memory", None) if logs is not None else None
            settled = settled_uuids(logs, memory) if logs is not None and memory else None
            try:
                spool.append(*raw, settled=settled)
            except LimitExceeded as exc:
                if exc.reason == "spool_full":  # spool_unavailable: spool.error says it
                    self._spool_refused_at = self.clock()
                raise
            fed = feed()
            self._spooled.append((getattr(self.buffer, "batches", 0), before))
            self.emit(fed.records, self._checkpoint())
        else:
            fed = feed()
            if fed.records:
                self.emit(fed.records)
        return fed

    def _checkpoint(self) -> int | None:
        """The spool position before which every batch is published once queued records are.

        That is the start of the oldest batch that opened a tree still held open (or of the
        rebase record that holds their events again); with no open tree, the end of the
        spool. When what a restart would replay from there passes the spool's
        :meth:`~async_logging.server.spool.Spool.rebase_threshold`, the open trees' events
        are written again at the tail first and the checkpoint moves to them.
        """
        spool = self.spool
        assert spool is not None
        if self.buffer.open_count == 0:
            self._spooled.clear()
            self._pinned = None
            return spool.position
        oldest = getattr(self.buffer, "oldest_open_batch", None)
        if oldest is None:  # a buffer plug-in that cannot tell: only when empty
            return None
        spooled = self._spooled
        while spooled and spooled[0][0] < oldest:
            spooled.popleft()
        rebase = getattr(self.buffer, "rebase_open", None)
        if spooled and rebase is not None:
            needed = spooled[0][1] if self._pinned is None else self._pinned
            if (
                spool.bytes_since(needed) > spool.rebase_threshold(self._rebased_bytes)
                and spool.written >= self._rebase_after
            ):
                # A long-open tree pins old batches: write what is still open again at
                # the tail and let everything before it go.
                payload = msgspec.msgpack.encode(rebase())
                before = spool.position
                try:
                    spool.append(REBASE, payload, force=True)
                except LimitExceeded:
                    # rebase_open() counted the open trees as fed now, but their events
                    # are only where they were: the checkpoint stays there, and the next
                    # try waits for as much again.
                    self._pinned = needed
                    self._rebase_after = spool.written + spool.rebase_threshold(self._rebased_bytes)
                else:
                    spooled.clear()
                    spooled.append((getattr(self.buffer, "batches", 0), before))
                    self._pinned = None
                    self._rebased_bytes = len(payload)
                    self.stats.spool_rebases += 1
        checkpoint = spooled[0][1] if spooled else None
        if self._pinned is not None:
            checkpoint = self._pinned if checkpoint is None else min(checkpoint, self._pinned)
        return checkpoint

    async def adopt(self, orphan: Spool) -> int:
        """Take over a dead process's spool: re-spool, feed and publish its unpublished
        batches (records flagged ``replayed``), then delete it. Returns the events replayed.

        The server serves meanwhile: every :data:`~async_logging.server.spool.REPLAY_SLICE_BYTES`
        of spool it yields to the event loop, and it waits while the publish queue is full.
        An event of a uuid its batch's ``SETTLED`` record names, which the replay has not
        met before, is published on its own flagged ``late`` (its tree came out before the
        replayed part began), not as a new incomplete tree.

        Cancelled, or stopped by an error, it leaves ``orphan`` on disk for the next start
        (what it replayed already then comes out again, flagged ``replayed``).

        Raises:
            SpoolFormatError: a segment of ``orphan`` is in no format this version reads.
            LimitExceeded: ``spool_unavailable``: this process's spool cannot be written.
        """
        spool = self.spool
        assert spool is not None
        events = 0
        seen: set[str] = set()  # uuids the replay has fed into the buffer
        settled: bytes | None = None
        since_yield = 0
        try:
            for kind, payload, position in orphan.replay():
                if kind == SETTLED:  # it names the uuids of the record that follows
                    settled = payload
                    continue
                before = spool.position
                spool.append(kind, payload, force=True, settled=settled)
                marker, settled = settled, None
                logs = self._spooled_logs(kind, payload, position)
                if logs is not None:
                    feed, late = split_settled(logs, marker, seen)
                    events += self._replay_batch(feed, late, before)
                since_yield += len(payload)
                if since_yield >= REPLAY_SLICE_BYTES or self._queued >= self.publish_queue:
                    since_yield = 0
                    await asyncio.sleep(0)  # let the listeners serve
                    if self._queued >= self.publish_queue:
                        await self._room_to_feed()
        except BaseException:
            orphan.close()  # left for the next start
            raise
        orphan.remove()
        return events

    def _spooled_logs(self, kind: int, payload: bytes, position: int) -> list[Any] | None:
        """The log maps of a replayed record (None: it no longer decodes, logged)."""
        try:
            if kind == REBASE:  # our own record of mapped events: no wire limits apply
                return msgspec.msgpack.decode(payload, type=list[dict[str, Any]])
            if kind == JSON:
                return wire.decode_json(payload, self.wire_limits).logs
            return wire.decode_msgpack(payload, self.wire_limits).logs
        except (BadInput, msgspec.DecodeError, msgspec.ValidationError):
            # It was accepted once with these limits: never expected.
            log.error("spool record ending at %d no longer decodes; skipped", position)
            return None

    def _replay_batch(self, logs: list[Any], late: list[Any], before: int) -> int:
        """Feed one replayed batch (``late``: events of trees published before the replay
        began), publish what it completes flagged ``replayed``; return the events taken."""
        replayed = self._replayed
        now = self.clock()
        for e in logs:
            uuid = e.get("uuid") if isinstance(e, dict) else None
            if uuid is not None:
                replayed[str(uuid)] = now
        while len(replayed) > REPLAYED_MEMORY:
            replayed.popitem(last=False)
        feed_late = getattr(self.buffer, "feed_late", None)
        if late and feed_late is None:  # a buffer plug-in that cannot: fed like the rest
            logs, late = logs + late, []
        fed = _feed_owned(self.buffer)(logs)
        self._spooled.append((getattr(self.buffer, "batches", 0), before))
        records = list(fed.records)
        taken = len(logs) - len(fed.rejected)
        if late:
            assert feed_late is not None
            was_late = feed_late(late)
            records.extend(was_late.records)
            taken += len(late) - len(was_late.rejected)
        for record in records:
            record["replayed"] = True
        self.emit(records, self._checkpoint())
        self.stats.spool_replayed += taken
        return taken

    def expire(self) -> None:
        """Run the buffer's clean cycle and publish what it lets go."""
        records = self.buffer.expire()
        if records:
            self.emit(records)
        replayed = self._replayed
        if replayed:
            # Past the engine's timeout every tree a replay opened has been published:
            # forget its uuids (a tree a replay left open is flagged; later ones are not).
            limits = getattr(self.buffer, "limits", None)
            keep = (
                limits.clean_duration * limits.clean_cycles if limits is not None else REPLAYED_KEEP
            )
            cutoff = self.clock() - keep
            while replayed and next(iter(replayed.values())) < cutoff:
                replayed.popitem(last=False)

    def emit(self, records: Sequence[Record], checkpoint: int | None = None) -> None:
        """Queue records for the publisher thread (no waiting: callers check for room)."""
        replayed = self._replayed
        # A tree begun in a replayed batch may complete with later traffic: flag it. Never
        # in a natively reassembled batch: the fast path declines a frame whose uuid is open
        # or published, as every replayed uuid is, so those batches stay encoded.
        if replayed and not isinstance(records, EncodedRecords):
            for record in records:
                if record.get("uuid") in replayed:
                    record["replayed"] = True
        with self._cond:
            queue = self._queue
            if not self._queued:  # records start waiting now: progress is measured from here
                self._progress_at = self.clock()
            queue.append((time.monotonic(), records, checkpoint))
            self._queued += len(records)
            if len(queue) == 1:  # else the publisher was woken already and takes them all
                self._cond.notify()

    async def close(self, reason: str = "shutdown") -> None:
        """Publish everything the buffer holds (flagged ``reason``), then stop the publisher."""
        if self.closed:
            return
        records = self.buffer.flush_all(reason)
        if records or self.spool is not None:
            self.emit(records, self.spool.position if self.spool is not None else None)
        with self._cond:  # after the last emit: the thread ends once the queue is empty
            self._lifecycle.to(PipelineState.CLOSING)
            self._cond.notify()
        if self._room is not None:
            self._room.set()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, thread.join, max(self.wait_for_publisher, 0.01)
            )
            if thread.is_alive():
                # Past the grace period: whatever is still queued is given up, loudly.
                with self._cond:
                    self._lifecycle.to(PipelineState.ABANDONING)
                    self._cond.notify()
                await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)
        for step in (self.publisher.flush, self.publisher.close):
            try:
                step()
            except Exception:
                log.exception("publisher %s failed", step.__name__)
        if self.spool is not None:
            self.spool.close()
        self._lifecycle.to(PipelineState.CLOSED)

    # ------------------------------------------------------------------ publisher thread

    def _publish_loop(self) -> None:
        cond = self._cond
        queue = self._queue
        while True:
            with cond:
                while not queue and self._lifecycle.state is PipelineState.RUNNING:
                    cond.wait()
                if not queue:
                    break
                batches = list(queue)
                queue.clear()
            checkpoint = None
            for _, _, position in batches:
                if position is not None:
                    checkpoint = position
            published = True
            for run in _runs(batch for _, batch, _ in batches):
                published = self._publish_with_retry(run) and published
            now = time.monotonic()
            for enqueued, _, _ in batches:
                self.stats.observe_latency(now - enqueued)
            if published and checkpoint is not None and self.spool is not None:
                try:
                    self.spool.checkpoint(checkpoint)
                except OSError:
                    log.exception("could not write the spool checkpoint")
            self._release(sum(len(batch) for _, batch, _ in batches))
        self.delivery.finish()

    def _publish_with_retry(self, records: Sequence[Record]) -> bool:
        """Publish to every sink, retrying with backoff and setting poison records aside
        (:class:`~async_logging.server.delivery.Delivery`); False when records were given
        up at shutdown or are held aside."""
        return self.delivery.publish(records) if records else True

    def _progressed(self) -> None:
        self._progress_at = self.clock()

    def _release(self, n: int) -> None:
        with self._cond:
            self._queued -= n
            low = self._queued < self.publish_queue // 2
        if low and self._loop is not None and self._room is not None and not self._room.is_set():
            # A closed loop raises RuntimeError: then nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._room.set)


def _feed_owned(buffer: Any, premapped: bool = False) -> Callable[[list[Any]], Fed]:
    """How to feed ``buffer`` maps the pipeline decoded and hands over: ``feed_owned``
    (no copy; ``premapped``: made by the mapper's rules already, see
    :meth:`LogBuffer.feed_owned <async_logging.buffer.LogBuffer.feed_owned>`), or
    ``feed_many`` for a buffer plug-in without it."""
    owned = getattr(buffer, "feed_owned", None)
    if owned is None:
        feed: Callable[[list[Any]], Fed] = buffer.feed_many
        return feed
    return functools.partial(owned, premapped=True) if premapped else owned


def _runs(batches: Iterable[Sequence[Record]]) -> list[Sequence[Record]]:
    """The batches as few publish calls as possible, in order: consecutive lists of dicts
    joined into one list, consecutive encoded batches into one (never decoded here)."""
    runs: list[Sequence[Record]] = []
    plain: list[Record] = []
    encoded: list[EncodedRecords] = []
    for batch in batches:
        if isinstance(batch, EncodedRecords):
            if plain:
                runs.append(plain)
                plain = []
            encoded.append(batch)
        elif batch:
            if encoded:
                runs.append(EncodedRecords.join(encoded))
                encoded = []
            plain.extend(batch)
    if plain:
        runs.append(plain)
    if encoded:
        runs.append(EncodedRecords.join(encoded))
    return runs


def process_rss() -> int:
    """Resident memory of this process in bytes (for heartbeats)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency; be safe in heartbeats
        return 0
