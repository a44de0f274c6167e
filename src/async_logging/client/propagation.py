"""Context that crosses services: W3C trace context in and out (docs/client.md, "Across
services"; docs/design.md §6).

**In** (the web middlewares call :func:`incoming`). A request with a valid ``traceparent``
joins the caller's tree: its ``URL`` transaction takes the caller's trace id as ``uuid``
(or the ``X-Request-ID`` when that id is the one the trace id stands for, see
:func:`trace_id_of`), the caller's span id as ``parent`` and a new span id (16 hex digits)
as its own event id, and the response says so in a ``traceresponse`` header (W3C Trace
Context Level 2) naming the trace and that span. A request with only ``X-Request-ID``
takes it as ``uuid``, at the top of that tree, as before. A ``traceparent`` that does not
parse is ignored (the request starts a tree of its own, as the W3C says) and counted in
:data:`refused` by reason (:data:`REFUSAL_REASONS`).

**Out** (opt-in: :func:`instrument_httpx`, :func:`instrument_requests`,
:func:`aiohttp_trace_config`). A call made inside a transaction runs in an ``HTTP``
transaction of its own whose event id is a new span id; the request carries
``traceparent: 00-<trace id>-<that span id>-01`` and ``X-Request-ID: <uuid>`` (unless it
already has one). A call made outside every transaction is left alone.

**Counting the remote child.** The downstream root is a child of the caller's ``HTTP``
transaction, and the caller's ``end`` counts it in ``childCount`` only when the response
says the downstream joined: a ``traceresponse`` naming the trace id that was sent (one per
response, redirects included). So a tree whose call reached a service of the project (or
any service answering ``traceresponse``) waits until that service's events arrived and is
published complete at once, in whatever order the two services' frames reach the proxy;
a call to a service that does not join (no ``traceresponse``) is not counted, and the
caller's tree is published as soon as its own events are in. Both services must log to the
same proxy (or cluster): a downstream that joins but logs elsewhere leaves the caller's tree
waiting until the engine's timeout, published ``missing_children``.

**OpenTelemetry** (opt-in: :func:`use_opentelemetry`). One direction: a transaction that
would start a new tree inside a current OpenTelemetry span joins that span's trace instead
(``uuid`` the trace id, ``parent`` the span id), so the SDK's spans exported to the proxy
over OTLP (design §12) and the project's transactions make one tree, the project's below
the span. Spans started inside a project transaction do not become its children.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from .context import _ambient, current_scope
from .report import safe_url
from .scopes import Transaction

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "CALL_TYPE",
    "MAX_TRACEPARENT_LENGTH",
    "REFUSAL_REASONS",
    "REQUEST_ID_HEADER",
    "TRACEPARENT",
    "TRACERESPONSE",
    "Join",
    "TraceParent",
    "aiohttp_trace_config",
    "begin_call",
    "end_call",
    "http_status",
    "incoming",
    "instrument_httpx",
    "instrument_requests",
    "new_span_id",
    "parse_traceparent",
    "refused",
    "trace_id_of",
    "traced_transport",
    "traceresponse",
    "uninstrument",
    "use_opentelemetry",
]

log = logging.getLogger("async_logging.client")

#: The request-id header the middlewares read and echo, and outgoing calls carry.
REQUEST_ID_HEADER: Final = "X-Request-ID"
TRACEPARENT: Final = "traceparent"
TRACERESPONSE: Final = "traceresponse"
#: The CAL type of an outgoing call's transaction.
CALL_TYPE: Final = "HTTP"
#: Trace flags sent: sampled (the project records every transaction).
TRACE_FLAGS: Final = "01"
#: A ``traceparent`` (or ``traceresponse``) longer than this is refused unread
#: (``too_long``): a version-00 header is 55 characters, later versions may append fields.
MAX_TRACEPARENT_LENGTH: Final = 512
#: Why a ``traceparent`` or ``traceresponse`` header was ignored.
REFUSAL_REASONS: Final = ("too_long", "bad_format", "bad_version", "zero_trace_id", "zero_span_id")
#: Headers ignored since the process started, by reason (:data:`REFUSAL_REASONS`).
refused: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))

_HEADER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_HEX = frozenset("0123456789abcdefABCDEF")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class TraceParent(NamedTuple):
    """A parsed ``traceparent`` (or ``traceresponse``): lowercase hex, never all zero."""

    trace_id: str
    span_id: str
    flags: str


class Join(NamedTuple):
    """Where a request's transaction goes (:func:`incoming`); ``None``: the default."""

    uuid: str | None
    parent: str | None
    event: str | None

    @property
    def joined(self) -> bool:
        """The request joined its caller's tree from a ``traceparent``."""
        return self.parent is not None


