"""The write-ahead spool never loses an acknowledged batch, and one open tree does not pin it
(issue 12, items 3 and 4).

Records are checksummed and a failed append is cut back, so a short write (disk full, a
file-size limit) never leaves a torn record for later batches to be appended after; replay
resynchronises past damage it finds. A long-open tree is written again at the tail once the
region it pins passes a proportionate threshold, so a crash replays little; a replay never
turns late events or resends of a tree published before it into a new incomplete tree; the
server listens before it replays, and starts (refusing batches) on a spool it cannot write.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil
import pytest

from async_logging import LogBuffer
from async_logging.exceptions import LimitExceeded
from async_logging.server import LogCluster
from async_logging.server import pipeline as pipeline_module
from async_logging.server import spool as spool_module
from async_logging.server.pipeline import Pipeline
from async_logging.server.spool import (
    JSON,
    MSGPACK,
    REBASE,
    SEGMENT_MAGIC,
    Spool,
    SpoolFormatError,
)
from async_logging.testing import MemoryPublisher
from helpers import TIMEOUT, Served, published_events, serve, tx

T = 1_700_000_000_000


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.log"))


def payloads(spool: Spool) -> list[bytes]:
    return [entry.payload for entry in spool.replay()]


def v2_record(kind: int, payload: bytes) -> bytes:
    """A record as the format documents it (written here independently of the module)."""
    head = struct.pack(">2sBII", b"\xa5\x5c", kind, len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload


class FileSizeLimit:
    """Stands in for ``os`` inside the spool: writes behave as under ``RLIMIT_FSIZE``
    (a write crossing ``limit`` is cut short there; one at the limit fails ``EFBIG``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.short_writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        size = os.fstat(fd).st_size
        room = self.limit - size
        if room <= 0:
            raise OSError(errno.EFBIG, "File too large")
        if len(data) > room:
            self.short_writes += 1
            return os.write(fd, bytes(data[:room]))
        return os.write(fd, data)


class FullDisk:
    """Stands in for ``os`` inside the spool: while ``full``, the disk takes ``room`` more
    bytes (a write is cut short there), then every write fails ``ENOSPC``."""

    def __init__(self, room: int = 0) -> None:
        self.full = True
        self.room = room

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if not self.full:
            return os.write(fd, data)
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, bytes(data[: self.room]))
        self.room -= n
        return n


# ====================================================================== failed appends


def test_a_short_write_is_cut_back_and_the_batches_after_it_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk cuts short is refused (spool_unavailable) and truncated back: the segment is as before, later batches are appended after the last whole record and all replay."""
    spool = Spool(tmp_path / "w-1", 1 << 20)
    spool.append(MSGPACK, b"first")
    (segment,) = segments(spool.dir)
    size = segment.stat().st_size
    disk = FullDisk(room=50)
    monkeypatch.setattr(spool_module, "os", disk)
    with pytest.raises(LimitExceeded) as refused:
        spool.append(MSGPACK, b"refused" * 100)
    assert (refused.value.reason, refused.value.status) == ("spool_unavailable", 503)
    assert "No space left on device" in refused.value.detail
    assert spool.error is not None and spool.refused == 1
    assert segment.stat().st_size == size, "the torn record was left in the segment"
    disk.full = False
    spool.append(MSGPACK, b"second")
    spool.append(JSON, b"third")
    assert spool.error is None
    spool.close()
    again = Spool(tmp_path / "w-1", 1 << 20)
    assert payloads(again) == [b"first", b"second", b"third"]
    assert again.torn == 0


def test_a_file_size_limit_moves_the_batch_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a file-size limit a batch that does not fit the segment goes to a new one (acked); one bigger than the limit is refused and leaves no trace; nothing is lost on replay."""
    limit = 4096
    fs = FileSizeLimit(limit)
    monkeypatch.setattr(spool_module, "os", fs)
    spool = Spool(tmp_path / "w-1", 1 << 20)
    acked = []
    for i in range(12):  # ~3 KB: the first segment fills up
        acked.append(b"%02d" % i + b"." * 250)
        spool.append(MSGPACK, acked[-1])
    big = b"B" * 3000  # does not fit the first segment's tail: goes to a new one
    spool.append(MSGPACK, big)
    acked.append(big)
    with pytest.raises(LimitExceeded, match="too large"):
        spool.append(MSGPACK, b"X" * (limit + 1))  # fits no segment
    for i in range(3):
        acked.append(b"after-%d" % i)
        spool.append(JSON, acked[-1])
    assert fs.short_writes >= 2
    spool.close()
    monkeypatch.undo()
    assert all(p.stat().st_size <= limit for p in segments(spool.dir))
    again = Spool(tmp_path / "w-1", 1 << 20)
    assert payloads(again) == acked
    assert again.torn == 0


