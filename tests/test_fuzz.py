"""Fuzz of the decode-and-reassemble path (issue 5, item 2), bounded in time.

Hypothesis generates frames: arbitrary bytes (as binary or text frames), random text,
random MessagePack and JSON structures shaped like log batches, and mutations of valid
frames. They go once straight into the decoder and the reassembly engine (no network), and
once over ONE WebSocket to a real in-process server, each followed by a good frame. The
decoder itself is the oracle of what must be refused and why; the test pins that the server
never crashes, answers every bad frame with an error, publishes every good event, and
counts every refusal in ``/metrics``.

``ASYNC_LOGGING_FUZZ_EXAMPLES`` scales the number of examples (default: about 20 s here).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_logging import LogBuffer, model, wire
from async_logging.exceptions import BadInput
from async_logging.publishers.jsonl import encode_line
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from helpers import TIMEOUT, Metrics, all_nodes, tx

NETWORK_EXAMPLES = int(os.environ.get("ASYNC_LOGGING_FUZZ_EXAMPLES", "1500"))
DIRECT_EXAMPLES = NETWORK_EXAMPLES * 2

#: Small limits, so that random input reaches each of them often.
LIMITS: dict[str, int] = {
    "max_events_per_frame": 8,
    "max_depth": 5,
    "max_string_length": 40,
    "max_keys_per_map": 12,
    "max_message_bytes": 64 * 1024,
}
WIRE = wire.WireLimits(**LIMITS)

#: Every reason the decoder may give these frames (a form's only come with HTTP bodies),
#: and those one event is refused with (the mapper's and the decoder's own).
FRAME_REASONS = set(wire.FRAME_REASONS) - {"bad_form", "unsupported_media_type"}
EVENT_REASONS = {*model.REFUSAL_REASONS, *wire.EVENT_REASONS}

# ---------------------------------------------------------------------- strategies

ids = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "4"]),
    st.integers(-2, 6),
    st.text(max_size=4),
    st.none(),
    st.floats(),
    st.booleans(),
)
clazzes = st.one_of(
    st.sampled_from(["begin", "end", "atomicEvent", "heartbeat", "bogus", ""]),
    st.integers(0, 3),
    st.none(),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
)
msgpack_scalars = st.one_of(
    json_scalars,
    json_scalars,
    json_scalars,
    st.floats(),
    st.binary(max_size=8),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
)


def values(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=12,
    )


def log_maps(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    """Maps that look like log events, with wrong types, missing keys and extras mixed in."""
    known = st.fixed_dictionaries(
        {},
        optional={
            "clazz": clazzes,
            "uuid": st.sampled_from(["fz-a", "fz-b"]) | ids,
            "event": ids,
            "parent": ids,
            "name": st.text(max_size=8),
            "msg": st.text(max_size=45),
            "status": ids,
            "duration": st.integers(-5, 10**6) | st.text(max_size=4) | st.floats(),
            "timestamp": st.integers(-1, 2**62) | st.text(max_size=4) | st.floats(),
            "data": values(scalars, keys),
        },
    )
    extra = st.dictionaries(keys, values(scalars, keys), max_size=13)
    return st.builds(lambda k, e: {**e, **k}, known, extra)


def near_limits(keys: st.SearchStrategy[Any]) -> Any:
    """Log maps at or just past one of LIMITS: string length, nesting depth, keys per map."""

    def nest(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    base = {"clazz": "atomicEvent", "uuid": "fz-l", "event": "2", "parent": "1"}
    return st.one_of(
        st.integers(36, 44).map(lambda n: {**base, "msg": "x" * n}),
        st.integers(36, 44).map(lambda n: {**base, "k" * n: 1}),
        st.integers(2, 6).map(lambda d: {**base, "data": nest(d)}),
        st.integers(7, 9).map(lambda n: {**base, **{f"k{i}": i for i in range(n)}}),
        st.integers(9, 13).map(lambda n: {**base, "data": {f"k{i}": i for i in range(n)}}),
    )


def payloads(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    """One log map, an array of items, or an envelope (with odd seqs and keys now and then)."""
    item = log_maps(scalars, keys) | near_limits(keys) | values(scalars, keys)
    items = st.lists(item, max_size=10)
    seqs = st.integers(0, 2**40) | st.integers(-3, -1) | st.text(max_size=3) | st.none()
    envelope = st.builds(
        lambda seq, logs, extra: {"seq": seq, "logs": logs, **extra},
        seqs,
        items | values(scalars, keys),
        st.dictionaries(st.sampled_from(["x", "ack"]), scalars, max_size=1),
    )
    return log_maps(scalars, keys) | items | envelope | values(scalars, keys)


msgpack_payloads = payloads(msgpack_scalars, st.text(max_size=45) | st.integers(0, 3)).map(
    lambda p: msgpack.packb(p, datetime=False)
)
json_payloads = payloads(json_scalars, st.text(max_size=45)).map(orjson.dumps)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, insert, delete bytes or truncate: ``(op, position, byte)`` edits."""
    buf = bytearray(data)
    for op, pos, byte in edits:
        at = pos % (len(buf) + 1)
        if op == 0 and at < len(buf):
            buf[at] ^= byte or 1
        elif op == 1:
            buf.insert(at, byte)
        elif op == 2 and at < len(buf):
            del buf[at]
        elif op == 3:
            del buf[at:]
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)

