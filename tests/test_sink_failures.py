"""A sink failure never corrupts output or stops ingest forever (issue 12, item 5).

- The JSON-lines sink cuts off a line a failed write tore and says how many records it
  wrote whole, so the retry goes on from the next record: every line parses, each record
  once (fake short writes with ENOSPC, and a real RLIMIT_FSIZE in a subprocess).
- A record a publisher refuses every time, alone, while it takes others (a poison record)
  goes to the dead-letter file with its error after a bounded number of tries, counted, and
  the other records are published exactly once.
- A sink that fails for every record is retried with backoff and never dead-lettered.

No test waits for real: the delivery's sleep is injected.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from async_logging import LogBuffer
from async_logging.cli import main
from async_logging.encoded import EncodedRecords
from async_logging.publishers import (
    BasePublisher,
    BatchPublisher,
    CalTextPublisher,
    JsonLinesPublisher,
    MultiPublisher,
    encode_line,
)
from async_logging.publishers import jsonl as jsonl_module
from async_logging.publishers.base import published_count
from async_logging.server import LogCluster, ServerConfig
from async_logging.server import delivery as delivery_module
from async_logging.server.delivery import POISON_TRIES, DeadLetters, Delivery
from async_logging.server.monapp import SnapshotCollector
from async_logging.server.pipeline import RETRY_BACKOFF, Pipeline, Stats
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import post_logs

T0 = 1_700_000_000_000
Record = dict[str, Any]


def atomic(n: int, name: str = "ok") -> Record:
    """A published stand-alone atomic event."""
    return {
        "kind": "atomicEvent",
        "uuid": f"u-{n}",
        "event": "1",
        "parent": "0",
        "type": "INFO",
        "name": f"{name}-{n}",
        "timestamp": T0 + n,
        "msg": "x" * 40,
    }


def read_lines(path: Path) -> list[Record]:
    """Every line of a JSON-lines file, parsed (a torn line fails the test here; json, not
    orjson: a dead letter may hold an integer past 64 bits)."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


class Sleeps:
    """An injected sleep: records the delays, runs a hook, never waits."""

    def __init__(self, hook: Any = None) -> None:
        self.delays: list[float] = []
        self.hook = hook

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.hook is not None:
            self.hook(len(self.delays))


def delivery(
    publisher: Any, tmp_path: Path, *, giving_up: Any = lambda: False, hook: Any = None
) -> tuple[Delivery, Stats, Sleeps]:
    stats = Stats()
    d = Delivery(
        publisher,
        stats,
        dead_letters=DeadLetters(tmp_path / "dead-letter.log"),
        backoff=RETRY_BACKOFF,
        giving_up=giving_up,
    )
    sleeps = d.sleep = Sleeps(hook)
    return d, stats, sleeps


class ShortWrites:
    """os.write / os.writev that let ``budget`` bytes through, then raise ENOSPC (a disk
    filling up); a test frees space by raising the budget."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
        self.budget = budget
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(jsonl_module, "_writev", self.writev)

    def write(self, fd: int, data: Any) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self._write(fd, bytes(data[: self.budget]))
        self.budget -= n
        return n

    def writev(self, fd: int, buffers: Sequence[Any]) -> int:
        return self.write(fd, b"".join(buffers))


# ---------------------------------------------------------------- torn lines (JSON lines)


def test_jsonl_failed_write_cuts_the_torn_line_and_says_how_many_records_went_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that stops in the 4th line: the file keeps 3 whole lines (the torn start of
    the 4th is cut off), the error says 3, and a retry from record 3 leaves each record once."""
    path = tmp_path / "all.log"
    pub = JsonLinesPublisher(path, max_bytes=0)
    records = [atomic(n) for n in range(20)]
    lines = [encode_line(r) for r in records]
    disk = ShortWrites(monkeypatch, sum(map(len, lines[:3])) + 10)
    with pytest.raises(OSError) as info:
        pub.publish_many(records)
    assert info.value.errno == errno.ENOSPC
    assert published_count(info.value, len(records)) == 3
    assert read_lines(path) == records[:3]
    assert pub.stats["torn_cut"] == 1 and pub.stats["records"] == 3
    disk.budget = 1 << 30
    pub.publish_many(records[3:])
    assert read_lines(path) == records
    pub.close()


