"""The reassembly engine on the seed's cases and on each rule of docs/design.md §3."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from async_logging import BufferLimits, EmitterBuffer, EventEmitter, InvalidEvent, LogBuffer
from async_logging.exceptions import UsageError
from helpers import Clock

T0 = 1_795_463_406_000


def ev(clazz: str, event: str | None, parent: str = "0", uuid: str = "u1", **kw: Any) -> dict:
    e: dict[str, Any] = {"clazz": clazz, "uuid": uuid, "parent": parent, **kw}
    if event is not None:
        e["event"] = event
    e.setdefault("timestamp", T0)
    return e


def seed_tree(uuid: str = "u1") -> list[dict]:
    """The shape of the original client's capture: URL /orig > API svc > DB q, plus INFO note."""
    return [
        ev("begin", "1", "0", uuid, type="URL", name="/orig", timestamp=T0),
        ev("begin", "2", "1", uuid, type="API", name="svc", timestamp=T0 + 1),
        ev("atomicEvent", "3", "2", uuid, type="DB", name="q", msg="select 1", timestamp=T0 + 2),
        ev("end", "2", "1", uuid, type="API", name="svc", status="0", duration=3, timestamp=T0 + 4),
        ev("atomicEvent", "4", "1", uuid, type="INFO", name="note", msg="hello", timestamp=T0 + 5),
        ev(
            "end",
            "1",
            "0",
            uuid,
            type="URL",
            name="/orig",
            status="0",
            duration=7,
            timestamp=T0 + 7,
        ),
    ]


def shape(node: dict) -> tuple:
    """A compact, comparable picture of a published tree."""
    kids = tuple(shape(c) for c in node.get("children", ()))
    return (node["kind"], node.get("type"), node.get("name"), node.get("status"), kids)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def buf(clock: Clock) -> LogBuffer:
    return LogBuffer(clock=clock)


# ------------------------------------------------------------------ the seed's cases


def test_heartbeat_is_published_at_once(buf: LogBuffer) -> None:
    """A top-level heartbeat comes straight out as a heartbeat record."""
    out = buf.feed({"clazz": "heartbeat", "type": "heartbeat", "name": "hb", "msg": "alive"})
    assert [r["kind"] for r in out] == ["heartbeat"]
    assert out[0]["name"] == "hb" and "clazz" not in out[0]
    assert buf.open_count == 0


def test_atomic_event_without_uuid_is_stand_alone(buf: LogBuffer) -> None:
    """An atomic event with no uuid is published alone, with the seed's defaults filled in."""
    (rec,) = buf.feed({"name": "standalone", "msg": "no uuid here"})
    assert rec["kind"] == "atomicEvent"
    assert rec["type"] == "URL" and rec["parent"] == "0"
    assert rec["timestamp"] == T0  # time received


def test_top_level_atomic_event_with_uuid_is_not_held(buf: LogBuffer) -> None:
    """parent "0" atomic events are published immediately even when they carry a uuid."""
    (rec,) = buf.feed(ev("atomicEvent", "9", "0", msg="hi"))
    assert rec["kind"] == "atomicEvent" and rec["request"] == "u1"
    assert buf.open_count == 0


def test_empty_transaction(buf: LogBuffer) -> None:
    """A begin and its end alone make one complete transaction with no children."""
    assert buf.feed(ev("begin", "1", type="URL", name="/x")) == []
    (rec,) = buf.feed(ev("end", "1", status="0", timestamp=T0 + 5))
    assert rec["kind"] == "transaction" and rec["complete"] is True
    assert rec["children"] == [] and rec["duration"] == 5 and rec["status"] == "0"
    assert "reason" not in rec


