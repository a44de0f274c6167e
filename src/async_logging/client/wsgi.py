"""WSGI middleware (Flask, Bottle, Pyramid, any WSGI app): one ``URL`` transaction per request.

The same transaction as the ASGI middleware's (:mod:`async_logging.client.middleware`):
``method``, ``path``, ``status_code``, the status, an ``Exception`` child for an unhandled
exception, the ``X-Request-ID`` read or echoed, the caller's tree joined from a W3C
``traceparent`` (answered with ``traceresponse``)::

    app.wsgi_app = WSGIMiddleware(app.wsgi_app)   # any WSGI app: wrap the callable
    flask_setup(app)                              # Flask, one line: the same, and more

The transaction lasts until the response body is sent: it ends when the server closes the
body (PEP 3333's ``close()``), so a streamed body, and an exception it raises, belong to the
request; while the server iterates the body, the transaction is the current scope.

**Flask** answers an unhandled exception itself, inside ``app.wsgi_app``: the middleware
sees a 500 response (and puts the request id on it) but not the exception.
:func:`flask_setup` wraps ``app.wsgi_app`` and also hooks Flask's ``got_request_exception``
signal, so the transaction reports the exception (class, message, traceback) as if it had
escaped, and ``request_started``, to name the transaction by its URL rule
(``/items/<int:item_id>``) instead of the raw path.

A bare WSGI app whose exception escapes is answered by the server (a 500 without the
request id); the transaction still gets the ``Exception`` child and ``status_code`` 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .context import _scope
from .middleware import REQUEST_ID_HEADER, RequestMiddleware, end_request, request_transaction
from .propagation import TRACERESPONSE, traceresponse
from .scopes import Transaction

if TYPE_CHECKING:
    from flask import Flask

    from .client import LogClient

__all__ = ["TRANSACTION_KEY", "WSGIMiddleware", "flask_setup"]

#: The environ key holding the request's :class:`Transaction` (for hooks inside the app).
TRANSACTION_KEY: Final = "async_logging.transaction"

ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse: TypeAlias = Callable[..., Callable[[bytes], object]]
WSGIApp: TypeAlias = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _wsgi_text(value: str) -> str:
    """A WSGI string (bytes decoded as latin-1) as the text it stands for (UTF-8)."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not a WSGI string after all
        return value


class _Request:
    """One request's transaction and what its response said."""

    __slots__ = ("ended", "status_code", "tx")

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.status_code: int | None = None
        self.ended = False

    def end(self, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        end_request(self.tx, self.status_code, exc)
        self.tx.finish(exc)


class _Body:
    """The response body, iterated and closed with the request's transaction current; its
    ``close()`` (or an exception from it) ends the transaction."""

    __slots__ = ("_it", "_request", "_result")

    def __init__(self, result: Iterable[bytes], request: _Request) -> None:
        self._result = result
        self._request = request
        self._it: Iterator[bytes] | None = None

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        token = _scope.set(self._request.tx)
        try:
            if self._it is None:
                self._it = iter(self._result)
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as exc:
            self._request.end(exc)
            raise
        finally:
            _scope.reset(token)

    def close(self) -> None:
        token = _scope.set(self._request.tx)
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            self._request.end(exc)
            raise
        finally:
            _scope.reset(token)
            self._request.end(None)


class WSGIMiddleware(RequestMiddleware[WSGIApp]):
    """WSGI middleware: one ``URL`` transaction per request.

    Args:
        app: the WSGI application to wrap (for Flask, ``app.wsgi_app``).
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Run the request in a transaction that ends when the server closes the body."""
        rid = environ.get(self._environ_key) or None
        path = _wsgi_text(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
        tx, join = request_transaction(
            self.type,
            path,
            method=environ.get("REQUEST_METHOD"),
            rid=rid,
            traceparent=environ.get("HTTP_TRACEPARENT"),
            client=self.client,
        )
        request = _Request(tx)
        echo = rid is None
        header = self.header

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            code = status.split(" ", 1)[0]
            request.status_code = int(code) if code.isdigit() else None
            if echo:
                headers = [*headers, (header, tx.uuid)]
            if join.joined:
                headers = [*headers, (TRACERESPONSE, traceresponse(tx))]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        environ[TRANSACTION_KEY] = tx
        tx.start()
        token = _scope.set(tx)
        try:
            result = self.app(environ, start)
        except BaseException as exc:
            request.end(exc)
            raise
        finally:
            _scope.reset(token)
        return _Body(result, request)


def flask_setup(
    app: Flask,
    client: LogClient | None = None,
    *,
    type: str = "URL",
    header: str = REQUEST_ID_HEADER,
) -> WSGIMiddleware:
    """Log every request of a Flask ``app`` (one line: ``flask_setup(app)``).

    Wraps ``app.wsgi_app`` in a :class:`WSGIMiddleware` (outside Flask's own error
    handling, so the 500 page carries the request id), reports the exceptions Flask turns
    into 500 pages (``got_request_exception``) and names each transaction by its URL rule.

    Args:
        app: the Flask application.
        client: the client to log through (default: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.

    Returns:
        The middleware now in ``app.wsgi_app``.
    """
    from flask import got_request_exception, request_started

    middleware = WSGIMiddleware(app.wsgi_app, client, type=type, header=header)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    got_request_exception.connect(_flask_exception, app, weak=False)
    request_started.connect(_flask_route, app, weak=False)
    return middleware


def _flask_transaction() -> Transaction | None:
    from flask import has_request_context, request

    if not has_request_context():
        return None
    tx = request.environ.get(TRANSACTION_KEY)
    return tx if isinstance(tx, Transaction) else None


def _flask_exception(sender: object, exception: BaseException, **extra: object) -> None:
    """``got_request_exception``: Flask turns ``exception`` into a 500 page; report it."""
    tx = _flask_transaction()
    if tx is not None:
        tx.exception = exception


def _flask_route(sender: object, **extra: object) -> None:
    """``request_started``: the request matched a URL rule; name the transaction by it."""
    from flask import request

    tx = _flask_transaction()
    rule = request.url_rule
    if tx is not None and rule is not None:
        tx.name = _wsgi_text(request.environ.get("SCRIPT_NAME", "")) + rule.rule
