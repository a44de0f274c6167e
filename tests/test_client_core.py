"""The client's sans-I/O core, retry policy and URL helpers: no sockets, no threads, no sleeps."""

from __future__ import annotations

import datetime
import itertools
import random
from typing import Any

import msgspec
import pytest

from async_logging import wire
from async_logging.client.context import Scope
from async_logging.client.core import ClientCore, CoreLimits, plain
from async_logging.client.items import RAW, Item, Release, make_item
from async_logging.client.transports import (
    ConnectionLost,
    ServerRefused,
    backoff,
    http_url,
    is_retryable,
    ws_url,
)
from async_logging.exceptions import UsageError
from async_logging.model import ATOMIC, BEGIN, END, map_events

#: A time in ns since the epoch (whole ms), as items carry it.
T0 = 1_700_000_000_000_000_000


def tree(
    uuid: str, children: int = 2, ts: int = T0, data: dict[str, Any] | None = None
) -> list[Item]:
    """The items of one root transaction (id 1) with ``children`` atomic events."""
    tx = Scope(uuid, 1, itertools.count(2))
    return [
        make_item(BEGIN, tx, "URL", "/x", None, None, None, ts, 0),
        *(make_item(ATOMIC, tx, "DB", "q", "INFO", "m", data, ts) for _ in range(children)),
        make_item(END, tx, "URL", "/x", None, None, None, ts, 0, "0", 5),
    ]


def lone(msg: str) -> Item:
    """A stand-alone atomic event."""
    return make_item(ATOMIC, None, "LOG", "x", None, msg, None, T0)


def standalone(n: int = 1) -> list[Item]:
    return [make_item(ATOMIC, None, "LOG", "x", "INFO", f"m{i}", None, T0) for i in range(n)]


def core(**limits: Any) -> ClientCore:
    return ClientCore(pid=42, machine="box", limits=CoreLimits(**limits))


def drain(c: ClientCore) -> list[dict[str, Any]]:
    """Every envelope ready now, decoded, each acked."""
    out = []
    while (env := c.next_to_send()) is not None:
        out.append(msgspec.msgpack.decode(env.payload))
        c.ack(env.seq)
    return out


def test_tree_is_held_until_its_root_ends_then_sent_in_one_envelope() -> None:
    """Events of a uuid are not sent before the root's end, then all go in one frame."""
    c = core()
    events = tree("u1", children=3)
    c.feed(events[:-1], now=0.0)
    c.tick(now=0.0)
    assert c.next_to_send() is None
    c.feed(events[-1:], now=0.0)
    c.tick(now=0.0)
    [env] = drain(c)
    assert [e["clazz"] for e in env["logs"]] == ["begin", *["atomicEvent"] * 3, "end"]
    assert {e["uuid"] for e in env["logs"]} == {"u1"}


def test_standalone_events_go_out_on_the_next_tick() -> None:
    """Events with no uuid (or top-level atomic ones) are not held: the next drain sends them."""
    c = core()
    items = [
        *standalone(2),
        make_item(ATOMIC, Scope("u9", 0, itertools.count(1)), "LOG", "top", None, None, None, T0),
    ]
    c.feed(items, now=0.0)
    c.tick(now=0.0)
    [env] = drain(c)
    assert len(env["logs"]) == 3
    assert c.held_uuids == 0


def test_hold_limits_release_partial_trees() -> None:
    """ready_threshold (count) and hold_timeout (age, injected clock) release a tree still open."""
    c = core(ready_threshold=3, hold_timeout=10.0)
    c.feed(tree("a", children=5)[:3], now=0.0)  # begin + 2 children = threshold
    c.feed(tree("b", children=1)[:2], now=1.0)
    c.tick(now=1.0)
    [env] = drain(c)
    assert {e["uuid"] for e in env["logs"]} == {"a"}
    c.tick(now=10.5)
    assert drain(c) == []  # b is 9.5 s old
    c.tick(now=11.0)
    [env] = drain(c)
    assert [e["uuid"] for e in env["logs"]] == ["b", "b"]