def test_transaction_with_children(buf: LogBuffer) -> None:
    """Children nest under their begin and the end merges into it instead of becoming a child."""
    events = [
        ev("begin", "1", name="/a"),
        ev("atomicEvent", "2", "1", name="one", timestamp=T0 + 1),
        ev("atomicEvent", "3", "1", name="two", timestamp=T0 + 2),
        ev("end", "1", name="/a", status="0", timestamp=T0 + 3),
    ]
    (rec,) = buf.feed_many(events).records
    assert [c["name"] for c in rec["children"]] == ["one", "two"]
    assert all(c["kind"] == "atomicEvent" for c in rec["children"])
    assert rec["duration"] == 3


def test_nested_transactions_match_the_original_capture(buf: LogBuffer) -> None:
    """The capture's tree comes out as the captures' README lists it: URL /orig > (API svc > DB q, INFO note)."""
    (rec,) = buf.feed_many(seed_tree()).records
    assert shape(rec) == (
        "transaction",
        "URL",
        "/orig",
        "0",
        (
            ("transaction", "API", "svc", "0", (("atomicEvent", "DB", "q", None, ()),)),
            ("atomicEvent", "INFO", "note", None, ()),
        ),
    )
    api = rec["children"][0]
    assert rec["duration"] == 7 and api["duration"] == 3
    assert rec["complete"] is True and api["complete"] is True
    assert api["children"][0]["msg"] == "select 1"


def test_clean_cycle_publishes_an_open_tree_flagged_after_the_timeout(
    clock: Clock, buf: LogBuffer
) -> None:
    """A root whose end never comes is published incomplete after clean_duration x cycles, not before."""
    events = [e for e in seed_tree() if not (e["clazz"] == "end" and e["event"] == "1")]
    assert buf.feed_many(events).records == []
    clock.advance(60 * 3 - 0.001)
    assert buf.expire() == []
    clock.advance(0.001)
    (rec,) = buf.expire()
    assert rec["complete"] is False and rec["reason"] == "timeout" and rec["missing_end"] is True
    assert rec["status"] == "-1"
    assert rec["children"][0]["complete"] is True  # the nested transaction did close
    assert len(rec["children"]) == 2 and buf.open_count == 0
    assert rec["duration"] == 5  # up to the last event seen
    assert buf.incomplete["timeout"] == 1


def test_new_events_push_the_timeout_back(clock: Clock, buf: LogBuffer) -> None:
    """The timeout counts from a tree's last event, so a busy long transaction is not cut."""
    buf.feed(ev("begin", "1"))
    clock.advance(100)
    buf.feed(ev("atomicEvent", "2", "1"))
    clock.advance(100)
    assert buf.expire() == []
    clock.advance(80)
    assert len(buf.expire()) == 1


def test_clean_duration_and_cycles_are_options(clock: Clock) -> None:
    """clean_duration and clean_cycles set the timeout."""
    buf = LogBuffer(clock=clock, clean_duration=1.0, clean_cycles=2)
    buf.feed(ev("begin", "1"))
    clock.advance(1.999)
    assert buf.expire() == []
    clock.advance(0.001)
    assert len(buf.expire()) == 1


# ------------------------------------------------------------------ arrival order


def test_children_before_their_root_begin_are_kept(buf: LogBuffer) -> None:
    """The 2013 original lost children that came before their root's begin; here they are kept."""
    events = seed_tree()
    reordered = [events[2], events[4], events[3], events[1], events[5], events[0]]
    (rec,) = buf.feed_many(reordered).records
    (expected,) = LogBuffer(clock=Clock(T0)).feed_many(seed_tree()).records
    assert rec == expected


def test_nested_end_before_begin_across_batches(buf: LogBuffer) -> None:
    """A nested end arriving before its begin, in separate frames, does not delay the tree."""
    e = seed_tree()
    for batch in ([e[3]], [e[0], e[2]], [e[4], e[1]]):
        assert buf.feed_many(batch).records == []
    (rec,) = buf.feed_many([e[5]]).records
    assert rec["complete"] is True and shape(rec)[4][0][2] == "svc"


