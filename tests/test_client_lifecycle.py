"""The client's and the sender's lifecycles: the move tables, and the objects that follow them."""

from __future__ import annotations

import ast
import enum
import itertools
from collections.abc import Mapping
from pathlib import Path

import pytest

import async_logging.client as client_package
from async_logging.client import LogClient
from async_logging.client.lifecycle import (
    CLIENT_AFTER_FORK,
    CLIENT_MOVES,
    SENDER_AFTER_FORK,
    SENDER_MOVES,
    ClientState,
    Lifecycle,
    LifecycleError,
    SenderState,
)
from async_logging.client.testing import CaptureTransport
from async_logging.exceptions import UsageError
from conftest import TIMEOUT

TABLES: list[tuple[Mapping[enum.Enum, frozenset[enum.Enum]], Mapping[enum.Enum, enum.Enum]]] = [
    (CLIENT_MOVES, CLIENT_AFTER_FORK),  # type: ignore[list-item]
    (SENDER_MOVES, SENDER_AFTER_FORK),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("moves", "after_fork"), TABLES, ids=["client", "sender"])
def test_every_move_the_table_does_not_list_raises(
    moves: Mapping[enum.Enum, frozenset[enum.Enum]], after_fork: Mapping[enum.Enum, enum.Enum]
) -> None:
    """For every pair of states, to() moves exactly when the table lists the move, else raises
    LifecycleError and stays put."""
    states = list(moves)
    assert set(states) == set(type(states[0])) == set(after_fork)
    for old, new in itertools.product(states, states):
        life = Lifecycle("X", moves, old, after_fork=after_fork)
        if new in moves[old]:
            assert life.to(new) is old and life.state is new
        else:
            with pytest.raises(LifecycleError, match=f"X cannot go from {old.name} to {new.name}"):
                life.to(new)
            assert life.state is old


def test_move_if_moves_only_from_the_states_named() -> None:
    """move_if() is a check-and-move: no move (None) from another state; an illegal one raises."""
    life = Lifecycle("S", SENDER_MOVES, SenderState.NEW, after_fork=SENDER_AFTER_FORK)
    assert life.move_if((SenderState.RUNNING,), SenderState.FAILED) is None
    assert life.state is SenderState.NEW
    assert life.move_if((SenderState.NEW,), SenderState.STARTING) is SenderState.NEW
    assert life.state is SenderState.STARTING
    with pytest.raises(LifecycleError):
        life.move_if((SenderState.STARTING,), SenderState.FAILED)


def test_a_forked_child_keeps_running_clients_and_stops_the_parents_senders() -> None:
    """after_fork(): a closing client runs on in the child (its closer is the parent's thread);
    every sender is stopped there."""
    assert CLIENT_AFTER_FORK[ClientState.CLOSING] is ClientState.RUNNING
    assert CLIENT_AFTER_FORK[ClientState.CLOSED] is ClientState.CLOSED
    for state in SenderState:
        life = Lifecycle("S", SENDER_MOVES, state, after_fork=SENDER_AFTER_FORK)
        assert life.after_fork() is SenderState.STOPPED


def test_a_client_goes_from_new_to_running_to_closed() -> None:
    """start=False leaves a client NEW; start() runs it; close() closes it for good, and a
    second close() or a start() after it changes nothing."""
    client = LogClient(transport=CaptureTransport(), default=False, exit_timeout=0, start=False)
    assert client.state is ClientState.NEW and not client.closed
    client.start()
    assert client.state is ClientState.RUNNING
    assert client.close(TIMEOUT)
    assert client.state is ClientState.CLOSED and client.closed
    assert client.close(TIMEOUT)
    client.start()
    assert client.state is ClientState.CLOSED


def test_a_client_closed_before_it_started_never_starts_its_sender() -> None:
    """Closing a NEW client closes it without a thread; its sender goes straight to STOPPED."""
    client = LogClient(transport=CaptureTransport(), default=False, exit_timeout=0, start=False)
    client.event("LOG", "never sent")
    assert not client.close(TIMEOUT)  # the event was never delivered
    assert client.state is ClientState.CLOSED
    assert client._sender.state is SenderState.STOPPED and not client._sender.alive


def test_a_client_whose_sender_cannot_start_is_failed_and_drops(tmp_path: Path) -> None:
    """A spool_dir that cannot be used leaves the client FAILED: closed, dropping and counting."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client = LogClient(
        transport=CaptureTransport(),
        spool_dir=blocker / "spool",
        default=False,
        exit_timeout=0,
        start=False,
    )
    with pytest.raises(UsageError, match="cannot spool"):
        client.start()
    assert client.state is ClientState.FAILED and client.closed
    assert client._sender.state is SenderState.STOPPED
    client.event("LOG", "dropped")
    assert client.stats.dropped == 1


def test_a_sender_cannot_be_started_twice() -> None:
    """Starting a running sender again is an illegal move, not a second thread."""
    client = LogClient(transport=CaptureTransport(), default=False, exit_timeout=0)
    try:
        assert client._sender.state is SenderState.RUNNING
        with pytest.raises(LifecycleError, match="Sender cannot go from RUNNING to STARTING"):
            client._sender.start()
    finally:
        client.close(TIMEOUT)
    assert client._sender.state is SenderState.STOPPED


def _attributes_set_outside_init(tree: ast.Module) -> list[str]:
    """``Class.attr`` for each ``self.attr = ...`` in a method that __init__ (or the class
    body, __slots__ included) does not also create."""
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        declared: set[str] = set()
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                declared.add(stmt.target.id)
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name) and target.id == "__slots__":
                        declared |= {
                            str(e.value)
                            for e in ast.walk(stmt.value)
                            if isinstance(e, ast.Constant)
                        }
        methods = [f for f in cls.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]

        def assigned(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
            out = set()
            for node in ast.walk(fn):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign | ast.AugAssign)
                    else []
                )
                for t in targets:
                    if (
                        isinstance(t, ast.Attribute)
                        and isinstance(t.value, ast.Name)
                        and t.value.id == "self"
                    ):
                        out.add(t.attr)
            return out

        init = set().union(*(assigned(f) for f in methods if f.name == "__init__"))
        for fn in methods:
            if fn.name != "__init__":
                found += [f"{cls.name}.{a}" for a in assigned(fn) - init - declared]
    return found


def test_no_client_class_creates_an_attribute_outside_init() -> None:
    """Every attribute of every class of the client package is created in __init__ (or
    declared in the class body), so an object's shape is read in one place."""
    probe = "class A:\n    def __init__(self):\n        self.a = 1\n    def f(self):\n        self.a = self.b = 2\n"
    assert _attributes_set_outside_init(ast.parse(probe)) == ["A.b"]  # the check can fail
    package = Path(client_package.__file__).parent
    found = [
        f"{path.name}: {name}"
        for path in sorted(package.glob("*.py"))
        for name in _attributes_set_outside_init(ast.parse(path.read_text()))
    ]
    assert found == []
