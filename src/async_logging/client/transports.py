"""Transports: how envelopes reach the proxy (docs/design.md §4), thin aiohttp shells.

A :class:`Transport` is configuration; :meth:`Transport.connect` opens a
:class:`Connection` that writes envelopes and reports the server's answers to a
:class:`Listener` (the sender). They run only in the sender thread's event loop.

- :class:`WebSocketTransport` (the default): subprotocol ``log-protocol``; waits for the
  server's ``ready`` text frame before writing; binary MessagePack envelopes; the server's
  ``{"ack": seq}`` answers arrive on the same socket, so many envelopes are in flight.
- :class:`HttpTransport`: ``POST /log`` with a MessagePack body, one envelope per request;
  the ``200`` answer is the acknowledgement.
- :class:`WebSocketOtherwiseHttpTransport`: asks ``GET /ws`` where the WebSocket is and
  uses it; when discovery or the upgrade fails it posts to ``/log`` for a while
  (``retry_websocket_after`` seconds), then tries the WebSocket again.

Retry policy (as ``websockets``' ``backoff()``): :func:`backoff` yields the delays between
reconnection attempts (exponential, capped, with jitter) and :func:`is_retryable` says
whether an error is worth another attempt; both can be replaced on the client.

Exceptions raised here (the sender catches them):

.. code-block:: text

    AsyncLoggingError
    └── TransportError        talking to the proxy failed (retryable)
        ├── ConnectionLost    the connection closed or broke
        └── ServerRefused     the proxy answered a connection or request with an error status
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import aiohttp
import orjson
from yarl import URL

from ..exceptions import AsyncLoggingError, UsageError
from .report import describe, safe_url

__all__ = [
    "FORBIDDEN_STATUSES",
    "SUBPROTOCOL",
    "TRANSIENT_REFUSALS",
    "Connection",
    "ConnectionLost",
    "HttpTransport",
    "Listener",
    "ServerRefused",
    "Transport",
    "TransportError",
    "WebSocketOtherwiseHttpTransport",
    "WebSocketTransport",
    "backoff",
    "http_url",
    "is_retryable",
    "resolve_transport",
    "ws_url",
]

log = logging.getLogger("async_logging.client")

#: The WebSocket subprotocol of the proxy (docs/design.md §4).
SUBPROTOCOL: Final = "log-protocol"
READY: Final = "ready"
MSGPACK: Final = "application/msgpack"
#: Statuses that say the client is not allowed (a wrong or missing token): retrying the
#: same request cannot help, so the client gives up on them (loudly).
FORBIDDEN_STATUSES: Final = frozenset({401, 403})
#: Error frames that refuse a frame for now, not for its content (the proxy's spool is
#: full, it is draining or overloaded): the frame is kept and resent after a backoff.
TRANSIENT_REFUSALS: Final = frozenset(
    {"spool_full", "draining", "overloaded", "too_many_connections", "rate_limited"}
)


class TransportError(AsyncLoggingError):
    """Talking to the proxy failed; the sender reconnects (see :func:`is_retryable`)."""


class ConnectionLost(TransportError):
    """The connection closed or broke; unacknowledged envelopes will be resent."""


class ServerRefused(TransportError):
    """The proxy answered a connection or request with an error status.

    Attributes:
        status: the HTTP status.
        detail: what the proxy said (its error code, or the start of its answer).
    """

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}" + (f": {detail}" if detail else ""))


class Listener(Protocol):
    """What a connection reports to (the sender)."""

    def on_ack(self, seq: int, rejected: int) -> None:
        """Envelope ``seq`` was accepted, ``rejected`` of its events refused."""

    def on_refused(self, seq: int | None, reason: str, detail: str) -> None:
        """The frame ``seq`` (``None``: unknown) was refused as a whole."""

    def on_lost(self, exc: BaseException | None) -> None:
        """The connection closed or broke."""


class Connection(ABC):
    """One open connection to the proxy."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether the connection can no longer write (the sender then reconnects)."""

    @abstractmethod
    async def send(self, seq: int, payload: bytes) -> None:
        """Write one encoded envelope.

        Raises:
            TransportError: the connection broke (the envelope will be resent).
        """

    @abstractmethod
    async def close(self) -> None:
        """Close the connection (idempotent, never raises)."""