@pytest.mark.parametrize("encoded", [False, True], ids=["dicts", "encoded"])
def test_retries_on_a_filling_disk_write_every_record_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoded: bool
) -> None:
    """ENOSPC part-way through every try while space comes back slowly: the delivery
    retries from where each try stopped, so the file ends with every record once, whole;
    nothing is dead-lettered (the sink makes progress, it is not poison). An encoded batch
    (the native path's JSON lines) is written as is while all is well."""
    path = tmp_path / "all.log"
    pub = JsonLinesPublisher(path, max_bytes=0)
    records = [atomic(n) for n in range(40)]
    data = b"".join(encode_line(r) for r in records)
    batch: Sequence[Record] = (
        EncodedRecords(data, {"atomicEvent": len(records)}) if encoded else records
    )
    disk = ShortWrites(monkeypatch, 700)

    def free_space(n: int) -> None:
        disk.budget += 700  # never a whole number of lines

    d, stats, sleeps = delivery(pub, tmp_path, hook=free_space)
    assert d.publish(batch) is True
    assert read_lines(path) == records
    assert stats.records == {"atomicEvent": 40}
    assert stats.publish_errors == len(sleeps.delays) > 3
    assert stats.dead_letters == 0 and not (tmp_path / "dead-letter.log").exists()
    assert pub.stats["torn_cut"] == stats.publish_errors


