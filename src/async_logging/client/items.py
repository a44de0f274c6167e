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

Besides items the queue carries markers: :class:`Release` (from here) and the sender's own
flush requests.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

from ..model import ATOMIC
from .context import Scope, _scope, foreign_ids

__all__ = ["RAW", "Item", "Release", "make_item", "placement"]

#: The ``clazz`` of an item that carries a raw log map (``client.log(map)``) in ``data``, to
#: be sent as it is; no wire event has this clazz.
RAW: Final = "<raw log map>"

_time = time.time
_get_scope = _scope.get


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
        duration: an ``end``'s duration in ms.
        timestamp: seconds since the epoch when the call was made (the core sends ms).
        data: extra keys, or the raw map of a :data:`RAW` item.
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
    duration: int | None
    timestamp: float
    data: dict[str, Any] | None


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
    timestamp: float | None = None,
    parent: int | str | None = None,
    status: str | None = None,
    duration: int | None = None,
) -> Item:
    """Make the item of one event: the only place items are built.

    Args:
        clazz: the wire ``clazz``, or :data:`RAW` (then ``data`` is the raw map, which gets
            a ``timestamp`` in ms when it has none, and ``scope`` must be ``None``).
        scope: where the event goes: an atomic event becomes a child of it (stand-alone when
            ``None``); a ``begin`` or ``end`` is the record of the transaction ``scope`` is.
        type: CAL type.
        name: CAL name.
        level: a log level name.
        msg: a message.
        data: extra keys (an empty dict counts as none).
        timestamp: seconds since the epoch (default: now).
        parent: the parent's id when it is not the scope's transaction (an explicit
            ``parent=``); a ``begin`` or ``end`` gives its transaction's. ``"0"`` means ``0``.
        status: an ``end``'s status.
        duration: an ``end``'s duration in ms.

    Returns:
        The item, ready for the client's queue.
    """
    if timestamp is None:
        timestamp = _time()
    if parent is not None and parent == "0":
        parent = 0  # every spelling of the top level is 0, so the core can test parent == 0
    uuid: str | None
    eid: int | str | None
    if scope is None:
        if clazz is RAW:
            raw: dict[str, Any] = {} if data is None else data
            if "timestamp" not in raw:
                raw["timestamp"] = int(timestamp * 1000)
            return Item(RAW, None, None, 0, None, None, None, None, None, None, timestamp, raw)
        uuid = eid = None
        parent = parent or 0
    elif clazz is ATOMIC:
        uuid = scope.uuid
        eid = next(scope.ids)
        if parent is None:
            parent = scope.event
    else:
        uuid = scope.uuid
        eid = scope.event
        parent = parent or 0
    return Item(
        clazz, uuid, eid, parent, type, name, level, msg, status, duration, timestamp, data or None
    )


def placement(uuid: str | None) -> Scope | None:
    """The scope an event with an explicit ``uuid`` goes in (``event(uuid=...)``).

    The current scope when ``uuid`` is ``None`` or the current tree's; else a scope of the
    foreign tree ``uuid`` at its top, whose ids cannot collide with another process's.
    """
    s = _get_scope()
    if uuid is None or (s is not None and s.uuid == uuid):
        return s
    return Scope(uuid, 0, foreign_ids())
