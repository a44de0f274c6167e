"""Web framework middleware: one ``URL`` transaction per request (docs/design.md §6).

- :class:`AsyncLoggingMiddleware`: plain ASGI, so it needs no Starlette import and works
  with Starlette, FastAPI and any ASGI app. Wrap the whole app, so that the 500 page the
  framework's own error middleware answers passes through it too (one line)::

      app = AsyncLoggingMiddleware(Starlette(routes=...))      # or FastAPI(...)
      app = AsyncLoggingMiddleware(app, client=my_client)      # any ASGI app

  Added the framework's way (``app.add_middleware(AsyncLoggingMiddleware)``) it sits inside
  Starlette's ``ServerErrorMiddleware``: an exception is still logged with its status code,
  but the 500 response goes out without the ``X-Request-ID`` header.
- :func:`aiohttp_setup`: ``aiohttp_setup(app)`` puts :func:`aiohttp_middleware` first and
  echoes the request id on every response, aiohttp's own 500 page included (that one is
  answered outside every middleware). ``web.Application(middlewares=[aiohttp_middleware()])``
  works too, without the id on that page.
- WSGI (Flask and others) and Django: :mod:`async_logging.client.wsgi`,
  :mod:`async_logging.client.django_middleware`.

Each request runs in a transaction of type ``URL`` whose events, nested transactions
and ``logging`` records (through :class:`~async_logging.client.LogHandler`) are its
children:

- **name**: the route template (Starlette ``scope["route"].path``, with the mount prefix
  of mounted apps; aiohttp ``resource.canonical``), the raw path when no route matched;
- **status**: ``"0"`` for a 1xx-3xx response, the status code as a string for 4xx/5xx,
  the exception's class name when an unhandled exception ended the request;
- **status_code**: the response's HTTP status, on every request answered (``500`` for an
  unhandled exception, which is also logged as the transaction's ``Exception`` child:
  class, message and traceback, see :class:`~async_logging.client.Transaction`);
- **uuid**: the ``X-Request-ID`` header when the request has one (the tree then uses ids
  that cannot collide with the caller's), else a new one, echoed back in the response's
  ``X-Request-ID`` header;
- **the caller's tree**: with a valid W3C ``traceparent`` header the request joins it (the
  caller's trace id as uuid, the caller's span as parent, a new span id as event id) and
  the response carries ``traceresponse`` (:mod:`async_logging.client.propagation`);
- extra keys: ``method``, ``path`` and ``status_code``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from .propagation import (
    REQUEST_ID_HEADER,
    TRACEPARENT,
    TRACERESPONSE,
    Join,
    http_status,
    incoming,
)
from .propagation import traceresponse as traceresponse_of
from .scopes import Transaction

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

    from .client import LogClient

__all__ = [
    "REQUEST_ID_HEADER",
    "SERVER_ERROR",
    "AsyncLoggingMiddleware",
    "RequestMiddleware",
    "aiohttp_middleware",
    "aiohttp_setup",
    "error_status",
    "http_status",
]

#: The status code a server answers an unhandled exception with.
SERVER_ERROR: Final = 500
#: The status code aiohttp answers a handler's ``TimeoutError`` with.
GATEWAY_TIMEOUT: Final = 504

#: The trace-context headers as an ASGI scope spells them.
_TRACEPARENT_KEY: Final = TRACEPARENT.encode()
_TRACERESPONSE_KEY: Final = TRACERESPONSE.encode()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
App = TypeVar("App")


def error_status(exc: BaseException) -> int | None:
    """The status code a server answers ``exc`` escaping the app with: ``500`` for an
    ``Exception``, ``None`` (no answer) for a cancellation or an interpreter exit."""
    return SERVER_ERROR if isinstance(exc, Exception) else None


def end_request(tx: Transaction, status_code: int | None, exc: BaseException | None) -> None:
    """Set a request transaction's status and ``status_code`` before it ends.

    ``status_code`` is the response's (``None``: none was started); ``exc`` what escaped
    the app. An exception, escaping or recorded in ``tx.exception``, leaves the status to
    the transaction (its class name); else the response's code gives it, and no response
    at all gives ``no_response``.
    """
    if status_code is None and exc is not None:
        status_code = error_status(exc)
    if status_code is not None:
        tx.set(status_code=status_code)
    if exc is None and tx.exception is None:
        tx.status = http_status(status_code) if status_code is not None else "no_response"


def request_transaction(
    type: str,
    path: str,
    *,
    method: str | None,
    rid: str | None,
    traceparent: str | None,
    client: LogClient | None,
) -> tuple[Transaction, Join]:
    """The transaction of a request with these headers (``X-Request-ID``, ``traceparent``),
    and where it went (:func:`~async_logging.client.propagation.incoming`)."""
    join = incoming(rid, traceparent)
    tx = Transaction(
        type,
        path,
        uuid=join.uuid,
        parent=join.parent,
        event=join.event,
        client=client,
        method=method,
        path=path,
    )
    return tx, join


class RequestMiddleware(Generic[App]):
    """What a middleware wrapping an application is configured with (ASGI, WSGI).

    Args:
        app: the application to wrap.
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """

    def __init__(
        self,
        app: App,
        client: LogClient | None = None,
        *,
        type: str = "URL",
        header: str = REQUEST_ID_HEADER,
    ) -> None:
        self.app = app
        self.client = client
        self.type = type
        self.header = header
        #: The header as an ASGI scope spells it, and as a WSGI environ does.
        self._header_key = header.lower().encode("latin-1")
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")


class AsyncLoggingMiddleware(RequestMiddleware[ASGIApp]):
    """ASGI middleware: one ``URL`` transaction per HTTP request.

    Args:
        app: the ASGI application to wrap.
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request in a transaction (other ASGI scopes pass through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self._header_key
        rid: str | None = None
        parent_header: str | None = None
        for k, v in scope.get("headers") or ():
            if k == key:
                rid = rid or v.decode("latin-1") or None
            elif k == _TRACEPARENT_KEY:
                parent_header = v.decode("latin-1")
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        tx, join = request_transaction(
            self.type,
            path,
            method=scope.get("method"),
            rid=rid,
            traceparent=parent_header,
            client=self.client,
        )
        status_code: int | None = None
        echo = rid is None

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if echo or join.joined:
                    headers = list(message.get("headers") or ())
                    if echo:
                        headers.append((key, tx.uuid.encode("latin-1")))
                    if join.joined:
                        headers.append((_TRACERESPONSE_KEY, traceresponse_of(tx).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        with tx:
            escaped: BaseException | None = None
            try:
                await self.app(scope, receive, send_wrapper)
            except BaseException as exc:
                escaped = exc
                raise
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if isinstance(template, str):
                    # A mounted app's router extends root_path with the mount prefix.
                    prefix = scope.get("root_path", "")
                    prefix = prefix[len(root_path) :] if prefix.startswith(root_path) else ""
                    tx.name = prefix + template
                end_request(tx, status_code, escaped)
                escaped = None  # no reference cycle through the frame


@functools.cache
def _request_id_key() -> Any:
    """The request-storage key of the echoed id (a ``web.RequestKey`` where aiohttp has it)."""
    from aiohttp import web

    key_type = getattr(web, "RequestKey", None)
    return "async_logging_request_id" if key_type is None else key_type("async_logging", str)


def aiohttp_middleware(
    client: LogClient | None = None,
    *,
    type: str = "URL",
    header: str = REQUEST_ID_HEADER,
) -> Middleware:
    """An aiohttp middleware: one ``URL`` transaction per request.

    aiohttp answers an unhandled exception outside every middleware: the transaction gets
    its ``Exception`` child and ``status_code`` (500; 504 for a ``TimeoutError``, as aiohttp
    answers), but only :func:`aiohttp_setup` puts the request id on that response.

    Args:
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.

    Returns:
        The middleware, for ``web.Application(middlewares=[...])``.
    """
    from aiohttp import web

    id_key = _request_id_key()

    @web.middleware
    async def async_logging_middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        rid = request.headers.get(header) or None
        path = request.path
        tx, join = request_transaction(
            type,
            path,
            method=request.method,
            rid=rid,
            traceparent=request.headers.get(TRACEPARENT),
            client=client,
        )
        answer: web.HTTPException | None = None
        with tx:
            if rid is None:
                request[id_key] = tx.uuid
            if join.joined:
                request[_traceresponse_key()] = traceresponse_of(tx)
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                # A response raised (aiohttp's way to answer 404): not an error, kept out of
                # the transaction's exception report, raised again once it has ended.
                answer = exc
                tx.name = _aiohttp_route(request)
                end_request(tx, exc.status, None)
                _answer(exc.headers, header, rid, join.joined, tx)
            except BaseException as exc:
                tx.name = _aiohttp_route(request)
                status = GATEWAY_TIMEOUT if isinstance(exc, TimeoutError) else error_status(exc)
                end_request(tx, status, exc)
                raise
            else:
                tx.name = _aiohttp_route(request)
                end_request(tx, resp.status, None)
                if not resp.prepared:
                    _answer(resp.headers, header, rid, join.joined, tx)
        if answer is not None:
            raise answer
        return resp

    return async_logging_middleware


def aiohttp_setup(
    app: web.Application,
    client: LogClient | None = None,
    *,
    type: str = "URL",
    header: str = REQUEST_ID_HEADER,
) -> None:
    """Log every request of ``app`` (one line: ``aiohttp_setup(app)``).

    Puts :func:`aiohttp_middleware` first among the app's middlewares (it then times the
    others too) and echoes the request id from ``on_response_prepare``, which also sees
    the responses answered outside every middleware: aiohttp's own 500 page for an
    unhandled exception, and streamed responses.

    Args:
        app: the application, before it starts.
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """
    app.middlewares.insert(0, aiohttp_middleware(client, type=type, header=header))
    id_key = _request_id_key()

    async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
        uuid = request.get(id_key)
        if uuid is not None and header not in response.headers:
            response.headers[header] = uuid
        answer = request.get(_traceresponse_key())
        if answer is not None and TRACERESPONSE not in response.headers:
            response.headers[TRACERESPONSE] = answer

    app.on_response_prepare.append(echo_request_id)


@functools.cache
def _traceresponse_key() -> Any:
    """The request-storage key of a joined request's ``traceresponse``."""
    from aiohttp import web

    key_type = getattr(web, "RequestKey", None)
    return "async_logging_traceresponse" if key_type is None else key_type("async_logging_tr", str)


def _answer(
    headers: MutableMapping[str, str], header: str, rid: str | None, joined: bool, tx: Transaction
) -> None:
    """Put the request id (when the request had none) and, for a request that joined its
    caller's tree, the ``traceresponse`` on a response's headers."""
    if rid is None:
        headers[header] = tx.uuid
    if joined:
        headers[TRACERESPONSE] = traceresponse_of(tx)


def _aiohttp_route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return request.path
    return resource.canonical
