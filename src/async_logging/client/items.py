"""What the application's threads hand to the sender: :class:`Item`, made by :func:`make_item`.

Building an item is the only logging cost the application thread pays (docs/design.md §7), so an
item is a small named value that the core turns into a wire map later, on the sender
thread. Every entry point makes its items with the one builder, :func:`make_item`:
``event()``, ``heartbeat()``, ``log()``, transactions (their ``begin`` and ``end``),
:class:`~async_logging.client.LogHandler` and the structlog and loguru bridges. A field
added to :class:`Item` is therefore added in one place.

Where an item goes in its tree (its ``uuid``, ``event`` id and ``parent``) follows from the
*scope* it is made in (:mod:`async_logging.client.context`):

- an atomic event is a child of the scope: a new id drawn from the tree's ids, the scope's
  transaction as its parent; with no scope it is stand-alone (no uuid, parent ``0``);
- a ``begin`` or ``end`` is the record of the transaction that is the scope itself: its
  uuid, its own id, the ``parent`` given;
- a heartbeat and a raw log map are always stand-alone.

An atomic event made in its scope's transaction (no other ``parent`` given) is counted as one
of that transaction's direct children (the scope's ``kids``), for the ``childCount`` of its
``end``. Its time is read from the tree's clock (the scope's ``epoch`` plus
``perf_counter_ns()``), a stand-alone event's from the wall clock: nanoseconds since the
epoch either way, sent as milliseconds with microseconds (a float).

Besides items the queue carries markers: :class:`Release` (from here) and the sender's own
flush requests.
"""

from __future__ import annotations

import time
import traceback
from asyncio import CancelledError
from typing import Any, Final

import msgspec

from ..model import ATOMIC
from .context import Scope, _scope, foreign_ids, new_epoch

__all__ = [
    "EXCEPTION_TYPE",
    "NOT_ERRORS",
    "RAW",
    "Item",
    "Release",
    "cut_traceback",
    "exception_item",
    "make_item",
    "placement",
    "wire_ms",
]

#: The ``clazz`` of an item that carries a raw log map (``client.log(map)``) in ``data``, to
#: be sent as it is; no wire event has this clazz.
RAW: Final = "<raw log map>"

#: The CAL type of the child that reports an exception leaving a transaction.
EXCEPTION_TYPE: Final = "Exception"
#: Exceptions that end a transaction without being errors (a cancelled task, a generator
#: closed): the transaction's status names them, but no ``Exception`` child is logged.
NOT_ERRORS: Final = (CancelledError, GeneratorExit)
#: What stands for the head of a traceback cut to the client's ``max_string_length``.
TRACEBACK_CUT: Final = "[traceback cut: its first {} characters are not sent]\n"

_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns
_get_scope = _scope.get


def wire_ms(ns: int) -> float:
    """Nanoseconds as the wire's milliseconds: a float, cut to whole microseconds."""
    return ns // 1000 / 1000


class Item(msgspec.Struct, frozen=True, gc=False):
    """One event as the application enqueued it (build it with :func:`make_item`).

    A msgspec ``Struct`` because it is the cheapest named value to build (close to a tuple)
    and, with ``gc=False``, one the garbage collector does not track: at hundreds of
    thousands of events per second, tracked tuples cost the application thread collections
    of their own. That is safe because nothing an item holds can refer back to it (items
    live only in the client's queue and the sender's hands).

    Attributes:
        clazz: the wire ``clazz`` (``begin``, ``end``, ``atomicEvent``, ``heartbeat``), or
            :data:`RAW`.
        uuid: the tree's request id (``None``: stand-alone).
        event: the event's id in its tree (``None`` when stand-alone).
        parent: the enclosing transaction's id, exactly ``0`` at the top (the core tests
            ``parent == 0``).
        type: CAL type.
        name: CAL name.
        level: a log level name.
        msg: a message (any value; the core makes it a string and cuts it).
        status: an ``end``'s status.
        duration: an ``end``'s duration in ms, with microseconds.
        timestamp: nanoseconds since the epoch when the call was made (the core sends ms
            with microseconds, :func:`wire_ms`).
        data: extra keys, or the raw map of a :data:`RAW` item.
        child_count: an ``end``'s ``childCount``, its transaction's direct children.
    """

    clazz: str
    uuid: str | None
    event: int | str | None
    parent: int | str
    type: str | None
    name: str | None
    level: str | None
    msg: Any
    status: str | None
    duration: float | None
    timestamp: int
    data: dict[str, Any] | None
    child_count: int | None = None


class Release:
    """Queue marker: send now whatever is held for ``uuid`` (a foreign-root scope ended)."""

    __slots__ = ("uuid",)

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid


