"""Exact trees on the client side: microsecond times that nest, and exact child counts.

What the client sends is checked as it would leave (the items of a client that never
starts, fed to the sans-I/O core and decoded), with the clocks replaced by hypothesis-driven
ones: no server, no sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_logging.client import LogClient, LogHandler, event, registry, transaction, wrap
from async_logging.client.core import ClientCore
from async_logging.client.testing import CaptureTransport
from client_trees import Tx, capturing_client, check_tree, sent_trees, trees


class Boom(Exception):
    pass


#: A program: a transaction ("tx", raises, steps) whose steps are events, log records or
#: nested programs.
Step = Any
steps: st.SearchStrategy[Step] = st.recursive(
    st.sampled_from(["event", "log", "child"]),
    lambda inner: st.tuples(st.just("tx"), st.booleans(), st.lists(inner, max_size=4)),
    max_leaves=25,
)
programs = st.tuples(st.just("tx"), st.booleans(), st.lists(steps, max_size=5))

log = logging.getLogger("app.timing")


def run(step: Step, tx: Any = None, depth: int = 0) -> None:
    """Perform ``step`` in transaction ``tx``: log an event, a record or a child through the
    handle, or run a nested transaction (caught when it raises)."""
    if step == "event":
        event("DB", "q")
    elif step == "log":
        log.warning("line")
    elif step == "child":
        tx.child("H", "via handle")
    else:
        _, raises, body = step
        with contextlib.suppress(Boom), transaction("T", f"d{depth}") as inner:
            for s in body:
                run(s, inner, depth + 1)
            if raises:
                raise Boom(f"at depth {depth}")


def compare(step: Step, tx: Tx) -> None:
    """``tx`` is what the program ``step`` logged: its children, status and error child."""
    _, raises, body = step
    assert tx.end is not None
    assert tx.end["childCount"] == len(body) + int(raises)
    assert tx.end["status"] == ("Boom" if raises else "0")
    assert len(tx.atomic("Exception")) == int(raises)
    nested = [s for s in body if isinstance(s, tuple)]
    assert len(nested) == len(tx.nested())
    for s, t in zip(nested, tx.nested(), strict=True):
        compare(s, t)


class Clocks:
    """A perf counter moved by hypothesis (0 to 3 µs a reading, sub-µs steps included) and
    a wall clock ``epoch`` ahead of it, put in place of every alias the client modules hold
    of ``time.perf_counter_ns`` and ``time.time_ns``."""

    def __init__(self, data: st.DataObject, epoch: int) -> None:
        self.data = data
        self.now = data.draw(st.integers(0, 10**12), label="perf start")
        self.epoch = epoch

    def perf_ns(self) -> int:
        self.now += self.data.draw(st.integers(0, 3000), label="ns step")
        return self.now

    def wall_ns(self) -> int:
        return self.epoch + self.perf_ns()

    def install(self, mp: pytest.MonkeyPatch) -> None:
        patched = 0
        for name, module in list(sys.modules.items()):
            if name.startswith("async_logging.client"):
                for attr, value in list(vars(module).items()):
                    if value is time.perf_counter_ns:
                        mp.setattr(module, attr, self.perf_ns)
                        patched += 1
                    elif value is time.time_ns:
                        mp.setattr(module, attr, self.wall_ns)
                        patched += 1
        assert patched >= 5  # items' two, scopes' one, context's two


def wire_events(client: LogClient) -> list[dict[str, Any]]:
    """What the client enqueued, as the core would send it."""
    core = ClientCore(pid=1, machine="m")
    core.feed(client.inbox.take(), now=0.0)
    core.flush_all()
    out: list[dict[str, Any]] = []
    while (env := core.next_to_send()) is not None:
        out.extend(msgspec.msgpack.decode(env.payload)["logs"])
        core.ack(env.seq)
    return out


@settings(max_examples=150, deadline=None)
@given(
    program=programs,
    epoch=st.integers(1_500_000_000 * 10**9, 2_500_000_000 * 10**9),
    data=st.data(),
)
def test_every_child_lies_within_its_parent_and_every_end_counts_its_children(
    program: Step, epoch: int, data: st.DataObject
) -> None:
    """For any nesting of transactions, events, log records and handle children (some
    transactions raising), on any clock: every child's [timestamp, timestamp + duration]
    lies within its parent's, to the microsecond; an end's timestamp is its begin's plus
    its duration; every end's childCount is its number of direct children (its Exception
    child included); times are float milliseconds, sub-millisecond spans not 0."""
    previous = registry.default.client
    client = LogClient(transport=CaptureTransport(), default=True, exit_timeout=0, start=False)
    handler = LogHandler(client)
    log.addHandler(handler)
    log.propagate = False
    try:
        with pytest.MonkeyPatch.context() as mp:
            Clocks(data, epoch).install(mp)
            run(program)
        events = wire_events(client)
    finally:
        log.removeHandler(handler)
        client.close(0)
        registry.default.client = previous
    [root] = trees(events).values()
    check_tree(root)
    compare(program, root)
    for e in events:
        assert isinstance(e["timestamp"], float)
        assert round(e["timestamp"] * 1000) / 1000 == e["timestamp"]  # whole µs, no finer
        assert abs(e["timestamp"] - epoch / 1e6) < 3_600_000  # ms since the epoch


def test_children_from_many_threads_and_tasks_are_each_counted_once() -> None:
    """2,000 children emitted at once from 8 threads (wrap()-ped) and nested transactions
    in them: every end's childCount is exact, and every child lies within its parent."""
    with capturing_client() as (client, capture):
        with transaction("URL", "/fan-out"), ThreadPoolExecutor(8) as pool:

            def work(i: int) -> None:
                event("JOB", f"e{i}")
                if i % 10 == 0:
                    with transaction("API", f"t{i}"):
                        for _ in range(5):
                            event("JOB", "inner")

            list(pool.map(wrap(work), range(2000)))
        [root] = sent_trees(client, capture).values()
    check_tree(root)
    assert root.end is not None and root.end["childCount"] == 2000 + 200
    assert all(t.end is not None and t.end["childCount"] == 5 for t in root.nested())


def test_a_span_under_a_millisecond_keeps_its_microseconds() -> None:
    """A real sub-millisecond transaction is sent with a non-zero float duration."""
    with capturing_client() as (client, capture):
        with transaction("DB", "fast"):
            pass
        [root] = sent_trees(client, capture).values()
    assert root.end is not None
    duration = root.end["duration"]
    assert isinstance(duration, float) and 0 < duration < 1000, duration
