"""Records the native fast path publishes as JSON lines, through every publisher and the pipeline.

The engine's own contract (native output == reference output) is pinned by
``test_fastpath.py``; this module pins what happens to :class:`EncodedRecords` downstream:
each shipped publisher gets what it would get from the same records as dicts, batches of both
forms keep their order, and a server with the native path publishes exactly what a server
without it publishes.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from async_logging import LogBuffer, wire
from async_logging.encoded import NATIVE, EncodedRecords
from async_logging.publishers import JsonLinesPublisher, MultiPublisher, StdoutPublisher
from async_logging.publishers.jsonl import LineEncoder
from async_logging.server import LogCluster
from async_logging.server.live import LiveHub
from async_logging.server.pipeline import _runs
from async_logging.store import SqliteStore
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT, vector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _data import shuffled_transactions

needs_native = pytest.mark.skipif(not NATIVE, reason="the _speedups extension is not built")

T0 = 1_795_463_406_000


def clock() -> int:
    return T0


def records_of(n: int) -> list[dict[str, Any]]:
    """The records the reference engine publishes for ``n`` bench transactions."""
    buf = LogBuffer(clock=clock, native=False)
    out: list[dict[str, Any]] = []
    for events in shuffled_transactions(n):
        out.extend(buf.feed_many(events).records)
    return out


def encoded(records: list[dict[str, Any]]) -> EncodedRecords:
    """The same records as the fast path hands them over: JSON lines, kinds counted."""
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return EncodedRecords(b"".join(orjson.dumps(r) + b"\n" for r in records), kinds)


# ------------------------------------------------------------------ EncodedRecords


def test_encoded_records_are_a_sequence_of_the_records() -> None:
    """len() counts the records without decoding; indexing, iteration and == decode the lines."""
    recs = [*records_of(3), {"kind": "heartbeat", "timestamp": T0}]
    enc = encoded(recs)
    assert len(enc) == 4
    assert enc.kinds == {"transaction": 3, "heartbeat": 1}
    assert enc[0] == recs[0] and enc[-1] == recs[-1] and enc[1:3] == recs[1:3]
    assert list(enc) == recs
    assert enc == recs and enc == tuple(recs) and enc != recs[:3]
    assert enc.decoded() is enc.decoded()  # decoded once, then kept


def test_join_keeps_the_chunks_in_order_without_copying_them() -> None:
    """join() concatenates batches as a list of their chunks (writev), adding up the kinds."""
    a, b = encoded(records_of(2)), encoded([{"kind": "atomicEvent", "timestamp": 1}])
    joined = EncodedRecords.join([a, b])
    assert joined.chunks == a.chunks + b.chunks
    assert joined.chunks[0] is a.chunks[0]
    assert joined.nbytes == a.nbytes + b.nbytes
    assert joined.kinds == {"transaction": 2, "atomicEvent": 1}
    assert len(joined) == 3 and list(joined) == list(a) + list(b)
    assert joined.lines == a.lines + b.lines
    assert EncodedRecords.join([a]) is a


def test_empty_encoded_records() -> None:
    """A frame with no records gives an empty batch: no chunks, no records."""
    empty = EncodedRecords(b"", {"transaction": 0})
    assert len(empty) == 0 and not empty and empty.chunks == [] and list(empty) == []
    assert empty.kinds == {}


# ------------------------------------------------------------------ publishers


def test_line_encoder_hands_encoded_chunks_over_as_they_are() -> None:
    """The JSON-lines encoder writes the fast path's lines unchanged: the same bytes as for dicts."""
    recs = records_of(5)
    enc = encoded(recs)
    parts, nbytes = LineEncoder().encode(enc)
    assert parts is enc.chunks and nbytes == enc.nbytes
    dict_parts, dict_bytes = LineEncoder().encode(recs)
    assert b"".join(dict_parts) == b"".join(parts) and dict_bytes == nbytes


def test_jsonl_file_is_the_same_for_encoded_and_dict_records(tmp_path: Path) -> None:
    """The file sink writes byte-identical files from EncodedRecords and from the same dicts."""
    recs = records_of(40)
    with JsonLinesPublisher(tmp_path / "a.log") as a, JsonLinesPublisher(tmp_path / "b.log") as b:
        a.publish_many(recs)
        b.publish_many(EncodedRecords.join([encoded(recs[:13]), encoded(recs[13:])]))
        assert a.stats["records"] == b.stats["records"] == 40
        assert a.stats["bytes"] == b.stats["bytes"]
    assert (tmp_path / "a.log").read_bytes() == (tmp_path / "b.log").read_bytes()


