"""The reference engine: :class:`LogBuffer`, its limits, and how trees are built.

The contract it keeps is in :mod:`async_logging.buffer` (and docs/design.md §3). The
native fast path (:mod:`.native`) and the memory of published trees (:mod:`.memory`) live
beside it; this file holds the rules, in Python, and stays the oracle for the fast path.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final, NamedTuple, cast

import orjson

from ..exceptions import InvalidEvent, UsageError
from ..model import (
    ATOMIC,
    BEGIN,
    END,
    HEARTBEAT,
    ROOT_PARENT,
    Event,
    Mapper,
    map_events,
)
from ..wire import DEFAULT_LIMITS, WireLimits
from .memory import PublishedMemory, atomic_digest, id_digest
from .native import TRANSACTION, NativePath, Prepared, Reassembled, prepare

__all__ = [
    "INCOMPLETE_REASONS",
    "MAPPER_ERROR",
    "BufferLimits",
    "Fed",
    "LogBuffer",
    "Record",
    "wall_clock_ms",
]

Record = dict[str, Any]
#: Fields a compact record keeps only where they differ from its root's (where the event
#: comes from: docs/design.md §2).
COMPACT_KEYS: Final = (
    "uuid",
    "request",
    "tid",
    "pid",
    "machine",
    "ipAddress",
    "ip",
    "pool",
    "rlogid",
)
#: Status given to a transaction that never said one (CAL: anything but "0" is a failure).
UNKNOWN_STATUS: Final = "-1"
#: The reason a custom mapper's exception refuses its event with (``bad_input{reason}``).
MAPPER_ERROR: Final = "mapper_error"
#: Why incomplete trees are published (``incomplete{reason}``, exported at 0 from the
#: start): the engine's own reasons, then the reasons the server flushes with
#: (:meth:`LogBuffer.flush_all`).
INCOMPLETE_REASONS: Final = (
    "timeout",
    "evicted",
    "cycle",
    "missing_children",
    "shutdown",
    "recycled",
)
_TS = itemgetter("timestamp")
_MISSING: Final = object()
_FIRST = itemgetter(0)


def wall_clock_ms() -> int:
    """Milliseconds since the epoch (the default clock)."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class BufferLimits:
    """Timeouts and caps of the engine; every one is a named, overridable limit.

    Attributes:
        clean_duration: seconds between the seed's clean cycles.
        clean_cycles: cycles without a new event after which an open tree is published
            incomplete (``timeout``): the timeout is ``clean_duration * clean_cycles``.
        settle: seconds a closed tree waits for late siblings before it is published (0: at once).
        max_open: open trees (uuids) held at once; past it the oldest is published ``evicted``.
        max_events_per_tx: events held for one uuid; past it that tree is published ``evicted``.
        max_depth: nesting depth kept in one record; deeper subtrees become fragments.
        max_published_memory: published uuids remembered to recognise duplicates and late events.
        max_open_bytes: bytes of events held in open trees (as JSON); past it the oldest open
            trees are published ``evicted`` until the rest fit.
        max_published_digests: digests (8 bytes each) remembered of published trees in all;
            past it the oldest uuid is forgotten.
        published_memory_age: seconds a published uuid is remembered.
        compact: drop from every node below a root the fields of :data:`COMPACT_KEYS` whose
            value is the root's (same type, equal): smaller records, the same information.
    """

    clean_duration: float = 60.0
    clean_cycles: int = 3
    settle: float = 0.0
    max_open: int = 100_000
    max_events_per_tx: int = 10_000
    max_depth: int = 64
    max_published_memory: int = 100_000
    max_open_bytes: int = 256 * 1024 * 1024
    max_published_digests: int = 8_000_000
    published_memory_age: float = 900.0
    compact: bool = False

    def __post_init__(self) -> None:
        for name in ("clean_duration", "settle", "published_memory_age"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0")
        for name in (
            "clean_cycles",
            "max_open",
            "max_events_per_tx",
            "max_depth",
            "max_published_memory",
            "max_open_bytes",
            "max_published_digests",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1")
        if self.max_depth > 100:
            # orjson refuses to nest deeper than 254 levels; each tree level costs two.
            raise UsageError("max_depth must be <= 100 (JSON encoders limit nesting)")


class Fed(NamedTuple):
    """What one :meth:`LogBuffer.feed_many` call produced."""

    records: Sequence[Record]
    """Records ready to publish, in order (a list, or :class:`EncodedRecords` from
    :meth:`LogBuffer.feed_prepared`)."""
    rejected: list[tuple[int, InvalidEvent]]
    """(index in the batch, error) for each event that was refused."""


class _Group:
    """Everything held for one uuid."""

    __slots__ = (
        "alike",
        "batch",
        "begins",
        "bytes",
        "closed_at",
        "count",
        "counts",
        "ends",
        "fresh",
        "kids",
        "last",
        "pending",
        "roots",
        "seen",
        "short",
        "uuid",
    )

    def __init__(self, uuid: str, now: int) -> None:
        self.uuid = uuid
        self.begins: dict[str, Event] = {}
        self.ends: dict[str, Event] = {}
        self.kids: dict[str, list[Event]] = {}
        # Atomic events by (event, parent, timestamp): finds resent duplicates.
        self.seen: dict[tuple[Any, ...], Event] = {}
        # For the keys of ``seen`` that more than one different event shares: the digests
        # of those events (made on the first collision), so that telling a resend from a
        # new event costs one digest, never a scan of the siblings (linear, not quadratic).
        self.alike: dict[tuple[Any, ...], set[bytes]] | None = None
        # Transaction ids referenced here that do not yet have both their begin and end.
        self.pending: set[str] = set()
        # Exact completeness: the childCount of each end that carried one, and the ids of
        # those transactions holding fewer children than their count (the tree waits).
        self.counts: dict[str, int] | None = None
        self.short: set[str] = set()
        self.roots: list[str] = []
        self.count = 0
        # Bytes of the events held (their JSON size), and those not yet sized (taken
        # in the batch being fed): sized only if the tree stays open after it.
        self.bytes = 0
        self.fresh: list[Event] = []
        self.last = now
        self.closed_at: int | None = None
        self.batch = 0  # the feed_many call that opened it (see LogBuffer.oldest_open_batch)


def _atomic_key(e: Event, eid: str | None, parent: str) -> tuple[Any, ...]:
    """Identity of an atomic event for duplicate detection: ids, time and a string msg."""
    msg = e.get("msg")
    return (eid, parent, e["timestamp"], msg if msg.__class__ is str else None)


class LogBuffer:
    """The reassembly engine. Not thread-safe: one owner feeds it.

    Args:
        mapper: an optional callable (raw map → mapped map) run before the engine's own
            normalisation (:func:`async_logging.model.default_mapper`), which then only
            fills what the mapper left out and enforces what the engine relies on.
        clock: returns milliseconds since the epoch; injected so tests need no sleeps.
        limits: timeouts and caps (:class:`BufferLimits`); keyword overrides also accepted.
        native: whether :meth:`prepare_msgpack` may use the native fast path (when it is
            compiled, see :mod:`async_logging.encoded`); False keeps every frame on the
            reference path. A custom ``mapper`` or a ``settle`` time turns it off too.

    :meth:`feed_many` leaves the caller's maps as they were (it works on copies); a
    caller that hands its maps over, such as the server with the maps it just decoded,
    calls :meth:`feed_owned`, which turns them into the records themselves.
    """

    def __init__(
        self,
        mapper: Mapper | None = None,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        limits: BufferLimits | None = None,
        native: bool = True,
        **overrides: Any,
    ) -> None:
        if mapper is not None and not callable(mapper):
            raise UsageError("mapper must be callable (raw map -> mapped map)")
        limits = limits or BufferLimits()
        if overrides:
            try:
                limits = BufferLimits(**{**_limits_dict(limits), **overrides})
            except TypeError as exc:
                raise UsageError(f"unknown LogBuffer option: {exc}") from exc
        self.limits = limits
        self._mapper = mapper
        self._clock = clock
        # An OrderedDict, not a dict: it loses its oldest entry first, and a dict whose
        # front was deleted makes next(iter(...)) skip every dead slot (O(n) per eviction:
        # 27 us against 1 us at 100,000 uuids, measured).
        self._open: OrderedDict[str, _Group] = OrderedDict()
        # What was published of each uuid: recognises resends and late events.
        self._published = PublishedMemory(
            limits.max_published_memory,
            limits.max_published_digests,
            limits.published_memory_age * 1000,
        )
        # Bytes held in open trees (the sum of their _Group.bytes).
        self._open_bytes = 0
        # The clock's time at the last feed, clean cycle or flush (when trees published
        # now are remembered from).
        self._now = 0
        self._timeout_ms = int(limits.clean_duration * limits.clean_cycles * 1000)
        self._settle_ms = int(limits.settle * 1000)
        #: feed_many calls so far (numbers the batches, see :attr:`oldest_open_batch`).
        self.batches = 0
        #: Running counters (events, published_complete, published_incomplete, standalone,
        #: duplicates, conflicts, late, evicted, rejected, orphans, cycles_cut, depth_cut).
        self.stats: Counter[str] = Counter()
        #: Refused events by reason (``unknown_clazz``, ``bad_id``, ...).
        self.rejected: Counter[str] = Counter()
        #: Incomplete trees published, by reason (``timeout``, ``evicted``, ``shutdown``).
        self.incomplete: Counter[str] = Counter()
        # The native fast path: only for the default mapper and no settle time (both
        # change what a frame publishes in ways only the reference path knows).
        self._native = (
            NativePath.load(
                max_depth=limits.max_depth,
                max_events_per_tx=limits.max_events_per_tx,
                compact=limits.compact,
            )
            if native and mapper is None and not self._settle_ms
            else None
        )

    # ------------------------------------------------------------------ public API

    @property
    def oldest_open_batch(self) -> int | None:
        """Number of the :meth:`feed_many` call that opened the oldest open tree (None: none).

        Every event of an earlier batch has been published or refused: a write-ahead log
        in front of the buffer can forget those batches. Batches are numbered from 1 in
        :attr:`batches`.
        """
        for g in self._open.values():
            return g.batch
        return None

    def rebase_open(self) -> list[Event]:
        """Every event held in open trees, which now count as fed in the latest batch.

        For a write-ahead log in front of the buffer: it writes these events again at its
        tail and forgets everything before, so one long-open tree does not pin old batches.
        """
        events: list[Event] = []
        for g in self._open.values():
            events.extend(g.begins.values())
            events.extend(g.ends.values())
            for kids in g.kids.values():
                events.extend(e for e in kids if e["clazz"] != BEGIN and e["clazz"] != END)
            g.batch = self.batches
        return events

    @property
    def open_count(self) -> int:
        """Trees (uuids) held open right now."""
        return len(self._open)

    def is_open(self, uuid: str) -> bool:
        """Whether a tree of ``uuid`` is held open now (a write-ahead log's or a bus
        consumer's question after a feed: may the messages holding it be let go?)."""
        return uuid in self._open

    @property
    def held_events(self) -> int:
        """Events held in open trees right now."""
        return sum(g.count for g in self._open.values())

    @property
    def open_bytes(self) -> int:
        """Bytes of the events held in open trees (their size as JSON), as of the last feed."""
        return self._open_bytes

    @property
    def published_memory(self) -> PublishedMemory:
        """What is remembered of published trees (digests; see :mod:`.memory`)."""
        return self._published

    def feed(self, event: Event) -> list[Record]:
        """Take one log map; return the records it completes.

        Raises:
            InvalidEvent: the event was refused (counted in :attr:`rejected`); the engine
                is unchanged and keeps working.
        """
        fed = self.feed_many((event,))
        if fed.rejected:
            raise fed.rejected[0][1]
        return cast(list[Record], fed.records)  # feed_many's records are a list

    @property
    def native(self) -> bool:
        """Whether :meth:`prepare_msgpack` can take frames natively (see ``native``)."""
        return self._native is not None

    def prepare_msgpack(
        self, payload: bytes, limits: WireLimits = DEFAULT_LIMITS
    ) -> Prepared | None:
        """Reassemble a MessagePack frame natively, without changing the engine's state.

        The fast path for the common frame: an array or ``{"seq", "logs"}`` envelope of
        log maps forming whole trees, none of them open or published before. The records
        come out as JSON lines, exactly those :meth:`feed_many` would publish for the
        decoded frame (:func:`async_logging.wire.decode_msgpack`). Anything else, such as
        a bad frame, a refused event, an incomplete tree, a duplicate, a straggler or a
        cap reached, returns None: decode the frame and :meth:`feed_many` it, which
        knows every rule and every error.

        It is :meth:`reassemble_msgpack` (the work, on any thread) followed by
        :meth:`prepare_reassembled` (the check against the engine's state, on the owner's).

        Args:
            payload: the frame's bytes.
            limits: the wire limits the frame must keep (as the decoder checks them).

        Returns:
            What :meth:`feed_prepared` takes, or None when the frame needs the reference path.
        """
        return self.prepare_reassembled(self.reassemble_msgpack(payload, limits))

    def reassemble_msgpack(
        self, payload: bytes, limits: WireLimits = DEFAULT_LIMITS
    ) -> Reassembled | None:
        """The native work of :meth:`prepare_msgpack`, which reads no engine state.

        Safe to call from any thread: every call works on its own memory (it holds the
        GIL, which measured faster in the server than releasing it).

        Returns:
            The frame reassembled, for :meth:`prepare_reassembled`; None when the frame
            needs the reference path (or the fast path is off).
        """
        native = self._native
        if native is None or type(payload) is not bytes:
            return None
        now = self._clock()
        if type(now) is not int:  # an injected clock may return a float: the reference path
            return None
        return native.reassemble(payload, now, limits)

    def prepare_reassembled(self, result: Reassembled | None) -> Prepared | None:
        """Check a :meth:`reassemble_msgpack` result against the engine's state.

        Call it from the thread that feeds the buffer, then :meth:`feed_prepared` with no
        other feed in between. None (the reference path must take the frame) when a tree
        of the frame is open (a straggler joins it) or was published (a duplicate, or a
        late event), or when opening the trees would evict one (``max_open``).
        """
        if result is None:
            return None
        return prepare(
            result,
            batch=self.batches,
            open_uuids=self._open.keys(),
            published=self._published,
            max_open=self.limits.max_open,
        )

    def feed_prepared(self, prepared: Prepared) -> Fed:
        """Take a frame :meth:`prepare_msgpack` reassembled; return what it publishes.

        Raises:
            UsageError: the buffer was fed something else since ``prepared`` was made.
        """
        if prepared.batch != self.batches:
            raise UsageError("feed_prepared(): the buffer was fed since prepare_msgpack()")
        self.batches += 1
        stats = self.stats
        stats["events"] += prepared.events
        if prepared.standalone:
            stats["standalone"] += prepared.standalone
        remember = self._published.remember_packed
        now = self._clock()
        for uuid, memory in zip(prepared.uuids, prepared.memories, strict=True):
            remember(uuid, memory, now)
        if prepared.uuids:
            stats["published_complete"] += len(prepared.records) - prepared.standalone
        return Fed(prepared.records, [])

    def feed_msgpack(self, payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Fed | None:
        """:meth:`prepare_msgpack` then :meth:`feed_prepared`; None when not taken natively."""
        prepared = self.prepare_msgpack(payload, limits)
        return None if prepared is None else self.feed_prepared(prepared)

    def feed_many(self, events: Iterable[Any]) -> Fed:
        """Take a batch of log maps; return the records to publish and the refusals.

        A bad event never costs a good one beside it: it is refused, counted and reported
        with its index, and the rest of the batch is taken. The maps given are not changed
        (the engine works on shallow copies), so feeding one map twice is a duplicate, not
        an error.
        """
        return self.feed_owned([e.copy() if e.__class__ is dict else e for e in events])

    def feed_owned(self, events: Iterable[Any], *, premapped: bool = False) -> Fed:
        """:meth:`feed_many` for maps the caller hands over: they become the records (no
        copy). The caller must not use them afterwards, nor feed one twice.

        ``premapped``: the caller made the maps by the default mapper's rules already (a
        ``clazz``, a string ``uuid`` copied to ``request``, string ids, times and durations
        in range, a ``type``...), as the OTLP ingest does: they skip the mapper, unless a
        custom one is set.
        """
        now = self._now = self._clock()
        self.batches += 1
        out: list[Record] = []
        rejected: list[tuple[int, InvalidEvent]] = []
        if self._mapper is not None:
            events = self._premap(events, rejected)
            premapped = False
        mapped = events if premapped and type(events) is list else map_events(events, now, rejected)
        if rejected:
            rejected.sort(key=_FIRST)  # stable: the custom mapper's refusal comes first
            if self._mapper is not None:
                rejected[:] = list({i: (i, exc) for i, exc in reversed(rejected)}.values())[::-1]
            for _, exc in rejected:
                self.rejected[exc.reason] += 1
            self.stats["rejected"] += len(rejected)
        self.stats["events"] += len(mapped)
        touched: dict[str, _Group] = {}
        open_groups = self._open
        stats = self.stats
        max_events = self.limits.max_events_per_tx
        # The per-event hot path: kept in one loop on purpose (no call per event).
        for e in mapped:
            clazz = e["clazz"]
            uuid = e.get("uuid")
            parent = e["parent"]
            if not uuid or (parent == ROOT_PARENT and (clazz in (ATOMIC, HEARTBEAT))):
                e["kind"] = e.pop("clazz")
                stats["standalone"] += 1
                out.append(e)
                continue
            g = open_groups.get(uuid)
            if g is not None and g.count >= max_events:
                # Full: the tree goes out now; this event then counts as late.
                stats["evicted"] += 1
                out.extend(self._publish(g, "evicted"))
                touched.pop(uuid, None)
                g = None
            if g is None:
                g = self._new_group(e, now, out)
                if g is None:
                    continue
            eid: str = e.get("event")  # type: ignore[assignment]  # set for begin/end (mapper)
            if clazz == BEGIN:
                begins = g.begins
                prev = begins.get(eid)
                if prev is not None:
                    if prev == e:
                        stats["duplicates"] += 1
                    else:
                        out.append(self._flagged(e, "conflict"))
                    continue
                begins[eid] = e
                pending = g.pending
                if eid in g.ends:
                    pending.discard(eid)
                else:
                    pending.add(eid)
                if parent == ROOT_PARENT:
                    g.roots.append(eid)
                else:
                    kids = g.kids.get(parent)
                    if kids is None:
                        kids = g.kids[parent] = [e]
                    else:
                        kids.append(e)
                    if parent not in begins or parent not in g.ends:
                        pending.add(parent)
                    if g.short and parent in g.short:
                        _count_kid(g, parent, len(kids))
            elif clazz == END:
                ends = g.ends
                prev = ends.get(eid)
                if prev is not None:
                    if prev == e:
                        stats["duplicates"] += 1
                    else:
                        out.append(self._flagged(e, "conflict"))
                    continue
                ends[eid] = e
                if eid in g.begins:
                    g.pending.discard(eid)
                else:
                    g.pending.add(eid)
                expected = e.get("childCount")
                if expected is not None:
                    _expect_kids(g, eid, expected)
            else:
                msg = e.get("msg")  # _atomic_key, inlined on the hot path
                key = (eid, parent, e["timestamp"], msg if msg.__class__ is str else None)
                seen = g.seen
                prev = seen.get(key)
                if prev is not None:
                    if prev == e or _seen_alike(g, key, prev, e):
                        stats["duplicates"] += 1
                        continue
                else:
                    seen[key] = e
                kids = g.kids.get(parent)
                if kids is None:
                    kids = g.kids[parent] = [e]
                else:
                    kids.append(e)
                if parent not in g.begins or parent not in g.ends:
                    g.pending.add(parent)
                if g.short and parent in g.short:
                    _count_kid(g, parent, len(kids))
            g.count += 1
            g.fresh.append(e)
            g.last = now
            touched[uuid] = g
        settle = self._settle_ms
        for g in touched.values():
            if g.roots and not g.pending and not g.short and open_groups.get(g.uuid) is g:
                if settle and not _counted(g):
                    if g.closed_at is None:
                        g.closed_at = now
                else:
                    out.extend(self._publish(g, None))
            elif g.closed_at is not None:
                g.closed_at = None
        added = 0
        for g in touched.values():
            if g.fresh:
                if open_groups.get(g.uuid) is g:
                    size = sum(map(_json_size, g.fresh))
                    g.bytes += size
                    added += size
                g.fresh = []
        if added:
            self._open_bytes += added
            if self._open_bytes > self.limits.max_open_bytes:
                self._evict_bytes(out)
        return Fed(out, rejected)

    def _evict_bytes(self, out: list[Record]) -> None:
        """Publish the oldest open trees ``evicted`` until the rest fit ``max_open_bytes``."""
        cap = self.limits.max_open_bytes
        open_groups = self._open
        while self._open_bytes > cap and open_groups:
            oldest = next(iter(open_groups.values()))
            self.stats["evicted"] += 1
            self.stats["evicted_bytes"] += 1
            out.extend(self._publish(oldest, "evicted"))

    def _premap(self, events: Iterable[Any], rejected: list[tuple[int, InvalidEvent]]) -> list[Any]:
        """Run the custom mapper; an exception in it refuses that one event only."""
        mapper = self._mapper
        assert mapper is not None
        out: list[Any] = []
        for i, raw in enumerate(events):
            try:
                out.append(mapper(raw))
            except InvalidEvent as exc:
                rejected.append((i, exc))
                out.append(None)  # refused again by map_events; deduplicated
            except Exception as exc:  # a custom mapper must never stop the engine
                rejected.append((i, InvalidEvent(MAPPER_ERROR, f"{type(exc).__name__}: {exc}")))
                out.append(None)  # refused again by map_events; deduplicated
        return out

    def expire(self, now: int | None = None) -> list[Record]:
        """Run a clean cycle: publish settled trees and the ones idle past the timeout."""
        if now is None:
            now = self._clock()
        self._now = now
        self._published.forget_older(now)
        out: list[Record] = []
        timeout = self._timeout_ms
        settle = self._settle_ms
        for g in list(self._open.values()):
            if g.closed_at is not None and now - g.closed_at >= settle:
                out.extend(self._publish(g, None))
            elif now - g.last >= timeout:
                out.extend(self._publish(g, "timeout"))
        return out

    def flush_all(self, reason: str = "shutdown") -> list[Record]:
        """Publish every open tree now (complete ones as complete, others flagged ``reason``)."""
        self._now = self._clock()
        out: list[Record] = []
        for g in list(self._open.values()):
            out.extend(self._publish(g, reason))
        return out

    def feed_late(self, events: Iterable[Any]) -> Fed:
        """Publish log maps each on its own, flagged ``late``: events of trees published
        before this buffer began, which only the caller knows of (a write-ahead log's
        replay: see :mod:`async_logging.server.spool`). Each is remembered like any late
        event (a resend is then a duplicate); a top-level atomic event stays stand-alone.
        Refusals as in :meth:`feed_many`.
        """
        now = self._now = self._clock()
        rejected: list[tuple[int, InvalidEvent]] = []
        if self._mapper is not None:
            events = self._premap(events, rejected)
        out: list[Record] = []
        for e in map_events(events, now, rejected):
            clazz, uuid, parent = e["clazz"], e.get("uuid"), e["parent"]
            self.stats["events"] += 1
            if not uuid or (parent == ROOT_PARENT and clazz in (ATOMIC, HEARTBEAT)):
                e["kind"] = e.pop("clazz")
                self.stats["standalone"] += 1
                out.append(e)
                continue
            eid = e.get("event")
            key = _atomic_key(e, eid, parent) if clazz in (ATOMIC, HEARTBEAT) else None
            self._published.remember_late(uuid, clazz, eid, key, now)
            out.append(self._flagged(e, "late"))
        for _, exc in rejected:
            self.rejected[exc.reason] += 1
        self.stats["rejected"] += len(rejected)
        return Fed(out, rejected)

    # ------------------------------------------------------------------ ingest

    def _new_group(self, e: Event, now: int, out: list[Record]) -> _Group | None:
        """Open the group of ``e``'s uuid, unless ``e`` belongs to a tree already published.

        Returns None when ``e`` was dealt with (a duplicate dropped, or published ``late``).
        """
        uuid: str = e["uuid"]
        done = self._published.get(uuid)
        if done is not None:  # digests (see .memory): never the events themselves
            clazz, eid, parent = e["clazz"], e.get("event"), e["parent"]
            begin_ids, end_ids, atomic_keys = done
            atomic = clazz in (ATOMIC, HEARTBEAT)
            key = _atomic_key(e, eid, parent) if atomic else None
            d_eid = id_digest(eid) if eid.__class__ is str else None
            d_parent = id_digest(parent)
            if (
                (clazz == BEGIN and d_eid in begin_ids)
                or (clazz == END and d_eid in end_ids)
                or (key is not None and atomic_digest(*key) in atomic_keys)
            ):
                self.stats["duplicates"] += 1
                return None
            if (
                d_parent in begin_ids
                or d_parent in end_ids
                or d_eid in begin_ids
                or d_eid in end_ids
            ):
                # Remember it, so its resend is a duplicate and its children are late too.
                self._published.remember_late(uuid, clazz, eid, key, now)
                out.append(self._flagged(e, "late"))
                return None
        if len(self._open) >= self.limits.max_open:
            oldest = next(iter(self._open.values()))
            self.stats["evicted"] += 1
            out.extend(self._publish(oldest, "evicted"))
        g = self._open[uuid] = _Group(uuid, now)
        g.batch = self.batches
        return g

    def _flagged(self, e: Event, flag: str) -> Record:
        """A stand-alone record for an event that cannot join its tree (late, conflict)."""
        self.stats[flag + ("s" if flag == "conflict" else "")] += 1
        clazz = e.pop("clazz")
        if clazz in (BEGIN, END):
            e["kind"] = TRANSACTION
            e.setdefault("status", UNKNOWN_STATUS)
            e.setdefault("duration", 0)
            e["children"] = []
            e["complete"] = False
            if clazz == BEGIN:
                e["missing_end"] = True
            else:
                e["missing_begin"] = True
        else:
            e["kind"] = clazz
        e[flag] = True
        return e

    # ------------------------------------------------------------------ publish

    def _publish(self, g: _Group, reason: str | None) -> list[Record]:
        del self._open[g.uuid]
        self._open_bytes -= g.bytes
        self._published.remember_tree(g.uuid, g.begins, g.ends, g.seen, self._now)
        if g.roots and not g.pending:
            short = {eid: g.counts[eid] - len(g.kids.get(eid, ())) for eid in g.short}  # type: ignore[index]
            records = self._build_complete(g)
            if short:  # closed, but children its ends counted never came
                _flag_missing_children(g, short)
                reason = "missing_children" if reason in (None, "timeout") else reason
            else:
                reason = "cycle"  # a closed tree is incomplete only around a parent cycle
        else:
            reason = reason or "incomplete"
            records = self._build_incomplete(g, reason)
        stats = self.stats
        if self.limits.compact:
            for r in records:
                _compact(r)
        for r in records:
            if r.get("complete") is True:
                stats["published_complete"] += 1
            else:
                # The engine's reason replaces a client's key of that name: "reason" on an
                # incomplete record is the engine's (a client's value could be anything).
                r["reason"] = reason
                stats["published_incomplete"] += 1
                self.incomplete[reason] += 1
        return records

    def _build_complete(self, g: _Group) -> list[Record]:
        """The fast path: every transaction closed, every parent present."""
        begins, ends, kids = g.begins, g.ends, g.kids
        max_depth = self.limits.max_depth
        records: list[Record] = []
        visited = 0
        fragments: list[Event] = []
        stack: list[tuple[Event, int]] = [(begins[r], 0) for r in reversed(g.roots)]
        while stack:
            node, depth = stack.pop()
            eid = node["event"]
            _merge_end(node, ends[eid])
            del node["clazz"]
            node["kind"] = TRANSACTION
            node["complete"] = True
            visited += 2
            ch = kids.get(eid)
            if ch:
                if len(ch) > 1:
                    ch.sort(key=_TS)
                cut: list[Event] | None = None
                for c in ch:
                    cl = c["clazz"]
                    if cl == BEGIN:
                        if depth + 1 >= max_depth:
                            cut = cut or []
                            cut.append(c)
                        else:
                            stack.append((c, depth + 1))
                    else:
                        del c["clazz"]
                        c["kind"] = cl
                        visited += 1
                if cut:
                    node["depth_cut"] = True
                    ch = [c for c in ch if not any(c is x for x in cut)]
                    fragments.extend(cut)
                node["children"] = ch
            else:
                node["children"] = []
            if depth == 0:
                records.append(node)
        for f in fragments:
            self.stats["depth_cut"] += 1
            f["depth_cut"] = True
            records.extend(self._walk(g, f))
        if fragments or visited != g.count:
            # Only parent cycles can leave events unreached in a closed group.
            records.extend(self._leftovers(g, records, "cycle"))
        return records

    def _build_incomplete(self, g: _Group, reason: str) -> list[Record]:
        begins, ends = g.begins, g.ends
        # An end whose begin never came stands in for its begin, flagged.
        for eid, end in ends.items():
            if eid not in begins:
                begins[eid] = end
                end["missing_begin"] = True
                parent = end["parent"]
                if parent == ROOT_PARENT:
                    g.roots.append(eid)
                else:
                    g.kids.setdefault(parent, []).append(end)
        records: list[Record] = []
        for r in g.roots:
            records.extend(self._walk(g, begins[r]))
        records.extend(self._leftovers(g, records, reason))
        return records

    def _leftovers(self, g: _Group, records: list[Record], reason: str) -> list[Record]:
        """Events no root reached: orphans (parent never came) and parent cycles.

        They are hung under the first root, flagged, or returned as records of their own
        when the group has no root.
        """
        begins = g.begins
        extra: list[Record] = []
        for parent, ch in g.kids.items():
            if parent not in begins:
                for c in ch:
                    if "clazz" in c:
                        c["orphan"] = True
                        self.stats["orphans"] += 1
                        extra.extend(self._walk(g, c))
        # Whatever is still unreached hangs off a parent cycle: follow parents from the
        # earliest unreached begin into the loop and cut the loop at its earliest member.
        while rest := [b for b in begins.values() if "clazz" in b]:
            node = min(rest, key=_TS)
            path: set[str] = set()
            while node["event"] not in path:
                path.add(node["event"])
                node = begins[node["parent"]]
            loop = [node]
            member = begins[node["parent"]]
            while member is not node:
                loop.append(member)
                member = begins[member["parent"]]
            head = min(loop, key=_TS)
            head["cycle"] = True
            self.stats["cycles_cut"] += 1
            extra.extend(self._walk(g, head))
        if extra and records and records[0]["kind"] == TRANSACTION:
            root = records[0]
            root["children"].extend(extra)
            if root["complete"]:
                root["complete"] = False
                root["reason"] = reason
            return []
        for r in extra:  # no root to hang them under: each is an incomplete record
            if r["kind"] == TRANSACTION:
                r["complete"] = False
        return extra

    def _walk(self, g: _Group, head: Event) -> list[Record]:
        """Build the tree under ``head`` where anything may be missing: the tree, then fragments.

        Fragments (subtrees past ``max_depth``) are queued, never recursed into, so any depth
        is safe.
        """
        out: list[Record] = []
        queue = [head]
        while queue:
            h = queue.pop()
            fragments: list[Event] = []
            out.append(self._walk_one(g, h, fragments))
            for f in reversed(fragments):
                self.stats["depth_cut"] += 1
                f["depth_cut"] = True
            queue.extend(reversed(fragments))
        return out

    def _walk_one(self, g: _Group, head: Event, fragments: list[Event]) -> Record:
        """One tree under ``head``; subtrees past ``max_depth`` go to ``fragments``."""
        ends, kids = g.ends, g.kids
        max_depth = self.limits.max_depth
        cl = head["clazz"]
        if cl not in (BEGIN, END):
            del head["clazz"]
            head["kind"] = cl
            return head
        order: list[Event] = []
        stack: list[tuple[Event, int]] = [(head, 0)]
        while stack:
            node, depth = stack.pop()
            eid = node["event"]
            end = ends.get(eid)
            if end is None:
                node["missing_end"] = True
                node.setdefault("status", UNKNOWN_STATUS)
            elif end is not node:
                _merge_end(node, end)
            else:  # an end standing in for its missing begin
                node.setdefault("status", UNKNOWN_STATUS)
                node.setdefault("duration", 0)
            del node["clazz"]
            node["kind"] = TRANSACTION
            order.append(node)
            ch = kids.get(eid) or []
            if len(ch) > 1:
                ch.sort(key=_TS)
            keep = []
            for c in ch:
                cl = c.get("clazz")
                if cl is None:  # already placed elsewhere: never place an event twice
                    continue
                if cl in (BEGIN, END):
                    if depth + 1 >= max_depth:
                        node["depth_cut"] = True
                        fragments.append(c)
                        continue
                    stack.append((c, depth + 1))
                else:
                    del c["clazz"]
                    c["kind"] = cl
                keep.append(c)
            node["children"] = keep
        # Completeness and open durations bottom-up (children come after parents in order).
        for node in reversed(order):
            ok = "missing_end" not in node and "missing_begin" not in node
            # A client may send "duration": null (kept as None): it counts as 0 here.
            last = node["timestamp"] + (node.get("duration") or 0)
            for c in node["children"]:
                if c["kind"] == TRANSACTION:
                    ok = ok and c["complete"]
                    last = max(last, c["timestamp"] + (c.get("duration") or 0))
                else:
                    last = max(last, c["timestamp"])
            node["complete"] = ok
            if "missing_end" in node:
                node["duration"] = last - node["timestamp"]
        return head


def _compact(root: Record) -> None:
    """Drop from the nodes below ``root`` the :data:`COMPACT_KEYS` fields equal to the
    root's (same type and value)."""
    children = root.get("children")
    if not children:
        return
    same = [(k, root[k]) for k in COMPACT_KEYS if k in root]
    if not same:
        return
    stack = list(children)
    while stack:
        node = stack.pop()
        for k, v in same:
            w = node.get(k, _MISSING)
            if w.__class__ is v.__class__ and w == v:
                del node[k]
        below = node.get("children")
        if below:
            stack.extend(below)


def _expect_kids(g: _Group, eid: str, expected: int) -> None:
    """An end said its transaction had ``expected`` direct children: wait while fewer are held."""
    counts = g.counts
    if counts is None:
        counts = g.counts = {}
    counts[eid] = expected
    if len(g.kids.get(eid, ())) < expected:
        g.short.add(eid)


def _count_kid(g: _Group, parent: str, held: int) -> None:
    """A child of a transaction still short of its count arrived (``held`` now)."""
    if held >= g.counts[parent]:  # type: ignore[index]  # short implies counts
        g.short.discard(parent)


def _counted(g: _Group) -> bool:
    """Whether every closed transaction of ``g`` said how many children it had (and, the
    caller checked, has them all): the tree is exactly complete, no settle time needed."""
    return g.counts is not None and len(g.counts) == len(g.ends)


def _flag_missing_children(g: _Group, short: dict[str, int]) -> None:
    """Mark each transaction short of children (``missing_children``: how many) and every
    transaction above it incomplete."""
    begins = g.begins
    for eid, missing in short.items():
        begins[eid]["missing_children"] = missing
        seen: set[str] = set()
        up: str = eid
        while up != ROOT_PARENT and up not in seen and up in begins:
            seen.add(up)
            node = begins[up]
            node["complete"] = False
            up = node["parent"]


def _json_size(e: Event) -> int:
    """An event's size as JSON (what it costs to hold, near enough); never raises."""
    try:
        return len(orjson.dumps(e))
    except TypeError:  # an odd value from a custom mapper, or an integer past 64 bits
        return len(repr(e))


def _digest(e: Event) -> bytes:
    """The whole event's content, in a canonical form (keys sorted); never raises."""
    try:
        return orjson.dumps(e, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an odd value from a custom mapper, or an integer past 64 bits
        return repr(sorted(e.items(), key=lambda kv: str(kv[0]))).encode()


def _seen_alike(g: _Group, key: tuple[Any, ...], first: Event, e: Event) -> bool:
    """Whether an event with the content of ``e`` was taken already among those sharing
    ``key`` (``first`` is the first of them); remembers ``e`` when not.

    One digest per event that shares its key with another: O(1) per event, whatever the
    frame (10,000 events sharing a key used to be compared pairwise: seconds per frame).
    """
    alike = g.alike
    if alike is None:
        alike = g.alike = {}
    digests = alike.get(key)
    if digests is None:
        digests = alike[key] = {_digest(first)}
    digest = _digest(e)
    if digest in digests:
        return True
    digests.add(digest)
    return False


def _merge_end(node: Event, end: Event) -> None:
    """Fold an end into its begin node (docs/design.md §3): name, msg, status, duration from the end."""
    for k in ("name", "msg", "status", "duration"):
        v = end.get(k)
        if v is not None:
            node[k] = v
    if not end.keys() <= node.keys():  # extra data that only the end carries survives
        for k, v in end.items():  # in the end's order, so the output is deterministic
            if k not in node:
                node[k] = v
    if "duration" not in node:
        node["duration"] = end["timestamp"] - node["timestamp"]
    if "status" not in node:
        node["status"] = UNKNOWN_STATUS


def _limits_dict(limits: BufferLimits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in BufferLimits.__dataclass_fields__}
