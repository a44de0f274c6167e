"""Adversarial shapes cost the engine linear work: duplicate detection never compares an
event with all its siblings (docs/design.md §3, issue 12).

The work is counted, not timed: every equality test between events and every digest the
engine makes goes through a counter, with a generous bound (a few per event). The old
pairwise check made 10,000 atomic events that share their ids, time and message cost about
50 million comparisons (10-17 s of a blocked event loop)."""

from __future__ import annotations

from typing import Any

import pytest

from async_logging import LogBuffer
from async_logging.buffer import engine

N = 10_000
T = 1_700_000_000_000


class Probe:
    """A value that counts the equality tests made on it: put in every event, it counts
    the comparisons between events (a dict compares its values)."""

    compared = 0

    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        Probe.compared += 1
        return isinstance(other, Probe) and other.v == self.v

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # what the engine digests (orjson refuses the object)
        return f"Probe({self.v})"


def shared_key_tree(uuid: str, n: int, *, differ: bool = True) -> list[dict[str, Any]]:
    """A transaction whose ``n`` atomic children share event, parent, timestamp and msg,
    and differ (or not) in one other key."""
    events: list[dict[str, Any]] = [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T}
    ]
    events += [
        {
            "clazz": "atomicEvent",
            "uuid": uuid,
            "event": "2",
            "parent": "1",
            "timestamp": T,
            "msg": "same",
            "probe": Probe(i if differ else 0),
        }
        for i in range(n)
    ]
    events.append({"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T})
    return events


@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the digests the engine makes."""
    made = [0]
    real = engine._digest

    def counting(e: Any) -> bytes:
        made[0] += 1
        return real(e)

    monkeypatch.setattr(engine, "_digest", counting)
    Probe.compared = 0
    return made


def test_events_sharing_a_key_are_told_apart_with_linear_work(digests: list[int]) -> None:
    """10,000 different atomic events sharing a key: all kept, at most a digest and a
    comparison each (the pairwise check made ~50 million comparisons)."""
    buf = LogBuffer(clock=lambda: T, native=False, max_events_per_tx=4 * N)
    fed = buf.feed_many(shared_key_tree("u", N))
    (record,) = fed.records
    assert len(record["children"]) == N and record["complete"] is True
    assert Probe.compared <= 2 * N
    assert digests[0] <= N + 1


def test_resending_every_event_sharing_a_key_drops_each_once_with_linear_work(
    digests: list[int],
) -> None:
    """Split over two frames with the second frame a resend of the first's children: every
    resent child is a duplicate (dropped once), at linear cost."""
    buf = LogBuffer(clock=lambda: T, native=False, max_events_per_tx=4 * N)
    events = shared_key_tree("u", N)
    begin, children, end = events[0], events[1:-1], events[-1]
    assert buf.feed_many([begin, *children]).records == []
    resent = [dict(c) for c in children]
    Probe.compared = 0
    fed = buf.feed_many([*resent, end])
    (record,) = fed.records
    assert len(record["children"]) == N
    assert buf.stats["duplicates"] == N
    assert Probe.compared <= 2 * N
    assert digests[0] <= 2 * N + 1


def test_identical_events_sharing_a_key_are_one_event_then_duplicates(
    digests: list[int],
) -> None:
    """The same event N times in one frame: kept once, N - 1 duplicates, one comparison each."""
    buf = LogBuffer(clock=lambda: T, native=False, max_events_per_tx=4 * N)
    fed = buf.feed_many(shared_key_tree("u", N, differ=False))
    (record,) = fed.records
    assert len(record["children"]) == 1
    assert buf.stats["duplicates"] == N - 1
    assert Probe.compared <= 2 * N and digests[0] == 0  # equal to the first: no digest


def test_a_digest_of_an_event_orjson_refuses_still_tells_duplicates_apart() -> None:
    """An odd value a custom mapper left (not JSON) is digested by its repr: its resend is a
    duplicate and a different one is kept."""

    class Odd:
        def __init__(self, v: int) -> None:
            self.v = v

        def __repr__(self) -> str:
            return f"Odd({self.v})"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Odd) and other.v == self.v

        __hash__ = None  # type: ignore[assignment]

    def atomic(v: int) -> dict[str, Any]:
        return {
            "clazz": "atomicEvent", "uuid": "u", "event": "2", "parent": "1",
            "timestamp": T, "msg": "m", "odd": Odd(v),
        }  # fmt: skip

    buf = LogBuffer(clock=lambda: T, native=False, max_events_per_tx=4 * N)
    begin = {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": T}
    end = {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": T}
    # Not equal to the first (so the digests decide), equal to each other.
    fed = buf.feed_many([begin, atomic(1), atomic(2), atomic(2), atomic(3), end])
    (record,) = fed.records
    assert [c["odd"].v for c in record["children"]] == [1, 2, 3]
    assert buf.stats["duplicates"] == 1
