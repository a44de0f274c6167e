"""Benchmark: the worst frame shapes found for the engine, beside an ordinary frame of the
same size (docs/design.md §7: no frame holds the event loop for more than 100 ms).

Each shape is one MessagePack frame of one tree with ``--events`` atomic children, taken
the way the server takes it: the native fast path first, then (it declines all of these)
the wire decoder and the reference engine. Printed: milliseconds per frame (what the event
loop is held for), microseconds per event, and the ratio to the ordinary frame measured in
the same run.

Shapes:
- ``ordinary``: children with their own ids (the reference);
- ``shared key``: children sharing event id, parent, timestamp and msg, differing in one
  other key (before issue 12 they were compared pairwise: 10-17 s for 10,000);
- ``identical``: the same child ``--events`` times (a client resending in one frame);
- ``resent``: the shared-key frame, then the same frame again (every child a duplicate).

Run: ``python bench/worst.py [--events N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack

from async_logging import LogBuffer, wire

T = 1_700_000_000_000


def frame(uuid: str, n: int, child: Callable[[int], dict[str, Any]]) -> bytes:
    events: list[dict[str, Any]] = [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T}
    ]
    for i in range(n):
        events.append({"clazz": "atomicEvent", "uuid": uuid, "parent": "1", **child(i)})
    events.append({"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T})
    return bytes(msgpack.packb(events))


SHAPES: dict[str, Callable[[int], dict[str, Any]]] = {
    "ordinary": lambda i: {"event": str(i + 2), "timestamp": T + i, "msg": f"m{i}"},
    "shared key": lambda i: {"event": "2", "timestamp": T, "msg": "same", "n": i},
    "identical": lambda i: {"event": "2", "timestamp": T, "msg": "same", "n": 0},
}


def take(buf: LogBuffer, payload: bytes, limits: wire.WireLimits) -> None:
    """What the server does with a frame (Pipeline.accept_msgpack, without the I/O)."""
    if buf.feed_msgpack(payload, limits) is None:
        buf.feed_many(wire.decode_msgpack(payload, limits).logs)


def timed(frames: list[bytes], n: int, limits: wire.WireLimits) -> float:
    """Seconds for the slowest frame of ``frames`` fed to a fresh engine."""
    buf = LogBuffer(max_events_per_tx=4 * n + 4)
    worst = 0.0
    for payload in frames:
        t = time.perf_counter()
        take(buf, payload, limits)
        worst = max(worst, time.perf_counter() - t)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5, help="runs of each shape (best kept)")
    args = ap.parse_args()
    n = args.events
    limits = wire.WireLimits(max_events_per_frame=n + 2)
    cases = {name: [frame("u", n, child)] for name, child in SHAPES.items()}
    cases["resent"] = [frame("u", n, SHAPES["shared key"])] * 2
    best = {
        name: min(timed(frames, n, limits) for _ in range(args.repeat))
        for name, frames in cases.items()
    }
    size = len(cases["shared key"][0])
    print(f"worst-shape bench: one tree of {n:,} atomic events per frame ({size:,} bytes)")
    ref = best["ordinary"]
    for name, seconds in best.items():
        print(
            f"  {name:<11}: {seconds * 1000:>8.1f} ms for its slowest frame, "
            f"{seconds / n * 1e6:>6.2f} us/event, {seconds / ref:>5.2f}x the ordinary frame"
        )
    print(f"  target: every frame under 100 ms; worst {max(best.values()) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