def http_status(code: int) -> str:
    """The CAL status of an HTTP response code: ``"0"`` below 400, else the code."""
    return "0" if code < 400 else str(code)


def _refuse(reason: str, header: str) -> None:
    refused[reason] += 1
    log.debug("ignored a %s header: %s", header, reason)


def parse_traceparent(value: str | None, header: str = TRACEPARENT) -> TraceParent | None:
    """``value`` as a W3C ``traceparent``; ``None`` when absent or refused (counted).

    Version ``00`` is exactly ``00-<32 hex>-<16 hex>-<2 hex>``; a later version may append
    ``-`` and more (ignored); version ``ff``, uppercase hex and all-zero ids are refused.
    """
    if not value:
        return None
    if len(value) > MAX_TRACEPARENT_LENGTH:
        _refuse("too_long", header)
        return None
    m = _HEADER.fullmatch(value.strip(" \t"))
    if m is None:
        _refuse("bad_format", header)
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        _refuse("bad_version", header)
        return None
    if trace_id == _ZERO_TRACE:
        _refuse("zero_trace_id", header)
        return None
    if span_id == _ZERO_SPAN:
        _refuse("zero_span_id", header)
        return None
    return TraceParent(trace_id, span_id, flags)


def trace_id_of(uuid: str) -> str:
    """The W3C trace id a tree's ``uuid`` travels as: the uuid itself (in lowercase) when it
    is 32 hex digits and not all zero, else the first 16 bytes of its BLAKE2b digest, in
    hex (the trace id the OTLP exporter gives the tree, design §12)."""
    if len(uuid) == 32 and _HEX.issuperset(uuid) and uuid.strip("0"):
        return uuid.lower()
    return hashlib.blake2b(uuid.encode(), digest_size=16).hexdigest()


def new_span_id() -> str:
    """A new random span id: 16 hex digits, never all zero."""
    while True:
        span = os.urandom(8).hex()
        if span != _ZERO_SPAN:
            return span


def incoming(request_id: str | None, traceparent: str | None) -> Join:
    """Where the transaction of a request with these headers goes.

    With a valid ``traceparent``: the caller's trace (``uuid`` the ``X-Request-ID`` when
    its trace id is the one sent, else the trace id), below the caller's span, with a new
    span id as event id. Else the ``X-Request-ID`` alone (``None``: a new tree).
    """
    tp = parse_traceparent(traceparent)
    if tp is None:
        return Join(request_id, None, None)
    uuid = request_id if request_id and trace_id_of(request_id) == tp.trace_id else tp.trace_id
    return Join(uuid, tp.span_id, new_span_id())


def traceresponse(tx: Transaction) -> str:
    """The ``traceresponse`` header of a joined request: its trace and its span."""
    return f"00-{trace_id_of(tx.uuid)}-{tx.event}-{TRACE_FLAGS}"


# ---------------------------------------------------------------------- outgoing calls


def begin_call(method: str, url: str, headers: MutableMapping[str, str]) -> Transaction | None:
    """Start the ``HTTP`` transaction of an outgoing call and put its context in
    ``headers`` (``traceparent``, and ``X-Request-ID`` unless set); ``None`` outside
    every transaction (the call is left alone)."""
    outer = current_scope()
    if outer is None:
        return None
    where = safe_url(url)
    client = outer._client if isinstance(outer, Transaction) else None
    tx = Transaction(
        CALL_TYPE, f"{method} {where}", event=new_span_id(), client=client, method=method, url=where
    )
    tx.start()
    headers[TRACEPARENT] = f"00-{trace_id_of(tx.uuid)}-{tx.event}-{TRACE_FLAGS}"
    if REQUEST_ID_HEADER not in headers:
        headers[REQUEST_ID_HEADER] = tx.uuid
    return tx


