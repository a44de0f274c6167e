"""No slow or big request starves the rest; unmasked client frames close the connection
(issue 12, item 7 and the end of item 8).

Real servers on free ports: the in-process ``server`` fixture of conftest (options per test
with ``server_options``, a small ``request_timeout``), raw sockets where the bytes on the
wire are what is pinned, and a real ``async-logging serve`` where its memory and file
descriptors are.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil
import pytest

from async_logging.server import LogCluster
from async_logging.server.guard import FrameScan, InflightBudget, LogThrottle
from async_logging.server.listener import ACCEPT_ERROR_LOG_INTERVAL
from async_logging.testing import MemoryPublisher
from helpers import TIMEOUT, Metrics, Served, fetch_metrics, serve, tx
from test_server import until

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def metrics(session: aiohttp.ClientSession, server: LogCluster) -> Metrics:
    async with session.get(f"http://127.0.0.1:{server.mon_port}/metrics") as resp:
        return Metrics(await resp.text())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------- raw WebSocket


def ws_frame(
    payload: bytes, *, opcode: int = 2, masked: bool = True, length: int | None = None
) -> bytes:
    """One client frame (FIN set); ``length`` declares another payload size than sent."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x80 | opcode, mask_bit | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: (opcode, payload)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(n), TIMEOUT)


async def raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand (a real handshake), past the server's ``ready``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: log-protocol\r\n"
        b"Sec-WebSocket-Key: " + key.encode() + b"\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.split(b" ", 2)[1] == b"101", head
    assert await read_frame(reader) == (1, b"ready")
    return reader, writer


async def closed_with(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read frames until the server's close frame; return its code and reason, and check
    that the server then closes the connection."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 8:
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            return struct.unpack("!H", payload[:2])[0], payload[2:]


def envelope(seq: int, uuid: str) -> bytes:
    return msgpack.packb({"seq": seq, "logs": tx(uuid)})


# ====================================================================== unmasked frames


async def test_an_unmasked_frame_closes_the_websocket_with_1002(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A masked frame is acked; an unmasked one written right behind it (in the same write)
    closes the connection with 1002, is never taken, and is counted."""
    reader, writer = await raw_websocket(server.port)
    try:
        writer.write(
            ws_frame(envelope(1, "masked")) + ws_frame(envelope(2, "unmasked"), masked=False)
        )
        assert await read_frame(reader) == (1, b'{"ack":1}')
        assert await closed_with(reader) == (1002, b"unmasked frame")
    finally:
        writer.close()
    assert server.stats.bad_input["unmasked_frame"] == 1
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "masked"
    await until(lambda: server.stats.connections == 0, "the server to let the socket go")
    m = await metrics(session, server)
    assert m.get("async_logging_bad_input_total", reason="unmasked_frame") == 1
    assert [t["uuid"] for t in publisher.transactions] == ["masked"]


async def test_an_unmasked_control_frame_closes_the_websocket_too(server: LogCluster) -> None:
    """Every client frame must be masked, a ping as much as a data frame."""
    reader, writer = await raw_websocket(server.port)
    try:
        writer.write(ws_frame(b"hi", opcode=9, masked=False))
        assert await closed_with(reader) == (1002, b"unmasked frame")
    finally:
        writer.close()
    assert server.stats.bad_input["unmasked_frame"] == 1


# ====================================================================== slow bodies


def multipart_head(length: int) -> bytes:
    return (
        b"POST /log HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Content-Length: %d\r\n\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="logs"\r\n\r\n' % length
    )


async def drip_until_answered(port: int, head: bytes) -> bytes:
    """Send ``head``, then one byte every 0.05 s until the server answers; return all it
    sends until it closes. Bounded by TIMEOUT: a server that never cuts it fails the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    first = asyncio.ensure_future(reader.read(65536))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not first.done():
                writer.write(b"[")
                await asyncio.wait([first], timeout=0.05)
            got = first.result()
            while chunk := await reader.read(65536):  # the rest, to the close
                got += chunk
        return got
    finally:
        first.cancel()
        writer.close()


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.5}])
async def test_dripping_multipart_bodies_hit_the_request_timeout_and_give_back_their_fds(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """200 multipart forms dripped a byte at a time each get 408 after request_timeout
    and are closed, as other bodies are: the server's file descriptors come back and
    nothing is held in the budget; a good post meanwhile is served."""
    before = open_fds()
    n = 200
    start = time.monotonic()
    drips = [
        asyncio.ensure_future(drip_until_answered(server.port, multipart_head(10_000)))
        for _ in range(n)
    ]
    await until(lambda: server.stats.http_connections >= n, "the dripping connections")
    async with session.post(f"http://127.0.0.1:{server.port}/log", json=tx("good")) as resp:
        assert resp.status == 200, await resp.text()
    answers = await asyncio.gather(*drips)
    elapsed = time.monotonic() - start
    assert all(a.split(b" ", 2)[1] == b"408" for a in answers), {a[:40] for a in answers}
    assert b'"error":"request_timeout"' in answers[0]
    assert 0.45 <= elapsed < TIMEOUT, elapsed
    assert server.stats.bad_input["request_timeout"] == n
    await until(lambda: server.stats.http_connections == 0, "every connection closed")
    await session.close()  # its keep-alive connection is a descriptor too
    await until(lambda: open_fds() <= before, f"descriptors back to {before}: {open_fds()}")
    assert server.stats.inflight_bytes == 0 and server.listener is not None
    assert server.listener.budget.held == 0
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "good"


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.3}])
async def test_a_websocket_frame_that_does_not_arrive_in_time_closes_with_1008(
    server: LogCluster,
) -> None:
    """A frame whose head came but whose payload drips in is cut (1008) within two
    request_timeout periods, counted; a whole frame sent after a pause is not."""
    reader, writer = await raw_websocket(server.port)
    try:
        await asyncio.sleep(0.7)  # more than two periods between frames: allowed
        writer.write(ws_frame(envelope(1, "late-but-whole")))
        assert await read_frame(reader) == (1, b'{"ack":1}')
        frame = ws_frame(envelope(2, "dripped"))
        writer.write(frame[:10])
        start = time.monotonic()
        got = asyncio.ensure_future(closed_with(reader))
        for b in frame[10:]:
            if got.done():
                break
            writer.write(bytes([b]))
            await asyncio.wait([got], timeout=0.05)
        assert await got == (1008, b"request_timeout")
        assert time.monotonic() - start < 0.3 * 2 + 0.3
    finally:
        writer.close()
    assert server.stats.connections_refused == {"request_timeout": 1}
    await until(lambda: server.stats.inflight_bytes == 0, "the frame's bytes given back")