#: A frame: (is_text, payload bytes).
frames = st.one_of(
    st.tuples(st.just(False), st.binary(max_size=300)),
    st.tuples(st.just(True), st.binary(max_size=300)),
    st.tuples(st.just(True), st.text(max_size=200).map(str.encode)),
    st.tuples(st.just(False), msgpack_payloads),
    st.tuples(st.just(False), msgpack_payloads),
    st.tuples(st.just(False), msgpack_payloads),
    st.tuples(st.just(True), json_payloads),
    st.tuples(st.just(True), json_payloads),
    st.tuples(st.just(True), json_payloads),
    st.tuples(st.just(False), st.builds(mutate, msgpack_payloads, edits)),
    st.tuples(st.just(True), st.builds(mutate, json_payloads, edits)),
)


def decode(is_text: bool, data: bytes) -> wire.Frame:
    return wire.decode_json(data, WIRE) if is_text else wire.decode_msgpack(data, WIRE)


def expected_answers(is_text: bool, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """What the server must answer to a frame, by the decoder and a fresh engine; and the
    number of refusals it must count (the frame, or each refused event)."""
    try:
        frame = decode(is_text, data)
    except BadInput as exc:
        return [{"error": exc.reason}], 1
    fed = LogBuffer().feed_many(frame.logs)  # refusals depend on the event alone
    if fed.rejected:
        rejected = [{"index": i, "error": e.reason} for i, e in fed.rejected]
        answer = {
            "error": "invalid_events",
            "seq": frame.seq,
            "rejected": rejected[:100],  # the first 100 listed, all counted
            "rejected_count": len(rejected),
        }
        return [answer], len(rejected)
    return ([{"ack": frame.seq}] if frame.seq is not None else []), 0


def comparable(ans: dict[str, Any]) -> dict[str, Any]:
    """An answer without its free-text details."""
    out = {k: v for k, v in ans.items() if k not in ("detail", "seq")}
    if "rejected" in out:
        out["rejected"] = [{"index": r["index"], "error": r["error"]} for r in out["rejected"]]
        out["seq"] = ans.get("seq")
        out.pop("ack", None)
    return out


# ---------------------------------------------------------------------- no network


@settings(
    max_examples=DIRECT_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frame=frames)
def test_decode_and_reassembly_raise_nothing_but_bad_input(frame: tuple[bool, bytes]) -> None:
    """Any frame decodes or raises BadInput with a documented reason, and the engine takes any decoded batch, publishing records the JSON-lines sink writes whole."""
    is_text, data = frame
    try:
        decoded = decode(is_text, data)
    except BadInput as exc:
        assert exc.reason in FRAME_REASONS, exc.reason
        assert exc.status in (400, 413), exc.status
        return
    buffer = LogBuffer(max_depth=3)
    fed = buffer.feed_many(decoded.logs)
    indices = [i for i, _ in fed.rejected]
    assert indices == sorted(set(indices)) and all(0 <= i < len(decoded.logs) for i in indices)
    assert {e.reason for _, e in fed.rejected} <= EVENT_REASONS
    records = fed.records + buffer.expire() + buffer.flush_all()
    assert buffer.open_count == 0
    stats: Counter[str] = Counter()
    for record in records:
        assert record["kind"] in ("transaction", "atomicEvent", "heartbeat"), record
        line = encode_line(record, stats)  # what the default JSON-lines sink writes
        assert json.loads(line)["kind"] == record["kind"]
    assert not stats["unserialisable"], stats


def tree_events() -> Any:
    """Events of a few transactions whose parents form any graph: chains, cycles, orphans."""
    event = st.builds(
        lambda clazz, uuid, eid, parent: {
            "clazz": clazz,
            "uuid": uuid,
            "event": str(eid),
            "parent": str(parent),
        },
        st.sampled_from(["begin", "end", "atomicEvent"]),
        st.sampled_from(["t1", "t2"]),
        st.integers(1, 40),
        st.integers(0, 40),
    )
    return st.lists(event, max_size=120)


@settings(max_examples=DIRECT_EXAMPLES, deadline=None)
@given(events=tree_events(), cut=st.integers(0, 120))
def test_any_parent_graph_is_published_without_losing_an_event(
    events: list[dict[str, Any]], cut: int
) -> None:
    """Whatever the parent links (deep chains, cycles, self-parents, orphans), every event id fed is published, and no other."""
    fed_ids = {(e["uuid"], e["event"]) for e in events}
    buffer = LogBuffer(max_depth=4)
    records = buffer.feed_many(events[:cut]).records
    records += buffer.feed_many(events[cut:]).records
    records += buffer.flush_all()
    published = Counter((n["uuid"], n["event"]) for n in all_nodes(records))
    assert set(published) == fed_ids


# ---------------------------------------------------------------------- over a WebSocket


class Live:
    """A server, a client session and one WebSocket on an event loop in a thread, so that a
    synchronous hypothesis test can drive one connection across all its examples."""

    def __init__(self, store: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")
        self.thread.start()
        self.publisher = MemoryPublisher()
        self.cluster = LogCluster(
            host="127.0.0.1",
            port=0,
            mon_port=0,
            heartbeat_interval=0,
            publisher=self.publisher,
            store=str(store),  # the default sinks: the viewer's SQLite store too
            **LIMITS,
        )
        self.run(self.cluster.start())
        self.session: aiohttp.ClientSession = self.run(self._session())
        self.ws = self.run(self._connect())

    def run(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(
            f"ws://127.0.0.1:{self.cluster.port}/", protocols=("log-protocol",)
        )
        ready = await ws.receive(timeout=TIMEOUT)
        assert ready.data == "ready"
        return ws

    async def exchange(self, is_text: bool, data: bytes, good_seq: int, good: list[Any]) -> Any:
        """Send the fuzz frame then a good one; return the answers that came before its ack."""
        ws = self.ws
        await ws.send_frame(data, aiohttp.WSMsgType.TEXT if is_text else aiohttp.WSMsgType.BINARY)
        await ws.send_bytes(msgpack.packb({"seq": good_seq, "logs": good}))
        answers = []
        while True:
            msg = await ws.receive(timeout=TIMEOUT)
            assert msg.type is aiohttp.WSMsgType.TEXT, f"the server closed the connection: {msg}"
            ans = orjson.loads(msg.data)
            if ans == {"ack": good_seq}:
                return answers
            answers.append(ans)

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(f"http://127.0.0.1:{self.cluster.mon_port}{path}") as resp:
            return resp.status, await resp.text()

    def close(self) -> None:
        async def shut() -> None:
            await self.ws.close()
            await self.session.close()
            await self.cluster.stop()

        try:
            self.run(shut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@pytest.fixture
def live(tmp_path: Path) -> Any:
    server = Live(tmp_path / "trees.sqlite")
    try:
        yield server
    finally:
        server.close()


def test_fuzzed_frames_over_one_websocket(live: Live) -> None:
    """Random and mutated frames interleaved with good ones on one connection: no crash, every bad frame answered and counted in /metrics, every good event published."""
    run = secrets.token_hex(4)
    good_uuids: list[str] = []
    tally = {"frames": 0, "refusals": 0, "bad_frames": 0}
    reasons: Counter[str] = Counter()

    @settings(
        max_examples=NETWORK_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frame=frames)
    def one(frame: tuple[bool, bytes]) -> None:
        is_text, data = frame
        expected, refusals = expected_answers(is_text, data)
        uuid = f"good-{run}-{len(good_uuids)}"
        good_uuids.append(uuid)
        answers = live.run(live.exchange(is_text, data, 10**15 + len(good_uuids), tx(uuid)))
        assert [comparable(a) for a in answers] == [comparable(e) for e in expected], (
            data[:80],
            answers,
        )
        for a in answers:
            if "error" in a:
                assert a.get("detail") or a["error"] == "invalid_events"
                reasons[a["error"]] += 1
        tally["frames"] += 1
        tally["refusals"] += refusals
        tally["bad_frames"] += bool(refusals)

    one()
    status, body = live.run(live.get("/ecv"))
    assert status == 200 and orjson.loads(body)["status"] == "AVAILABLE"
    assert not live.ws.closed
    want = set(good_uuids)
    got = live.publisher.wait_for(
        lambda p: (
            want <= {t["uuid"] for t in p.transactions if t.get("complete")} and p.transactions
        ),
        TIMEOUT,
    )
    complete = [t for t in got if t["uuid"] in want]
    assert all(len(t["children"]) == 2 for t in complete)
    _, text = live.run(live.get("/metrics"))
    m = Metrics(text)
    counted = m.total("async_logging_bad_input_total")
    print(
        f"fuzz: {tally['frames']} fuzzed frames ({tally['bad_frames']} refused, "
        f"{tally['refusals']} refusals counted {counted:.0f}) and {len(good_uuids)} good "
        f"frames; reasons {dict(reasons)}"
    )
    assert counted == tally["refusals"], (counted, tally)
    assert tally["bad_frames"] > tally["frames"] // 4  # the generator does reach the refusals


# ---------------------------------------------------------------------- atheris (optional)

ATHERIS_HARNESS = """
import sys

import atheris

with atheris.instrument_imports():
    from async_logging import LogBuffer, wire
    from async_logging.exceptions import BadInput

LIMITS = wire.WireLimits(**{limits!r})


def one(data):
    for is_text in (False, True):
        try:
            frame = wire.decode_json(data, LIMITS) if is_text else wire.decode_msgpack(data, LIMITS)
        except BadInput:
            continue
        buffer = LogBuffer(max_depth=3)
        buffer.feed_many(frame.logs)
        buffer.flush_all()


atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def test_coverage_guided_fuzz_of_decode_and_reassembly(tmp_path: Path) -> None:
    """libFuzzer (atheris), seeded with good frames, finds no input that makes decode or reassembly raise anything but BadInput within its time budget."""
    pytest.importorskip("atheris")  # optional: a coverage-guided complement to hypothesis
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(
        [
            msgpack.packb({"seq": 1, "logs": tx("seed-a")}),
            orjson.dumps({"seq": 2, "logs": tx("seed-b")}),
            msgpack.packb(tx("seed-c")),
            orjson.dumps(tx("seed-d")[0]),
        ]
    ):
        (corpus / f"seed-{i}").write_bytes(seed)
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS.format(limits=LIMITS))
    seconds = max(1, NETWORK_EXAMPLES // 200)
    run = subprocess.run(
        [
            sys.executable,
            str(harness),
            f"-max_total_time={seconds}",
            "-rss_limit_mb=1024",
            "-timeout=10",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=seconds + TIMEOUT * 6,
    )
    crashes = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))
    )
    assert run.returncode == 0 and not crashes, (crashes, run.stderr[-3000:])
    done = [line for line in run.stderr.splitlines() if line.startswith("Done")]
    print(f"atheris: {done[-1] if done else run.stderr[-200:]}")
    assert done, run.stderr[-2000:]
