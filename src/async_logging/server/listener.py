"""LogListener: WebSocket and HTTP on the main port (docs/design.md §4), a thin aiohttp shell.

- WebSocket on any path, subprotocol ``log-protocol`` (or none). After the upgrade the
  server sends the text frame ``ready``. Binary frames are MessagePack, text frames JSON:
  one log map, an array, or an envelope ``{"seq", "logs"}`` answered ``{"ack": seq}`` once
  the buffer has taken it. A bad frame is answered ``{"error", "detail", "seq"}`` and the
  connection stays up; events refused inside a good frame are listed in the answer.
  Frames over ``max_message_bytes`` close the connection with 1009 (the peer broke the
  protocol); past ``conn_threshold`` connections the upgrade is refused with HTTP 503.
  Idle connections are closed after ``idle_timeout`` (1000, "idle"); pings keep NATs open.
- ``POST /log``: JSON, MessagePack, url-encoded or multipart forms (the original Node
  transport's ``logs[0][uuid]=…`` too). 200 ``{"accepted": n}``; 400 names what is wrong;
  413 over the size limit; 415 for an unknown content type.
- ``GET /ws``: the WebSocket URL clients should use (discovery for the
  websocket-otherwise-HTTP transport).

Every refusal is counted in :class:`~async_logging.server.pipeline.Stats` by reason.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from .. import wire
from ..exceptions import BadInput, ConfigError, DecodeError, LimitExceeded
from . import guard, spool
from .config import ServerConfig
from .lifecycle import Lifecycle
from .pipeline import Pipeline

__all__ = ["SUBPROTOCOL", "ListenerState", "LogListener"]

log = logging.getLogger("async_logging.server")

SUBPROTOCOL = "log-protocol"
READY = "ready"

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


class LogListener:
    """Accepts logs over WebSocket and HTTP and hands them to the pipeline.

    A custom listener implements the same three coroutines (``start``, ``stop_accepting``,
    ``close_connections``) and calls ``pipeline.accept(logs)``.
    """

    def __init__(self, pipeline: Pipeline, config: ServerConfig) -> None:
        self.pipeline = pipeline
        self.config = config
        self.stats = pipeline.stats
        self.limits = pipeline.wire_limits
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        # WebSockets taking a frame right now (set once its answer is sent): a drain lets
        # them answer before it closes them, so an accepted frame is never left unacked.
        self._busy: dict[web.WebSocketResponse, asyncio.Event] = {}
        # Loop time of each open WebSocket's last frame, for the idle watchdog.
        self._last_frame: dict[web.WebSocketResponse, float] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[bool]] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        # The slow-request guard's view of each open connection, by its transport.
        self._watched: dict[asyncio.BaseTransport, _Watched] = {}
        self.port: int = config.port
        self._lifecycle = Lifecycle("LogListener", _LISTENER_MOVES, ListenerState.NEW)
        self.frames_seen = 0

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
        middlewares = [self._guard_middleware] if self.config.request_timeout > 0 else []
        app = web.Application(
            client_max_size=self.config.max_message_bytes, middlewares=middlewares
        )
        app.router.add_post("/log", self.handle_post)
        app.router.add_get("/ws", self.handle_discovery)
        app.router.add_get("/{tail:.*}", self.handle_websocket)
        return app

    async def start(self, *, reuse_port: bool = False) -> int:
        """Listen on the configured host and port; returns the port actually bound.

        The listening socket is this listener's own ``asyncio.Server`` serving aiohttp's
        low-level server (the documented protocol factory of an :class:`web.AppRunner`),
        each connection seen by the slow-request guard when ``request_timeout`` is set.
        """
        self._lifecycle.to(ListenerState.STARTING)
        c = self.config
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guarded(server) if c.request_timeout > 0 else server,
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

    async def cleanup(self) -> None:
        """Release the HTTP machinery (after the pipeline is closed, or after a failed start)."""
        if self._lifecycle.state is ListenerState.STOPPED:
            return
        self._lifecycle.to(ListenerState.STOPPED)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        self.stats.connections += 1
        self.stats.connections_total += 1
        self._sockets.add(ws)
        self._last_frame[ws] = asyncio.get_running_loop().time()
        try:
            await ws.send_str(READY)
            await self._serve(ws)
        finally:
            self.stats.connections -= 1
            self._sockets.discard(ws)
            self._last_frame.pop(ws, None)
            if not ws.closed:
                await ws.close()
        return ws

    async def _serve(self, ws: web.WebSocketResponse) -> None:
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

    async def handle_post(self, request: web.Request) -> web.Response:
        """``POST /log``: one batch per request."""
        stats = self.stats
        stats.frames["http"] += 1
        ctype = request.content_type
        refusal = self._refuse(request, websocket=False)
        if refusal is not None:
            return refusal
        try:
            if request.content_length is not None and (
                request.content_length > self.config.max_message_bytes
            ):
                raise LimitExceeded(
                    "message_too_big",
                    f"body of {request.content_length} bytes is over the limit of "
                    f"{self.config.max_message_bytes}",
                )
            if ctype == "multipart/form-data":
                try:
                    form = await request.post()
                except web.HTTPRequestEntityTooLarge as exc:
                    raise LimitExceeded("message_too_big", "body is over the size limit") from exc
                except ValueError as exc:
                    raise DecodeError("bad_form", str(exc)) from exc
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                stats.bytes["http"] += sum(len(v) for v in fields.values())
                frame = wire.decode_multipart_fields(fields, self.limits)
            else:
                try:
                    body = await asyncio.wait_for(request.read(), self.config.request_timeout)
                except web.HTTPRequestEntityTooLarge as exc:
                    raise LimitExceeded("message_too_big", "body is over the size limit") from exc
                except TimeoutError as exc:
                    raise LimitExceeded(
                        "request_timeout",
                        f"the body did not arrive within {self.config.request_timeout} s",
                        status=408,
                    ) from exc
                stats.bytes["http"] += len(body)
                if wire.is_msgpack_type(ctype):
                    self.frames_seen += 1
                    seq, items, fed = await self.pipeline.accept_msgpack(body)
                    return _post_answer(seq, items, fed)
                frame = wire.decode_http_body(body, ctype, self.limits)
            self.frames_seen += 1
            raw = _spool_record(body if ctype != "multipart/form-data" else None, ctype, frame)
            fed = await self.pipeline.accept(frame.logs, raw)
        except BadInput as exc:
            stats.bad_input[exc.reason] += 1
            return _json_error(exc.status, exc.reason, exc.detail)
        return _post_answer(frame.seq, len(frame.logs), fed)

    # ------------------------------------------------------------------ slow-request guard

    def _guarded(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], _Watched]:
        """``factory`` (aiohttp's server) with each connection seen by the guard."""
        period = self.config.request_timeout

        def make() -> _Watched:
            return _Watched(factory(), self._watched, period, self._check_connection)

        return make

    @web.middleware  # new-style (request, handler): aiohttp 3 warns without the mark
    async def _guard_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tells the guard that a request's head arrived and when its handling ends."""
        transport = request.transport
        conn = self._watched.get(transport) if transport is not None else None
        if conn is None:  # pragma: no cover - every connection is watched
            return await handler(request)
        conn.watch.started()
        try:
            return await handler(request)
        finally:
            conn.watch.finished()

    def _check_connection(self, conn: _Watched) -> None:
        """End of a ``request_timeout`` period of one connection: close it when it idled."""
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if conn.watch.expired():
            self.stats.connections_refused["request_timeout"] += 1
            transport.close()
            return
        conn.rearm()

    def _refuse(self, request: web.Request, *, websocket: bool) -> web.Response | None:
        """The 401/403 answer when the request may not send logs (counted and logged)."""
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
    """aiohttp's protocol for one connection, with the slow-request guard watching it.

    The transport calls this object; data and end-of-file go straight to aiohttp's protocol
    (bound methods taken once, no extra call per read), the rest is passed on here. While
    the connection is open it is in ``registry`` under its transport (where the guard's
    middleware finds it), and ``check(self)`` runs every ``period`` seconds.
    """

    def __init__(
        self,
        inner: asyncio.Protocol,
        registry: dict[asyncio.BaseTransport, _Watched],
        period: float,
        check: Callable[[_Watched], None],
    ) -> None:
        self._inner = inner
        self._registry = registry
        self._period = period
        self._check = check
        self.data_received: Callable[[bytes], None] = inner.data_received
        self.eof_received: Callable[[], bool | None] = inner.eof_received
        self.watch = guard.RequestWatch()
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def rearm(self) -> None:
        """Run the check again one period from now."""
        self._timer = asyncio.get_running_loop().call_later(self._period, self._check, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._registry[transport] = self
        self.rearm()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self._registry.pop(self.transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


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
