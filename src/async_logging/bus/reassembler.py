"""Reassembler: a node that owns partitions of the bus (``async-logging reassemble``; §8).

For each partition it owns, a durable pull consumer (``alog-reasm-<p>``, acks explicit)
feeds one :class:`~async_logging.buffer.LogBuffer`; what the engine publishes goes to the
trees stream (:func:`~async_logging.bus.records.to_messages`), and a message is acked only
once every tree holding its events is stored there (:class:`~async_logging.bus.ledger.AckLedger`).
So a reassembler killed at any point loses nothing: its replacement (the same ``--member``
or ``--partitions``) gets every unacked message again and rebuilds the trees that were
open, while the trees it published already come out as the same lines, which JetStream
drops by message id.

- Held messages (their trees still open) get an in-progress ack every third of
  ``bus_ack_wait``, so JetStream does not hand them to anyone else while this node lives.
- Started while messages delivered to a previous member are unacked (it was killed), a
  partition waits ``bus_ack_wait`` for JetStream to deliver them again, and takes them first:
  the replay runs in stream order.
- When the bus is lost, a partition stops: it publishes nothing and acks nothing, and goes
  on where it was once the bus is back (what JetStream delivered again meanwhile is a
  duplicate the engine drops).
- SIGTERM drains: what was fed is published and acked, and the messages of trees still
  open are handed back (nak) for the replacement to replay at once: never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .. import wire
from ..buffer import LogBuffer, Record
from ..encoded import EncodedRecords
from ..server.config import ServerConfig
from ..server.lifecycle import stop_signal
from ..server.monapp import MonApp
from ..server.pipeline import Stats
from .codec import Unreadable, decode
from .jetstream import EVENTS_STREAM, BusLink, BusSettings, BusUnavailable, with_id
from .ledger import AckLedger
from .owners import RENEW_SHARE, Lease, Owners, holder_name
from .partition import events_subject, message_id
from .records import PART_HEADER, to_messages

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["FETCH_BATCH", "PartitionBuffer", "Reassembler"]

log = logging.getLogger("async_logging.bus")

#: Messages one fetch takes from a partition at most.
FETCH_BATCH: Final = 256
#: Seconds a fetch waits for a message (the clean cycle and keep-alives run between).
FETCH_WAIT: Final = 0.25
#: Seconds between two looks at the consumers' lag (``/metrics``).
LAG_EVERY: Final = 2.0
#: Backoff (seconds) between tries to publish trees while the bus does not take them.
RETRY_BACKOFF: Final = (0.05, 0.2, 0.5, 1.0)
#: Seconds between two tries to bind a partition's consumer.
BIND_RETRY: Final = 1.0
#: Seconds past a fetch's expiry before held messages are handed back at a stop.
HAND_BACK_MARGIN: Final = 0.1
#: Seconds past ``bus_ack_wait`` a partition waits for a previous member's messages.
REPLAY_MARGIN: Final = 1.0
#: A message holding a published tree beside an open one is carried after this share of
#: the duplicate window (see :mod:`async_logging.bus.ledger`).
CARRY_SHARE: Final = 0.25


class PartitionBuffer(LogBuffer):
    """The engine of one partition (:meth:`LogBuffer.is_open` is the ledger's question
    after each message)."""


def bus_wire_limits(c: ServerConfig) -> wire.WireLimits:
    """The limits a bus message is taken with natively: the server's, with room for the
    keys the mapper added (its events were checked at an ingest node already)."""
    return wire.WireLimits(
        max_message_bytes=2**31 - 1,
        max_events_per_frame=2**31 - 1,
        max_depth=c.max_depth,
        max_string_length=c.max_string_length,
        max_keys_per_map=c.max_keys_per_map + 16,
        max_array_length=c.max_array_length,
        max_record_bytes=2**31 - 1,
    )


class Partition:
    """One partition: its consumer, its engine and its ledger."""

    def __init__(self, node: Reassembler, number: int) -> None:
        self.node = node
        self.number = number
        self.durable = f"alog-reasm-{number}"
        self.buffer, self.ledger = self._fresh_state()
        self.limits = bus_wire_limits(node.config)
        self.counts: Counter[str] = Counter()
        self.lag = 0
        self.ack_pending = 0
        self._sub: Any = None
        #: This process's lease on the partition (:mod:`async_logging.bus.owners`).
        self.lease = Lease(node.owners.ttl)
        #: The holder of the partition while this process waits for it, else None.
        self.waiting_for: str | None = None
        #: Set when the lease could not be kept: the consume loop ends, the state goes.
        self._lost = False
        #: Messages of a previous member being collected before anything is fed.
        self._replay: _Replay | None = None
        self._next_tick = 0.0
        self._next_progress = 0.0

    def _fresh_state(self) -> tuple[PartitionBuffer, AckLedger[Msg]]:
        """An empty engine and ledger (at the start, and when the lease is lost)."""
        node = self.node
        buffer = PartitionBuffer(limits=node.config.buffer_limits())
        return buffer, AckLedger(node.settings.duplicate_window * CARRY_SHARE)

    # ------------------------------------------------------------------ setup

    async def bind(self) -> None:
        """Make (or update) the durable consumer and subscribe to it."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        link = self.node.link
        js = link.js
        assert js is not None
        settings = self.node.settings
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=events_subject(self.number),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=settings.max_ack_pending,
        )
        try:
            await js.add_consumer(EVENTS_STREAM, config)
        except Exception as exc:  # made before with other settings: use it as it is
            log.warning(
                "partition %d: consumer %s kept as it is (%s)", self.number, self.durable, exc
            )
        info = await js.consumer_info(EVENTS_STREAM, self.durable)
        self._sub = await js.pull_subscribe_bind(self.durable, stream=EVENTS_STREAM)
        if info.num_ack_pending:
            # Delivered to a member that is gone and never acked: JetStream delivers them
            # again (at once when that member handed them back, else once their ack_wait is
            # over). Until they are all here (or ack_wait has passed), what is fetched is
            # kept, not fed: the replay then runs in stream order, before anything new.
            log.warning(
                "partition %d: %d messages of a previous reassembler are unacked; replaying "
                "them first (waiting up to %g s, bus_ack_wait, for them)",
                self.number,
                info.num_ack_pending,
                settings.ack_wait,
            )
            self.counts["replay_waits"] += 1
            delivered = info.delivered
            self._replay = _Replay(
                info.num_ack_pending,
                delivered.stream_seq if delivered is not None else 0,
                self.node.clock() + settings.ack_wait + REPLAY_MARGIN,
            )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Take the partition's lease, bind, then fetch, feed, publish, ack until the node
        stops; should the lease be lost, drop the engine's state and start again."""
        node = self.node
        while not node.stopping:
            if not await self.own():
                return
            while not node.stopping:
                try:
                    await self.bind()
                    break
                except Exception as exc:  # no JetStream leader yet, the bus just went away...
                    node.link.errors["bind"] += 1
                    log.warning("partition %d: cannot bind its consumer yet (%s)", self.number, exc)
                    await node.sleep(BIND_RETRY)
            await self.consume()
            if self._lost and not node.stopping:
                await self.reset()

    async def own(self) -> bool:
        """Take the partition's lease, waiting while another process holds it; False when
        the node stops first."""
        node = self.node
        owners = node.owners
        told = False
        while not node.stopping:
            js = node.link.js
            try:
                assert js is not None
                holder = await owners.take(js, self.number, self.lease, node.clock())
            except Exception as exc:  # the bus is away: try again
                node.link.errors["lease"] += 1
                log.debug("partition %d: lease not taken yet (%s)", self.number, exc)
                await node.sleep(BIND_RETRY)
                continue
            if not holder:
                if told:
                    log.warning("partition %d: taken over from %s", self.number, self.waiting_for)
                self.waiting_for = None
                return True
            self.waiting_for = holder
            if not told:
                told = True
                self.counts["lease_waits"] += 1
                log.error(
                    "partition %d is run by %s; waiting until it stops (is a second process "
                    "running the same --member or --partitions?)",
                    self.number,
                    holder,
                )
            await node.sleep(owners.ttl * RENEW_SHARE)
        return False

    async def keep_lease(self) -> bool:
        """Renew the lease when due; False (and :attr:`_lost` set) when the partition is
        no longer surely this process's."""
        node = self.node
        now = node.clock()
        lease = self.lease
        if self._lost or not lease.held:
            self._lost = True
            return False
        if not lease.due(now):
            return True  # renewed within a third of the TTL: surely still ours
        js = node.link.js
        try:
            assert js is not None
            if await node.owners.renew(js, self.number, lease, now):
                return True
            why = "another process took it, or it expired"
        except Exception as exc:  # the bus is away: the lease stands while trusted
            node.link.errors["lease"] += 1
            if lease.trusted(node.clock()):
                return True
            why = f"not renewed in time ({exc})"
            lease.lost()
        self._lost = True
        self.counts["leases_lost"] += 1
        log.error(
            "partition %d: its lease is lost (%s); dropping what its engine holds (its "
            "messages stay unacked for whoever holds the partition next)",
            self.number,
            why,
        )
        return False

    async def reset(self) -> None:
        """Forget everything of the partition (its lease was lost): a new engine and
        ledger, no subscription; the held messages are handed back (nak) for the next
        holder to replay at once (if the bus takes the naks; else after ``bus_ack_wait``)."""
        await self.hand_back()
        self.buffer, self.ledger = self._fresh_state()
        self._replay = None
        self._lost = False
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def consume(self) -> None:
        """Fetch, feed, publish, ack, until the node stops or the lease is lost."""
        node = self.node
        while not node.stopping:
            if not await self.keep_lease():
                return
            try:
                msgs = await self._sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except TimeoutError:
                msgs = []
            except Exception as exc:  # the connection is down or reconnecting
                if node.stopping:
                    break
                node.link.errors["fetch"] += 1
                log.debug("partition %d: fetch failed: %s", self.number, exc)
                await node.sleep(FETCH_WAIT)
                continue
            replay = self._replay
            if replay is not None:
                msgs = replay.collect(msgs, node.clock())
                if replay.waiting:
                    msgs = []
                else:
                    self._replay = None
            if msgs:
                await self.take(msgs)
            now = node.clock()
            if now >= self._next_tick and not self._lost:
                self._next_tick = now + node.tick
                await self.expire()
            if now >= self._next_progress and not self._lost:
                self._next_progress = now + node.settings.ack_wait / 3
                await self.keep_alive()
            for held in self.ledger.due_carries(now):
                if self._lost:
                    break
                await self.carry(held)
            if self._lost:
                return

    async def take(self, msgs: list[Msg]) -> None:
        """Feed a fetched batch, publish what it completes, then ack what may be acked."""
        ledger, buffer, counts = self.ledger, self.buffer, self.counts
        now = self.node.clock()
        msgs.sort(key=_stream_seq)
        batches: list[tuple[str | None, Sequence[Record]]] = []
        free: list[Msg] = []
        seen: set[str] = set()
        events = buffer.stats["events"]
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            if meta.num_delivered > 1:
                counts["redelivered"] += 1
            try:
                payload = decode(msg.data, msg.headers)
            except Unreadable as exc:
                await self._drop(msg, seq, exc)
                continue
            held = ledger.holds(seq)
            fed = None if held else buffer.feed_msgpack(payload, self.limits)
            if fed is not None:
                counts["native"] += 1
                batches.append((f"ev-{seq}", fed.records))
                free.append(msg)
                continue
            try:
                logs = msgspec.msgpack.decode(payload)
                if not isinstance(logs, list):
                    raise TypeError(f"a bus message must be an array, not {type(logs).__name__}")
            except (msgspec.DecodeError, TypeError) as exc:
                await self._drop(msg, seq, exc)
                continue
            fed_many = buffer.feed_owned(logs)
            # After the feed: the mapper made every uuid a string (in place), and an
            # ingest node may have sent the events as they came.
            uuids = {
                u
                for e in logs
                if isinstance(e, dict) and (u := e.get("uuid")).__class__ is str and u
            }
            batches.append((f"ev-{seq}", fed_many.records))
            seen |= uuids
            if not ledger.take(seq, msg, uuids, buffer.is_open, now):
                free.append(msg)
        counts["messages"] += len(msgs)
        counts["events"] += buffer.stats["events"] - events
        await self.settle(batches, seen, free, now)

    async def _drop(self, msg: Msg, seq: int, exc: Exception) -> None:
        """A message no node of ours wrote (or a damaged one): counted, logged, and taken
        off the stream (``term``: never delivered again)."""
        self.counts["unreadable"] += 1
        log.error("partition %d: message %d is unreadable (%s); dropped", self.number, seq, exc)
        with contextlib.suppress(Exception):
            await msg.term()

    async def expire(self) -> None:
        """The engine's clean cycle: publish what it lets go, ack what that frees."""
        records = self.buffer.expire()
        if records:
            await self.settle([(None, records)], set(), [], self.node.clock())

    async def settle(
        self,
        batches: list[tuple[str | None, Sequence[Record]]],
        seen: set[str],
        free: list[Msg],
        now: float,
    ) -> None:
        """Publish ``batches`` (waiting while the bus does not take them), then ack ``free``
        and every group the closed trees free, in one burst."""
        is_open = self.buffer.is_open
        closed = {u for u in seen if not is_open(u)}
        for _, batch in batches:
            if not isinstance(batch, EncodedRecords):  # native trees hold no ledger uuid
                for record in batch:
                    u = record.get("uuid")
                    if u.__class__ is str and not is_open(u):
                        closed.add(u)
        # Nothing is published or acked unless the partition is surely still ours.
        if not await self.keep_lease():
            return
        try:
            await self.publish(batches)
        except _Abandoned:
            log.warning(
                "partition %d: %s while the bus does not store trees; their messages stay "
                "unacked for the next reassembler",
                self.number,
                "its lease lost" if self._lost else "stopping",
            )
            return
        if not await self.keep_lease():
            return  # the next holder replays and acks them
        tokens = self.ledger.published(closed, now)
        await self.node.ack(free, tokens)

    async def publish(self, batches: list[tuple[str | None, Sequence[Record]]]) -> None:
        """Publish records to the trees stream, trying until JetStream stored them all."""
        node = self.node
        link = node.link
        assert link.nc is not None and link.publisher is not None
        messages = to_messages(batches, max(link.nc.max_payload - 1024, 1024))
        if not messages:
            return
        stats = node.stats
        tries = 0
        while True:
            try:
                result = await link.publisher.publish(messages, node.settings.timeout)
                break
            except BusUnavailable as exc:
                link.errors["publish"] += 1
                if node.stopping or not await self.keep_lease():
                    # Not stored, not acked: JetStream delivers them again (to the next
                    # holder, when the lease could not be kept meanwhile).
                    raise _Abandoned from exc
                if tries == 0:
                    log.warning(
                        "partition %d: trees not stored (%s); trying again", self.number, exc.detail
                    )
                await node.sleep(RETRY_BACKOFF[min(tries, len(RETRY_BACKOFF) - 1)])
                tries += 1
        self.counts["published"] += len(messages)
        self.counts["duplicates"] += result.duplicates
        for subject, payload, headers in messages:
            if headers is None or PART_HEADER not in headers:
                stats.records[subject.rpartition(".")[2]] += payload.count(b"\n")

    async def keep_alive(self) -> None:
        """In-progress acks for every held message (their trees are open), and for what
        waits for a replay."""
        kept = self._replay.kept() if self._replay is not None else []
        for msg in (*self.ledger.tokens(), *kept):
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def carry(self, held: Any) -> None:
        """Publish a mixed message's events of open trees again; ack what that frees."""
        if not await self.keep_lease():
            return
        keep = held.open
        logs = msgspec.msgpack.decode(decode(held.token.data, held.token.headers))
        moved = [e for e in logs if isinstance(e, dict) and e.get("uuid") in keep]
        payload = msgspec.msgpack.encode(moved)
        link = self.node.link
        assert link.publisher is not None
        try:
            result = await link.publisher.publish(
                [with_id(events_subject(self.number), payload, message_id(payload))],
                self.node.settings.timeout,
            )
        except BusUnavailable:
            link.errors["publish"] += 1
            return  # tried again at the next turn
        tokens = self.ledger.carried(held, result.seqs[0], self.node.clock())
        self.counts["carried"] += 1
        if await self.keep_lease():
            await self.node.ack([], tokens)

    async def hand_back(self) -> None:
        """At a stop: give the held messages back (nak) for the replacement, at once."""
        for msg in self.ledger.tokens():
            with contextlib.suppress(Exception):
                await msg.nak()

    async def look(self) -> None:
        """Read the consumer's lag from JetStream (for ``/metrics``)."""
        js = self.node.link.js
        if js is None or not self.node.link.up:
            return
        with contextlib.suppress(Exception):
            info = await js.consumer_info(EVENTS_STREAM, self.durable)
            self.lag = info.num_pending or 0
            self.ack_pending = info.num_ack_pending or 0