def make_item(  # noqa: PLR0917 (the hot path's positional call)
    clazz: str,
    scope: Scope | None,
    type: str | None,
    name: str | None,
    level: str | None,
    msg: Any = None,
    data: dict[str, Any] | None = None,
    timestamp: int | None = None,
    parent: int | str | None = None,
    status: str | None = None,
    duration: float | None = None,
    child_count: int | None = None,
) -> Item:
    """Make the item of one event: the only place items are built.

    Args:
        clazz: the wire ``clazz``, or :data:`RAW` (then ``data`` is the raw map, which gets
            a ``timestamp`` in ms when it has none, and ``scope`` must be ``None``).
        scope: where the event goes: an atomic event becomes a child of it (stand-alone when
            ``None``), counted in the scope's ``kids`` unless another ``parent`` is given; a
            ``begin`` or ``end`` is the record of the transaction ``scope`` is.
        type: CAL type.
        name: CAL name.
        level: a log level name.
        msg: a message.
        data: extra keys (an empty dict counts as none).
        timestamp: nanoseconds since the epoch (default: now, on the scope's clock when
            there is a scope, else on the wall clock).
        parent: the parent's id when it is not the scope's transaction (an explicit
            ``parent=``); a ``begin`` or ``end`` gives its transaction's. ``"0"`` means ``0``.
        status: an ``end``'s status.
        duration: an ``end``'s duration in ms.
        child_count: an ``end``'s count of direct children.

    Returns:
        The item, ready for the client's queue.
    """
    if parent is not None and parent == "0":
        parent = 0  # every spelling of the top level is 0, so the core can test parent == 0
    uuid: str | None
    eid: int | str | None
    if scope is None:
        if timestamp is None:
            timestamp = _wall_ns()
        if clazz is RAW:
            raw: dict[str, Any] = {} if data is None else data
            if "timestamp" not in raw:
                raw["timestamp"] = wire_ms(timestamp)
            return Item(RAW, None, None, 0, None, None, None, None, None, None, timestamp, raw)
        uuid = eid = None
        parent = parent or 0
    elif clazz is ATOMIC:
        uuid = scope.uuid
        eid = next(scope.ids)
        if parent is None or parent == scope.event:
            parent = scope.event
            next(scope.kids)  # one more direct child of the scope's transaction
        if timestamp is None:
            timestamp = scope.epoch + _perf_ns()
    else:
        if timestamp is None:
            timestamp = scope.epoch + _perf_ns()
        uuid = scope.uuid
        eid = scope.event
        parent = parent or 0
    return Item(
        clazz,
        uuid,
        eid,
        parent,
        type,
        name,
        level,
        msg,
        status,
        duration,
        timestamp,
        data or None,
        child_count,
    )


def placement(uuid: str | None) -> Scope | None:
    """The scope an event with an explicit ``uuid`` goes in (``event(uuid=...)``).

    The current scope when ``uuid`` is ``None`` or the current tree's; else a scope of the
    foreign tree ``uuid`` at its top, whose ids cannot collide with another process's.
    """
    s = _get_scope()
    if uuid is None or (s is not None and s.uuid == uuid):
        return s
    return Scope(uuid, 0, foreign_ids(), s.epoch if s is not None else new_epoch())


def exception_item(scope: Scope, exc: BaseException, timestamp: int, max_length: int) -> Item:
    """The ``Exception`` child that reports ``exc`` leaving the transaction ``scope``.

    An atomic event of type :data:`EXCEPTION_TYPE`, level ``ERROR``, with the exception's
    class name in ``name``, its message in ``msg`` and the formatted traceback in
    ``traceback``: the whole chain, so a cause (``raise ... from``) or a context is kept.
    A traceback longer than ``max_length`` characters keeps its end (where the error was
    raised) behind a :data:`TRACEBACK_CUT` line. Never raises: an exception whose message
    or traceback cannot be formatted is reported by what can be.
    """
    name = exc.__class__.__name__
    try:
        msg = str(exc)
    except Exception:
        msg = f"<unprintable {name}>"
    try:
        text = "".join(traceback.format_exception(exc)).rstrip("\n")
    except Exception:  # a broken __str__ deep in the chain: say at least what it was
        text = f"{name}: {msg}"
    return make_item(
        ATOMIC,
        scope,
        EXCEPTION_TYPE,
        name,
        "ERROR",
        msg,
        {"traceback": cut_traceback(text, max_length)},
        timestamp,
    )


def cut_traceback(text: str, max_length: int) -> str:
    """``text`` in at most ``max_length`` characters, keeping its end (where the error was
    raised, and the last exception of a chain) behind a :data:`TRACEBACK_CUT` line."""
    if len(text) <= max_length:
        return text
    keep = max_length - len(TRACEBACK_CUT.format(len(text)))
    if keep <= 0:
        return text[-max_length:]
    return TRACEBACK_CUT.format(len(text) - keep) + text[-keep:]
