"""Lifecycle as state: each long-lived server component holds one value of its own enum.

A component (the cluster, the supervisor, the listener, the pipeline) names its states in
an :class:`enum.Enum` and its legal moves in a table; a :class:`Lifecycle` holds the current
state and changes it only through :meth:`Lifecycle.to`, which refuses a move the table does
not list. So "may I stop now?" is answered in one place, instead of by flags such as
``draining``, ``closed`` or ``stopping`` set here and there.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from ..exceptions import UsageError

__all__ = ["Lifecycle", "LifecycleError"]

S = TypeVar("S", bound=enum.Enum)


class LifecycleError(UsageError):
    """A component was asked for a move its state does not allow (e.g. started twice)."""


class Lifecycle(Generic[S]):
    """The state of one component and the table of its moves.

    Args:
        owner: the component's name, for error messages.
        moves: each state → the states it may move to (a state missing here is final).
        initial: the state it starts in.
    """

    __slots__ = ("_moves", "_owner", "_state")

    def __init__(self, owner: str, moves: Mapping[S, frozenset[S]], initial: S) -> None:
        self._owner = owner
        self._moves = moves
        self._state = initial

    @property
    def state(self) -> S:
        """The current state."""
        return self._state

    def to(self, new: S) -> None:
        """Move to ``new``.

        Raises:
            LifecycleError: the table has no move from the current state to ``new``.
        """
        if new not in self._moves.get(self._state, frozenset()):
            raise LifecycleError(f"{self._owner} cannot go from {self._state.name} to {new.name}")
        self._state = new

    def __repr__(self) -> str:
        return f"<{self._owner} {self._state.name}>"