def test_children_are_ordered_by_timestamp_then_arrival(buf: LogBuffer) -> None:
    """Siblings come out by timestamp; equal timestamps keep their arrival order."""
    events = [
        ev("begin", "1"),
        ev("atomicEvent", "2", "1", name="late", timestamp=T0 + 9),
        ev("atomicEvent", "3", "1", name="tie-a", timestamp=T0 + 1),
        ev("atomicEvent", "4", "1", name="tie-b", timestamp=T0 + 1),
        ev("end", "1", timestamp=T0 + 10),
    ]
    (rec,) = buf.feed_many(events).records
    assert [c["name"] for c in rec["children"]] == ["tie-a", "tie-b", "late"]


def test_settle_window_takes_children_that_arrive_after_the_root_end(clock: Clock) -> None:
    """With settle > 0 a closed tree waits for siblings coming over other connections."""
    buf = LogBuffer(clock=clock, settle=1.0)
    e = seed_tree()
    assert buf.feed_many([x for x in e if x["event"] != "4"]).records == []
    clock.advance(0.5)
    assert buf.expire() == []
    buf.feed_many([e[4]])
    clock.advance(1.0)
    (rec,) = buf.expire()
    assert rec["complete"] is True and len(rec["children"]) == 2


def test_without_settle_a_child_after_the_root_end_is_late_not_lost(buf: LogBuffer) -> None:
    """Default settle 0: the tree goes at once and a straggler is published flagged late."""
    e = seed_tree()
    (tree,) = buf.feed_many([x for x in e if x["event"] != "4"]).records
    assert len(tree["children"]) == 1
    (late,) = buf.feed(e[4])
    assert late["late"] is True and late["kind"] == "atomicEvent" and late["name"] == "note"
    assert buf.stats["late"] == 1


# ------------------------------------------------------------------ end merge, extras


def test_end_fields_win_and_extra_keys_survive(buf: LogBuffer) -> None:
    """name, msg, status and duration come from the end; unknown keys of both survive."""
    buf.feed(ev("begin", "1", name="/tmp", msg="start", custom={"a": 1}))
    (rec,) = buf.feed(ev("end", "1", name="/final", msg="done", status="500", only_end=True))
    assert (rec["name"], rec["msg"], rec["status"]) == ("/final", "done", "500")
    assert rec["custom"] == {"a": 1} and rec["only_end"] is True
    assert "clazz" not in rec


def test_duration_defaults_to_end_minus_begin_and_status_to_minus_one(buf: LogBuffer) -> None:
    """Without duration or status on the end: end.timestamp - begin.timestamp, status "-1"."""
    buf.feed(ev("begin", "1", timestamp=T0))
    (rec,) = buf.feed(ev("end", "1", timestamp=T0 + 42))
    assert rec["duration"] == 42 and rec["status"] == "-1"


# ------------------------------------------------------------------ duplicates, conflicts


def test_resent_events_are_dropped_before_and_after_publish(buf: LogBuffer) -> None:
    """A client resend never doubles a child, whether the tree is open or already published."""
    e = seed_tree()
    buf.feed_many(copy.deepcopy(e[:3]))
    buf.feed_many(copy.deepcopy(e[:3]))
    (rec,) = buf.feed_many(copy.deepcopy(e[3:])).records
    assert len(rec["children"][0]["children"]) == 1
    assert buf.feed_many(copy.deepcopy(e)).records == []
    assert buf.stats["duplicates"] == 3 + 6


def test_same_id_begin_with_other_content_is_a_flagged_conflict(buf: LogBuffer) -> None:
    """Two different begins with one id: the first is kept, the second published flagged."""
    buf.feed(ev("begin", "1", name="first"))
    (conflict,) = buf.feed(ev("begin", "1", name="second", timestamp=T0 + 1))
    assert conflict["conflict"] is True and conflict["name"] == "second"
    (rec,) = buf.feed(ev("end", "1"))
    assert rec["name"] == "first"


