"""``async-logging tail`` (issue 6): the SSE parser, the tree rendering, and streaming from real servers."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from rich.console import Console

from async_logging import tail as tail_mod
from async_logging.server import LogCluster, MonApp
from async_logging.server.viewer import Viewer
from async_logging.tail import SseParser, TailError, TailFilters, render, tail
from conftest import TIMEOUT
from helpers import free_port, post_logs

T0 = int(time.time() * 1000)


def wire_tree(uuid: str, name: str, status: str = "0") -> list[dict[str, Any]]:
    """A request with a nested API call holding an error event, and a log line under the root."""
    return [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "type": "URL", "name": name, "timestamp": T0},
        {"clazz": "atomicEvent", "uuid": uuid, "event": "2", "parent": "1", "type": "INFO", "name": "req", "msg": "hello", "timestamp": T0 + 1},
        {"clazz": "begin", "uuid": uuid, "event": "3", "parent": "1", "type": "API", "name": "pay", "timestamp": T0 + 2},
        {"clazz": "atomicEvent", "uuid": uuid, "event": "4", "parent": "3", "type": "ERROR", "name": "gw", "msg": "declined", "level": "ERROR", "timestamp": T0 + 3},
        {"clazz": "end", "uuid": uuid, "event": "3", "parent": "1", "status": status, "timestamp": T0 + 8},
        {"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "status": status, "timestamp": T0 + 10},
    ]  # fmt: skip


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120, no_color=True, highlight=False), out


# ------------------------------------------------------------------ parser and rendering


def test_sse_parser_reassembles_events_split_anywhere() -> None:
    """Events split across chunks at any byte, with CRLF line ends, comments and multi-line data, come out whole."""
    stream = (
        b"retry: 2000\r\n: a comment\r\n\r\n"
        b'event: record\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b'event: dropped\ndata: {"dropped":3}\n\n'
        b"data: plain\n\n"
    )
    for step in (1, 2, 7, len(stream)):
        parser = SseParser()
        events = []
        for i in range(0, len(stream), step):
            events += parser.feed(stream[i : i + step])
        assert events == [
            ("record", '{"a":\n1}'),
            ("dropped", '{"dropped":3}'),
            ("message", "plain"),
        ], step


def test_sse_parser_skips_an_oversized_event_and_counts_it() -> None:
    """An event longer than max_bytes is skipped and counted; the events after it still arrive."""
    parser = SseParser(max_bytes=64)
    events = parser.feed(b"event: record\ndata: " + b"x" * 100)
    events += parser.feed(b"y" * 100 + b"\n\nevent: record\ndata: ok\n\n")
    assert events == [("record", "ok")] and parser.oversized == 1


def test_render_nests_children_in_order_with_flags_and_status() -> None:
    """A record prints as an indented tree: children under their parent, in order, with durations, statuses and flags."""
    record = {
        "kind": "transaction", "type": "URL", "name": "/a", "status": "1", "duration": 12,
        "timestamp": T0, "uuid": "u-1", "complete": False, "reason": "timeout",
        "children": [
            {"kind": "atomicEvent", "type": "INFO", "name": "first", "msg": "hello", "timestamp": T0},
            {"kind": "transaction", "type": "DB", "name": "q", "status": "0", "duration": 3,
             "missing_end": True, "children": [
                 {"kind": "atomicEvent", "type": "SQL", "name": "s", "msg": "select [1]", "orphan": True},
             ]},
            {"kind": "atomicEvent", "type": "INFO", "name": "last", "late": True},
        ],
    }  # fmt: skip
    console, out = plain_console()
    console.print(render(record))
    lines = out.getvalue().splitlines()
    assert "URL /a  12 ms  status 1" in lines[0]
    assert "incomplete: timeout" in lines[0] and "uuid u-1" in lines[0]
    assert lines[1].startswith("├── ") and "INFO first  hello" in lines[1]
    assert lines[2].startswith("├── ") and "DB q  3 ms  status 0  [missing_end]" in lines[2]
    assert lines[3].startswith("│   └── ") and "select [1]" in lines[3] and "[orphan]" in lines[3]
    assert lines[4].startswith("└── ") and "last" in lines[4] and "[late]" in lines[4]
    assert len(lines) == 5


def test_render_caps_children_per_node() -> None:
    """A node with more than max_children children prints that many and one line saying how many more."""
    record = {"kind": "transaction", "type": "URL", "name": "/big", "children": [
        {"kind": "atomicEvent", "type": "E", "name": f"e{i}"} for i in range(10)
    ]}  # fmt: skip
    console, out = plain_console()
    console.print(render(record, max_children=3))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "… 7 more" in lines[-1]


def test_filters_build_the_live_query_and_refuse_bad_values() -> None:
    """The filters become /api/live's query parameters; an unknown kind or a negative duration is a usage error."""
    q = TailFilters(
        kinds=("transaction", "heartbeat"),
        type="URL",
        name="/a*",
        failures_only=True,
        min_duration=5,
    )
    assert q.query() == [
        ("kind", "transaction"), ("kind", "heartbeat"), ("type", "URL"), ("name", "/a*"),
        ("failures", "1"), ("min_duration", "5"),
    ]  # fmt: skip
    for bad in ({"kinds": ("span",)}, {"min_duration": -1}):
        with pytest.raises(TailError) as info:
            TailFilters(**bad)  # type: ignore[arg-type]
        assert info.value.status == 2


