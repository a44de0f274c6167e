"""The serving process's cycle collector: frozen start-up objects, collections on a schedule.

Ingest allocates a dict per event and frees nearly all of them by reference counting, yet
the automatic collector, triggered by allocation counts, ran every few frames and took a
third of the server's time. So ``serve`` (one process or each worker) calls :func:`tune_gc`
once it is built, and the clean loop of :class:`~async_logging.server.LogCluster` calls
:func:`collect_on_tick` every tick.
"""

from __future__ import annotations

import gc

__all__ = ["GC_FULL_EVERY", "collect_on_tick", "tune_gc"]

#: Clean-loop ticks between full collections when the server runs the collector itself.
GC_FULL_EVERY = 60


def tune_gc() -> None:
    """Let the server run the cycle collector on its own schedule (``serve`` only).

    Freezes the objects alive now (they are never scanned again) and turns automatic
    collection off; :func:`collect_on_tick` then collects the young generations every
    clean-loop tick (about a second) and everything every :data:`GC_FULL_EVERY` ticks,
    which keeps memory held by reference cycles bounded.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def collect_on_tick(tick: int) -> None:
    """One scheduled collection (the ``tick``-th of the clean loop), when :func:`tune_gc`
    turned automatic collection off; nothing otherwise (an embedding process keeps its own)."""
    if not gc.isenabled():
        gc.collect(2 if tick % GC_FULL_EVERY == 0 else 1)
