"""The viewer's HTTP API and live stream on a real server's monitoring port (issue 6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from async_logging.server import LogCluster, MonApp
from async_logging.server.live import HubFull, LiveHub, record_filter
from async_logging.server.viewer import Viewer
from async_logging.tail import SseParser
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import post_logs, stored

T0 = int(time.time() * 1000) - 60_000


def tree(
    uuid: str, name: str = "/a", *, status: str = "0", t0: int = T0, dur: int = 30
) -> list[dict[str, Any]]:
    """The wire events of a request with a nested DB call and an atomic event."""
    return [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "type": "URL", "name": name, "timestamp": t0},
        {"clazz": "begin", "uuid": uuid, "event": "2", "parent": "1", "type": "DB", "name": "q", "timestamp": t0 + 1},
        {"clazz": "atomicEvent", "uuid": uuid, "event": "3", "parent": "2", "type": "SQL", "msg": "select 1", "timestamp": t0 + 2},
        {"clazz": "end", "uuid": uuid, "event": "2", "parent": "1", "status": status, "timestamp": t0 + dur // 2},
        {"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "status": status, "timestamp": t0 + dur},
    ]  # fmt: skip


@pytest.fixture
def server_options(tmp_path: Path) -> dict[str, Any]:
    return {"store": str(tmp_path / "trees.sqlite")}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as s:
        yield s


async def get(session: aiohttp.ClientSession, server: LogCluster, path: str) -> tuple[int, Any]:
    async with session.get(f"http://127.0.0.1:{server.mon_port}{path}") as resp:
        return resp.status, await resp.json()


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str, Any]]:
    """The next ``n`` server-sent events of ``resp`` (event name, decoded data)."""
    parser = SseParser()
    out: list[tuple[str, Any]] = []

    async def collect() -> None:
        async for chunk in resp.content.iter_any():
            out.extend((e, orjson.loads(d)) for e, d in parser.feed(chunk))
            if len(out) >= n:
                return

    await asyncio.wait_for(collect(), TIMEOUT)
    return out


# ------------------------------------------------------------------ search, tree, summary


async def test_search_tree_and_summary_answer_for_what_the_server_published(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Trees sent to the server are found by /api/search, returned whole by /api/tree and counted by /api/summary."""
    logs = tree("ok-1", "/a") + tree("bad-1", "/b", status="5", dur=80)
    await stored(server, {"ok-1", "bad-1"}, post_logs(server, logs))
    status, body = await get(session, server, "/api/search?name=/b")
    assert status == 200
    (row,) = body["results"]
    assert (row["uuid"], row["failed"], row["duration"], row["nodes"]) == ("bad-1", True, 80, 3)
    status, body = await get(session, server, f"/api/tree/{row['id']}")
    assert status == 200 and body["row"] == row
    assert body["record"] == next(t for t in publisher.transactions if t["uuid"] == "bad-1")
    status, body = await get(session, server, "/api/search?failures=1&kind=transaction")
    assert [r["uuid"] for r in body["results"]] == ["bad-1"]
    status, body = await get(session, server, "/api/search?limit=1")
    assert len(body["results"]) == 1 and body["limit"] == 1
    # The summary's window ends at a time of the test's choosing, not at the server's "now".
    window = f"window=3600&until={T0 + 1000}"
    status, body = await get(session, server, f"/api/summary?{window}")
    rows = {(r["type"], r["name"]): r for r in body["rows"]}
    assert rows[("URL", "/b")]["failures"] == 1 and rows[("URL", "/a")]["failures"] == 0
    assert rows[("DB", "q")]["count"] == 2 and rows[("DB", "q")]["failure_rate"] == 0.5
    status, body = await get(session, server, f"/api/summary?{window}&roots=1&type=URL")
    assert sorted(r["name"] for r in body["rows"]) == ["/a", "/b"]


