"""LogListener: WebSocket and HTTP on the main port (docs/design.md §4), a thin aiohttp shell.

- WebSocket on any path, subprotocol ``log-protocol`` (or none). After the upgrade the
  server sends the text frame ``ready``. Binary frames are MessagePack, text frames JSON:
  one log map, an array, or an envelope ``{"seq", "logs"}`` answered ``{"ack": seq}`` once
  the buffer has taken it. A bad frame is answered ``{"error", "detail", "seq"}`` and the
  connection stays up; events refused inside a good frame are listed in the answer.
  Frames over ``max_message_bytes`` close the connection with 1009 (the peer broke the
  protocol), and so does an unmasked frame, with 1002 (RFC 6455 §5.1: aiohttp's reader does
  not check the mask bit, so :class:`_FrameGate` reads each frame's head first); past
  ``conn_threshold`` connections the upgrade is refused with HTTP 503. Idle connections
  are closed after ``idle_timeout`` (1000, "idle"); pings keep NATs open.
- ``POST /log``: JSON, MessagePack, url-encoded or multipart forms (the original Node
  transport's ``logs[0][uuid]=…`` too). 200 ``{"accepted": n}``; 400 names what is wrong;
  408 when the body (a form's too) is not in within ``request_timeout``; 413 over the size
  limit; 415 for an unknown content type; 503 past ``max_inflight_bytes`` or on a
  connection opened past ``max_http_connections``.
- ``GET /ws``: the WebSocket URL clients should use (discovery for the
  websocket-otherwise-HTTP transport).

No slow or big request starves the rest: every connection is seen by the guard (a request
head, a body and a WebSocket frame must each arrive within ``request_timeout``), the bytes
of bodies and frames held at once are bounded across connections (``max_inflight_bytes``,
:class:`~async_logging.server.guard.InflightBudget`), HTTP connections are bounded like
WebSockets, and failed accepts (out of file descriptors) are logged at most once per
:data:`ACCEPT_ERROR_LOG_INTERVAL`, counted.

Every refusal is counted in :class:`~async_logging.server.pipeline.Stats` by reason.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import enum
import functools
import logging
import ssl
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import ContentEncodingError

from .. import wire
from ..exceptions import BadInput, ConfigError, DecodeError, LimitExceeded
from . import guard, spool
from .config import ServerConfig
from .lifecycle import Lifecycle
from .otlp import OtlpIngest, answer_kind, check_headers

if TYPE_CHECKING:
    from ..buffer import Fed
    from .pipeline import Stats
    from .spool import Spool

__all__ = [
    "BAD_INPUT_REASONS",
    "REFUSAL_REASONS",
    "SUBPROTOCOL",
    "TRANSPORTS",
    "Ingest",
    "ListenerState",
    "LogListener",
]

log = logging.getLogger("async_logging.server")

SUBPROTOCOL = "log-protocol"
READY = "ready"
#: Seconds between two log lines about failed accepts (e.g. out of file descriptors); the
#: lines held back between are counted in the next one, and every failure in
#: ``async_logging_accept_errors_total``.
ACCEPT_ERROR_LOG_INTERVAL = 10.0
#: Seconds aiohttp keeps reading (and dropping) a body it answered before reading it all
#: (408, 413, 503), so the client sees the answer rather than a reset; at most
#: ``request_timeout``. The connection is closed after.
REFUSED_BODY_LINGER = 2.0
#: Refusals answered before the body was read whole: the connection takes no next request.
_UNREAD_BODY = frozenset(
    {"inflight_full", "message_too_big", "request_timeout", "bad_gzip", "bad_body"}
)
#: The same for OTLP: refused on its headers.
_OTLP_UNREAD_BODY = frozenset({"unsupported_media_type", "unsupported_encoding"})
#: The transports ``frames_received`` and ``bytes_received`` count by.
TRANSPORTS: Final = ("ws", "http", "otlp")
#: What the listener itself counts in ``bad_input`` (beside the decoder's, the mapper's
#: and the spool's reasons, which it counts as they are raised): a body over the size,
#: unreadable, not inflating, malformed (a broken chunked encoding) or too slow, a frame
#: that does not fit in flight, one the client did not mask, a broken WebSocket.
BAD_INPUT_REASONS: Final = (
    "message_too_big",
    "bad_form",
    "bad_gzip",
    "bad_body",
    "request_timeout",
    "inflight_full",
    "unmasked_frame",
    "protocol_error",
)
#: Why connections are refused or closed (``connections_refused{reason}``), beside the
#: token and origin checks' (:data:`~async_logging.server.guard.ACCESS_REASONS`).
REFUSAL_REASONS: Final = (
    "draining",
    "conn_threshold",
    "max_http_connections",
    "request_timeout",
    "idle",
    "shutting_down",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ListenerState(enum.Enum):
    """Where a :class:`LogListener` is in its life."""

    NEW = "new"
    STARTING = "starting"  # building the app, binding the port
    LISTENING = "listening"
    DRAINING = "draining"  # no new connections; open ones being closed
    STOPPED = "stopped"  # released (also after a failed start)


_LISTENER_MOVES = {
    ListenerState.NEW: frozenset({ListenerState.STARTING, ListenerState.STOPPED}),
    ListenerState.STARTING: frozenset({ListenerState.LISTENING, ListenerState.STOPPED}),
    ListenerState.LISTENING: frozenset({ListenerState.DRAINING, ListenerState.STOPPED}),
    ListenerState.DRAINING: frozenset({ListenerState.STOPPED}),
}


class Ingest(Protocol):
    """Where the listener hands accepted batches: the :class:`Pipeline`, which reassembles
    them here, or a bus publisher (``serve --bus``:
    :class:`~async_logging.bus.ingest.BusIngest`), which acks once the bus stored them."""

    stats: Stats
    wire_limits: wire.WireLimits
    spool: Spool | None

    @property
    def closed(self) -> bool: ...

    async def accept(self, logs: list[Any], raw: tuple[int, bytes] | None = None) -> Fed: ...

    async def accept_msgpack(self, payload: bytes) -> tuple[int | None, int, Fed]: ...


class LogListener:
    """Accepts logs over WebSocket and HTTP and hands them to the pipeline.

    A custom listener implements the same three coroutines (``start``, ``stop_accepting``,
    ``close_connections``) and calls ``pipeline.accept(logs)``.
    """

    def __init__(self, pipeline: Ingest, config: ServerConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.stats = pipeline.stats
        self.limits = pipeline.wire_limits
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        # WebSockets taking a frame right now (set once its answer is sent): a drain lets
        # them answer before it closes them, so an accepted frame is never left unacked.
        self._busy: dict[web.WebSocketResponse, asyncio.Event] = {}
        # POST /log requests being answered, and the event set when there are none: a drain
        # waits for them before the pipeline closes (a batch fed is answered 200).
        self._posts = 0
        self._no_posts = asyncio.Event()
        self._no_posts.set()
        # Loop time of each open WebSocket's last frame, for the idle watchdog.
        self._last_frame: dict[web.WebSocketResponse, float] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[bool]] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        # The guard's view of each open connection, by its transport.
        self._watched: dict[asyncio.BaseTransport, _Watched] = {}
        self.budget = guard.InflightBudget(config.max_inflight_bytes)
        self._accept_log = guard.LogThrottle(ACCEPT_ERROR_LOG_INTERVAL)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outer_handler: Any = None  # the loop's exception handler before start()
        self.port: int = config.port
        self._lifecycle = Lifecycle("LogListener", _LISTENER_MOVES, ListenerState.NEW)
        self.frames_seen = 0
        #: The OTLP/HTTP routes (``POST /v1/traces``, ``POST /v1/logs``): docs/design.md §12.
        # OtlpIngest takes any Ingest (it uses accept, spool, closed, stats, wire_limits).
        self.otlp = OtlpIngest(pipeline, config.otlp_settle)

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> ListenerState:
        """Where the listener is in its life (see :class:`ListenerState`)."""
        return self._lifecycle.state

    @property
    def draining(self) -> bool:
        """Whether it stopped taking connections (draining or stopped)."""
        return self._lifecycle.state in (ListenerState.DRAINING, ListenerState.STOPPED)

    def make_app(self) -> web.Application:
        """The aiohttp application (exposed for embedding and tests)."""
        app = web.Application(
            client_max_size=self.config.max_message_bytes, middlewares=[self._guard_middleware]
        )
        app.router.add_post("/log", self.handle_post)
        app.router.add_post("/v1/traces", self.handle_otlp_traces)
        app.router.add_post("/v1/logs", self.handle_otlp_logs)
        app.router.add_get("/ws", self.handle_discovery)
        app.router.add_get("/{tail:.*}", self.handle_websocket)
        return app

    async def start(self, *, reuse_port: bool = False) -> int:
        """Listen on the configured host and port; returns the port actually bound.

        The listening socket is this listener's own ``asyncio.Server`` serving aiohttp's
        low-level server (an :class:`web.AppRunner`'s), each connection's protocol an
        aiohttp :class:`web.RequestHandler` whose WebSocket reader is fronted by a
        :class:`_FrameGate`, seen by the guard (:class:`_Watched`). Failed accepts are
        logged through a throttle installed on the loop until :meth:`cleanup`.
        """
        self._lifecycle.to(ListenerState.STARTING)
        c = self.config
        options = self._handler_options()
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, **options)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._outer_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        self._server = await loop.create_server(
            self._protocols(server, options),
            c.host,
            c.port,
            ssl=_ssl_context(c),
            reuse_port=reuse_port or None,
            backlog=max(128, min(c.conn_threshold, 4096)),
        )
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]
        if c.idle_timeout > 0:
            self._watchdog = asyncio.create_task(self._close_idle(), name="idle-watchdog")
        self._lifecycle.to(ListenerState.LISTENING)
        return self.port

    async def _close_idle(self) -> None:
        """Close WebSockets that sent no frame for ``idle_timeout`` seconds (1000, "idle").

        One watchdog for every connection, waking every quarter of the timeout (30 s at
        most): a connection is closed between ``idle_timeout`` and 1.25 times it (or 30 s
        past it) after its last frame. (aiohttp's own receive timeout would arm and cancel
        a timer for every frame received.)
        """
        timeout = self.config.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(timeout / 4, 30.0))
            now = loop.time()
            for ws, last in list(self._last_frame.items()):
                if now - last >= timeout and not ws.closed:
                    del self._last_frame[ws]
                    self.stats.connections_refused["idle"] += 1
                    task = asyncio.ensure_future(ws.close(code=WSCloseCode.OK, message=b"idle"))
                    self._closing.add(task)  # held until done (the loop keeps weak refs)
                    task.add_done_callback(self._closing.discard)

    async def stop_accepting(self) -> None:
        """Stop taking new connections (the listening socket closes; others may hold the port)."""
        if self.draining:
            return
        self._lifecycle.to(ListenerState.DRAINING)
        if self._server is not None:
            self._server.close()

    async def close_connections(self, timeout: float = 5.0) -> None:
        """Close every WebSocket with 1001 (going away) so clients reconnect elsewhere.

        A connection taking a frame is closed once it has answered it: a frame taken is
        acked, and a frame not taken (read after the drain began) is not, so the client
        sends it again elsewhere and nothing is published twice.
        """
        sockets = list(self._sockets)
        answering = [self._busy[ws] for ws in sockets if ws in self._busy]
        if self._posts:
            answering.append(self._no_posts)
        if answering:
            await asyncio.wait(
                [asyncio.ensure_future(done.wait()) for done in answering], timeout=timeout
            )
        if sockets:
            await asyncio.wait(
                [
                    asyncio.ensure_future(
                        ws.close(code=WSCloseCode.GOING_AWAY, message=b"server going away")
                    )
                    for ws in sockets
                ],
                timeout=timeout,
            )

    async def release_held(self) -> None:
        """Feed what the OTLP settle holds (before the pipeline publishes everything at a
        drain, so that those trees come out complete)."""
        await self.otlp.release_all()

    async def cleanup(self) -> None:
        """Release the HTTP machinery (after the pipeline is closed, or after a failed start)."""
        if self._lifecycle.state is ListenerState.STOPPED:
            return
        self._lifecycle.to(ListenerState.STOPPED)
        self.otlp.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        loop, self._loop = self._loop, None
        if loop is not None and loop.get_exception_handler() == self._loop_error:
            loop.set_exception_handler(self._outer_handler)

    # ------------------------------------------------------------------ WebSocket

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        """Upgrade to a log WebSocket (any path)."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _json_error(404, "not_found", "use a WebSocket upgrade, POST /log or GET /ws")
        if self.draining:
            self.stats.connections_refused["draining"] += 1
            return _json_error(503, "draining", "this server is shutting down; reconnect")
        refusal = self._refuse(request, websocket=True)
        if refusal is not None:
            return refusal
        if self.stats.connections >= self.config.conn_threshold:
            self.stats.connections_refused["conn_threshold"] += 1
            return _json_error(
                503,
                "too_many_connections",
                f"the server holds its limit of {self.config.conn_threshold} connections",
            )
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=self.config.max_message_bytes,
            heartbeat=self.config.ping_interval or None,
            decode_text=False,
        )
        await ws.prepare(request)
        transport = request.transport
        conn = self._watched.get(transport) if transport is not None else None
        self.stats.connections += 1
        self.stats.connections_total += 1
        self._sockets.add(ws)
        self._last_frame[ws] = asyncio.get_running_loop().time()
        try:
            await ws.send_str(READY)
            await self._serve(ws, conn)
        finally:
            self.stats.connections -= 1
            self._sockets.discard(ws)
            self._last_frame.pop(ws, None)
            if not ws.closed:
                await ws.close()
        return ws

    async def _serve(self, ws: web.WebSocketResponse, conn: _Watched | None) -> None:
        rate = self.config.rate_limit
        loop = asyncio.get_running_loop()
        bucket = guard.TokenBucket(rate, now=loop.time()) if rate > 0 else None
        last_frame = self._last_frame
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.BINARY or kind is WSMsgType.TEXT:
                if self.draining:
                    # Read after the drain began: not taken, so not acked; the client sends
                    # it again to another server once this one closes (1001).
                    return
                if ws in last_frame:
                    last_frame[ws] = loop.time()
                answered = self._busy[ws] = asyncio.Event()
                try:
                    spent = await self._take(ws, msg.data, kind is WSMsgType.TEXT)
                finally:
                    del self._busy[ws]
                    answered.set()
                    if conn is not None and conn.held:  # fed and answered: give back
                        self._release(conn.held.popleft())
                        if conn.closing is not None and not conn.held:
                            conn.abort()  # the frames before the refused one are answered
                if bucket is not None:
                    wait = bucket.take(spent, loop.time())
                    if wait > 0:  # too fast: stop reading this connection for a while
                        self.stats.rate_limited += 1
                        await asyncio.sleep(wait)
            elif kind is WSMsgType.ERROR:
                error = ws.exception()
                reason = "message_too_big" if _too_big(error) else "protocol_error"
                self.stats.bad_input[reason] += 1
                log.info("websocket closed on %s: %s", reason, error)
                return
            else:  # CLOSE, CLOSING, CLOSED
                return

    async def _take(self, ws: web.WebSocketResponse, data: Any, is_text: bool) -> int:
        """Feed one frame to the pipeline and answer it; returns what it costs the rate
        limit (its events, at least 1)."""
        stats = self.stats
        stats.frames["ws"] += 1
        stats.bytes["ws"] += len(data)
        self.frames_seen += 1
        seq: int | None = None
        try:
            if is_text:
                frame = wire.decode_json(data, self.limits)
                seq = frame.seq
                spent = max(1, len(frame.logs))
                fed = await self.pipeline.accept(frame.logs, (spool.JSON, data))
            else:
                seq, items, fed = await self.pipeline.accept_msgpack(data)
                spent = max(1, items)
        except BadInput as exc:
            spent = 1  # a refused frame costs as much as one event: no free flooding
            stats.bad_input[exc.reason] += 1
            if seq is None:
                seq = wire.peek_seq(data, is_text)
            await ws.send_str(wire.encode_error(exc, seq))
        else:
            if fed.rejected:
                await ws.send_str(_rejected_answer(seq, fed))
            elif seq is not None:
                await ws.send_str(wire.encode_ack(seq))
        return spent

    # ------------------------------------------------------------------ HTTP

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        """``POST /log``: one batch per request.

        While the server drains, a request is answered 503 ``shutting_down`` and its
        connection closed, untaken: the client sends it again, to another worker or after
        the restart. A request taken before is answered before the pipeline closes.
        """
        return await self._answer(request, self._handle_post, _json_error)

    async def _answer(
        self,
        request: web.Request,
        handle: Handler,
        error: Callable[[int, str, str], web.Response],
    ) -> web.StreamResponse:
        """``handle(request)``, counted as a request being answered (a drain waits for
        it); while draining, ``error(503, "shutting_down", …)`` with the connection
        closed, untaken (POST /log and the OTLP routes)."""
        if self.draining:
            self.stats.connections_refused["shutting_down"] += 1
            response = error(503, "shutting_down", "the server is shutting down; send it again")
            response.force_close()
            return response
        self._posts += 1
        self._no_posts.clear()
        try:
            return await handle(request)
        finally:
            self._posts -= 1
            if not self._posts:
                self._no_posts.set()

    async def _handle_post(self, request: web.Request) -> web.Response:
        stats = self.stats
        stats.frames["http"] += 1
        ctype = request.content_type
        refusal = self._refuse(request, websocket=False)
        if refusal is not None:
            return refusal
        hold = _Hold(self)
        try:
            body, fields = await self._read_post(request, ctype, hold)
            if fields is not None:
                stats.bytes["http"] += sum(len(v) for v in fields.values())
                frame = wire.decode_multipart_fields(fields, self.limits)
            else:
                stats.bytes["http"] += len(body)
                if wire.is_msgpack_type(ctype):
                    self.frames_seen += 1
                    seq, items, fed = await self.pipeline.accept_msgpack(body)
                    return _post_answer(seq, items, fed)
                frame = wire.decode_http_body(body, ctype, self.limits)
            self.frames_seen += 1
            raw = _spool_record(body if fields is None else None, ctype, frame)
            fed = await self.pipeline.accept(frame.logs, raw)
        except BadInput as exc:
            stats.bad_input[exc.reason] += 1
            response = _json_error(exc.status, exc.reason, exc.detail)
            if exc.reason in _UNREAD_BODY:
                response.force_close()  # the rest of the body is not read: no next request
            return response
        finally:
            hold.release()  # the batch is fed (or refused): its bytes are not held any more
        return _post_answer(frame.seq, len(frame.logs), fed)

    async def handle_otlp_traces(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/traces``: OTLP/HTTP spans (:mod:`.otlp`); while draining, 503 as
        ``POST /log`` (which an OTLP client retries)."""
        return await self._answer(
            request,
            functools.partial(self._handle_otlp, signal="traces"),
            self._otlp_error(request),
        )

    async def handle_otlp_logs(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/logs``: OTLP/HTTP log records (:mod:`.otlp`), as the traces route."""
        return await self._answer(
            request,
            functools.partial(self._handle_otlp, signal="logs"),
            self._otlp_error(request),
        )

    def _otlp_error(self, request: web.Request) -> Callable[[int, str, str], web.Response]:
        """An OTLP error answer (a ``Status`` in the request's encoding)."""
        kind = answer_kind(request.content_type)
        return lambda status, reason, detail: self.otlp.status_response(
            status, reason, detail, kind
        )

    async def _handle_otlp(self, request: web.Request, signal: str) -> web.Response:
        """One OTLP request, under the same guard, tokens, limits and counters as
        ``POST /log``; the answers are OTLP's (a ``Status`` body on errors)."""
        stats = self.stats
        stats.frames["otlp"] += 1
        # Answers are in the request's encoding; protobuf when it names none we take.
        kind = answer_kind(request.content_type)
        refusal = self._access_refusal(request, websocket=False)
        if refusal is not None:
            response = self.otlp.status_response(
                refusal.status, refusal.reason, refusal.detail, kind
            )
            if refusal.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="async-logging"'
            return response
        hold = _Hold(self)
        try:
            check_headers(request.content_type, request.headers.get("Content-Encoding", ""))
            body, _ = await self._read_post(request, kind, hold)
            stats.bytes["otlp"] += len(body)
            self.frames_seen += 1
            return await self.otlp.take(signal, kind, body)
        except BadInput as exc:
            stats.bad_input[exc.reason] += 1
            response = self.otlp.error(exc, kind)
            if exc.reason in _UNREAD_BODY or exc.reason in _OTLP_UNREAD_BODY:
                response.force_close()
            return response
        finally:
            hold.release()

    async def _read_post(
        self, request: web.Request, ctype: str, hold: _Hold
    ) -> tuple[bytes, dict[str, str] | None]:
        """The body (or a multipart form's text fields), read whole within ``request_timeout``
        and held in the in-flight budget as its bytes arrive (a slow body, a form's
        included, holds only what it sent); a form is parsed once it is all there
        (:func:`_form_fields`).

        Raises:
            LimitExceeded: ``message_too_big`` (413), ``request_timeout`` (408, the body,
                a form's included, did not arrive in time), ``inflight_full`` (503).
            DecodeError: ``bad_form``, ``bad_gzip`` (a compressed body that does not
                inflate), ``bad_body`` (a broken chunked encoding).
        """
        c = self.config
        length = request.content_length
        if length is not None and length > c.max_message_bytes:
            raise LimitExceeded(
                "message_too_big",
                f"body of {length} bytes is over the limit of {c.max_message_bytes}",
            )
        try:
            async with asyncio.timeout(c.request_timeout or None):
                body = await self._read_body(request, hold)
                if ctype == "multipart/form-data":
                    return b"", _form_fields(body, request.headers.get("Content-Type", ""))
                return body, None
        except web.HTTPRequestEntityTooLarge as exc:
            raise LimitExceeded("message_too_big", "body is over the size limit") from exc
        except TimeoutError as exc:
            raise LimitExceeded(
                "request_timeout",
                f"the body did not arrive within {c.request_timeout} s",
                status=408,
            ) from exc
        except web.RequestPayloadError as exc:  # a body aiohttp could not read whole
            # Its stream holds the error: marked ended, aiohttp does not read on after the
            # answer (and log the error again as unhandled); the connection closes.
            request.content.feed_eof()
            if isinstance(exc.__cause__, ContentEncodingError):  # gzip or deflate
                raise DecodeError("bad_gzip", f"the body does not inflate: {exc}") from exc
            raise DecodeError("bad_body", f"the body is malformed: {exc}") from exc
        except ValueError as exc:  # a malformed multipart body
            raise DecodeError("bad_form", str(exc)) from exc

    async def _read_body(self, request: web.Request, hold: _Hold) -> bytes:
        """A body, held in the budget chunk by chunk as it arrives."""
        limit = self.config.max_message_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise LimitExceeded("message_too_big", f"body is over the limit of {limit} bytes")
            hold.take(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ in-flight budget

    def _reserve(self, n: int) -> bool:
        """Hold ``n`` bytes of a body or frame in the budget; False when they do not fit."""
        if not self.budget.take(n):
            return False
        self.stats.inflight_bytes = self.budget.held
        return True

    def _release(self, n: int) -> None:
        if n:
            self.budget.release(n)
            self.stats.inflight_bytes = self.budget.held

    def _admit_frame(self, conn: _Watched, head: guard.FrameHead) -> tuple[int, bytes] | None:
        """A client's frame head has arrived (its payload not yet read): None to take it,
        else the close code and reason ending the connection."""
        conn.last_fin = False
        if not head.masked:
            self.stats.bad_input["unmasked_frame"] += 1
            log.info("websocket closed: the client sent an unmasked frame (RFC 6455 §5.1)")
            return WSCloseCode.PROTOCOL_ERROR, b"unmasked frame"
        if head.opcode >= 8:  # control frames: 125 bytes at most
            return None
        conn.message_size += head.length
        # A message over max_message_bytes is aiohttp's to refuse (1009), as before.
        if conn.message_size <= self.config.max_message_bytes:
            if not self._reserve(head.length):
                self.stats.bad_input["inflight_full"] += 1
                log.info(
                    "websocket closed: a frame of %d bytes does not fit in max_inflight_bytes "
                    "(%d held)",
                    head.length,
                    self.budget.held,
                )
                return WSCloseCode.TRY_AGAIN_LATER, b"inflight_full"
            conn.message_held += head.length
        if head.fin:
            conn.held.append(conn.message_held)
            conn.message_held = conn.message_size = 0
            conn.last_fin = True
        return None

    # ------------------------------------------------------------------ accept errors

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's exception handler while listening: failed accepts (asyncio logs each
        with a traceback) are counted and logged at most once per interval; the rest goes
        to the handler that was there before."""
        if not _is_accept_error(context):
            if self._outer_handler is not None:
                self._outer_handler(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.stats.accept_errors += 1
        held = self._accept_log.allow(loop.time())
        if held is not None:
            log.error(
                "cannot accept a connection on the main port: %s%s",
                context.get("exception") or context.get("message"),
                f" ({held} more like it in the last {ACCEPT_ERROR_LOG_INTERVAL:g} s)"
                if held
                else "",
            )

    # ------------------------------------------------------------------ the guard

    def _handler_options(self) -> dict[str, Any]:
        """Keywords of aiohttp's protocol (:class:`web.RequestHandler`): no access log, and
        a refused body is read and dropped for :data:`REFUSED_BODY_LINGER` seconds at most
        (``request_timeout`` at most) before the connection closes."""
        timeout = self.config.request_timeout
        linger = min(REFUSED_BODY_LINGER, timeout) if timeout > 0 else REFUSED_BODY_LINGER
        return {"access_log": None, "lingering_time": linger}

    def _protocols(self, server: web.Server, options: dict[str, Any]) -> Callable[[], _Watched]:
        """The protocol factory of the listening socket: aiohttp's protocol for each
        connection (``options`` as given to the runner), seen by the guard."""
        loop = asyncio.get_running_loop()

        def make() -> _Watched:
            handler = _Handler(server, loop=loop, **options)
            handler.conn = conn = _Watched(handler, self)
            return conn

        return make

    def _opened(self, conn: _Watched) -> None:
        """A connection was accepted: an HTTP connection until it is upgraded."""
        stats = self.stats
        stats.http_connections += 1
        conn.over_limit = stats.http_connections > self.config.max_http_connections

    def _upgraded(self, conn: _Watched) -> None:
        """The connection became a WebSocket: it counts toward ``conn_threshold`` now."""
        conn.upgraded = True
        conn.scan = guard.FrameScan()
        self.stats.http_connections -= 1

    def _closed(self, conn: _Watched) -> None:
        """A connection is gone: what it held in the budget is given back."""
        if not conn.upgraded:
            self.stats.http_connections -= 1
        self._release(conn.message_held + sum(conn.held))
        conn.message_held = 0
        conn.held.clear()

    @web.middleware  # new-style (request, handler): aiohttp 3 warns without the mark
    async def _guard_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuses requests on connections opened past ``max_http_connections``; tells the
        guard that a request's head arrived and when its handling ends."""
        transport = request.transport
        conn = self._watched.get(transport) if transport is not None else None
        if conn is None:  # pragma: no cover - every connection is watched
            return await handler(request)
        if conn.over_limit and request.headers.get("Upgrade", "").lower() != "websocket":
            # (an upgrade is counted against conn_threshold instead)
            self.stats.connections_refused["max_http_connections"] += 1
            response = _json_error(
                503,
                "too_many_connections",
                f"the server holds its limit of {self.config.max_http_connections} HTTP "
                "connections",
            )
            response.force_close()
            return response
        conn.watch.started()
        try:
            return await handler(request)
        finally:
            conn.watch.finished()

    def _check_connection(self, conn: _Watched) -> None:
        """End of a ``request_timeout`` period of one connection: close it when it idled,
        or when a WebSocket frame has been arriving for a whole period (1008)."""
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if conn.watch.expired():
            self.stats.connections_refused["request_timeout"] += 1
            transport.close()
            return
        if conn.scan is not None and conn.scan.stalled():
            self.stats.connections_refused["request_timeout"] += 1
            log.info("websocket closed: a frame did not arrive within request_timeout")
            conn.shut(WSCloseCode.POLICY_VIOLATION, b"request_timeout")
            return
        conn.rearm()

    def _access_refusal(self, request: web.Request, *, websocket: bool) -> guard.Refusal | None:
        """Why the request may not send logs (counted and logged), or None."""
        c = self.config
        if not c.tokens and not c.allowed_origins:
            return None
        refusal = guard.check_access(
            request.headers, request.query, c.tokens, c.allowed_origins, websocket=websocket
        )
        if refusal is None:
            return None
        self.stats.connections_refused[refusal.reason] += 1
        log.warning("refused %s from %s: %s", request.path, request.remote, refusal.detail)
        return refusal

    def _refuse(self, request: web.Request, *, websocket: bool) -> web.Response | None:
        """The 401/403 answer when the request may not send logs (counted and logged)."""
        refusal = self._access_refusal(request, websocket=websocket)
        if refusal is None:
            return None
        response = _json_error(refusal.status, refusal.reason, refusal.detail)
        if refusal.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="async-logging"'
        return response

    async def handle_discovery(self, request: web.Request) -> web.Response:
        """``GET /ws``: where to open the WebSocket (same host and port, path ``/``)."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.handle_websocket(request)  # type: ignore[return-value]
        scheme = "wss" if request.secure else "ws"
        url = f"{scheme}://{request.host}/"
        return web.Response(
            body=orjson.dumps({"url": url, "protocol": SUBPROTOCOL}),
            content_type="application/json",
        )


class _Watched(asyncio.BaseProtocol):
    """aiohttp's protocol for one connection, seen by the listener's guard.

    The transport calls this object; data and end-of-file go straight to aiohttp's protocol
    (bound methods taken once, no extra call per read), the rest is passed on here. While
    the connection is open it is in the listener's registry under its transport (where the
    guard's middleware finds it), counted as an HTTP connection until it is upgraded, and,
    with ``request_timeout`` set, checked every ``request_timeout`` seconds. As a WebSocket
    it keeps what its frames hold in the in-flight budget.
    """

    def __init__(self, inner: web.RequestHandler, listener: LogListener) -> None:
        self._inner = inner
        self._listener = listener
        self._period = listener.config.request_timeout
        self.data_received: Callable[[bytes], None] = inner.data_received
        self.eof_received: Callable[[], bool | None] = inner.eof_received
        self.watch = guard.RequestWatch()
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.over_limit = False  # opened past max_http_connections
        self.upgraded = False
        self.scan: guard.FrameScan | None = None  # the WebSocket's frame heads
        self.message_size = 0  # bytes of the WebSocket message arriving, so far
        self.message_held = 0  # of them, bytes held in the budget
        self.held: deque[int] = deque()  # bytes held by each whole message not yet taken
        self.closing: tuple[int, bytes] | None = None  # the close a WebSocket is shut with
        self.last_fin = False  # the last frame admitted ended a message (the last of held)

    def rearm(self) -> None:
        """Run the check again one period from now."""
        self._timer = asyncio.get_running_loop().call_later(
            self._period, self._listener._check_connection, self
        )

    def gate(self, parser: Any) -> _FrameGate:
        """aiohttp's WebSocket ``parser`` for this connection, behind a frame gate."""
        self._listener._upgraded(self)
        assert self.scan is not None
        return _FrameGate(parser, self.scan, self)

    def admit(self, head: guard.FrameHead) -> tuple[int, bytes] | None:
        """See :meth:`LogListener._admit_frame`."""
        return self._listener._admit_frame(self, head)

    def shut(self, code: int, reason: bytes) -> None:
        """End the WebSocket with a close frame (``code``, ``reason``): nothing more it
        sends is read; the whole messages read before are taken and answered first."""
        if self.closing is None:
            self.closing = (code, reason)
            if self.last_fin and self.scan is not None and self.scan.payload_left:
                # The message whose last frame is part-way in will never be read whole.
                self._listener._release(self.held.pop())
        if not self.held:
            self.abort()

    def abort(self) -> None:
        """Send the close frame of :meth:`shut` and close the connection, without waiting
        for the client's close."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.closing is None:
            return
        code, reason = self.closing
        payload = code.to_bytes(2, "big") + reason[:123]
        transport.write(bytes((0x88, len(payload))) + payload)  # type: ignore[attr-defined]
        transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._listener._watched[transport] = self
        self._listener._opened(self)
        if self._period > 0:
            self.rearm()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self._listener._watched.pop(self.transport, None)
        self._listener._closed(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Handler(web.RequestHandler):
    """aiohttp's protocol for one connection, whose WebSocket reader (the parser it is
    given on the upgrade) is put behind the connection's :class:`_FrameGate`."""

    __slots__ = ("conn",)
    conn: _Watched

    def set_parser(self, parser: Any, *args: Any, **kwargs: Any) -> None:
        gate: Any = self.conn.gate(parser)  # aiohttp types the parser as its own reader
        super().set_parser(gate, *args, **kwargs)