# ====================================================================== the in-flight budget


def test_inflight_budget_and_log_throttle_on_their_own() -> None:
    """The budget holds up to its limit and refuses past it (taking nothing); the throttle
    lets one line through per interval and counts the rest."""
    budget = InflightBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.held == 6
    assert budget.take(4) and budget.held == budget.peak == 10
    budget.release(10)
    assert budget.held == 0 and budget.peak == 10

    throttle = LogThrottle(10.0)
    assert throttle.allow(100.0) == 0
    assert [throttle.allow(100.0 + i) for i in range(1, 10)] == [None] * 9
    assert throttle.allow(110.0) == 9
    assert throttle.allow(115.0) is None and throttle.allow(121.0) == 1


def test_frame_scan_reads_heads_across_any_split() -> None:
    """Frame heads (7-bit, 16-bit and 64-bit lengths, masked or not) are read whatever the
    reads' boundaries; a frame part-way in for two period ends with no new head stalls."""
    stream = (
        ws_frame(b"a" * 10)
        + ws_frame(b"b" * 300)
        + ws_frame(b"c" * 70_000, masked=False)
        + ws_frame(b"", opcode=9)
    )
    for step in (1, 2, 3, 13, 1000, len(stream)):
        scan = FrameScan()
        heads = []
        for i in range(0, len(stream), step):
            heads += [(h.opcode, h.masked, h.length) for h in scan.feed(stream[i : i + step])]
        assert heads == [(2, True, 10), (2, True, 300), (2, False, 70_000), (9, True, 0)], step
        assert not scan.busy
    scan = FrameScan()
    assert [h.offset for h in scan.feed(stream)] == [0, 16, 16 + 308, 16 + 308 + 70_010]
    assert not scan.stalled()
    scan.feed(ws_frame(b"x" * 100)[:50])
    assert not scan.stalled()  # part-way in at this period's end: one more period
    assert scan.stalled()
    scan.feed(ws_frame(b"x" * 100)[50:])
    assert not scan.stalled()


TIGHT = {"max_message_bytes": 64 * KIB, "max_inflight_bytes": 64 * KIB, "request_timeout": 0.5}


