"""Delivery: the publisher thread's side of a failing sink (docs/design.md §5).

The pipeline's publisher thread hands every run of records to :meth:`Delivery.publish`.
Each sink gets it in one ``publish_many`` call while all is well; the members of a
:class:`~async_logging.publishers.MultiPublisher` are sinks of their own, so a healthy one
never sees a record twice because another failed. When a sink raises:

- it is retried after a backoff, with only the records it has not published yet (a
  publisher says how far it got with
  :func:`~async_logging.publishers.base.mark_published`; one that does not gets the rest
  of the batch again);
- after :data:`POISON_TRIES` failures in a row without progress, the records left are
  bisected, in order: what the sink takes is published, and a record it refuses alone
  :data:`POISON_TRIES` times running is a *suspect*;
- a suspect is *poison* once the sink has taken a record after it failed: it goes to the
  dead-letter file with its error (:class:`DeadLetters`), counted ``dead_letters``, and
  ingest goes on;
- a suspect the sink has taken nothing after (a batch of one poison record, or a sink that
  is down) is held aside, up to :data:`POISON_HOLD` records, while later records are
  published; the next time the sink takes anything each held record is tried alone again:
  published (later than its neighbours) or, still failing, dead-lettered;
- with the hold full the sink is taken to be down: its records are retried with backoff,
  never dead-lettered. Ingest slows, then pushes back on the clients, and ``/ecv`` says
  ``publisher_stalled``.

At shutdown, past ``wait_for_publisher``, what still fails is given up, counted
``records_dropped``; held records get one last try first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from ..buffer import Record
from ..encoded import EncodedRecords, as_records
from ..exceptions import ConfigError
from ..publishers import JsonLinesPublisher, MultiPublisher, Publisher
from ..publishers.base import published_count

if TYPE_CHECKING:
    from .pipeline import Stats

__all__ = [
    "DEAD_LETTER_BACKUPS",
    "DEAD_LETTER_MAX_BYTES",
    "POISON_HOLD",
    "POISON_TRIES",
    "DeadLetters",
    "Delivery",
]

log = logging.getLogger("async_logging.server")

#: Failures in a row, without progress, before a batch is searched for poison records; also
#: the tries a record gets alone before it is a suspect.
POISON_TRIES: Final = 3
#: Suspects held aside per sink, waiting for the sink to take something else; past it the
#: sink is taken to be down (retried, never dead-lettered).
POISON_HOLD: Final = 100
#: Size at which the dead-letter file is rotated.
DEAD_LETTER_MAX_BYTES: Final = 16 * 1024 * 1024
#: Rotated dead-letter files kept: at most (1 + this) x DEAD_LETTER_MAX_BYTES on disk.
DEAD_LETTER_BACKUPS: Final = 1


class DeadLetters:
    """The dead-letter file: one JSON line per record set aside,
    ``{"time": <ms>, "publisher": "<module.Class>", "error": "<Type: message>", "record": {...}}``.

    Opened on first use (a server that never needs it leaves no file), written like the
    log file (:class:`~async_logging.publishers.JsonLinesPublisher`: any record gets a line)
    and rotated at ``max_bytes``, keeping ``backup_count`` backups.

    Args:
        path: the file.
        max_bytes, backup_count: its rotation.
        shared: workers append to the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEAD_LETTER_MAX_BYTES,
        backup_count: int = DEAD_LETTER_BACKUPS,
        shared: bool = False,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.shared = shared
        self._file: JsonLinesPublisher | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def write(self, entries: Sequence[Record]) -> None:
        """Append ``entries``, one line each.

        Raises:
            OSError: the file cannot be opened or written; the error says how many entries
                went out whole (:func:`~async_logging.publishers.base.published_count`).
        """
        if self._file is None:
            try:
                self._file = JsonLinesPublisher(
                    self.path, self.max_bytes, self.backup_count, shared=self.shared
                )
            except ConfigError as exc:
                raise OSError(f"cannot open the dead-letter file: {exc}") from exc
        self._file.publish_many(entries)

    def close(self) -> None:
        """Flush and close the file (if it was opened)."""
        if self._file is not None:
            self._file.close()


@dataclass(slots=True)
class _Sink:
    """One publisher as the delivery sees it."""

    publisher: Publisher
    name: str
    #: Its records count as published (``Stats.records``): the first sink's.
    primary: bool
    #: Suspects (record, last error) waiting for the sink to take something else.
    held: list[tuple[Record, Exception]] = field(default_factory=list)