def test_a_failed_truncation_starts_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the torn record cannot even be cut back, the next batch goes to a new segment, so the torn record is the last of its own and replay skips it (counted)."""
    spool = Spool(tmp_path / "w-1", 1 << 20)
    spool.append(MSGPACK, b"before")
    disk = FullDisk(room=100)
    monkeypatch.setattr(spool_module, "os", disk)

    def cannot(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk, "ftruncate", cannot, raising=False)
    with pytest.raises(LimitExceeded):
        spool.append(MSGPACK, b"torn" * 50)
    disk.full = False
    spool.append(MSGPACK, b"after")
    spool.close()
    assert len(segments(spool.dir)) == 2
    again = Spool(tmp_path / "w-1", 1 << 20)
    assert payloads(again) == [b"before", b"after"]
    assert (again.torn, again.skipped_bytes) == (1, 100)


# ====================================================================== replay and checksums


def test_replay_resynchronises_past_a_torn_record(tmp_path: Path) -> None:
    """A torn record in the middle of a segment does not swallow the records after it: replay finds the next one by its checksums (even past a payload that holds the record magic)."""
    directory = tmp_path / "w-1"
    directory.mkdir()
    # Inside the torn record: what looks like a record header (magic, kind, length) but
    # whose header checksum does not match, then what looks like a payload.
    fake = b"\xa5\x5c\x01\x00\x00\x00\x05" + bytes(8) + b"junk!"
    whole = [b"one", b"two" + fake, b"three", b"four"]
    torn = v2_record(MSGPACK, b"torn-away" * 5 + fake + b"torn-away" * 5)
    data = SEGMENT_MAGIC + v2_record(MSGPACK, whole[0]) + v2_record(MSGPACK, whole[1])
    data += torn[: len(torn) - 7] + b"".join(v2_record(JSON, p) for p in whole[2:])
    (directory / "spool-0000000000.log").write_bytes(data)
    spool = Spool(directory, 1 << 20)
    assert payloads(spool) == whole
    assert (spool.torn, spool.skipped_bytes) == (1, len(torn) - 7)


def test_a_damaged_record_is_skipped_by_its_checksum(tmp_path: Path) -> None:
    """A record whose payload no longer matches its CRC is skipped and counted; the records around it replay."""
    directory = tmp_path / "w-1"
    directory.mkdir()
    records = [v2_record(MSGPACK, b"a" * 40), v2_record(MSGPACK, b"b" * 40), v2_record(JSON, b"c")]
    damaged = bytearray(records[1])
    damaged[-5] ^= 0xFF
    data = SEGMENT_MAGIC + records[0] + bytes(damaged) + records[2]
    (directory / "spool-0000000000.log").write_bytes(data)
    spool = Spool(directory, 1 << 20)
    assert payloads(spool) == [b"a" * 40, b"c"]
    assert (spool.torn, spool.skipped_bytes) == (1, len(records[1]))


def test_a_version_1_spool_still_replays(tmp_path: Path) -> None:
    """A spool written before checksums (records [kind][length] with no segment header) replays from its checkpoint; new appends go to a new segment in the new format."""
    directory = tmp_path / "w-1"
    directory.mkdir()
    old = [struct.pack(">BI", MSGPACK, len(p)) + p for p in (b"skipped", b"kept", b"also")]
    (directory / "spool-0000000000.log").write_bytes(b"".join(old) + old[0][:3])  # torn tail
    (directory / "checkpoint").write_text(f"0 {len(old[0])}\n")
    spool = Spool(directory, 1 << 20)
    assert payloads(spool) == [b"kept", b"also"]
    spool.append(JSON, b"new")
    spool.close()
    assert [p.name for p in segments(directory)][-1] == "spool-0000000001.log"
    assert segments(directory)[-1].read_bytes().startswith(SEGMENT_MAGIC)
    assert payloads(Spool(directory, 1 << 20)) == [b"kept", b"also", b"new"]


def test_a_segment_in_no_known_format_is_refused_clearly(tmp_path: Path) -> None:
    """A segment that is neither format raises SpoolFormatError naming the file (and the directory is left alone)."""
    directory = tmp_path / "w-1"
    directory.mkdir()
    segment = directory / "spool-0000000000.log"
    segment.write_bytes(b"\x09garbage, not a spool")
    with pytest.raises(SpoolFormatError, match=r"spool-0000000000\.log is not a spool segment"):
        list(Spool(directory, 1 << 20).replay())
    assert segment.exists()


# ====================================================================== pipeline: rebase, replay


def json_batch(logs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], tuple[int, bytes]]:
    """A batch as a JSON listener hands it to the pipeline: the maps and the raw frame."""
    return logs, (JSON, orjson.dumps(logs))


def open_tree(uuid: str, **extra: Any) -> list[dict[str, Any]]:
    """A begin and an atomic event whose end never comes."""
    begin, atomic = tx(uuid, 1)[:2]
    atomic.update(extra)
    return [begin, atomic]


def atomic(uuid: str, event: str, parent: str = "1", **extra: Any) -> dict[str, Any]:
    return {
        "clazz": "atomicEvent",
        "uuid": uuid,
        "event": event,
        "parent": parent,
        "msg": "m",
        "timestamp": T,
        **extra,
    }


async def drained(pipeline: Pipeline) -> None:
    """Wait until the publisher has published (and checkpointed) everything queued."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while pipeline.queued:
        assert asyncio.get_running_loop().time() < deadline, "the publisher never caught up"
        await asyncio.sleep(0.005)


