"""The default mapper: the seed's defaults and id normalisation (docs/design.md §2)."""

from __future__ import annotations

import hashlib

import pytest

from async_logging import InvalidEvent, default_mapper
from async_logging.model import coerce_ms, map_events, normalise_id, tid_for


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