class Delivery:
    """Hands runs of records to the sinks, retrying, and sets poison records aside.

    Runs on the publisher thread only.

    Args:
        publisher: the sink(s); a :class:`~async_logging.publishers.MultiPublisher` is
            taken apart into its members.
        stats: the counters it updates (``records``, ``publish_errors``,
            ``records_dropped``, ``dead_letters``).
        dead_letters: where poison records go (None: they are dropped, counted in
            ``records_dropped``, and logged).
        backoff: seconds to wait before each retry; the last repeats.
        giving_up: says when to stop retrying (shutdown, past ``wait_for_publisher``).
        on_progress: called whenever a sink took records.

    Attributes:
        sleep: how it waits between retries (tests give one that does not).
    """

    def __init__(
        self,
        publisher: Publisher,
        stats: Stats,
        *,
        dead_letters: DeadLetters | None = None,
        backoff: Sequence[float] = (0.05, 0.2, 1.0, 5.0),
        giving_up: Callable[[], bool] = lambda: False,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.sinks = [_Sink(p, _name(p), i == 0) for i, p in enumerate(_members(publisher))]
        self.stats = stats
        self.dead_letters = dead_letters
        self.backoff = tuple(backoff)
        self.giving_up = giving_up
        self.on_progress = on_progress
        self.sleep: Callable[[float], None] = time.sleep

    @property
    def holding(self) -> int:
        """Records held aside, over all sinks."""
        return sum(len(sink.held) for sink in self.sinks)

    def publish(self, records: Sequence[Record]) -> bool:
        """Deliver ``records`` to every sink, retrying as long as it takes.

        Returns:
            False when records were given up (shutdown) or are held aside (so the spool's
            checkpoint waits), else True.
        """
        ok = True
        for sink in self.sinks:
            ok = self._deliver(sink, records) and ok
        return ok and not self.holding

    def finish(self) -> None:
        """At the end: one last try for each held record (given up if it fails), then
        close the dead-letter file."""
        for sink in self.sinks:
            held, sink.held = sink.held, []
            for record, _ in held:
                if self._alone(sink, record, tries=1) is not None:
                    self.stats.records_dropped += 1
                    log.error("gave up a record held aside for %s: %s", sink.name, _brief(record))
        if self.dead_letters is not None:
            try:
                self.dead_letters.close()
            except OSError:
                log.exception("could not close the dead-letter file")

    # -- one sink -------------------------------------------------------------------------

    def _deliver(self, sink: _Sink, records: Sequence[Record]) -> bool:
        pending = records
        tries = attempt = 0
        while pending:
            try:
                sink.publisher.publish_many(pending)
            except Exception as exc:
                self.stats.publish_errors += 1
                done = published_count(exc, len(pending))
                if done:
                    pending = self._taken(sink, pending, done)
                    tries = 0
                else:
                    tries += 1
                if not pending:
                    break
                if self.giving_up():
                    self.stats.records_dropped += len(pending)
                    log.error("gave up %d records: %s keeps failing", len(pending), sink.name)
                    return False
                if tries >= POISON_TRIES:
                    tries = 0
                    pending = self._isolate(sink, pending)
                    if not pending:
                        return True
                delay = self.backoff[min(attempt, len(self.backoff) - 1)]
                if attempt == 0:
                    log.exception("%s failed; retrying %d records", sink.name, len(pending))
                else:
                    log.warning(
                        "%s failed again (attempt %d, %s); retrying %d records in %.2f s",
                        sink.name,
                        attempt + 1,
                        _error(exc),
                        len(pending),
                        delay,
                    )
                self.sleep(delay)
                attempt += 1
            else:
                self._taken(sink, pending, len(pending))
                break
        if sink.held:
            held, sink.held = sink.held, []
            self._settle(sink, held)
        return True

    def _taken(self, sink: _Sink, part: Sequence[Record], n: int) -> Sequence[Record]:
        """Count the first ``n`` records of ``part`` as published; return the others."""
        self.on_progress()
        taken: Sequence[Record] = part
        rest: Sequence[Record] = ()
        if n < len(part):
            records = as_records(part)
            taken, rest = records[:n], records[n:]
        if sink.primary:
            kinds = self.stats.records
            if isinstance(taken, EncodedRecords):
                kinds.update(taken.kinds)
            else:
                for record in taken:
                    kinds[record.get("kind", "unknown")] += 1
        return rest

    def _alone(self, sink: _Sink, record: Record, tries: int = POISON_TRIES) -> Exception | None:
        """Publish one record, trying up to ``tries`` times; its last error, or None."""
        error: Exception | None = None
        for _ in range(tries):
            try:
                sink.publisher.publish_many([record])
            except Exception as exc:
                self.stats.publish_errors += 1
                error = exc
                if not published_count(exc, 1):
                    continue
            self._taken(sink, (record,), 1)
            return None
        return error

    def _isolate(self, sink: _Sink, pending: Sequence[Record]) -> Sequence[Record]:
        """Bisect ``pending`` in order: publish what the sink takes, find what it refuses.

        Returns:
            What is left to retry: nothing, unless the hold is full (the sink looks down):
            then the suspects and what was not tried, in order.
        """
        earlier, sink.held = sink.held, []  # held before: proven poison if the sink takes any
        stack: list[Sequence[Record]] = [as_records(pending)]  # the next part is the last
        suspects: list[tuple[Record, Exception]] = []  # failed alone, nothing taken since
        poison: list[tuple[Record, Exception]] = []
        took = False
        rest: list[Record] = []
        while stack:
            part = stack.pop()
            if len(part) == 1:
                error = self._alone(sink, part[0])
                if error is None:
                    took, poison, suspects = True, poison + suspects, []
                    continue
                suspects.append((part[0], error))
                if len(suspects) + len(earlier) > POISON_HOLD:  # the sink looks down
                    rest = [r for r, _ in suspects] + [r for p in reversed(stack) for r in p]
                    suspects = []
                    break
                continue
            try:
                sink.publisher.publish_many(part)
            except Exception as exc:
                self.stats.publish_errors += 1
                done = published_count(exc, len(part))
                if done:  # the sink stopped at part[done]: try it alone next
                    took, poison, suspects = True, poison + suspects, []
                    part = self._taken(sink, part, done)
                    if len(part) > 1:
                        stack.extend((part[1:], part[:1]))
                    elif part:
                        stack.append(part)
                else:
                    mid = len(part) // 2
                    stack.extend((part[mid:], part[:mid]))
            else:
                self._taken(sink, part, len(part))
                took, poison, suspects = True, poison + suspects, []
        self._set_aside(sink, poison)
        if took:
            self._settle(sink, earlier)
        else:
            sink.held = earlier
        if suspects:
            sink.held.extend(suspects)
            log.warning(
                "%s refuses %d record(s) alone and has taken nothing since: held aside "
                "(%d in all) until it takes another record (first: %s; %s)",
                sink.name,
                len(suspects),
                len(sink.held),
                _brief(suspects[0][0]),
                _error(suspects[0][1]),
            )
        return rest

    def _settle(self, sink: _Sink, held: list[tuple[Record, Exception]]) -> None:
        """The sink took records: try each held one alone again; poison if it still fails."""
        poison = []
        for record, _ in held:
            error = self._alone(sink, record)
            if error is not None:
                poison.append((record, error))
        self._set_aside(sink, poison)

    def _set_aside(self, sink: _Sink, poison: list[tuple[Record, Exception]]) -> None:
        """Write poison records to the dead-letter file (one log line for the lot)."""
        if not poison:
            return
        now = int(time.time() * 1000)
        entries = [
            {"time": now, "publisher": sink.name, "error": _error(exc), "record": record}
            for record, exc in poison
        ]
        written = 0
        where = "no dead-letter file: dropped"
        if self.dead_letters is not None:
            where = f"set aside in {self.dead_letters.path}"
            try:
                self.dead_letters.write(entries)
                written = len(entries)
            except OSError as exc:
                written = published_count(exc, len(entries))
                where = f"could not write the dead-letter file ({exc}): {written} set aside"
        self.stats.dead_letters += written
        self.stats.records_dropped += len(entries) - written
        log.error(
            "%s refuses %d record(s) it was given alone while it takes others: %s (first: %s; %s)",
            sink.name,
            len(entries),
            where,
            _brief(poison[0][0]),
            entries[0]["error"],
        )


def _members(publisher: Publisher) -> list[Publisher]:
    """The sinks behind ``publisher``: the members of a MultiPublisher, else itself."""
    if isinstance(publisher, MultiPublisher):
        return [m for p in publisher.publishers for m in _members(p)]
    return [publisher]


def _name(publisher: Publisher) -> str:
    cls = type(publisher)
    return f"{cls.__module__}.{cls.__qualname__}"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _brief(record: Record) -> str:
    """Enough of a record to find it: its kind and uuid."""
    get = record.get if isinstance(record, dict) else {}.get
    return f"{get('kind')} {get('uuid')}"
