"""Property tests of the reassembly engine (:class:`async_logging.LogBuffer`, docs/design.md §3).

Random valid transaction trees are generated as plain Python objects (:class:`Node`), turned
into the wire events a client would send, fed to the engine in random orders and splits, and
the records that come out are compared with an expectation built *here*, from the generated
tree and the rules of docs/design.md §2–§3, never by asking the engine.

Every wire event carries a tracer key (``x-tb`` on begins, ``x-te`` on ends, ``x-tl`` on
atomic events and heartbeats) with a value unique in the test, so "every event appears
exactly once in the output" is a count of tracers over all published records: a merged
transaction node holds both its begin's and its end's tracer.

The engine mutates what it is fed, so every feed uses fresh deep copies of the pristine
generated events. Time is a fake millisecond clock; nothing sleeps.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_logging import Fed, LogBuffer
from helpers import Clock, all_nodes

T0 = 1_700_000_000_000
DEFAULT_TIMEOUT_MS = 60_000 * 3
TRACE_KEYS = ("x-tb", "x-te", "x-tl")

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- tree model


@dataclass
class Node:
    """One node of a generated tree: a transaction (begin + end) or a leaf event."""

    kind: str  # "tx", "atomicEvent", "heartbeat"
    eid: str | None  # normalised id ("7", "e7"), None for an id-less leaf
    parent: str  # normalised parent id, "0" for the root
    ts: int  # begin (or leaf) timestamp
    span: int = 0  # end.timestamp - begin.timestamp
    children: list[Node] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # wire: [begin, end] or [leaf]

    def walk(self) -> Iterator[Node]:
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))


@dataclass
class Tree:
    uuid: str
    root: Node
    events: list[dict[str, Any]]  # every wire event of the tree, pristine

    def nodes(self) -> Iterator[Node]:
        return self.root.walk()

    def tx_nodes(self) -> list[Node]:
        return [n for n in self.nodes() if n.kind == "tx"]


def tracer(e: dict[str, Any]) -> str:
    for k in TRACE_KEYS:
        if k in e:
            return e[k]
    raise AssertionError(f"event without tracer: {e!r}")


def fresh(events: Iterable[Any]) -> list[Any]:
    return [copy.deepcopy(e) for e in events]


def feed(buf: LogBuffer, events: Iterable[Any]) -> Fed:
    return buf.feed_many(fresh(events))


# --------------------------------------------------------------------------- strategies

uuids = st.one_of(st.uuids().map(str), st.text("abcdef0123456789-", min_size=1, max_size=12))
extra_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["k", "l"]), st.integers(0, 3), max_size=2),
)


def extras(prefix: str) -> st.SearchStrategy[dict[str, Any]]:
    """Unknown keys a client may add: they must survive to the record."""
    return st.dictionaries(
        st.sampled_from([f"{prefix}{c}" for c in "abc"]), extra_values, max_size=2
    )


def ms_on_wire(draw: st.DrawFn, value: int) -> Any:
    """Milliseconds as a client may send them: int, integral float or numeric string."""
    how = draw(st.sampled_from(["int", "int", "str", "float"]))
    if how == "str":
        return str(value)
    if how == "float":
        return float(value)
    return value


def id_on_wire(draw: st.DrawFn, eid: str) -> Any:
    """An id as a client may send it: a string, or an int when it is numeric."""
    if eid.isdigit() and draw(st.booleans()):
        return int(eid)
    return eid


@st.composite
def _shape(draw: st.DrawFn, max_depth: int, max_fanout: int, max_nodes: int, min_root: int) -> Node:
    budget = [max_nodes - 1]

    def gen(kind: str, depth: int) -> Node:
        node = Node(kind=kind, eid=None, parent="0", ts=0)
        if kind != "tx":
            return node
        hi = min(max_fanout, budget[0])
        k = draw(st.integers(min(min_root, hi) if depth == 1 else 0, hi))
        budget[0] -= k
        kinds = ["atomicEvent", "heartbeat"] + (["tx"] if depth < max_depth else [])
        # Distinct sibling offsets: children are ordered by (timestamp, arrival), and ties
        # legitimately depend on arrival.
        offsets = draw(st.lists(st.integers(0, 300), min_size=k, max_size=k, unique=True))
        for off in offsets:
            child = gen(draw(st.sampled_from(kinds)), depth + 1)
            child.ts = off  # relative for now
            node.children.append(child)
        node.span = max((c.ts + c.span for c in node.children), default=0) + draw(
            st.integers(0, 100)
        )
        return node

    return gen("tx", 1)


@st.composite
def trees(
    draw: st.DrawFn,
    uuid: str | None = None,
    max_depth: int = 6,
    max_fanout: int = 8,
    max_nodes: int = 30,
    min_root_children: int = 0,
    id_prefix: str | None = None,
    t_min: int = T0,
) -> Tree:
    """A random valid transaction tree and its wire events."""
    if uuid is None:
        uuid = draw(uuids)
    root = _shape(max_depth, max_fanout, max_nodes, min_root_children)
    root = draw(root)
    nodes = list(root.walk())
    numbers = draw(st.permutations(range(1, len(nodes) + 1)))
    prefix = id_prefix if id_prefix is not None else draw(st.sampled_from(["", "", "e", "span-"]))
    base = t_min + draw(st.integers(0, 10**6))
    root.ts = base
    for node, num in zip(nodes, numbers, strict=True):
        node.eid = f"{prefix}{num}"
    for node in nodes:  # pre-order: parents get absolute times first
        for c in node.children:
            c.ts += node.ts
            c.parent = node.eid  # type: ignore[assignment]
    events: list[dict[str, Any]] = []
    seq = 0

    def trace() -> str:
        nonlocal seq
        seq += 1
        return f"{uuid}#{seq}"

    for node in nodes:
        eid = node.eid
        assert eid is not None
        if node is root:
            parent_wire: Any = draw(st.sampled_from(["0", 0, None]))
        else:
            parent_wire = id_on_wire(draw, node.parent)
        common: dict[str, Any] = {"uuid": uuid}
        if parent_wire is not None:
            common["parent"] = parent_wire
        if node.kind == "tx":
            begin = {"clazz": "begin", **common, "event": id_on_wire(draw, eid)}
            ty = draw(st.sampled_from([None, "URL", "API", "DB"]))
            if ty is not None:
                begin["type"] = ty
            begin["name"] = draw(st.sampled_from(["/", "GET /a", "select", "call"]))
            begin["timestamp"] = ms_on_wire(draw, node.ts)
            if draw(st.booleans()):
                begin["pid"] = draw(st.integers(1, 99999))
            if draw(st.integers(0, 4)) == 0:
                begin["ip"] = "10.0.0.1"
            begin.update(draw(extras("x-b-")))
            begin["x-tb"] = trace()
            end = {"clazz": "end", **common, "event": id_on_wire(draw, eid)}
            end["timestamp"] = ms_on_wire(draw, node.ts + node.span)
            status = draw(st.sampled_from([None, "0", "0", "1", "500", 0, 1]))
            if status is not None:
                end["status"] = status
            dur = draw(st.sampled_from(["omit", "span", "other"]))
            if dur == "span":
                end["duration"] = ms_on_wire(draw, node.span)
            elif dur == "other":
                end["duration"] = ms_on_wire(draw, node.span + draw(st.integers(1, 50)))
            if draw(st.booleans()):
                end["name"] = begin["name"] + "!"
            if draw(st.booleans()):
                end["msg"] = draw(st.sampled_from(["ok", "failed", "done"]))
            end.update(draw(extras("x-e-")))
            end["x-te"] = trace()
            node.events = [begin, end]
        else:
            leaf: dict[str, Any] = {}
            if node.kind == "heartbeat" or draw(st.booleans()):
                leaf["clazz"] = node.kind
            leaf.update(common)
            if draw(st.integers(0, 3)) > 0:
                leaf["event"] = id_on_wire(draw, eid)
            else:
                node.eid = None
            leaf["type"] = draw(st.sampled_from(["INFO", "SQL", "URL"]))
            leaf["timestamp"] = ms_on_wire(draw, node.ts)
            leaf["msg"] = draw(st.text(max_size=6))
            if draw(st.booleans()):
                leaf["pid"] = draw(st.integers(1, 99999))
            leaf.update(draw(extras("x-l-")))
            leaf["x-tl"] = trace()
            node.events = [leaf]
        events.extend(node.events)
    return Tree(uuid=uuid, root=root, events=events)


def split(draw: st.DrawFn, items: list[Any], max_cuts: int = 5) -> list[list[Any]]:
    """Cut ``items`` into non-empty consecutive batches."""
    if len(items) < 2:
        return [items]
    cuts = sorted(draw(st.sets(st.integers(1, len(items) - 1), max_size=max_cuts)))
    bounds = [0, *cuts, len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- expectations


def mapped(wire: dict[str, Any]) -> dict[str, Any]:
    """What docs/design.md §2 says the mapper makes of a wire event (written independently)."""
    e = copy.deepcopy(wire)
    e.setdefault("clazz", "atomicEvent")
    e["uuid"] = str(e["uuid"])
    e["request"] = e["uuid"]
    if "event" in e:
        e["event"] = str(e["event"])
    e["parent"] = "0" if e.get("parent") is None else str(e["parent"])
    e.setdefault("type", "URL")
    e["timestamp"] = int(float(e["timestamp"]))
    if "duration" in e:
        e["duration"] = int(float(e["duration"]))
    if "status" in e:
        e["status"] = str(e["status"])
    if "ip" in e:
        e["ipAddress"] = e["ip"]
    if "pid" in e:
        digit = hashlib.md5(e["uuid"].encode()).hexdigest()[-1]
        e["tid"] = f"{e['pid']}-{digit}"
    return e


def expect(node: Node, open_ids: frozenset[str] = frozenset(), keep: set[str] | None = None) -> Any:
    """The record docs/design.md §3 promises for ``node``.

    ``open_ids``: transactions whose end never came (``missing_end``, duration up to the last
    thing known inside it). ``keep``: tracers of the events that arrived (None: all).
    """
    r = mapped(node.events[0])
    if node.kind != "tx":
        r["kind"] = r.pop("clazz")
        return r
    kids = [c for c in node.children if keep is None or tracer(c.events[0]) in keep]
    children = [expect(c, open_ids, keep) for c in sorted(kids, key=lambda c: c.ts)]
    r["kind"] = "transaction"
    if node.eid in open_ids:
        r["missing_end"] = True
        r.setdefault("status", "-1")
        last = r["timestamp"]
        for c in children:
            last = max(last, c["timestamp"] + (c["duration"] if c["kind"] == "transaction" else 0))
        r["duration"] = last - r["timestamp"]
        complete = False
    else:
        end = mapped(node.events[1])
        for k in ("name", "msg", "status", "duration"):
            if end.get(k) is not None:
                r[k] = end[k]
        for k, v in end.items():
            if k not in r:
                r[k] = v
        r.setdefault("duration", end["timestamp"] - r["timestamp"])
        r.setdefault("status", "-1")
        complete = True
    del r["clazz"]
    r["children"] = children
    r["complete"] = complete and all(c["complete"] for c in children if c["kind"] == "transaction")
    return r


def wire_facts(e: dict[str, Any]) -> tuple[str, str | None, str]:
    m = mapped(e)
    return m["clazz"], m.get("event"), m["parent"]


def is_closed(events: Iterable[dict[str, Any]]) -> bool:
    """Whether a group holding these events is publishable (docs/design.md §3), computed here."""
    begins: set[str] = set()
    ends: set[str] = set()
    referenced: set[str] = set()
    has_root = False
    for e in events:
        clazz, eid, parent = wire_facts(e)
        if clazz == "begin":
            begins.add(eid)  # type: ignore[arg-type]
            referenced.add(eid)  # type: ignore[arg-type]
            has_root = has_root or parent == "0"
        elif clazz == "end":
            ends.add(eid)  # type: ignore[arg-type]
            referenced.add(eid)  # type: ignore[arg-type]
        if clazz != "end" and parent != "0":
            referenced.add(parent)
    return has_root and referenced <= (begins & ends)


def tx_ids(events: Iterable[dict[str, Any]]) -> set[str]:
    return {eid for c, eid, _ in map(wire_facts, events) if c in ("begin", "end") and eid}


def check_late(
    records: list[dict[str, Any]],
    events: list[dict[str, Any]],
    published: set[str],
    shadowed: bool = False,
) -> bool:
    """Check the records fed ``events`` gave after a tree with transactions ``published`` was
    published: each event whose parent (or own transaction) was published comes out at once,
    on its own, flagged late.

    A late transaction's id is added to ``published`` (kept across calls), so its own
    children are late as well.
    Only up to the first event the engine cannot tie to the published tree: from there on
    it holds the uuid open again and the late ones may be swallowed. Returns whether that
    happened.
    """
    late = []
    for e in events:
        clazz, eid, parent = wire_facts(e)
        if parent in published or (clazz in ("begin", "end") and eid in published):
            late.append(tracer(e))
            if clazz in ("begin", "end") and eid:
                published.add(eid)
        else:
            shadowed = True
    if shadowed:
        assert {tracer(r) for r in records} <= set(late)
    else:
        assert [tracer(r) for r in records] == late
    assert all(r["late"] is True for r in records)
    return shadowed


def traces(records: Iterable[dict[str, Any]]) -> Counter[str]:
    c: Counter[str] = Counter()
    for n in all_nodes(records):
        for k in TRACE_KEYS:
            if k in n:
                c[n[k]] += 1
    return c


def check_shape(records: Iterable[dict[str, Any]]) -> None:
    """Published record shape (docs/design.md §3): kind instead of clazz, transaction fields present."""
    for n in all_nodes(records):
        assert "clazz" not in n, n
        assert n["kind"] in ("transaction", "atomicEvent", "heartbeat"), n
        if n["kind"] == "transaction":
            assert isinstance(n["children"], list), n
            assert type(n["complete"]) is bool, n
            assert type(n["duration"]) in (int, float), n  # float: microseconds
            assert type(n["status"]) is str, n
        else:
            assert "children" not in n and "complete" not in n, n


def tx_depth(record: dict[str, Any]) -> int:
    """Nesting depth in transaction levels, computed without recursion."""
    best = 0
    stack = [(record, 1)]
    while stack:
        n, d = stack.pop()
        if n["kind"] == "transaction":
            best = max(best, d)
            stack.extend((c, d + 1) for c in n["children"])
    return best


# --------------------------------------------------------------------------- 1. generator


@FAST
@given(trees())
def test_generated_trees_are_valid(tree: Tree) -> None:
    """The tree strategy yields valid trees: distinct ids, bounded shape, sane distinct times."""
    nodes = list(tree.nodes())
    ids = [n.eid for n in nodes if n.eid is not None]
    assert len(ids) == len(set(ids))
    assert len(tree.events) == sum(len(n.events) for n in nodes)
    assert len({tracer(e) for e in tree.events}) == len(tree.events)
    assert tx_depth(expect(tree.root)) <= 6
    for n in nodes:
        assert len(n.children) <= 8
        if n.kind != "tx":
            assert not n.children
            continue
        starts = [c.ts for c in n.children]
        assert len(starts) == len(set(starts))
        for c in n.children:
            assert n.ts <= c.ts and c.ts + c.span <= n.ts + n.span
            assert c.parent == n.eid
        begin, end = map(mapped, n.events)
        assert begin["timestamp"] == n.ts and end["timestamp"] == n.ts + n.span
    assert is_closed(tree.events)


# --------------------------------------------------------------------------- 2. one batch


@FAST
@given(st.data())
def test_any_permutation_in_one_batch_gives_the_canonical_tree(data: st.DataObject) -> None:
    """Any arrival order of a whole tree in one feed_many batch yields exactly the canonical record."""
    tree = data.draw(trees())
    order = data.draw(st.permutations(tree.events))
    buf = LogBuffer(clock=Clock(T0))
    fed = feed(buf, order)
    assert fed.rejected == []
    assert fed.records == [expect(tree.root)]
    check_shape(fed.records)
    assert buf.open_count == 0
    assert buf.stats["published_complete"] == 1
    assert buf.stats["events"] == len(tree.events)
    # Independent of arrival order: a second order gives the same record.
    other = data.draw(st.permutations(tree.events))
    assert LogBuffer(clock=Clock(T0)).feed_many(fresh(other)).records == fed.records


# --------------------------------------------------------------------------- 3. splits


@FAST
@given(st.data())
def test_any_split_with_settle_gives_the_canonical_tree(data: st.DataObject) -> None:
    """With settle > 0, any split of any order into batches yields the canonical tree, published
    exactly settle ms after the group last became closed."""
    tree = data.draw(trees())
    order = data.draw(st.permutations(tree.events))
    batches = split(data.draw, order)
    settle_ms = data.draw(st.sampled_from([1, 250, 1000, 5000]))
    clock = Clock(T0)
    buf = LogBuffer(clock=clock, settle=settle_ms / 1000)
    seen: list[dict[str, Any]] = []
    closed_at: int | None = None
    for batch in batches:
        clock.now += data.draw(st.integers(0, 2 * settle_ms))
        fed = feed(buf, batch)
        assert fed.records == [] and fed.rejected == []
        seen.extend(batch)
        if not is_closed(seen):
            closed_at = None
        elif closed_at is None:
            closed_at = clock.now
    assert closed_at is not None
    assert buf.expire(closed_at + settle_ms - 1) == []
    out = buf.expire(closed_at + settle_ms)
    assert out == [expect(tree.root)]
    assert buf.open_count == 0


@FAST
@given(st.data())
def test_split_without_settle_publishes_then_flags_late_and_loses_nothing(
    data: st.DataObject,
) -> None:
    """With settle=0 a tree is published when first closed; later events come out flagged late,
    and every wire event appears exactly once in the output."""
    tree = data.draw(trees(min_root_children=1))
    order = list(data.draw(st.permutations(tree.events)))
    root_end = tree.root.events[1]
    j = next(i for i, e in enumerate(order) if e is root_end)
    if j == len(order) - 1:  # make something arrive after the root's end
        k = data.draw(st.integers(0, len(order) - 2))
        order[j], order[k] = order[k], order[j]
        j = k
    head, tail = order[: j + 1], order[j + 1 :]
    batches = split(data.draw, head) + split(data.draw, tail)
    buf = LogBuffer(clock=Clock(T0))
    outputs: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    published: set[str] | None = None  # tx ids of the published tree
    shadowed = False  # an event after publication opened a new group for the uuid
    for batch in batches:
        records = feed(buf, batch).records
        outputs.extend(records)
        if published is None:
            seen.extend(batch)
            if is_closed(seen):
                keep = {tracer(e) for e in seen}
                assert records == [expect(tree.root, keep=keep)]
                published = tx_ids(seen)
            else:
                assert records == []
            continue
        shadowed = check_late(records, batch, published, shadowed)
    assert published is not None
    rest = buf.flush_all()
    outputs.extend(rest)
    check_shape(outputs)
    assert traces(outputs) == Counter(tracer(e) for e in tree.events)


# --------------------------------------------------------------------------- 4. timeouts


@FAST
@given(st.data())
def test_missing_end_is_published_incomplete_at_the_timeout(data: st.DataObject) -> None:
    """A tree with a transaction end missing is held until timeout ms after its last event, then
    published once, complete False, reason timeout, the open node flagged missing_end."""
    tree = data.draw(trees())
    txs = tree.tx_nodes()
    open_node = data.draw(st.sampled_from(txs))
    dropped = open_node.events[1]
    events = [e for e in tree.events if e is not dropped]
    order = data.draw(st.permutations(events))
    clean_duration = data.draw(st.sampled_from([0.5, 1.0, 60.0]))
    clean_cycles = data.draw(st.integers(1, 3))
    timeout = int(clean_duration * clean_cycles * 1000)
    clock = Clock(T0)
    buf = LogBuffer(clock=clock, clean_duration=clean_duration, clean_cycles=clean_cycles)
    # With the root's end there, a nested transaction not yet referenced by anything that has
    # arrived cannot hold the tree back: only one batch guarantees it is held.
    batches = split(data.draw, order) if open_node is tree.root else [order]
    for batch in batches:
        clock.now += data.draw(st.integers(0, timeout - 1))
        assert feed(buf, batch).records == []
        assert buf.expire() == []
    last = clock.now
    assert buf.expire(last + timeout - 1) == []
    out = buf.expire(last + timeout)
    want = expect(tree.root, open_ids=frozenset({open_node.eid}))  # type: ignore[arg-type]
    want["reason"] = "timeout"
    assert out == [want]
    check_shape(out)
    assert traces(out) == Counter(tracer(e) for e in events)
    assert out[0]["complete"] is False
    flagged = [n["event"] for n in all_nodes(out) if n.get("missing_end")]
    assert flagged == [open_node.eid]
    assert buf.open_count == 0 and buf.incomplete["timeout"] == 1
    assert buf.expire(last + 10 * timeout) == []


@FAST
@given(st.data())
def test_flush_all_publishes_open_trees_as_shutdown(data: st.DataObject) -> None:
    """flush_all publishes an open tree at once with complete False and reason shutdown."""
    tree = data.draw(trees())
    open_node = data.draw(st.sampled_from(tree.tx_nodes()))
    events = [e for e in tree.events if e is not open_node.events[1]]
    buf = LogBuffer(clock=Clock(T0))
    assert feed(buf, data.draw(st.permutations(events))).records == []
    out = buf.flush_all()
    want = expect(tree.root, open_ids=frozenset({open_node.eid}))  # type: ignore[arg-type]
    want["reason"] = "shutdown"
    assert out == [want]
    assert buf.flush_all() == []


# --------------------------------------------------------------------------- 5. duplicates


@FAST
@given(st.data())
def test_duplicates_are_dropped_and_counted(data: st.DataObject) -> None:
    """Feeding every event twice, interleaved anywhere and resent after publication, never
    doubles anything and counts each resend as a duplicate."""
    tree = data.draw(trees())
    n = len(tree.events)
    doubled = data.draw(st.permutations(tree.events + tree.events))
    settle_ms = data.draw(st.sampled_from([0, 1000]))
    clock = Clock(T0)
    buf = LogBuffer(clock=clock, settle=settle_ms / 1000)
    out: list[dict[str, Any]] = []
    # settle=0 publishes when first closed, so the doubled stream goes in one batch; with a
    # settle window it may be split anyhow.
    for batch in split(data.draw, doubled) if settle_ms else [doubled]:
        clock.now += data.draw(st.integers(0, 100))
        out.extend(feed(buf, batch).records)
    out.extend(buf.expire(clock.now + settle_ms))
    assert out == [expect(tree.root)]
    assert buf.stats["duplicates"] == n
    # Resent after publication (a client that never saw its ack): all dropped.
    for batch in split(data.draw, list(data.draw(st.permutations(tree.events)))):
        assert feed(buf, batch).records == []
    assert buf.expire(clock.now + 10 * DEFAULT_TIMEOUT_MS) == []
    assert buf.flush_all() == []
    assert buf.stats["duplicates"] == 2 * n
    assert buf.stats["published_complete"] == 1 and buf.stats["late"] == 0


# --------------------------------------------------------------------------- 6. cycles


@st.composite
def cyclic_groups(draw: st.DrawFn) -> tuple[Tree | None, list[list[str]], list[dict[str, Any]]]:
    """A uuid holding parent cycles (with subtrees hanging off them), maybe beside a proper tree.

    Returns the proper tree (or None), the cycles (lists of ids), and every wire event.
    """
    uuid = draw(uuids)
    proper = draw(st.one_of(st.none(), trees(uuid=uuid, max_nodes=10, id_prefix="")))
    events: list[dict[str, Any]] = list(proper.events) if proper else []
    cycles: list[list[str]] = []
    seq = 0
    for ci in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 4))
        ids = [f"c{ci}-{i}" for i in range(size)]
        cycles.append(ids)
        for i, eid in enumerate(ids):
            parent = ids[(i + 1) % size]  # size 1: its own parent
            ts = T0 + draw(st.integers(0, 10_000))
            seq += 1
            events.append(
                {"clazz": "begin", "uuid": uuid, "event": eid, "parent": parent,
                 "timestamp": ts, "x-tb": f"cyc-b{seq}"}
            )  # fmt: skip
            events.append(
                {"clazz": "end", "uuid": uuid, "event": eid, "parent": parent,
                 "timestamp": ts + draw(st.integers(0, 100)), "x-te": f"cyc-e{seq}"}
            )  # fmt: skip
            for _ in range(draw(st.integers(0, 2))):  # atomic children of a cycle member
                seq += 1
                events.append(
                    {"uuid": uuid, "parent": eid, "timestamp": ts + draw(st.integers(-50, 50)),
                     "msg": "in cycle", "x-tl": f"cyc-l{seq}"}
                )  # fmt: skip
        if draw(st.booleans()):  # a whole subtree hanging off the cycle
            # Its nodes may start before the cycle's members: the cut must still be in the loop.
            sub = draw(trees(uuid=uuid, max_nodes=6, id_prefix=f"s{ci}-", t_min=T0 - 5_000))
            hook = draw(st.sampled_from(ids))
            for e in sub.events:
                k = next(k for k in TRACE_KEYS if k in e)
                e[k] = f"sub{ci}-{e[k]}"  # unique beside the proper tree's tracers
            for e in sub.root.events:
                e["parent"] = hook
            events.extend(sub.events)
    return proper, cycles, events


@FAST
@given(cyclic_groups(), st.data())
def test_parent_cycles_are_cut_flagged_and_lose_nothing(
    group: tuple[Tree | None, list[list[str]], list[dict[str, Any]]], data: st.DataObject
) -> None:
    """Parent cycles terminate, are cut once per cycle at a member flagged cycle, and every event
    comes out exactly once."""
    proper, cycles, events = group
    order = data.draw(st.permutations(events))
    one_batch = data.draw(st.booleans())
    clock = Clock(T0)
    buf = LogBuffer(clock=clock)
    out: list[dict[str, Any]] = []
    for batch in [order] if one_batch else split(data.draw, order):
        out.extend(feed(buf, batch).records)
    if proper is None:
        assert out == []  # no root: nothing can close it before the timeout
    if data.draw(st.booleans()):
        out.extend(buf.flush_all())
    else:
        out.extend(buf.expire(clock.now + DEFAULT_TIMEOUT_MS))
    assert buf.open_count == 0
    check_shape(out)
    assert traces(out) == Counter(tracer(e) for e in events)
    members = {eid: i for i, ids in enumerate(cycles) for eid in ids}
    heads = [n["event"] for n in all_nodes(out) if n.get("cycle")]
    assert sorted(members[h] for h in heads if h in members) == list(range(len(cycles)))
    assert all(h in members for h in heads), f"non-member flagged cycle: {heads}"
    if proper is not None and one_batch:
        root = next(r for r in out if r.get("event") == proper.root.eid)
        assert root["complete"] is False and root["reason"] == "cycle"


# --------------------------------------------------------------------------- 7. depth


def chain(depth: int, uuid: str = "deep") -> list[dict[str, Any]]:
    """A chain of ``depth`` nested transactions (ids 1..depth) with one atomic at the bottom."""
    events: list[dict[str, Any]] = []
    for i in range(1, depth + 1):
        parent = str(i - 1) if i > 1 else "0"
        ev = str(i)
        events.append({"clazz": "begin", "uuid": uuid, "event": ev, "parent": parent,
                       "timestamp": T0 + i, "x-tb": f"b{i}"})  # fmt: skip
        events.append({"clazz": "end", "uuid": uuid, "event": ev, "parent": parent,
                       "timestamp": T0 + 2 * depth + 10 - i, "x-te": f"e{i}"})  # fmt: skip
    events.append({"uuid": uuid, "parent": str(depth), "timestamp": T0 + depth + 1, "x-tl": "leaf"})
    return events


def check_deep(records: list[dict[str, Any]], events: list[dict[str, Any]], max_depth: int) -> None:
    assert traces(records) == Counter(tracer(e) for e in events)
    for r in records:
        assert tx_depth(r) <= max_depth
        orjson.dumps(r)
    check_shape(records)


@SLOW
@given(
    st.integers(1, 100),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_a_500_deep_chain_is_cut_into_fragments(max_depth: int, closed: bool, seed: int) -> None:
    """A 500-deep chain, closed or not, comes out without RecursionError as records no deeper
    than max_depth, cut points flagged depth_cut, every event kept, all JSON-encodable."""
    depth = 500
    events = chain(depth)
    if not closed:
        events = [e for e in events if e.get("x-te") != "e1"]
    random.Random(seed).shuffle(events)
    buf = LogBuffer(clock=Clock(T0), max_depth=max_depth)
    out = feed(buf, events).records + buf.flush_all()
    check_deep(out, events, max_depth)
    assert len(out) == math.ceil(depth / max_depth)
    assert all(r.get("depth_cut") for r in out[1:])
    assert all(any(n.get("depth_cut") for n in all_nodes([r])) for r in out[:-1])
    assert out[0]["event"] == "1" and out[0]["complete"] is closed


@settings(max_examples=3, deadline=None)
@given(st.sampled_from([10, 16, 64]), st.integers(0, 2**32))
def test_a_5000_deep_chain_with_a_moderate_max_depth(max_depth: int, seed: int) -> None:
    """A 5000-deep chain (10001 events) comes out cut, complete, with every event kept."""
    events = chain(5000)
    random.Random(seed).shuffle(events)
    buf = LogBuffer(clock=Clock(T0), max_depth=max_depth, max_events_per_tx=20_000)
    out = feed(buf, events).records
    check_deep(out, events, max_depth)
    assert buf.open_count == 0 and len(out) == math.ceil(5000 / max_depth)


@pytest.mark.parametrize("closed", [True, False])
def test_a_5000_deep_chain_with_a_tight_max_depth(closed: bool) -> None:
    """A 5000-deep chain with max_depth=2 is cut into fragments without RecursionError."""
    events = chain(5000)
    if not closed:
        events = [e for e in events if e.get("x-te") != "e1"]
    buf = LogBuffer(clock=Clock(T0), max_depth=2, max_events_per_tx=20_000)
    out = feed(buf, events).records + buf.flush_all()
    check_deep(out, events, 2)


# --------------------------------------------------------------------------- 8. caps


@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.data())
def test_max_open_evicts_the_oldest_trees(
    n: int, k: int, one_batch: bool, data: st.DataObject
) -> None:
    """With max_open=N, opening N+k trees publishes the k oldest incomplete as evicted."""
    forest = [
        data.draw(trees(uuid=f"tree-{i}", max_nodes=6), label=f"tree {i}") for i in range(n + k)
    ]
    clock = Clock(T0)
    buf = LogBuffer(clock=clock, max_open=n)
    streams = []
    for t in forest:  # each tree left open: its root end never comes
        events = [e for e in t.events if e is not t.root.events[1]]
        streams.append(list(data.draw(st.permutations(events))))
    out: list[dict[str, Any]] = []
    if one_batch:
        out = feed(buf, [e for s in streams for e in s]).records
    else:
        for s in streams:
            clock.now += 1
            out.extend(feed(buf, s).records)
    assert [r["uuid"] for r in out] == [f"tree-{i}" for i in range(k)]
    for t, r in zip(forest, out, strict=False):
        want = expect(t.root, open_ids=frozenset({t.root.eid}))  # type: ignore[arg-type]
        want["reason"] = "evicted"
        assert r == want
    assert buf.stats["evicted"] == k and buf.incomplete["evicted"] == k
    assert buf.open_count == n
    rest = buf.flush_all()
    assert [r["uuid"] for r in rest] == [f"tree-{i}" for i in range(k, n + k)]
    assert all(r["reason"] == "shutdown" for r in rest)


@FAST
@given(st.data())
def test_max_events_per_tx_publishes_the_tree_and_flags_later_events_late(
    data: st.DataObject,
) -> None:
    """Reaching max_events_per_tx publishes the tree at once (evicted unless it was closed),
    later events of it come out late, and nothing is lost."""
    tree = data.draw(trees(min_root_children=2))
    # More than half the events: what is left after the cap cannot reach it again.
    cap = data.draw(st.integers(len(tree.events) // 2 + 1, len(tree.events) - 1))
    order = list(data.draw(st.permutations(tree.events)))
    buf = LogBuffer(clock=Clock(T0), max_events_per_tx=cap)
    out = feed(buf, order).records
    first, later = order[:cap], order[cap:]
    published = tx_ids(first)
    assert buf.stats["evicted"] >= 1
    # The cap publishes what the first `cap` events built, before anything else comes out.
    # What follows holds only later events: late records, and maybe a new tree when the
    # eviction left no root (its root then arrives as a transaction of its own).
    held = {tracer(e) for e in first}
    evicted = [r for r in out if set(traces([r])) <= held]
    assert out[: len(evicted)] == evicted
    assert traces(evicted) == Counter(held)
    if is_closed(first):
        assert evicted == [expect(tree.root, keep={tracer(e) for e in first})]
    else:
        assert all(r["reason"] == "evicted" for r in evicted if r.get("complete") is not True)
        if tree.root.events[0] in first:
            assert evicted[0]["event"] == tree.root.eid
            assert evicted[0]["complete"] is False and evicted[0]["reason"] == "evicted"
    rest = out[len(evicted) :]
    shadowed = check_late([r for r in rest if r.get("late")], later, published)
    assert shadowed or all(r.get("late") for r in rest)
    everything = out + buf.flush_all()
    check_shape(everything)
    assert traces(everything) == Counter(tracer(e) for e in tree.events)


# --------------------------------------------------------------------------- 9. bad input

bad_events = st.one_of(
    st.tuples(
        st.one_of(
            st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none()
        ),
        st.just("not_a_map"),
    ),
    st.tuples(
        st.fixed_dictionaries(
            {
                "clazz": st.one_of(st.sampled_from(["Begin", "start", ""]), st.integers()),
                "uuid": uuids,
            }
        ),
        st.just("unknown_clazz"),
    ),
    st.tuples(
        st.builds(
            lambda key, v: {"clazz": "begin", "uuid": "u-bad", "event": "1", key: v},
            st.sampled_from(["uuid", "event", "parent"]),
            st.lists(st.integers(0, 9), max_size=2),
        ),
        st.just("bad_id"),
    ),
    st.tuples(
        st.builds(
            lambda ts: {"clazz": "atomicEvent", "uuid": "u-bad", "parent": "1", "timestamp": ts},
            st.sampled_from(["abc", "", "12:00", "nan", "1e400", "-inf", "0x10"]),
        ),
        st.just("bad_timestamp"),
    ),
    st.tuples(
        st.builds(
            lambda clazz, uuid: (
                {"clazz": clazz, "event": "1", "timestamp": T0}
                | ({} if uuid is None else {"uuid": uuid})
            ),
            st.sampled_from(["begin", "end"]),
            st.sampled_from([None, ""]),
        ),
        st.just("missing_uuid"),
    ),
)


@FAST
@given(st.lists(trees(max_nodes=10), min_size=1, max_size=3, unique_by=lambda t: t.uuid), st.data())
def test_bad_events_never_cost_good_ones(forest: list[Tree], data: st.DataObject) -> None:
    """Bad events mixed into batches are refused, counted by reason and reported by index, and
    every good tree comes out exactly as without them."""
    good = [e for t in forest for e in t.events]
    bad = data.draw(st.lists(bad_events, min_size=1, max_size=6))
    stream: list[tuple[Any, str | None]] = [(e, None) for e in data.draw(st.permutations(good))]
    for b in bad:
        stream.insert(data.draw(st.integers(0, len(stream))), b)
    # Split batches need a settle window, or a tree closed early would see later events late.
    batches = split(data.draw, stream) if data.draw(st.booleans()) else [stream]
    clock = Clock(T0)
    buf = LogBuffer(clock=clock, settle=0 if len(batches) == 1 else 1.0)
    out: list[dict[str, Any]] = []
    for batch in batches:
        fed = feed(buf, [e for e, _ in batch])
        assert [(i, err.reason) for i, err in fed.rejected] == [
            (i, why) for i, (_, why) in enumerate(batch) if why is not None
        ]
        out.extend(fed.records)
    out.extend(buf.expire(clock.now + 1000))
    assert buf.open_count == 0
    assert buf.rejected == Counter(why for _, why in bad)
    assert buf.stats["rejected"] == len(bad)
    # Each good tree published as soon as it closed is its canonical record; one that closes
    # only at the end of a later batch too: compare by uuid.
    assert sorted(out, key=lambda r: r["uuid"]) == sorted(
        (expect(t.root) for t in forest), key=lambda r: r["uuid"]
    )


# --------------------------------------------------------------------------- engine bugs


def test_a_resent_late_event_is_a_duplicate() -> None:
    """A late event resent by the client is dropped as a duplicate, not published twice."""
    root = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
    ]
    child = {"clazz": "atomicEvent", "uuid": "u", "event": "2", "parent": "1", "timestamp": 5}
    buf = LogBuffer(clock=Clock(T0))
    assert len(feed(buf, root).records) == 1
    assert feed(buf, [child]).records[0]["late"] is True
    assert feed(buf, [child]).records == []
    assert buf.stats["duplicates"] == 1


def test_events_under_a_late_transaction_are_late_too() -> None:
    """After a tree is published, an event whose parent is a transaction that itself arrived
    late is published at once flagged late, not held for the timeout."""
    root = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
    ]
    late = [
        {"clazz": "begin", "uuid": "u", "event": "2", "parent": "1", "timestamp": 2},
        {"clazz": "end", "uuid": "u", "event": "2", "parent": "1", "timestamp": 8},
        {"clazz": "atomicEvent", "uuid": "u", "event": "3", "parent": "2", "timestamp": 5},
        # A direct child of the published root, after that: swallowed by the new group too.
        {"clazz": "atomicEvent", "uuid": "u", "event": "4", "parent": "1", "timestamp": 9},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert len(feed(buf, root).records) == 1
    out = feed(buf, late).records
    assert buf.open_count == 0
    assert [r["event"] for r in out] == ["2", "2", "3", "4"]
    assert all(r.get("late") for r in out)


def test_a_different_event_after_publication_is_not_a_duplicate() -> None:
    """An event arriving after publication that differs in content from every published event
    (same parent and timestamp, no id, other msg) is published late, not dropped."""
    tree = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
        {"uuid": "u", "parent": "1", "timestamp": 5, "msg": "first"},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert len(feed(buf, tree).records) == 1
    out = feed(buf, [{"uuid": "u", "parent": "1", "timestamp": 5, "msg": "second"}]).records
    assert [r["msg"] for r in out] == ["second"]
    assert out[0]["late"] is True and buf.stats["duplicates"] == 0


def test_a_node_missing_its_begin_still_has_status_and_duration() -> None:
    """A transaction published from its end alone (missing_begin) carries status and duration."""
    events = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
        {"clazz": "end", "uuid": "u", "event": "2", "parent": "1", "timestamp": 8},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert feed(buf, events).records == []
    out = buf.flush_all()
    node = out[0]["children"][0]
    assert node["missing_begin"] is True
    assert node.get("status") == "-1" and type(node.get("duration")) is int


def test_a_rootless_fragment_published_by_the_timeout_is_incomplete() -> None:
    """A closed transaction whose parent never came, published at the timeout, is flagged
    complete False with reason timeout (docs/design.md §3: incomplete trees carry a reason)."""
    events = [
        {"clazz": "begin", "uuid": "u", "event": "2", "parent": "1", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "2", "parent": "1", "timestamp": 10},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert feed(buf, events).records == []
    out = buf.expire(T0 + DEFAULT_TIMEOUT_MS)
    assert out[0]["orphan"] is True
    assert out[0]["complete"] is False and out[0]["reason"] == "timeout"
    assert buf.stats["published_complete"] == 0


def test_a_tree_of_exactly_max_events_per_tx_is_not_evicted() -> None:
    """max_events_per_tx is the number of events a tree may hold: exactly that many is no eviction."""
    events = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
        {"uuid": "u", "parent": "1", "timestamp": 5},
    ]
    buf = LogBuffer(clock=Clock(T0), max_events_per_tx=3, settle=1.0)
    assert feed(buf, events).records == []
    assert buf.stats["evicted"] == 0
    assert len(buf.expire(T0 + 1000)) == 1


def test_a_resent_tree_is_not_published_twice() -> None:
    """A whole tree resent after publication stays a duplicate even after another group of the
    same uuid (here an orphan event) was published in between."""
    root = [
        {"clazz": "begin", "uuid": "u", "event": "1", "parent": "0", "timestamp": 0},
        {"clazz": "end", "uuid": "u", "event": "1", "parent": "0", "timestamp": 10},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert len(feed(buf, root).records) == 1
    feed(buf, [{"uuid": "u", "parent": "2", "timestamp": 5}])  # parent tx never comes
    assert len(buf.flush_all()) == 1
    assert feed(buf, root).records == []  # the client resends the tree it never saw acked
    assert buf.stats["published_complete"] == 1 and buf.stats["duplicates"] == 2


def test_a_subtree_hanging_off_a_cycle_stays_under_it() -> None:
    """With a cycle A <-> B and a transaction C under A that started earlier, the cycle is cut at
    a member and C stays a child of A, not flagged cycle."""
    events = [
        {"clazz": "begin", "uuid": "u", "event": "A", "parent": "B", "timestamp": 10},
        {"clazz": "end", "uuid": "u", "event": "A", "parent": "B", "timestamp": 20},
        {"clazz": "begin", "uuid": "u", "event": "B", "parent": "A", "timestamp": 11},
        {"clazz": "end", "uuid": "u", "event": "B", "parent": "A", "timestamp": 19},
        {"clazz": "begin", "uuid": "u", "event": "C", "parent": "A", "timestamp": 1},
        {"clazz": "end", "uuid": "u", "event": "C", "parent": "A", "timestamp": 2},
    ]
    buf = LogBuffer(clock=Clock(T0))
    assert feed(buf, events).records == []
    out = buf.flush_all()
    assert [n["event"] for n in all_nodes(out) if n.get("cycle")] in (["A"], ["B"])
    parent_of = {c["event"]: n["event"] for n in all_nodes(out) for c in n.get("children", ())}
    assert parent_of["C"] == "A"