async def crash_copy(pipeline: Pipeline, to: Path) -> Path:
    """The spool as a kill -9 would leave it now (once the publisher caught up)."""
    await drained(pipeline)
    assert pipeline.spool is not None
    shutil.copytree(pipeline.spool.dir, to)
    return to


async def replay(orphan: Path, into: Path) -> tuple[list[dict[str, Any]], Pipeline]:
    """Adopt ``orphan`` in a new pipeline, close it; return what it published."""
    pub = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), pub, spool=Spool(into, 1 << 30))
    pipeline.start()
    try:
        await pipeline.adopt(Spool(orphan, 1 << 30))
    finally:
        await pipeline.close()
    return pub.records, pipeline


async def test_a_crash_replays_only_what_the_last_rebase_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one tree open for good, the checkpoint follows the rebases: a crash after 400 published trees replays a few dozen of them (flagged), not all 400, and the open tree comes out whole."""
    monkeypatch.setattr(spool_module, "REBASE_MIN_BYTES", 16 * 1024)
    pub = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), pub, spool=Spool(tmp_path / "a", 1 << 30))
    pipeline.start()
    try:
        await pipeline.accept(*json_batch(open_tree("long", data="x" * 2000)))
        for i in range(400):
            await pipeline.accept(*json_batch(tx(f"short-{i}", 3)))
        crashed = await crash_copy(pipeline, tmp_path / "spool" / "w-999")
        written = pipeline.spool.written if pipeline.spool else 0
        rebases = pipeline.stats.spool_rebases
    finally:
        await pipeline.close()
    assert 1 <= rebases <= written // (16 * 1024) + 1, (rebases, written)
    records, _ = await replay(crashed, tmp_path / "b")
    short = [r for r in records if r["uuid"].startswith("short-")]
    assert all(r["replayed"] is True and r["complete"] for r in short)
    assert len(short) < 60, f"{len(short)} of 400 published trees replayed"
    (long,) = [r for r in records if r["uuid"] == "long"]
    assert long["replayed"] is True and [c["event"] for c in long["children"]] == ["2"]


async def test_rebasing_a_growing_open_tree_stays_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open tree that grows with every batch is rebased less often as it grows: the rebase records take at most REBASE_FACTOR / (REBASE_FACTOR - 1) times what the batches take (not a copy of the tree per batch)."""
    monkeypatch.setattr(spool_module, "REBASE_MIN_BYTES", 4 * 1024)
    pipeline = Pipeline(LogBuffer(), MemoryPublisher(), spool=Spool(tmp_path / "a", 1 << 30))
    pipeline.start()
    batch_bytes = 0
    try:
        first = open_tree("growing")
        await pipeline.accept(*json_batch(first))
        batch_bytes += len(orjson.dumps(first)) + 15
        for i in range(600):
            logs, raw = json_batch([atomic("growing", f"g{i}", msg="y" * 200), *tx(f"t{i}", 1)])
            batch_bytes += len(raw[1]) + 15
            await pipeline.accept(logs, raw)
        assert pipeline.spool is not None
        rebase_bytes = pipeline.spool.written - len(SEGMENT_MAGIC) - batch_bytes
        rebases = pipeline.stats.spool_rebases
    finally:
        await pipeline.close()
    print(f"rebases {rebases}: {rebase_bytes} bytes for {batch_bytes} bytes of batches")
    assert rebases >= 3
    factor = spool_module.REBASE_FACTOR
    assert rebase_bytes <= factor / (factor - 1) * batch_bytes, (rebase_bytes, batch_bytes)


