r'''The publisher plug-in interface (docs/design.md §5): what the server hands published records to.

A publisher receives the records the reassembly engine publishes (docs/design.md §3): plain
dicts with a ``kind`` key, ``"transaction"`` (with ``children``, ``complete``,
``duration``, ``status`` and, when incomplete, ``reason``), ``"atomicEvent"`` or
``"heartbeat"``. It is the seed's ``LogPublisher`` option: the 2013 module listened to the
buffer's ``transaction``, ``atomicEvent`` and ``heartbeat`` events; here they are methods.

Contract:

- Every method is **synchronous**. The server calls publishers from one dedicated
  publisher thread, never from the event loop, so a blocking file write or network call is
  fine; it does not stall ingest (a slow sink is buffered, then applies backpressure).
- The server calls :meth:`Publisher.publish_many` with batches, in publication order.
  :class:`BasePublisher` dispatches each record of a batch to :meth:`~Publisher.transaction`,
  :meth:`~Publisher.atomic_event` or :meth:`~Publisher.heartbeat` by its ``kind``; a
  publisher that can write a batch at once (a file, a socket) overrides ``publish_many``.
- :meth:`~Publisher.flush` makes what was published so far durable (or at least handed
  over); :meth:`~Publisher.close` flushes and releases resources. The server calls
  ``flush`` then ``close`` on shutdown, after every buffered record was published.
- Records are shared: the same dict may go to several publishers (:class:`MultiPublisher`),
  so a publisher must not mutate a record (copy it first if it has to).
- A publisher method may raise: the server counts and logs the error and calls
  ``publish_many`` again, after a backoff, with what of the batch is not published yet.
  A publisher that fails part-way through a batch says how far it got with
  :func:`mark_published` (the first *n* records are out, the rest are not); the retry then
  starts at record *n*. :class:`BasePublisher` and the JSON-lines publisher do; a publisher
  that does not gets the whole batch again (at-least-once). With several publishers
  (:class:`MultiPublisher`) the server retries each on its own, so a healthy one never
  sees a batch twice.
- A record that makes a publisher raise every time, alone, while the publisher takes other
  records (a *poison* record) is set aside by the server into its dead-letter file after a
  bounded number of tries; a publisher that fails for every record is retried, never
  dead-lettered (docs/design.md §5).
- A batch may be an :class:`~async_logging.encoded.EncodedRecords` (records the native
  fast path produced as JSON lines): a sequence of dicts like any other, decoded on first
  use.

Plugging one in: the server's ``publisher`` option (and :func:`load_publisher`) takes a
class (instantiated with the configured options), an instance, a ``"module:attr"`` string
naming either, or one of the built-in names in :data:`BUILTIN_PUBLISHERS`.

Example:
    A publisher that writes CAL-like text lines (``t``/``T`` around a transaction's
    children, ``A`` for a transaction without children, ``E`` for an event, ``H`` for a
    heartbeat). It ships as :class:`async_logging.publishers.examples.CalTextPublisher`
    (a test keeps this copy identical to it)::

        import sys
        import time
        from collections.abc import Iterator
        from typing import TextIO

        from async_logging import Record
        from async_logging.publishers import BasePublisher


        class CalTextPublisher(BasePublisher):
            """Write each record as CAL-like text lines (t/T, A, E, H) to a text stream."""

            def __init__(self, stream: TextIO | None = None) -> None:
                self.stream = stream if stream is not None else sys.stdout

            def transaction(self, record: Record) -> None:
                self.stream.write("".join(self.lines(record)))

            atomic_event = heartbeat = transaction

            def flush(self) -> None:
                self.stream.flush()

            def lines(self, node: Record, depth: int = 0) -> Iterator[str]:
                """The text lines of ``node`` and, recursively, of its children."""
                pad, kind, ts = "  " * depth, node.get("kind"), node.get("timestamp", 0)
                head = f"{node.get('type', '')}\t{node.get('name', '')}"
                data = "&".join(f"{k}={node[k]}" for k in ("msg", "reason") if k in node)
                status, duration = node.get("status", "0"), node.get("duration", 0)
                if kind != "transaction":
                    code = "H" if kind == "heartbeat" else "E"
                    yield f"{pad}{code}{self.clock(ts)}\t{head}\t{status}\t{data}\n"
                elif not node.get("children"):
                    yield f"{pad}A{self.clock(ts)}\t{head}\t{status}\t{duration}\t{data}\n"
                else:
                    yield f"{pad}t{self.clock(ts)}\t{head}\n"
                    for child in node["children"]:
                        yield from self.lines(child, depth + 1)
                    end = self.clock(ts + duration)
                    yield f"{pad}T{end}\t{head}\t{status}\t{duration}\t{data}\n"

            @staticmethod
            def clock(ms: int) -> str:
                """``ms`` since the epoch as CAL's UTC ``HH:MM:SS.cc``."""
                hms = time.strftime("%H:%M:%S", time.gmtime(ms // 1000))
                return f"{hms}.{ms % 1000 // 10:02d}"

    Plug it in with ``load_publisher(CalTextPublisher, stream=sys.stderr)``, or give the
    server an instance: ``CalTextPublisher(sys.stderr)``.
'''

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, Final, NoReturn, Protocol, Self, runtime_checkable