class _FrameGate:
    """Stands in front of aiohttp's WebSocket reader and reads each frame's head first.

    aiohttp's reader takes unmasked frames from a client, which RFC 6455 §5.1 forbids, and
    reads every frame a client sends, however many bytes are held at once. The gate sees
    the raw bytes before the reader (the bytes that came with the upgrade request too):
    a frame not masked (1002), or that does not fit in the in-flight budget (1013), closes
    the connection before the reader sees any of it.
    """

    __slots__ = ("_conn", "_inner", "_scan")

    def __init__(self, inner: Any, scan: guard.FrameScan, conn: _Watched) -> None:
        self._inner = inner
        self._scan = scan
        self._conn = conn

    def feed_data(self, data: bytes) -> Any:
        conn = self._conn
        if conn.closing is not None:
            return _NOTHING
        for head in self._scan.feed(bytes(data)):
            refusal = conn.admit(head)
            if refusal is not None:
                if head.offset:
                    self._inner.feed_data(data[: head.offset])  # the frames before it
                conn.shut(*refusal)
                return _NOTHING
        return self._inner.feed_data(data)

    def feed_eof(self) -> Any:
        return self._inner.feed_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


#: What a parser's ``feed_data`` returns when it wants nothing done: (eof, tail).
_NOTHING = (False, b"")


