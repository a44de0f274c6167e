"""Lifecycle as state: the states of a client and of its sender, and their moves, in one place.

Each long-lived object of the client library holds one :class:`Lifecycle`: its current
state, an enum, changed only through :meth:`Lifecycle.to` or :meth:`Lifecycle.move_if`,
which refuse a move its table does not list (like h11's ``_state.py``). "May I start, may I
close, am I still sending?" is then answered here instead of by flags set here and there.

The moves, as the tables below list them:

- **LogClient**: ``NEW`` → ``RUNNING`` (``start()``) → ``CLOSING`` (``close()``) →
  ``CLOSED``; ``NEW`` → ``CLOSING`` (closed before it started); ``RUNNING`` → ``FAILED``
  (its sender could not start).
- **Sender**: ``NEW`` → ``STARTING`` → ``RUNNING`` → ``FAILED`` (a non-retryable error);
  ``STARTING``, ``RUNNING``, ``FAILED`` → ``STOPPING`` (``stop()``) → ``STOPPED``; straight
  to ``STOPPED`` when stopped before it started, when its spool cannot be opened, or when
  its loop crashed.

After ``os.fork()`` a forked child's objects change state by a table of their own
(:data:`CLIENT_AFTER_FORK`, :data:`SENDER_AFTER_FORK`): the parent's sender thread does
not exist in the child, so its sender is stopped there and the client gets a new one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from ..lifecycle import Lifecycle, LifecycleError

__all__ = [
    "CLIENT_AFTER_FORK",
    "CLIENT_MOVES",
    "SENDER_AFTER_FORK",
    "SENDER_MOVES",
    "ClientState",
    "Lifecycle",
    "LifecycleError",
    "SenderState",
]


class ClientState(enum.Enum):
    """Where a :class:`~async_logging.client.LogClient` is in its life."""

    #: Built with ``start=False``: items queue up, nothing is sent yet.
    NEW = "new"
    #: Its sender runs: items are taken and sent.
    RUNNING = "running"
    #: ``close()`` is flushing: items are still taken.
    CLOSING = "closing"
    #: Closed: items are dropped and counted.
    CLOSED = "closed"
    #: Its sender could not start (the ``spool_dir``): items are dropped and counted.
    FAILED = "failed"


class SenderState(enum.Enum):
    """Where a client's :class:`~async_logging.client.sender.Sender` is in its life."""

    #: Built; its thread not started.
    NEW = "new"
    #: Its thread is starting (opening the spool); ``start()`` waits for the next state.
    STARTING = "starting"
    #: Draining the inbox and sending.
    RUNNING = "running"
    #: Gave up after a non-retryable error (``error``): still drains, counting what it
    #: takes as lost, until stopped.
    FAILED = "failed"
    #: ``stop()`` was asked: the loop ends, what is left is spooled or counted lost.
    STOPPING = "stopping"
    #: Its thread ended (or never started).
    STOPPED = "stopped"


_C = ClientState
_S = SenderState

#: Each client state → the states it may move to (a state with none is final).
CLIENT_MOVES: Final[Mapping[ClientState, frozenset[ClientState]]] = {
    _C.NEW: frozenset({_C.RUNNING, _C.CLOSING}),
    _C.RUNNING: frozenset({_C.CLOSING, _C.FAILED}),  # FAILED: the sender did not start
    _C.CLOSING: frozenset({_C.CLOSED}),
    _C.CLOSED: frozenset(),
    _C.FAILED: frozenset(),
}

#: What a client's state becomes in a forked child. A client that was closing goes on
#: running there: the thread that was closing it exists only in the parent.
CLIENT_AFTER_FORK: Final[Mapping[ClientState, ClientState]] = {
    _C.NEW: _C.NEW,
    _C.RUNNING: _C.RUNNING,
    _C.CLOSING: _C.RUNNING,
    _C.CLOSED: _C.CLOSED,
    _C.FAILED: _C.FAILED,
}

#: Each sender state → the states it may move to (a state with none is final).
SENDER_MOVES: Final[Mapping[SenderState, frozenset[SenderState]]] = {
    _S.NEW: frozenset({_S.STARTING, _S.STOPPED}),  # STOPPED: stopped before it started
    _S.STARTING: frozenset({_S.RUNNING, _S.STOPPING, _S.STOPPED}),  # STOPPED: no spool
    _S.RUNNING: frozenset({_S.FAILED, _S.STOPPING, _S.STOPPED}),  # STOPPED: the loop crashed
    _S.FAILED: frozenset({_S.STOPPING, _S.STOPPED}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.STOPPED: frozenset(),
}

#: What a sender's state becomes in a forked child: its thread is the parent's.
SENDER_AFTER_FORK: Final[Mapping[SenderState, SenderState]] = dict.fromkeys(SenderState, _S.STOPPED)
