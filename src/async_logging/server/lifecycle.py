"""Lifecycle as state for the server: each long-lived component holds one value of its own
enum, moved by the shared :class:`~async_logging.lifecycle.Lifecycle` (the cluster, the
supervisor, the listener, the pipeline each name their states and their table of moves).
So "may I stop now?" is answered in one place, instead of by flags such as ``draining``,
``closed`` or ``stopping`` set here and there. Here: the service lifecycle LogCluster and
the Supervisor share, and the signal that tells a serving process to drain.
"""

from __future__ import annotations

import asyncio
import enum
import signal
from collections.abc import Awaitable, Callable

from ..lifecycle import Lifecycle, LifecycleError

__all__ = [
    "SERVICE_MOVES",
    "Lifecycle",
    "LifecycleError",
    "Service",
    "ServiceState",
    "stop_signal",
]


class ServiceState(enum.Enum):
    """Where a service (a :class:`~async_logging.server.LogCluster`, a
    :class:`~async_logging.server.Supervisor`) is in its life."""

    NEW = "new"
    STARTING = "starting"  # building, binding its ports
    RUNNING = "running"
    DRAINING = "draining"  # stop(): no new work, everything held being finished
    STOPPED = "stopped"  # released (also after a failed start, or a stop before any start)


SERVICE_MOVES = {
    ServiceState.NEW: frozenset({ServiceState.STARTING, ServiceState.STOPPED}),
    ServiceState.STARTING: frozenset({ServiceState.RUNNING, ServiceState.STOPPED}),
    ServiceState.RUNNING: frozenset({ServiceState.DRAINING}),
    ServiceState.DRAINING: frozenset({ServiceState.STOPPED}),
}


class Service(Lifecycle[ServiceState]):
    """The lifecycle of a service that starts once, runs, drains once and stops.

    :meth:`start` and :meth:`stop` run the service's own steps between the moves, so a
    failed start releases what it built and a second stop does nothing.
    """

    __slots__ = ()

    def __init__(self, owner: str) -> None:
        super().__init__(owner, SERVICE_MOVES, ServiceState.NEW)

    @property
    def stopping(self) -> bool:
        """Whether the stop has begun (draining or stopped)."""
        return self.state in (ServiceState.DRAINING, ServiceState.STOPPED)

    async def start(
        self, build: Callable[[], Awaitable[None]], release: Callable[[], Awaitable[None]]
    ) -> None:
        """NEW → STARTING, ``build()``, → RUNNING; when ``build`` raises, ``release()`` and
        → STOPPED before the error goes on.

        Raises:
            LifecycleError: the service was started (or stopped) before.
        """
        self.to(ServiceState.STARTING)
        try:
            await build()
        except BaseException:
            await release()
            self.to(ServiceState.STOPPED)
            raise
        self.to(ServiceState.RUNNING)

    async def stop(self, release: Callable[[], Awaitable[None]]) -> None:
        """RUNNING → DRAINING, ``release()``, → STOPPED; once only (a draining or stopped
        service returns at once), and a service never started just becomes STOPPED.

        Raises:
            LifecycleError: the service is still starting.
        """
        if self.stopping:
            return
        if self.state is ServiceState.NEW:
            self.to(ServiceState.STOPPED)
            return
        self.to(ServiceState.DRAINING)
        await release()
        self.to(ServiceState.STOPPED)


def stop_signal() -> asyncio.Event:
    """An event the running loop sets on SIGTERM or SIGINT: how a serving process (one
    server, the supervisor, each worker) is told to drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
