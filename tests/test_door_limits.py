"""Refusals at the door (docs/design.md §2 and §10), in the reference and the native path.

- ``max_array_length`` and ``max_record_bytes`` refuse **one event** (``array_too_long``,
  ``record_too_big``): the decoder leaves a :class:`~async_logging.model.RefusedEvent` at its
  index, the engine refuses it and counts it, and the events beside it are taken. A frame of
  nils (1 byte each in MessagePack, ``null,`` in JSON) never becomes a record over the limit.
- Ids, timestamps and durations outside their sane ranges are refused ``bad_id``,
  ``bad_timestamp``, ``bad_duration`` by the mapper, and the native path declines the frame
  (it must never publish what the reference refuses); values at the bounds are taken by both,
  with the same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import aiohttp
import msgpack
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from async_logging import LogBuffer, wire
from async_logging.buffer import Fed
from async_logging.encoded import NATIVE
from async_logging.exceptions import InvalidEvent
from async_logging.model import (
    MAX_DURATION_MS,
    MAX_ID_LENGTH,
    MAX_INT_ID,
    MAX_TIMESTAMP_MS,
    MIN_INT_ID,
    RefusedEvent,
    default_mapper,
)
from async_logging.publishers.jsonl import LineEncoder
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from async_logging.wire import DEFAULT_LIMITS, RECORD_EXPANSION, WireLimits
from conftest import TIMEOUT
from test_server import answer, connect, wait_for

T0: Final = 1_700_000_000_000
GOOD: Final = {"msg": "good", "timestamp": T0}
MIB: Final = 1024 * 1024

needs_native = pytest.mark.skipif(not NATIVE, reason="the native fast path is not built here")


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def clock() -> int:
    return T0


def lines(records: Any) -> bytes:
    """The JSON lines a JSON-lines sink writes for ``records``."""
    parts, _ = LineEncoder().encode(records)
    return b"".join(parts)


def reference(
    payload: bytes, limits: WireLimits = DEFAULT_LIMITS, *, text: bool = False
) -> tuple[LogBuffer, Fed]:
    """Decode and feed by the reference path; the engine and what it gave."""
    frame = wire.decode_json(payload, limits) if text else wire.decode_msgpack(payload, limits)
    buf = LogBuffer(clock=clock, native=False)
    return buf, buf.feed_many(frame.logs)


def refusals(fed: Fed) -> list[tuple[int, str]]:
    return [(i, exc.reason) for i, exc in fed.rejected]


def native_takes(payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> bool:
    """Whether the native path takes ``payload``; when it does, its lines are the reference's."""
    fed = LogBuffer(clock=clock).feed_msgpack(payload, limits)
    if fed is None:
        return False
    _, ref = reference(payload, limits)
    assert not ref.rejected
    assert lines(fed.records) == lines(ref.records)
    return True


# --------------------------------------------------------------------------- record size


def four_mib_of_nils() -> bytes:
    """A good event, then one event holding 4.18 million nils in arrays of 10,000 (each
    within max_array_length): a 4 MiB frame whose second event is 21 MB as JSON."""
    nils = [[None] * wire.DEFAULT_MAX_ARRAY_LENGTH for _ in range(418)]
    payload = msgpack.packb({"seq": 9, "logs": [GOOD, {"data": nils}]})
    assert 4_000_000 < len(payload) <= wire.DEFAULT_MAX_MESSAGE_BYTES
    return payload


def test_a_4_mib_frame_of_nils_is_refused_record_too_big_beside_a_good_event() -> None:
    """The event of nils is refused alone (index 1, record_too_big, counted); the good event
    beside it is published; the native path declines the frame."""
    payload = four_mib_of_nils()
    buf, fed = reference(payload)
    assert refusals(fed) == [(1, "record_too_big")]
    assert "20900846 bytes" in fed.rejected[0][1].detail
    assert [r["msg"] for r in fed.records] == ["good"]
    assert buf.rejected == {"record_too_big": 1} and buf.stats["events"] == 1
    if NATIVE:
        assert LogBuffer(clock=clock).prepare_msgpack(payload) is None


