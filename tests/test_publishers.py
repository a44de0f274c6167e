"""Tests of the publishers (docs/design.md §5) and of the MemoryPublisher test helper."""

from __future__ import annotations

import decimal
import functools
import inspect
import io
import json
import os
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import async_logging.publishers as publishers_pkg
from async_logging.exceptions import ConfigError, UsageError
from async_logging.publishers import (
    BasePublisher,
    CalTextPublisher,
    JsonLinesPublisher,
    MultiPublisher,
    Publisher,
    StdoutPublisher,
    encode_line,
    import_object,
    load_publisher,
)
from async_logging.publishers import base as base_module
from async_logging.publishers import jsonl as jsonl_module
from async_logging.testing import MemoryPublisher

Record = dict[str, Any]


def tx_record(n: int = 0, t0: int = 1_700_000_000_000) -> Record:
    """A complete published transaction tree: a root, a nested transaction, three events."""
    uuid = f"req-{n:06d}"
    common = {"uuid": uuid, "request": uuid, "pid": 42, "machine": "m1"}
    return {
        **common,
        "kind": "transaction",
        "event": "1",
        "parent": "0",
        "type": "URL",
        "name": "/checkout",
        "timestamp": t0,
        "duration": 120,
        "status": "0",
        "complete": True,
        "children": [
            {
                **common,
                "kind": "transaction",
                "event": "2",
                "parent": "1",
                "type": "DB",
                "name": "select",
                "timestamp": t0 + 10,
                "duration": 30,
                "status": "0",
                "complete": True,
                "children": [
                    {
                        **common,
                        "kind": "atomicEvent",
                        "event": "3",
                        "parent": "2",
                        "type": "SQL",
                        "name": "rows",
                        "msg": "3 rows \u00e9\u4e2d\n",
                        "timestamp": t0 + 20,
                    }
                ],
            },
            {**common, "kind": "atomicEvent", "event": "4", "parent": "1", "timestamp": t0 + 50},
        ],
    }


def atomic_record(n: int = 0) -> Record:
    """A stand-alone atomic event record."""
    return {"kind": "atomicEvent", "type": "INFO", "name": f"e{n}", "parent": "0", "timestamp": n}


def heartbeat_record(n: int = 0) -> Record:
    """A heartbeat record."""
    return {"kind": "heartbeat", "type": "HB", "name": "cpu", "parent": "0", "msg": f"n={n}"}


def read_lines(path: Path) -> list[Record]:
    """Every line of ``path`` parsed back, checking the file ends with a newline."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


def pack(lines: list[bytes], max_bytes: int) -> list[list[bytes]]:
    """The lines each file must hold: packed greedily, a new file when the next does not fit."""
    files: list[list[bytes]] = [[]]
    for line in lines:
        if files[-1] and sum(map(len, files[-1])) + len(line) > max_bytes:
            files.append([])
        files[-1].append(line)
    return files


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "all.log"


@pytest.fixture
def jsonl(log_path: Path) -> Iterator[JsonLinesPublisher]:
    publisher = JsonLinesPublisher(log_path)
    yield publisher
    publisher.close()


# -- JsonLinesPublisher ------------------------------------------------------------------------


def test_jsonl_lines_parse_back_to_the_records(jsonl: JsonLinesPublisher, log_path: Path) -> None:
    """Every record, batched or single, is one JSON line that parses back equal, in order."""
    batch = [tx_record(1), atomic_record(2), heartbeat_record(3)]
    jsonl.publish_many(batch)
    jsonl.transaction(tx_record(4))
    jsonl.atomic_event(atomic_record(5))
    jsonl.heartbeat(heartbeat_record(6))
    expected = [*batch, tx_record(4), atomic_record(5), heartbeat_record(6)]
    assert read_lines(log_path) == expected
    assert jsonl.stats["records"] == 6
    assert jsonl.stats["bytes"] == log_path.stat().st_size
    assert jsonl.stats["fallbacks"] == 0


def test_jsonl_batch_larger_than_a_chunk_is_complete_and_ordered(
    jsonl: JsonLinesPublisher, log_path: Path
) -> None:
    """A batch spanning many serialisation chunks lands whole and in order."""
    batch = [tx_record(n) if n % 3 else atomic_record(n) for n in range(3000)]
    jsonl.publish_many(batch)
    assert read_lines(log_path) == batch


def test_jsonl_batch_is_written_with_one_system_call(
    jsonl: JsonLinesPublisher, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish_many hands a whole (multi-chunk) batch to the OS in a single write call."""
    calls: list[str] = []
    real_write, real_writev = os.write, jsonl_module._writev

    def write(fd: int, data: Any) -> int:
        calls.append("write")
        return real_write(fd, data)

    def writev(fd: int, buffers: Sequence[Any]) -> int:
        calls.append("writev")
        assert real_writev is not None
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(jsonl_module, "_writev", writev if real_writev else None)
    batch = [tx_record(n) for n in range(1000)]
    jsonl.publish_many(batch)
    assert len(calls) == 1
    assert len(read_lines(log_path)) == 1000


