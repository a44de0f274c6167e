"""The client's sans-I/O core: events in, envelopes out, acks in (docs/design.md §6).

No asyncio, no sockets, no threads, no clock of its own: the sender thread feeds it what
the application enqueued, passes the time in, writes the envelopes it hands out and tells
it which were acknowledged. Everything that decides *what* is sent lives here, so it is
tested without a network (like ``h11`` or the ``websockets`` protocol objects).

What the application enqueues is an :class:`~async_logging.client.items.Item` (an event,
or the seed's raw log map, ``client.log(map)``, as a :data:`~async_logging.client.items.RAW`
item) or a :class:`~async_logging.client.items.Release` marker (the scope of a foreign uuid
ended: send what is held for it); :mod:`async_logging.client.items` makes them.

The core turns them into wire maps (docs/design.md §2 keys), holds the events of a uuid until its
root transaction ends (or a hold limit: ``ready_threshold`` events, ``hold_timeout``
seconds, the seed's ``readyThreshold``), so a whole tree travels in one frame and reaches
one server, and cuts what is ready into envelopes ``{"seq": n, "logs": [...]}`` of at most
``batch_size`` events, never splitting a tree that fits. Envelopes stay pending until
acknowledged; a lost connection puts the unacknowledged ones back in front, in ``seq``
order, to be resent (at-least-once: the server drops duplicates, docs/design.md §3).

Two optional hooks let the sender keep a spool without the core doing I/O: ``on_cut`` sees
every envelope as it is cut (before it can be sent), ``on_done`` every envelope
acknowledged or refused for good; :meth:`ClientCore.restore` queues an envelope read back
from a spool.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ..model import ATOMIC, END, HEARTBEAT
from .items import RAW, Item, Release

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_HOLD_TIMEOUT",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_QUEUE_BYTES",
    "DEFAULT_MAX_QUEUE_EVENTS",
    "DEFAULT_MAX_STRING_LENGTH",
    "DEFAULT_READY_THRESHOLD",
    "ClientCore",
    "CoreLimits",
    "Envelope",
    "Release",
    "plain",
]

DEFAULT_BATCH_SIZE: Final = 2000
#: Seed ``readyThreshold``: events held for one uuid before they are sent anyway.
DEFAULT_READY_THRESHOLD: Final = 1000
DEFAULT_HOLD_TIMEOUT: Final = 5.0
DEFAULT_MAX_IN_FLIGHT: Final = 32
DEFAULT_MAX_QUEUE_EVENTS: Final = 200_000
DEFAULT_MAX_QUEUE_BYTES: Final = 64 * 1024 * 1024
#: A quarter of the server's 4 MiB message limit (docs/design.md §4), so a frame is never refused
#: for its size; a single event larger than this is refused by the client.
DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024
#: The server refuses frames with more events (``wire.DEFAULT_MAX_EVENTS_PER_FRAME``).
SERVER_MAX_EVENTS_PER_FRAME: Final = 10_000
#: The server refuses a frame holding a longer string (``wire.DEFAULT_MAX_STRING_LENGTH``):
#: messages and string values of extra data (tracebacks too) are cut to this many characters.
DEFAULT_MAX_STRING_LENGTH: Final = 64 * 1024
#: First guess of an encoded event's size, refined by every envelope encoded.
INITIAL_EVENT_BYTES: Final = 200

#: Keys of an event that the extra data cannot override (they come from explicit arguments).
RESERVED_KEYS: Final = frozenset({"clazz", "uuid", "event", "parent"})
_PLAIN_TYPES: Final = frozenset({str, int, float, bool, type(None)})
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class CoreLimits:
    """Batching, holding and memory limits of a client; each is a named, overridable limit.

    Attributes:
        batch_size: most events in one envelope (a tree that fits is never split).
        ready_threshold: events held for one uuid before they are sent without waiting
            for the root to end (the seed's ``readyThreshold``).
        hold_timeout: seconds the events of one uuid are held at most.
        max_in_flight: envelopes written but not acknowledged before sending pauses.
        max_queue_events: events queued at most (enqueued, held, batched or unacknowledged);
            past it new events are dropped and counted.
        max_queue_bytes: estimated bytes queued at most; same treatment.
        max_frame_bytes: largest encoded envelope; bigger ones are split, and a single
            event bigger than this is refused (counted in ``rejected``).
        max_string_length: longest message, or string value of extra data, sent; longer
            ones are cut (a traceback keeps its end, ``items.cut_traceback``).

    Raises:
        UsageError: when a limit is not positive.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    ready_threshold: int = DEFAULT_READY_THRESHOLD
    hold_timeout: float = DEFAULT_HOLD_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_queue_events: int = DEFAULT_MAX_QUEUE_EVENTS
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH

    def __post_init__(self) -> None:
        from ..exceptions import UsageError

        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive number, not {value!r}")
        if self.batch_size > SERVER_MAX_EVENTS_PER_FRAME:
            raise UsageError(f"batch_size must be <= {SERVER_MAX_EVENTS_PER_FRAME}")


@dataclass(slots=True)
class Envelope:
    """One frame: ``{"seq": seq, "logs": [...]}`` encoded as MessagePack.

    Attributes:
        seq: the envelope's sequence number (the server acks it).
        payload: the encoded bytes, written as they are on every (re)send.
        count: how many events it holds.
        sends: how many times it was written to a connection.
        spooled_at: its position in the client's spool (``0``: not spooled).
    """

    seq: int
    payload: bytes
    count: int
    sends: int = 0
    spooled_at: int = 0


class _Stored(msgspec.Struct):
    """An envelope read back from a spool: its events kept as raw MessagePack."""

    logs: msgspec.Raw


def plain(value: Any) -> Any:
    """``value`` with everything the server would refuse turned into strings.

    MessagePack extension types (datetimes), binary strings, sets and arbitrary objects
    are refused or lost by the proxy, so extra data is reduced to maps, arrays, strings,
    numbers, booleans and nil; anything else becomes its ``str()``.
    """
    t = value.__class__
    if t is int:
        return value if _INT_MIN <= value <= _INT_MAX else str(value)
    if t is float:
        return value if math.isfinite(value) else str(value)
    if t in _PLAIN_TYPES:
        return value
    if t is dict:
        return {k if k.__class__ is str else str(k): plain(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [plain(v) for v in value]
    return str(value)


class _Wire(msgspec.Struct, omit_defaults=True, gc=False):
    """An event on the wire without extra data: encodes as a map, ``None`` fields left out.

    Cheaper to build than a dict and not tracked by the garbage collector (it only holds
    strings and numbers), which matters at hundreds of thousands of events per second.
    ``timestamp`` and ``duration`` are milliseconds with microseconds (floats).
    """

    clazz: str
    parent: Any
    timestamp: float
    pid: int
    machine: str
    type: Any = None
    name: Any = None
    level: Any = None
    msg: Any = None
    status: Any = None
    duration: Any = None
    uuid: Any = None
    event: Any = None
    childCount: Any = None


def _cut_text(msg: Any, max_len: int) -> str:
    text = msg if msg.__class__ is str else str(msg)
    return text if len(text) <= max_len else text[:max_len]


def _wire_dict(
    it: Item, msg: Any, data: dict[str, Any], pid: int, machine: str, *, max_str: int
) -> dict[str, Any]:
    """The wire map of an item that carries extra data (string values cut to ``max_str``)."""
    e: dict[str, Any] = {
        "clazz": it.clazz,
        "parent": it.parent,
        "timestamp": it.timestamp // 1000 / 1000,
        "pid": pid,
        "machine": machine,
    }
    for k, v in data.items():
        if k not in RESERVED_KEYS:
            if v.__class__ is str:
                # A longer string would make the server refuse the frame.
                value = v if len(v) <= max_str else v[:max_str]
            else:
                value = v if v.__class__ in _PLAIN_TYPES else plain(v)
            e[k if k.__class__ is str else str(k)] = value
    # Explicit arguments win over extra data of the same name, except where only the
    # data says it (an event's ``status=`` or ``duration=``).
    for k, v in (
        ("type", it.type),
        ("name", it.name),
        ("level", it.level),
        ("msg", msg),
        ("status", it.status),
        ("duration", it.duration),
    ):
        if v is not None:
            e[k] = v
    if it.uuid is not None:
        e["uuid"] = it.uuid
        e["event"] = it.event
    if it.child_count is not None:
        e["childCount"] = it.child_count
    return e


def _is_root(parent: Any) -> bool:
    return parent is None or parent in (0, "0")


class _Held:
    """The events of one uuid waiting for their root transaction to end."""

    __slots__ = ("events", "since")

    def __init__(self, since: float) -> None:
        self.events: list[Any] = []
        self.since = since


class ClientCore:
    """Holds, batches, numbers and tracks the client's events (no I/O).

    Args:
        pid: stamped on every event (docs/design.md §2 ``pid``).
        machine: stamped on every event (docs/design.md §2 ``machine``).
        limits: batching, holding and memory limits.
        encode: encodes an envelope map to bytes (default: MessagePack via msgspec).
        on_cut: called with every envelope as it is cut, before it can be sent (the
            sender spools it there).
        on_done: called with every envelope acknowledged or refused for good (it will
            never be sent again).

    The sender thread calls, in a loop: :meth:`feed` with what it drained from the
    application's queue, :meth:`tick` with the time, then :meth:`next_to_send` until it
    returns ``None``, writing each envelope; and :meth:`ack`, :meth:`refuse` and
    :meth:`connection_lost` as the transport reports them.
    """

    def __init__(
        self,
        *,
        pid: int,
        machine: str,
        limits: CoreLimits | None = None,
        encode: Callable[[Any], bytes] | None = None,
        on_cut: Callable[[Envelope], None] | None = None,
        on_done: Callable[[Envelope], None] | None = None,
    ) -> None:
        self.pid = pid
        self.on_cut = on_cut
        self.on_done = on_done
        self.machine = machine
        self.limits = limits or CoreLimits()
        self._encode = encode or msgspec.msgpack.Encoder().encode
        self._held: dict[str, _Held] = {}
        self._held_events = 0
        #: Ready chunks (a whole tree, or a run of stand-alone events), in order.
        self._outbox: list[list[Any]] = []
        self._standalone: list[Any] = []
        self._outbox_events = 0
        self._unsent: deque[Envelope] = deque()
        self._in_flight: dict[int, Envelope] = {}
        self._envelope_events = 0
        self._envelope_bytes = 0
        self._seq = 0
        self.event_bytes = float(INITIAL_EVENT_BYTES)
        # Counters (read by other threads for ``stats``; written only by the sender).
        self.fed = 0
        self.sent = 0
        self.resent = 0
        self.acked = 0
        self.rejected = 0
        self.frames_sent = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ in

    def feed(self, items: Iterable[Any], now: float) -> list[Any]:
        """Take what the application enqueued.

        Args:
            items: :class:`~async_logging.client.items.Item` and :class:`Release`, in order.
            now: the current monotonic time in seconds (starts the hold clock).

        Returns:
            The items it does not know (the sender's own markers), in order.
        """
        held = self._held
        standalone = self._standalone
        pid = self.pid
        machine = self.machine
        max_str = self.limits.max_string_length
        ready = self.limits.ready_threshold
        wire = _Wire
        other: list[Any] = []
        fed = 0
        added = 0
        # One flat loop: this is the sender's per-event hot path (docs/design.md §7). Items use
        # exact int 0 for the root parent and the model's string constants, so identity
        # tests are enough for them.
        for it in items:
            cls = it.__class__
            e: Any
            if cls is Item:
                clazz = it.clazz
                data = it.data
                if clazz is RAW:
                    assert data is not None  # make_item gives every RAW item its map
                    e = {k if k.__class__ is str else str(k): plain(v) for k, v in data.items()}
                    e.setdefault("pid", pid)
                    e.setdefault("machine", machine)
                    clazz = e.get("clazz", ATOMIC)
                    uuid = e.get("uuid")
                    if uuid is not None and uuid.__class__ is not str:
                        uuid = str(uuid)
                    parent = e.get("parent")
                    fed += 1
                    if not uuid or (clazz in (ATOMIC, HEARTBEAT) and _is_root(parent)):
                        standalone.append(e)
                        continue
                    root_end = clazz == END and _is_root(parent)
                else:
                    uuid = it.uuid
                    parent = it.parent
                    msg = it.msg
                    if msg is not None and (msg.__class__ is not str or len(msg) > max_str):
                        msg = _cut_text(msg, max_str)
                    if data is None:
                        e = wire(
                            clazz,
                            parent,
                            it.timestamp // 1000 / 1000,  # items.wire_ms(), without the call
                            pid,
                            machine,
                            it.type,
                            it.name,
                            it.level,
                            msg,
                            it.status,
                            it.duration,
                            uuid,
                            it.event,
                            it.child_count,
                        )
                    else:
                        e = _wire_dict(it, msg, data, pid, machine, max_str=max_str)
                    fed += 1
                    if uuid is None or (parent == 0 and (clazz is ATOMIC or clazz is HEARTBEAT)):
                        standalone.append(e)
                        continue
                    root_end = clazz is END and parent == 0
            elif cls is Release:
                g = held.pop(it.uuid, None)
                if g is not None:
                    self._release(g)
                continue
            else:
                other.append(it)
                continue
            g = held.get(uuid)
            if g is None:
                g = held[uuid] = _Held(now)
            events = g.events
            events.append(e)
            added += 1
            if root_end or len(events) >= ready:
                del held[uuid]
                self._release(g)
        self._held_events += added
        if standalone:
            self._outbox.append(standalone)
            self._outbox_events += len(standalone)
            self._standalone = []
        self.fed += fed
        return other

    def _release(self, g: _Held) -> None:
        n = len(g.events)
        self._held_events -= n
        self._outbox.append(g.events)
        self._outbox_events += n

    def tick(self, now: float) -> None:
        """Release the holds older than ``hold_timeout`` and cut envelopes of all that is ready.

        Called on every drain (size-triggered or on the drain interval): stand-alone events
        therefore wait at most one drain interval.
        """
        held = self._held
        if held:
            limit = now - self.limits.hold_timeout
            expired: list[str] = []
            for uuid, g in held.items():
                if g.since > limit:
                    break  # insertion order is age order
                expired.append(uuid)
            for uuid in expired:
                self._release(held.pop(uuid))
        if self._outbox:
            self._cut()

    def flush_all(self) -> int:
        """Release everything held, cut it into envelopes; return the last ``seq`` assigned."""
        for g in self._held.values():
            self._release(g)
        self._held.clear()
        if self._outbox:
            self._cut()
        return self._seq

    # ------------------------------------------------------------------ batching

    def _cut(self) -> None:
        size = self.limits.batch_size
        batch: list[Any] = []
        for chunk in self._outbox:
            if batch and len(batch) + len(chunk) > size:
                self._envelope(batch)
                batch = []
            if len(chunk) > size:
                # A tree bigger than a batch: split it (it goes over one connection, in
                # order, so the same server still reassembles it).
                for i in range(0, len(chunk), size):
                    part = chunk[i : i + size]
                    if len(part) == size:
                        self._envelope(part)
                    else:
                        batch = part
            else:
                batch.extend(chunk)
        if batch:
            self._envelope(batch)
        self._outbox = []
        self._outbox_events = 0

    def _envelope(self, events: list[Any]) -> None:
        self._seq += 1
        seq = self._seq
        payload = self._encode({"seq": seq, "logs": events})
        n = len(events)
        if len(payload) > self.limits.max_frame_bytes:
            if n > 1:
                self._seq -= 1
                half = n // 2
                self._envelope(events[:half])
                self._envelope(events[half:])
                return
            self.rejected += 1  # one event over the frame limit: the server would refuse it
            return
        self.event_bytes = 0.9 * self.event_bytes + 0.1 * (len(payload) / n)
        env = Envelope(seq, payload, n)
        self._unsent.append(env)
        self._envelope_events += n
        self._envelope_bytes += len(payload)
        if self.on_cut is not None:
            self.on_cut(env)

    def restore(self, payload: bytes, count: int, spooled_at: int) -> Envelope:
        """Queue an envelope read back from a spool, under a new ``seq``.

        Args:
            payload: the envelope as it was sent once (``{"seq": …, "logs": [...]}``).
            count: how many events it holds.
            spooled_at: its position in this client's spool.

        Raises:
            msgspec.DecodeError: ``payload`` is not an envelope.
        """
        logs = msgspec.msgpack.decode(payload, type=_Stored).logs
        self._seq += 1
        data = msgspec.msgpack.encode({"seq": self._seq, "logs": logs})
        env = Envelope(self._seq, data, count, spooled_at=spooled_at)
        self._unsent.append(env)
        self._envelope_events += count
        self._envelope_bytes += len(data)
        return env

    # ------------------------------------------------------------------ out

    def next_to_send(self) -> Envelope | None:
        """The next envelope to write, marked in flight; ``None`` if none or the window is full."""
        if not self._unsent or len(self._in_flight) >= self.limits.max_in_flight:
            return None
        env = self._unsent.popleft()
        self._in_flight[env.seq] = env
        env.sends += 1
        self.sent += env.count
        if env.sends > 1:
            self.resent += env.count
        self.frames_sent += 1
        self.bytes_sent += len(env.payload)
        return env

    def ack(self, seq: int, rejected: int = 0) -> bool:
        """The server took envelope ``seq`` (``rejected`` of its events refused).

        Returns:
            Whether ``seq`` was pending (a late ack of a resent envelope is ignored).
        """
        env = self._in_flight.pop(seq, None)
        if env is None:
            env = self._take_unsent(seq)
            if env is None:
                return False
        self._forget(env)
        rejected = min(max(rejected, 0), env.count)
        self.acked += env.count - rejected
        self.rejected += rejected
        return True

    def refuse(self, seq: int, *, splittable: bool = True) -> bool:
        """The server refused envelope ``seq`` as a whole (a bad frame).

        A frame of several events is split in two and both halves are queued in front
        (one bad event must not take its batch down with it); a single event is dropped
        and counted in :attr:`rejected`.

        Returns:
            Whether ``seq`` was pending.
        """
        env = self._in_flight.pop(seq, None) or self._take_unsent(seq)
        if env is None:
            return False
        self._forget(env)
        if splittable and env.count > 1:
            try:
                logs = msgspec.msgpack.decode(env.payload)["logs"]
            except (msgspec.DecodeError, KeyError, TypeError):
                self.rejected += env.count
                return True
            # Put the halves in front (no duplication: the refused frame was not taken).
            before = len(self._unsent)
            half = len(logs) // 2
            self._envelope(logs[:half])
            self._envelope(logs[half:])
            added = [self._unsent.pop() for _ in range(len(self._unsent) - before)]
            self._unsent.extendleft(added)
            return True
        self.rejected += env.count
        return True

    def connection_lost(self) -> int:
        """Put every in-flight envelope back in front of the queue, in ``seq`` order.

        Returns:
            How many envelopes will be resent.
        """
        if not self._in_flight:
            return 0
        back = sorted(self._in_flight.values(), key=lambda e: e.seq)
        self._in_flight.clear()
        self._unsent.extendleft(reversed(back))
        return len(back)

    def envelopes(self) -> list[Envelope]:
        """The envelopes not yet acknowledged (in flight, then unsent)."""
        return [*self._in_flight.values(), *self._unsent]

    def abandon(self) -> int:
        """Forget everything still queued (the client is closing); return how many events."""
        lost = self._held_events + self._outbox_events + len(self._standalone)
        lost += self._envelope_events
        self._held.clear()
        self._outbox = []
        self._standalone = []
        self._unsent.clear()
        self._in_flight.clear()
        self._held_events = self._outbox_events = 0
        self._envelope_events = self._envelope_bytes = 0
        return lost

    def _take_unsent(self, seq: int) -> Envelope | None:
        for i, env in enumerate(self._unsent):
            if env.seq == seq:
                del self._unsent[i]
                return env
        return None

    def _forget(self, env: Envelope) -> None:
        self._envelope_events -= env.count
        self._envelope_bytes -= len(env.payload)
        if self.on_done is not None:
            self.on_done(env)

    # ------------------------------------------------------------------ state

    @property
    def pending_events(self) -> int:
        """Events fed and not yet acknowledged (held, batched, unsent or in flight)."""
        return self._held_events + self._outbox_events + self._envelope_events

    @property
    def pending_bytes(self) -> int:
        """Estimated bytes of :attr:`pending_events` (exact for encoded envelopes)."""
        return int((self._held_events + self._outbox_events) * self.event_bytes) + (
            self._envelope_bytes
        )

    @property
    def in_flight(self) -> int:
        """Envelopes written and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def has_unsent(self) -> bool:
        """Whether an envelope is waiting to be written."""
        return bool(self._unsent)

    @property
    def held_uuids(self) -> int:
        """How many uuids have events held."""
        return len(self._held)

    def room(self) -> int:
        """How many more events may be enqueued before the limits are reached."""
        limits = self.limits
        by_events = limits.max_queue_events - self.pending_events
        by_bytes = (limits.max_queue_bytes - self.pending_bytes) / self.event_bytes
        return max(0, min(by_events, int(by_bytes)))

    def settled(self, seq: int, *, spooled: bool = False) -> bool:
        """Whether every envelope up to ``seq`` was acknowledged (or refused).

        With ``spooled``, an envelope written to the spool counts as settled too.
        """
        # A split refused envelope jumps the queue with higher numbers: scan, do not peek.
        if spooled:
            return not any(
                e.seq <= seq and not e.spooled_at
                for e in (*self._in_flight.values(), *self._unsent)
            )
        return not any(s <= seq for s in self._in_flight) and not any(
            e.seq <= seq for e in self._unsent
        )