class _Hold:
    """The bytes one request holds in the listener's in-flight budget."""

    __slots__ = ("_listener", "bytes")

    def __init__(self, listener: LogListener) -> None:
        self._listener = listener
        self.bytes = 0

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes.

        Raises:
            LimitExceeded: ``inflight_full`` (503): they do not fit; nothing more is held.
        """
        listener = self._listener
        if not listener._reserve(n):
            budget = listener.budget
            raise LimitExceeded(
                "inflight_full",
                f"{budget.held} bytes of bodies and frames are held, {n} more would pass "
                f"max_inflight_bytes ({budget.limit}); try again",
                status=503,
            )
        self.bytes += n

    def release(self) -> None:
        self._listener._release(self.bytes)
        self.bytes = 0


def _is_accept_error(context: dict[str, Any]) -> bool:
    """Whether an event loop error is a failed accept of a connection, by asyncio's words:
    out of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM), another error raised by the accept
    callback, or a transport that could not be made for an accepted socket."""
    message = str(context.get("message", ""))
    return message.startswith(_ACCEPT_MESSAGES) or "._accept_connection" in message


_ACCEPT_MESSAGES = (
    "socket.accept() out of system resource",
    "Error on transport creation for incoming connection",
)


#: Refused events an answer lists (the first ones); ``rejected_count`` gives them all, so a
#: small frame of bad events never makes an answer many times its size.
MAX_REJECTIONS_LISTED = 100


def _post_answer(seq: int | None, items: int, fed: Any) -> web.Response:
    """The answer to a ``POST /log`` batch: 200 with the count accepted (and the refusals),
    400 when every event was refused."""
    accepted = items - len(fed.rejected)
    body_out: dict[str, Any] = {"accepted": accepted}
    if seq is not None:
        body_out["ack"] = seq
    if fed.rejected:
        body_out["rejected"] = _rejections(fed)
        body_out["rejected_count"] = len(fed.rejected)
        if accepted == 0:
            first = fed.rejected[0][1]
            body_out.update(error=first.reason, detail=first.detail)
            return web.Response(
                status=400, body=orjson.dumps(body_out), content_type="application/json"
            )
    return web.Response(body=orjson.dumps(body_out), content_type="application/json")


def _form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body (file parts left out; of a name
    sent twice, the last), each decoded by its charset (UTF-8 by default).

    The standard library's MIME parser reads the body the listener already holds, so a
    form is counted in the in-flight budget as its bytes arrive, like any other body.

    Raises:
        ValueError: the body is not a form, or a field is not text in its charset.
    """
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("a multipart/form-data body without parts (or without a boundary)")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        if part.get_content_disposition() != "form-data" or part.get_filename() is not None:
            continue
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        charset = part.get_content_charset() or "utf-8"
        try:
            fields[name] = payload.decode(charset) if isinstance(payload, bytes) else ""
        except (LookupError, UnicodeDecodeError) as exc:
            raise ValueError(f"field {name!r:.40} is not {charset} text") from exc
    return fields