from ..buffer import Record
from ..exceptions import ConfigError

__all__ = [
    "BUILTIN_PUBLISHERS",
    "PUBLISHER_METHODS",
    "BasePublisher",
    "BatchPublisher",
    "MultiPublisher",
    "Publisher",
    "import_object",
    "load_publisher",
    "mark_published",
    "published_count",
]

#: The methods a publisher must have (all synchronous).
PUBLISHER_METHODS: Final = (
    "atomic_event",
    "heartbeat",
    "transaction",
    "publish_many",
    "flush",
    "close",
)

#: The attribute of an exception raised by ``publish_many`` that says how many records of the
#: batch, from its start, were published before it (set by :func:`mark_published`).
PUBLISHED_ATTR: Final = "records_published"

#: Short names :func:`load_publisher` accepts in place of ``"module:attr"``.
BUILTIN_PUBLISHERS: Final = {
    "jsonl": "async_logging.publishers.jsonl:JsonLinesPublisher",
    "stdout": "async_logging.publishers.stdout:StdoutPublisher",
    "memory": "async_logging.testing:MemoryPublisher",
}


@runtime_checkable
class Publisher(Protocol):
    """What a publisher implements: three record methods, a batch method, flush and close.

    Subclass :class:`BasePublisher` to get no-op defaults and the batch dispatch, or
    implement every method yourself (structural typing: no base class is required).
    """

    def atomic_event(self, record: Record) -> None:
        """Publish a stand-alone atomic event (``record["kind"] == "atomicEvent"``)."""

    def heartbeat(self, record: Record) -> None:
        """Publish a heartbeat (``record["kind"] == "heartbeat"``)."""

    def transaction(self, record: Record) -> None:
        """Publish a transaction tree (``record["kind"] == "transaction"``)."""

    def publish_many(self, records: Sequence[Record]) -> None:
        """Publish a batch of records of any kinds, in order."""

    def flush(self) -> None:
        """Make what was published so far durable (or at least handed to the sink)."""

    def close(self) -> None:
        """Flush, then release resources; nothing is published after it."""


class BasePublisher:
    """A convenient base for publishers: no-op methods and a dispatching ``publish_many``.

    Override the record methods you care about; override :meth:`publish_many` too when the
    sink can take a batch at once. Also a context manager that closes on exit.
    """

    def atomic_event(self, record: Record) -> None:
        """Publish a stand-alone atomic event; the default does nothing."""

    def heartbeat(self, record: Record) -> None:
        """Publish a heartbeat; the default does nothing."""

    def transaction(self, record: Record) -> None:
        """Publish a transaction tree; the default does nothing."""

    def publish_many(self, records: Sequence[Record]) -> None:
        """Dispatch each record by ``kind``.

        ``"transaction"`` goes to :meth:`transaction`, ``"heartbeat"`` to :meth:`heartbeat`
        and anything else (``"atomicEvent"``, or a kind this version does not know) to
        :meth:`atomic_event`, so no record is silently skipped.

        A record method that raises stops the batch there: the error says, with
        :func:`mark_published`, that the records before it were published, so a retry
        starts at the record that failed.

        Args:
            records: the batch, in publication order.
        """
        transaction, heartbeat, atomic_event = self.transaction, self.heartbeat, self.atomic_event
        record = None
        try:
            for record in records:
                kind = record.get("kind")
                if kind == "transaction":
                    transaction(record)
                elif kind == "heartbeat":
                    heartbeat(record)
                else:
                    atomic_event(record)
        except Exception as exc:
            # Found again only now: an index kept in the loop costs every record.
            mark_published(exc, next((i for i, r in enumerate(records) if r is record), 0))
            raise

    def flush(self) -> None:
        """Flush buffered output; the default does nothing."""

    def close(self) -> None:
        """Release resources; the default calls :meth:`flush`."""
        self.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BatchPublisher(BasePublisher):
    """A base for publishers that work in batches: override :meth:`publish_many` only.

    The single-record methods hand their record to ``publish_many`` as a batch of one.
    """

    def transaction(self, record: Record) -> None:
        """Publish one transaction tree (a batch of one)."""
        self.publish_many((record,))

    def atomic_event(self, record: Record) -> None:
        """Publish one stand-alone atomic event (a batch of one)."""
        self.publish_many((record,))

    def heartbeat(self, record: Record) -> None:
        """Publish one heartbeat (a batch of one)."""
        self.publish_many((record,))


