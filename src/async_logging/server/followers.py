"""Sinks that follow published records, as the server runs them (docs/design.md §5).

A sink that can fall behind must never slow ingest, so it is not a publisher: it follows
what the publishers already wrote. Today that is the SQLite store behind the viewer: its
follower process reads the JSON-lines file (:mod:`async_logging.store.follower`), and the
viewer's live tail follows the store (:class:`~async_logging.server.viewer.Viewer`), so
with several workers one store and one live tail see every worker's trees.

:class:`Followers` is what :class:`~async_logging.server.cluster.LogCluster` (one
process) or the :class:`~async_logging.server.supervisor.Supervisor` (workers) owns: it
starts the follower, restarts it if it dies, reports its lag (``/metrics``, ``/ecv``, the
viewer's header) and stops it at shutdown, giving it ``wait_for_publisher`` seconds to
catch up (what it has not stored by then stays in the file for the next start).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from ..store import StoreFollower
from ..store.follower import check_follows
from .config import ServerConfig
from .live import LiveHub

__all__ = ["STALE_AFTER", "Followers"]

#: Seconds without a report from the follower after which it counts as ``stalled``.
STALE_AFTER: Final = 5.0


class Followers:
    """The store's follower and the live hub fed from the store, for one server.

    Args:
        config: the server's configuration (``store``, ``log_file``, the rotation, the
            store's retention, ``wait_for_publisher``).

    Raises:
        ConfigError: the store is on without a JSON-lines file to follow.
    """

    def __init__(self, config: ServerConfig) -> None:
        check_follows(config.log_file, config.store)
        self.config = config
        self.follower: StoreFollower | None = (
            StoreFollower(
                config.store,
                config.log_file,
                config.log_backup_count,
                max_age=config.store_max_age,
                max_bytes=config.store_max_bytes,
            )
            if config.store
            else None
        )
        #: The live tail's subscribers; fed from the store by the viewer (None: no store).
        self.hub: LiveHub | None = LiveHub() if config.store else None

    @property
    def store_path(self) -> str | None:
        """The store file, or None when the store is off."""
        return self.follower.store_path if self.follower is not None else None

    def start(self) -> None:
        """Set the store up and start its follower (before anything is published).

        Raises:
            ConfigError: the store cannot be opened or has an unknown schema.
        """
        if self.follower is not None:
            self.follower.start()

    def check(self) -> None:
        """Restart a follower that died (called from the server's periodic tasks)."""
        if self.follower is not None:
            self.follower.ensure_running()

    def snapshot(self) -> dict[str, Any] | None:
        """The follower's status for ``/metrics``, ``/ecv`` and the viewer; None: no store."""
        if self.follower is None:
            return None
        status = self.follower.status()
        snap = status._asdict()
        # A follower that stopped reporting (stopped, or stuck outside SQLite) is stale.
        age = max(0.0, time.time() - status.updated) if status.updated else 0.0
        snap.update(restarts=self.follower.restarts, status_age=age)
        snap["stalled"] = status.running and age > STALE_AFTER
        return snap

    def health(self) -> dict[str, Any] | None:
        """The follower in ``/ecv``: whether it runs and how far behind it is (None: no store)."""
        snap = self.snapshot()
        if snap is None:
            return None
        keys = (
            "running",
            "stalled",
            "lag_records",
            "lag_seconds",
            "stored",
            "errors",
            "rotated_away",
        )
        return {key: snap[key] for key in keys}

    async def stop(self) -> bool:
        """Let the follower catch up for ``wait_for_publisher`` seconds, then stop it, and
        end the live streams. True when it caught up."""
        if self.hub is not None:
            self.hub.close()
        if self.follower is None:
            return True
        grace = self.config.wait_for_publisher
        return await asyncio.get_running_loop().run_in_executor(None, self.follower.stop, grace)
