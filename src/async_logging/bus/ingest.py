"""BusIngest: an ingest node's side of the bus (``serve --bus``; docs/design.md §8).

The listener hands it what it would hand the :class:`~async_logging.server.pipeline.Pipeline`
(the same ``accept`` / ``accept_msgpack`` / ``refusing`` seam), and it does not
reassemble: it maps each batch (the engine's mapper: refusals, normalised ids, the time
received), splits it by partition (:func:`~async_logging.bus.partition.split`) and
publishes one message per partition to ``alog.events.<p>``, each named by its content
(``Nats-Msg-Id``). It returns only once JetStream stored every one: the client's ack now
means *durable in the cluster*. A message larger than the bus takes is split; an event
larger than that alone is refused ``record_too_big`` (the rest of its batch is taken).

A MessagePack frame with nothing to refuse (the common frame) skips the map in Python: the
native extension parses it with the mapper's checks and cuts it by partition
(:func:`~async_logging.bus.partition.native_split`), its events go to their partitions as
the bytes they came in, and the reassembler maps them. The uuid is normalised there as the
mapper would (an integer ``4242`` lands where ``"4242"`` does); an event without a
``timestamp`` then gets the reassembler's time, not this node's.

Batches taken while a flush waits for JetStream go in the next flush (a group commit): the
busier the node, the fewer and larger its messages.

When the bus cannot take a batch (unreachable, no quorum, full, too slow) the batch is
refused ``overloaded`` (503, the detail says ``bus_unavailable`` or ``bus_full``): the
client keeps it and sends it again. ``/ecv`` says 503 while the bus is down and for
:data:`REFUSED_HOLD` seconds after a refusal.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import msgspec

from .. import wire
from ..buffer import Fed, wall_clock_ms
from ..exceptions import InvalidEvent
from ..model import map_events
from ..server.config import ServerConfig
from ..server.pipeline import Stats
from ..server.spool import Spool
from .jetstream import BusLink, BusSettings, BusUnavailable, Outgoing, with_id
from .partition import (
    ARRAY_HEAD_BYTES,
    array_body,
    events_subject,
    join_arrays,
    message_id,
    native_split,
    split,
)

__all__ = ["REFUSED_HOLD", "BusIngest"]

#: Seconds after the bus refused a batch during which ``/ecv`` still says so.
REFUSED_HOLD: Final = 5.0
#: Bytes kept free in a bus message for its headers and subject.
HEADROOM: Final = 1024


class BusIngest:
    """Publishes accepted batches to the events stream instead of reassembling them.

    Args:
        settings: the bus options.
        stats: the node's counters (events, bad input by reason...).
        wire_limits: the limits the listener decodes frames with.
        name: the client name the NATS servers show.
    """

    def __init__(
        self,
        settings: BusSettings,
        *,
        stats: Stats | None = None,
        wire_limits: wire.WireLimits = wire.DEFAULT_LIMITS,
        name: str = "async-logging-ingest",
    ) -> None:
        self.settings = settings
        self.stats = stats or Stats()
        self.wire_limits = wire_limits
        self.link = BusLink(settings, name)
        self.clock: Callable[[], float] = time.monotonic
        self._spread = 0
        self._refused_at = -math.inf
        self._refused_reason = "bus_unavailable"
        #: Batches and messages published, duplicates JetStream dropped, batches the bus
        #: refused by reason.
        self.counts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        # Partition -> MessagePack array bodies waiting for the next flush, and the
        # batches waiting for it (a group commit: see _flush).
        self._pending: dict[int, list[tuple[int, bytes]]] = {}
        self._waiting: list[asyncio.Future[None]] = []
        self._flushing: asyncio.Task[None] | None = None
        #: No spool: the bus is the durable copy (the listener's seam asks).
        self.spool: Spool | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun (nothing more is taken)."""
        return self._closed

    @classmethod
    def for_config(cls, c: ServerConfig, stats: Stats, wire_limits: wire.WireLimits) -> BusIngest:
        """The ingest side of ``serve --bus`` for the server's options."""
        name = f"async-logging-ingest-{c.machine_name}-{os.getpid()}"
        return cls(BusSettings.from_config(c), stats=stats, wire_limits=wire_limits, name=name)

    def start(self) -> None:
        """Begin connecting to the bus (in the background: batches are refused until then)."""
        self.link.start()

    async def close(self) -> None:
        """Close the connection (call once nothing is accepted any more)."""
        self._closed = True
        await self.link.close()

    def refusing(self) -> str | None:
        """``bus_unavailable`` while the bus cannot be used, the bus's reason for
        :data:`REFUSED_HOLD` seconds after it refused a batch, else None."""
        if not self.link.up:
            return "bus_unavailable"
        if self.clock() - self._refused_at < REFUSED_HOLD:
            return self._refused_reason
        return None

    async def accept(self, logs: list[Any], raw: tuple[int, bytes] | None = None) -> Fed:
        """Map a batch and publish it to the bus; returns the refusals (no records: the
        reassemblers publish them).

        Args:
            logs: the decoded log maps (handed over: they are mapped in place).
            raw: ignored (the pipeline's spool record; the bus is the durable copy here).

        Raises:
            BusUnavailable: the bus did not store the batch (nothing of it is acked).
        """
        rejected: list[tuple[int, InvalidEvent]] = []
        mapped = map_events(logs, wall_clock_ms(), rejected)
        if mapped:
            too_big = await self._publish(mapped)
            if too_big:
                where = {id(e): i for i, e in enumerate(logs)}
                rejected.extend((where[id(e)], exc) for e, exc in too_big)
                rejected.sort(key=lambda r: r[0])
        bad = self.stats.bad_input
        for _, exc in rejected:
            bad[exc.reason] += 1
        self.stats.events += len(logs) - len(rejected)
        return Fed([], rejected)

    async def accept_msgpack(self, payload: bytes) -> tuple[int | None, int, Fed]:
        """Decode a MessagePack payload and :meth:`accept` it.

        Raises:
            BadInput: the payload does not decode or breaks a wire limit.
            BusUnavailable: as :meth:`accept`.
        """
        native = None
        if self.link.up and self.link.nc is not None:  # else the mapping path says why
            limit = self._limit()
            self._spread += 1
            partitions = self.settings.partitions
            other = self._spread % partitions  # records of their own spread over partitions
            native = native_split(payload, self.wire_limits, partitions, other, limit)
            if native is not None and any(len(body) > limit for _, _, body in native.parts):
                # One partition's events are more than a bus message holds: the mapping
                # path cuts them into messages that fit (one event over it alone is refused).
                native = None
        if native is not None:  # nothing to refuse: the events go as they came
            await self._enqueue({part: [(n, body)] for part, n, body in native.parts})
            self.stats.events += native.events
            self.counts["raw_frames"] += 1
            return native.seq, native.events, Fed([], [])
        frame = wire.decode_msgpack(payload, self.wire_limits)
        return frame.seq, len(frame.logs), await self.accept(frame.logs)

    async def _publish(self, events: list[Any]) -> list[tuple[Any, InvalidEvent]]:
        """Publish mapped events with what other batches hand over meanwhile (a group
        commit: one message per partition per flush); returns the events too big for any
        message, which are not published.

        Raises:
            BusUnavailable: the flush holding them was not stored.
        """
        limit = self._limit()
        self._spread += 1
        too_big: list[tuple[Any, InvalidEvent]] = []
        encode = msgspec.msgpack.encode
        parts = {
            part: [array_body(p) for p in _fit(chunk, limit, encode, too_big)]
            for part, chunk in split(events, self.settings.partitions, self._spread).items()
        }
        await self._enqueue(parts)
        return too_big

    def _limit(self) -> int:
        """The largest message payload (the servers' ``max_payload`` less headroom).

        Raises:
            BusUnavailable: the bus cannot be used now.
        """
        link = self.link
        if not link.up or link.nc is None:
            self._refused("bus_unavailable")
            raise BusUnavailable("bus_unavailable", "the bus cannot be reached now")
        return max(link.nc.max_payload - HEADROOM, HEADROOM)

    async def _enqueue(self, parts: dict[int, list[tuple[int, bytes]]]) -> None:
        """Add array bodies by partition to the next flush and wait until it is stored.

        Raises:
            BusUnavailable: the bus cannot be used now, or did not store the flush.
        """
        limit = self._limit()
        pending = self._pending
        for part, bodies in parts.items():
            pending.setdefault(part, []).extend(bodies)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush(limit), name="bus-flush")
        await done

    async def _flush(self, limit: int) -> None:
        """Publish what is pending, wake its batches; again while more came meanwhile.

        One flush at a time: batches that arrive while one waits for JetStream go in the
        next, so the busier the node, the fewer and larger its messages.
        """
        waiting: list[asyncio.Future[None]] = []
        try:
            while self._waiting:
                await asyncio.sleep(0)  # batches taken in the same turn of the loop join
                pending, self._pending = self._pending, {}
                waiting, self._waiting = self._waiting, []
                messages: list[Outgoing] = []
                for part, bodies in pending.items():
                    subject = events_subject(part)
                    for payload in _group(bodies, limit):
                        messages.append(with_id(subject, payload, message_id(payload)))
                error: BusUnavailable | None = None
                publisher = self.link.publisher
                try:
                    if publisher is None:
                        raise BusUnavailable("bus_unavailable", "the bus cannot be reached now")
                    result = await publisher.publish(messages, self.settings.timeout)
                except BusUnavailable as exc:
                    self._refused(exc.bus_reason)
                    error = exc
                else:
                    self.counts["batches"] += len(waiting)
                    self.counts["flushes"] += 1
                    self.counts["messages"] += len(messages)
                    self.counts["duplicates"] += result.duplicates
                for done in waiting:
                    if not done.done():
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(BusUnavailable(error.bus_reason, error.detail))
        except BaseException as exc:  # cancelled at a shutdown, never expected otherwise
            for done in (*waiting, *self._waiting):
                if not done.done():
                    done.set_exception(BusUnavailable("bus_unavailable", f"not published: {exc!r}"))
            raise
        finally:
            self._flushing = None

    def _refused(self, reason: str) -> None:
        self.refusals[reason] += 1
        self._refused_at = self.clock()
        self._refused_reason = reason

    def snapshot(self) -> dict[str, Any]:
        """The bus's counters for ``/metrics`` (``bus`` in the node's snapshot)."""
        return {
            "up": int(self.link.up),
            "errors": dict(self.link.errors),
            "refused": dict(self.refusals),
            "published_batches": self.counts["batches"],
            "flushes": self.counts["flushes"],
            "published_messages": self.counts["messages"],
            "duplicates": self.counts["duplicates"],
            **self.link.byte_counts(),
        }