class MultiPublisher(BasePublisher):
    """Fan every call out to several publishers, in the order given.

    A failing publisher does not stop the others: every publisher gets the call, then the
    error is raised (the exception itself when one publisher failed, an
    :class:`ExceptionGroup` when several did). Calling :meth:`publish_many` again with the
    very list that failed retries it only with the publishers that failed, each from the
    record it stopped at (:func:`mark_published`), so no publisher writes a record twice.
    (The server does not rely on this: it retries each member of a MultiPublisher on its
    own.)

    Args:
        publishers: publishers, or anything :func:`load_publisher` accepts (a class, a
            ``"module:attr"`` string or a built-in name), each loaded without options.

    Raises:
        ConfigError: one of ``publishers`` cannot be loaded.
    """

    def __init__(self, publishers: Iterable[object]) -> None:
        self.publishers: tuple[Publisher, ...] = tuple(load_publisher(p) for p in publishers)
        # The last batch that failed somewhere, the publishers that still owe it and how
        # many of its records each had published.
        self._failed_batch: Sequence[Record] | None = None
        self._owing: tuple[tuple[Publisher, int], ...] = ()

    def atomic_event(self, record: Record) -> None:
        """Call ``atomic_event(record)`` on every publisher."""
        self._each(self.publishers, "atomic_event", record)

    def heartbeat(self, record: Record) -> None:
        """Call ``heartbeat(record)`` on every publisher."""
        self._each(self.publishers, "heartbeat", record)

    def transaction(self, record: Record) -> None:
        """Call ``transaction(record)`` on every publisher."""
        self._each(self.publishers, "transaction", record)

    def publish_many(self, records: Sequence[Record]) -> None:
        """Call ``publish_many(records)`` on every publisher (each sees the whole batch).

        Called again with the very batch object that failed, only the publishers that
        failed it are called, each with the records it had not published. The error
        raised says nothing was published (:func:`published_count` is 0): the others may
        have published all of it.
        """
        if records is self._failed_batch:
            targets = self._owing
        else:
            targets = tuple((p, 0) for p in self.publishers)
        self._failed_batch, self._owing = None, ()
        failed: list[tuple[Publisher, int, Exception]] = []
        for publisher, done in targets:
            rest = records[done:] if done else records
            try:
                publisher.publish_many(rest)
            except Exception as exc:  # one failing sink must not starve the others
                failed.append((publisher, done + published_count(exc, len(rest)), exc))
                mark_published(exc, 0)
        if failed:
            self._failed_batch, self._owing = records, tuple((p, n) for p, n, _ in failed)
            self._raise("publish_many", [exc for _, _, exc in failed])

    def flush(self) -> None:
        """Call ``flush()`` on every publisher."""
        self._each(self.publishers, "flush")

    def close(self) -> None:
        """Call ``close()`` on every publisher (each flushes itself)."""
        self._each(self.publishers, "close")

    def _each(self, targets: Iterable[Publisher], method: str, *args: Any) -> None:
        failed: list[Exception] = []
        for publisher in targets:
            try:
                getattr(publisher, method)(*args)
            except Exception as exc:  # one failing sink must not starve the others
                failed.append(exc)
        if failed:
            self._raise(method, failed)

    @staticmethod
    def _raise(method: str, errors: list[Exception]) -> NoReturn:
        if len(errors) == 1:
            raise errors[0]
        raise ExceptionGroup(f"{len(errors)} publishers failed in {method}()", errors)


def mark_published(exc: BaseException, count: int) -> None:
    """Say, on the error ``publish_many`` is about to raise, that the first ``count``
    records of its batch were published (and none after them).

    The server then retries with the records from ``count`` on, so a publisher that fails
    part-way through a batch writes no record twice. A publisher that does not call it is
    taken to have published none of the batch.

    Args:
        exc: the exception about to be raised.
        count: records published, from the start of the batch.
    """
    with contextlib.suppress(AttributeError, TypeError):  # an exception without a __dict__
        setattr(exc, PUBLISHED_ATTR, count)