class Transport(ABC):
    """How to reach the proxy; :meth:`connect` opens a :class:`Connection`."""

    name: str = "transport"

    @abstractmethod
    async def connect(
        self, session: aiohttp.ClientSession, url: str, listener: Listener
    ) -> Connection:
        """Open a connection to the proxy at ``url``.

        Raises:
            TransportError | aiohttp.ClientError | OSError: the attempt failed.
        """


# --------------------------------------------------------------------------- URLs


def ws_url(url: str) -> str:
    """``url`` with an ``http(s)`` scheme turned into ``ws(s)``."""
    u = URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    if scheme not in ("ws", "wss"):
        raise UsageError(f"not a WebSocket or HTTP URL: {safe_url(url)!r}")
    return str(u.with_scheme(scheme))


def http_url(url: str, path: str) -> str:
    """The HTTP URL of endpoint ``path`` (``/log``, ``/ws``) of the proxy at ``url``.

    A ``ws(s)`` scheme becomes ``http(s)``; ``path`` is appended to the URL's path unless
    the URL already ends with it (``http://proxy/prefix/`` posts to ``/prefix/log``).
    """
    u = URL(url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    if scheme not in ("http", "https"):
        raise UsageError(f"not a WebSocket or HTTP URL: {safe_url(url)!r}")
    base = u.path.rstrip("/")
    if not base.endswith(path):
        base += path
    return str(u.with_scheme(scheme).with_path(base).with_query(None).with_fragment(None))


# --------------------------------------------------------------------------- policy


#: The jitter's own generator: the client never draws from (or moves) the application's
#: global ``random`` state, which an application may have seeded for its own use.
_JITTER: Final = random.Random()


def backoff(
    initial: float = 0.05,
    factor: float = 2.0,
    max_delay: float = 5.0,
    jitter: float = 0.5,
    rng: Callable[[], float] = _JITTER.random,
) -> Iterator[float]:
    """Delays between reconnection attempts: exponential, capped, with jitter.

    Each delay is the nominal one less up to ``jitter`` of it at random, so many clients
    that lost the same server do not reconnect in lockstep.

    Args:
        initial: first nominal delay in seconds.
        factor: growth of the nominal delay per attempt.
        max_delay: cap of the nominal delay.
        jitter: fraction of the delay that is random (0: none, 1: full jitter).
        rng: source of uniform numbers in [0, 1) (inject one for deterministic tests).

    Yields:
        Seconds to wait before the next attempt, forever.
    """
    delay = initial
    while True:
        yield delay * (1.0 - jitter * rng())
        delay = min(delay * factor, max_delay)


def is_retryable(exc: BaseException) -> bool:
    """Whether reconnecting may help after ``exc`` (the default policy).

    Network failures, timeouts and refusals by a busy or draining server are retryable;
    a bad URL, a misuse of the API or a refused token (HTTP 401/403) is not (the client
    then gives up and drops, loudly).
    """
    if isinstance(exc, UsageError | aiohttp.InvalidURL):
        return False
    if isinstance(exc, aiohttp.WSServerHandshakeError | ServerRefused):
        # Other 4xx included: a proxy behind a load balancer may answer 404 mid-deploy.
        return exc.status not in FORBIDDEN_STATUSES
    return isinstance(exc, TransportError | aiohttp.ClientError | OSError | TimeoutError)


# --------------------------------------------------------------------------- answers


def _answer(data: str | bytes, listener: Listener) -> None:
    """Dispatch one server answer (``{"ack": …}`` or ``{"error": …, "seq": …}``)."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.debug("unreadable answer from the proxy: %r", data[:80])
        return
    if not isinstance(msg, dict):
        return
    ack = msg.get("ack")
    if type(ack) is int:
        rejected = msg.get("rejected")
        listener.on_ack(ack, len(rejected) if isinstance(rejected, list) else 0)
    elif "error" in msg:
        seq = msg.get("seq")
        listener.on_refused(
            seq if type(seq) is int else None, str(msg["error"]), str(msg.get("detail", ""))
        )


# --------------------------------------------------------------------------- WebSocket


class _WebSocketConnection(Connection):
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, listener: Listener) -> None:
        self._ws = ws
        self._listener = listener
        self._closed = False
        self.error: BaseException | None = None
        self._reader = asyncio.create_task(self._read(), name="async-logging-ws-reader")

    @property
    def closed(self) -> bool:
        return self._closed or self._ws.closed

    async def _read(self) -> None:
        ws = self._ws
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                    _answer(msg.data, self._listener)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    self.error = ws.exception()
                    break
        except Exception as exc:  # the reader must report, never die silently
            self.error = exc
        finally:
            self._closed = True
            if self.error is None:
                self.error = ConnectionLost(
                    f"closed by the proxy (code {ws.close_code})"
                    if ws.close_code is not None
                    else "closed"
                )
            self._listener.on_lost(self.error)

    async def send(self, seq: int, payload: bytes) -> None:
        if self.closed:
            raise ConnectionLost(str(self.error or "closed"))
        try:
            await self._ws.send_bytes(payload)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # aiohttp raises ConnectionResetError or ClientConnectionResetError on a
            # closing transport: the same thing for us.
            self._closed = True
            raise ConnectionLost(str(exc)) from exc

    async def close(self) -> None:
        self._closed = True
        try:
            await self._ws.close()
        except Exception:  # closing a broken socket: nothing left to do
            log.debug("error closing the WebSocket", exc_info=True)
        if not self._reader.done():
            self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class WebSocketTransport(Transport):
    """WebSocket to the proxy, subprotocol ``log-protocol`` (the default transport).

    Args:
        protocol: the subprotocol asked for.
        ready_timeout: seconds to wait for the server's ``ready`` frame.
        heartbeat: seconds between protocol pings (keeps NATs open, detects dead peers).
        max_msg_size: largest answer accepted from the server.
    """

    name = "websocket"

    def __init__(
        self,
        *,
        protocol: str = SUBPROTOCOL,
        ready_timeout: float = 10.0,
        heartbeat: float | None = 30.0,
        max_msg_size: int = 4 * 1024 * 1024,
    ) -> None:
        self.protocol = protocol
        self.ready_timeout = ready_timeout
        self.heartbeat = heartbeat
        self.max_msg_size = max_msg_size

    async def connect(
        self, session: aiohttp.ClientSession, url: str, listener: Listener
    ) -> Connection:
        ws = await session.ws_connect(
            ws_url(url),
            protocols=(self.protocol,),
            heartbeat=self.heartbeat,
            max_msg_size=self.max_msg_size,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        try:
            async with asyncio.timeout(self.ready_timeout):
                first = await ws.receive()
            if first.type is not aiohttp.WSMsgType.TEXT or first.data != READY:
                raise ConnectionLost(f"expected the 'ready' frame, got {first.type.name}")
        except BaseException:
            await ws.close()
            raise
        return _WebSocketConnection(ws, listener)

    def __repr__(self) -> str:
        return f"WebSocketTransport(protocol={self.protocol!r})"


# --------------------------------------------------------------------------- HTTP


class _HttpConnection(Connection):
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        listener: Listener,
        timeout: aiohttp.ClientTimeout,
        expires_at: float | None = None,
    ) -> None:
        self._session = session
        self._url = url
        self._listener = listener
        self._timeout = timeout
        self._closed = False
        self.expires_at = expires_at

    @property
    def closed(self) -> bool:
        if self._closed:
            return True
        if self.expires_at is not None and asyncio.get_running_loop().time() >= self.expires_at:
            self._closed = True
        return self._closed

    async def send(self, seq: int, payload: bytes) -> None:
        if self._closed:
            raise ConnectionLost("closed")
        try:
            async with self._session.post(
                self._url,
                data=payload,
                headers={"Content-Type": MSGPACK},
                timeout=self._timeout,
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._closed = True
            raise ConnectionLost(f"POST {safe_url(self._url)}: {describe(exc)}") from exc
        if status == 200 or (status == 400 and b'"rejected"' in body):
            # 400 with a rejected list: every event was refused one by one (the frame
            # itself was fine): an acknowledgement with everything rejected.
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                answer = {}
            rejected = answer.get("rejected") if isinstance(answer, dict) else None
            self._listener.on_ack(seq, len(rejected) if isinstance(rejected, list) else 0)
        elif status in (400, 413, 415):
            reason, detail = _error_of(body, status)
            self._listener.on_refused(seq, reason, detail)
        else:
            self._closed = True
            text = body[:200].decode("utf-8", "replace")
            if status in FORBIDDEN_STATUSES:
                # The error code only: the proxy's explanation may quote the header it
                # wanted, and this text ends up in log lines.
                text = _error_of(body, status)[0]
            raise ServerRefused(status, text)

    async def close(self) -> None:
        self._closed = True


def _error_of(body: bytes, status: int) -> tuple[str, str]:
    try:
        answer: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        return str(answer.get("error", status)), str(answer.get("detail", ""))
    return str(status), body[:200].decode("utf-8", "replace")


class HttpTransport(Transport):
    """``POST /log`` with a MessagePack envelope per request; the answer is the ack.

    Args:
        path: the endpoint, appended to the client URL's path.
        timeout: seconds a request may take.
    """

    name = "http"

    def __init__(self, *, path: str = "/log", timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def connect(
        self, session: aiohttp.ClientSession, url: str, listener: Listener
    ) -> Connection:
        # Nothing to open: aiohttp keeps the connection alive between posts, and a
        # refused or failed post reports the problem.
        return _HttpConnection(session, http_url(url, self.path), listener, self.timeout)

    def __repr__(self) -> str:
        return f"HttpTransport(path={self.path!r})"


class WebSocketOtherwiseHttpTransport(Transport):
    """WebSocket found with ``GET /ws``; ``POST /log`` when that fails.

    Args:
        websocket: the WebSocket transport to use once the URL is known.
        http: the HTTP transport to fall back on.
        discovery_path: where the server says which WebSocket URL to use.
        discovery_timeout: seconds the discovery request may take.
        retry_websocket_after: seconds on HTTP before the WebSocket is tried again.
    """

    name = "websocket-otherwise-http"

    def __init__(
        self,
        websocket: WebSocketTransport | None = None,
        http: HttpTransport | None = None,
        *,
        discovery_path: str = "/ws",
        discovery_timeout: float = 5.0,
        retry_websocket_after: float = 60.0,
    ) -> None:
        self.websocket = websocket or WebSocketTransport()
        self.http = http or HttpTransport()
        self.discovery_path = discovery_path
        self.discovery_timeout = aiohttp.ClientTimeout(total=discovery_timeout)
        self.retry_websocket_after = retry_websocket_after
        #: Which way the last connection went: ``"websocket"`` or ``"http"``.
        self.last_used: str | None = None

    async def connect(
        self, session: aiohttp.ClientSession, url: str, listener: Listener
    ) -> Connection:
        try:
            target = await self._discover(session, url)
            conn = await self.websocket.connect(session, target, listener)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if self.last_used != "http":  # once per switch, not once per attempt
                log.info(
                    "async-logging client: no WebSocket at %s (%s); posting over HTTP",
                    safe_url(url),
                    describe(exc),
                )
            conn = await self.http.connect(session, url, listener)
            assert isinstance(conn, _HttpConnection)
            conn.expires_at = asyncio.get_running_loop().time() + self.retry_websocket_after
            self.last_used = "http"
            return conn
        self.last_used = "websocket"
        return conn

    async def _discover(self, session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(
            http_url(url, self.discovery_path), timeout=self.discovery_timeout
        ) as resp:
            if resp.status != 200:
                raise ServerRefused(resp.status, "WebSocket discovery")
            info = orjson.loads(await resp.read())
        target = info.get("url") if isinstance(info, dict) else None
        if not isinstance(target, str):
            raise ConnectionLost("the discovery answer names no WebSocket URL")
        return target

    def __repr__(self) -> str:
        return f"WebSocketOtherwiseHttpTransport({self.websocket!r}, {self.http!r})"


_BY_NAME: Final[dict[str, type[Transport]]] = {
    "websocket": WebSocketTransport,
    "ws": WebSocketTransport,
    "http": HttpTransport,
    "websocket-otherwise-http": WebSocketOtherwiseHttpTransport,
}


def resolve_transport(spec: Transport | type[Transport] | str | None) -> Transport:
    """A transport from an instance, a class, a name (``"websocket"``, ``"http"``,
    ``"websocket-otherwise-http"``) or ``None`` (the WebSocket default).

    Raises:
        UsageError: for anything else.
    """
    if spec is None:
        return WebSocketTransport()
    if isinstance(spec, Transport):
        return spec
    if isinstance(spec, type) and issubclass(spec, Transport):
        return spec()
    if isinstance(spec, str) and spec in _BY_NAME:
        return _BY_NAME[spec]()
    raise UsageError(f"unknown transport {spec!r}: use one of {sorted(_BY_NAME)} or a Transport")