def _spool_record(body: bytes | None, ctype: str, frame: wire.Frame) -> tuple[int, bytes]:
    """What the spool keeps of an HTTP batch: the body as sent, or the logs re-encoded."""
    if body is not None and ("msgpack" in ctype):
        return spool.MSGPACK, body
    if body is not None and "json" in ctype:
        return spool.JSON, body
    return spool.MSGPACK, msgspec.msgpack.encode({"seq": frame.seq, "logs": frame.logs})


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate or key: {exc}") from exc
    return ctx


def _rejections(fed: Any) -> list[dict[str, Any]]:
    """The first :data:`MAX_REJECTIONS_LISTED` refusals (the answer also says how many)."""
    return [
        {"index": i, "error": e.reason, "detail": e.detail}
        for i, e in fed.rejected[:MAX_REJECTIONS_LISTED]
    ]


def _rejected_answer(seq: int | None, fed: Any) -> str:
    """Answer to a frame some of whose events were refused (the rest were taken)."""
    body: dict[str, Any] = {"rejected": _rejections(fed), "rejected_count": len(fed.rejected)}
    if seq is not None:
        body["ack"] = seq
    body["seq"] = seq
    body["error"] = "invalid_events"
    return orjson.dumps(body).decode()


def _too_big(exc: BaseException | None) -> bool:
    code = getattr(exc, "code", None)
    return code == WSCloseCode.MESSAGE_TOO_BIG or "too big" in str(exc).lower()


def _json_error(status: int, reason: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": reason, "detail": detail}),
        content_type="application/json",
    )
