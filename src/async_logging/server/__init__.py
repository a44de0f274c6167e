"""The log proxy (docs/design.md §4-5): LogCluster, LogListener, the pipeline and the MonApp."""

from __future__ import annotations

from .cluster import LogCluster, Supervisor
from .config import ServerConfig, load_config_file
from .listener import SUBPROTOCOL, LogListener
from .monapp import MonApp
from .pipeline import Pipeline, Stats

__all__ = [
    "SUBPROTOCOL",
    "LogCluster",
    "LogListener",
    "MonApp",
    "Pipeline",
    "ServerConfig",
    "Stats",
    "Supervisor",
    "load_config_file",
]
