"""Helpers shared by the test modules, so that no test file keeps its own copy.

- a hand-driven millisecond :class:`Clock` for the reassembly engine (no sleeps);
- posting logs to an in-process server (:func:`post_logs`) and waiting, on an event, until
  trees are in its store (:func:`stored`);
- reading ``/metrics`` (:class:`Metrics`), free ports, walking published records;
- a load of clients that send over reconnecting WebSockets and remember which server acked
  each frame (:class:`AckedLoad`), for the reliability tests.

The servers and clients of ``test_server`` (in-process) and ``test_server_process`` (a real
``async-logging serve``) are re-exported unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import orjson
from prometheus_client.parser import text_string_to_metric_families

from async_logging.publishers import BatchPublisher
from async_logging.server import LogCluster
from conftest import TIMEOUT
from test_server import answer, connect
from test_server_process import T0, Served, ecv, send_acked, serve, tx

__all__ = [
    "T0",
    "TIMEOUT",
    "AckedLoad",
    "Clock",
    "Metrics",
    "Served",
    "Stream",
    "all_nodes",
    "answer",
    "atomic_keys",
    "connect",
    "ecv",
    "fetch_metrics",
    "free_port",
    "post_logs",
    "published_events",
    "send_acked",
    "serve",
    "split_tree",
    "stored",
    "tx",
    "walk",
]


# ---------------------------------------------------------------------- time


class Clock:
    """A hand-driven millisecond clock for the engine: it moves only when a test moves it."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> int:
        """Move ``seconds`` forward; returns the new time in ms."""
        self.now += int(seconds * 1000)
        return self.now


# ---------------------------------------------------------------------- in-process servers


async def post_logs(server: LogCluster, logs: list[dict[str, Any]]) -> None:
    """``POST /log`` a batch as JSON to an in-process server and check it was accepted whole."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.post(f"http://127.0.0.1:{server.port}/log", json={"logs": logs}) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def stored(server: LogCluster, uuids: set[str], send: Awaitable[None]) -> None:
    """Run ``send``, then wait until the trees of ``uuids`` are in the server's store.

    The live hub is fed with the rows the store has committed, so a record seen on a hub
    subscription is searchable: an event to wait on, not a poll of the store.
    """
    hub = server.live_hub
    assert hub is not None, "stored() needs a server with its store on"
    sub = hub.subscribe()
    try:
        await send
        seen: set[str] = set()
        while not uuids <= seen:
            batch, _ = await asyncio.wait_for(sub.next_batch(), TIMEOUT)
            seen.update(r.get("uuid") for r in batch)
    finally:
        sub.close()


# ---------------------------------------------------------------------- /metrics


class Metrics:
    """The samples of one ``/metrics`` answer, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value

    def get(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), e.g. ``get("..._total", reason="origin")``."""
        return self.samples.get(name, {}).get(frozenset(labels.items()), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """The samples of ``name`` that counted something, keyed by the value of ``label``
        (a labelled counter lists every value it knows at 0 from the start)."""
        return {dict(k)[label]: v for k, v in self.samples.get(name, {}).items() if v}

    def total(self, name: str) -> float:
        """The sum of every sample of ``name`` (over all label values)."""
        return sum(self.samples.get(name, {}).values())


def fetch_metrics(mon_port: int) -> Metrics:
    """GET /metrics from a monitoring port on loopback (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mon_port}/metrics", timeout=TIMEOUT) as r:
        return Metrics(r.read().decode())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server that must come back on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- published records


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A record and every node below it."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.get("children", ()))


