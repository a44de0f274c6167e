"""Transactions and bound scopes: where new events go in a tree (docs/design.md §6).

A :class:`Transaction` (``with transaction(...)``, ``async with``, or a decorator) logs a
``begin`` when entered and an ``end`` when left, and is the current scope in between:
events and nested transactions made inside are its children. A :class:`Bound` scope
(:func:`~async_logging.client.bind`) continues a tree that started elsewhere. Both log
through their client, or the default client at entry
(:data:`~async_logging.client.registry.default`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from ..exceptions import UsageError
from ..model import ATOMIC, BEGIN, END
from . import registry
from .context import Scope, _ambient, _scope, foreign_ids, new_epoch, new_uuid
from .items import NOT_ERRORS, Release, exception_item, make_item

if TYPE_CHECKING:
    from .client import LogClient

__all__ = ["Bound", "Transaction"]

P = ParamSpec("P")
R = TypeVar("R")

_perf_ns = time.perf_counter_ns
_get_scope = _scope.get
#: The ids of a transaction not entered yet: none (one exhausted iterator for all of them).
_NO_IDS: Final[Iterator[int | str]] = iter(())
#: The child counter of a transaction not entered yet (it gets its own when it starts).
_NO_KIDS: Final[Iterator[int]] = iter(())


def _norm_parent(parent: int | str | None) -> int | str | None:
    """``0`` for every spelling of the top level, so the core can test ``parent == 0``."""
    return 0 if parent == "0" else parent


class Transaction(Scope):
    """A transaction: a context manager (``with``/``async with``) and a decorator.

    Entering logs a ``begin``, leaving logs an ``end`` with the same ``event`` id, the
    measured ``duration`` (ms, with microseconds), ``childCount`` (how many direct children
    it emitted) and a ``status``: ``"0"`` on success, the exception's class name when the
    block raised, or whatever was set on :attr:`status` meanwhile. An exception that leaves
    the block is also logged as a child just before the ``end``: an atomic event of type
    ``Exception``, level ``ERROR``, the class name in ``name``, the message in ``msg`` and
    the formatted traceback (causes and contexts included) in ``traceback``. Inside, the
    transaction is the current scope: events and nested transactions are its children, in
    this task, in the tasks it starts and in threads given :func:`wrap`-ped callables.

    Used as a decorator, each call of the function runs in a new transaction (named after
    the function unless a name was given). :func:`~async_logging.client.transaction` is
    this class.

    Args:
        type: CAL type (``URL``, ``API``, ``DB``, …).
        name: CAL name (for a decorator, defaults to the function's qualified name).
        uuid: the tree's request id; given, it starts (or joins) that tree with ids that
            cannot collide with another process's; omitted, the current tree is continued
            or a new one started.
        parent: the enclosing transaction's id when it is not the current one.
        event: this transaction's own event id, for one that crosses the wire (a W3C span
            id, 16 hex digits: :mod:`~async_logging.client.propagation`); omitted, the next
            id of its tree.
        msg: a message for the ``end``.
        level: a log level name.
        client: the client to log through (default: the default client, at entry).
        **data: extra keys sent with the ``begin``.

    Example::

        async with transaction("DB", "select user") as tx:
            row = await db.fetch(...)
            if row is None:
                tx.status = "404"

    Attributes:
        type: CAL type.
        name: CAL name (may be changed before the end, e.g. to a route template).
        uuid: the tree's request id (known once entered).
        event: this transaction's event id (known once entered).
        parent: the enclosing transaction's id, ``0`` at the top.
        status: set it to report a status of your own.
        msg: message of the ``end``.
        data: extra keys sent with the ``end`` (``set()`` adds to it).
        exception: an exception to report at the end as if it had left the block, for one
            that was turned into a response before it could (a framework's 500 page): the
            ``Exception`` child, and the class name as status unless one was set.
        duration: the measured duration in ms (known once left).
    """

    __slots__ = (
        "_client",
        "_done",
        "_event_arg",
        "_foreign",
        "_parent_arg",
        "_t0",
        "_token",
        "_uuid_arg",
        "begin_data",
        "data",
        "duration",
        "exception",
        "level",
        "msg",
        "name",
        "parent",
        "status",
        "type",
    )

    def __init__(
        self,
        type: str = "URL",
        name: str | None = None,
        *,
        uuid: str | None = None,
        parent: int | str | None = None,
        event: int | str | None = None,
        msg: Any = None,
        level: str | None = None,
        client: LogClient | None = None,
        **data: Any,
    ) -> None:
        self.type = type
        self._event_arg = event
        self.name = name
        self._uuid_arg = uuid
        self._parent_arg = parent
        self.msg = msg
        self.level = level
        self._client = client
        self.begin_data = data or None
        self.data: dict[str, Any] | None = None
        self.status: str | None = None
        self.duration: float | None = None
        self.exception: BaseException | None = None
        self._token: contextvars.Token[Scope | None] | None = None
        self._t0 = -1  # perf_counter_ns() at the start; -1: not started
        self._done = False
        self._foreign = False
        self.uuid = ""
        self.event: int | str = 0
        self.parent: int | str = 0
        self.ids: Iterator[int | str] = _NO_IDS
        self.kids: Iterator[int] = _NO_KIDS
        self.epoch = 0

    def __repr__(self) -> str:
        return (
            f"Transaction({self.type!r}, {self.name!r}, uuid={self.uuid!r}, "
            f"event={self.event!r}, parent={self.parent!r}, status={self.status!r})"
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Transaction:
        """Log the ``begin`` without making this the current scope (see :meth:`finish`).

        For integrations that cannot wrap the work in one ``with`` block (a WSGI body
        iterated after the application returned): make it current where its children are
        emitted (:func:`~async_logging.client.context.use_scope`), then :meth:`finish` it.

        Raises:
            UsageError: it was started before (create one transaction per use).
        """
        if self._t0 >= 0:
            raise UsageError("a Transaction cannot be entered twice; create one per use")
        outer = _get_scope()
        uuid = self._uuid_arg
        parent = self._parent_arg
        if parent == "0":
            parent = 0  # as _norm_parent(), without a call on the hot path
        if uuid is not None and (outer is None or outer.uuid != uuid):
            # A tree that started elsewhere (or will be joined by others): foreign ids.
            self.uuid = uuid
            self.ids = foreign_ids()
            self.parent = parent if parent is not None else 0
            self._foreign = True
        elif outer is not None:
            self.uuid = outer.uuid
            self.ids = outer.ids
            if parent is None or parent == outer.event:
                self.parent = outer.event
                next(outer.kids)  # a direct child of the enclosing transaction
            else:
                self.parent = parent
        elif (ambient := _ambient[0]) is not None and (found := ambient()) is not None:
            # Inside another tracer's span (propagation.use_opentelemetry): join its trace.
            self.uuid = found[0]
            self.ids = foreign_ids()
            self.parent = parent if parent is not None else found[1]
            self._foreign = True
        else:
            self.uuid = new_uuid()
            self.ids = itertools.count(1)
            self.parent = parent if parent is not None else 0
        self.event = next(self.ids) if self._event_arg is None else self._event_arg
        self.kids = itertools.count()
        # One clock per tree (context.py): the begin's time and the duration's start are
        # the one reading, so the children, read later, lie inside.
        self.epoch = epoch = outer.epoch if outer is not None else new_epoch()
        self._t0 = t0 = _perf_ns()
        client = self._client or registry.default.client
        self._client = client
        if client is not None:
            client.inbox.put(
                make_item(
                    BEGIN,
                    self,
                    self.type,
                    self.name,
                    self.level,
                    None,
                    self.begin_data,
                    epoch + t0,
                    self.parent,
                )
            )
        return self

    def finish(self, exc: BaseException | None = None) -> None:
        """Log the ``end`` of a transaction :meth:`start`-ed (once; later calls do nothing).

        Args:
            exc: the exception that ended it, if any (else :attr:`exception`, if set).
        """
        t1 = _perf_ns()
        if self._done:
            return
        if self._t0 < 0:
            raise UsageError("a Transaction must be entered before it is left")
        self._done = True
        epoch = self.epoch
        end = epoch + t1
        # Both ends cut to whole microseconds first: a child's cut ends lie inside these.
        self.duration = (end // 1000 - (epoch + self._t0) // 1000) / 1000
        if exc is None:
            exc = self.exception
        if self.status is None:
            self.status = "0" if exc is None else exc.__class__.__name__
        client = self._client
        if client is None:
            return
        if exc is not None and not isinstance(exc, NOT_ERRORS):
            client.inbox.put(exception_item(self, exc, end, client.limits.max_string_length))
        client.inbox.put(
            make_item(
                END,
                self,
                self.type,
                self.name,
                self.level,
                self.msg,
                self.data,
                end,
                self.parent,
                self.status,
                self.duration,
                next(self.kids),  # every child emitted so far, from any task or thread
            )
        )
        if self._foreign and self.parent != 0:
            # No root end will come through this process: send what is held now.
            client.inbox.put(Release(self.uuid))

    def __enter__(self) -> Transaction:
        self.start()
        self._token = _scope.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is None:
            raise UsageError("a Transaction must be entered before it is left")
        try:
            _scope.reset(token)
        except ValueError:
            # Left in another context than it was entered in (e.g. a generator resumed
            # elsewhere): restore by value instead.
            _scope.set(token.old_value if token.old_value is not token.MISSING else None)
        if exc is None and exc_type is not None and self.status is None:
            self.status = exc_type.__name__  # a class without its instance (a manual call)
        self.finish(exc)

    async def __aenter__(self) -> Transaction:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ handle

    def set(self, **data: Any) -> Transaction:
        """Add extra keys to the transaction's ``end`` (keys given at the start win)."""
        if self.data is None:
            self.data = data
        else:
            self.data.update(data)
        return self

    def set_status(self, status: str | int) -> Transaction:
        """Report ``status`` (``"0"`` is success, anything else a failure)."""
        self.status = str(status)
        return self

    def child(
        self,
        type: str,
        name: str | None = None,
        msg: Any = None,
        level: str | None = None,
        **data: Any,
    ) -> None:
        """Log an atomic event as a child of this transaction, from any thread or context."""
        client = self._client or registry.default.client
        if client is None or not self.uuid:
            return
        client.inbox.put(make_item(ATOMIC, self, type, name, level, msg, data))

    # ------------------------------------------------------------------ decorator

    def _fresh(self, fallback_name: str) -> Transaction:
        t = Transaction(
            self.type,
            self.name if self.name is not None else fallback_name,
            uuid=self._uuid_arg,
            parent=self._parent_arg,
            msg=self.msg,
            level=self.level,
            client=self._client,
        )
        t.begin_data = self.begin_data
        return t

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (sync or async): each call runs in a new transaction."""
        name: str = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self._fresh(name):
                    return await afn(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._fresh(name):
                return fn(*args, **kwargs)

        return wrapper


class Bound:
    """A scope continuing a tree that started elsewhere (see :func:`bind`)."""

    __slots__ = ("_client", "_scope", "_token")

    def __init__(self, uuid: str, parent: int | str | None, client: LogClient | None) -> None:
        parent = _norm_parent(parent)
        self._scope = Scope(uuid, parent if parent is not None else 0, foreign_ids())
        self._client = client
        self._token: contextvars.Token[Scope | None] | None = None

    def __enter__(self) -> Scope:
        self._token = _scope.set(self._scope)
        return self._scope

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _scope.reset(self._token)
            self._token = None
        client = self._client or registry.default.client
        if client is not None:
            client.inbox.put(Release(self._scope.uuid))

    async def __aenter__(self) -> Scope:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()
