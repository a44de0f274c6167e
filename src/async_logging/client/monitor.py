"""The heartbeat monitor (the seed's MonApp, client side): CPU, memory and GC heartbeats.

Every ``interval`` seconds a daemon thread samples the process with psutil and the
garbage collector, and logs one ``heartbeat`` through the client (an enqueue, like any
event). Keys of each heartbeat:

- ``cpu_percent`` (process CPU since the previous sample, 100 = one core), ``cpu_system``
  (whole machine), ``rss_bytes``, ``vms_bytes``, ``memory_percent``, ``threads``,
  ``open_files`` (descriptors, where the platform says);
- ``gc_collections`` (per generation, since start), ``gc_collected`` and
  ``gc_uncollectable`` (since the previous sample), ``gc_pause_ms`` (time spent collecting
  since the previous sample), ``gc_objects`` (the generations' current counts);
- ``uptime`` (seconds since the monitor started), ``interval``.

Example::

    with HeartbeatMonitor(interval=60):
        serve_forever()
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil

from .registry import default as _default

if TYPE_CHECKING:
    from .client import LogClient

__all__ = ["HeartbeatMonitor"]


class HeartbeatMonitor:
    """Logs a process heartbeat every ``interval`` seconds from its own daemon thread.

    Args:
        client: the client (default: the default client at each beat).
        interval: seconds between heartbeats.
        name: the heartbeats' ``name`` (default ``python:<pid>``).
        type: the heartbeats' CAL ``type``.
        **extra: constant keys added to every heartbeat (``service=``, ``version=``, …).
    """

    def __init__(
        self,
        client: LogClient | None = None,
        interval: float = 60.0,
        *,
        name: str | None = None,
        type: str = "heartbeat",
        **extra: Any,
    ) -> None:
        if interval <= 0:
            from ..exceptions import UsageError

            raise UsageError("interval must be > 0")
        self.client = client
        self.interval = interval
        self.name = name
        self.type = type
        self.extra = extra
        self.beats = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._gc_lock = threading.Lock()
        self._gc_pause = 0.0
        self._gc_collected = 0
        self._gc_uncollectable = 0
        self._gc_t0: float | None = None
        self._proc.cpu_percent(None)  # the first call only starts the measure
        psutil.cpu_percent(None)

    # ------------------------------------------------------------------ GC timing

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0 is not None:
            pause = time.perf_counter() - self._gc_t0
            self._gc_t0 = None
            with self._gc_lock:
                self._gc_pause += pause
                self._gc_collected += info.get("collected", 0)
                self._gc_uncollectable += info.get("uncollectable", 0)

    # ------------------------------------------------------------------ sampling

    def sample(self) -> dict[str, Any]:
        """Measure the process now (the keys listed in the module docstring)."""
        proc = self._proc
        with proc.oneshot():
            mem = proc.memory_info()
            sample: dict[str, Any] = {
                "cpu_percent": proc.cpu_percent(None),
                "cpu_system": psutil.cpu_percent(None),
                "rss_bytes": mem.rss,
                "vms_bytes": mem.vms,
                "memory_percent": round(proc.memory_percent(), 3),
                "threads": proc.num_threads(),
            }
            if hasattr(proc, "num_fds"):
                with contextlib.suppress(psutil.Error):
                    sample["open_files"] = proc.num_fds()
        with self._gc_lock:
            pause, self._gc_pause = self._gc_pause, 0.0
            collected, self._gc_collected = self._gc_collected, 0
            uncollectable, self._gc_uncollectable = self._gc_uncollectable, 0
        sample["gc_collections"] = [s["collections"] for s in gc.get_stats()]
        sample["gc_collected"] = collected
        sample["gc_uncollectable"] = uncollectable
        sample["gc_pause_ms"] = round(pause * 1000.0, 3)
        sample["gc_objects"] = list(gc.get_count())
        sample["uptime"] = round(time.monotonic() - self._started_at, 3)
        sample["interval"] = self.interval
        return sample

    def beat(self) -> None:
        """Sample and log one heartbeat now."""
        client = self.client or _default.client
        if client is None:
            return
        data = self.sample()
        if self.extra:
            data.update(self.extra)
        client.heartbeat(
            self.type, self.name or f"python:{os.getpid()}", "process heartbeat", "INFO", **data
        )
        self.beats += 1

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HeartbeatMonitor:
        """Start beating every ``interval`` seconds (the first beat after one interval)."""
        if self._thread is not None:
            return self
        self._stop.clear()
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(
            target=self._run, name="async-logging-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop beating (waits up to ``timeout`` seconds for the thread)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except psutil.Error:  # the process table can be briefly unreadable
                continue

    def __enter__(self) -> HeartbeatMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
