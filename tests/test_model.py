"""The default mapper: the seed's defaults and id normalisation (docs/design.md §2)."""

from __future__ import annotations

import hashlib

import pytest

from async_logging import InvalidEvent, default_mapper
from async_logging.model import (
    MAX_ID_LENGTH,
    MAX_INT_ID,
    MAX_TIMESTAMP_MS,
    MIN_INT_ID,
    RefusedEvent,
    coerce_ms,
    map_events,
    ms_in_range,
    normalise_id,
    tid_for,
)

#: A timestamp with microseconds, as a float of milliseconds.
T_FLOAT = 1_700_000.123


def test_seed_defaults_are_filled() -> None:
    """clazz atomicEvent, type URL, parent "0" and timestamp = time received."""
    e = default_mapper({}, 123)
    assert e == {"clazz": "atomicEvent", "type": "URL", "parent": "0", "timestamp": 123}


def test_uuid_is_stored_as_request_and_tid_derived_from_md5() -> None:
    """request repeats uuid; tid is <pid>-<last hex digit of md5(uuid)>."""
    e = default_mapper({"uuid": "abc", "pid": 42}, 0)
    digit = hashlib.md5(b"abc").hexdigest()[-1]
    assert e["request"] == "abc" and e["tid"] == f"42-{digit}"
    assert tid_for(42, "abc") == e["tid"]


def test_a_given_tid_and_request_are_kept() -> None:
    """The mapper only fills what is missing."""
    e = default_mapper({"uuid": "abc", "pid": 42, "tid": "t-1", "type": "API"}, 0)
    assert e["tid"] == "t-1" and e["type"] == "API"


def test_ip_is_copied_to_ip_address_unless_given() -> None:
    """ip is an alias of ipAddress."""
    assert default_mapper({"ip": "10.0.0.1"}, 0)["ipAddress"] == "10.0.0.1"
    assert default_mapper({"ip": "a", "ipAddress": "b"}, 0)["ipAddress"] == "b"


def test_ids_become_strings() -> None:
    """uuid, event and parent given as numbers come out as strings."""
    e = default_mapper({"uuid": 5, "event": 2, "parent": 1.0, "clazz": "begin"}, 0)
    assert (e["uuid"], e["event"], e["parent"]) == ("5", "2", "1")


def test_unknown_keys_survive_untouched() -> None:
    """Extra data must reach the sink as it was sent."""
    extra = {"payload": {"nested": [1, 2]}, "user": "ann", "rlogid": "x"}
    e = default_mapper(dict(extra), 0)
    assert {k: e[k] for k in extra} == extra


def test_empty_uuid_counts_as_none() -> None:
    """An empty uuid is no uuid: the event is stand-alone and gets no request."""
    assert "request" not in default_mapper({"uuid": ""}, 0)
    with pytest.raises(InvalidEvent, match="missing_uuid"):
        default_mapper({"uuid": "", "clazz": "begin", "event": "1"}, 0)


@pytest.mark.parametrize(
    ("value", "expected"), [(5, 5), (5.9, 5), ("17", 17), ("17.5", 17), ("-3", -3)]
)
def test_coerce_ms_accepts_numbers_and_numeric_strings(value: object, expected: int) -> None:
    """Timestamps and durations become whole milliseconds."""
    assert coerce_ms(value, "timestamp") == expected


@pytest.mark.parametrize("value", ["x", float("inf"), None, [1], True, "nan"])
def test_coerce_ms_refuses_the_rest(value: object) -> None:
    """Anything else is a bad_<key> refusal."""
    with pytest.raises(InvalidEvent) as info:
        coerce_ms(value, "duration")
    assert info.value.reason == "bad_duration"


@pytest.mark.parametrize("value", [1.5, True, [1], {"a": 1}, b"x"])
def test_normalise_id_refuses_non_ids(value: object) -> None:
    """Only strings, integers and integral floats are ids."""
    with pytest.raises(InvalidEvent) as info:
        normalise_id(value, "event")
    assert info.value.reason == "bad_id"


def test_map_events_reports_indices_and_keeps_going() -> None:
    """The batch mapper refuses bad items by index and maps the rest."""
    rejected: list = []
    out = map_events([{"a": 1}, 3, {"clazz": "x"}, {"b": 2}], 0, rejected)
    assert [e.get("a", e.get("b")) for e in out] == [1, 2]
    assert [(i, x.reason) for i, x in rejected] == [(1, "not_a_map"), (2, "unknown_clazz")]


@pytest.mark.parametrize(
    "value", ["u" * (MAX_ID_LENGTH + 1), MAX_INT_ID + 1, MIN_INT_ID - 1, 1e20, -1e19]
)
def test_normalise_id_refuses_ids_outside_their_ranges(value: object) -> None:
    """String ids longer than MAX_ID_LENGTH and integer ids past 64 bits are bad ids."""
    with pytest.raises(InvalidEvent) as info:
        normalise_id(value, "uuid")
    assert info.value.reason == "bad_id"


def test_normalise_id_takes_ids_at_the_bounds() -> None:
    """The bounds themselves are ids."""
    assert normalise_id("é" * MAX_ID_LENGTH, "event") == "é" * MAX_ID_LENGTH
    assert normalise_id(MAX_INT_ID, "event") == str(MAX_INT_ID)
    assert normalise_id(MIN_INT_ID, "event") == str(MIN_INT_ID)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (-0.0, -0.0),
        (MAX_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
        ("17.9", 17.9),
        (T_FLOAT, T_FLOAT),
    ],
)
def test_ms_in_range_takes_numbers_in_range_as_sent(value: object, expected: float) -> None:
    """Numbers (and numeric strings) from 0 to the bound come back as the number they are:
    a float keeps its microseconds."""
    got = ms_in_range(value, "timestamp", MAX_TIMESTAMP_MS)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value", [-1, -0.5, "-3", MAX_TIMESTAMP_MS + 0.5, 1e300, "x"])
def test_ms_in_range_refuses_what_is_outside_before_truncating(value: object) -> None:
    """-0.5 is refused (it is before 0 as sent, though it would truncate to 0)."""
    with pytest.raises(InvalidEvent) as info:
        ms_in_range(value, "duration", MAX_TIMESTAMP_MS)
    assert info.value.reason == "bad_duration"


def test_map_events_refuses_a_refused_event_with_its_own_error() -> None:
    """A RefusedEvent (the decoder's stand-in) is refused with the error it carries, under
    its index; the events beside it are mapped."""
    error = InvalidEvent("record_too_big", "too big")
    rejected: list = []
    out = map_events([{"a": 1}, RefusedEvent(error), {"b": 2}], 0, rejected)
    assert len(out) == 2 and rejected == [(1, error)]
