"""The client API on the application side: transactions, events, context, logging bridges.

Runs a real LogClient (sender thread and all) over the in-memory CaptureTransport, so what
is asserted is exactly what would reach the proxy; no server, no sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

import async_logging.client as alc
from async_logging.client import (
    LogClient,
    LogHandler,
    bind,
    configure,
    event,
    get_client,
    heartbeat,
    loguru_sink,
    registry,
    scopes,
    structlog_processor,
    transaction,
    wrap,
)
from async_logging.client.testing import CaptureTransport
from async_logging.exceptions import UsageError
from conftest import TIMEOUT


@pytest.fixture
def capture() -> CaptureTransport:
    return CaptureTransport()


@pytest.fixture
def client(capture: CaptureTransport) -> Iterator[LogClient]:
    """A default client over the capture transport; the previous default is restored after."""
    previous = registry.default.client
    c = LogClient(transport=capture, default=True, drain_interval=0.01, exit_timeout=0)
    try:
        yield c
    finally:
        c.close(TIMEOUT)
        registry.default.client = previous


def sent(client: LogClient, capture: CaptureTransport) -> list[dict[str, Any]]:
    """Everything enqueued so far, as the proxy would receive it."""
    assert client.flush(TIMEOUT)
    return list(capture.events)


def by_clazz(events: list[dict[str, Any]], clazz: str) -> list[dict[str, Any]]:
    return [e for e in events if e["clazz"] == clazz]


class FakeClock:
    """Replaces the perf counter (ns): each call returns the next value."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def __call__(self) -> int:
        return self.values.pop(0)