def count_joined(tx: Transaction, headers: Mapping[str, str]) -> bool:
    """Count the downstream root as ``tx``'s child when ``headers`` (a response's) carry a
    ``traceresponse`` naming ``tx``'s trace: the downstream joined and will send it."""
    tp = parse_traceparent(headers.get(TRACERESPONSE), TRACERESPONSE)
    if tp is None or tp.trace_id != trace_id_of(tx.uuid):
        return False
    next(tx.kids)
    return True


def end_call(
    tx: Transaction,
    status_code: int | None,
    headers: Mapping[str, str] | None,
    exc: BaseException | None = None,
) -> None:
    """End an outgoing call's transaction: the remote child counted when the response says
    the downstream joined, ``status_code`` and the status from the response's code, or the
    exception that ended the call."""
    if headers is not None:
        count_joined(tx, headers)
    if status_code is not None:
        tx.set(status_code=status_code)
        if exc is None:
            tx.status = http_status(status_code)
    tx.finish(exc)


class _Call:
    """An outgoing call's transaction (if any) as a ``with`` block: an exception leaving
    the block ends it with that exception; :meth:`answered` ends it with the response."""

    __slots__ = ("tx",)

    def __init__(self, method: str, url: str, headers: MutableMapping[str, str]) -> None:
        self.tx = begin_call(method, url, headers)

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and self.tx is not None:
            end_call(self.tx, None, None, exc)

    def answered(self, response: Any) -> Any:
        """End the transaction with ``response`` (its ``status_code`` and ``headers``)."""
        if self.tx is not None:
            end_call(self.tx, response.status_code, response.headers)
        return response


#: What the instrumentation replaced: (class, attribute) → the original.
_patched: dict[tuple[type, str], Any] = {}


def _patch(cls: type, name: str, make: Callable[[Any], Any]) -> None:
    if (cls, name) in _patched:
        return  # once only: instrumenting twice would wrap every call twice
    original = getattr(cls, name)
    _patched[cls, name] = original
    setattr(cls, name, functools.wraps(original)(make(original)))


def uninstrument() -> None:
    """Undo :func:`instrument_httpx` and :func:`instrument_requests`."""
    for (cls, name), original in _patched.items():
        setattr(cls, name, original)
    _patched.clear()


_Response = TypeVar("_Response")


def _traced_send(send: Callable[[Any], _Response], request: Any) -> _Response:
    """An httpx request sent by ``send`` inside an ``HTTP`` transaction carrying the
    context (the default transports' patch and :func:`traced_transport` alike)."""
    with _Call(request.method, str(request.url), request.headers) as call:
        response = send(request)
        call.answered(response)
        return response


async def _traced_send_async(
    send: Callable[[Any], Awaitable[_Response]], request: Any
) -> _Response:
    """:func:`_traced_send` for an async transport."""
    with _Call(request.method, str(request.url), request.headers) as call:
        response = await send(request)
        call.answered(response)
        return response


def instrument_httpx() -> None:
    """Propagate the context on every httpx request made through its default transports
    (``httpx.HTTPTransport``, ``httpx.AsyncHTTPTransport``): one ``HTTP`` transaction per
    request sent (a redirect's each), ended when the response's headers are in. Wrap any
    other transport with :func:`traced_transport`."""
    import httpx

    def sync(original: Callable[[httpx.HTTPTransport, httpx.Request], httpx.Response]) -> Any:
        def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
            return _traced_send(functools.partial(original, self), request)

        return handle_request

    def asynchronous(
        original: Callable[[httpx.AsyncHTTPTransport, httpx.Request], Awaitable[httpx.Response]],
    ) -> Any:
        async def handle_async_request(
            self: httpx.AsyncHTTPTransport, request: httpx.Request
        ) -> httpx.Response:
            return await _traced_send_async(functools.partial(original, self), request)

        return handle_async_request

    _patch(httpx.HTTPTransport, "handle_request", sync)
    _patch(httpx.AsyncHTTPTransport, "handle_async_request", asynchronous)