def all_nodes(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every node of every record (each record, then the nodes below it)."""
    for record in records:
        yield from walk(record)


def published_events(
    records: Iterable[dict[str, Any]],
) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    """Atomic events in published records: (all copies, copies not flagged ``replayed``).

    An atomic event is keyed by ``(uuid, event)``; the flag is on the top-level record.
    """
    every: Counter[tuple[str, str]] = Counter()
    fresh: Counter[tuple[str, str]] = Counter()
    for rec in records:
        replayed = rec.get("replayed") is True
        for n in walk(rec):
            if n.get("kind") == "atomicEvent":
                key = (str(n.get("uuid")), str(n.get("event")))
                every[key] += 1
                if not replayed:
                    fresh[key] += 1
    return every, fresh


def split_tree(uuid: str, atomics: int = 4) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One transaction sent in two frames: begin and the first atomics, then the rest and end."""
    events = tx(uuid, atomics)
    half = 1 + atomics // 2
    return events[:half], events[half:]


def atomic_keys(frame: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """The ``(uuid, event)`` of the atomic events in a frame."""
    return {(e["uuid"], e["event"]) for e in frame if e["clazz"] == "atomicEvent"}


# ---------------------------------------------------------------------- load


@dataclass
class Stream:
    """One client's frames, and what happened to each."""

    name: str
    frames: list[list[dict[str, Any]]]
    #: seq -> generation of the server whose connection carried the ack.
    acked: dict[int, int] = field(default_factory=dict)
    #: seq -> generations of the connections the frame was sent on.
    sent_on: dict[int, set[int]] = field(default_factory=dict)
    reconnects: int = 0
    refusals: Counter[str] = field(default_factory=Counter)


class AckedLoad:
    """Clients that send their frames as envelopes over reconnecting WebSockets, in a thread.

    Each client keeps up to ``window`` frames in flight and resends what was not acked when
    its connection breaks, until every frame is acked. Every connection is labelled with the
    server ``generation`` current when it opened: the test bumps it after killing a server
    and before starting the next, so an ack tells which server took the frame.
    """

    def __init__(self, port: int, streams: list[Stream], window: int = 8) -> None:
        self.port = port
        self.streams = streams
        self.window = window
        self.generation = 1
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._acks = 0
        self._thread = threading.Thread(target=self._run, name="acked-load", daemon=True)

    def __enter__(self) -> AckedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(TIMEOUT * 6)

    @property
    def acks(self) -> int:
        """Frames acked so far (all clients)."""
        with self._cond:
            return self._acks

    def wait_acks(self, n: int) -> None:
        """Block until ``n`` frames are acked (or every client finished)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._acks >= n or not self._thread.is_alive(), TIMEOUT * 3
            )
        assert ok and self.error is None, (self._acks, self.error)

    def join(self) -> None:
        """Wait until every frame is acked; re-raise what went wrong in a client."""
        self._thread.join(TIMEOUT * 6)
        assert not self._thread.is_alive(), "the clients did not finish"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(self._client(session, s) for s in self.streams))

    async def _client(self, session: aiohttp.ClientSession, st: Stream) -> None:
        deadline = time.monotonic() + TIMEOUT * 5
        url = f"ws://127.0.0.1:{self.port}/"
        while len(st.acked) < len(st.frames):
            assert time.monotonic() < deadline, (
                f"{st.name}: {len(st.frames) - len(st.acked)} frames never acked"
            )
            try:
                ws = await session.ws_connect(url, protocols=("log-protocol",))
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.02)  # nobody listens yet: the server is restarting
                continue
            gen = self.generation
            try:
                ready = await ws.receive(timeout=TIMEOUT)
                if ready.type is not aiohttp.WSMsgType.TEXT or ready.data != "ready":
                    raise ConnectionError("no ready")
                await self._pass(ws, st, gen)
            except (TimeoutError, ConnectionError, aiohttp.ClientError, OSError):
                st.reconnects += 1
            finally:
                await ws.close()

    async def _pass(self, ws: aiohttp.ClientWebSocketResponse, st: Stream, gen: int) -> None:
        while len(st.acked) < len(st.frames):
            todo = [seq for seq in range(len(st.frames)) if seq not in st.acked]
            inflight: deque[int] = deque()
            pos = 0
            refused = False
            while pos < len(todo) or inflight:
                while pos < len(todo) and len(inflight) < self.window:
                    seq = todo[pos]
                    pos += 1
                    st.sent_on.setdefault(seq, set()).add(gen)
                    await ws.send_bytes(msgpack.packb({"seq": seq, "logs": st.frames[seq]}))
                    inflight.append(seq)
                msg = await ws.receive(timeout=TIMEOUT)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"connection closed: {msg.type}")
                ans = orjson.loads(msg.data)
                if "error" in ans:  # e.g. spool_full: resent on the next pass
                    st.refusals[ans["error"]] += 1
                    refused = True
                    inflight.remove(ans["seq"])
                    continue
                seq = ans["ack"]
                inflight.remove(seq)
                st.acked[seq] = gen
                with self._cond:
                    self._acks += 1
                    self._cond.notify_all()
            if refused:
                await asyncio.sleep(0.05)

    def acked_events(self, generation: int | None = None) -> set[tuple[str, str]]:
        """Atomic events of the frames acked (by one server generation, or by any)."""
        out: set[tuple[str, str]] = set()
        for st in self.streams:
            for seq, gen in st.acked.items():
                if generation is None or gen == generation:
                    out |= atomic_keys(st.frames[seq])
        return out

    def resent_events(self) -> set[tuple[str, str]]:
        """Atomic events of frames sent to more than one connection generation (resends)."""
        out: set[tuple[str, str]] = set()
        for st in self.streams:
            for seq, gens in st.sent_on.items():
                if len(gens) > 1:
                    out |= atomic_keys(st.frames[seq])
        return out

    def sent_events(self) -> set[tuple[str, str]]:
        """Atomic events of every frame of every client."""
        return {k for st in self.streams for f in st.frames for k in atomic_keys(f)}


# ---------------------------------------------------------------------- publishers


class Gate(BatchPublisher):
    """A publisher that holds every batch until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.published = 0

    def publish_many(self, records: Sequence[dict[str, Any]]) -> None:
        self.entered.set()
        assert self.open.wait(TIMEOUT * 3), "the test never opened the gate"
        self.published += len(records)