# ------------------------------------------------------------------ against a real server


@pytest.fixture
def server_options(tmp_path: Path) -> dict[str, Any]:
    """The live tail follows the store: a store (and its file) in the test's directory."""
    return {"store": str(tmp_path / "trees.sqlite"), "log_file": str(tmp_path / "all.log")}


async def test_tail_prints_the_published_tree_that_passes_its_filters(server: LogCluster) -> None:
    """tail() streams from a running server and prints the first matching tree, indented, then stops at --count."""
    console, out = plain_console()
    err, _ = plain_console()
    task = asyncio.create_task(
        tail(
            f"http://127.0.0.1:{server.mon_port}",
            TailFilters(name="/b", failures_only=True),
            console,
            count=1,
            err=err,
        )
    )
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
    await post_logs(server, wire_tree("a", "/a", status="1") + wire_tree("b-ok", "/b"))
    await post_logs(server, wire_tree("b-bad", "/b", status="7"))
    assert await asyncio.wait_for(task, TIMEOUT) == 1
    lines = out.getvalue().splitlines()
    assert "URL /b  10 ms  status 7" in lines[0] and "uuid b-bad" in lines[0]
    assert lines[1].startswith("├── ") and "INFO req  hello" in lines[1]
    assert lines[2].startswith("└── ") and "API pay  6 ms  status 7" in lines[2]
    assert lines[3].startswith("    └── ") and "ERROR gw  declined" in lines[3]
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(0), TIMEOUT)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "async_logging.cli", "tail", *args]


async def _run_tail(server: LogCluster, logs: list[dict[str, Any]], *args: str) -> list[str]:
    """`async-logging tail ARGS` against ``server``, its output into a pipe, once ``logs``
    are sent after it subscribed; the lines it wrote (it must exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        *_cli("--url", f"http://127.0.0.1:{server.mon_port}", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "80"},
    )
    try:
        await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
        await post_logs(server, logs)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    return out.decode().splitlines()


async def test_tail_command_prints_json_lines_and_exits_after_count(server: LogCluster) -> None:
    """`async-logging tail --json --count 2 --type URL` prints the two records as JSON lines and exits 0."""
    logs = wire_tree("c1", "/c") + wire_tree("c2", "/c", status="3")
    lines = await _run_tail(server, logs, "--json", "-n", "2", "--type", "URL")
    records = [orjson.loads(line) for line in lines]
    assert [(r["uuid"], r["status"]) for r in records] == [("c1", "0"), ("c2", "3")]


def test_tail_command_without_a_server_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    """With nothing listening at --url, tail exits 1 and says it cannot stream from that URL."""
    port = free_port()
    proc = subprocess.run(
        _cli("--url", f"http://127.0.0.1:{port}", "-n", "1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 1
    assert f"cannot stream from http://127.0.0.1:{port}/api/live" in proc.stderr


async def test_tail_against_a_server_without_store_reports_live_off(tmp_path: Path) -> None:
    """A viewer without a live hub (the store is off) makes tail fail with status 1 and the server's reason."""
    viewer = Viewer(None, None)
    mon = MonApp(lambda: {}, lambda: {"available": True}, viewer=viewer)
    port = await mon.start("127.0.0.1", 0)
    try:
        console, _ = plain_console()
        with pytest.raises(TailError, match="follows the store, which is off") as info:
            await tail(f"http://127.0.0.1:{port}", TailFilters(), console, count=1, err=console)
        assert info.value.status == 1
    finally:
        await mon.cleanup()
        await viewer.close()


