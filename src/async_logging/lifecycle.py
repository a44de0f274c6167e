"""Lifecycle as state: one enum value per long-lived object, moved through one table.

A component names its states in an :class:`enum.Enum` and its legal moves in a table (each
state → the states it may move to; a state missing from the table is final). A
:class:`Lifecycle` holds the current state and changes it only through :meth:`Lifecycle.to`
or :meth:`Lifecycle.move_if`, which refuse a move the table does not list, like h11's
``_state.py``. The server's components (:mod:`async_logging.server.lifecycle`) and the
client's (:mod:`async_logging.client.lifecycle`) keep their tables beside their enums and
share this one mechanism.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from .exceptions import UsageError

__all__ = ["Lifecycle", "LifecycleError"]

S = TypeVar("S", bound=enum.Enum)


class LifecycleError(UsageError):
    """A move its state does not allow was asked of a component (e.g. started twice)."""


class Lifecycle(Generic[S]):
    """The state of one object and the table of its moves; safe to use from any thread.

    Args:
        owner: the object's name, for error messages.
        moves: each state → the states it may move to (a state missing here is final).
        initial: the state it starts in.
        after_fork: each state → the state it becomes in a forked child (for
            :meth:`after_fork`; objects that never live on in a child leave it out).
    """

    __slots__ = ("_after_fork", "_lock", "_moves", "_owner", "_state")

    def __init__(
        self,
        owner: str,
        moves: Mapping[S, frozenset[S]],
        initial: S,
        *,
        after_fork: Mapping[S, S] | None = None,
    ) -> None:
        self._owner = owner
        self._moves = moves
        self._after_fork = after_fork
        self._state = initial
        # Moves may come from several threads at once (a client's application threads and
        # its sender): check-and-move must be one step.
        self._lock = threading.Lock()

    @property
    def state(self) -> S:
        """The current state."""
        return self._state

    def __repr__(self) -> str:
        return f"<{self._owner} {self._state.name}>"

    def _move(self, new: S) -> None:
        if new not in self._moves.get(self._state, frozenset()):
            raise LifecycleError(f"{self._owner} cannot go from {self._state.name} to {new.name}")
        self._state = new

    def to(self, new: S) -> S:
        """Move to ``new``; return the state it left.

        Raises:
            LifecycleError: the table has no move from the current state to ``new``.
        """
        with self._lock:
            old = self._state
            self._move(new)
            return old

    def move_if(self, olds: Iterable[S], new: S) -> S | None:
        """Move to ``new`` if the current state is one of ``olds``, in one step.

        Returns:
            The state it left, or ``None`` when it was in none of ``olds`` (no move).

        Raises:
            LifecycleError: the current state is one of ``olds`` but the table has no
                move from it to ``new``.
        """
        with self._lock:
            old = self._state
            if old not in olds:
                return None
            self._move(new)
            return old

    def after_fork(self) -> S:
        """In a forked child: take the state its ``after_fork`` table gives the current one.

        The lock is replaced: a thread of the parent may have held it at the fork.

        Raises:
            LifecycleError: the object has no ``after_fork`` table.
        """
        if self._after_fork is None:
            raise LifecycleError(f"{self._owner} has no state to take in a forked child")
        self._lock = threading.Lock()
        self._state = self._after_fork[self._state]
        return self._state