async def test_replay_makes_no_incomplete_copy_of_a_tree_published_before_it(
    tmp_path: Path,
) -> None:
    """Late events and a resend of a tree published before the replayed part of the spool come out on their own, flagged late and replayed, never as a new incomplete tree."""
    pub = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), pub, spool=Spool(tmp_path / "a", 1 << 30))
    pipeline.start()
    try:
        await pipeline.accept(*json_batch(tx("done", 2)))  # published complete
        await pipeline.accept(*json_batch(open_tree("open")))  # pins the checkpoint after it
        await drained(pipeline)
        await pipeline.accept(*json_batch([atomic("done", "late-1", msg="late")]))
        await pipeline.accept(*json_batch(tx("done", 2)[-1:]))  # a resend of its end
        await pipeline.accept(*json_batch(tx("between", 1)))  # completed after the checkpoint
        crashed = await crash_copy(pipeline, tmp_path / "spool" / "w-999")
    finally:
        await pipeline.close()
    before = [r for r in pub.records if r["uuid"] == "done"]
    assert [r.get("late", False) for r in before] == [False, True]  # the resend: a duplicate
    records, replayer = await replay(crashed, tmp_path / "b")
    done = [r for r in records if r["uuid"] == "done"]
    assert done, "the late event was not replayed"
    assert all(r.get("late") is True and r["replayed"] is True for r in done), done
    assert {r.get("event") for r in done} == {"late-1", "1"}
    (between,) = [r for r in records if r["uuid"] == "between"]
    assert between["complete"] is True and between["replayed"] is True
    (still_open,) = [r for r in records if r["uuid"] == "open"]
    assert still_open["complete"] is False and still_open["reason"] == "shutdown"
    assert replayer.buffer.stats["late"] == 2