def test_distinct_atomics_sharing_id_and_timestamp_are_both_kept(buf: LogBuffer) -> None:
    """Atomic events with no id (or a shared one) but other content are not duplicates."""
    buf.feed(ev("begin", "1"))
    buf.feed(ev("atomicEvent", None, "1", msg="a"))
    buf.feed(ev("atomicEvent", None, "1", msg="b"))
    buf.feed(ev("atomicEvent", None, "1", msg="b"))  # a true duplicate
    (rec,) = buf.feed(ev("end", "1"))
    assert [c["msg"] for c in rec["children"]] == ["a", "b"]
    assert buf.stats["duplicates"] == 1


# ------------------------------------------------------------------ incomplete, orphans, cycles


def test_flush_all_publishes_everything_flagged_shutdown(buf: LogBuffer) -> None:
    """flush_all publishes open trees with the reason it is given."""
    buf.feed(ev("begin", "1", uuid="a"))
    buf.feed(ev("begin", "1", uuid="b"))
    out = buf.flush_all()
    assert sorted(r["uuid"] for r in out) == ["a", "b"]
    assert all(r["reason"] == "shutdown" and r["complete"] is False for r in out)
    assert buf.open_count == 0


def test_children_whose_parent_never_comes_are_kept_flagged(buf: LogBuffer) -> None:
    """An orphan hangs under the root flagged orphan and the tree is incomplete."""
    buf.feed_many([ev("begin", "1"), ev("atomicEvent", "5", "77", msg="lost?")])
    buf.feed(ev("end", "1"))  # pending: "77" never came
    (rec,) = buf.flush_all()
    (orphan,) = rec["children"]
    assert orphan["orphan"] is True and orphan["msg"] == "lost?"
    assert rec["complete"] is False


def test_orphans_without_any_root_are_published_each(buf: LogBuffer) -> None:
    """With no root at all, each orphan subtree is its own incomplete record."""
    buf.feed_many([ev("atomicEvent", "5", "9", msg="x"), ev("end", "9", "3")])
    out = buf.flush_all("timeout")
    assert len(out) == 1
    (end_node,) = out
    assert end_node["missing_begin"] is True and end_node["orphan"] is True
    assert [c["msg"] for c in end_node["children"]] == ["x"]
    assert end_node["reason"] == "timeout"


def test_parent_cycle_is_cut_and_flagged(buf: LogBuffer) -> None:
    """A begin whose parent chain loops is published cut, flagged cycle, without hanging."""
    events = [
        ev("begin", "1"),
        ev("end", "1"),
        ev("begin", "a", "b"),
        ev("end", "a", "b"),
        ev("begin", "b", "a", timestamp=T0 + 1),
        ev("end", "b", "a", timestamp=T0 + 1),
    ]
    # Everything is closed, so the tree goes at once; the loop hangs under the root, cut.
    (rec,) = buf.feed_many(events).records
    (cut,) = rec["children"]
    assert cut["cycle"] is True and cut["event"] == "a"
    assert cut["children"][0]["event"] == "b" and cut["children"][0]["children"] == []
    assert rec["complete"] is False and rec["reason"] == "cycle"
    assert buf.stats["cycles_cut"] == 1


def test_self_parent_terminates(buf: LogBuffer) -> None:
    """A transaction that names itself as parent is cut, not recursed into."""
    buf.feed_many([ev("begin", "x", "x"), ev("end", "x", "x")])
    (rec,) = buf.flush_all()
    assert rec["cycle"] is True and rec["children"] == []


def test_absurd_depth_is_cut_into_fragments(clock: Clock) -> None:
    """A 300-deep chain never recurses and no record nests deeper than max_depth."""
    buf = LogBuffer(clock=clock, max_depth=10)
    events = [ev("begin", "0x", "0")]
    events[0]["event"] = "n0"
    for i in range(1, 300):
        events.append(ev("begin", f"n{i}", f"n{i - 1}"))
    events += [ev("end", f"n{i}", "x") for i in range(300)]
    out = buf.feed_many(events).records

    def depth(n: dict) -> int:
        return 1 + max((depth(c) for c in n["children"]), default=0)

    assert len(out) == 30
    assert all(depth(r) <= 10 for r in out)
    assert sum(depth(r) for r in out) == 300
    assert all(r["depth_cut"] is True for r in out[1:]) and buf.stats["depth_cut"] == 29
    assert [r["event"] for r in out] == [f"n{10 * k}" for k in range(30)]