def test_jsonl_torn_line_under_a_real_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a subprocess: the OS writes a short batch, then refuses (EFBIG);
    the torn line is cut, and once the limit is lifted the rest is written: every line
    parses, each record once."""
    path = tmp_path / "all.log"
    script = textwrap.dedent(
        """
        import json, resource, sys
        from async_logging.publishers import JsonLinesPublisher
        from async_logging.publishers.base import published_count
        records = [{"kind": "atomicEvent", "uuid": f"u-{i}", "msg": "x" * 90} for i in range(100)]
        pub = JsonLinesPublisher(sys.argv[1], max_bytes=0)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))
        try:
            pub.publish_many(records)
        except OSError as exc:
            done, err = published_count(exc, len(records)), exc.errno
        else:
            sys.exit("the write did not fail")
        size = pub.stats["bytes"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        pub.publish_many(records[done:])
        pub.close()
        print(json.dumps({"done": done, "errno": err, "size": size, "cut": pub.stats["torn_cut"]}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        check=True,
    )
    report = json.loads(out.stdout)
    print(report)
    assert report["errno"] == errno.EFBIG and report["cut"] == 1
    records = read_lines(path)
    assert [r["uuid"] for r in records] == [f"u-{i}" for i in range(100)]
    sizes = [len(encode_line(r)) for r in records]
    done = report["done"]
    assert report["size"] == sum(sizes[:done]) <= 4000 < sum(sizes[: done + 1])


def test_jsonl_writes_nothing_after_a_torn_line_it_could_not_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the cut fails (the disk is gone), every call raises before writing; once the
    cut works, the next call cuts first, then writes."""
    path = tmp_path / "all.log"
    pub = JsonLinesPublisher(path, max_bytes=0)
    records = [atomic(n) for n in range(10)]
    disk = ShortWrites(monkeypatch, len(encode_line(records[0])) + 5)
    real_ftruncate = os.ftruncate

    def broken_ftruncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", broken_ftruncate)
    with pytest.raises(OSError) as info:
        pub.publish_many(records)
    done = published_count(info.value, len(records))
    assert done == 1
    torn = path.read_bytes()
    disk.budget = 1 << 30
    with pytest.raises(OSError, match="Input/output error"):
        pub.publish_many(records[done:])
    assert path.read_bytes() == torn  # nothing written after the torn line
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    pub.publish_many(records[done:])
    assert read_lines(path) == records
    pub.close()


def test_shared_jsonl_keeps_a_torn_line_another_process_wrote_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sharing the file, a torn line is cut only while it ends the file: after another
    writer's line it stays (cutting would take that line), counted as torn_lines."""
    path = tmp_path / "all.log"
    pub = JsonLinesPublisher(path, max_bytes=0, shared=True)
    records = [atomic(n) for n in range(4)]
    disk = ShortWrites(monkeypatch, 30)

    def broken_ftruncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "ftruncate", broken_ftruncate)
        with pytest.raises(OSError):
            pub.publish_many(records)
    disk.budget = 1 << 30
    other = b'{"kind":"heartbeat","uuid":"other-worker"}\n'
    with open(path, "ab") as fh:
        fh.write(other)
    pub.publish_many(records)
    content = path.read_bytes()
    assert content.endswith(other + b"".join(encode_line(r) for r in records))
    assert pub.stats["torn_lines"] == 1 and pub.stats["torn_cut"] == 0
    pub.close()


# ---------------------------------------------------------------- poison records


def test_poison_record_through_the_cal_text_example_goes_to_the_dead_letter_file(
    tmp_path: Path,
) -> None:
    """A timestamp of 10**30 makes CalTextPublisher raise (OverflowError) every time: after
    a bounded number of tries it is in the dead-letter file with its error, counted, and
    every other record is written exactly once, in order."""
    stream = io.StringIO()
    records = [atomic(n) for n in range(8)]
    records[2] = {**records[2], "timestamp": 10**30}
    d, stats, sleeps = delivery(CalTextPublisher(stream), tmp_path)
    assert d.publish(records) is True
    names = [line.split("\t")[2] for line in stream.getvalue().splitlines()]
    assert names == [r["name"] for r in records if r is not records[2]]
    (entry,) = read_lines(tmp_path / "dead-letter.log")
    assert entry["record"] == records[2]
    assert entry["error"].startswith("OverflowError: ")
    assert entry["publisher"] == "async_logging.publishers.examples.CalTextPublisher"
    assert stats.dead_letters == 1 and stats.records == {"atomicEvent": 7}
    assert stats.records_dropped == 0
    # The first try published records 0 and 1 (progress), then POISON_TRIES tries failed
    # at the poison record: backoff between them, then the bisection (no waiting).
    assert sleeps.delays == list(RETRY_BACKOFF[:POISON_TRIES])


class AllOrNothing(BatchPublisher):
    """A sink that takes a batch whole or not at all, and says nothing about progress: it
    refuses any batch holding a record named ``poison-*``."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.calls = 0

    def publish_many(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if any(r["name"].startswith("poison") for r in records):
            raise ValueError("cannot take a poison record")
        self.records.extend(records)


def test_poison_records_are_found_by_bisection_in_a_batch_sink(tmp_path: Path) -> None:
    """A sink that refuses whole batches: bisection finds the two poison records among
    1,000 in few calls and the other 998 are published once, in order."""
    records = [atomic(n, "poison" if n in (10, 657) else "ok") for n in range(1000)]
    sink = AllOrNothing()
    d, stats, _ = delivery(sink, tmp_path)
    assert d.publish(records) is True
    assert sink.records == [r for r in records if not r["name"].startswith("poison")]
    dead = read_lines(tmp_path / "dead-letter.log")
    assert [e["record"]["uuid"] for e in dead] == ["u-10", "u-657"]
    assert {e["error"] for e in dead} == {"ValueError: cannot take a poison record"}
    assert stats.dead_letters == 2
    assert sink.calls < 60


def test_a_poison_record_alone_is_held_until_the_sink_takes_another(tmp_path: Path) -> None:
    """A batch of one poison record proves nothing (the sink might be down): it is held
    aside and ingest goes on; once the sink takes the next record it is dead-lettered."""
    sink = AllOrNothing()
    d, stats, _ = delivery(sink, tmp_path)
    assert d.publish([atomic(1, "poison")]) is False  # held: the spool checkpoint waits
    assert d.holding == 1 and stats.dead_letters == 0
    assert not (tmp_path / "dead-letter.log").exists()
    assert d.publish([atomic(2)]) is True
    assert d.holding == 0 and stats.dead_letters == 1
    assert [r["uuid"] for r in sink.records] == ["u-2"]
    (entry,) = read_lines(tmp_path / "dead-letter.log")
    assert entry["record"]["uuid"] == "u-1"


class Chokes(BasePublisher):
    """Records what it publishes; refuses records named ``poison-*`` until ``cured``."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.cured = False

    def atomic_event(self, record: Record) -> None:
        if record["name"].startswith("poison") and not self.cured:
            raise ValueError(f"cannot write {record['name']}")
        self.seen.append(record["uuid"])

    transaction = heartbeat = atomic_event


class Down(BatchPublisher):
    """A sink that fails for every record until ``up`` is set (a disk that is gone)."""

    def __init__(self) -> None:
        self.up = False
        self.records: list[Record] = []

    def publish_many(self, records: Sequence[Record]) -> None:
        if not self.up:
            raise OSError(errno.EIO, "Input/output error")
        self.records.extend(records)


def test_each_member_of_a_multi_publisher_is_retried_on_its_own(tmp_path: Path) -> None:
    """With several sinks, a failure in one is retried with that one only: the healthy
    sink never sees a record twice, and a poison record is dead-lettered for the sink that
    refuses it while the others publish it."""
    healthy, flaky, choking = MemoryPublisher(), Down(), Chokes()
    records = [atomic(n, "poison" if n == 3 else "ok") for n in range(6)]
    multi = MultiPublisher([healthy, flaky, choking])
    d, stats, _ = delivery(multi, tmp_path, hook=lambda n: setattr(flaky, "up", True))
    assert d.publish(records) is True
    assert healthy.records == records and flaky.records == records
    assert choking.seen == [r["uuid"] for r in records if n_of(r) != 3]
    (entry,) = read_lines(tmp_path / "dead-letter.log")
    assert entry["publisher"].endswith("test_sink_failures.Chokes")
    assert stats.records == {"atomicEvent": 6}  # counted by the first sink


def test_multi_publisher_retry_resumes_each_member_where_it_stopped() -> None:
    """Used directly, a MultiPublisher retried with the very batch that failed resumes the
    failing member from the record it stopped at, and its error says nothing was published
    (the healthy member has all of it): no member sees a record twice."""
    healthy, choking = MemoryPublisher(), Chokes()
    multi = MultiPublisher([healthy, choking])
    records = [atomic(n, "poison" if n == 2 else "ok") for n in range(5)]
    with pytest.raises(ValueError) as info:
        multi.publish_many(records)
    assert published_count(info.value, len(records)) == 0
    choking.cured = True
    multi.publish_many(records)
    assert healthy.records == records
    assert choking.seen == [r["uuid"] for r in records]


def n_of(record: Record) -> int:
    return int(record["uuid"].removeprefix("u-"))


# ---------------------------------------------------------------- a sink that is down


def test_a_sink_that_fails_for_every_record_is_retried_never_dead_lettered(
    tmp_path: Path,
) -> None:
    """An always-failing sink: the batch is retried with the backoff (the last delay
    repeating) until shutdown gives it up, counted as dropped; no record is dead-lettered."""
    giving_up = threading.Event()
    d, stats, sleeps = delivery(
        Down(),
        tmp_path,
        giving_up=giving_up.is_set,
        hook=lambda n: n >= 30 and giving_up.set(),
    )
    records = [atomic(n) for n in range(500)]
    assert d.publish(records) is False
    assert sleeps.delays == [*RETRY_BACKOFF, *[RETRY_BACKOFF[-1]] * (30 - len(RETRY_BACKOFF))]
    assert stats.dead_letters == 0 and not (tmp_path / "dead-letter.log").exists()
    assert stats.records_dropped == 500 and d.holding == 0
    assert stats.records == {}


def test_a_sink_down_holds_a_bounded_number_of_records_then_only_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches to a sink that is down are held aside up to POISON_HOLD records; past
    that the sink is taken to be down and retried. When it comes back every record is
    published (the held ones after) and none is dead-lettered."""
    monkeypatch.setattr(delivery_module, "POISON_HOLD", 2)
    sink = Down()
    d, stats, sleeps = delivery(sink, tmp_path, hook=lambda n: n >= 20 and setattr(sink, "up", 1))
    assert d.publish([atomic(0)]) is False and d.holding == 1
    assert d.publish([atomic(1)]) is False and d.holding == 2
    assert d.publish([atomic(2)]) is True  # not held: retried until the sink came back
    assert len(sleeps.delays) == 20
    assert [r["uuid"] for r in sink.records] == ["u-2", "u-0", "u-1"]
    assert stats.dead_letters == 0 and d.holding == 0
    assert stats.records == {"atomicEvent": 3}


@pytest.mark.parametrize("n", [5, 150], ids=["held", "retried"])
async def test_pipeline_with_a_sink_down_says_publisher_stalled_and_dead_letters_nothing(
    tmp_path: Path, n: int
) -> None:
    """Through the pipeline: a sink that is down (its records held aside, or, past the
    hold, retried) makes /ecv's reason publisher_stalled once no record went out for
    stall_after; nothing is dead-lettered; at shutdown, past wait_for_publisher, the
    records are dropped, counted."""
    sink = Down()
    pipeline = Pipeline(
        LogBuffer(),
        sink,
        wait_for_publisher=0.01,
        dead_letters=DeadLetters(tmp_path / "dead-letter.log"),
    )
    now = [100.0]
    pipeline.clock = lambda: now[0]
    idle = threading.Event()
    pipeline.delivery.sleep = lambda seconds: idle.wait(0.001)
    pipeline.start()
    pipeline.emit([atomic(i) for i in range(n)])
    for _ in range(int(TIMEOUT / 0.005)):  # the publisher thread failing on its own
        if pipeline.delivery.holding == n or pipeline.stats.publish_errors > 2 * n:
            break
        await asyncio.sleep(0.005)
    assert pipeline.delivery.holding == (n if n < 100 else 0)
    assert pipeline.refusing() is None
    now[0] += pipeline.stall_after + 1
    assert pipeline.refusing() == "publisher_stalled"
    await pipeline.close()
    assert pipeline.stats.dead_letters == 0 and not (tmp_path / "dead-letter.log").exists()
    assert pipeline.stats.records_dropped == n


# ---------------------------------------------------------------- the server


def poison_event(uuid: str, name: str) -> Record:
    return {
        "clazz": "atomicEvent",
        "uuid": uuid,
        "event": "1",
        "parent": "0",
        "type": "INFO",
        "name": name,
        "timestamp": T0,
    }


async def test_pipeline_sets_a_poison_record_aside_and_publishes_the_rest_once(
    tmp_path: Path,
) -> None:
    """Events fed through the pipeline and its LogBuffer: the record the publisher chokes
    on is dead-lettered, the others are published once, and the counter says 1."""
    sink = Chokes()
    pipeline = Pipeline(LogBuffer(), sink, dead_letters=DeadLetters(tmp_path / "dead-letter.log"))
    sleeps = pipeline.delivery.sleep = Sleeps()
    pipeline.start()
    names = ["ok", "ok", "poison", "ok"]
    await pipeline.accept([poison_event(f"u-{i}", n) for i, n in enumerate(names)])
    await pipeline.close()
    assert sink.seen == ["u-0", "u-1", "u-3"]
    (entry,) = read_lines(tmp_path / "dead-letter.log")
    assert entry["record"]["uuid"] == "u-2" and entry["error"] == "ValueError: cannot write poison"
    assert pipeline.stats.dead_letters == 1 and pipeline.stats.records_dropped == 0
    assert len(sleeps.delays) == POISON_TRIES  # after the first try, which took u-0, u-1


async def test_server_dead_letters_beside_its_log_file_and_counts_it(tmp_path: Path) -> None:
    """A server with a plug-in publisher that chokes on one record: the record is in
    dead-letter.log beside the log file, /metrics counts it, the rest is published."""
    sink = Chokes()
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=sink,
        store="",
        log_file=str(tmp_path / "log" / "all.log"),
    )
    await cluster.start()
    try:
        assert cluster.pipeline is not None
        cluster.pipeline.delivery.sleep = Sleeps()
        await post_logs(cluster, [poison_event("a", "ok"), poison_event("b", "poison")])
        await post_logs(cluster, [poison_event("c", "ok")])
    finally:
        await cluster.stop()
    assert sink.seen == ["a", "c"]
    (entry,) = read_lines(tmp_path / "log" / "dead-letter.log")
    assert entry["record"]["uuid"] == "b"
    families = {f.name: f for f in SnapshotCollector(cluster.snapshot).collect()}
    assert families["async_logging_dead_letters"].samples[0].value == 1


def test_dead_letter_option_defaults_beside_the_log_file(tmp_path: Path) -> None:
    """dead_letter: a flag and a TOML key; empty means dead-letter.log beside log_file."""
    log = str(tmp_path / "x" / "all.log")
    assert ServerConfig(log_file=log).dead_letter_file() == str(tmp_path / "x" / "dead-letter.log")
    config = ServerConfig.from_mapping({"deadLetter": "/srv/dead.log", "log_file": log})
    assert config.dead_letter_file() == "/srv/dead.log"
    assert "--dead-letter" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_dead_letter_file_is_opened_on_first_use_and_rotated(tmp_path: Path) -> None:
    """No file until a record is set aside; past max_bytes it rotates, keeping one backup."""
    path = tmp_path / "dead.log"
    dead = DeadLetters(path, max_bytes=600, backup_count=1)
    assert not path.exists()
    entries = [{"error": "E: x", "publisher": "p", "record": atomic(n)} for n in range(12)]
    for entry in entries:
        dead.write([entry])
    dead.close()
    kept = read_lines(Path(f"{path}.1")) + read_lines(path)
    assert kept == entries[-len(kept) :] and 0 < len(kept) < len(entries)
    assert path.stat().st_size <= 600
