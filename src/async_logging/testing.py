"""Helpers for testing code that uses async-logging (and for this package's own tests).

:class:`MemoryPublisher` records what a server published, so a test can plug it in as the
``publisher`` option (or by its built-in name ``"memory"``) and assert on the trees::

    from async_logging.testing import MemoryPublisher

    publisher = MemoryPublisher()
    # ... start a server with publisher=publisher, send events ...
    [tx] = publisher.wait_for(lambda p: p.transactions, timeout=5)
    assert tx["complete"] and len(tx["children"]) == 2
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from .buffer import Record
from .publishers.base import BatchPublisher

__all__ = ["MemoryPublisher"]

T = TypeVar("T")


class MemoryPublisher(BatchPublisher):
    """A publisher that keeps every record in memory; thread-safe.

    Read the lists while no publisher thread can append (after :meth:`wait_for` returned,
    or after the server stopped), or inside a :meth:`wait_for` predicate, which runs under
    the lock.

    Attributes:
        records: every record, in publication order.
        transactions: the records of kind ``transaction``.
        atomic_events: the records of any other kind but ``heartbeat`` (``atomicEvent``).
        heartbeats: the records of kind ``heartbeat``.
        batches: how many publish calls were made (``publish_many`` or one-record calls).
        flushed: how many times :meth:`flush` was called.
        closed: how many times :meth:`close` was called.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.records: list[Record] = []
        self.transactions: list[Record] = []
        self.atomic_events: list[Record] = []
        self.heartbeats: list[Record] = []
        self.batches = 0
        self.flushed = 0
        self.closed = 0

    def publish_many(self, records: Sequence[Record]) -> None:
        """Record a batch and wake up the threads waiting in :meth:`wait_for`."""
        with self._cond:
            for record in records:
                self.records.append(record)
                kind = record.get("kind")
                if kind == "transaction":
                    self.transactions.append(record)
                elif kind == "heartbeat":
                    self.heartbeats.append(record)
                else:
                    self.atomic_events.append(record)
            self.batches += 1
            self._cond.notify_all()

    def flush(self) -> None:
        """Count the call (and wake up waiters)."""
        with self._cond:
            self.flushed += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Count the call (and wake up waiters); records stay readable."""
        with self._cond:
            self.closed += 1
            self._cond.notify_all()

    def clear(self) -> None:
        """Forget every record and reset the counters."""
        with self._cond:
            for records in (self.records, self.transactions, self.atomic_events, self.heartbeats):
                records.clear()
            self.batches = self.flushed = self.closed = 0

    def wait_for(self, predicate: Callable[[MemoryPublisher], T], timeout: float = 5.0) -> T:
        """Block until ``predicate(self)`` is truthy; return its value.

        The predicate runs under the lock, at once and after each publish, flush or close,
        so no polling and no sleeps: ``publisher.wait_for(lambda p: len(p.records) >= 3)``.

        Args:
            predicate: called with this publisher.
            timeout: seconds to wait at most.

        Returns:
            The predicate's (truthy) value, e.g. the list it looked at.

        Raises:
            TimeoutError: the predicate was still falsy after ``timeout`` seconds.
        """
        with self._cond:
            result = self._cond.wait_for(lambda: predicate(self), timeout)
            if not result:
                raise TimeoutError(
                    f"condition not met after {timeout} s; published so far: "
                    f"{len(self.transactions)} transactions, {len(self.atomic_events)} "
                    f"atomic events, {len(self.heartbeats)} heartbeats in {self.batches} "
                    f"batches, flushed {self.flushed}, closed {self.closed}"
                )
            return result
