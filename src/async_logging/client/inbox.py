"""The client's inbox: the one queue between the application's threads and the sender.

The application's threads only ever :meth:`Inbox.put` (never blocking, never locking on
the way in: docs/design.md §7); the sender thread :meth:`Inbox.take` s everything queued on each
drain and tells the inbox how much *room* is left (what its core can still accept, see
:meth:`~async_logging.client.core.ClientCore.room`). A put past the room is dropped and
counted. The inbox also wakes the sender when a batch is waiting, carries the sender's own
markers (a flush request) past the room, and once closed drops everything it is given.

The client owns the inbox; the sender is handed it. Neither reaches into the other.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .items import Item

__all__ = ["Inbox"]


def _nobody() -> None:
    """The wake-up before a consumer attached: nothing to wake."""


class Inbox:
    """A bounded, lock-free-on-put queue of items and markers.

    Args:
        room: how many items the queue may hold until the consumer first sets the room.
        wake_at: how many queued items make a put wake the consumer (a batch).

    Room is approximate by design: a put compares the queue's length with the room
    without a lock, so concurrent puts may pass it by a few; the consumer recomputes it on
    every drain. Drops are counted exactly (under a lock; only the drop path takes it).
    """

    __slots__ = ("_closed", "_dropped", "_items", "_lock", "_room", "_wake", "wake_at")

    def __init__(self, room: int, wake_at: int) -> None:
        self._items: deque[Any] = deque()
        self._room = room
        #: Queued items that make a put wake the consumer.
        self.wake_at = wake_at
        self._wake: Callable[[], None] = _nobody
        self._dropped = 0
        self._closed = False
        # Guards the room against a close (the room must stay 0 once closed) and the drop
        # count against concurrent drops; never taken on a put that succeeds.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Items and markers queued now."""
        return len(self._items)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"room {self._room}"
        return f"<Inbox {len(self._items)} queued, {state}, {self._dropped} dropped>"

    # ------------------------------------------------------------------ application side

    def put(self, item: Any) -> bool:
        """Queue ``item`` if there is room (else drop and count it); never blocks.

        Returns:
            Whether it was queued.
        """
        q = self._items
        n = len(q)
        if n < self._room:
            q.append(item)
            if n == self.wake_at:
                self._wake()
            return True
        with self._lock:
            self._dropped += 1
        return False

    @property
    def dropped(self) -> int:
        """Items refused so far because there was no room (or the inbox was closed)."""
        return self._dropped

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Refuse every item from now on (each is dropped and counted)."""
        with self._lock:
            self._closed = True
            self._room = 0

    def events(self) -> int:
        """How many of the queued entries are events (not markers)."""
        return sum(1 for it in list(self._items) if it.__class__ is Item)

    # ------------------------------------------------------------------ consumer side

    def attach(self, wake: Callable[[], None]) -> None:
        """Make ``wake`` the consumer's wake-up (called from any thread; must not block)."""
        self._wake = wake

    def put_marker(self, marker: Any) -> None:
        """Queue one of the consumer's own markers past the room, and wake the consumer.

        Markers are tiny and the consumer needs each one back (a flush waits on it).
        """
        self._items.append(marker)
        self._wake()

    @property
    def room(self) -> int:
        """How many items the queue may hold now (``0`` once closed)."""
        return self._room

    def set_room(self, room: int) -> None:
        """The consumer says how many items it can take now (ignored once closed)."""
        with self._lock:
            if not self._closed:
                self._room = max(0, room)

    def take(self) -> list[Any]:
        """Everything queued now, in order (for the consumer)."""
        q = self._items
        n = len(q)
        if not n:
            return []
        with self._lock:
            # The application's threads put while len(q) < room. Lower the room by what
            # leaves first: the queue empties before the consumer's count grows, and with
            # the old room they could put another room's worth meanwhile.
            self._room = max(0, self._room - n)
        popleft = q.popleft
        return [popleft() for _ in range(n)]