def test_release_marker_sends_what_is_held_for_a_foreign_uuid() -> None:
    """A Release(uuid) marker (a bound scope ended) sends that uuid's events at once."""
    c = core()
    foreign = Scope("f", "7", iter(["t.1"]))
    c.feed([make_item(ATOMIC, foreign, "DB", "q", None, None, None, T0)], now=0.0)
    c.tick(now=0.0)
    assert c.next_to_send() is None
    c.feed([Release("f")], now=0.0)
    c.tick(now=0.0)
    [env] = drain(c)
    assert env["logs"][0]["event"] == "t.1"


def test_batches_respect_batch_size_without_splitting_trees() -> None:
    """Envelopes hold at most batch_size events and a tree that fits is never split."""
    c = core(batch_size=10)
    items = [e for i in range(7) for e in tree(f"t{i}", children=2)]  # 7 trees of 4
    c.feed(items, now=0.0)
    c.tick(now=0.0)
    envs = drain(c)
    assert [len(e["logs"]) for e in envs] == [8, 8, 8, 4]
    for env in envs:
        uuids = [e["uuid"] for e in env["logs"]]
        for u in set(uuids):
            assert uuids.count(u) == 4


def test_a_tree_bigger_than_a_batch_is_split_in_order() -> None:
    """A tree over batch_size travels in consecutive envelopes, every event once, in order."""
    c = core(batch_size=4, ready_threshold=100)
    c.feed(tree("big", children=8), now=0.0)
    c.tick(now=0.0)
    envs = drain(c)
    assert [len(e["logs"]) for e in envs] == [4, 4, 2]
    assert [e["seq"] for e in envs] == [1, 2, 3]


def test_unacked_envelopes_are_resent_in_seq_order_after_a_lost_connection() -> None:
    """connection_lost puts in-flight envelopes back in front, oldest first, counted as resent."""
    c = core(batch_size=4, max_in_flight=2)
    c.feed([e for i in range(3) for e in tree(f"t{i}", children=2)], now=0.0)
    c.tick(now=0.0)
    first, second = c.next_to_send(), c.next_to_send()
    assert first is not None and second is not None
    assert c.next_to_send() is None  # window of 2
    assert c.ack(second.seq)
    assert c.connection_lost() == 1
    again = c.next_to_send()
    assert again is not None and again.seq == first.seq and again.payload == first.payload
    assert c.resent == 4
    third = c.next_to_send()
    assert third is not None and third.seq == 3
    assert not c.settled(3)
    c.ack(again.seq)
    c.ack(third.seq)
    assert c.settled(3) and c.pending_events == 0
    assert c.acked == 12 and c.sent == 16


def test_a_late_ack_of_a_resent_envelope_counts_once() -> None:
    """An ack for an envelope already acked (a duplicate answer) changes nothing."""
    c = core()
    c.feed(standalone(3), now=0.0)
    c.tick(now=0.0)
    env = c.next_to_send()
    assert env is not None
    assert c.ack(env.seq)
    assert not c.ack(env.seq)
    assert c.acked == 3


def test_refused_frames_are_bisected_down_to_the_bad_event() -> None:
    """A frame refused as a whole is split and resent; a single refused event is dropped as rejected."""
    c = core()
    c.feed(standalone(4), now=0.0)
    c.tick(now=0.0)
    env = c.next_to_send()
    assert env is not None
    assert c.refuse(env.seq)
    halves = [c.next_to_send(), c.next_to_send()]
    assert [h.count for h in halves if h] == [2, 2]
    first, second = halves
    assert first is not None and second is not None
    c.ack(second.seq)
    c.refuse(first.seq)
    quarter = c.next_to_send()
    assert quarter is not None and quarter.count == 1
    c.refuse(quarter.seq, splittable=False)
    assert c.rejected == 1
    last = c.next_to_send()
    assert last is not None
    c.ack(last.seq)
    assert c.acked == 3 and c.pending_events == 0
    assert c.settled(env.seq)