def test_jsonl_creates_the_directory(tmp_path: Path) -> None:
    """The log file's missing parent directories are created when the publisher is built."""
    path = tmp_path / "a" / "b" / "all.log"
    publisher = JsonLinesPublisher(path)
    try:
        assert path.parent.is_dir()
        assert path.exists()
    finally:
        publisher.close()


def test_jsonl_default_path_is_the_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default records go to ./log/all.log (the seed's winston path), resolved at creation."""
    monkeypatch.chdir(tmp_path)
    publisher = JsonLinesPublisher()
    monkeypatch.chdir(tmp_path.parent)  # a later chdir must not move the log
    try:
        publisher.atomic_event(atomic_record())
    finally:
        publisher.close()
    assert publisher.path == str(tmp_path / "log" / "all.log")
    assert read_lines(tmp_path / "log" / "all.log") == [atomic_record()]


def test_jsonl_appends_to_an_existing_file(log_path: Path) -> None:
    """A restarted publisher appends after what an earlier one wrote."""
    with JsonLinesPublisher(log_path) as first:
        first.atomic_event(atomic_record(1))
    with JsonLinesPublisher(log_path) as second:
        second.atomic_event(atomic_record(2))
    assert read_lines(log_path) == [atomic_record(1), atomic_record(2)]


def test_jsonl_rotates_at_max_bytes_and_keeps_backup_count(log_path: Path) -> None:
    """Files never exceed max_bytes, hold whole lines, and only backup_count backups are kept."""
    records = [atomic_record(n) for n in range(200)]
    lines = [encode_line(r) for r in records]
    max_bytes = 1000
    publisher = JsonLinesPublisher(log_path, max_bytes=max_bytes, backup_count=2)
    try:
        # Batches of odd sizes, some larger than max_bytes (split at line boundaries).
        i, sizes = 0, [1, 7, 30, 2, 50, 3]
        while i < len(records):
            size = sizes[i % len(sizes)]
            publisher.publish_many(records[i : i + size])
            i += size
    finally:
        publisher.close()
    files = pack(lines, max_bytes)
    assert publisher.stats["rotations"] == len(files) - 1
    kept = {log_path: files[-1], Path(f"{log_path}.1"): files[-2], Path(f"{log_path}.2"): files[-3]}
    for path, expected in kept.items():
        assert path.read_bytes() == b"".join(expected)
        assert path.stat().st_size <= max_bytes
    assert not Path(f"{log_path}.3").exists()
    assert sorted(p.name for p in log_path.parent.iterdir() if not p.name.startswith(".")) == [
        "all.log",
        "all.log.1",
        "all.log.2",
    ]


def test_jsonl_line_longer_than_max_bytes_goes_alone(log_path: Path) -> None:
    """A single line longer than max_bytes is written whole, alone in its file."""
    big = {"kind": "atomicEvent", "msg": "x" * 500}
    publisher = JsonLinesPublisher(log_path, max_bytes=100, backup_count=5)
    try:
        publisher.publish_many([atomic_record(1), big, atomic_record(2)])
    finally:
        publisher.close()
    assert read_lines(Path(f"{log_path}.2")) == [atomic_record(1)]
    assert read_lines(Path(f"{log_path}.1")) == [big]
    assert read_lines(log_path) == [atomic_record(2)]


def test_jsonl_max_bytes_zero_never_rotates(log_path: Path) -> None:
    """max_bytes=0 disables rotation, as with RotatingFileHandler."""
    with JsonLinesPublisher(log_path, max_bytes=0) as publisher:
        publisher.publish_many([tx_record(n) for n in range(50)])
    assert publisher.stats["rotations"] == 0
    assert len(read_lines(log_path)) == 50
    assert not Path(f"{log_path}.1").exists()


def test_jsonl_keeps_writing_when_rotation_fails(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing rename is counted and the lines go on into the current file, none lost."""

    def fail(src: str, dst: str) -> None:
        raise PermissionError(src)

    monkeypatch.setattr(os, "replace", fail)
    records = [atomic_record(n) for n in range(40)]
    with JsonLinesPublisher(log_path, max_bytes=200, backup_count=2) as publisher:
        for n in range(0, 40, 4):
            publisher.publish_many(records[n : n + 4])
    assert publisher.stats["rotation_errors"] > 0
    assert publisher.stats["rotations"] == 0
    assert read_lines(log_path) == records


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=60),
    batch=st.integers(min_value=1, max_value=25),
    max_bytes=st.integers(min_value=20, max_value=600),
)
def test_jsonl_rotation_packs_every_line_whole_and_in_order(
    sizes: list[int], batch: int, max_bytes: int
) -> None:
    """For any line sizes, batch size and limit, each file is filled up to max_bytes with whole
    lines, a line longer than the limit sits alone, and every line is kept once, in order."""
    records = [{"kind": "atomicEvent", "n": n, "msg": "y" * size} for n, size in enumerate(sizes)]
    expected = pack([encode_line(r) for r in records], max_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "all.log"
        with JsonLinesPublisher(path, max_bytes=max_bytes, backup_count=len(records)) as pub:
            for i in range(0, len(records), batch):
                pub.publish_many(records[i : i + batch])
        rotated = [Path(f"{path}.{k}") for k in range(pub.stats["rotations"], 0, -1)]
        assert [file.read_bytes() for file in [*rotated, path]] == [b"".join(f) for f in expected]


def test_jsonl_fills_a_file_up_to_exactly_max_bytes(log_path: Path) -> None:
    """A line that ends exactly at max_bytes stays in the file; the next one starts a new file."""
    records = [{"kind": "atomicEvent", "n": n} for n in range(10)]  # equal-length lines
    size = len(encode_line(records[0]))
    with JsonLinesPublisher(log_path, max_bytes=3 * size, backup_count=5) as publisher:
        publisher.publish_many(records)
    assert [len(read_lines(Path(f"{log_path}.{k}"))) for k in (3, 2, 1)] == [3, 3, 3]
    assert read_lines(log_path) == records[9:]


def test_jsonl_unserialisable_value_falls_back_and_is_counted(
    jsonl: JsonLinesPublisher, log_path: Path
) -> None:
    """A value orjson refuses is written with str() in place of the value, and counted."""
    odd = {**atomic_record(1), "amount": decimal.Decimal("1.50"), "tags": {"a"}}
    jsonl.publish_many([tx_record(0), odd, atomic_record(2)])
    assert read_lines(log_path) == [
        tx_record(0),
        {**atomic_record(1), "amount": "1.50", "tags": "{'a'}"},
        atomic_record(2),
    ]
    assert jsonl.stats["fallbacks"] == 1
    assert jsonl.stats["records"] == 3


def test_jsonl_records_nothing_can_encode_still_get_a_line(
    jsonl: JsonLinesPublisher, log_path: Path
) -> None:
    """Big ints and odd keys are written by the fallbacks; a cycle becomes an error line."""
    cyclic: Record = {"kind": "transaction", "uuid": "u9"}
    cyclic["self"] = cyclic
    odd_key: dict[Any, Any] = {"kind": "atomicEvent", 7: "int key"}
    jsonl.publish_many(
        [
            {"kind": "atomicEvent", "big": 2**70 + 1},
            odd_key,
            cyclic,
        ]
    )
    _, int_key, error = read_lines(log_path)
    big = json.loads(
        log_path.read_bytes().splitlines()[0]
    )  # exact: orjson reads big ints as floats
    assert big == {"kind": "atomicEvent", "big": 2**70 + 1}
    assert int_key == {"kind": "atomicEvent", "7": "int key"}
    assert error["kind"] == "transaction"
    assert error["uuid"] == "u9"
    assert "Circular reference" in error["unserialisable"]
    assert error["repr"].startswith("{'kind': 'transaction'")
    assert jsonl.stats["fallbacks"] == 3
    assert jsonl.stats["unserialisable"] == 1


def test_jsonl_flush_and_close_fsync(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flush() asks the OS to put the file on disk, and close() does too before closing."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    publisher = JsonLinesPublisher(log_path)
    publisher.atomic_event(atomic_record())
    publisher.flush()
    assert len(synced) == 1
    publisher.close()
    assert len(synced) == 2


def test_jsonl_publishing_after_close_raises_usage_error(log_path: Path) -> None:
    """A closed publisher refuses records loudly, and closing twice is harmless."""
    publisher = JsonLinesPublisher(log_path)
    publisher.close()
    publisher.close()
    with pytest.raises(UsageError, match="is closed"):
        publisher.atomic_event(atomic_record())


def test_jsonl_bad_options_raise_config_error(tmp_path: Path) -> None:
    """Negative limits and an unusable path are configuration errors naming the problem."""
    with pytest.raises(ConfigError, match="max_bytes must be >= 0"):
        JsonLinesPublisher(tmp_path / "a.log", max_bytes=-1)
    with pytest.raises(ConfigError, match="backup_count must be >= 0"):
        JsonLinesPublisher(tmp_path / "a.log", backup_count=-1)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot open log file"):
        JsonLinesPublisher(tmp_path / "file" / "all.log")


# -- StdoutPublisher ---------------------------------------------------------------------------


def test_stdout_writes_json_lines_to_a_given_text_stream() -> None:
    """StdoutPublisher writes one JSON line per record to the text stream it was given."""
    stream = io.StringIO()
    publisher = StdoutPublisher(stream)
    publisher.publish_many([tx_record(1), atomic_record(2)])
    publisher.heartbeat(heartbeat_record(3))
    lines = stream.getvalue().splitlines()
    assert [orjson.loads(line) for line in lines] == [
        tx_record(1),
        atomic_record(2),
        heartbeat_record(3),
    ]
    publisher.close()
    assert not stream.closed  # the caller's stream is left open


def test_stdout_writes_bytes_to_a_binary_stream() -> None:
    """A binary stream gets the UTF-8 bytes of the lines."""
    stream = io.BytesIO()
    StdoutPublisher(stream).publish_many([tx_record(1)])
    assert stream.getvalue() == encode_line(tx_record(1))


def test_stdout_default_follows_sys_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no stream, records go to whatever sys.stdout is at write time."""
    publisher = StdoutPublisher()
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stdout", replaced)
    publisher.atomic_event(atomic_record(1))
    assert orjson.loads(replaced.getvalue()) == atomic_record(1)


def test_stdout_close_stream_closes_it() -> None:
    """close_stream=True hands the stream's ownership to the publisher."""
    stream = io.StringIO()
    StdoutPublisher(stream, close_stream=True).close()
    assert stream.closed


# -- CalTextPublisher (the worked example) -----------------------------------------------------

CAL_TREE: Record = {
    "kind": "transaction",
    "type": "URL",
    "name": "/checkout",
    "timestamp": 1_700_000_000_000,
    "duration": 120,
    "status": "0",
    "complete": False,
    "reason": "timeout",
    "children": [
        {
            "kind": "transaction",
            "type": "DB",
            "name": "select",
            "timestamp": 1_700_000_000_010,
            "duration": 30,
            "status": "0",
            "complete": True,
            "children": [
                {
                    "kind": "atomicEvent",
                    "type": "SQL",
                    "name": "rows",
                    "timestamp": 1_700_000_000_020,
                    "msg": "3 rows",
                },
            ],
        },
        {
            "kind": "transaction",
            "type": "API",
            "name": "pay",
            "timestamp": 1_700_000_000_050,
            "duration": 60,
            "status": "1",
            "complete": True,
            "children": [],
        },
    ],
}


def test_cal_text_publisher_formats_a_nested_transaction() -> None:
    """A nested tree becomes t/T around children, A for a leaf transaction, E for an event."""
    stream = io.StringIO()
    publisher = CalTextPublisher(stream)
    publisher.publish_many(
        [
            CAL_TREE,
            {"kind": "heartbeat", "type": "HB", "name": "cpu", "timestamp": 1_700_000_001_000},
        ]
    )
    assert stream.getvalue().split("\n") == [
        "t22:13:20.00\tURL\t/checkout",
        "  t22:13:20.01\tDB\tselect",
        "    E22:13:20.02\tSQL\trows\t0\tmsg=3 rows",
        "  T22:13:20.04\tDB\tselect\t0\t30\t",
        "  A22:13:20.05\tAPI\tpay\t1\t60\t",
        "T22:13:20.12\tURL\t/checkout\t0\t120\treason=timeout",
        "H22:13:21.00\tHB\tcpu\t0\t",
        "",
    ]


def test_cal_text_publisher_is_the_example_in_the_docs() -> None:
    """The class shown in the publishers.base docstring is the shipped CalTextPublisher, verbatim."""
    doc = base_module.__doc__
    assert doc is not None
    start = doc.index("        class CalTextPublisher")
    end = doc.index("\n    Plug it in", start)
    shown = textwrap.dedent(doc[start:end]).strip()
    assert shown == inspect.getsource(CalTextPublisher).strip()


# -- the plug-in interface ---------------------------------------------------------------------


class _Recorder(BasePublisher):
    """Remembers which method got which record."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.calls: list[tuple[str, Any]] = []

    def transaction(self, record: Record) -> None:
        self.calls.append(("transaction", record))

    def atomic_event(self, record: Record) -> None:
        self.calls.append(("atomic_event", record))

    def heartbeat(self, record: Record) -> None:
        self.calls.append(("heartbeat", record))


class _OnlyTransaction:
    """Not a publisher: one method of six."""

    def transaction(self, record: Record) -> None:
        pass


def test_base_publish_many_dispatches_on_kind() -> None:
    """publish_many sends each record to the method of its kind; unknown kinds to atomic_event."""
    rec = _Recorder()
    tx, atomic, hb, odd = tx_record(), atomic_record(), heartbeat_record(), {"kind": "mystery"}
    rec.publish_many([tx, atomic, hb, odd])
    assert rec.calls == [
        ("transaction", tx),
        ("atomic_event", atomic),
        ("heartbeat", hb),
        ("atomic_event", odd),
    ]


def test_shipped_publishers_implement_the_protocol(log_path: Path) -> None:
    """Every shipped publisher satisfies the runtime-checkable Publisher protocol."""
    with JsonLinesPublisher(log_path) as jsonl:
        shipped = [jsonl, StdoutPublisher(), CalTextPublisher(io.StringIO()), MemoryPublisher()]
        assert all(isinstance(p, Publisher) for p in shipped)
        assert isinstance(MultiPublisher(shipped), Publisher)
    assert not isinstance(_OnlyTransaction(), Publisher)


def test_load_publisher_instantiates_a_class_with_options(log_path: Path) -> None:
    """A class is instantiated with the options given."""
    publisher = load_publisher(JsonLinesPublisher, path=log_path, max_bytes=10)
    assert isinstance(publisher, JsonLinesPublisher)
    assert publisher.max_bytes == 10
    publisher.close()


def test_load_publisher_returns_an_instance_as_is() -> None:
    """An instance is used as it is."""
    memory = MemoryPublisher()
    assert load_publisher(memory) is memory


def test_load_publisher_imports_module_attr_strings(log_path: Path) -> None:
    """'module:attr' strings (dotted attrs too) and built-in names are imported, then built."""
    assert isinstance(load_publisher("async_logging.testing:MemoryPublisher"), MemoryPublisher)
    assert isinstance(load_publisher("memory"), MemoryPublisher)
    nested = load_publisher("async_logging.publishers:jsonl.JsonLinesPublisher", path=log_path)
    assert isinstance(nested, JsonLinesPublisher)
    nested.close()
    stdout = load_publisher("stdout", stream=io.StringIO())
    assert isinstance(stdout, StdoutPublisher)


def test_load_publisher_calls_a_factory(log_path: Path) -> None:
    """A non-class callable (here a partial) is called with the options and must return one."""
    factory = functools.partial(JsonLinesPublisher, log_path)
    publisher = load_publisher(factory, backup_count=1)
    assert isinstance(publisher, JsonLinesPublisher)
    assert publisher.backup_count == 1
    publisher.close()
    with pytest.raises(ConfigError, match=r"returned str object, which does not implement"):
        load_publisher(lambda: "nope")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", r"'no_colon_here' is neither 'module:attr' nor a built-in name \("),
        (":Cls", r"neither 'module:attr'"),
        ("mod:", r"neither 'module:attr'"),
        (
            "no_such_module_xyz:Pub",
            r"cannot import module 'no_such_module_xyz' for publisher 'no_such_module_xyz:Pub': "
            r"ModuleNotFoundError",
        ),
        (
            "async_logging.testing:NoSuchPublisher",
            r"module 'async_logging.testing' has no attribute 'NoSuchPublisher' "
            r"\(publisher 'async_logging.testing:NoSuchPublisher'\)",
        ),
        (
            "async_logging.testing:MemoryPublisher.nope",
            r"async_logging.testing.MemoryPublisher has no attribute 'nope'",
        ),
        (
            "os:sep",
            r"str object \(from 'os:sep'\) does not implement the Publisher protocol: missing atomic_event, "
            r"heartbeat, transaction, publish_many, flush, close \(subclass "
            r"async_logging.publishers.BasePublisher",
        ),
    ],
)
def test_load_publisher_rejects_bad_strings(spec: str, message: str) -> None:
    """Each kind of bad 'module:attr' string raises ConfigError with a message naming it."""
    with pytest.raises(ConfigError, match=message):
        load_publisher(spec)


def test_import_object_names_the_option_in_its_errors() -> None:
    """import_object resolves 'module:attr' for any plug-in option and names it in errors."""
    assert import_object("async_logging.testing:MemoryPublisher") is MemoryPublisher
    with pytest.raises(ConfigError, match=r"^listener 'memory' is neither 'module:attr'$"):
        import_object("memory", what="listener")
    with pytest.raises(ConfigError, match=r"for buffer 'nowhere_xyz:B': ModuleNotFoundError"):
        import_object("nowhere_xyz:B", what="buffer")


def test_load_publisher_reports_a_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error raised while importing the module is reported with its type and text."""
    (tmp_path / "broken_publisher_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'broken_publisher_mod'.*RuntimeError: boom") as info:
        load_publisher("broken_publisher_mod:Publisher")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_load_publisher_rejects_what_is_not_a_publisher() -> None:
    """A class or object missing methods is refused, naming the missing methods."""
    with pytest.raises(
        ConfigError,
        match=r"class .*_OnlyTransaction does not implement the Publisher protocol: missing "
        r"atomic_event, heartbeat, publish_many, flush, close",
    ):
        load_publisher(_OnlyTransaction)
    with pytest.raises(ConfigError, match=r"int object does not implement the Publisher"):
        load_publisher(42)


def test_load_publisher_rejects_bad_options() -> None:
    """Options the class does not take, or options given with an instance, are refused."""
    with pytest.raises(
        ConfigError, match=r"cannot create publisher .*MemoryPublisher .*\['colour'\]"
    ):
        load_publisher(MemoryPublisher, colour="red")
    with pytest.raises(ConfigError, match=r"options \['colour'\] were given with an instance"):
        load_publisher(MemoryPublisher(), colour="red")


# -- MultiPublisher ----------------------------------------------------------------------------


def test_multi_publisher_fans_out_every_call() -> None:
    """Each publisher gets every record, batch, flush and close, in the order given."""
    first, second = MemoryPublisher(), MemoryPublisher()
    multi = MultiPublisher([first, second])
    batch = [tx_record(1), atomic_record(2)]
    multi.publish_many(batch)
    multi.transaction(tx_record(3))
    multi.atomic_event(atomic_record(4))
    multi.heartbeat(heartbeat_record(5))
    multi.flush()
    multi.close()
    for memory in (first, second):
        assert memory.records == [*batch, tx_record(3), atomic_record(4), heartbeat_record(5)]
        assert (memory.flushed, memory.closed) == (1, 1)


def test_multi_publisher_loads_specs() -> None:
    """Members may be given as anything load_publisher accepts."""
    multi = MultiPublisher(["memory", MemoryPublisher])
    assert [type(p) for p in multi.publishers] == [MemoryPublisher, MemoryPublisher]


class _Failing(BasePublisher):
    def publish_many(self, records: Sequence[Record]) -> None:
        raise OSError("disk full")


def test_multi_publisher_failure_does_not_starve_the_others() -> None:
    """A failing member still lets the others publish; its error is raised afterwards."""
    memory = MemoryPublisher()
    with pytest.raises(OSError, match="disk full"):
        MultiPublisher([_Failing(), memory]).publish_many([atomic_record()])
    assert memory.records == [atomic_record()]
    with pytest.raises(ExceptionGroup, match=r"2 publishers failed in publish_many\(\)") as info:
        MultiPublisher([_Failing(), memory, _Failing()]).publish_many([atomic_record()])
    assert len(info.value.exceptions) == 2
    assert len(memory.records) == 2


class _FailingOnce(MemoryPublisher):
    """Fails its first publish_many call, then records like a MemoryPublisher."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    def publish_many(self, records: Sequence[Record]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("transient")
        super().publish_many(records)


def test_multi_publisher_retry_of_a_failed_batch_skips_healthy_members() -> None:
    """Retrying the same batch reaches only the member that failed it: no duplicates."""
    healthy, flaky = MemoryPublisher(), _FailingOnce()
    multi = MultiPublisher([healthy, flaky])
    batch = [atomic_record(1), tx_record(2)]
    with pytest.raises(OSError, match="transient"):
        multi.publish_many(batch)
    multi.publish_many(batch)  # the server's retry: the same list object
    assert healthy.records == batch
    assert flaky.records == batch
    multi.publish_many(list(batch))  # a new batch (even if equal) goes to everyone
    assert healthy.records == flaky.records == batch + batch


# -- MemoryPublisher ---------------------------------------------------------------------------


def test_memory_publisher_sorts_records_by_kind() -> None:
    """Records land in .records and in the list of their kind; flush/close are counted."""
    memory = MemoryPublisher()
    memory.publish_many([tx_record(), atomic_record(), heartbeat_record()])
    memory.transaction(tx_record(1))
    memory.flush()
    memory.close()
    assert memory.records == [tx_record(), atomic_record(), heartbeat_record(), tx_record(1)]
    assert memory.transactions == [tx_record(), tx_record(1)]
    assert memory.atomic_events == [atomic_record()]
    assert memory.heartbeats == [heartbeat_record()]
    assert (memory.batches, memory.flushed, memory.closed) == (2, 1, 1)
    memory.clear()
    assert (memory.records, memory.batches, memory.closed) == ([], 0, 0)


def test_memory_publisher_wait_for_wakes_on_a_publish_from_another_thread() -> None:
    """wait_for is woken by a publish from another thread, not by its own timeout."""
    memory = MemoryPublisher()
    waiting, woken = threading.Event(), threading.Event()
    woken_in_time: list[bool] = []

    def publish() -> None:
        waiting.wait(timeout=10)  # publish only once the main thread is inside wait_for
        memory.publish_many([atomic_record(1)])
        memory.transaction(tx_record(2))
        # Without a notification the waiter would sleep its whole 30 s timeout.
        woken_in_time.append(woken.wait(timeout=10))

    def seen(p: MemoryPublisher) -> list[Record]:
        waiting.set()
        return p.transactions

    worker = threading.Thread(target=publish)
    worker.start()
    try:
        assert memory.wait_for(seen, timeout=30) == [tx_record(2)]
        woken.set()
    finally:
        worker.join()
    assert woken_in_time == [True]
    assert memory.atomic_events == [atomic_record(1)]


def test_memory_publisher_wait_for_times_out_with_a_summary() -> None:
    """wait_for raises TimeoutError describing what was published when the wait ends."""
    memory = MemoryPublisher()
    memory.atomic_event(atomic_record())
    with pytest.raises(TimeoutError, match=r"0 transactions, 1 atomic events, 0 heartbeats"):
        memory.wait_for(lambda p: p.transactions, timeout=0.01)


# -- exports -----------------------------------------------------------------------------------


def test_publishers_exports() -> None:
    """The publishers package exports exactly its public names."""
    assert set(publishers_pkg.__all__) == {
        "BUILTIN_PUBLISHERS",
        "PUBLISHER_METHODS",
        "BasePublisher",
        "BatchPublisher",
        "CalTextPublisher",
        "JsonLinesPublisher",
        "LineEncoder",
        "MultiPublisher",
        "Publisher",
        "StdoutPublisher",
        "encode_line",
        "import_object",
        "load_publisher",
    }
    assert len(publishers_pkg.__all__) == len(set(publishers_pkg.__all__))
    assert all(hasattr(publishers_pkg, name) for name in publishers_pkg.__all__)


def test_jsonl_writers_sharing_one_file_follow_each_others_rotation(log_path: Path) -> None:
    """Two publishers on one path (server workers) rotate once between them and lose no line."""
    a = JsonLinesPublisher(log_path, max_bytes=2000, backup_count=50, shared=True)
    b = JsonLinesPublisher(log_path, max_bytes=2000, backup_count=50, shared=True)
    records = [atomic_record(n) for n in range(300)]
    try:
        for i in range(0, len(records), 3):
            (a if i % 2 else b).publish_many(records[i : i + 3])
    finally:
        a.close()
        b.close()
    files = sorted(log_path.parent.glob("all.log*"))
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert sorted(orjson.loads(x)["timestamp"] for x in lines) == list(range(300))
    # Each file was written by both, yet stays near the limit (never a private stale file).
    assert all(f.stat().st_size <= 2000 + 3 * len(encode_line(records[0])) for f in files)
    assert a.stats["rotations"] + b.stats["rotations"] == len(files) - 1


def test_batch_publisher_sends_single_records_as_batches_of_one() -> None:
    """A BatchPublisher subclass only writes publish_many; each single-record call arrives there."""
    from async_logging.publishers import BatchPublisher

    class Batches(BatchPublisher):
        def __init__(self) -> None:
            self.calls: list[list[Record]] = []

        def publish_many(self, records: Sequence[Record]) -> None:
            self.calls.append(list(records))

    pub = Batches()
    tx, ev, hb = {"kind": "transaction"}, atomic_record(), heartbeat_record()
    pub.transaction(tx)
    pub.atomic_event(ev)
    pub.heartbeat(hb)
    assert pub.calls == [[tx], [ev], [hb]]
