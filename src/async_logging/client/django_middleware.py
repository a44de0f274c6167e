"""Django middleware: one ``URL`` transaction per request, sync or async.

Put it first in ``MIDDLEWARE`` (one line), so that it times the other middlewares and
sees the response of every request, the 500 page of an unhandled exception included::

    MIDDLEWARE = [
        "async_logging.client.django_middleware.DjangoMiddleware",
        ...
    ]

The same transaction as the other frameworks' (:mod:`async_logging.client.middleware`):
``method``, ``path``, ``status_code``, the status, the ``X-Request-ID`` read or echoed, the
caller's tree joined from a W3C ``traceparent`` (answered with ``traceresponse``), and
for an unhandled exception an ``Exception`` child (class, message, traceback). Django turns
such an exception into its 500 page before the response reaches any middleware; the
exception is caught on Django's ``got_request_exception`` signal, which this module
connects when the first middleware is made. The transaction is named by the route of the
URL pattern that matched (``/items/<int:item_id>``), the path when none did. It logs
through the default client; a subclass may set :attr:`DjangoMiddleware.client`,
:attr:`~DjangoMiddleware.type` and :attr:`~DjangoMiddleware.header`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from .middleware import REQUEST_ID_HEADER, end_request, request_transaction
from .propagation import TRACEPARENT, TRACERESPONSE, traceresponse
from .scopes import Transaction

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponseBase  # type: ignore[import-untyped]

    from .client import LogClient

__all__ = ["DjangoMiddleware"]

#: The request attribute holding the request's :class:`Transaction`.
TRANSACTION_ATTRIBUTE: Final = "async_logging_transaction"
_SIGNAL_UID: Final = "async_logging.client.django_middleware"


def _record_exception(sender: object, request: HttpRequest | None = None, **extra: Any) -> None:
    """``got_request_exception``: Django turns the exception being handled into a 500 page."""
    tx = getattr(request, TRANSACTION_ATTRIBUTE, None)
    if isinstance(tx, Transaction):
        tx.exception = sys.exc_info()[1]


class DjangoMiddleware:
    """Django middleware (sync and async): one ``URL`` transaction per request.

    Attributes:
        client: the client to log through (``None``: the default client, per request).
        type: the CAL type of the request transactions.
        header: the request-id header read and echoed.
    """

    sync_capable: ClassVar[bool] = True
    async_capable: ClassVar[bool] = True
    client: ClassVar[LogClient | None] = None
    type: ClassVar[str] = "URL"
    header: ClassVar[str] = REQUEST_ID_HEADER

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction
        from django.core.signals import got_request_exception  # type: ignore[import-untyped]

        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        got_request_exception.connect(_record_exception, dispatch_uid=_SIGNAL_UID)

    def __call__(self, request: HttpRequest) -> Any:
        """Run the request in a transaction (a coroutine when the stack is async)."""
        if self._async:
            return self._acall(request)
        with self._transaction(request) as tx:
            response: HttpResponseBase = self.get_response(request)
            self._finish(request, tx, response)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
        with self._transaction(request) as tx:
            response = await get_response(request)
            self._finish(request, tx, response)
        return response

    def _transaction(self, request: HttpRequest) -> _RequestTransaction:
        rid = request.headers.get(self.header) or None
        path = request.path
        tx, join = request_transaction(
            self.type,
            path,
            method=request.method,
            rid=rid,
            traceparent=request.headers.get(TRACEPARENT),
            client=self.client,
        )
        setattr(request, TRANSACTION_ATTRIBUTE, tx)
        return _RequestTransaction(tx, rid is None, join.joined)

    def _finish(
        self, request: HttpRequest, tx: _RequestTransaction, response: HttpResponseBase
    ) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if isinstance(route, str) and route:
            tx.tx.name = "/" + route.removeprefix("^")
        tx.status_code = response.status_code
        if tx.echo:
            response[self.header] = tx.tx.uuid
        if tx.joined:
            response[TRACERESPONSE] = traceresponse(tx.tx)


class _RequestTransaction:
    """A request's transaction as a ``with`` block that sets its status when it ends."""

    __slots__ = ("echo", "joined", "status_code", "tx")

    def __init__(self, tx: Transaction, echo: bool, joined: bool) -> None:
        self.tx = tx
        self.echo = echo
        self.joined = joined
        self.status_code: int | None = None

    def __enter__(self) -> _RequestTransaction:
        self.tx.__enter__()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        end_request(self.tx, self.status_code, exc)
        self.tx.__exit__(None if exc is None else type(exc), exc, None)