def _group(bodies: list[tuple[int, bytes]], limit: int) -> list[bytes]:
    """Array bodies joined into as few MessagePack arrays of at most ``limit`` bytes as
    they fit in, in order (each body fits alone: :func:`_fit` made it)."""
    out: list[bytes] = []
    run: list[tuple[int, bytes]] = []
    size = ARRAY_HEAD_BYTES
    for body in bodies:
        if run and size + len(body[1]) > limit:
            out.append(join_arrays(run))
            run, size = [], ARRAY_HEAD_BYTES
        run.append(body)
        size += len(body[1])
    if run:
        out.append(join_arrays(run))
    return out


def _fit(
    events: list[Any],
    limit: int,
    encode: Callable[[Any], bytes],
    too_big: list[tuple[Any, InvalidEvent]],
) -> list[bytes]:
    """``events`` encoded as MessagePack arrays of at most ``limit`` bytes each, in order
    (halved until they fit); an event over the limit alone goes to ``too_big``."""
    payload = encode(events)
    if len(payload) <= limit:
        return [payload]
    if len(events) == 1:
        too_big.append(
            (
                events[0],
                InvalidEvent(
                    "record_too_big",
                    f"an event of {len(payload)} bytes is over what one bus message holds "
                    f"({limit} bytes: the NATS servers' max_payload)",
                ),
            )
        )
        return []
    half = len(events) // 2
    return _fit(events[:half], limit, encode, too_big) + _fit(events[half:], limit, encode, too_big)