def test_rejected_events_inside_an_ack_are_counted() -> None:
    """An ack that lists refused events counts them as rejected, the rest as acked."""
    c = core()
    c.feed(standalone(5), now=0.0)
    c.tick(now=0.0)
    env = c.next_to_send()
    assert env is not None
    c.ack(env.seq, rejected=2)
    assert (c.acked, c.rejected) == (3, 2)


def test_room_shrinks_with_pending_events_and_bytes() -> None:
    """room() is what is left under max_queue_events and (estimated) max_queue_bytes."""
    c = core(max_queue_events=100)
    assert c.room() == 100
    c.feed(standalone(30), now=0.0)
    assert c.room() == 70
    c.tick(now=0.0)
    assert c.room() == 70  # encoded but unacked still counts
    drain(c)
    assert c.room() == 100
    small = core(max_queue_bytes=10_000)
    big = lone("y" * 2000)
    small.feed([big] * 4, now=0.0)
    small.tick(now=0.0)
    assert 8000 < small.pending_bytes < 10_000
    assert small.room() < 10  # bytes, not the 200k events limit, bound it
    small.feed([big], now=0.0)
    small.tick(now=0.0)
    assert small.room() == 0


def test_frames_over_the_byte_limit_are_split_and_a_huge_event_is_refused() -> None:
    """max_frame_bytes splits big envelopes; a lone event bigger than it is counted rejected."""
    c = core(max_frame_bytes=3000)
    c.feed([lone("y" * 1000)] * 4, now=0.0)
    c.tick(now=0.0)
    envs = drain(c)
    assert sum(len(e["logs"]) for e in envs) == 4
    assert all(len(msgspec.msgpack.encode(e)) <= 3000 for e in envs)
    huge = core(max_frame_bytes=3000, max_string_length=10_000)
    huge.feed([lone("y" * 5000)], now=0.0)
    huge.tick(now=0.0)
    assert drain(huge) == [] and huge.rejected == 1


def test_long_messages_and_extra_strings_are_cut_to_the_string_limit() -> None:
    """A message, or a string value of extra data (an exception text), longer than
    max_string_length is cut (the proxy would refuse the frame)."""
    c = core(max_string_length=10)
    extra = {"exception": "e" * 50, "short": "ok"}
    c.feed([lone("z" * 50), make_item(ATOMIC, None, "LOG", "x", None, None, extra, T0)], 0.0)
    c.tick(now=0.0)
    [env] = drain(c)
    assert env["logs"][0]["msg"] == "z" * 10
    assert (env["logs"][1]["exception"], env["logs"][1]["short"]) == ("e" * 10, "ok")


def test_wire_events_follow_the_design_keys_and_pass_the_server_decoder() -> None:
    """Envelopes decode with the proxy's own decoder and map to docs/design.md §2 events (ids as strings)."""
    c = core()
    extra = {"rows": 3, "when": datetime.datetime(2024, 1, 2), "tags": (1, 2), "ids": {7}}
    items = tree("w", children=1, data=extra)
    c.feed(items, now=0.0)
    c.tick(now=0.0)
    env = c.next_to_send()
    assert env is not None
    frame = wire.decode_msgpack(env.payload)
    assert frame.seq == env.seq
    rejected: list[Any] = []
    begin, child, end = map_events(frame.logs, 0, rejected)
    assert rejected == []
    assert begin["clazz"] == "begin" and begin["parent"] == "0" and begin["event"] == "1"
    assert end["clazz"] == "end" and end["event"] == begin["event"]
    assert end["status"] == "0" and end["duration"] == 5
    assert child["parent"] == "1" and child["event"] == "2" and child["level"] == "INFO"
    assert child["rows"] == 3 and child["when"] == "2024-01-02 00:00:00"
    assert child["tags"] == [1, 2] and child["ids"] == "{7}"
    for e in (begin, child, end):
        assert e["timestamp"] == T0 // 1_000_000
        assert (e["pid"], e["machine"], e["uuid"]) == (42, "box", "w")