async def test_a_rebase_the_disk_refuses_holds_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the rebase record cannot be written the batch is still taken and published, the checkpoint stays before the open tree's events (a crash then replays it whole), and a later rebase succeeds."""
    monkeypatch.setattr(spool_module, "REBASE_MIN_BYTES", 2048)
    spool = Spool(tmp_path / "a", 1 << 30)
    start = spool.position
    refuse = [True]
    tried = []
    append = spool.append

    def failing(kind: int, payload: bytes, **options: Any) -> int:
        if kind == REBASE:
            tried.append(refuse[0])
            if refuse[0]:
                raise LimitExceeded("spool_unavailable", "disk full", status=503)
        return append(kind, payload, **options)

    monkeypatch.setattr(spool, "append", failing)
    pub = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), pub, spool=spool)
    pipeline.start()
    try:
        await pipeline.accept(*json_batch(open_tree("pinned")))
        for i in range(20):
            await pipeline.accept(*json_batch(tx(f"s{i}", 3)))
        assert tried and all(tried), tried
        assert len(tried) <= 20 * 700 // 2048 + 1, f"{len(tried)} tries: not spaced out"
        await drained(pipeline)
        assert len(pub.transactions) == 20
        assert spool.checkpointed == start, "the checkpoint passed events only a failed rebase held"
        crashed = await crash_copy(pipeline, tmp_path / "spool" / "w-999")
        refuse[0] = False
        for i in range(20, 60):
            await pipeline.accept(*json_batch(tx(f"s{i}", 3)))
        await drained(pipeline)
        assert tried[-1] is False and pipeline.stats.spool_rebases >= 1
        assert spool.checkpointed > start
    finally:
        await pipeline.close()
    records, _ = await replay(crashed, tmp_path / "b")
    (pinned,) = [r for r in records if r["uuid"] == "pinned"]
    assert [c["event"] for c in pinned["children"]] == ["2"]


# ====================================================================== the server


def spooling_cluster(publisher: MemoryPublisher, spool: Path) -> LogCluster:
    """An in-process server on a free port, spooling into ``spool``, no monitor or store."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "mon_port": -1, "store": ""}
    return LogCluster(heartbeat_interval=0, publisher=publisher, spool=str(spool), **options)


async def test_the_port_serves_while_a_big_spool_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server listens before it replays and serves between slices of the replay: a batch posted at start is acked while the replay still runs, and the replay then completes."""
    monkeypatch.setattr(pipeline_module, "REPLAY_SLICE_BYTES", 2048)
    root = tmp_path / "spool"
    dead = Spool(root / "w-999999998", 1 << 30)
    for i in range(2000):
        dead.append(MSGPACK, msgpack.packb({"seq": i, "logs": tx(f"old-{i}", 1)}))
    dead.close()
    pub = MemoryPublisher()
    cluster = spooling_cluster(pub, root)
    await cluster.start()
    try:
        replaying = cluster.replaying
        assert replaying is not None
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.post(f"http://127.0.0.1:{cluster.port}/log", json=tx("fresh")) as resp,
        ):
            assert resp.status == 200
            assert not replaying.done(), "the batch was answered only after the replay"
        await asyncio.wait_for(replaying, TIMEOUT * 3)
        got = await asyncio.to_thread(pub.wait_for, lambda p: len(p.transactions) == 2001, TIMEOUT)
        assert got
        flags = {t["uuid"]: t.get("replayed", False) for t in pub.transactions}
        assert flags.pop("fresh") is False and all(flags.values()) and len(flags) == 2000
        assert not (root / "w-999999998").exists()
    finally:
        await cluster.stop()


async def test_a_full_disk_at_start_serves_and_refuses_with_spool_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool the disk refuses at start does not stop the server: it says so in the log, serves, refuses batches with 503 spool_unavailable, /ecv says so, and once the disk has room batches are taken (logged too)."""
    disk = FullDisk()
    monkeypatch.setattr(spool_module, "os", disk)
    pub = MemoryPublisher()
    cluster = spooling_cluster(pub, tmp_path / "spool")
    caplog.set_level(logging.WARNING, "async_logging.server")
    await cluster.start()
    try:
        assert "No space left on device; batches are refused (spool_unavailable)" in caplog.text
        assert cluster.health()["reason"] == "spool_unavailable"
        assert cluster.health()["available"] is False
        url = f"http://127.0.0.1:{cluster.port}/log"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            async with session.post(url, json=tx("refused")) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]) == (503, "spool_unavailable"), body
                assert "No space left on device" in body["detail"]
            disk.full = False
            async with session.post(url, json=tx("taken")) as resp:
                assert resp.status == 200, await resp.text()
        assert "reason" not in cluster.health()
        assert "can be written again" in caplog.text
        await asyncio.to_thread(pub.wait_for, lambda p: len(p.transactions) == 1, TIMEOUT)
        assert pub.transactions[0]["uuid"] == "taken"
    finally:
        await cluster.stop()


# ====================================================================== real processes


def http(method: str, url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for_line(server: Served, text: str) -> str:
    """The first line of the server's standard error holding ``text`` (waited for)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for line in list(server.stderr):
            if text in line:
                return line
        assert time.monotonic() < deadline, f"no {text!r} in {server.stderr}"
        time.sleep(0.02)


