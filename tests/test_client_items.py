"""The items the application enqueues: one named type, one builder, used by every entry point."""

from __future__ import annotations

import ast
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import async_logging.client as client_package
from async_logging.client import (
    HeartbeatMonitor,
    LogClient,
    LogHandler,
    event,
    heartbeat,
    log,
    loguru_sink,
    registry,
    structlog_processor,
    transaction,
)
from async_logging.client import items as items_module
from async_logging.client.context import Scope
from async_logging.client.items import RAW, Item, Release, make_item
from async_logging.client.testing import CaptureTransport
from async_logging.model import ATOMIC, BEGIN, END, HEARTBEAT
from conftest import TIMEOUT


def test_an_atomic_event_is_a_child_of_its_scope_or_stand_alone() -> None:
    """In a scope an event draws the tree's next id under the scope's transaction (or the
    parent given, "0" read as 0); with none it is stand-alone at the top."""
    scope = Scope("u", 4, itertools.count(7))
    child = make_item(ATOMIC, scope, "DB", "q", "INFO", "m", {"rows": 1}, 1_500)
    assert (child.uuid, child.event, child.parent) == ("u", 7, 4)
    assert (child.type, child.name, child.level, child.msg) == ("DB", "q", "INFO", "m")
    assert (child.timestamp, child.data) == (1_500, {"rows": 1})
    elsewhere = make_item(ATOMIC, scope, "DB", "q", None, None, None, None, "0")
    assert (elsewhere.event, elsewhere.parent) == (8, 0)
    alone = make_item(HEARTBEAT, None, "heartbeat", "svc", None, None, {})
    assert (alone.uuid, alone.event, alone.parent, alone.data) == (None, None, 0, None)
    assert alone.timestamp > 0


def test_begin_and_end_are_the_record_of_the_transaction_they_are_made_in() -> None:
    """A begin or end takes its scope's own id (no id drawn) and the parent it is given."""
    tx = Scope("u", 3, itertools.count(10))
    begin = make_item(BEGIN, tx, "URL", "/", None, None, None, 1_000, 2)
    end = make_item(END, tx, "URL", "/", None, "done", None, 2_000, 2, "0", 12)
    assert (begin.uuid, begin.event, begin.parent) == (end.uuid, end.event, end.parent)
    assert (begin.event, begin.parent) == (3, 2)
    assert (end.msg, end.status, end.duration) == ("done", "0", 12)
    assert next(tx.ids) == 10


def test_a_raw_map_travels_whole_and_gets_a_timestamp_in_ms_when_it_has_none() -> None:
    """A RAW item carries the map as its data; only a missing timestamp is added (in ms,
    with microseconds)."""
    raw = make_item(RAW, None, None, None, None, None, {"msg": "x"}, 1_250_123_999)
    assert raw.clazz is RAW and raw.data == {"msg": "x", "timestamp": 1250.123}
    kept = make_item(RAW, None, None, None, None, None, {"timestamp": 7})
    assert kept.data == {"timestamp": 7}


def test_items_are_built_only_by_the_builder() -> None:
    """No module of the client package calls Item(...) except make_item() itself."""
    package = Path(client_package.__file__).parent
    callers = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        builder = range(0)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "make_item":
                builder = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        callers += [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Item"
            and not (path.name == "items.py" and node.lineno in builder)
        ]
    assert callers == []


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Item]]:
    """Every item made from now on, by whichever module calls the builder."""
    made: list[Item] = []
    real = items_module.make_item

    def spy(*args: Any, **kwargs: Any) -> Item:
        item = real(*args, **kwargs)
        made.append(item)
        return item

    patched = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("async_logging.client") and getattr(module, "make_item", None) is real:
            monkeypatch.setattr(module, "make_item", spy)
            patched += 1
    assert patched >= 4  # api, client, scopes, logging_handler (and items itself)
    yield made


@pytest.fixture
def unstarted() -> Iterator[LogClient]:
    """The default client, never started: what it is given stays in its inbox."""
    previous = registry.default.client
    client = LogClient(transport=CaptureTransport(), default=True, exit_timeout=0, start=False)
    try:
        yield client
    finally:
        client.close(TIMEOUT)
        registry.default.client = previous