def test_jsonl_rotation_splits_encoded_chunks_at_line_boundaries(tmp_path: Path) -> None:
    """Rotating in the middle of an encoded batch cuts it between lines, never inside one."""
    recs = records_of(30)
    size = len(orjson.dumps(recs[0])) + 1
    path = tmp_path / "all.log"
    with JsonLinesPublisher(path, max_bytes=size * 7 + size // 2, backup_count=10) as pub:
        pub.publish_many(EncodedRecords.join([encoded(recs[:11]), encoded(recs[11:])]))
    files = sorted(
        tmp_path.glob("all.log*"), key=lambda p: -int(p.name.rpartition(".")[2].replace("log", "0"))
    )
    assert len(files) == 5  # 7 lines each: 4 full files and the current one
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert [orjson.loads(line) for line in lines] == recs


def test_stdout_writes_encoded_lines_to_text_and_binary_streams() -> None:
    """The stdout sink writes the same lines for encoded records, to text and bytes streams."""
    recs = records_of(3)
    text, raw = io.StringIO(), io.BytesIO()
    StdoutPublisher(text).publish_many(encoded(recs))
    StdoutPublisher(raw).publish_many(encoded(recs))
    expected = b"".join(orjson.dumps(r) + b"\n" for r in recs)
    assert raw.getvalue() == expected and text.getvalue() == expected.decode()


def test_store_rows_are_the_same_for_encoded_and_dict_records(tmp_path: Path) -> None:
    """The SQLite store stores identical rows (bodies included) from encoded and dict records."""
    recs = [*records_of(6), {"kind": "atomicEvent", "type": "INFO", "timestamp": T0, "msg": "x"}]
    rows = []
    for name, batch in (("a", recs), ("b", encoded(recs))):
        store = SqliteStore(tmp_path / f"{name}.sqlite", clock=lambda: T0 / 1000)
        store.publish_many(batch)
        store.close()
        with sqlite3.connect(tmp_path / f"{name}.sqlite") as conn:
            rows.append(
                (
                    conn.execute("SELECT * FROM trees ORDER BY id").fetchall(),
                    conn.execute("SELECT * FROM spans ORDER BY tree_id, seq").fetchall(),
                )
            )
        conn.close()
    assert rows[0] == rows[1]
    assert len(rows[0][0]) == 7 and len(rows[0][1]) == 18  # 3 transaction nodes per tree


async def test_live_hub_decodes_encoded_records_for_its_subscribers() -> None:
    """A live subscriber receives encoded records as dicts, filtered like any record."""
    hub = LiveHub()
    sub = hub.subscribe(lambda r: r.get("kind") == "transaction")
    recs = [*records_of(2), {"kind": "heartbeat", "timestamp": T0}]
    await asyncio.to_thread(hub.publish_many, encoded(recs))
    got, lost = await sub.next_batch(TIMEOUT)
    assert got == recs[:2] and lost == 0
    hub.close()


def test_multi_publisher_retries_an_encoded_batch_only_where_it_failed() -> None:
    """A failing member gets the very same encoded batch again; the healthy one is not repeated."""

    class FailOnce(MemoryPublisher):
        failed = False

        def publish_many(self, records: Any) -> None:
            if not self.failed:
                self.failed = True
                raise OSError("disk full")
            super().publish_many(records)

    good, flaky = MemoryPublisher(), FailOnce()
    multi = MultiPublisher([good, flaky])
    batch = encoded(records_of(2))
    with pytest.raises(OSError):
        multi.publish_many(batch)
    multi.publish_many(batch)
    assert good.records == flaky.records == list(batch)
    assert good.batches == 1


# ------------------------------------------------------------------ the pipeline


def test_runs_join_batches_of_one_form_and_keep_the_order() -> None:
    """The publisher thread publishes consecutive batches of one form in one call, in order."""
    a, b, c = encoded(records_of(1)), encoded(records_of(2)), encoded(records_of(1))
    d1, d2 = [{"kind": "heartbeat", "timestamp": 1}], [{"kind": "heartbeat", "timestamp": 2}]
    runs = _runs([a, b, d1, [], d2, c, EncodedRecords(b"", {})])
    assert [type(r) for r in runs] == [EncodedRecords, list, EncodedRecords]
    assert list(runs[0]) == list(a) + list(b)
    assert runs[1] == d1 + d2
    assert list(runs[2]) == list(c)
    assert _runs([]) == []


# ------------------------------------------------------------------ a server, native or not


def bench_frames(n: int, per_frame: int) -> list[bytes]:
    txs = shuffled_transactions(n)
    return [
        msgpack.packb({"seq": i, "logs": [e for tx in txs[i : i + per_frame] for e in tx]})
        for i in range(0, n, per_frame)
    ]


async def run_server(native: bool, frames: list[bytes], log: Path) -> dict[str, Any]:
    """Send ``frames`` over one WebSocket, one at a time (each acked), then stop the server."""
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        store="",
        log_file=str(log),
        buffer=LogBuffer(native=native, clock=clock),
    )
    await cluster.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{cluster.port}/")
            assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
            for frame in frames:
                await ws.send_bytes(frame)
                msg = await ws.receive(timeout=TIMEOUT)
                assert "ack" in orjson.loads(msg.data), msg.data
            await ws.close()
    finally:
        await cluster.stop()
    assert cluster.pipeline is not None
    snap = cluster.pipeline.stats.snapshot(cluster.pipeline.buffer)
    return {
        k: snap[k]
        for k in ("events", "records", "buffer", "incomplete", "bad_input", "native_frames")
    }