# ------------------------------------------------------------------ caps


def test_open_tree_cap_evicts_the_oldest(clock: Clock) -> None:
    """Past max_open the oldest open tree is published evicted and counted."""
    buf = LogBuffer(clock=clock, max_open=2)
    buf.feed(ev("begin", "1", uuid="a"))
    buf.feed(ev("begin", "1", uuid="b"))
    (rec,) = buf.feed(ev("begin", "1", uuid="c"))
    assert rec["uuid"] == "a" and rec["reason"] == "evicted"
    assert buf.stats["evicted"] == 1 and buf.open_count == 2


def test_events_per_tree_cap_evicts_that_tree(clock: Clock) -> None:
    """A tree may hold max_events_per_tx events; the next one pushes it out evicted and is late."""
    buf = LogBuffer(clock=clock, max_events_per_tx=3)
    buf.feed(ev("begin", "1"))
    buf.feed(ev("atomicEvent", "2", "1"))
    assert buf.feed(ev("atomicEvent", "3", "1")) == []
    rec, late = buf.feed(ev("atomicEvent", "4", "1"))
    assert rec["reason"] == "evicted" and len(rec["children"]) == 2
    assert late["late"] is True and late["event"] == "4"
    (late_end,) = buf.feed(ev("end", "1"))
    assert late_end["late"] is True and late_end["missing_begin"] is True


def test_limits_are_validated() -> None:
    """Nonsense limits are a UsageError, not a silent misconfiguration."""
    with pytest.raises(UsageError):
        BufferLimits(max_open=0)
    with pytest.raises(UsageError):
        LogBuffer(no_such_option=1)
    with pytest.raises(UsageError):
        LogBuffer(max_depth=500)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("not a map", "not_a_map"),
        ([1, 2], "not_a_map"),
        ({"clazz": "bogus"}, "unknown_clazz"),
        ({"clazz": ["begin"]}, "unknown_clazz"),
        ({"clazz": "begin", "event": "1"}, "missing_uuid"),
        ({"clazz": "end", "uuid": "u"}, "missing_event"),
        ({"uuid": ["x"]}, "bad_id"),
        ({"uuid": "u", "parent": {"a": 1}}, "bad_id"),
        ({"uuid": True}, "bad_id"),
        ({"timestamp": "yesterday"}, "bad_timestamp"),
        ({"timestamp": float("nan")}, "bad_timestamp"),
        ({"duration": [3]}, "bad_duration"),
        ({"status": {"code": 1}}, "bad_status"),
    ],
)
def test_bad_event_is_refused_with_its_reason(buf: LogBuffer, bad: Any, reason: str) -> None:
    """Each kind of bad event raises InvalidEvent naming what is wrong and is counted."""
    with pytest.raises(InvalidEvent) as info:
        buf.feed(bad)
    assert info.value.reason == reason
    assert buf.rejected[reason] == 1 and buf.stats["rejected"] == 1


def test_bad_events_never_cost_a_good_one(buf: LogBuffer) -> None:
    """A batch mixing bad and good events publishes every good tree and names the bad indices."""
    e = seed_tree()
    batch: list[Any] = [e[0], 42, e[1], {"clazz": "nope"}, *e[2:]]
    fed = buf.feed_many(batch)
    assert [i for i, _ in fed.rejected] == [1, 3]
    assert [x.reason for _, x in fed.rejected] == ["not_a_map", "unknown_clazz"]
    (rec,) = fed.records
    assert rec["complete"] is True and len(rec["children"]) == 2