async def test_the_server_answers_and_counts_a_record_too_big(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Over a WebSocket the 4 MiB frame of nils is acked with its one refusal listed by index;
    the good event is published and the refusal counted under its reason."""
    ws = await connect(session, server)
    await ws.send_bytes(four_mib_of_nils())
    ans = await answer(ws)
    assert (ans["ack"], ans["error"], ans["rejected_count"]) == (9, "invalid_events", 1)
    assert [(r["index"], r["error"]) for r in ans["rejected"]] == [(1, "record_too_big")]
    await wait_for(publisher, lambda p: any(r.get("msg") == "good" for r in p.records))
    await ws.close()
    assert server.snapshot()["bad_input"] == {"record_too_big": 1}
    assert not any("data" in r for r in publisher.records)


def test_a_4_mib_array_of_nils_is_refused_array_too_long() -> None:
    """One array of 4 million nils: the event is refused array_too_long (its content is not
    walked), the good one beside it taken; the native path declines."""
    payload = msgpack.packb([GOOD, {"data": [None] * (4 * MIB - 100)}])
    assert len(payload) <= wire.DEFAULT_MAX_MESSAGE_BYTES
    _, fed = reference(payload)
    assert refusals(fed) == [(1, "array_too_long")]
    assert len(fed.records) == 1
    if NATIVE:
        assert LogBuffer(clock=clock).prepare_msgpack(payload) is None


LONG_ARRAYS: Final = [
    {"x": [1, 2, 3, 4]},
    {"x": {"y": [[1], [1, 2, 3, 4]]}},
    {"x": [[[[[[[[1, 2, 3, 4]]]]]]]]},  # deeper than the typed decoder's unrolled levels
    {"msg": "long arrays sit anywhere", "tags": ["a", "b", "c", "d", "e"]},
]


@pytest.mark.parametrize("text", [False, True], ids=["msgpack", "json"])
@pytest.mark.parametrize("event", LONG_ARRAYS)
def test_an_array_past_max_array_length_refuses_its_event_alone(
    event: dict[str, Any], text: bool
) -> None:
    """An array of 4 items with max_array_length 3, at any depth, refuses its event; arrays
    of 3 are taken; the native path declines the frame and takes the one without it."""
    limits = WireLimits(max_array_length=3)
    at_limit = {"x": [1, 2, 3], "y": {"z": [[1, 2, 3]]}}
    logs = [GOOD, event, at_limit]
    payload = orjson.dumps(logs) if text else msgpack.packb(logs)
    _, fed = reference(payload, limits, text=text)
    assert refusals(fed) == [(1, "array_too_long")]
    assert [r.get("msg") for r in fed.records] == ["good", None]
    if NATIVE and not text:
        assert LogBuffer(clock=clock).prepare_msgpack(payload, limits) is None
        assert native_takes(msgpack.packb([GOOD, at_limit]), limits)


nested_nils = st.recursive(st.none(), lambda inner: st.lists(inner, max_size=12), max_leaves=120)


def longest_array(value: Any) -> int:
    if type(value) is not list:
        return 0
    return max([len(value), *map(longest_array, value)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(
    nils=nested_nils,
    max_record=st.integers(8, 2000),
    max_array=st.integers(1, 16),
    text=st.booleans(),
)
def test_nested_arrays_of_nils_never_make_a_record_over_the_limit(
    nils: Any, max_record: int, max_array: int, text: bool
) -> None:
    """Decoding and feeding an event of nested arrays of nils (MessagePack or JSON) never
    publishes it bigger than max_record_bytes: it is refused array_too_long exactly when an
    array is too long, else record_too_big exactly when its JSON is over the limit, else
    published whole; the good event beside it is always taken, and the native path either
    declines or publishes the reference's bytes."""
    limits = WireLimits(max_record_bytes=max_record, max_array_length=max_array)
    event = {"data": nils}
    logs = [GOOD, event]
    payload = orjson.dumps(logs) if text else msgpack.packb(logs)
    _, fed = reference(payload, limits, text=text)
    size = len(orjson.dumps(event))
    good_size = len(orjson.dumps(GOOD))
    if longest_array(nils) > max_array:
        expected = [(1, "array_too_long")]
    elif size > max_record:
        expected = [(1, "record_too_big")]
    else:
        expected = []
    if good_size > max_record:
        expected.insert(0, (0, "record_too_big"))
    assert refusals(fed) == expected
    for record in fed.records:  # the log map as it came (the mapper's keys aside), measured
        logged = {k: record[k] for k in (event if "data" in record else GOOD)}
        assert len(orjson.dumps(logged)) <= max_record
    if NATIVE and not text:
        native_takes(payload, limits)


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.text(st.sampled_from('\x00\x01\x1f"\\é'), max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values, single_float=st.booleans())
def test_no_payload_byte_grows_past_record_expansion(value: Any, single_float: bool) -> None:
    """Any MessagePack value (packed minimally, or with 4-byte floats) is at most
    RECORD_EXPANSION times its bytes once written as JSON, and so is its JSON text: the
    bound that lets the decoder skip measuring payloads under max_record_bytes / 6."""
    try:
        packed = msgpack.packb(value, use_single_float=single_float)
    except OverflowError:  # a float past float32's range
        assume(False)
    decoded = msgspec.msgpack.decode(packed)
    assert len(orjson.dumps(decoded)) <= RECORD_EXPANSION * len(packed)
    text = orjson.dumps(value)
    assert len(orjson.dumps(msgspec.json.decode(text))) <= RECORD_EXPANSION * len(text)


@pytest.mark.parametrize(
    "text", [b"[false]", b'["\\u0001"]', b"[1e15,9e15]", b"[1E+15]", b'{"":false}', b"[0e0]"]
)
def test_json_text_that_grows_stays_within_record_expansion(text: bytes) -> None:
    """JSON text that grows when rewritten (exponents written out, escapes kept) stays
    within the bound too."""
    assert len(orjson.dumps(msgspec.json.decode(text))) <= RECORD_EXPANSION * len(text)


def test_record_expansion_is_reached_by_false_and_control_characters() -> None:
    """The bound is tight: arrays of false and strings of control characters come close to
    six bytes of JSON per byte of MessagePack."""
    for value in ([False] * 10_000, "\x01" * 10_000):
        assert len(orjson.dumps(value)) > (RECORD_EXPANSION - 0.01) * len(msgpack.packb(value))


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_the_itemised_size_is_the_json_size(value: Any) -> None:
    """What the decoder counts item by item where orjson cannot write the log map whole
    (integers past 64 bits, nesting past 254 levels) is its exact compact JSON size."""
    try:
        expected = len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # an int past 64 bits: the standard library writes it
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        expected = len(text.encode("utf-8", "surrogatepass"))
        expected -= sum(len(json.dumps(f)) - len(orjson.dumps(f)) for f in floats_in(value))
    assert wire._json_size(value) == expected


def floats_in(value: Any) -> list[float]:
    if type(value) is float:
        return [value]
    items = value.values() if type(value) is dict else value if type(value) is list else []
    return [f for item in items for f in floats_in(item)]


def test_log_maps_orjson_cannot_write_are_measured_item_by_item() -> None:
    """An integer past 64 bits (JSON only) or nesting past orjson's 254 levels does not stop
    the measure: the event over the limit is refused, the one under taken."""
    big = 10**40  # 41 characters
    limits = WireLimits(max_record_bytes=60)
    payload = orjson.dumps([GOOD, {"x": "0" * 9}]).replace(b'"000000000"', str(big).encode())
    _, fed = reference(payload, limits, text=True)
    assert refusals(fed) == []
    payload = payload.replace(str(big).encode(), str(big * 10**20).encode())
    _, fed = reference(payload, limits, text=True)
    assert refusals(fed) == [(1, "record_too_big")]
    deep: Any = None
    for _ in range(300):
        deep = [deep]
    limits = WireLimits(max_depth=400, max_record_bytes=700)
    _, fed = reference(msgpack.packb([GOOD, {"d": deep}, {"d": [deep, deep]}]), limits)
    assert refusals(fed) == [(2, "record_too_big")]  # 609 bytes and 1,210


def test_a_form_event_too_big_is_refused_alone() -> None:
    """A bracket-encoded form (the Node transport) gets the same per-event refusal."""
    limits = WireLimits(max_record_bytes=60)
    body = b"logs[0][msg]=ok&logs[1][msg]=" + b"%01" * 20 + b"&logs[2][msg]=fine"
    frame = wire.decode_form(body, limits)
    assert isinstance(frame.logs[1], RefusedEvent)
    fed = LogBuffer(clock=clock, native=False).feed_many(frame.logs)
    assert refusals(fed) == [(1, "record_too_big")]  # 20 control characters: 129 bytes
    assert [r["msg"] for r in fed.records] == ["ok", "fine"]


def test_a_refused_event_stays_refused_when_re_encoded_or_copied() -> None:
    """The stand-in survives what may happen to a batch before the engine: re-encoded into
    the spool and decoded again, or copied by a custom mapper, it is still refused (as an
    unknown clazz); a mapper that keeps it keeps its reason."""
    limits = WireLimits(max_array_length=1)
    frame = wire.decode_msgpack(msgpack.packb([GOOD, {"x": [1, 2]}]), limits)
    again = wire.decode_msgpack(msgspec.msgpack.encode(frame.logs), limits)
    fed = LogBuffer(clock=clock, native=False).feed_many(again.logs)
    assert refusals(fed) == [(1, "unknown_clazz")] and len(fed.records) == 1
    for mapper, reason in ((dict, "unknown_clazz"), (lambda e: e, "array_too_long")):
        frame = wire.decode_msgpack(msgpack.packb([GOOD, {"x": [1, 2]}]), limits)
        fed = LogBuffer(mapper, clock=clock).feed_many(frame.logs)
        assert refusals(fed) == [(1, reason)] and len(fed.records) == 1


@pytest.mark.parametrize("server_options", [{"max_array_length": 2, "max_record_bytes": 1000}])
async def test_server_options_set_the_per_event_limits(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """max_array_length and max_record_bytes given to the server reach its decoder: a POST
    with an array past the limit is answered 200 with that event refused, the other taken."""
    limits = server.pipeline.wire_limits
    assert (limits.max_array_length, limits.max_record_bytes) == (2, 1000)
    async with session.post(
        f"http://127.0.0.1:{server.port}/log",
        json={"logs": [{"x": [1, 2, 3]}, GOOD]},
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    ) as resp:
        assert resp.status == 200
        ans = await resp.json()
    assert ans["accepted"] == 1
    assert [(r["index"], r["error"]) for r in ans["rejected"]] == [(0, "array_too_long")]


# --------------------------------------------------------------------------- sane ranges

#: (key, value, reason): values outside the sane ranges, all MessagePack can carry.
OUT_OF_RANGE: Final[list[tuple[str, Any, str]]] = [
    ("timestamp", -1, "bad_timestamp"),
    ("timestamp", -0.5, "bad_timestamp"),
    ("timestamp", -(2**63), "bad_timestamp"),
    ("timestamp", MAX_TIMESTAMP_MS + 1, "bad_timestamp"),
    ("timestamp", MAX_TIMESTAMP_MS + 0.5, "bad_timestamp"),
    ("timestamp", 2**63, "bad_timestamp"),
    ("timestamp", 1e300, "bad_timestamp"),
    ("timestamp", math.inf, "bad_timestamp"),
    ("timestamp", math.nan, "bad_timestamp"),
    ("timestamp", "-5", "bad_timestamp"),
    ("timestamp", "1e300", "bad_timestamp"),
    ("timestamp", "9" * 5000, "bad_timestamp"),
    ("duration", -1, "bad_duration"),
    ("duration", -0.001, "bad_duration"),
    ("duration", MAX_DURATION_MS + 1, "bad_duration"),
    ("duration", 2**64 - 1, "bad_duration"),
    ("duration", 1e30, "bad_duration"),
    ("duration", -math.inf, "bad_duration"),
    ("duration", "-3", "bad_duration"),
    ("uuid", "u" * (MAX_ID_LENGTH + 1), "bad_id"),
    ("uuid", "é" * (MAX_ID_LENGTH + 1), "bad_id"),
    ("event", "e" * 60_000, "bad_id"),
    ("parent", "p" * (MAX_ID_LENGTH + 1), "bad_id"),
    ("uuid", 1e20, "bad_id"),
    ("event", -1e19, "bad_id"),
]

#: Values only JSON can carry (MessagePack integers end at 64 bits).
OUT_OF_RANGE_JSON: Final[list[tuple[str, str, str]]] = [
    ("timestamp", "1" + "0" * 30, "bad_timestamp"),
    ("duration", "1" + "0" * 30, "bad_duration"),
    ("uuid", str(MAX_INT_ID + 1), "bad_id"),
    ("event", str(MIN_INT_ID - 1), "bad_id"),
    ("parent", "9" * 4000, "bad_id"),
]


def short_ids(table: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{key}={value!r:.24}" for key, value, _ in table]


@pytest.mark.parametrize(("key", "value", "reason"), OUT_OF_RANGE, ids=short_ids(OUT_OF_RANGE))
def test_values_outside_the_sane_ranges_are_refused_in_both_paths(
    key: str, value: Any, reason: str
) -> None:
    """The reference path refuses the event with the reason (and takes the good one beside
    it); the native path declines the frame."""
    with pytest.raises(InvalidEvent) as info:
        default_mapper({key: value}, T0)
    assert info.value.reason == reason
    event = {"uuid": "u-1", "parent": "0", key: value}
    payload = msgpack.packb([GOOD, event])
    buf, fed = reference(payload)
    assert refusals(fed) == [(1, reason)] and len(fed.records) == 1
    assert buf.rejected == {reason: 1}
    if NATIVE:
        assert LogBuffer(clock=clock).prepare_msgpack(payload) is None


@pytest.mark.parametrize(
    ("key", "number", "reason"), OUT_OF_RANGE_JSON, ids=short_ids(OUT_OF_RANGE_JSON)
)
def test_numbers_only_json_carries_are_refused_too(key: str, number: str, reason: str) -> None:
    """A timestamp of 10**30 (which passed before and made publishers raise later), and
    integer ids past 64 bits, sent as JSON: refused with the reason."""
    payload = b'[{"msg": "good"}, {"uuid": "u-1", "%s": %s}]' % (key.encode(), number.encode())
    _, fed = reference(payload, text=True)
    assert refusals(fed) == [(1, reason)] and len(fed.records) == 1


#: (key, value, published): values at the bounds of the sane ranges and what the record holds.
IN_RANGE: Final[list[tuple[str, Any, Any]]] = [
    ("timestamp", 0, 0),
    ("timestamp", -0.0, 0),
    ("timestamp", 0.25, 0.25),
    ("timestamp", T0 + 0.123, T0 + 0.123),  # microseconds as a float fraction: kept
    ("timestamp", MAX_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
    ("timestamp", float(MAX_TIMESTAMP_MS), MAX_TIMESTAMP_MS),
    ("timestamp", MAX_TIMESTAMP_MS - 0.5, MAX_TIMESTAMP_MS - 0.5),
    ("duration", 0, 0),
    ("duration", 0.5, 0.5),
    ("duration", MAX_DURATION_MS, MAX_DURATION_MS),
    ("uuid", "u" * MAX_ID_LENGTH, "u" * MAX_ID_LENGTH),
    ("uuid", "é" * MAX_ID_LENGTH, "é" * MAX_ID_LENGTH),  # 512 bytes, 256 characters
    ("event", "😀" * MAX_ID_LENGTH, "😀" * MAX_ID_LENGTH),
    ("parent", "0", "0"),
    ("uuid", MAX_INT_ID, str(MAX_INT_ID)),
    ("uuid", MIN_INT_ID, str(MIN_INT_ID)),
    ("event", float(2**53), str(2**53)),
]


@pytest.mark.parametrize(("key", "value", "published"), IN_RANGE, ids=short_ids(IN_RANGE))
def test_values_at_the_sane_bounds_are_taken_in_both_paths(
    key: str, value: Any, published: Any
) -> None:
    """Values at the bounds are taken; the native path publishes the reference's bytes."""
    event = {"uuid": "u-1", "parent": "0", "msg": "bound", key: value}
    payload = msgpack.packb([GOOD, event])
    _, fed = reference(payload)
    assert not fed.rejected
    assert fed.records[1][key] == published
    if NATIVE:
        assert native_takes(payload)


@needs_native
def test_a_tree_with_an_out_of_range_child_is_declined_and_the_reference_refuses_it() -> None:
    """Inside a whole tree, one child with a negative duration: the native path declines, the
    reference publishes the tree without that child and refuses it by index."""
    tree = [
        {"clazz": "begin", "uuid": "t", "event": "1", "parent": "0", "timestamp": T0},
        {"uuid": "t", "event": "2", "parent": "1", "timestamp": T0 + 1, "duration": -4},
        {"uuid": "t", "event": "3", "parent": "1", "timestamp": T0 + 2},
        {"clazz": "end", "uuid": "t", "event": "1", "parent": "0", "timestamp": T0 + 9},
    ]
    payload = msgpack.packb(tree)
    assert LogBuffer(clock=clock).prepare_msgpack(payload) is None
    _, fed = reference(payload)
    assert refusals(fed) == [(1, "bad_duration")]
    (record,) = fed.records
    assert [c["event"] for c in record["children"]] == ["3"]
    fixed = msgpack.packb([{**e, "duration": 4} if e.get("duration") else e for e in tree])
    assert native_takes(fixed)
