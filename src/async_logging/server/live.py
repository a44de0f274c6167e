"""LiveHub: fans records out to live subscribers (issue 6).

In the server the hub is fed from the store (the viewer hands it the rows stored since
the last look, see :class:`~async_logging.server.viewer.Viewer`), so it costs ingest
nothing and shows every worker's trees; it can also be used as a publisher, from any
thread. Subscribers (the viewer's ``/api/live`` streams, hence ``async-logging tail`` and
the page's live tail) live on the event loop; each batch reaches the loop with one
``call_soon_threadsafe``. Filters run on the loop, once per record and subscriber, which
is why the subscribers are few.

Bounds, each named here:

- :data:`MAX_SUBSCRIBERS` subscriptions at once; the next one is refused
  (:class:`HubFull`).
- each subscriber has a queue of :data:`SUBSCRIBER_QUEUE` records; a subscriber that does
  not keep up loses the oldest records, counted in its ``dropped`` (and the hub's), and is
  told how many it lost.
- at most :data:`MAX_PENDING` records may be on their way from the publisher thread to
  the loop; past that (the loop is stalled) batches are dropped and counted.

The source that feeds the hub registers with :meth:`LiveHub.when_watched` and is told
when a subscription starts, so it can run only while someone watches.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final

from ..buffer import Record
from ..exceptions import UsageError
from ..publishers.base import BasePublisher

__all__ = [
    "MAX_PENDING",
    "MAX_SUBSCRIBERS",
    "SUBSCRIBER_QUEUE",
    "HubFull",
    "LiveHub",
    "Subscription",
    "record_filter",
]

#: Live subscriptions a hub serves at once.
MAX_SUBSCRIBERS: Final = 32
#: Records waiting for one subscriber; past it the oldest are dropped (and counted).
SUBSCRIBER_QUEUE: Final = 1000
#: Records handed from the publisher thread to the loop and not yet delivered.
MAX_PENDING: Final = 50_000

Filter = Callable[[Record], bool]


class HubFull(UsageError):
    """The hub already serves :data:`MAX_SUBSCRIBERS` subscriptions (or is closed)."""


class Subscription:
    """One subscriber's bounded queue of records; iterate with :meth:`next_batch`.

    Attributes:
        dropped: records this subscriber lost because its queue was full.
        closed: the hub closed (server shutting down) or :meth:`close` was called.
    """

    def __init__(self, hub: LiveHub, accept: Filter | None, maxlen: int) -> None:
        self._hub = hub
        self._accept = accept
        self._queue: deque[Record] = deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0
        self._dropped_reported = 0
        self.closed = False

    def _offer(self, records: Sequence[Record]) -> None:
        """Queue the records this subscriber wants (on the loop)."""
        accept, queue = self._accept, self._queue
        added = False
        for record in records:
            if accept is None or accept(record):
                if len(queue) == queue.maxlen:
                    self.dropped += 1
                    self._hub.stats["dropped"] += 1
                queue.append(record)
                added = True
        if added:
            self._ready.set()

    async def next_batch(self, timeout: float | None = None) -> tuple[list[Record], int]:
        """Wait for records; returns them and how many were dropped since the last call.

        Returns ``([], 0)`` when ``timeout`` seconds passed with nothing new (a chance to
        send a keep-alive), and raises :class:`EOFError` once the subscription is closed
        and drained.
        """
        if not self._queue and not self.closed:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return [], 0
        self._ready.clear()
        records = list(self._queue)
        self._queue.clear()
        lost, self._dropped_reported = self.dropped - self._dropped_reported, self.dropped
        if not records and not lost and self.closed:
            raise EOFError("live hub closed")
        return records, lost

    def close(self) -> None:
        """Stop receiving records and wake the reader. Idempotent."""
        if not self.closed:
            self.closed = True
            self._hub._remove(self)
            self._ready.set()


class LiveHub(BasePublisher):
    """Fans every published record out to live subscribers, never blocking the publisher.

    Args:
        max_subscribers: subscriptions served at once.
        queue_size: records queued per subscriber before the oldest are dropped.
        max_pending: records in flight from the publisher thread to the event loop.

    Attributes:
        stats: ``delivered`` batches, ``dropped`` records (all subscribers),
            ``dropped_pending`` records dropped because the loop did not keep up,
            ``refused`` subscriptions.
    """

    def __init__(
        self,
        *,
        max_subscribers: int = MAX_SUBSCRIBERS,
        queue_size: int = SUBSCRIBER_QUEUE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.max_pending = max_pending
        self.stats: Counter[str] = Counter(delivered=0, dropped=0, dropped_pending=0, refused=0)
        self._subscribers: list[Subscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._changed: asyncio.Event | None = None
        self._on_watch: Callable[[], None] | None = None

    def when_watched(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) whenever a subscription starts."""
        self._on_watch = callback

    @property
    def subscribers(self) -> int:
        """Subscriptions currently served."""
        return len(self._subscribers)

    def subscribe(self, accept: Filter | None = None) -> Subscription:
        """A new subscription (call on the event loop); ``accept`` filters records.

        Raises:
            HubFull: :data:`MAX_SUBSCRIBERS` are served already, or the hub is closed.
        """
        if self._closed or len(self._subscribers) >= self.max_subscribers:
            self.stats["refused"] += 1
            raise HubFull(
                "the live hub is closed"
                if self._closed
                else f"{self.max_subscribers} live subscribers already"
            )
        self._loop = asyncio.get_running_loop()
        sub = Subscription(self, accept, self.queue_size)
        # Copy-on-write: the loop callback iterates the list while subscriptions change.
        self._subscribers = [*self._subscribers, sub]
        self._notify()
        if self._on_watch is not None:
            self._on_watch()
        return sub

    def _remove(self, sub: Subscription) -> None:
        self._subscribers = [s for s in self._subscribers if s is not sub]
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for_subscribers(self, n: int) -> None:
        """Wait until exactly ``n`` subscriptions are served (for tests and tools)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        while len(self._subscribers) != n:
            self._changed.clear()
            await self._changed.wait()

    # -- the publisher side (publisher thread) ----------------------------------------------

    def publish_many(self, records: Sequence[Record]) -> None:
        """Hand the batch to the subscribers' loop; returns at once (drops when it lags)."""
        loop = self._loop
        if not self._subscribers or loop is None or not records:
            return
        n = len(records)
        with self._lock:
            if self._pending + n > self.max_pending:
                self.stats["dropped_pending"] += n
                return
            self._pending += n
        batch = list(records)  # the server may reuse its list; the dicts are shared, read-only
        try:
            loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._lock:
                self._pending -= n

    def transaction(self, record: Record) -> None:
        """Fan out one transaction."""
        self.publish_many((record,))

    atomic_event = heartbeat = transaction

    def _deliver(self, records: list[Record]) -> None:
        with self._lock:
            self._pending -= len(records)
        self.stats["delivered"] += 1
        for sub in self._subscribers:
            sub._offer(records)

    def close(self) -> None:
        """End every subscription (their readers drain, then see EOF); refuse new ones."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._close_all()
        else:
            loop.call_soon_threadsafe(self._close_all)

    def _close_all(self) -> None:
        for sub in list(self._subscribers):
            sub.close()


def record_filter(
    *,
    kinds: Sequence[str] = (),
    type: str | None = None,
    name: str | None = None,
    failures_only: bool = False,
    min_duration: float | None = None,
) -> Filter | None:
    """A predicate on records for :meth:`LiveHub.subscribe`, or None when nothing filters.

    ``name`` ending in ``*`` is a prefix; ``failures_only`` keeps records whose status is
    not ``"0"``; ``min_duration`` keeps records lasting at least that many ms.
    """
    kind_set = frozenset(kinds)
    prefix = name[:-1] if name and name.endswith("*") else None
    if not (kind_set or type or name or failures_only or min_duration is not None):
        return None

    def accept(record: Record) -> bool:
        if kind_set and record.get("kind") not in kind_set:
            return False
        if type and record.get("type") != type:
            return False
        if name:
            rname = record.get("name")
            if prefix is not None:
                if not (isinstance(rname, str) and rname.startswith(prefix)):
                    return False
            elif rname != name:
                return False
        status = record.get("status")
        if failures_only and (status is None or status == "0"):
            return False
        if min_duration is not None:
            duration = record.get("duration")
            if not isinstance(duration, int | float) or duration < min_duration:
                return False
        return True

    return accept