@pytest.fixture
async def flaky_sse() -> AsyncIterator[tuple[str, list[int]]]:
    """An SSE endpoint that sends one record per connection, then ends the stream."""
    connections: list[int] = []

    async def live(request: web.Request) -> web.StreamResponse:
        connections.append(len(connections) + 1)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = len(connections)
        body = {"kind": "transaction", "type": "URL", "name": f"/conn{n}", "status": "0"}
        if n == 1:
            await resp.write(b'event: dropped\ndata: {"dropped":4}\n\n')
        await resp.write(b"event: record\ndata: %b\n\n" % orjson.dumps(body))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/live", live)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        await runner.cleanup()


async def test_tail_reconnects_when_the_stream_ends_and_reports_drops(
    flaky_sse: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the server ends the stream tail reconnects (with backoff) and goes on; a 'dropped' event is reported on stderr."""
    monkeypatch.setattr(tail_mod, "RECONNECT_MIN", 0.01)
    url, connections = flaky_sse
    console, out = plain_console()
    err, err_out = plain_console()
    n = await asyncio.wait_for(tail(url, TailFilters(), console, count=2, err=err), TIMEOUT)
    assert n == 2 and connections == [1, 2]
    assert "/conn1" in out.getvalue() and "/conn2" in out.getvalue()
    assert "4 records dropped" in err_out.getvalue()
    assert "reconnecting" in err_out.getvalue()
    console, out = plain_console()
    n = await asyncio.wait_for(
        tail(url, TailFilters(), console, count=5, reconnect=False, err=err), TIMEOUT
    )
    assert n == 1 and len(connections) == 3  # without reconnect, the end of the stream ends tail


# ------------------------------------------------------------------ issue 13: where and how it writes


async def test_tail_pointed_at_the_main_port_says_to_use_the_monitoring_port(
    server: LogCluster,
) -> None:
    """A --url that is the server's main port (where clients send logs) is a usage error (status 2) saying to use the monitoring port, not a bare 404."""
    console, _ = plain_console()
    with pytest.raises(TailError) as info:
        await tail(f"http://127.0.0.1:{server.port}", TailFilters(), console, count=1, err=console)
    assert info.value.status == 2
    message = str(info.value)
    assert f"http://127.0.0.1:{server.port} is the server's main port" in message
    assert "monitoring port" in message and "--mon-port" in message


#: A name longer than a terminal's line.
LONG_NAME = "/" + "n" * 300


async def test_tail_into_a_pipe_writes_one_record_per_line_never_wrapped(
    server: LogCluster,
) -> None:
    """With its output a pipe (not a terminal) tail writes each record as one JSON line, however long, whatever the terminal's width."""
    logs = wire_tree("p1", LONG_NAME) + wire_tree("p2", LONG_NAME)
    lines = await _run_tail(server, logs, "-n", "2")
    assert len(lines) == 2
    records = [orjson.loads(line) for line in lines]
    assert [(r["uuid"], r["name"]) for r in records] == [("p1", LONG_NAME), ("p2", LONG_NAME)]


async def test_tail_tree_into_a_pipe_writes_each_node_on_one_line_without_colour(
    server: LogCluster,
) -> None:
    """--tree into a pipe prints the trees with each node on one whole line (not cut or wrapped at 80 columns) and no colour codes."""
    logs = wire_tree("p1", LONG_NAME) + wire_tree("p2", LONG_NAME)
    lines = await _run_tail(server, logs, "-n", "2", "--tree")
    assert len(lines) == 8  # two trees of four nodes
    assert LONG_NAME + "  10 ms  status 0" in lines[0] and "uuid p1" in lines[0]
    assert lines[1].startswith("├── ") and "INFO req  hello" in lines[1]
    assert "uuid p2" in lines[4]
    assert all("\x1b[" not in line for line in lines)