def _loguru_message() -> Any:
    record = {"level": SimpleNamespace(name="INFO"), "message": "m", "name": "svc"}
    return SimpleNamespace(record={**record, "extra": {}, "exception": None, "time": None})


ENTRY_POINTS: dict[str, tuple[int, Callable[[LogClient], Any]]] = {
    "LogClient.event": (1, lambda c: c.event("LOG", "x")),
    "LogClient.event(uuid=)": (1, lambda c: c.event("LOG", "x", uuid="ext", parent="3")),
    "event": (1, lambda c: event("LOG", "x")),
    "LogClient.heartbeat": (1, lambda c: c.heartbeat(name="svc")),
    "heartbeat": (1, lambda c: heartbeat(name="svc")),
    "HeartbeatMonitor.beat": (1, lambda c: HeartbeatMonitor(c).beat()),
    "LogClient.log": (1, lambda c: c.log({"msg": "raw"})),
    "log": (1, lambda c: log({"msg": "raw"})),
    "LogHandler": (
        1,
        lambda c: LogHandler(c).handle(logging.makeLogRecord({"name": "app", "msg": "m"})),
    ),
    "structlog_processor": (1, lambda c: structlog_processor(None, "info", {"event": "m"})),
    "loguru_sink": (1, lambda c: loguru_sink(_loguru_message(), c)),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_enqueues_what_the_builder_made(
    name: str, unstarted: LogClient, built: list[Item]
) -> None:
    """Each way to log puts in the inbox exactly the items make_item() returned."""
    count, call = ENTRY_POINTS[name]
    call(unstarted)
    queued = unstarted.inbox.take()
    assert len(built) == count
    assert [id(it) for it in queued] == [id(it) for it in built]


def test_a_transaction_enqueues_the_builders_begin_child_and_end(
    unstarted: LogClient, built: list[Item]
) -> None:
    """A transaction's begin and end, and a child logged through its handle, are built by
    make_item(); a foreign-rooted one adds only its Release marker."""
    with transaction("URL", "/", uuid="ext", parent="5") as tx:
        tx.child("DB", "q")
    queued = unstarted.inbox.take()
    assert [it.clazz for it in built] == [BEGIN, ATOMIC, END]
    assert queued[:3] == built and all(a is b for a, b in zip(queued, built, strict=False))
    assert isinstance(queued[3], Release) and len(queued) == 4


def test_a_child_is_counted_in_its_scope_unless_placed_elsewhere() -> None:
    """An atomic event made in a scope counts as one of its transaction's children, with no
    parent given or with the scope's own id; one given another parent is not counted (the
    count may fall short, never over); a begin or an end counts nothing."""
    scope = Scope("u", 4, itertools.count(7))
    make_item(ATOMIC, scope, "DB", "q", None)
    make_item(ATOMIC, scope, "DB", "q", None, None, None, None, 4)
    make_item(ATOMIC, scope, "DB", "q", None, None, None, None, 9)
    make_item(BEGIN, scope, "URL", "/", None, None, None, None, 4)
    make_item(END, scope, "URL", "/", None, None, None, None, 4)
    assert next(scope.kids) == 2


def test_a_nested_transaction_counts_in_its_enclosing_one_only_when_it_is_its_child(
    unstarted: LogClient,
) -> None:
    """A transaction opened inside another is one of its children; given another parent
    (or another tree's uuid) it is not; each end carries its own count."""
    with transaction("URL", "/") as outer:
        with transaction("API", "child"):
            event("DB", "grandchild")
        with transaction("API", "placed", parent=99):
            pass
        with transaction("API", "other tree", uuid="elsewhere"):
            pass
        event("DB", "child")
    ends = {
        it.name: it for it in unstarted.inbox.take() if isinstance(it, Item) and it.clazz == END
    }
    assert ends["/"].child_count == 2 and outer.event == ends["/"].event
    assert (ends["child"].child_count, ends["placed"].child_count) == (1, 0)
    assert ends["other tree"].child_count == 0
