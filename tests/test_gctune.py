"""The serving process's memory: collections on a schedule, free pages handed back."""

from __future__ import annotations

import gc

import psutil
import pytest

from async_logging.server import gctune


def test_free_heap_pages_are_handed_back_on_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(gctune, "_malloc_trim", calls.append)
    gc.disable()
    try:
        for tick in range(1, 3 * gctune.TRIM_EVERY + 1):
            gctune.collect_on_tick(tick)
    finally:
        gc.enable()
    assert calls == [0, 0, 0]


def test_an_embedding_process_keeps_its_own_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(gctune, "_malloc_trim", calls.append)
    assert gc.isenabled()
    gctune.collect_on_tick(gctune.TRIM_EVERY)
    assert calls == []


@pytest.mark.skipif(gctune._malloc_trim is None, reason="not glibc")
def test_trimming_returns_what_a_burst_of_big_strings_left() -> None:
    """The case it is for: 60 kB strings freed below a few survivors keep the heap
    resident until trimmed."""
    me = psutil.Process()
    strings = [("x" * 60_000) + str(i) for i in range(3_000)]
    survivors = strings[::50]
    del strings
    before = me.memory_info().rss
    assert gctune._malloc_trim is not None
    gctune._malloc_trim(0)
    after = me.memory_info().rss
    assert before - after > 100_000_000, (before, after)
    assert len(survivors) == 60
