"""The serving process's cycle collector: frozen start-up objects, collections on a schedule.

Ingest allocates a dict per event and frees nearly all of them by reference counting, yet
the automatic collector, triggered by allocation counts, ran every few frames and took a
third of the server's time. So ``serve`` (one process or each worker) calls :func:`tune_gc`
once it is built, and the clean loop of :class:`~async_logging.server.LogCluster` calls
:func:`collect_on_tick` every tick.

Memory freed is handed back to the system too: big frames and bodies are freed by the
C library, which then keeps the heap they grew (a burst of 4 MiB bodies and 60 kB strings
left a process at 219 MB that needed 20 MB). Every :data:`TRIM_EVERY` ticks, where the C
library is glibc, ``malloc_trim(0)`` returns the free pages (13 ms for 180 MB freed,
0.1 ms when nothing was).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

__all__ = ["GC_FULL_EVERY", "TRIM_EVERY", "collect_on_tick", "tune_gc"]

#: Clean-loop ticks between full collections when the server runs the collector itself.
GC_FULL_EVERY = 60
#: Clean-loop ticks between two hand-backs of free heap pages to the system.
TRIM_EVERY = 10


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()


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
        if tick % TRIM_EVERY == 0 and _malloc_trim is not None:
            _malloc_trim(0)
