"""Lifecycle as state: the cluster, the listener and the pipeline move through one table each."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from async_logging.exceptions import ConfigError
from async_logging.server import LogCluster
from async_logging.server.cluster import ClusterState
from async_logging.server.lifecycle import Lifecycle, LifecycleError
from async_logging.server.listener import ListenerState
from async_logging.server.pipeline import PipelineState
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT

OPTIONS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "mon_port": -1,
    "heartbeat_interval": 0,
    "store": "",
}


def test_a_move_the_table_does_not_list_is_refused_by_name() -> None:
    """One method moves a component; a move its table does not list raises, naming both states."""
    life = Lifecycle(
        "LogCluster", {ClusterState.NEW: frozenset({ClusterState.STARTING})}, ClusterState.NEW
    )
    with pytest.raises(LifecycleError, match="LogCluster cannot go from NEW to RUNNING"):
        life.to(ClusterState.RUNNING)
    assert life.state is ClusterState.NEW
    life.to(ClusterState.STARTING)
    with pytest.raises(LifecycleError, match="from STARTING to NEW"):  # STARTING: no moves
        life.to(ClusterState.NEW)


async def test_a_cluster_goes_through_its_states_once() -> None:
    """NEW, RUNNING (listener LISTENING, pipeline RUNNING), then STOPPED with both stopped; a second start is refused, a second stop does nothing."""
    publisher = MemoryPublisher()
    cluster = LogCluster(publisher=publisher, **OPTIONS)
    assert cluster.state is ClusterState.NEW and not cluster.draining
    await cluster.start()
    assert cluster.state is ClusterState.RUNNING and cluster.health()["available"]
    assert cluster.listener is not None and cluster.pipeline is not None
    assert cluster.listener.state is ListenerState.LISTENING
    assert cluster.pipeline.state is PipelineState.RUNNING
    with pytest.raises(LifecycleError, match="from RUNNING to STARTING"):
        await cluster.start()
    await cluster.stop()
    assert cluster.state is ClusterState.STOPPED and cluster.draining
    assert not cluster.health()["available"]
    assert cluster.listener.state is ListenerState.STOPPED and cluster.listener.draining
    assert cluster.pipeline.state is PipelineState.CLOSED and cluster.pipeline.closed
    await cluster.stop()  # once only
    assert publisher.closed == 1


async def test_stopping_a_cluster_never_started_stops_it() -> None:
    """stop() before start() leaves nothing to drain; the cluster cannot be started after."""
    cluster = LogCluster(publisher=MemoryPublisher(), **OPTIONS)
    await cluster.stop()
    assert cluster.state is ClusterState.STOPPED
    with pytest.raises(LifecycleError):
        await cluster.start()


async def test_a_failed_start_releases_what_it_built() -> None:
    """A port already taken: start() raises ConfigError, the pipeline it had started is closed (its publisher too) and the cluster is stopped."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        publisher = MemoryPublisher()
        cluster = LogCluster(publisher=publisher, **{**OPTIONS, "port": taken.getsockname()[1]})
        with pytest.raises(ConfigError, match="cannot listen"):
            await cluster.start()
    finally:
        taken.close()
    assert cluster.state is ClusterState.STOPPED
    assert cluster.pipeline is not None and cluster.pipeline.state is PipelineState.CLOSED
    assert cluster.listener is not None and cluster.listener.state is ListenerState.STOPPED
    assert publisher.closed == 1
    await cluster.stop()  # nothing more to do


async def test_a_pipeline_closed_without_a_start_publishes_what_it_holds() -> None:
    """A pipeline may be closed without having started (NEW to CLOSING): its publisher is flushed and closed, and it cannot start after."""
    from async_logging import LogBuffer
    from async_logging.server import Pipeline

    publisher = MemoryPublisher()
    pipeline = Pipeline(LogBuffer(), publisher, wait_for_publisher=TIMEOUT)
    await pipeline.close()
    assert pipeline.state is PipelineState.CLOSED and publisher.closed == 1
    with pytest.raises(LifecycleError, match="Pipeline cannot go from CLOSED to RUNNING"):
        pipeline.start()


async def test_a_supervisor_that_cannot_have_its_port_is_stopped(tmp_path: Any) -> None:
    """Supervisor: a port taken without SO_REUSEPORT fails the start with ConfigError and leaves it STOPPED; a stop before any start stops it too."""
    from async_logging.server import ServerConfig, Supervisor
    from async_logging.server.supervisor import SupervisorState

    config = ServerConfig(host="127.0.0.1", port=0, mon_port=-1, workers=2, store="")
    idle = Supervisor(config)
    await idle.stop()
    assert idle.state is SupervisorState.STOPPED and idle.stopping
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        supervisor = Supervisor(config.replace(port=taken.getsockname()[1]))
        with pytest.raises(ConfigError, match="cannot bind"):
            await supervisor.start()
    finally:
        taken.close()
    assert supervisor.state is SupervisorState.STOPPED and supervisor.slots == {}
    assert not supervisor.health()["available"]


def test_server_objects_create_their_attributes_in_init() -> None:
    """No attribute of the server's long-lived objects is created outside __init__: every
    `self.x = ...` in another method assigns one that __init__ (or a class-level slot or
    property) declared."""
    import ast
    import inspect

    from async_logging.server import cluster, guard, listener, monapp, pipeline, supervisor

    offenders = []
    for module in (cluster, guard, listener, monapp, pipeline, supervisor):
        tree = ast.parse(inspect.getsource(module))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            methods = [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            declared = {
                t.attr
                for m in methods
                if m.name == "__init__"
                for n in ast.walk(m)
                for t in _targets(n)
            }
            declared |= {m.name for m in methods}  # properties
            for m in methods:
                if m.name == "__init__":
                    continue
                for n in ast.walk(m):
                    for t in _targets(n):
                        if t.attr not in declared:
                            offenders.append(
                                f"{module.__name__}.{cls.name}.{m.name}: self.{t.attr}"
                            )
    assert not offenders, offenders


def _targets(node: Any) -> list[Any]:
    """The ``self.<attr>`` targets an assignment node assigns."""
    import ast

    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    else:
        return []
    out = []
    for t in targets:
        for sub in ast.walk(t):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
                and isinstance(sub.ctx, ast.Store)
            ):
                out.append(sub)
    return out
