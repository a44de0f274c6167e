"""Web framework middleware: one ``URL`` transaction per request (docs/design.md §6).

- :class:`AsyncLoggingMiddleware`: plain ASGI, so it needs no Starlette import and works
  with Starlette, FastAPI and any ASGI app::

      app = Starlette(routes=..., middleware=[Middleware(AsyncLoggingMiddleware)])
      app.add_middleware(AsyncLoggingMiddleware)            # FastAPI / Starlette
      app = AsyncLoggingMiddleware(app, client=my_client)    # any ASGI app

- :func:`aiohttp_middleware`: ``web.Application(middlewares=[aiohttp_middleware()])``.

Each request runs in a transaction of type ``URL`` whose events, nested transactions
and ``logging`` records (through :class:`~async_logging.client.LogHandler`) are its
children:

- **name**: the route template (Starlette ``scope["route"].path``, with the mount prefix
  of mounted apps; aiohttp ``resource.canonical``), the raw path when no route matched;
- **status**: ``"0"`` for a 1xx-3xx response, the status code as a string for 4xx/5xx,
  the exception's class name when one escaped the app;
- **uuid**: the ``X-Request-ID`` header when the request has one (the tree then uses ids
  that cannot collide with the caller's), else a new one, echoed back in the response's
  ``X-Request-ID`` header;
- extra keys: ``method``, ``path`` and ``status_code``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from .scopes import Transaction

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

    from .client import LogClient

__all__ = ["REQUEST_ID_HEADER", "AsyncLoggingMiddleware", "aiohttp_middleware", "http_status"]

REQUEST_ID_HEADER: Final = "X-Request-ID"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def http_status(code: int) -> str:
    """The CAL status of an HTTP response code: ``"0"`` below 400, else the code."""
    return "0" if code < 400 else str(code)


class AsyncLoggingMiddleware:
    """ASGI middleware: one ``URL`` transaction per HTTP request.

    Args:
        app: the ASGI application to wrap.
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """

    def __init__(
        self,
        app: ASGIApp,
        client: LogClient | None = None,
        *,
        type: str = "URL",
        header: str = REQUEST_ID_HEADER,
    ) -> None:
        self.app = app
        self.client = client
        self.type = type
        self.header = header
        self._header_key = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request in a transaction (other ASGI scopes pass through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self._header_key
        rid: str | None = None
        for k, v in scope.get("headers") or ():
            if k == key:
                rid = v.decode("latin-1") or None
                break
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        tx = Transaction(
            self.type, path, uuid=rid, client=self.client, method=scope.get("method"), path=path
        )
        status_code: int | None = None
        echo = rid is None

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if echo:
                    headers = list(message.get("headers") or ())
                    headers.append((key, tx.uuid.encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        with tx:
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if isinstance(template, str):
                    # A mounted app's router extends root_path with the mount prefix.
                    prefix = scope.get("root_path", "")
                    prefix = prefix[len(root_path) :] if prefix.startswith(root_path) else ""
                    tx.name = prefix + template
                if status_code is not None:
                    tx.set(status_code=status_code)
            tx.status = http_status(status_code) if status_code is not None else "no_response"


def aiohttp_middleware(
    client: LogClient | None = None,
    *,
    type: str = "URL",
    header: str = REQUEST_ID_HEADER,
) -> Middleware:
    """An aiohttp middleware: one ``URL`` transaction per request.

    Args:
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.

    Returns:
        The middleware, for ``web.Application(middlewares=[...])``.
    """
    from aiohttp import web

    @web.middleware
    async def async_logging_middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        rid = request.headers.get(header) or None
        path = request.path
        tx = Transaction(type, path, uuid=rid, client=client, method=request.method, path=path)
        with tx:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                tx.name = _aiohttp_route(request)
                tx.status = http_status(exc.status)
                tx.set(status_code=exc.status)
                if rid is None:
                    exc.headers[header] = tx.uuid
                raise
            except BaseException:
                tx.name = _aiohttp_route(request)
                raise
            tx.name = _aiohttp_route(request)
            tx.status = http_status(resp.status)
            tx.set(status_code=resp.status)
            if rid is None and not resp.prepared:
                resp.headers[header] = tx.uuid
            return resp

    return async_logging_middleware


def _aiohttp_route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return request.path
    return resource.canonical
