"""Exact completeness: an ``end`` may say how many direct children its transaction had
(``childCount``); a tree whose every count is met is published at once, whatever the
arrival order and frame split, and one still short waits, then comes out flagged
``missing_children`` (docs/design.md §3)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_logging import LogBuffer
from async_logging.encoded import NATIVE
from helpers import Clock

T0 = 1_700_000_000_000


def begin(eid: str, parent: str = "0", uuid: str = "u", ts: int = T0) -> dict[str, Any]:
    return {"clazz": "begin", "uuid": uuid, "event": eid, "parent": parent, "timestamp": ts}


def end(
    eid: str, kids: int | None, parent: str = "0", uuid: str = "u", ts: int = T0 + 50
) -> dict[str, Any]:
    e = {"clazz": "end", "uuid": uuid, "event": eid, "parent": parent, "timestamp": ts}
    if kids is not None:
        e["childCount"] = kids
    return e


def atomic(eid: str, parent: str, uuid: str = "u", ts: int = T0 + 1) -> dict[str, Any]:
    return {"uuid": uuid, "event": eid, "parent": parent, "timestamp": ts, "msg": eid}


def count_nodes(record: dict[str, Any]) -> int:
    return 1 + sum(count_nodes(c) for c in record.get("children", ()))


def test_a_root_closed_before_its_children_waits_for_them() -> None:
    buf = LogBuffer(clock=Clock(), native=False)
    assert buf.feed_many([begin("1"), end("1", 2)]).records == []
    assert buf.feed_many([atomic("a", "1")]).records == []
    out = buf.feed_many([atomic("b", "1")]).records
    assert len(out) == 1 and out[0]["complete"] is True
    assert [c["event"] for c in out[0]["children"]] == ["a", "b"]
    assert buf.stats["late"] == 0 and buf.open_count == 0


def test_without_a_count_the_old_rule_stands() -> None:
    buf = LogBuffer(clock=Clock(), native=False)
    out = buf.feed_many([begin("1"), end("1", None)]).records
    assert out[0]["complete"] is True and out[0]["children"] == []
    late = buf.feed_many([atomic("a", "1")]).records
    assert late[0]["late"] is True


def test_a_nested_count_holds_the_whole_tree() -> None:
    buf = LogBuffer(clock=Clock(), native=False)
    frame = [begin("1"), begin("2", "1"), end("2", 1, "1"), end("1", 1)]
    assert buf.feed_many(frame).records == []
    out = buf.feed_many([atomic("x", "2")]).records
    assert out[0]["complete"] is True
    assert out[0]["children"][0]["children"][0]["event"] == "x"


def test_a_count_still_short_at_the_timeout_is_published_missing_children() -> None:
    clock = Clock()
    buf = LogBuffer(clock=clock, native=False, clean_duration=1, clean_cycles=2)
    buf.feed_many([begin("1"), begin("2", "1"), end("2", 3, "1"), end("1", 1), atomic("x", "2")])
    clock.advance(1.0)
    assert buf.expire() == []
    clock.advance(1.0)
    (record,) = buf.expire()
    assert record["complete"] is False and record["reason"] == "missing_children"
    inner = record["children"][0]
    assert inner["missing_children"] == 2 and inner["complete"] is False
    assert "missing_children" not in record
    assert buf.incomplete["missing_children"] == 1


def test_a_shutdown_keeps_its_reason_and_flags_what_is_short() -> None:
    buf = LogBuffer(clock=Clock(), native=False)
    buf.feed_many([begin("1"), end("1", 4), atomic("x", "1")])
    (record,) = buf.flush_all()
    assert record["reason"] == "shutdown" and record["missing_children"] == 3


def test_counts_met_skip_the_settle_time() -> None:
    clock = Clock()
    buf = LogBuffer(clock=clock, native=False, settle=5)
    counted = buf.feed_many([begin("1"), atomic("a", "1"), end("1", 1)]).records
    assert counted and counted[0]["complete"] is True
    uncounted = buf.feed_many([begin("1", uuid="v"), end("1", None, uuid="v")]).records
    assert uncounted == []  # no count: it settles as before
    clock.advance(5)
    assert buf.expire()[0]["uuid"] == "v"


@pytest.mark.parametrize("bad", [-1, "3", 1.5, True, [1]])
def test_a_child_count_that_is_not_a_count_is_refused(bad: Any) -> None:
    buf = LogBuffer(clock=Clock(), native=False)
    fed = buf.feed_many([begin("1"), {**end("1", None), "childCount": bad}])
    assert [(i, e.reason) for i, e in fed.rejected] == [(1, "bad_child_count")]
    assert buf.rejected["bad_child_count"] == 1


@st.composite
def counted_trees(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """A few trees, each as its events with exact childCounts."""
    trees = []
    for t in range(draw(st.integers(1, 4))):
        uuid = f"t{t}"
        events = [begin("1", uuid=uuid)]
        kids: dict[str, int] = {"1": 0}
        parents = ["1"]
        for n in range(draw(st.integers(0, 12))):
            parent = draw(st.sampled_from(parents))
            kids[parent] += 1
            eid = f"e{n}"
            if draw(st.booleans()):
                events.append(begin(eid, parent, uuid, T0 + n))
                kids[eid] = 0
                parents.append(eid)
            else:
                events.append(atomic(eid, parent, uuid, T0 + n))
        for eid in parents:
            parent = next(e["parent"] for e in events if e.get("event") == eid)
            events.append(end(eid, kids[eid], parent, uuid))
        trees.append(events)
    return trees


@settings(max_examples=150, deadline=None)
@given(data=st.data(), trees=counted_trees())
def test_with_counts_every_tree_is_published_complete_once_whatever_the_order(
    data: st.DataObject, trees: list[list[dict[str, Any]]]
) -> None:
    events = [e for tree in trees for e in tree]
    order = data.draw(st.permutations(range(len(events))))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=6)))
    native = data.draw(st.booleans()) and NATIVE
    buf = LogBuffer(clock=Clock(), native=native)
    shuffled = [dict(events[i]) for i in order]
    published: list[dict[str, Any]] = []
    for lo, hi in zip([0, *cuts], [*cuts, len(shuffled)], strict=True):
        batch = shuffled[lo:hi]
        fed = buf.feed_msgpack(msgpack.packb(batch)) if native else None
        if fed is None:
            fed = buf.feed_many(batch)
        assert not fed.rejected
        published.extend(fed.records)
        # A tree comes out exactly when its last event has arrived.
        arrived = Counter(events[i]["uuid"] for i in order[:hi])
        for tree in trees:
            uuid = tree[0]["uuid"]
            out = [r for r in published if r["uuid"] == uuid]
            assert len(out) == (1 if arrived[uuid] == len(tree) else 0), (uuid, arrived, out)
    assert buf.open_count == 0
    assert all(r["complete"] is True and not r.get("late") for r in published)
    for tree in trees:
        (record,) = [r for r in published if r["uuid"] == tree[0]["uuid"]]
        ends = sum(1 for e in tree if e.get("clazz") == "end")
        assert count_nodes(record) == len(tree) - ends


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_the_native_path_takes_counted_trees_and_declines_short_ones() -> None:
    buf = LogBuffer(clock=Clock(), native=True)
    met = buf.feed_msgpack(msgpack.packb([begin("1"), atomic("a", "1"), end("1", 1)]))
    assert met is not None and len(met.records) == 1  # the common case stays native
    for frame in (
        [begin("1", uuid="v"), atomic("a", "1", "v"), end("1", 2, uuid="v")],  # short
        [begin("1", uuid="w"), {**end("1", None, uuid="w"), "childCount": -1}],  # refused
        [begin("1", uuid="x"), {**end("1", None, uuid="x"), "childCount": "0"}],
    ):
        assert buf.feed_msgpack(msgpack.packb(frame)) is None, frame