class _Abandoned(Exception):
    """A publish given up because the node stops (its messages stay unacked)."""


def _stream_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


class _Replay:
    """What a partition fetches while the messages a previous member left unacked come
    back: ``expected`` of them, all at or below stream sequence ``upto``; the rest (newer)
    waits with them. Done when all came, or at ``deadline`` (a previous member still alive
    may have acked some)."""

    def __init__(self, expected: int, upto: int, deadline: float) -> None:
        self.expected = expected
        self.upto = upto
        self.deadline = deadline
        self._old: dict[int, Msg] = {}
        self._new: dict[int, Msg] = {}
        self.waiting = True

    def collect(self, msgs: list[Msg], now: float) -> list[Msg]:
        """Keep ``msgs``; once the replay is whole (or late), every message kept, in
        stream order (a message delivered twice meanwhile: the later delivery)."""
        for msg in msgs:
            seq = _stream_seq(msg)
            (self._old if seq <= self.upto else self._new)[seq] = msg
        if len(self._old) < self.expected and now < self.deadline:
            return []
        self.waiting = False
        return [m for _, m in sorted({**self._old, **self._new}.items())]

    def kept(self) -> list[Msg]:
        return [*self._old.values(), *self._new.values()]


class Reassembler:
    """A reassembler node: its partitions, the bus link and the monitoring port.

    Args:
        config: the server's options (the engine's limits, the bus, ``mon_port``).
        partitions: the partitions it owns.
    """

    def __init__(self, config: ServerConfig, partitions: Sequence[int]) -> None:
        self.config = config
        self.settings = BusSettings.from_config(config)
        self.link = BusLink(self.settings, f"async-logging-reassemble-{os.getpid()}")
        #: The partitions' leases (one process per partition).
        self.owners = Owners(self.settings, holder_name(config.machine_name))
        self.stats = Stats()
        self.parts = [Partition(self, p) for p in partitions]
        self.tick = min(1.0, config.clean_duration)
        self.clock = time.monotonic
        self.stopping = False
        self._stop = asyncio.Event()
        #: What made a partition fail (the node then stops, exit status 1).
        self.failed: Exception | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.monapp: MonApp | None = None
        self.mon_port = config.mon_port

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the node stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def ack(self, free: list[Msg], tokens: list[Msg]) -> None:
        """Ack messages in one burst: nats-py only queues each ack (no await in it
        suspends), and its flusher writes them together once this returns."""
        for msg in (*free, *tokens):
            with contextlib.suppress(Exception):  # acked already (a redelivery), closed
                await msg.ack()

    async def start(self) -> None:
        """Connect (waiting for the bus), bind every partition and serve the monitoring port."""
        c = self.config
        if c.mon_port >= 0:
            self.monapp = MonApp(self.snapshot, self.health, config=c)
            self.mon_port = await self.monapp.start(c.mon_host, c.mon_port)
        self.link.start()
        await self.link.wait()
        self._tasks = [
            asyncio.create_task(self._guard(p), name=f"partition-{p.number}") for p in self.parts
        ]
        self._tasks.append(asyncio.create_task(self._look(), name="lag"))

    async def _guard(self, part: Partition) -> None:
        """Run a partition; should it fail (never expected), stop the whole node: what its
        engine held is then only in unacked messages, which a restarted node replays (an
        engine that went on after an error could have taken events it never published)."""
        try:
            await part.run()
        except Exception as exc:
            log.exception("partition %d failed; the node stops for a replay", part.number)
            self.failed = exc
            self._stop.set()

    async def stop(self) -> None:
        """Drain: finish the batch in hand, hand back held messages, close."""
        self.stopping = True
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.link.up and any(p.ledger.held for p in self.parts):
            # Let the last fetch's pull request expire first: JetStream would deliver the
            # messages handed back to it (to this process, about to go) and they would wait
            # out their ack_wait before the replacement sees them.
            await asyncio.sleep(FETCH_WAIT + HAND_BACK_MARGIN)
            for p in self.parts:
                await p.hand_back()
        js = self.link.js
        if self.link.up and js is not None:
            for p in self.parts:  # the next holder need not wait out the TTL
                await self.owners.release(js, p.number, p.lease)
        await self.link.close()
        if self.monapp is not None:
            await self.monapp.cleanup()

    async def _look(self) -> None:
        while not self.stopping:
            for p in self.parts:
                await p.look()
            await self.sleep(LAG_EVERY)

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/metrics``: the engines' (summed) and the bus's."""
        stats = self.stats
        stats.events = sum(p.counts["events"] for p in self.parts)
        snap = stats.snapshot()
        buffer: Counter[str] = Counter()
        incomplete: Counter[str] = Counter()
        for p in self.parts:
            buffer.update(p.buffer.stats)
            incomplete.update(p.buffer.incomplete)
            for reason, n in p.buffer.rejected.items():
                snap["bad_input"][reason] = snap["bad_input"].get(reason, 0) + n
        snap["buffer"] = dict(buffer)
        snap["incomplete"] = dict(incomplete)
        snap["open_transactions"] = sum(p.buffer.open_count for p in self.parts)
        snap["open_bytes"] = sum(p.buffer.open_bytes for p in self.parts)
        snap["bus"] = {
            "up": int(self.link.up),
            "errors": dict(self.link.errors),
            "published_messages": sum(p.counts["published"] for p in self.parts),
            "duplicates": sum(p.counts["duplicates"] for p in self.parts),
            "carried": sum(p.counts["carried"] for p in self.parts),
            "consumers": {
                p.durable: {
                    "lag": p.lag,
                    "ack_pending": p.ack_pending,
                    "held": p.ledger.held,
                    "redelivered": p.counts["redelivered"],
                    "messages": p.counts["messages"],
                    "unreadable": p.counts["unreadable"],
                    "lease_waiting": int(p.waiting_for is not None),
                    "leases_lost": p.counts["leases_lost"],
                }
                for p in self.parts
            },
            **self.link.byte_counts(),
        }
        return snap

    def health(self) -> dict[str, Any]:
        """What ``/ecv`` reports: available while the bus is up and the node runs."""
        up = self.link.up and not self.stopping
        waiting = {str(p.number): p.waiting_for for p in self.parts if p.waiting_for is not None}
        if not up:
            why: dict[str, Any] = {"reason": "bus_unavailable" if not self.link.up else "draining"}
        elif waiting:  # another process runs some of its partitions
            why = {"reason": "partition_owned", "holders": waiting}
        else:
            why = {}
        return {
            "available": self.config.ecv and up and not waiting,
            **why,
            "role": "reassemble",
            "pid": os.getpid(),
            "partitions": [p.number for p in self.parts],
            "leased": [p.number for p in self.parts if p.lease.held],
            "open_transactions": sum(p.buffer.open_count for p in self.parts),
            "held_messages": sum(p.ledger.held for p in self.parts),
        }

    def run(self) -> int:
        """Run until SIGTERM / SIGINT, then drain. Returns the exit status."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        stop = stop_signal()
        starting = asyncio.create_task(self.start())
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            print(
                f"async-logging: reassembling partitions {_ranges([p.number for p in self.parts])} "
                f"of {self.settings.partitions} from {', '.join(self.settings.servers)}, "
                f"monitoring http://{self.config.mon_host}:{self.mon_port}/ecv /metrics",
                file=sys.stderr,
                flush=True,
            )
            failing = asyncio.create_task(self._stop.wait())
            await asyncio.wait({waiting, failing}, return_when=asyncio.FIRST_COMPLETED)
            failing.cancel()
        else:
            starting.cancel()
        print("async-logging: draining…", file=sys.stderr, flush=True)
        await self.stop()
        return 1 if self.failed is not None else 0


def _ranges(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    out: list[str] = []
    for n in numbers:
        if out and n == int(out[-1].rpartition("-")[2]) + 1:
            first = out[-1].partition("-")[0]
            out[-1] = f"{first}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)