def published_count(exc: BaseException, size: int) -> int:
    """How many records of a batch of ``size`` the publisher that raised ``exc`` published
    first (see :func:`mark_published`); 0 when it did not say or said something impossible.
    """
    count = getattr(exc, PUBLISHED_ATTR, 0)
    return count if type(count) is int and 0 <= count <= size else 0


def load_publisher(spec: object, **kwargs: Any) -> Publisher:
    """Turn a ``publisher`` option into a publisher instance.

    Args:
        spec: one of

            - a class: instantiated with ``**kwargs``;
            - an instance implementing :class:`Publisher`: returned as is;
            - any other callable (a factory, a :func:`functools.partial`): called with
              ``**kwargs``, and must return a publisher;
            - a string ``"module:attr"`` (``attr`` may be dotted): imported, then treated
              as above; or a built-in name from :data:`BUILTIN_PUBLISHERS` (``"jsonl"``,
              ``"stdout"``, ``"memory"``).
        **kwargs: options for the class or factory.

    Returns:
        The publisher.

    Raises:
        ConfigError: the string is malformed, the module cannot be imported, the attribute
            is missing, the options do not fit the class, options were given with an
            instance, or the object does not implement :class:`Publisher`.
    """
    obj = _import(spec) if isinstance(spec, str) else spec
    name = _describe(obj) + (f" (from {spec!r})" if isinstance(spec, str) else "")
    if isinstance(obj, type):
        _require_methods(obj, f"class {name}")
        return _call(obj, name, kwargs)
    if not _missing_methods(obj):
        if kwargs:
            raise ConfigError(
                f"publisher options {sorted(kwargs)} were given with an instance ({name}); "
                "pass a class or a 'module:attr' string to have them applied"
            )
        return obj  # type: ignore[return-value]  # checked by _missing_methods
    if callable(obj):
        return _call(obj, name, kwargs)
    _require_methods(obj, name)
    raise AssertionError("unreachable")  # pragma: no cover


def import_object(
    spec: str, *, what: str = "publisher", aliases: Mapping[str, str] | None = None
) -> object:
    """Import the object a ``"module:attr"`` string names (``attr`` may be dotted).

    The same resolution serves every plug-in option (``publisher``, ``listener``,
    ``buffer``), so their errors read alike.

    Args:
        spec: ``"package.module:attr"``, or a key of ``aliases``.
        what: the option's name, used in error messages.
        aliases: short names standing for ``"module:attr"`` strings.

    Returns:
        The object (not instantiated).

    Raises:
        ConfigError: ``spec`` is malformed, the module cannot be imported (its error is
            chained) or the attribute is missing.
    """
    target = aliases.get(spec, spec) if aliases else spec
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        also = f" nor a built-in name ({', '.join(sorted(aliases))})" if aliases else ""
        raise ConfigError(f"{what} {spec!r} is neither 'module:attr'{also}")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ConfigError(
            f"cannot import module {module_name!r} for {what} {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{_describe(obj)} has no attribute {part!r} ({what} {spec!r})"
            ) from exc
    return obj


def _import(spec: str) -> object:
    """Resolve a ``publisher`` string, built-in names included (kept for existing callers)."""
    return import_object(spec, what="publisher", aliases=BUILTIN_PUBLISHERS)


def _call(factory: Callable[..., object], name: str, kwargs: dict[str, Any]) -> Publisher:
    """Instantiate a publisher class or call a factory, translating bad options."""
    try:
        obj = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"cannot create publisher {name} with options {sorted(kwargs)}: {exc}"
        ) from exc
    _require_methods(obj, f"{name}() returned {_describe(obj)}, which")
    return obj  # type: ignore[return-value]  # checked by _require_methods


def _missing_methods(obj: object) -> list[str]:
    return [m for m in PUBLISHER_METHODS if not callable(getattr(obj, m, None))]


def _require_methods(obj: object, what: str) -> None:
    missing = _missing_methods(obj)
    if missing:
        raise ConfigError(
            f"{what} does not implement the Publisher protocol: missing "
            f"{', '.join(missing)} (subclass async_logging.publishers.BasePublisher "
            "for no-op defaults)"
        )


def _describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, ModuleType):
        return f"module {obj.__name__!r}"
    return f"{type(obj).__name__} object"