def atomics(batches: list[list[dict[str, Any]]]) -> set[tuple[str, str]]:
    return {(e["uuid"], e["event"]) for b in batches for e in b if e["clazz"] == "atomicEvent"}


def test_short_writes_under_a_file_size_limit_then_kill_9_lose_no_acked_batch(
    tmp_path: Path, procs: list[Served]
) -> None:
    """A real server under RLIMIT_FSIZE: a batch cut short is retried in a new segment (acked), one too big for any is refused 503 spool_unavailable (and /ecv says so), later batches are acked; after kill -9 the next server publishes every acked event and none refused."""
    limit = 64 * 1024
    flags = ("--spool", str(tmp_path / "spool"), "--store", "")
    first = serve(tmp_path, *flags)
    procs.append(first)
    psutil.Process(first.proc.pid).rlimit(psutil.RLIMIT_FSIZE, (limit, limit))
    base = f"http://127.0.0.1:{first.port}/log"
    filler = ["f" * 10_000]
    acked: list[list[dict[str, Any]]] = []
    for batch in (
        *(tx(f"small-{i}") for i in range(10)),
        open_tree("a", data=filler * 3),  # ~30 KB: the first segment nears the limit
        open_tree("b", data=filler * 4),  # does not fit the rest: cut short, then a new segment
    ):
        status, body = http("POST", base, batch)
        assert status == 200, (batch[0]["uuid"], status, body)
        acked.append(batch)
    too_big = open_tree("c", data=filler * 7)  # bigger than the limit: no segment takes it
    status, body = http("POST", base, too_big)
    assert (status, body.get("error")) == (503, "spool_unavailable"), body
    assert first.mon_port
    status, health = http("GET", f"http://127.0.0.1:{first.mon_port}/ecv")
    assert (status, health.get("reason")) == (503, "spool_unavailable"), health
    for batch in (*(tx(f"later-{i}") for i in range(10)), open_tree("e")):
        status, body = http("POST", base, batch)
        assert status == 200, (batch[0]["uuid"], status, body)
        acked.append(batch)
    assert any("spool_unavailable" in line for line in first.stderr)
    first.proc.kill()
    first.proc.wait(TIMEOUT)
    second = serve(tmp_path, *flags)
    procs.append(second)
    wait_for_line(second, "replayed ")  # a stop during the replay would leave it for later
    assert second.stop() == 0
    every, _ = published_events(second.records())
    missing = atomics(acked) - set(every)
    assert not missing, f"acked but never published: {sorted(missing)}"
    assert ("c", "2") not in every, "the refused batch was published"
    assert any("replaying the spool" in line for line in second.stderr), second.stderr


def test_a_spool_directory_that_cannot_be_made_does_not_stop_the_server(
    tmp_path: Path, procs: list[Served]
) -> None:
    """serve --spool on a path that cannot be a directory starts, answers batches 503 spool_unavailable and /ecv 503 with that reason, and stops cleanly."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    server = serve(tmp_path, "--spool", str(blocker / "spool"), "--store", "")
    procs.append(server)
    status, body = http("POST", f"http://127.0.0.1:{server.port}/log", tx("refused"))
    assert (status, body.get("error")) == (503, "spool_unavailable"), body
    assert server.mon_port
    status, health = http("GET", f"http://127.0.0.1:{server.mon_port}/ecv")
    assert (status, health.get("reason")) == (503, "spool_unavailable"), health
    assert server.stop() == 0