@needs_native
async def test_native_server_writes_what_the_reference_server_writes(tmp_path: Path) -> None:
    """Whole trees, stragglers, resends and the original client's frame: the same file and counters."""
    frames = bench_frames(60, 10)
    # a tree split over two frames: the reference path joins them
    split = [{**e, "uuid": "split-1"} for e in shuffled_transactions(2)[1]]
    frames.append(msgpack.packb({"seq": 100, "logs": split[:5]}))
    frames.append(msgpack.packb({"seq": 101, "logs": split[5:]}))
    frames.append(frames[0])  # a resend: every event a duplicate
    frames.append(msgpack.packb({"seq": 102, "logs": [{"clazz": "heartbeat", "cpu": 0.5}]}))
    frames.append(
        msgpack.packb({"seq": 103, "logs": msgpack.unpackb(vector("ws-frame-2.msgpack"))})
    )
    native = await run_server(True, frames, tmp_path / "native.log")
    reference = await run_server(False, frames, tmp_path / "reference.log")
    assert (tmp_path / "native.log").read_bytes() == (tmp_path / "reference.log").read_bytes()
    # the six whole-tree frames, the heartbeat and the original client's frame went native;
    # the split tree and the resend the reference way
    assert (native.pop("native_frames"), reference.pop("native_frames")) == (8, 0)
    assert native == reference
    assert native["buffer"]["duplicates"] == 120 and native["records"]["transaction"] == 62


@needs_native
def test_native_buffer_publishes_the_bench_frames_natively() -> None:
    """The benchmark's frames (whole shuffled trees in envelopes) take the native path, every one."""
    buf = LogBuffer(clock=clock)
    for frame in bench_frames(50, 10):
        assert buf.feed_msgpack(frame, wire.DEFAULT_LIMITS) is not None
    assert buf.stats["published_complete"] == 50 and buf.open_count == 0


@needs_native
async def test_the_python_clients_frames_take_the_native_path() -> None:
    """What LogClient sends (whole trees, many per frame, ids as ints, one millisecond for many
    events) is reassembled natively by the server, every frame of it."""
    from async_logging.client import LogClient

    publisher = MemoryPublisher()
    cluster = LogCluster(
        host="127.0.0.1", port=0, mon_port=-1, heartbeat_interval=0, store="", publisher=publisher
    )
    await cluster.start()
    try:

        def app() -> None:
            client = LogClient(url=f"ws://127.0.0.1:{cluster.port}/", exit_timeout=0)
            for _ in range(300):
                with client.transaction("URL", "/checkout"):
                    for _ in range(5):
                        client.event("DB", "select", "row", "INFO")
                    with client.transaction("API", "payment"):
                        for _ in range(3):
                            client.event("HTTP", "post", "ok", "INFO")
            assert client.close(TIMEOUT)

        await asyncio.to_thread(app)
        await asyncio.to_thread(publisher.wait_for, lambda p: len(p.transactions) == 300, TIMEOUT)
    finally:
        await cluster.stop()
    stats = cluster.stats
    assert stats.events == 3600
    assert stats.native_frames == stats.frames["ws"] > 0