def test_numeric_strings_and_floats_are_coerced(buf: LogBuffer) -> None:
    """Form posts send numbers as strings and msgpack-lite sends float timestamps: both coerced."""
    buf.feed({"clazz": "begin", "uuid": 7, "event": 1, "parent": 0, "timestamp": "1000"})
    (rec,) = buf.feed(
        {
            "clazz": "end",
            "uuid": "7",
            "event": 1.0,
            "timestamp": 1005.0,
            "duration": "5",
            "status": 0,
        }
    )
    assert rec["uuid"] == "7" and rec["event"] == "1"
    assert rec["timestamp"] == 1000 and rec["duration"] == 5 and rec["status"] == "0"


def test_custom_mapper_runs_first_and_its_errors_refuse_one_event(clock: Clock) -> None:
    """A custom mapper can rename fields; if it raises, only that event is refused."""

    def mapper(raw: dict) -> dict:
        if raw.get("boom"):
            raise RuntimeError("nope")
        return {"clazz": raw["kind"], "uuid": raw["rid"], "event": raw["id"], "name": raw["what"]}

    buf = LogBuffer(mapper, clock=clock)
    fed = buf.feed_many(
        [
            {"kind": "begin", "rid": "r", "id": "1", "what": "job"},
            {"boom": True},
            {"kind": "end", "rid": "r", "id": "1", "what": "job"},
        ]
    )
    assert [(i, x.reason) for i, x in fed.rejected] == [(1, "mapper_error")]
    (rec,) = fed.records
    assert rec["name"] == "job" and rec["type"] == "URL" and rec["complete"] is True


# ------------------------------------------------------------------ emitter wiring


def test_emitter_buffer_wires_log_in_and_kinds_out(clock: Clock) -> None:
    """The seed's wiring: 'log' in, 'transaction' / 'atomicEvent' / 'heartbeat' out."""
    emitter = EventEmitter()
    EmitterBuffer(emitter, buffer=LogBuffer(clock=clock))
    got: list[tuple[str, Any]] = []
    for kind in ("transaction", "atomicEvent", "heartbeat", "rejected"):
        emitter.on(kind, lambda r, k=kind: got.append((k, r)))
    emitter.emit("log", seed_tree())
    emitter.emit("log", {"clazz": "heartbeat"})
    emitter.emit("log", {"name": "solo"})
    emitter.emit("log", "junk")
    assert [k for k, _ in got] == ["transaction", "heartbeat", "atomicEvent", "rejected"]
    emitter.emit("log", ev("begin", "1", uuid="open"))
    emitter.emit("flush")
    assert got[-1][0] == "transaction" and got[-1][1]["reason"] == "shutdown"


def test_feed_many_leaves_the_callers_maps_as_they_were() -> None:
    """Feeding the same maps twice is a duplicate, not an error, and the records first
    published are not changed by the second feed (they used to be)."""
    buf = LogBuffer(native=False)
    events = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 1},
        {"uuid": "u", "event": "2", "parent": "1", "timestamp": 2},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 3},
    ]
    before = copy.deepcopy(events)
    (record,) = buf.feed_many(events).records
    assert events == before
    published = copy.deepcopy(record)
    assert buf.feed_many(events) == ([], [])
    assert buf.stats["duplicates"] == 3
    assert record == published
    same = dict(events[0], uuid="w")
    assert buf.feed_many([same, same]) == ([], [])  # one map twice in a batch
    assert buf.stats["duplicates"] == 4 and buf.open_count == 1


def test_feed_owned_turns_the_maps_into_the_records() -> None:
    buf = LogBuffer(native=False)
    event = {"uuid": "v", "parent": "0", "timestamp": 1}
    (record,) = buf.feed_owned([event]).records
    assert record is event and event["kind"] == "atomicEvent"


def test_is_open_says_whether_a_tree_is_held() -> None:
    buf = LogBuffer(native=False)
    begin = {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 1}
    buf.feed_many([begin])
    assert buf.is_open("u") and not buf.is_open("v")
    buf.feed_many([dict(begin, clazz="end", timestamp=2)])
    assert not buf.is_open("u")
