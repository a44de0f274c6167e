"""The bus ingest's native split (``_speedups.split`` behind
:func:`async_logging.bus.partition.native_split`) against its oracle, the mapping path:
``wire.decode_msgpack`` + ``map_events`` + :func:`~async_logging.bus.partition.partition_of`.

For every generated frame the native split either declines, or gives each event's bytes
as they came in, in frame order, in the partition of the uuid the mapper makes; it always
declines a frame the mapping would refuse something of (that event must be answered).
Unlike the reassembling fast path it takes frames of half trees too: trees are the
reassembler's business.
"""

from __future__ import annotations

import copy
import zlib
from collections import Counter
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from async_logging.bus.partition import native_split, partition_of
from async_logging.encoded import NATIVE
from async_logging.exceptions import BadInput
from async_logging.model import map_events
from async_logging.wire import DEFAULT_LIMITS, WireLimits, decode_msgpack

if not NATIVE:
    pytest.skip("the native extension is not built here", allow_module_level=True)

from test_fastpath import NOW, SETTINGS, frames, wire_limits


class _Envelope(msgspec.Struct):
    logs: list[msgspec.Raw]


def reference(
    payload: bytes, limits: WireLimits, partitions: int, other: int, max_event_bytes: int
) -> dict[int, tuple[int, bytes]] | None:
    """What the mapping path publishes for ``payload``, by partition: (count, the events'
    bytes back to back); None when it refuses something (or the frame does not decode)."""
    try:
        frame = decode_msgpack(payload, limits)
    except BadInput:
        return None
    rejected: list[Any] = []
    mapped = map_events(copy.deepcopy(frame.logs), NOW, rejected)
    if rejected:
        return None
    head = payload[0]
    try:
        if head & 0xF0 == 0x90 or head in (0xDC, 0xDD):
            raw = msgspec.msgpack.decode(payload, type=list[msgspec.Raw])
        else:
            raw = msgspec.msgpack.decode(payload, type=_Envelope).logs
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a lone log map: the mapping path's alone
    assert len(raw) == len(mapped)
    out: dict[int, tuple[int, list[bytes]]] = {}
    for event_bytes, e in zip(raw, mapped, strict=True):
        if len(event_bytes) > max_event_bytes:
            return None  # refused record_too_big on the mapping path
        uuid = e.get("uuid")
        part = partition_of(uuid, partitions) if uuid.__class__ is str and uuid else other
        count, chunks = out.setdefault(part, (0, []))
        chunks.append(bytes(event_bytes))
        out[part] = (count + 1, chunks)
    return {p: (n, b"".join(chunks)) for p, (n, chunks) in out.items()}


def native(
    payload: bytes, limits: WireLimits, partitions: int, other: int, max_event_bytes: int
) -> dict[int, tuple[int, bytes]] | None:
    got = native_split(payload, limits, partitions, other, max_event_bytes)
    if got is None:
        return None
    assert [p for p, _, _ in got.parts] == sorted({p for p, _, _ in got.parts})
    assert got.events == sum(n for _, n, _ in got.parts)
    return {p: (n, body) for p, n, body in got.parts}


def test_the_native_split_is_the_mapping_paths_cut_or_declines() -> None:
    taken: Counter[str] = Counter()

    @settings(SETTINGS, max_examples=300)
    @given(
        frames(perturb=0.5),
        wire_limits,
        st.sampled_from([1, 3, 8, 1024]),
        st.randoms(use_true_random=False),
        st.sampled_from([10**9, 4096, 200, 40]),
    )
    def run(
        frame: Any, limits: WireLimits, partitions: int, rnd: Any, max_event_bytes: int
    ) -> None:
        other = rnd.randrange(partitions)
        payload = frame.data
        expected = reference(payload, limits, partitions, other, max_event_bytes)
        got = native(payload, limits, partitions, other, max_event_bytes)
        if expected is None:
            assert got is None, f"{frame.perturbed}: taken, but the mapping refuses some"
        elif got is not None:
            assert got == expected
        label = "refused" if expected is None else ("taken" if got is not None else "declined")
        event(f"{frame.perturbed or 'whole'}: {label}")
        if limits is DEFAULT_LIMITS and max_event_bytes == 10**9 and frame.perturbed is None:
            taken[label] += 1

    run()
    # Unperturbed frames in ordinary packings are taken (float32 packings and the like
    # may be declined: the mapping path then takes them).
    assert taken["taken"] >= 0.8 * (taken["taken"] + taken["declined"]), taken


def test_half_trees_and_records_without_uuid_are_cut_too() -> None:
    """A frame holding the first half of one tree and a record of its own: every event goes,
    the tree's to its uuid's partition, the record to ``other``."""
    t0 = 1_795_463_406_000
    events: list[dict[str, Any]] = [
        {"clazz": "begin", "uuid": "half-1", "event": "1", "parent": "0", "timestamp": t0},
        {"clazz": "atomicEvent", "uuid": "half-1", "parent": "1", "msg": "a", "timestamp": t0},
        {"clazz": "atomicEvent", "msg": "own", "timestamp": t0},
        {"clazz": "begin", "uuid": 4242, "event": 2, "parent": "0", "timestamp": t0},
    ]
    payload = msgpack.packb({"seq": 9, "logs": events})
    got = native_split(payload, DEFAULT_LIMITS, 16, 5, 10**6)
    assert got is not None and got.seq == 9 and got.events == 4
    parts = {p: (n, body) for p, n, body in got.parts}
    half, int_uuid = partition_of("half-1", 16), partition_of("4242", 16)
    assert half == zlib.crc32(b"half-1") % 16
    packed = [msgpack.packb(e) for e in events]
    expected: dict[int, list[bytes]] = {}
    for part, b in zip((half, half, 5, int_uuid), packed, strict=True):
        expected.setdefault(part, []).append(b)
    assert parts == {p: (len(bs), b"".join(bs)) for p, bs in expected.items()}


@pytest.mark.parametrize(
    ("event_", "why"),
    [
        ({"clazz": "nonsense", "uuid": "u"}, "unknown clazz: refused on the mapping path"),
        ({"clazz": "begin", "uuid": "u", "parent": "0"}, "a begin without an event id"),
        ({"clazz": "atomicEvent", "uuid": "u", "timestamp": -1}, "a time out of range"),
        ({"clazz": "atomicEvent", "uuid": "u", "kind": "x"}, "a key the engine writes: mapped"),
    ],
)
def test_a_frame_with_anything_to_refuse_or_unusual_is_declined(
    event_: dict[str, Any], why: str
) -> None:
    good = {"clazz": "atomicEvent", "uuid": "u", "parent": "0", "msg": "ok"}
    payload = msgpack.packb([good, event_])
    assert native_split(payload, DEFAULT_LIMITS, 4, 0, 10**6) is None, why


def test_an_event_longer_than_a_bus_message_is_declined() -> None:
    big = {"clazz": "atomicEvent", "uuid": "u", "msg": "x" * 5000}
    payload = msgpack.packb([big])
    assert native_split(payload, DEFAULT_LIMITS, 4, 0, 4096) is None
    assert native_split(payload, DEFAULT_LIMITS, 4, 0, 8192) is not None


def test_bad_arguments_are_errors_not_declines() -> None:
    payload = msgpack.packb([{"clazz": "atomicEvent", "uuid": "u"}])
    with pytest.raises(ValueError, match="partitions"):
        native_split(payload, DEFAULT_LIMITS, 0, 0, 100)
    with pytest.raises(ValueError, match="other"):
        native_split(payload, DEFAULT_LIMITS, 4, 4, 100)
