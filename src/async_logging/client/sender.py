"""The sender: a background thread with its own event loop that does all of the client's I/O.

The application thread only puts items in the client's
:class:`~async_logging.client.inbox.Inbox` (docs/design.md §6). This thread takes them on every
wake-up (the inbox reached a batch, a flush was asked for, or the drain interval passed),
feeds the sans-I/O :class:`~async_logging.client.core.ClientCore`, and a *pump* task writes
the envelopes the core hands out over the transport, reconnecting with backoff when the
connection is lost, while acks come back through the :class:`Listener` callbacks.

It also tells the inbox how much room is left (what the core can still accept), and it
speaks for the client on the ``async_logging.client`` logger: the proxy unreachable, a
refused token, drops, refused frames, each once per burst with its reason (a
:class:`~async_logging.client.report.Reporter` throttles them), and, when it stops, one
warning saying how many events were not acknowledged, why, and whether they are lost or
kept in the spool. That last count and warning come before the connection is closed, so
``close()`` returns with them even when the proxy does not answer the close.

With a ``spool_dir`` it owns the client's :class:`~async_logging.client.spool.ClientSpool`
too: it opens it when the thread starts, adopts what earlier clients left there, appends
every envelope the core cuts before the pump can send it, advances the ack watermark as
acks come, and at the stop writes what is still unacknowledged (the inbox and the held
trees included) to it instead of losing it. No other thread touches the spool's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import aiohttp

from ..exceptions import UsageError
from .core import ClientCore, Envelope
from .inbox import Inbox
from .lifecycle import SENDER_AFTER_FORK, SENDER_MOVES, Lifecycle, SenderState
from .report import Reporter, describe, safe_url
from .spool import DEFAULT_SPOOL_MAX_BYTES, ClientSpool
from .transports import (
    FORBIDDEN_STATUSES,
    TRANSIENT_REFUSALS,
    Connection,
    ConnectionLost,
    ServerRefused,
    Transport,
)

__all__ = ["FlushRequest", "Sender"]

log = logging.getLogger("async_logging.client")

#: Seconds without a drop that end a burst of drops (one warning per burst).
BURST_QUIET = 1.0
#: Seconds ``stop()`` waits at least for the sender to count and report what it abandons,
#: even when the caller's timeout is already spent (the thread only has to wake up).
REPORT_WAIT = 0.5
#: Seconds between two writes of the spool's checkpoint (the ack watermark) at most.
CHECKPOINT_INTERVAL = 0.1
#: The states in which the thread's loop keeps draining the inbox.
_DRAINING = frozenset({SenderState.RUNNING, SenderState.FAILED})


class FlushRequest:
    """Queue marker: send everything enqueued before it, then set ``done``.

    With ``spooled``, an envelope written to the spool counts as delivered.
    """

    __slots__ = ("done", "ok", "spooled")

    def __init__(self, spooled: bool = False) -> None:
        self.done = threading.Event()
        self.ok = False
        self.spooled = spooled

    def finish(self, ok: bool) -> None:
        self.ok = ok
        self.done.set()


class Sender:
    """Runs the client's I/O in a daemon thread (one event loop, one aiohttp session).

    Args:
        inbox: the client's inbox, which it drains and whose room it sets.
        core: the sans-I/O core (owned by this thread from now on).
        transport: how to reach the proxy.
        url: where the proxy is.
        drain_interval: seconds between drains when the application is quiet.
        backoff: makes a fresh iterator of reconnection delays.
        is_retryable: whether an error is worth reconnecting after.
        connect_timeout: seconds a connection attempt may take.
        headers: sent with every request (``Authorization`` for a token).
        clock: monotonic seconds (the core's hold clock and the reports' throttle).
        spool_dir: where to spool envelopes until acknowledged (``None``: no spool).
        spool_max_bytes: unacknowledged bytes the spool holds at most.
    """

    def __init__(
        self,
        inbox: Inbox,
        core: ClientCore,
        transport: Transport,
        url: str,
        *,
        drain_interval: float,
        backoff: Callable[[], Iterator[float]],
        is_retryable: Callable[[BaseException], bool],
        connect_timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        spool_dir: str | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
    ) -> None:
        self.inbox = inbox
        self.core = core
        self.transport = transport
        self.url = url
        self.drain_interval = drain_interval
        self.backoff = backoff
        self.is_retryable = is_retryable
        self.connect_timeout = connect_timeout
        self.headers = headers or {}
        self.clock = clock
        self.reconnects = 0
        self.connects = 0
        self.connected = False
        self.lost = 0
        #: The error that made the client give up (not retryable), if any.
        self.error: BaseException | None = None
        #: The last connection error (retryable ones included), for diagnostics.
        self.last_error: BaseException | None = None
        self._life = Lifecycle(
            "Sender", SENDER_MOVES, SenderState.NEW, after_fork=SENDER_AFTER_FORK
        )
        self._thread = threading.Thread(target=self._run, name="async-logging-sender", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._wake_scheduled = False
        self._wake_ev: asyncio.Event | None = None
        self._kick: asyncio.Event | None = None
        self._flushes: list[tuple[int, FlushRequest]] = []
        self._progress = False
        self._paused: ServerRefused | None = None
        self._answered = False  # whether the proxy answered on the current connection
        self._seen_drops = 0
        #: Throttles the lines about the client's own problems (its clock can be replaced).
        self.reports = Reporter(clock)
        #: Events not acknowledged when the sender stopped: lost, and kept in the spool.
        self.lost_at_close = 0
        self.kept_at_close = 0
        self._accounted = threading.Event()
        self._occasion = "when the client stopped"
        self.spool_dir = spool_dir
        self.spool_max_bytes = spool_max_bytes
        #: The open spool (set by the thread when it starts), if any.
        self.spool: ClientSpool | None = None
        #: Events written to the spool / not written because it was full or failed /
        #: read back from earlier clients' spools at start.
        self.spooled = 0
        self.spool_dropped = 0
        self.replayed = 0
        self._checkpoint_at = 0.0
        self._start_error: BaseException | None = None
        inbox.attach(self.wake)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        """Start the thread and wait until its loop runs (and its spool is open).

        Raises:
            UsageError: the spool directory cannot be created or locked.
            LifecycleError: it was started before.
        """
        self._life.to(SenderState.STARTING)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise UsageError(
                f"cannot spool into {self.spool_dir!r}: {self._start_error}"
            ) from self._start_error

    @property
    def state(self) -> SenderState:
        """Where it is in its life (see :mod:`async_logging.client.lifecycle`)."""
        return self._life.state

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    @property
    def ident(self) -> int | None:
        """The thread's identifier."""
        return self._thread.ident

    def wake(self) -> None:
        """Ask the thread to drain now (cheap to call often: one wake-up is in flight at most)."""
        if self._wake_scheduled:
            return
        loop = self._loop
        if loop is None:
            return
        self._wake_scheduled = True
        try:
            loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop closed meanwhile
            self._wake_scheduled = False

    def flush(self, timeout: float | None, *, spooled: bool = False) -> bool:
        """Send everything enqueued so far (held transactions included) and wait for acks.

        With ``spooled``, an envelope written to the spool counts as acknowledged.

        Returns:
            Whether everything was acknowledged (or spooled) within ``timeout`` seconds.

        Raises:
            UsageError: when called from the sender thread itself (it would wait for itself).
        """
        if threading.get_ident() == self._thread.ident:
            raise UsageError("flush() cannot be called from the sender thread")
        if not self.alive:
            return self.pending_events() == 0
        req = FlushRequest(spooled)
        self._wake_scheduled = False  # this wake-up must happen even if one seems scheduled
        self.inbox.put_marker(req)
        return req.done.wait(timeout) and req.ok

    def stop(self, timeout: float | None, *, occasion: str = "when the client stopped") -> None:
        """Stop the thread: what is still unacknowledged is spooled or counted in ``lost``.

        What it abandons is counted (:attr:`lost_at_close`, :attr:`kept_at_close`) and
        reported in one warning, saying ``occasion``, before the connection is closed, and
        this waits for that (at least :data:`REPORT_WAIT` seconds, even past ``timeout``);
        then it waits for the connection to close until ``timeout`` is spent, and the
        thread finishes closing it in the background.

        Args:
            timeout: seconds to wait at most (``None``: until the thread ends).
            occasion: when this happens, for the warning (``at close(timeout=1)``).
        """
        self._occasion = occasion
        if self._life.move_if((SenderState.NEW,), SenderState.STOPPED) is not None:
            self._abandon()  # never started: no thread, count what was queued here
            return
        self._life.move_if(
            (SenderState.STARTING, SenderState.RUNNING, SenderState.FAILED), SenderState.STOPPING
        )
        self._wake_scheduled = False
        self.wake()
        if self._thread.is_alive() and threading.get_ident() != self._thread.ident:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._accounted.wait(None if timeout is None else max(timeout, REPORT_WAIT))
            self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def pending_events(self) -> int:
        """Events queued in the inbox or in the core, not yet acknowledged."""
        return self.inbox.events() + self.core.pending_events

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's spool without releasing its lock."""
        self._life.after_fork()
        if self.spool is not None:
            self.spool.forget_after_fork()
            self.spool = None

    # ------------------------------------------------------------------ sender thread

    def _on_wake(self) -> None:
        self._wake_scheduled = False
        if self._wake_ev is not None:
            self._wake_ev.set()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            self._loop = None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            try:
                self._life.to(SenderState.STOPPED)
            finally:
                self._ready.set()  # in case _main failed before setting it
                self._accounted.set()  # nor stop() wait for a count that never comes

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake_ev = asyncio.Event()
        self._kick = asyncio.Event()
        self._loop = loop
        if self.spool_dir is not None:
            try:
                self.spool = ClientSpool(self.spool_dir, self.spool_max_bytes)
            except OSError as exc:
                self._start_error = exc
                self._ready.set()
                return
            self.core.on_cut = self._spool_cut
            self.core.on_done = self._spool_done
        # Not if stop() came first: then the loop below never runs.
        self._life.move_if((SenderState.STARTING,), SenderState.RUNNING)
        self._ready.set()
        if self.spool is not None:
            try:
                self._adopt(self.spool)
            except Exception:
                log.exception("async-logging client: replaying the spool failed")
        inbox = self.inbox
        wake_at = inbox.wake_at
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            headers=self.headers,
        )
        pump = asyncio.create_task(self._pump(session), name="async-logging-pump")
        try:
            while self._life.state in _DRAINING:
                if len(inbox) < wake_at:
                    try:
                        async with asyncio.timeout(self.drain_interval):
                            await self._wake_ev.wait()
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0)  # let the pump write and the reader take acks
                self._wake_ev.clear()
                self._drain()
        except Exception:
            log.exception("async-logging sender failed")
        finally:
            # Count and report first: closing the connection may take seconds (a proxy
            # that does not answer the close), and stop() returns once this is done.
            try:
                self._abandon()
            finally:
                self._accounted.set()
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
                await session.close()

    def _drain(self) -> None:
        core = self.core
        items = self.inbox.take()
        if items:
            if self.error is not None:  # it gave up (and may be stopping since)
                self.lost += sum(1 for it in items if not isinstance(it, FlushRequest))
                for it in items:
                    if isinstance(it, FlushRequest):
                        it.finish(False)
            else:
                for marker in core.feed(items, self.clock()):
                    if isinstance(marker, FlushRequest):
                        self._flushes.append((core.flush_all(), marker))
        now = self.clock()
        core.tick(now)
        self._set_room()
        self._watch_drops()
        if core.has_unsent and self._kick is not None:
            self._kick.set()
        if self._flushes:
            self._check_flushes()
        if self.spool is not None and now - self._checkpoint_at >= CHECKPOINT_INTERVAL:
            self._checkpoint_at = now
            self._checkpoint(self.spool)

    def _set_room(self) -> None:
        self.inbox.set_room(0 if self.error is not None else self.core.room())

    def _watch_drops(self) -> None:
        dropped = self.inbox.dropped
        reports = self.reports
        if dropped != self._seen_drops:
            r = reports.hit("drops", dropped - self._seen_drops)
            self._seen_drops = dropped
            if r is not None:
                head = (
                    "dropping new events"
                    if self.error is not None
                    else f"queue full ({self.core.pending_events + len(self.inbox)} events, "
                    f"~{self.core.pending_bytes} bytes pending); dropping new events until it "
                    "drains"
                )
                log.warning(
                    "async-logging client: %s: %s%s", head, self._why(), r.note("more dropped")
                )
        elif (quiet := reports.quiet_for("drops")) is not None and quiet >= BURST_QUIET:
            r = reports.end("drops")
            assert r is not None
            log.info(
                "async-logging client: stopped dropping; %d events dropped in that burst",
                r.count,
            )

    def _why(self) -> str:
        """Why events are not acknowledged now, for a log line."""
        url = safe_url(self.url)
        if self.error is not None:
            return f"the client gave up on {url}: {self._refusal(self.error)}"
        if self._paused is not None:
            return f"the proxy at {url} refuses frames for now ({self._paused.detail})"
        if self.connected:
            return f"connected to {url}, but the proxy has not acknowledged them"
        if self.last_error is not None:
            return f"the proxy at {url} is unreachable ({describe(self.last_error)})"
        return f"not connected to {url} yet"

    def _check_flushes(self) -> None:
        core = self.core
        keep = []
        done = []
        for target, req in self._flushes:
            if core.settled(target, spooled=req.spooled):
                done.append(req)
            else:
                keep.append((target, req))
        self._flushes = keep
        if done and self.spool is not None:
            # Once flush() returns, a restart does not resend what it saw acknowledged.
            self._checkpoint(self.spool)
        for req in done:
            req.finish(True)

    def _abandon(self) -> None:
        """Stop taking events; spool or count as lost what is unacknowledged; say so once."""
        # Nobody takes from the inbox after this: close it, so later items are counted
        # as dropped instead of waiting forever.
        self.inbox.close()
        items = self.inbox.take()
        lost = 0
        for it in items:
            if isinstance(it, FlushRequest):
                it.finish(False)
            elif self.spool is None:
                lost += 1
        for _, req in self._flushes:
            req.finish(False)
        self._flushes = []
        spool = self.spool
        kept = 0
        if spool is not None:
            try:
                # What the application enqueued last goes to the spool too, held trees
                # included (cut now, as they are).
                self.core.feed([it for it in items if not isinstance(it, FlushRequest)], 0.0)
            except Exception:  # never lose the rest over one bad item
                log.exception("async-logging client: cannot take the last events")
        lost_core, kept = self._drop_core()
        lost += lost_core
        self.lost += lost
        self.lost_at_close, self.kept_at_close = lost, kept
        if spool is not None:
            self.spool = None
            try:
                spool.close()
            except OSError as exc:
                log.warning("async-logging client: closing the spool %s: %r", spool.dir, exc)
        if not (lost or kept):
            return
        if spool is None:
            fate = "they are lost"
        else:
            fate = (
                f"{kept} kept in the spool {spool.dir} for the next start (not lost), {lost} lost"
            )
        log.warning(
            "async-logging client: %d events not acknowledged %s: %s; %s",
            lost + kept,
            self._occasion,
            self._why(),
            fate,
        )

    def _drop_core(self) -> tuple[int, int]:
        """Abandon the core's events; return how many are lost and how many stay spooled."""
        core = self.core
        kept = 0
        if self.spool is not None:
            core.flush_all()  # cuts (and so spools) the held trees and the outbox
            kept = sum(env.count for env in core.envelopes() if env.spooled_at)
        return core.abandon() - kept, kept

    # ------------------------------------------------------------------ spool

    def _spool_cut(self, env: Envelope) -> None:
        """The core cut ``env``: append it to the spool before the pump can send it."""
        spool = self.spool
        if spool is None:
            return
        error: OSError | None = None
        try:
            pos = spool.append(env.payload, env.count)
        except OSError as exc:
            pos, error = 0, exc
        if pos:
            env.spooled_at = pos
            self.spooled += env.count
            over = self.reports.end("spool")
            if over is not None:
                log.info(
                    "async-logging client: spooling again; %d events were not spooled",
                    over.count,
                )
            return
        self.spool_dropped += env.count
        r = self.reports.hit("spool", env.count)
        if r is not None:
            log.warning(
                "async-logging client: %s; new envelopes are kept in memory only (a restart "
                "loses them) until the proxy acknowledges what is spooled%s",
                f"cannot write to the spool {spool.dir}: {error!r}"
                if error is not None
                else f"the spool {spool.dir} is full ({spool.pending_bytes} bytes not "
                f"acknowledged, spool_max_bytes={spool.max_bytes})",
                r.note("more events not spooled"),
            )

    def _spool_done(self, env: Envelope) -> None:
        if env.spooled_at and self.spool is not None:
            self.spool.done(env.spooled_at)

    def _checkpoint(self, spool: ClientSpool) -> None:
        try:
            spool.checkpoint()
        except OSError as exc:
            r = self.reports.hit("checkpoint")
            if r is not None:
                log.warning(
                    "async-logging client: cannot checkpoint the spool %s: %r%s",
                    spool.dir,
                    exc,
                    r.note("more failures"),
                )
        else:
            self.reports.end("checkpoint")

    def _adopt(self, spool: ClientSpool) -> None:
        """Take over what closed or dead clients left in the spool directory, to resend it."""
        core = self.core
        for orphan in spool.orphans():
            events = 0
            taken = orphan.checkpointed
            complete = True
            failed = False
            try:
                for payload, count, position in orphan.records():
                    # Our copy is written before the orphan forgets it: a crash in between
                    # replays it twice, never zero times. An empty spool takes any size.
                    pos = 0
                    if core.room() > 0:
                        pos = spool.append(payload, count, force=spool.pending_bytes == 0)
                    if not pos:
                        complete = False
                        break
                    try:
                        core.restore(payload, count, pos)
                    except Exception:  # passed its CRC yet is no envelope: skip it
                        spool.done(pos)
                        orphan.torn += 1
                    else:
                        events += count
                    taken = position
                if complete:
                    orphan.remove()
                else:
                    orphan.save(taken)
                    orphan.release()
            except OSError as exc:
                log.warning(
                    "async-logging client: cannot take over the spool %s: %r", orphan.dir, exc
                )
                complete = False
                failed = True
                with contextlib.suppress(OSError):
                    orphan.save(taken)
                orphan.release()
            self.replayed += events
            if events or orphan.torn:
                log.info(
                    "async-logging client: resending %d events from %s%s",
                    events,
                    orphan.dir,
                    f" ({orphan.torn} damaged records skipped)" if orphan.torn else "",
                )
            if not complete:
                if not failed:
                    log.warning(
                        "async-logging client: the spool or the queue is full; what is left "
                        "in the spool directories of earlier clients waits for a later start"
                    )
                break

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._life.move_if((SenderState.RUNNING,), SenderState.FAILED)
        log.error(
            "async-logging client: giving up on %s: %s; events are dropped from now on",
            safe_url(self.url),
            self._refusal(exc),
        )
        self.lost += self._drop_core()[0]
        for _, req in self._flushes:
            req.finish(False)
        self._flushes = []
        self._set_room()

    def _refusal(self, exc: BaseException) -> str:
        """Why ``exc`` made the client give up, for a log line (never the token itself)."""
        status = getattr(exc, "status", None)
        if status == 401:
            if "Authorization" in self.headers:
                return (
                    "the proxy refused the token (HTTP 401): check token= or $ASYNC_LOGGING_TOKEN"
                )
            return (
                "the proxy requires a token (HTTP 401) and none was given "
                "(token= or $ASYNC_LOGGING_TOKEN)"
            )
        if status in FORBIDDEN_STATUSES:
            return f"the proxy forbids this client (HTTP {status}: its token or its origin)"
        return f"a non-retryable error ({describe(exc)})"

    def _unreachable(self, exc: BaseException) -> None:
        """A connection attempt failed, or broke before the proxy answered anything."""
        self.last_error = exc
        r = self.reports.hit("unreachable")
        if r is not None:
            log.warning(
                "async-logging client: cannot reach the proxy at %s (%s); retrying with "
                "backoff, %d events wait%s",
                safe_url(self.url),
                describe(exc),
                self.pending_events(),
                r.note("more failed attempts"),
            )

    # ------------------------------------------------------------------ pump

    async def _pump(self, session: aiohttp.ClientSession) -> None:
        delays: Iterator[float] | None = None
        first = True
        while True:
            conn: Connection | None = None
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await self.transport.connect(session, self.url, self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.is_retryable(exc):
                    self._fail(exc)
                    return
                self._unreachable(exc)
            else:
                self.connects += 1
                if not first:
                    self.reconnects += 1
                first = False
                self.connected = True
                self._answered = False
                try:
                    await self._send_all(conn)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = exc
                    if not self.is_retryable(exc):
                        await conn.close()
                        self._fail(exc)
                        return
                    if not self._answered:  # (HTTP "connects" without the network)
                        self._unreachable(exc)
                    elif (r := self.reports.hit("lost")) is not None:
                        log.info(
                            "async-logging client: connection to %s lost (%s); reconnecting, "
                            "unacknowledged envelopes will be resent%s",
                            safe_url(self.url),
                            describe(exc),
                            r.note("more lost connections"),
                        )
                finally:
                    self.connected = False
                    await asyncio.shield(conn.close())
                    resent = self.core.connection_lost()
                    if resent:
                        log.debug("async-logging: %d envelopes to resend", resent)
            if delays is None or self._progress:
                delays = self.backoff()
                self._progress = False
            await asyncio.sleep(next(delays))

    async def _send_all(self, conn: Connection) -> None:
        core = self.core
        kick = self._kick
        assert kick is not None
        self._paused = None
        while True:
            if conn.closed:
                raise ConnectionLost(str(getattr(conn, "error", None) or "closed"))
            if self._paused is not None:
                # The proxy cannot take frames now: reconnect after a backoff, resending.
                raise self._paused
            env = core.next_to_send()
            if env is None:
                kick.clear()
                await kick.wait()
                continue
            await conn.send(env.seq, env.payload)

    # ------------------------------------------------------------------ Listener

    def on_ack(self, seq: int, rejected: int) -> None:
        """The server accepted envelope ``seq``."""
        if self.core.ack(seq, rejected):
            self._progress = True
        self._after_answer()

    def on_refused(self, seq: int | None, reason: str, detail: str) -> None:
        """The server refused a frame as a whole."""
        reports = self.reports
        if reason in TRANSIENT_REFUSALS:
            # Not the frame's fault: keep it (it stays in flight, so the reconnection puts
            # it back in front) and back off.
            if (r := reports.hit("paused")) is not None:
                log.info(
                    "async-logging client: the proxy cannot take frames now (%s %s); they are "
                    "kept and resent after a backoff%s",
                    reason,
                    detail,
                    r.note("more refusals"),
                )
            self._paused = ServerRefused(503, reason)
        elif seq is None:
            if (r := reports.hit("refused-frame")) is not None:
                log.warning(
                    "async-logging client: the proxy refused a frame (%s %s)%s",
                    reason,
                    detail,
                    r.note("more frames refused"),
                )
        else:
            if (r := reports.hit("refused")) is not None:
                log.info(
                    "async-logging client: the proxy refused envelope %d (%s %s); it is split "
                    "until the bad event is found, which is counted in rejected%s",
                    seq,
                    reason,
                    detail,
                    r.note("more envelopes refused"),
                )
            self.core.refuse(seq)
        self._after_answer()

    def on_lost(self, exc: BaseException | None) -> None:
        """The connection broke: wake the pump so it reconnects."""
        if self._kick is not None:
            self._kick.set()

    def _after_answer(self) -> None:
        if not self._answered:
            self._answered = True
            over = self.reports.end("unreachable")
            if over is not None:
                log.info(
                    "async-logging client: reached the proxy at %s after %d failed attempts "
                    "in %.1f s",
                    safe_url(self.url),
                    over.count,
                    over.seconds,
                )
        if self._kick is not None:
            self._kick.set()
        if self._flushes:
            self._check_flushes()
        self._set_room()
