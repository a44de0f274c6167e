"""Benchmark: the LogBuffer engine's events/s beside the bare msgpack-decode rate.

Feeds N shuffled 12-event transactions, one frame per transaction, and prints beside the
bare decode rate of the same frames measured in the same run (msgpack-python ``unpackb``
and msgspec), as ratios:

- the reference engine: the frames decoded beforehand (not timed), then ``feed_many``
  (map + reassemble);
- the native fast path: ``feed_msgpack`` on the frames' bytes (decode + map + reassemble
  + the records encoded as JSON lines, which the reference figure leaves out).

Run: ``python bench/buffer.py [N]``.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import msgpack
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import EVENTS_PER_TX, shuffled_transactions
from async_logging import LogBuffer
from async_logging.encoded import NATIVE
from async_logging.server.cluster import tune_gc


def best_of(runs: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(runs):
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    frames = [msgpack.packb(tx) for tx in shuffled_transactions(n)]
    events = n * EVENTS_PER_TX
    dec = msgspec.msgpack.Decoder()

    def bare_msgpack() -> None:
        for f in frames:
            msgpack.unpackb(f)

    def bare_msgspec() -> None:
        for f in frames:
            dec.decode(f)

    decoded: list[list[list[dict]]] = []

    def prepare() -> None:
        decoded.clear()
        decoded.extend([dec.decode(f) for f in frames] for _ in range(1))

    published = 0

    def engine() -> None:
        nonlocal published
        buf = LogBuffer(clock=lambda: 1_795_463_406_000)
        # The collector as `serve` runs it (tune_gc): start-up objects, here the pre-decoded
        # input, frozen; automatic collection off (the server collects once a second).
        tune_gc()
        feed = buf.feed_many
        out = 0
        for batch in decoded[0]:
            out += len(feed(batch).records)
        published = out
        assert buf.open_count == 0
        gc.unfreeze()
        gc.enable()

    t_msgpack = best_of(3, bare_msgpack)
    t_msgspec = best_of(3, bare_msgspec)
    t_engine = float("inf")
    for _ in range(3):
        prepare()  # the engine mutates what it is fed: a fresh copy per run, not timed
        t_engine = min(t_engine, best_of(1, engine))
    assert published == n, f"published {published} of {n} trees"

    def native() -> None:
        buf = LogBuffer(clock=lambda: 1_795_463_406_000)
        tune_gc()  # the collector as `serve` runs it, as for the reference engine
        feed = buf.feed_msgpack
        for f in frames:
            if feed(f) is None:
                raise SystemExit("a frame was declined by the native path")
        assert buf.stats["published_complete"] == n
        gc.unfreeze()
        gc.enable()

    decoded.clear()  # the reference run's dicts are not the native run's garbage
    t_native = best_of(3, native) if NATIVE else float("nan")

    def rate(t: float) -> float:
        return events / t

    print(f"LogBuffer engine bench: {n} transactions x {EVENTS_PER_TX} events, shuffled")
    print(f"  bare msgpack-python unpackb : {rate(t_msgpack):>12,.0f} events/s")
    print(f"  bare msgspec decode         : {rate(t_msgspec):>12,.0f} events/s")
    print(f"  engine (map + reassemble)   : {rate(t_engine):>12,.0f} events/s")
    print(f"  engine / msgpack-python     : {t_msgpack / t_engine:>12.2f}x")
    print(f"  engine / msgspec            : {t_msgspec / t_engine:>12.2f}x")
    if NATIVE:
        print(f"  native (bytes -> JSON lines): {rate(t_native):>12,.0f} events/s")
        print(f"  native / msgpack-python     : {t_msgpack / t_native:>12.2f}x")
        print(f"  native / msgspec            : {t_msgspec / t_native:>12.2f}x")
    else:
        print("  native                      : not built (async_logging._speedups missing)")


if __name__ == "__main__":
    main()