async def test_missing_tree_is_404_and_status_reports_the_store(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """An unknown tree id answers 404 not_found; /api/status names the store file and the live hub."""
    status, body = await get(session, server, "/api/tree/12345")
    assert (status, body["error"]) == (404, "not_found")
    status, body = await get(session, server, "/api/status")
    assert status == 200 and body["store"]["records"] == 0
    assert body["store"]["path"].endswith("trees.sqlite") and body["live"]["enabled"] is True


@pytest.mark.parametrize(
    "path",
    [
        "/api/search?limit=0",
        "/api/search?limit=1001",
        "/api/search?limit=ten",
        "/api/search?min_duration=-1",
        "/api/search?min_duration=nan",
        "/api/search?failures=maybe",
        "/api/search?kind=span",
        "/api/search?since=yesterday",
        "/api/search?since=99999999999999999999",
        "/api/search?until=-99999999999999999999",
        "/api/summary?until=9223372036854775808",
        "/api/search?name=" + "x" * 1025,
        "/api/summary?window=0",
        "/api/tree/abc",
        "/api/live?kind=span",
    ],
)
async def test_bad_parameters_are_400_naming_the_problem(
    server: LogCluster, session: aiohttp.ClientSession, path: str
) -> None:
    """A malformed query parameter is refused with 400 and a JSON error, never a 500."""
    status, body = await get(session, server, path)
    assert status == 400 and body["error"] == "bad_param" and body["detail"]


async def test_a_tree_id_past_what_the_store_holds_is_404_not_500(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """An id larger than a 64-bit integer is no tree (404), not an error of the server."""
    status, body = await get(session, server, "/api/tree/99999999999999999999999")
    assert (status, body["error"]) == (404, "not_found")


@pytest.mark.parametrize("server_options", [{"store": ""}])
async def test_store_off_answers_503_for_queries_and_the_live_tail(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """With the store off the query API answers 503 store_off, the live tail (which
    follows the store) 503 live_off, and /api/status still answers."""
    for path in ("/api/search", "/api/tree/1", "/api/summary"):
        status, body = await get(session, server, path)
        assert (status, body["error"]) == (503, "store_off"), path
    status, body = await get(session, server, "/api/live")
    assert (status, body["error"]) == (503, "live_off")
    status, body = await get(session, server, "/api/status")
    assert status == 200 and body["store"] is None and body["live"]["enabled"] is False
    assert body["follower"] is None


async def test_status_and_ecv_report_the_stores_follower_and_its_lag(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """/api/status (the page's header), /ecv and /metrics say whether the store's follower
    runs and how far behind it is, once the trees sent are stored."""
    await stored(server, {"lag-1"}, post_logs(server, tree("lag-1", "/a")))
    deadline = time.monotonic() + TIMEOUT
    while True:  # the follower is another process: its report follows its commit
        status, body = await get(session, server, "/api/status")
        follower = body["follower"]
        if follower["stored"] >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert status == 200 and follower["running"] is True and follower["stored"] >= 1
    assert follower["lag_records"] >= 0 and follower["lag_seconds"] >= 0
    async with session.get(f"http://127.0.0.1:{server.mon_port}/ecv") as resp:
        ecv = await resp.json()
    assert ecv["store"]["running"] is True and "lag_seconds" in ecv["store"]
    async with session.get(f"http://127.0.0.1:{server.mon_port}/metrics") as resp:
        text = await resp.text()
    for name in ("store_up", "store_lag_records", "store_lag_seconds", "store_records_total"):
        assert f"async_logging_{name}" in text, name


async def test_monitoring_endpoints_still_answer_beside_the_viewer(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """Mounting the viewer keeps /ecv and /metrics as they were."""
    async with session.get(f"http://127.0.0.1:{server.mon_port}/ecv") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "AVAILABLE"
    async with session.get(f"http://127.0.0.1:{server.mon_port}/metrics") as resp:
        assert resp.status == 200 and "async_logging_events_received_total" in await resp.text()


# ------------------------------------------------------------------ the page


async def test_the_page_is_served_with_a_strict_content_security_policy(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """/ui redirects to /ui/, which serves the page, its script and style, each with a CSP that forbids inline script."""
    base = f"http://127.0.0.1:{server.mon_port}"
    async with session.get(base + "/ui", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    for path, ctype, needle in (
        ("/ui/", "text/html", 'id="waterfall"'),
        ("/ui/app.js", "text/javascript", "EventSource"),
        ("/ui/format.js", "text/javascript", "ViewerFormat"),
        ("/ui/style.css", "text/css", ".wf-bar"),
    ):
        async with session.get(base + path) as resp:
            assert resp.status == 200 and resp.content_type == ctype, path
            assert needle in await resp.text()
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp


@pytest.mark.parametrize(
    ("server_options", "path"),
    [
        ({}, "/"),
        ({}, "/?name=a&failures=1"),
        ({"viewer_tokens": ("v-s3cret",)}, "/"),  # asks for no token to say where the page is
        ({"viewer_tokens": ("v-s3cret",)}, "/?token=v-s3cret"),  # a sign-in link, passed on
    ],
)
async def test_the_root_of_the_monitoring_port_redirects_to_the_page(
    server: LogCluster, session: aiohttp.ClientSession, path: str
) -> None:
    """GET / on the monitoring port answers 302 to /ui/, its query kept; also when the port asks for a token."""
    async with session.get(
        f"http://127.0.0.1:{server.mon_port}{path}", allow_redirects=False
    ) as resp:
        assert resp.status == 302
        query = path.partition("?")[2]
        assert resp.headers["Location"] == "/ui/" + (f"?{query}" if query else "")


@pytest.mark.parametrize(
    "path", ["/ui/..%2Fserver%2Fviewer.py", "/ui/missing.js", "/ui/.hidden.js", "/ui/viewer.py"]
)
async def test_only_the_page_files_are_served(
    server: LogCluster, session: aiohttp.ClientSession, path: str
) -> None:
    """Anything but a file of the ui folder with a known extension is 404 (no path traversal)."""
    async with session.get(f"http://127.0.0.1:{server.mon_port}{path}") as resp:
        assert resp.status == 404


# ------------------------------------------------------------------ live


async def test_live_stream_sends_published_records_that_pass_its_filters(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """/api/live streams each newly published record as an SSE 'record' event, filtered by the server."""
    url = f"http://127.0.0.1:{server.mon_port}/api/live?kind=transaction&name=/b&failures=1"
    async with session.get(url) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
        await post_logs(server, tree("a-1", "/a", status="1"))  # filtered: name
        await post_logs(server, tree("b-ok", "/b"))  # filtered: status
        await post_logs(server, tree("b-bad", "/b", status="9"))
        ((event, record),) = await read_events(resp, 1)
    assert event == "record"
    assert (record["uuid"], record["kind"], record["status"]) == ("b-bad", "transaction", "9")
    assert [c["type"] for c in record["children"]] == ["DB"]


async def test_a_gone_client_frees_its_live_subscription(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A live client that disconnects while the stream is idle is noticed and its subscription dropped."""
    async with session.get(f"http://127.0.0.1:{server.mon_port}/api/live") as resp:
        assert resp.status == 200
        await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(0), TIMEOUT)


async def test_stopping_the_server_ends_live_streams_promptly(tmp_path: Path) -> None:
    """Shutdown ends every open live stream (the client sees the end), so it never waits on them."""
    cluster = LogCluster(
        host="127.0.0.1", port=0, mon_port=0, heartbeat_interval=0,
        publisher=MemoryPublisher(), store=str(tmp_path / "trees.sqlite"),
        log_file=str(tmp_path / "all.log"),
    )  # fmt: skip
    await cluster.start()
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(f"http://127.0.0.1:{cluster.mon_port}/api/live") as resp:
                await asyncio.wait_for(cluster.live_hub.wait_for_subscribers(1), TIMEOUT)
                stopping = asyncio.create_task(cluster.stop())
                rest = await asyncio.wait_for(resp.content.read(), TIMEOUT)
                assert b"event:" not in rest  # ended, nothing more was sent
                await asyncio.wait_for(stopping, TIMEOUT)
        finally:
            await cluster.stop()


async def test_live_subscribers_are_capped(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """Past the hub's subscriber cap a live request is refused with 503 live_full."""
    server.live_hub.max_subscribers = 1
    url = f"http://127.0.0.1:{server.mon_port}/api/live"
    async with session.get(url) as first:
        assert first.status == 200
        await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
        status, body = await get(session, server, "/api/live")
        assert (status, body["error"]) == (503, "live_full")
    assert server.live_hub.stats["refused"] == 1


async def test_without_a_hub_live_is_503_live_off(tmp_path: Path) -> None:
    """A viewer without a live hub (the supervisor of server workers) answers /api/live with 503 live_off."""
    viewer = Viewer(str(tmp_path / "t.sqlite"), None)
    mon = MonApp(lambda: {}, lambda: {"available": True}, viewer=viewer)
    port = await mon.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/api/live") as resp:
                assert resp.status == 503 and (await resp.json())["error"] == "live_off"
            async with session.get(f"http://127.0.0.1:{port}/api/search") as resp:
                assert resp.status == 200 and (await resp.json())["results"] == []
    finally:
        await mon.cleanup()
        await viewer.close()


async def test_a_slow_subscriber_loses_the_oldest_records_and_is_told_how_many() -> None:
    """A subscriber whose queue is full drops its oldest records, counts them, and learns the count on its next read."""
    hub = LiveHub(queue_size=3)
    sub = hub.subscribe()
    records = [{"kind": "transaction", "n": i} for i in range(5)]
    await asyncio.to_thread(hub.publish_many, records)  # from another thread, as the server does
    batch, lost = await asyncio.wait_for(sub.next_batch(), TIMEOUT)
    assert [r["n"] for r in batch] == [2, 3, 4] and lost == 2
    assert sub.dropped == 2 and hub.stats["dropped"] == 2
    hub.close()
    with pytest.raises(EOFError):
        await sub.next_batch()
    with pytest.raises(HubFull):
        hub.subscribe()


async def test_the_hub_drops_batches_when_the_loop_lags_behind() -> None:
    """Past max_pending records in flight to the loop, the hub drops whole batches and counts them."""
    hub = LiveHub(max_pending=4)
    sub = hub.subscribe()
    hub.publish_many([{"kind": "transaction"}] * 3)  # the loop has not run: 3 in flight
    hub.publish_many([{"kind": "transaction"}] * 3)  # would make 6 > 4: dropped
    batch, _ = await asyncio.wait_for(sub.next_batch(), TIMEOUT)
    assert len(batch) == 3 and hub.stats["dropped_pending"] == 3
    hub.close()


def test_record_filter_matches_kind_type_name_prefix_status_and_duration() -> None:
    """The live filter keeps exactly the records matching every criterion given."""
    accept = record_filter(
        kinds=["transaction"], type="URL", name="/api*", failures_only=True, min_duration=10
    )
    assert accept is not None
    good = {"kind": "transaction", "type": "URL", "name": "/api/x", "status": "1", "duration": 10}
    assert accept(good)
    for change in (
        {"kind": "atomicEvent"},
        {"type": "DB"},
        {"name": "/home"},
        {"status": "0"},
        {"duration": 9},
        {"duration": None},
    ):
        assert not accept({**good, **change}), change
    assert record_filter() is None