def traced_transport(transport: Any) -> Any:
    """``transport`` (any httpx transport: ``httpx.ASGITransport``, ``httpx.WSGITransport``,
    ``httpx.MockTransport``, one of your own) with the context propagated on each request it
    sends, as :func:`instrument_httpx` does for the default transports:
    ``httpx.AsyncClient(transport=traced_transport(httpx.ASGITransport(app)))``.

    A default transport whose class :func:`instrument_httpx` patched is returned as it is
    (wrapping it again would make two ``HTTP`` transactions per request).

    Raises:
        TypeError: ``transport`` is not an httpx transport.
    """
    import httpx

    if any(isinstance(transport, cls) for cls, _ in _patched):
        return transport
    sync, asynchronous, both = _traced_classes()
    is_sync = isinstance(transport, httpx.BaseTransport)
    is_async = isinstance(transport, httpx.AsyncBaseTransport)
    if is_sync and is_async:  # httpx.MockTransport is both
        return both(transport)
    if is_sync:
        return sync(transport)
    if is_async:
        return asynchronous(transport)
    raise TypeError(f"not an httpx transport: {type(transport).__name__}")


@functools.cache
def _traced_classes() -> tuple[Any, Any, Any]:
    """The wrappers :func:`traced_transport` makes: sync, async, and both."""
    import httpx

    class TracedTransport(httpx.BaseTransport):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            inner: httpx.BaseTransport = self.inner
            return _traced_send(inner.handle_request, request)

        def close(self) -> None:
            self.inner.close()

    class AsyncTracedTransport(httpx.AsyncBaseTransport):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            inner: httpx.AsyncBaseTransport = self.inner
            return await _traced_send_async(inner.handle_async_request, request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    class BothTracedTransport(TracedTransport, AsyncTracedTransport):
        pass

    return TracedTransport, AsyncTracedTransport, BothTracedTransport


def instrument_requests() -> None:
    """Propagate the context on every ``requests`` call (``HTTPAdapter.send``: one ``HTTP``
    transaction per request sent, a redirect's each)."""
    from requests.adapters import HTTPAdapter

    def wrap_send(original: Any) -> Any:
        def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            with _Call(request.method or "GET", request.url or "", request.headers) as call:
                return call.answered(original(self, request, *args, **kwargs))

        return send

    _patch(HTTPAdapter, "send", wrap_send)


def aiohttp_trace_config() -> aiohttp.TraceConfig:
    """A trace config propagating the context on an aiohttp client session's requests:
    ``aiohttp.ClientSession(trace_configs=[aiohttp_trace_config()])``. One ``HTTP``
    transaction per ``session.request()``, redirects included (each hop's
    ``traceresponse`` counted), ended when the final response's headers are in."""
    import aiohttp

    config = aiohttp.TraceConfig()

    async def on_start(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        ctx.async_logging = begin_call(params.method, str(params.url), params.headers)

    async def on_redirect(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestRedirectParams
    ) -> None:
        tx: Transaction | None = getattr(ctx, "async_logging", None)
        if tx is not None:
            count_joined(tx, params.response.headers)

    async def on_end(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        tx: Transaction | None = getattr(ctx, "async_logging", None)
        if tx is not None:
            end_call(tx, params.response.status, params.response.headers)

    async def on_exception(
        session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestExceptionParams
    ) -> None:
        tx: Transaction | None = getattr(ctx, "async_logging", None)
        if tx is not None:
            end_call(tx, None, None, params.exception)

    config.on_request_start.append(on_start)
    config.on_request_redirect.append(on_redirect)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_exception)
    return config


# ---------------------------------------------------------------------- OpenTelemetry


def _otel_span() -> tuple[str, str] | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def use_opentelemetry(enabled: bool = True) -> None:
    """A transaction that would start a new tree inside a current OpenTelemetry span joins
    that span's trace instead: ``uuid`` its trace id, ``parent`` its span id (the
    transaction then is sent when it ends, as any tree joined from elsewhere).

    Raises:
        ImportError: ``opentelemetry-api`` is not installed.
    """
    if enabled:
        from opentelemetry import trace  # noqa: F401  (fails now rather than per transaction)

    _ambient[0] = _otel_span if enabled else None
