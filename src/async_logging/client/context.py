"""Where new events belong: the current scope, carried by a ``ContextVar`` (docs/design.md §6).

A *scope* is a position in a transaction tree: the ``uuid`` of the tree, the id of the
enclosing transaction (the ``parent`` of new events, ``0`` at the top) and the iterator
that hands out event ids for that uuid. The three change together, so they are one
concept and one ``ContextVar`` (structlog keeps one per concept too); a
:class:`~async_logging.client.scopes.Transaction` is itself a scope.

``contextvars`` carry the scope across ``await`` and into tasks (each task copies the
context when it is created), so every task started inside a transaction logs into it. Threads
do not inherit a context: wrap the callable with :func:`wrap` (``executor.submit(wrap(fn))``,
``Thread(target=wrap(fn))``) to carry it.

Event ids stay unique within a uuid across concurrent tasks and threads because they all
draw from the one iterator the scope shares (``next()`` on an ``itertools.count`` runs
entirely under the GIL). A tree started here counts ``1, 2, 3, …``; a scope continuing a
uuid that came from elsewhere (an ``X-Request-ID``, a message from another service) draws
``"<process tag>.<n>"`` strings from a process-wide iterator instead, so two processes
logging into the same uuid never reuse each other's ids.

A scope also carries what makes a tree's records exact (docs/client.md, "Exact trees"):

- ``kids``, the count of its transaction's direct children, one ``next()`` per child emitted
  (an ``itertools.count``: atomic under the GIL, so children emitted from several tasks and
  threads are each counted once); the transaction's ``end`` sends the total as
  ``childCount``;
- ``epoch``, the tree's clock: ``epoch + perf_counter_ns()`` is the time in nanoseconds since
  the epoch. Every timestamp and duration of a tree comes from the one monotonic counter,
  set against the wall clock once, when the tree's first scope in this process opens, so a
  child's interval always lies within its parent's (a wall-clock step in between moves
  neither) and a long-lived process does not drift from the wall clock from tree to tree.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = [
    "Scope",
    "current_scope",
    "current_uuid",
    "foreign_ids",
    "new_epoch",
    "new_uuid",
    "reset_scope",
    "set_scope",
    "use_scope",
    "wrap",
]

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns


def new_epoch() -> int:
    """A clock for a new tree: ``new_epoch() + perf_counter_ns()`` is the wall time in ns."""
    return _wall_ns() - _perf_ns()


P = ParamSpec("P")
R = TypeVar("R")


class Scope:
    """A position in a transaction tree.

    Args:
        uuid: the tree's request id.
        event: id of the enclosing transaction (``0``: top).
        ids: where new event ids come from.
        epoch: the tree's clock (default: a new one, :func:`new_epoch`).

    Attributes:
        uuid: the tree's request id.
        event: id of the enclosing transaction, the ``parent`` of new events (``0``: top).
        ids: where new event ids come from (shared by every scope of the tree in this process).
        kids: counts the direct children emitted in this scope (one ``next()`` each).
        epoch: the tree's clock: ``epoch + perf_counter_ns()`` is the time in ns since the
            epoch (shared by every scope of the tree in this process).
    """

    __slots__ = ("epoch", "event", "ids", "kids", "uuid")

    def __init__(
        self, uuid: str, event: int | str, ids: Iterator[int | str], epoch: int | None = None
    ) -> None:
        self.uuid = uuid
        self.event = event
        self.ids = ids
        self.kids: Iterator[int] = itertools.count()
        self.epoch = new_epoch() if epoch is None else epoch

    def __repr__(self) -> str:
        return f"Scope(uuid={self.uuid!r}, event={self.event!r})"


#: The current scope; ``None`` outside any transaction (events are stand-alone).
_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "async_logging_scope", default=None
)


def current_scope() -> Scope | None:
    """The scope new events join, or ``None`` outside any transaction."""
    return _scope.get()


def current_uuid() -> str | None:
    """The uuid of the current transaction tree, or ``None``."""
    s = _scope.get()
    return None if s is None else s.uuid


def set_scope(scope: Scope | None) -> contextvars.Token[Scope | None]:
    """Make ``scope`` current; return the token that :func:`reset_scope` restores with."""
    return _scope.set(scope)


def reset_scope(token: contextvars.Token[Scope | None]) -> None:
    """Restore the scope that was current before the :func:`set_scope` that gave ``token``."""
    _scope.reset(token)


@contextmanager
def use_scope(scope: Scope | None) -> Iterator[Scope | None]:
    """Make ``scope`` current inside the ``with`` block, then restore the previous one."""
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the current context, to run in another thread.

    The context is captured now; each call runs in a fresh copy of it, so the wrapped
    callable may run in several threads at once (``executor.map(wrap(fn), items)``).

    Example::

        with transaction("URL", "/report"):
            pool.submit(wrap(render), page)   # render()'s events are children of /report
    """
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.copy().run(fn, *args, **kwargs)

    return run


#: Where a transaction that starts a tree looks for an enclosing span of another tracer:
#: a callable giving ``(uuid, parent)`` or ``None``; unset (``None``) by default. Set by
#: :func:`async_logging.client.propagation.use_opentelemetry` (docs/client.md,
#: "Across services").
_ambient: list[Callable[[], tuple[str, str] | None] | None] = [None]


def new_uuid() -> str:
    """A new random request id (32 hex digits, 128 random bits)."""
    return os.urandom(16).hex()


def _make_foreign_ids() -> Iterator[str]:
    # C iterators only: next() neither releases the GIL nor runs Python code, so it is
    # atomic across threads. The tag tells this process's ids from another's.
    tag = os.urandom(4).hex() + "."
    return map(tag.__add__, map(str, itertools.count(1)))


_foreign: list[Iterator[str]] = [_make_foreign_ids()]


def foreign_ids() -> Iterator[str]:
    """The process-wide id iterator for uuids that did not start in this process."""
    return _foreign[0]


def _after_fork() -> None:
    _foreign[0] = _make_foreign_ids()


os.register_at_fork(after_in_child=_after_fork)
