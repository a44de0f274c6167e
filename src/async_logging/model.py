"""The event model (docs/design.md §2): clazz names, defaults and the default mapper.

A log event is a plain ``dict`` at the wire boundary and inside the engine: building a
dataclass per event would cost more than all the rest of the per-event work (docs/design.md §7),
so events stay maps and this module owns the rules they must satisfy.

The default mapper normalises an event **in place** (the buffer owns the maps it is fed):

- ``clazz`` defaults to ``atomicEvent`` and must be one of :data:`CLAZZES`;
- ``uuid``, ``event`` and ``parent`` ids become strings (ints and integral floats accepted);
  ``parent`` defaults to ``"0"`` (top level); ``request`` repeats ``uuid``;
- ``type`` defaults to ``URL``; ``timestamp`` defaults to the time received and, like
  ``duration``, is coerced to whole milliseconds (numbers or numeric strings);
- ids, timestamps and durations outside their sane ranges (:data:`MAX_ID_LENGTH`,
  :data:`MIN_INT_ID`..:data:`MAX_INT_ID`, :data:`MIN_TIMESTAMP_MS`..:data:`MAX_TIMESTAMP_MS`,
  0..:data:`MAX_DURATION_MS`) are refused ``bad_id``, ``bad_timestamp``, ``bad_duration``:
  a timestamp of 10**30 would make a publisher that formats it as a date raise later;
- ``status`` numbers become strings (CAL: ``"0"`` is success);
- ``ip`` is copied to ``ipAddress``; ``tid`` defaults to ``<pid>-<last hex digit of md5(uuid)>``;
- every other key is kept as it is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Final

from .exceptions import InvalidEvent

__all__ = [
    "ATOMIC",
    "BEGIN",
    "CLAZZES",
    "END",
    "HEARTBEAT",
    "MAX_DURATION_MS",
    "MAX_ID_LENGTH",
    "MAX_INT_ID",
    "MAX_TIMESTAMP_MS",
    "MIN_INT_ID",
    "MIN_TIMESTAMP_MS",
    "REFUSAL_REASONS",
    "ROOT_PARENT",
    "Event",
    "Mapper",
    "RefusedEvent",
    "coerce_ms",
    "default_mapper",
    "map_events",
    "ms_in_range",
    "normalise_id",
    "tid_for",
]

Event = dict[str, Any]
#: A mapper turns one raw log map into a mapped event; it may mutate and return its argument.
Mapper = Callable[[Event], Event]

BEGIN: Final = "begin"
END: Final = "end"
ATOMIC: Final = "atomicEvent"
HEARTBEAT: Final = "heartbeat"
CLAZZES: Final = frozenset({BEGIN, END, ATOMIC, HEARTBEAT})
ROOT_PARENT: Final = "0"
DEFAULT_TYPE: Final = "URL"
#: How many uuid → tid digits are remembered (a bounded cache; older entries are recomputed).
TID_CACHE_SIZE: Final = 8192
#: Every reason the mapper refuses one event with (``bad_input{reason}``, exported at 0
#: from the start; docs/design.md §2).
REFUSAL_REASONS: Final = (
    "not_a_map",
    "unknown_clazz",
    "bad_id",
    "bad_timestamp",
    "bad_duration",
    "bad_status",
    "missing_uuid",
    "missing_event",
    "bad_child_count",
)

# Sane ranges, checked at the door (the native fast path declines outside them too). A value
# is checked as sent, before it is truncated to whole milliseconds.
#: Earliest ``timestamp`` (ms since the epoch): the epoch itself.
MIN_TIMESTAMP_MS: Final = 0
#: Latest ``timestamp``: the last millisecond of year 9999 (the last a ``datetime`` holds).
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
#: Longest ``duration`` (ms, from 0): the whole span of the timestamps, so that a timestamp
#: plus a duration stays an exact double (below 2**53: JavaScript readers) and far inside
#: 64 bits.
MAX_DURATION_MS: Final = MAX_TIMESTAMP_MS - MIN_TIMESTAMP_MS
#: Longest string id (``uuid``, ``event``, ``parent``), in characters: the engine remembers
#: ids of published trees, so they must stay small (a uuid is 36).
MAX_ID_LENGTH: Final = 256
#: Smallest integer id: what a signed 64-bit MessagePack integer holds.
MIN_INT_ID: Final = -(2**63)
#: Largest integer id: what an unsigned 64-bit MessagePack integer holds.
MAX_INT_ID: Final = 2**64 - 1


class RefusedEvent(dict[str, Any]):
    """Stands in for a log map refused alone before mapping (the wire decoder's
    ``array_too_long`` and ``record_too_big``): :func:`map_events` refuses it with
    :attr:`error` under the original index, so the events beside it are taken.

    Its content was dropped; it reads as ``{"clazz": reason}``, an unknown clazz, so that a
    copy (a custom mapper's, or a batch re-encoded into the spool) is still refused.

    Attributes:
        error: the refusal.
    """

    __slots__ = ("error",)

    def __init__(self, error: InvalidEvent) -> None:
        super().__init__(clazz=error.reason)
        self.error = error


def normalise_id(value: object, key: str) -> str | None:
    """Return ``value`` as an id string (``None`` stays ``None``).

    Raises:
        InvalidEvent: ``bad_id`` when the value is not a string of at most
            :data:`MAX_ID_LENGTH` characters, an integer from :data:`MIN_INT_ID` to
            :data:`MAX_INT_ID`, or an integral float in that range.
    """
    if type(value) is str:
        if len(value) <= MAX_ID_LENGTH:
            return value
        raise InvalidEvent(
            "bad_id", f"{key} of {len(value)} characters is over the limit of {MAX_ID_LENGTH}"
        )
    if value is None:
        return None
    if type(value) is int or (type(value) is float and math.isfinite(value) and value.is_integer()):
        if MIN_INT_ID <= value <= MAX_INT_ID:
            return str(int(value))
        raise InvalidEvent("bad_id", f"{key} {value!r:.40} is outside the 64-bit integer range")
    raise InvalidEvent(
        "bad_id", f"{key} must be a string or an integer, not {type(value).__name__}"
    )


def _number(value: object, key: str) -> int | float:
    """``value`` as a finite number (int, finite float or numeric string)."""
    t = type(value)
    if t is int:
        return value  # type: ignore[return-value]
    if t is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
    elif t is str:
        try:
            return int(value)  # type: ignore[call-overload, no-any-return]
        except ValueError:
            try:
                f = float(value)  # type: ignore[arg-type]
            except ValueError:
                pass
            else:
                if math.isfinite(f):
                    return f
    raise InvalidEvent(f"bad_{key}", f"{key} must be a number of milliseconds, not {value!r:.60}")


def coerce_ms(value: object, key: str) -> int:
    """Return ``value`` as whole milliseconds (int, finite float or numeric string).

    Raises:
        InvalidEvent: ``bad_<key>`` when the value is of another type or not a finite number.
    """
    return int(_number(value, key))


def ms_in_range(value: object, key: str, high: int, low: int = 0) -> int | float:
    """A number of milliseconds from ``low`` to ``high``, as sent: an int stays an int and
    a float keeps its fraction (microseconds); a numeric string becomes the number it
    spells.

    Raises:
        InvalidEvent: ``bad_<key>`` when the value is not a finite number, or is out of range.
    """
    number = _number(value, key)
    if not low <= number <= high:
        raise InvalidEvent(f"bad_{key}", f"{key} {value!r:.40} is outside {low}..{high}")
    return number


@lru_cache(maxsize=TID_CACHE_SIZE)
def _uuid_digit(uuid: str) -> str:
    return hashlib.md5(uuid.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[-1]


def tid_for(pid: object, uuid: str) -> str:
    """The seed's default thread id: ``<pid>-<last hex digit of md5(uuid)>``."""
    return f"{pid}-{_uuid_digit(uuid)}"


def default_mapper(event: Event, now_ms: int) -> Event:
    """Normalise one ``event`` in place following docs/design.md §2 and return it.

    Args:
        event: the raw log map (owned by the caller's buffer from now on).
        now_ms: the time received, used when the event has no ``timestamp``.

    Raises:
        InvalidEvent: naming the first thing wrong (``not_a_map``, ``unknown_clazz``,
            ``bad_id``, ``bad_timestamp``, ``bad_duration``, ``bad_status``,
            ``missing_uuid``, ``missing_event``), or the refusal a :class:`RefusedEvent`
            carries.
    """
    rejected: list[tuple[int, InvalidEvent]] = []
    mapped = map_events((event,), now_ms, rejected)
    if rejected:
        raise rejected[0][1]
    return mapped[0]


def map_events(
    events: Iterable[Any], now_ms: int, rejected: list[tuple[int, InvalidEvent]]
) -> list[Event]:
    """Normalise a batch of raw log maps in place (the rules of :func:`default_mapper`).

    One loop for the whole batch: this is the per-event hot path of the server.

    Returns:
        The valid events, in order; each refused one is appended to ``rejected`` as
        ``(index, error)`` instead.
    """
    out: list[Event] = []
    append = out.append
    last_tid: tuple[object, str, str] = (None, "", "")
    # Locals: the range checks run for every event.
    length, max_id, min_ts, max_ts, max_duration = (
        len,
        MAX_ID_LENGTH,
        MIN_TIMESTAMP_MS,
        MAX_TIMESTAMP_MS,
        MAX_DURATION_MS,
    )
    for i, e in enumerate(events):
        try:
            if e.__class__ is not dict:
                if e.__class__ is RefusedEvent:
                    raise e.error
                raise InvalidEvent("not_a_map", f"a log must be a map, not {type(e).__name__}")
            get = e.get
            clazz = get("clazz")
            if clazz is None:
                e["clazz"] = clazz = ATOMIC
            elif clazz.__class__ is not str or clazz not in CLAZZES:
                raise InvalidEvent(
                    "unknown_clazz",
                    f"clazz {clazz!r:.40} is not one of begin, end, atomicEvent, heartbeat",
                )
            uuid = get("uuid")
            if uuid is not None:
                if uuid.__class__ is not str or length(uuid) > max_id:
                    e["uuid"] = uuid = normalise_id(uuid, "uuid")
                if uuid:
                    e["request"] = uuid
                else:
                    uuid = None
            eid = get("event")
            if eid is not None and (eid.__class__ is not str or length(eid) > max_id):
                e["event"] = eid = normalise_id(eid, "event")
            parent = get("parent")
            if parent is None:
                e["parent"] = ROOT_PARENT
            elif parent.__class__ is not str or length(parent) > max_id:
                e["parent"] = normalise_id(parent, "parent")
            if clazz in (BEGIN, END):
                if uuid is None:
                    raise InvalidEvent("missing_uuid", f"a {clazz} needs a uuid")
                if not eid:
                    raise InvalidEvent("missing_event", f"a {clazz} needs an event id")
                if clazz == END:
                    count = get("childCount")
                    if count is not None and (count.__class__ is not int or count < 0):
                        raise InvalidEvent(
                            "bad_child_count",
                            f"childCount must be a non-negative integer, not {count!r:.40}",
                        )
            if "type" not in e:
                e["type"] = DEFAULT_TYPE
            ts = get("timestamp")
            if ts is None:
                e["timestamp"] = now_ms
            elif (ts.__class__ is not int and ts.__class__ is not float) or not (
                min_ts <= ts <= max_ts  # NaN fails it too: refused below
            ):
                e["timestamp"] = ms_in_range(ts, "timestamp", max_ts, min_ts)
            duration = get("duration")
            if duration is not None and (
                (duration.__class__ is not int and duration.__class__ is not float)
                or not 0 <= duration <= max_duration
            ):
                e["duration"] = ms_in_range(duration, "duration", max_duration)
            status = get("status")
            if status is not None and status.__class__ is not str:
                e["status"] = _status(status)
            if "ip" in e and "ipAddress" not in e:
                e["ipAddress"] = e["ip"]
            if uuid is not None and "tid" not in e:
                pid = get("pid")
                if pid is not None:
                    if last_tid[0] != pid or last_tid[1] != uuid:
                        last_tid = (pid, uuid, tid_for(pid, uuid))
                    e["tid"] = last_tid[2]
        except InvalidEvent as exc:
            rejected.append((i, exc))
            continue
        append(e)
    return out


def _status(status: object) -> str:
    if status.__class__ is int:
        return str(status)
    if isinstance(status, float) and math.isfinite(status) and status.is_integer():
        return str(int(status))
    raise InvalidEvent("bad_status", f"status must be a string or an integer, not {status!r:.40}")