def test_raw_maps_keep_their_keys_and_get_pid_and_machine() -> None:
    """A raw log map (client.log) is sent as it is, plus pid/machine, made msgpack-safe."""
    c = core()
    raw = {"clazz": "atomicEvent", "msg": "hi", "custom": {"a": b"x"}, 5: "five", "timestamp": 7}
    c.feed([make_item(RAW, None, None, None, None, None, raw)], now=0.0)
    c.tick(now=0.0)
    [env] = drain(c)
    [e] = env["logs"]
    assert e == {
        "clazz": "atomicEvent",
        "msg": "hi",
        "custom": {"a": "b'x'"},
        "5": "five",
        "timestamp": 7,
        "pid": 42,
        "machine": "box",
    }


def test_abandon_counts_everything_still_queued() -> None:
    """abandon() forgets held, batched and in-flight events and says how many."""
    c = core()
    c.feed(tree("open", children=2)[:-1], now=0.0)
    c.feed(standalone(2), now=0.0)
    c.tick(now=0.0)
    assert c.next_to_send() is not None
    assert c.abandon() == 5
    assert c.pending_events == 0


def test_plain_turns_what_the_proxy_refuses_into_strings() -> None:
    """plain() keeps maps, arrays, strings, numbers, booleans and nil; the rest become str()."""
    assert plain({"a": (1, 2.5, None, True), 3: "x"}) == {"a": [1, 2.5, None, True], "3": "x"}
    assert plain(2**70) == str(2**70)
    assert plain(float("nan")) == "nan"
    assert plain(b"ab") == "b'ab'"


def test_limits_are_validated() -> None:
    """A non-positive limit or a batch over the proxy's frame limit is a UsageError."""
    with pytest.raises(UsageError):
        CoreLimits(batch_size=0)
    with pytest.raises(UsageError):
        CoreLimits(batch_size=20_000)


def test_backoff_grows_exponentially_to_its_cap_with_jitter() -> None:
    """backoff() doubles up to max_delay; jitter takes up to its fraction off each delay."""
    assert list(itertools.islice(backoff(1.0, 2.0, 5.0, jitter=0.0), 5)) == [
        1.0,
        2.0,
        4.0,
        5.0,
        5.0,
    ]
    assert list(itertools.islice(backoff(1.0, 2.0, 5.0, jitter=0.5, rng=lambda: 1.0), 3)) == [
        0.5,
        1.0,
        2.0,
    ]


def test_backoff_jitter_leaves_the_applications_random_state_alone() -> None:
    """The default jitter draws from the client's own generator: an application that seeded
    the global ``random`` for itself gets the same sequence whatever the client does."""
    random.seed(7)
    state = random.getstate()
    delays = list(itertools.islice(backoff(1.0, 2.0, 5.0, jitter=0.5), 20))
    assert random.getstate() == state
    assert len(set(delays[4:])) > 1  # still jittered: the capped delays differ


def test_is_retryable_separates_network_trouble_from_misuse() -> None:
    """Network errors and refusals are retried; a usage error is not."""
    assert is_retryable(ConnectionLost("x"))
    assert is_retryable(ServerRefused(503))
    assert is_retryable(ConnectionRefusedError())
    assert is_retryable(TimeoutError())
    assert not is_retryable(UsageError("bad url"))
    assert not is_retryable(KeyError("bug"))


def test_url_helpers_map_schemes_and_endpoints() -> None:
    """ws_url/http_url convert schemes and append the endpoint path once."""
    assert ws_url("http://h:3000/") == "ws://h:3000/"
    assert ws_url("wss://h/") == "wss://h/"
    assert http_url("ws://h:3000/", "/log") == "http://h:3000/log"
    assert http_url("wss://h/prefix/", "/log") == "https://h/prefix/log"
    assert http_url("http://h/log", "/log") == "http://h/log"
    with pytest.raises(UsageError):
        ws_url("ftp://h/")
