"""The client: :class:`LogClient`, which ships log events to the proxy (docs/design.md §6).

Its logging methods run on the application's threads and only ever put an
:class:`~async_logging.client.items.Item` in the client's
:class:`~async_logging.client.inbox.Inbox`: no I/O, no lock, no formatting (docs/design.md §7).
Its :class:`~async_logging.client.sender.Sender` thread does the rest. Every open client
is flushed at interpreter exit and gets a sender of its own in a forked child (both
hooks are at the end of this module).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from yarl import URL

from ..exceptions import UsageError
from ..model import ATOMIC, HEARTBEAT
from . import registry
from .context import _scope
from .core import ClientCore, CoreLimits
from .inbox import Inbox
from .items import RAW, make_item, placement
from .lifecycle import CLIENT_AFTER_FORK, CLIENT_MOVES, ClientState, Lifecycle
from .report import add_secret, safe_url
from .scopes import Bound, Transaction
from .sender import Sender
from .spool import DEFAULT_SPOOL_MAX_BYTES
from .transports import Transport, backoff, http_url, is_retryable, resolve_transport

__all__ = ["DEFAULT_URL", "ClientStats", "LogClient"]

log_ = logging.getLogger("async_logging.client")

#: Where the client connects when no URL is given (``ASYNC_LOGGING_URL`` overrides it).
DEFAULT_URL: Final = "ws://127.0.0.1:3000/"
DEFAULT_DRAIN_INTERVAL: Final = 0.05
DEFAULT_EXIT_TIMEOUT: Final = 5.0

_get_scope = _scope.get
#: The client states in which events given to it are dropped.
_DROPPING: Final = frozenset({ClientState.CLOSED, ClientState.FAILED})


@dataclass(frozen=True, slots=True)
class ClientStats:
    """A snapshot of a client's counters.

    Attributes:
        sent: events written to the transport (each resend counts again).
        acked: events the proxy acknowledged.
        dropped: events refused on enqueue because the queue was full (or the client closed).
        queued: events enqueued and not yet acknowledged.
        reconnects: connections re-established after one was lost.
        resent: events written again after a connection was lost.
        rejected: events the proxy refused as invalid (not retried).
        lost: events abandoned unacknowledged when the client stopped or gave up.
        frames: envelopes written (resends included).
        bytes: bytes written (resends included).
        connected: whether a connection is open now.
        spooled: events written to the spool (``spool_dir``) before being sent.
        spool_dropped: events not written to the spool because it was full (or a write
            failed); they are still sent from memory, but a restart loses them.
        replayed: events read back at start from the spool of an earlier client, to resend.
        lost_at_close: events still unacknowledged when ``close()`` (or the exit-time
            flush) gave up and not written to a spool: lost (also counted in ``lost``).
            Set, and reported in one warning, before ``close()`` returns.
        kept_at_close: events still unacknowledged then but kept in the spool for the
            next start (not lost).
    """

    sent: int
    acked: int
    dropped: int
    queued: int
    reconnects: int
    resent: int
    rejected: int
    lost: int
    frames: int
    bytes: int
    connected: bool
    spooled: int = 0
    spool_dropped: int = 0
    replayed: int = 0
    lost_at_close: int = 0
    kept_at_close: int = 0


class LogClient:
    """Ships log events to the proxy without ever blocking the application.

    ``log()``, ``event()``, ``heartbeat()`` and transactions put an item in the client's
    bounded :attr:`inbox` and return; a background thread (its own event loop) holds the
    events of each transaction tree until the root ends, batches them into envelopes, writes
    them over the transport and resends what is not acknowledged after a reconnection. When
    the queue is full, new events are dropped and counted (``stats.dropped``). The client's
    own problems (the proxy unreachable, a refused token, drops) are logged on the
    ``async_logging.client`` logger, once per burst with the reason, never with the token
    (see :mod:`async_logging.client.report`); :class:`LogHandler` never sends them.

    Args:
        url: where the proxy listens (``ws://host:3000/`` or ``http://host:3000``);
            default ``$ASYNC_LOGGING_URL`` or ``ws://127.0.0.1:3000/``.
        transport: ``"websocket"`` (default), ``"http"``, ``"websocket-otherwise-http"``,
            a :class:`~async_logging.client.transports.Transport` class or instance.
        machine: the ``machine`` stamped on events (default: the host name).
        limits: batching, holding and queue limits (see :class:`CoreLimits`); the keyword
            arguments below override single fields.
        batch_size: most events per envelope.
        ready_threshold: events held per uuid before they are sent without the root's end.
        hold_timeout: seconds events are held for their root at most.
        max_queue_events: events queued at most before new ones are dropped.
        max_queue_bytes: estimated bytes queued at most before new ones are dropped.
        drain_interval: seconds between drains when the application is quiet (stand-alone
            events wait at most about this long).
        backoff: makes an iterator of reconnection delays (default :func:`backoff`).
        is_retryable: says whether an error is worth reconnecting after.
        connect_timeout: seconds a connection attempt may take.
        token: the proxy's shared token, sent as ``Authorization: Bearer`` (default
            ``$ASYNC_LOGGING_TOKEN``); a refused token (401/403) makes the client give up.
        exit_timeout: seconds the exit-time flush waits (``0``: it does not wait, but what
            is unacknowledged is still counted and reported, and spooled by a spooling
            client).
        spool_dir: spool envelopes in this directory until they are acknowledged, so a
            restart of the application loses nothing; a later client with the same
            ``spool_dir`` resends what was left (see docs/client.md, "Spool"). Every live
            client takes a subdirectory of its own: clients may share a ``spool_dir``.
        spool_max_bytes: unacknowledged bytes the spool holds at most; past it new
            envelopes are not spooled (sent from memory only) and counted in
            ``stats.spool_dropped``.
        default: make this the default client (``None``: only if there is none yet).
        start: start the sender thread now (else call :meth:`start`).

    Raises:
        UsageError: a bad transport, URL or limit, or a ``spool_dir`` that cannot be
            created or locked.
    """

    def __init__(
        self,
        url: str | None = None,
        transport: Transport | type[Transport] | str | None = None,
        *,
        machine: str | None = None,
        limits: CoreLimits | None = None,
        batch_size: int | None = None,
        ready_threshold: int | None = None,
        hold_timeout: float | None = None,
        max_queue_events: int | None = None,
        max_queue_bytes: int | None = None,
        drain_interval: float = DEFAULT_DRAIN_INTERVAL,
        backoff: Callable[[], Iterator[float]] = backoff,
        is_retryable: Callable[[BaseException], bool] = is_retryable,
        connect_timeout: float = 10.0,
        token: str | None = None,
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        default: bool | None = None,
        start: bool = True,
    ) -> None:
        self.url = url or os.environ.get("ASYNC_LOGGING_URL") or DEFAULT_URL
        http_url(self.url, "/")  # a bad URL is the caller's mistake: say so now
        self.transport = resolve_transport(transport)
        self.machine = machine or socket.gethostname()
        overrides = {
            k: v
            for k, v in (
                ("batch_size", batch_size),
                ("ready_threshold", ready_threshold),
                ("hold_timeout", hold_timeout),
                ("max_queue_events", max_queue_events),
                ("max_queue_bytes", max_queue_bytes),
            )
            if v is not None
        }
        base = limits or CoreLimits()
        if overrides:
            base = dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
        self.limits = base
        if drain_interval <= 0:
            raise UsageError("drain_interval must be > 0")
        self.drain_interval = drain_interval
        self.exit_timeout = exit_timeout
        if (
            not isinstance(spool_max_bytes, int)
            or isinstance(spool_max_bytes, bool)
            or spool_max_bytes <= 0
        ):
            raise UsageError(f"spool_max_bytes must be a positive int, not {spool_max_bytes!r}")
        #: Where envelopes are spooled until acknowledged (``None``: no spool).
        self.spool_dir = os.fspath(spool_dir) if spool_dir is not None else None
        self.spool_max_bytes = spool_max_bytes
        self._backoff = backoff
        self._is_retryable = is_retryable
        self._connect_timeout = connect_timeout
        token = token or os.environ.get("ASYNC_LOGGING_TOKEN")
        add_secret(token)
        add_secret(URL(self.url).password)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        #: The queue the application's threads put items in and the sender takes them from.
        self.inbox = Inbox(base.max_queue_events, base.batch_size)
        self._life = Lifecycle(
            "LogClient", CLIENT_MOVES, ClientState.NEW, after_fork=CLIENT_AFTER_FORK
        )
        self._sender = self._make_sender()
        registry.clients.add(self)
        previous = registry.default.client
        if default or (default is None and previous is None):
            registry.default.client = self
        if start:
            try:
                self.start()
            except UsageError:
                registry.clients.discard(self)
                if registry.default.client is self:
                    registry.default.client = previous
                raise

    def _make_sender(self) -> Sender:
        core = ClientCore(pid=os.getpid(), machine=self.machine, limits=self.limits)
        return Sender(
            self.inbox,
            core,
            self.transport,
            self.url,
            drain_interval=self.drain_interval,
            backoff=self._backoff,
            is_retryable=self._is_retryable,
            connect_timeout=self._connect_timeout,
            headers=self._headers,
            spool_dir=self.spool_dir,
            spool_max_bytes=self.spool_max_bytes,
        )

    def start(self) -> None:
        """Start the sender thread (done by the constructor unless ``start=False``).

        Raises:
            UsageError: the ``spool_dir`` cannot be created or locked.
        """
        if self._life.move_if((ClientState.NEW,), ClientState.RUNNING) is not None:
            self._start_sender()

    def _start_sender(self) -> None:
        try:
            self._sender.start()
        except UsageError:
            self._life.to(ClientState.FAILED)
            self.inbox.close()
            raise

    @property
    def state(self) -> ClientState:
        """Where the client is in its life (see :mod:`async_logging.client.lifecycle`)."""
        return self._life.state

    def __repr__(self) -> str:
        connected = ", connected" if self._sender.connected else ""
        return (
            f"<LogClient {safe_url(self.url)} via {self.transport.name}, "
            f"{self._life.state.name.lower()}{connected}>"
        )

    # ------------------------------------------------------------------ hot path

    def log(self, event: Mapping[str, Any]) -> None:
        """Enqueue one raw log map (the seed's ``client.log(map)``); never blocks.

        The map is copied and sent as it is (docs/design.md §2 keys, any extra keys); a
        ``timestamp`` is added when it has none, ``pid`` and ``machine`` when it lacks them.
        Events with a ``uuid`` are held until their root transaction's ``end``.
        """
        self.inbox.put(make_item(RAW, None, None, None, None, None, dict(event)))

    def event(
        self,
        type: str,
        name: str | None = None,
        msg: Any = None,
        level: str | None = None,
        *,
        uuid: str | None = None,
        parent: int | str | None = None,
        **data: Any,
    ) -> None:
        """Log an atomic event: a child of the current transaction, or stand-alone.

        Args:
            type: CAL type (``DB``, ``API``, ``LOG``, …).
            name: what happened.
            msg: a message.
            level: a log level name.
            uuid: put the event in this tree instead of the current one (an event produced
                elsewhere); its ``parent`` defaults to the current transaction when the
                uuid is the current one, else to ``0`` (top level).
            parent: the id of the transaction it belongs to (with ``uuid``).
            **data: extra keys sent with the event (``status=``, ``duration=`` too).
        """
        if uuid is None and parent is None:
            item = make_item(ATOMIC, _get_scope(), type, name, level, msg, data)
        else:
            item = make_item(ATOMIC, placement(uuid), type, name, level, msg, data, None, parent)
        self.inbox.put(item)

    def heartbeat(
        self,
        type: str = "heartbeat",
        name: str | None = None,
        msg: Any = None,
        level: str | None = None,
        **data: Any,
    ) -> None:
        """Log a heartbeat (a top-level record the proxy publishes at once).

        Args:
            type: CAL type.
            name: whose heartbeat (default: the process, ``python:<pid>``).
            msg: a message.
            level: a log level name.
            **data: the measures (``cpu_percent=``, ``rss_bytes=``, …).
        """
        item = make_item(HEARTBEAT, None, type, name or f"python:{os.getpid()}", level, msg, data)
        self.inbox.put(item)

    # ------------------------------------------------------------------ API

    def transaction(
        self,
        type: str = "URL",
        name: str | None = None,
        *,
        uuid: str | None = None,
        parent: int | str | None = None,
        msg: Any = None,
        level: str | None = None,
        **data: Any,
    ) -> Transaction:
        """A transaction logged through this client (see :func:`transaction`)."""
        return Transaction(
            type, name, uuid=uuid, parent=parent, msg=msg, level=level, client=self, **data
        )

    def bind(self, uuid: str, parent: int | str | None = None) -> Bound:
        """A scope continuing tree ``uuid`` that started elsewhere (see :func:`bind`)."""
        return Bound(uuid, parent, self)

    def flush(self, timeout: float | None = 5.0, *, spooled: bool = False) -> bool:
        """Send everything enqueued so far, held transactions included, and wait for acks.

        Blocks the calling thread; from a coroutine use :meth:`aflush`.

        Args:
            timeout: seconds to wait at most (``None``: no limit).
            spooled: count an event written to the spool as done, so this returns as soon
                as everything enqueued so far would survive a restart (without a spool
                it changes nothing).

        Returns:
            Whether everything was acknowledged (or spooled) within ``timeout`` seconds.
        """
        return self._sender.flush(timeout, spooled=spooled)

    async def aflush(self, timeout: float | None = 5.0, *, spooled: bool = False) -> bool:
        """:meth:`flush` without blocking the running event loop."""
        import asyncio

        return await asyncio.to_thread(self.flush, timeout, spooled=spooled)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush (up to ``timeout`` seconds), then stop the sender; later events are dropped.

        What is still unacknowledged then is spooled (with a ``spool_dir``) or lost; either
        way it is counted (``stats.lost_at_close``, ``stats.kept_at_close``) and reported in
        one warning on the ``async_logging.client`` logger before this returns.

        Returns:
            Whether everything was acknowledged before the sender stopped.
        """
        return self._close(timeout, f"at close(timeout={timeout})")

    def _close(self, timeout: float | None, occasion: str) -> bool:
        was = self._life.move_if((ClientState.NEW, ClientState.RUNNING), ClientState.CLOSING)
        if was is None:  # closed (or closing) already, or it never could start
            return self._sender.lost == 0 and self._sender.pending_events() == 0
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = self.flush(timeout) if was is ClientState.RUNNING else False
        self.inbox.close()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._sender.stop(remaining, occasion=occasion)
        registry.clients.discard(self)
        self._life.to(ClientState.CLOSED)
        return ok

    async def aclose(self, timeout: float | None = 5.0) -> bool:
        """:meth:`close` without blocking the running event loop."""
        import asyncio

        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> LogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether it is closed (or could not start): events given to it are dropped."""
        return self._life.state in _DROPPING

    @property
    def error(self) -> BaseException | None:
        """The non-retryable error that made the client give up, if any."""
        return self._sender.error

    @property
    def stats(self) -> ClientStats:
        """The client's counters now (read without stopping anything; approximate while busy)."""
        s = self._sender
        core = s.core
        return ClientStats(
            sent=core.sent,
            acked=core.acked,
            dropped=self.inbox.dropped,
            queued=len(self.inbox) + core.pending_events,
            reconnects=s.reconnects,
            resent=core.resent,
            rejected=core.rejected,
            lost=s.lost,
            frames=core.frames_sent,
            bytes=core.bytes_sent,
            connected=s.connected,
            spooled=s.spooled,
            spool_dropped=s.spool_dropped,
            replayed=s.replayed,
            lost_at_close=s.lost_at_close,
            kept_at_close=s.kept_at_close,
        )

    def _after_fork_in_child(self) -> None:
        # The parent's sender thread does not exist here: start afresh with an empty queue
        # (the parent still sends what it had). The parent's spool stays the parent's: the
        # child closes its copies of the descriptors and gets a directory of its own.
        self._sender.forget_after_fork()
        self.inbox = Inbox(self.limits.max_queue_events, self.limits.batch_size)
        self._sender = self._make_sender()
        state = self._life.after_fork()
        if state is ClientState.RUNNING:
            try:
                self._start_sender()
            except UsageError as exc:  # the fork must go on: say it, drop the events
                log_.warning("async-logging client: no sender in the forked child: %s", exc)
        elif state in _DROPPING:
            self.inbox.close()


def _close_all_at_exit() -> None:
    """The exit-time flush: every open client gets its ``exit_timeout`` to deliver.

    Each is closed, even with ``exit_timeout=0`` (then without waiting): what it could not
    deliver in time goes to its spool or is counted lost, and one warning says so.
    """
    for client in list(registry.clients):
        if not client.closed:
            try:
                client._close(
                    client.exit_timeout, f"at interpreter exit (exit_timeout={client.exit_timeout})"
                )
            except Exception:  # never let logging break interpreter exit
                log_.debug("exit-time close failed", exc_info=True)


def _after_fork_in_child() -> None:
    for client in list(registry.clients):
        client._after_fork_in_child()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
