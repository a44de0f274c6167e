"""How long the event loop was held: the measure of "no frame stalls a worker".

A frame is decoded, reassembled and acked on the event loop; while that runs, every other
client's acks, ``/ecv`` and ``/metrics`` wait. :class:`LoopWatch` sleeps a short
:data:`PROBE_INTERVAL` over and over and counts how late each wake-up was: the lateness is
how long something held the loop. It keeps the worst (``loop_stall_max_seconds``) and
counts the holds past :data:`STALL_THRESHOLD` (``loop_stalls_total``); both are on
``/metrics``. The benchmark of attacks (``bench/attacks.py``) reads them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

__all__ = ["PROBE_INTERVAL", "STALL_THRESHOLD", "LoopWatch"]

#: Seconds between two wake-ups of the probe.
PROBE_INTERVAL: Final = 0.02
#: A wake-up later than this counts as a stall (the issue's bound on one frame).
STALL_THRESHOLD: Final = 0.1


class LoopWatch:
    """The worst lateness of the loop seen so far, and how many stalls.

    Args:
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: The longest the loop was held (seconds), as far as the probe saw.
        self.worst = 0.0
        #: Holds longer than :data:`STALL_THRESHOLD`.
        self.stalls = 0

    def observe(self, lateness: float) -> None:
        """Take one wake-up that came ``lateness`` seconds after it was due."""
        self.worst = max(self.worst, lateness)
        if lateness > STALL_THRESHOLD:
            self.stalls += 1

    async def run(self, interval: float = PROBE_INTERVAL) -> None:
        """Probe until cancelled."""
        clock = self.clock
        while True:
            due = clock() + interval
            await asyncio.sleep(interval)
            self.observe(max(0.0, clock() - due))