@pytest.mark.parametrize("server_options", [TIGHT])
async def test_a_frame_or_body_past_the_budget_is_refused_until_bytes_come_back(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """While a WebSocket frame of 60 KiB is part-way in, the budget (64 KiB across every
    connection) refuses another WebSocket's 10 KiB frame (close 1013), a 10 KiB body
    (503) and a chunked one (503), counted; once the slow frame is cut, a frame is acked."""
    slow_reader, slow = await raw_websocket(server.port)
    slow.write(ws_frame(b"x" * 60 * KIB)[: 20 * KIB])  # head and a third of the payload
    await until(lambda: server.stats.inflight_bytes == 60 * KIB, "the frame held")

    reader, writer = await raw_websocket(server.port)
    writer.write(ws_frame(b"y" * 10 * KIB))
    assert await closed_with(reader) == (1013, b"inflight_full")
    writer.close()

    body = orjson.dumps(tx("big", 1)) + b" " * 10 * KIB
    url = f"http://127.0.0.1:{server.port}/log"
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "inflight_full"

    async def chunks() -> Any:
        yield body[: 5 * KIB]
        yield body[5 * KIB :]

    async with session.post(url, data=chunks(), headers=headers) as resp:
        assert resp.status == 503, await resp.text()
    assert server.stats.bad_input["inflight_full"] == 3

    # The slow frame is cut within two periods; its bytes come back; frames pass again.
    assert await closed_with(slow_reader) == (1008, b"request_timeout")
    slow.close()
    await until(lambda: server.stats.inflight_bytes == 0, "the slow frame's bytes back")
    reader, writer = await raw_websocket(server.port)
    writer.write(ws_frame(envelope(7, "after")))
    assert await read_frame(reader) == (1, b'{"ack":7}')
    writer.close()
    async with session.post(url, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    m = await metrics(session, server)
    assert m.get("async_logging_bad_input_total", reason="inflight_full") == 3
    assert server.listener is not None and server.listener.budget.peak <= 64 * KIB
    await until(lambda: server.stats.inflight_bytes == 0, "every byte given back")


def test_many_big_bodies_past_the_budget_get_503_while_memory_stays_bounded(
    tmp_path: Path, procs: list[Served]
) -> None:
    """40 bodies of 4 MiB at once, each sent but for its last byte, against a budget of
    16 MiB (a real server): bodies are held as their bytes arrive, those that do not fit
    get 503 inflight_full, at most 4 are left held (16 MiB) and the server's memory grows
    by far less than the 160 MiB sent; a good client's small post, refused while the
    budget is full, is acked once the held bodies time out (request_timeout 2 s)."""
    s = serve(
        tmp_path,
        "--store",
        "",
        "--max-message-bytes",
        str(4 * MIB),
        "--max-inflight-bytes",
        str(16 * MIB),
        "--request-timeout",
        "2",
    )
    procs.append(s)
    assert s.mon_port
    proc = psutil.Process(s.proc.pid)
    n, size = 40, 4 * MIB

    async def run() -> dict[str, Any]:
        url = f"http://127.0.0.1:{s.port}/log"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=tx("warm-up")) as resp:
                assert resp.status == 200
            rss_before = proc.memory_info().rss
            conns = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(n)]
            for _, writer in conns:
                writer.write(
                    b"POST /log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % size
                )
            answers = [asyncio.ensure_future(r.read()) for r, _ in conns]
            chunk = b" " * (256 * KIB)
            for _, writer in conns:  # every body but its last byte
                for _ in range(size // len(chunk) - 1):
                    writer.write(chunk)
                writer.write(chunk[:-1])
            for _, writer in conns:
                with contextlib.suppress(ConnectionError):  # refused: no longer read
                    await asyncio.wait_for(writer.drain(), TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while True:  # settled: every body refused or held whole (but its last byte)
                m = await asyncio.to_thread(fetch_metrics, s.mon_port)
                inflight = int(m.get("async_logging_inflight_bytes"))
                refused = m.get("async_logging_bad_input_total", reason="inflight_full")
                if inflight % (size - 1) == 0 and refused + inflight // (size - 1) == n:
                    break
                assert time.monotonic() < deadline, (inflight, refused)
                await asyncio.sleep(0.05)
            rss_held = proc.memory_info().rss
            async with session.post(url, json=tx("good")) as resp:
                first = resp.status
            deadline = time.monotonic() + TIMEOUT
            while True:  # a client resends what was refused for now
                async with session.post(url, json=tx("good")) as resp:
                    if resp.status == 200:
                        break
                assert resp.status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.1)
            got = await asyncio.gather(*answers, return_exceptions=True)
            for _, writer in conns:
                writer.close()
            statuses = sorted(
                g.split(b" ", 2)[1].decode() if isinstance(g, bytes) and g else "reset" for g in got
            )
            return {"m": m, "before": rss_before, "held": rss_held, "first": first, "st": statuses}

    r = asyncio.run(run())
    m = r["m"]
    grown = (r["held"] - r["before"]) / MIB
    print(f"server RSS grew {grown:.1f} MiB while 40 bodies of 4 MiB came in: {r['st']}")
    held = r["st"].count("408")
    assert 1 <= held <= 4, r["st"]
    assert r["st"].count("503") + r["st"].count("reset") == n - held, r["st"]
    assert m.get("async_logging_inflight_bytes") == held * (size - 1) <= 16 * MIB
    assert grown < 64, f"the server's memory grew {grown:.1f} MiB"
    if held == 4:  # 4 bytes left in the budget: the good post did not fit
        assert r["first"] == 503
    after = fetch_metrics(s.mon_port)
    assert after.get("async_logging_inflight_bytes") == 0
    # the bodies refused, and the good client's posts while the budget was full
    assert after.get("async_logging_bad_input_total", reason="inflight_full") > n - held
    assert after.get("async_logging_bad_input_total", reason="request_timeout") == held
    assert s.stop() == 0
    assert sorted(r["uuid"] for r in s.records() if r.get("kind") == "transaction") == [
        "good",
        "warm-up",
    ]


# ====================================================================== HTTP connections


@pytest.mark.parametrize("server_options", [{"max_http_connections": 2, "request_timeout": 0}])
async def test_http_connections_past_their_limit_get_503_and_are_closed(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Two idle HTTP connections fill max_http_connections 2: a post on a third gets 503
    too_many_connections and the connection is closed (counted); an upgrade on such a
    connection is a WebSocket, under conn_threshold; once one closes, posts are served."""
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await until(lambda: server.stats.http_connections == 2, "two HTTP connections")
    body = orjson.dumps(tx("refused"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # read to the close
    writer.close()
    assert answer.split(b" ", 2)[1] == b"503", answer
    assert b'"error":"too_many_connections"' in answer
    assert server.stats.connections_refused == {"max_http_connections": 1}

    ws_reader, ws_writer = await raw_websocket(server.port)  # over the HTTP limit: served
    ws_writer.write(ws_frame(envelope(1, "websocket")))
    assert await read_frame(ws_reader) == (1, b'{"ack":1}')
    ws_writer.close()

    idle[0][1].close()
    await until(lambda: server.stats.http_connections < 2, "an idle connection closed")
    async with session.post(f"http://127.0.0.1:{server.port}/log", json=tx("served")) as resp:
        assert resp.status == 200
    m = await metrics(session, server)
    assert m.get("async_logging_connections_refused_total", reason="max_http_connections") == 1
    assert m.get("async_logging_http_connections") >= 1
    idle[1][1].close()
    uuids = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) >= 2 and p.transactions, TIMEOUT
    )
    assert sorted(t["uuid"] for t in uuids) == ["served", "websocket"]


# ====================================================================== accept errors


async def test_accept_errors_are_counted_and_logged_once_per_interval(
    server: LogCluster, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """500 failed accepts (what asyncio reports when the process is out of descriptors)
    make one log line and count 500; other loop errors still reach the usual handler."""
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.INFO)
    for _ in range(500):
        loop.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": OSError(errno.EMFILE, "Too many open files"),
            }
        )
    loop.call_exception_handler({"message": "something else went wrong"})
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert lines == ["cannot accept a connection on the main port: [Errno 24] Too many open files"]
    assert ACCEPT_ERROR_LOG_INTERVAL >= 1
    assert any(
        r.name == "asyncio" and "something else went wrong" in r.getMessage()
        for r in caplog.records
    )
    assert server.stats.accept_errors == 500
    m = await metrics(session, server)
    assert m.get("async_logging_accept_errors_total") == 500


async def test_the_loop_handler_is_given_back_when_the_server_stops(
    publisher: MemoryPublisher,
) -> None:
    """The listener's throttle sits on the loop only while it listens."""
    loop = asyncio.get_running_loop()

    def mine(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        pass

    loop.set_exception_handler(mine)
    try:
        cluster = LogCluster(
            host="127.0.0.1", port=0, mon_port=-1, heartbeat_interval=0, publisher=publisher
        )
        await cluster.start()
        assert loop.get_exception_handler() is not mine
        await cluster.stop()
        assert loop.get_exception_handler() is mine
    finally:
        loop.set_exception_handler(None)


@pytest.mark.parametrize("server_options", [TIGHT])
async def test_dripping_chunked_forms_hold_only_what_they_sent(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """Ten chunked multipart forms dripping in hold only the bytes they sent, not a whole
    message each (they used to take the 64 KiB budget between them and get every other
    post refused 503): a good form beside them is taken."""
    head = (
        b"POST /log HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    drippers = []
    for _ in range(10):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head + b"5\r\n--b\r\n\r\n")
        drippers.append(writer)
    await until(lambda: server.stats.inflight_bytes == 10 * 5, "each dripper holds 5 bytes")
    form = aiohttp.FormData()
    form.add_field("logs", orjson.dumps(tx("beside-drippers")).decode())
    async with session.post(f"http://127.0.0.1:{server.port}/log", data=form) as resp:
        assert resp.status == 200, await resp.text()
    for writer in drippers:
        writer.close()
    await until(lambda: server.stats.inflight_bytes == 0, "every byte given back")
