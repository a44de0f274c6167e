"""The event loop's worst hold is measured and exported (``loop_stall_max_seconds``)."""

from __future__ import annotations

import asyncio
import time

from async_logging.server.loopwatch import STALL_THRESHOLD, LoopWatch
from async_logging.server.pipeline import merge_snapshots


def test_the_worst_lateness_is_kept_and_long_holds_counted() -> None:
    watch = LoopWatch()
    for lateness in (0.001, 0.3, 0.02, STALL_THRESHOLD + 0.01):
        watch.observe(lateness)
    assert watch.worst == 0.3 and watch.stalls == 2


def test_workers_worst_cases_merge_as_the_largest_not_the_sum() -> None:
    merged = merge_snapshots(
        [
            {"loop_stall_max_seconds": 0.2, "loop_stalls": 1},
            {"loop_stall_max_seconds": 0.5, "loop_stalls": 2},
        ]
    )
    assert merged == {"loop_stall_max_seconds": 0.5, "loop_stalls": 3}


async def test_a_call_that_holds_the_loop_is_seen_by_the_probe() -> None:
    watch = LoopWatch()
    probe = asyncio.create_task(watch.run(interval=0.005))
    try:
        await asyncio.sleep(0.02)  # the probe is running
        time.sleep(0.15)  # noqa: ASYNC251  (the hold being measured: a frame blocking the loop)
        await asyncio.sleep(0.02)
    finally:
        probe.cancel()
    assert 0.14 <= watch.worst < 1.0
    assert watch.stalls == 1