def test_transaction_logs_begin_and_end_with_duration_and_success(
    client: LogClient, capture: CaptureTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `with transaction()` logs a begin and an end sharing one id, status "0", no child,
    and the measured time in float ms with microseconds: 123.999 µs is 0.123 ms, not 0."""
    monkeypatch.setattr(scopes, "_perf_ns", FakeClock(10_000_000_000, 10_000_123_999))
    monkeypatch.setattr(scopes, "new_epoch", lambda: 1_700_000_000_000_000_000)
    with transaction("URL", "/home", page=1) as tx:
        pass
    begin, end = sent(client, capture)
    assert begin["clazz"] == "begin" and end["clazz"] == "end"
    assert begin["event"] == end["event"] == tx.event == 1
    assert begin["uuid"] == end["uuid"] == tx.uuid and len(tx.uuid) == 32
    assert begin["parent"] == end["parent"] == 0
    assert (begin["type"], begin["name"], begin["page"]) == ("URL", "/home", 1)
    assert end["status"] == "0" and end["duration"] == 0.123 and end["childCount"] == 0
    assert tx.duration == 0.123
    assert begin["timestamp"] == 1_700_000_010_000.0  # (epoch + perf) ns as ms
    assert end["timestamp"] == 1_700_000_010_000.123


def test_failed_transaction_reports_the_exception_class_or_the_status_set(
    client: LogClient, capture: CaptureTransport
) -> None:
    """An exception escaping the block becomes the status (and is re-raised); a status set on the handle wins."""
    with pytest.raises(KeyError), transaction("API", "lookup"):
        raise KeyError("x")
    with transaction("API", "pay") as tx:
        tx.set_status(402)
        tx.set(amount=5)
    with pytest.raises(ValueError), transaction("API", "chosen") as tx2:
        tx2.status = "E42"
        raise ValueError
    ends = by_clazz(sent(client, capture), "end")
    assert [(e["name"], e["status"]) for e in ends] == [
        ("lookup", "KeyError"),
        ("pay", "402"),
        ("chosen", "E42"),
    ]
    assert ends[1]["amount"] == 5


async def test_async_transactions_and_decorators(
    client: LogClient, capture: CaptureTransport
) -> None:
    """`async with` and decorated sync/async functions each log one transaction named after the function."""

    @transaction("DB")
    async def fetch(x: int) -> int:
        event("DB", "row", msg=str(x))
        return x * 2

    @transaction("CPU", "crunch")
    def crunch(x: int) -> int:
        return x + 1

    async with transaction("URL", "/async") as tx:
        assert await fetch(2) == 4
        assert crunch(1) == 2
    events = await asyncio.to_thread(sent, client, capture)
    begins = by_clazz(events, "begin")
    assert [b["name"] for b in begins] == [
        "/async",
        "test_async_transactions_and_decorators.<locals>.fetch",
        "crunch",
    ]
    assert begins[1]["parent"] == begins[2]["parent"] == tx.event
    [row] = by_clazz(events, "atomicEvent")
    assert row["parent"] == begins[1]["event"]
    assert fetch.__name__ == "fetch"


def test_a_transaction_cannot_be_entered_twice(client: LogClient) -> None:
    """Reusing one Transaction object as a context manager twice is a UsageError."""
    tx = transaction("URL", "/once")
    with tx:
        pass
    with pytest.raises(UsageError):
        tx.__enter__()


async def test_event_ids_stay_unique_across_concurrent_tasks(
    client: LogClient, capture: CaptureTransport
) -> None:
    """200 tasks started inside one transaction log into it, with ids unique within the uuid."""

    async def work(i: int) -> None:
        await asyncio.sleep(0)
        with transaction("API", f"call{i}"):
            await asyncio.sleep(0)
            event("DB", "q", msg=str(i))

    with transaction("URL", "/fan-out") as root:
        await asyncio.gather(*(work(i) for i in range(200)))
    events = await asyncio.to_thread(sent, client, capture)
    assert len(events) == 2 + 200 * 3
    assert {e["uuid"] for e in events} == {root.uuid}
    ids = {e["event"] for e in events if e["clazz"] != "end"}
    assert len(ids) == 1 + 400
    begins = {e["event"]: e for e in by_clazz(events, "begin")}
    for e in by_clazz(events, "atomicEvent"):
        assert begins[e["parent"]]["name"] == f"call{e['msg']}"
    assert all(b["parent"] == root.event for b in begins.values() if b["name"] != "/fan-out")


def test_wrap_carries_the_context_into_threads(
    client: LogClient, capture: CaptureTransport
) -> None:
    """A wrap()-ped callable run in other threads logs into the transaction; a bare one does not."""
    with transaction("URL", "/threads") as tx, ThreadPoolExecutor(4) as pool:

        def job(i: int) -> None:
            event("JOB", f"w{i}")

        list(pool.map(wrap(job), range(8)))
        pool.submit(event, "JOB", "bare").result()
    events = sent(client, capture)
    wrapped = [e for e in events if e.get("name", "").startswith("w")]
    assert len(wrapped) == 8
    assert all(e["uuid"] == tx.uuid and e["parent"] == tx.event for e in wrapped)
    assert len({e["event"] for e in wrapped}) == 8
    [bare] = [e for e in events if e.get("name") == "bare"]
    assert "uuid" not in bare and bare["parent"] == 0


def test_explicit_uuid_and_parent_place_events_produced_elsewhere(
    client: LogClient, capture: CaptureTransport
) -> None:
    """event(uuid=, parent=), bind() and transaction(uuid=) join a foreign tree with non-colliding string ids."""
    event("MQ", "got", uuid="ext-1", parent="5")
    with bind("ext-2", "9"):
        event("MQ", "inside")
        with transaction("API", "handle"):
            pass
    with transaction("URL", "/in", uuid="ext-3"):
        event("DB", "q")
    events = sent(client, capture)
    got = next(e for e in events if e.get("name") == "got")
    assert (got["uuid"], got["parent"]) == ("ext-1", "5")
    inside = next(e for e in events if e.get("name") == "inside")
    assert (inside["uuid"], inside["parent"]) == ("ext-2", "9")
    handle = next(e for e in events if e.get("name") == "handle" and e["clazz"] == "begin")
    assert handle["parent"] == "9"
    ext3 = [e for e in events if e.get("uuid") == "ext-3"]
    assert len(ext3) == 3
    for e in (got, inside, handle, *ext3):
        assert isinstance(e["event"], str) and "." in e["event"]  # "<process tag>.<n>"
    assert len({e["event"] for e in events if e["clazz"] != "end"}) == len(events) - 2


def test_stand_alone_events_heartbeats_and_raw_maps(
    client: LogClient, capture: CaptureTransport
) -> None:
    """Outside a transaction: event() is stand-alone, heartbeat() a heartbeat, log() passes its map through."""
    event("LOG", "boot", msg="up", level="INFO", version="1.2")
    heartbeat(name="svc", cpu_percent=3.5)
    client.log({"clazz": "atomicEvent", "type": "RAW", "custom": [1, 2]})
    ev, hb, raw = sent(client, capture)
    assert ev["clazz"] == "atomicEvent" and "uuid" not in ev and ev["version"] == "1.2"
    assert (ev["level"], ev["msg"]) == ("INFO", "up")
    assert hb["clazz"] == "heartbeat" and hb["name"] == "svc" and hb["cpu_percent"] == 3.5
    assert raw["type"] == "RAW" and raw["custom"] == [1, 2] and isinstance(raw["timestamp"], float)
    for e in (ev, hb, raw):
        assert e["machine"] == client.machine and isinstance(e["pid"], int)


def test_a_whole_tree_goes_in_one_envelope(client: LogClient, capture: CaptureTransport) -> None:
    """All 105 events of one tree, nested transaction included, reach the transport in one envelope."""
    with transaction("URL", "/tree") as tx:
        for i in range(50):
            event("DB", f"q{i}")
            event("LOG", "line")
        with transaction("API", "inner"):
            event("X", "y")
    assert client.flush(TIMEOUT)
    envelopes = [
        env for env in capture.envelopes if any(e.get("uuid") == tx.uuid for e in env["logs"])
    ]
    assert len(envelopes) == 1
    assert len(envelopes[0]["logs"]) == 2 + 100 + 3


def test_stats_count_what_was_sent_and_acked(client: LogClient, capture: CaptureTransport) -> None:
    """After a flush, stats say every event was sent and acked, none queued or dropped."""
    for i in range(10):
        event("LOG", str(i))
    assert client.flush(TIMEOUT)
    s = client.stats
    assert (s.sent, s.acked, s.queued, s.dropped, s.lost, s.reconnects) == (10, 10, 0, 0, 0, 0)
    assert s.frames >= 1 and s.bytes > 0 and s.connected


def test_events_after_close_are_dropped_and_counted(capture: CaptureTransport) -> None:
    """A closed client never sends again; what it is given is counted as dropped."""
    c = LogClient(transport=capture, default=False, drain_interval=0.01, exit_timeout=0)
    c.event("LOG", "before")
    assert c.close(TIMEOUT)
    c.event("LOG", "after")
    c.log({"msg": "after"})
    assert c.stats.dropped == 2
    assert [e["name"] for e in capture.events] == ["before"]


def test_the_first_client_is_the_default_until_configure_names_another(
    capture: CaptureTransport,
) -> None:
    """The module-level API uses the first client created, or the one given to configure()."""
    previous = registry.default.client
    registry.default.client = None
    other_capture = CaptureTransport()
    first = LogClient(transport=capture, exit_timeout=0)
    second = LogClient(transport=other_capture, exit_timeout=0)
    try:
        assert get_client() is first
        event("LOG", "to-first")
        assert configure(second) is second
        event("LOG", "to-second")
        assert first.flush(TIMEOUT) and second.flush(TIMEOUT)
        assert [e["name"] for e in capture.events] == ["to-first"]
        assert [e["name"] for e in other_capture.events] == ["to-second"]
        with pytest.raises(UsageError):
            configure(second, url="ws://x/")
    finally:
        first.close(TIMEOUT)
        second.close(TIMEOUT)
        registry.default.client = previous


def test_logging_handler_makes_children_inside_and_stand_alone_events_outside(
    client: LogClient, capture: CaptureTransport
) -> None:
    """Records in a transaction become its atomic children (level, message, logger, exception); others stand alone."""
    logger = logging.getLogger("app.handler-test")
    handler = LogHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.info("outside %d", 1)
        with transaction("URL", "/log") as tx:
            logger.warning("inside %s", "tx")
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("failed")
        logging.getLogger("async_logging.client.x").addHandler(handler)
        logging.getLogger("async_logging.client.x").warning("own records are never sent")
    finally:
        logger.removeHandler(handler)
        logging.getLogger("async_logging.client.x").removeHandler(handler)
    events = sent(client, capture)
    logs = {e["msg"]: e for e in events if e.get("type") == "LOG"}
    assert sorted(logs) == ["failed", "inside tx", "outside 1"]
    outside, inside, failed = logs["outside 1"], logs["inside tx"], logs["failed"]
    assert "uuid" not in outside and outside["level"] == "INFO"
    assert outside["name"] == outside["logger"] == "app.handler-test"
    assert (
        inside["uuid"] == tx.uuid and inside["parent"] == tx.event and inside["level"] == "WARNING"
    )
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exception"]


def test_structlog_and_loguru_bridges_send_events(
    client: LogClient, capture: CaptureTransport
) -> None:
    """The structlog processor and the loguru sink turn their entries into events in the current tree."""

    message = SimpleNamespace(
        record={
            "level": SimpleNamespace(name="WARNING"),
            "message": "from loguru",
            "name": "svc.mod",
            "extra": {"user": "u1"},
            "exception": None,
            "time": None,
        }
    )

    with transaction("URL", "/bridges") as tx:
        entry = {"event": "from structlog", "logger": "svc", "user": "u2"}
        assert structlog_processor(None, "info", entry) is entry
        loguru_sink(message)
    events = sent(client, capture)
    st = next(e for e in events if e.get("msg") == "from structlog")
    lg = next(e for e in events if e.get("msg") == "from loguru")
    assert (st["level"], st["name"], st["user"], st["parent"]) == ("INFO", "svc", "u2", tx.event)
    assert (lg["level"], lg["name"], lg["user"], lg["parent"]) == (
        "WARNING",
        "svc.mod",
        "u1",
        tx.event,
    )


def test_flush_waits_for_acks_and_reports_success(
    client: LogClient, capture: CaptureTransport
) -> None:
    """flush() returns True only once everything enqueued before it was acknowledged."""
    done = threading.Event()

    def producer() -> None:
        for i in range(1000):
            event("LOG", str(i))
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert done.wait(TIMEOUT)
    t.join()
    assert client.flush(TIMEOUT)
    assert len(capture.events) == 1000 and client.stats.acked == 1000


def test_public_names() -> None:
    """async_logging.client.__all__ lists the supported names, each importable."""
    for name in alc.__all__:
        assert hasattr(alc, name), name
    assert {"LogClient", "transaction", "event", "heartbeat", "configure", "wrap"} <= set(
        alc.__all__
    )
