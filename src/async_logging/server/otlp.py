"""OTLP/HTTP ingest on the main port: ``POST /v1/traces`` and ``POST /v1/logs`` (docs/design.md §12).

OpenTelemetry SDKs and collectors export here as they would to any OTLP/HTTP receiver
(port 4318 elsewhere): protobuf (``application/x-protobuf``) or JSON (``application/json``)
bodies, gzip or not, decoded with the official ``opentelemetry-proto`` messages. Each span
becomes a ``begin`` and an ``end`` of the event model (trace id → ``uuid``, span id →
``event``, parent span id → ``parent``, ``"0"`` for a root), its span events atomic
children; a log record becomes an atomic event, inside its span's tree when it carries a
trace and a span id. The events go through the same :class:`~.pipeline.Pipeline` as
``POST /log``: the same spool, backpressure, engine and publishers, so a trace sent partly
by the project's client and partly by an OpenTelemetry SDK is one tree.

The parts that decide are sans-I/O and take values: :func:`decode_request`,
:func:`map_traces`, :func:`map_logs`, :class:`Settle` (with the time given) and the answers
(:func:`success_body`, :func:`status_body`). :class:`OtlpIngest` is the thin shell the
listener calls, which owns the settle timer.

**Answers**, as the OTLP specification says: 200 with an ``Export…ServiceResponse`` in the
request's encoding, holding ``partial_success`` (how many spans or log records were refused
and the first reasons) when some were; 400, 401, 403, 408, 413, 415 and 503 with a
``google.rpc.Status`` naming the reason; 503 carries ``Retry-After``
(:data:`RETRY_AFTER_SECONDS`). A request every item of which was refused is a 400, as for
``POST /log``. Every refusal is counted in ``bad_input{reason}``.

**Settle.** A span arrives whole (its begin and end in one request), and an SDK exports a
span when it ends, children before their parent. So a trace's root span comes last from
its own process, but spans of the same trace exported by another process (the service it
called) may come in a later request. The root span's ``end`` is therefore held back
``otlp_settle`` seconds (:class:`Settle`) while its ``begin`` is fed: the tree stays open in
the engine and every span or log record that arrives meanwhile joins it; then the end is
fed and the tree is published (when nothing it references is missing). The engine's own
``settle`` stays 0, so ``/log`` trees and the native fast path are not slowed. A trace a
request holds whole (its root and every span's parent) is held whole instead, outside the
engine, and goes through the native fast path when due (:func:`split_whole`,
:class:`Settle`, :class:`OtlpIngest`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, Final

import msgspec
import orjson
from aiohttp import web
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError as ProtobufDecodeError  # type: ignore[import-untyped]
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import (
    logs_service_pb2 as logs_service,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2 as trace_service,
)

from .. import wire
from ..exceptions import BadInput, DecodeError, InvalidEvent, LimitExceeded
from ..model import (
    ATOMIC,
    BEGIN,
    END,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    ROOT_PARENT,
    Event,
)
from . import spool
from .pipeline import Pipeline

if TYPE_CHECKING:
    from ..buffer import Fed
    from .listener import Ingest

__all__ = [
    "DEFAULT_SETTLE",
    "ITEMS",
    "REFUSAL_REASONS",
    "SIGNALS",
    "Mapped",
    "OtlpIngest",
    "Settle",
    "Split",
    "answer_kind",
    "check_headers",
    "decode_request",
    "map_logs",
    "map_traces",
    "split_whole",
    "status_body",
    "success_body",
]

log = logging.getLogger("async_logging.server")

#: Seconds a root span's end is held so that spans of its trace still in flight (exported
#: by another process, or in the SDK's next batch) join its tree (``otlp_settle``).
DEFAULT_SETTLE: Final = 2.0
#: The ``Retry-After`` (seconds) of a 503 answer (spool full, in-flight budget full).
RETRY_AFTER_SECONDS: Final = 1
#: Refusals an answer's ``error_message`` names (the first ones; the count says how many).
MAX_REASONS_LISTED: Final = 3
#: What :meth:`OtlpIngest.snapshot` counts as received (``otlp_received{signal}``).
ITEMS: Final = ("spans", "log_records")
#: The two signals taken, by path: ``/v1/traces`` and ``/v1/logs``.
SIGNALS: Final = ("traces", "logs")
#: Content types, as the OTLP specification names them.
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
#: ``Content-Encoding`` values taken (aiohttp inflates the body before it is read).
ENCODINGS: Final = frozenset({"", "identity", "gzip", "deflate"})

#: Every reason an OTLP request or one of its items is refused with (``bad_input{reason}``),
#: beside the wire reasons it shares (sizes, nesting, strings) and the listener's.
REFUSAL_REASONS: Final = (
    "bad_protobuf",
    "bad_json",
    "unsupported_media_type",
    "unsupported_encoding",
    "bad_gzip",
    "too_many_events",
    "bad_trace_id",
    "bad_span_id",
    "bad_parent_span_id",
    "bad_timestamp",
    "bad_duration",
    "string_too_long",
    "too_many_keys",
    "too_deep",
    "array_too_long",
    "record_too_big",
)

_ZERO_TRACE: Final = bytes(16)
#: The latest time taken, in ns (the event model's :data:`~async_logging.model.MAX_TIMESTAMP_MS`).
_MAX_NS: Final = MAX_TIMESTAMP_MS * 1_000_000
#: A span's ``flags`` bits about its parent (OTLP 1.1): whether it says if the parent is
#: remote, and whether it is; a parent said to be local shares the span's resource.
_PARENT_FLAGS: Final = 0x300
_LOCAL_PARENT: Final = 0x100
_ZERO_SPAN: Final = bytes(8)
#: What an id that is not hex becomes in JSON (base64 of one byte): refused by its length.
_NOT_HEX: Final = "AA=="
_KINDS: Final = ("", "internal", "server", "client", "producer", "consumer")
_SERVER, _CLIENT = 2, 3
_ERROR_CODE = 2  # Status.STATUS_CODE_ERROR
#: Attributes that make a span an HTTP one (old and new semantic conventions).
_HTTP_SERVER_KEYS: Final = frozenset(
    {"http.request.method", "http.method", "http.route", "url.path", "http.target"}
)
_HTTP_CLIENT_KEYS: Final = frozenset({"http.request.method", "http.method", "url.full", "http.url"})
_SEVERITIES: Final = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
_SCALARS: Final = frozenset({"bool_value", "int_value", "double_value"})
#: The ``google.rpc.Code`` of an error answer, by HTTP status.
_GRPC_CODES: Final = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    408: code_pb2.DEADLINE_EXCEEDED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    503: code_pb2.UNAVAILABLE,
}


# ---------------------------------------------------------------------- decoding


def answer_kind(content_type: str) -> str:
    """The encoding of the answer to a request of ``content_type``: JSON for JSON, else
    protobuf (also for a content type that is refused)."""
    return JSON if content_type == JSON else PROTOBUF


def check_headers(content_type: str, content_encoding: str) -> str:
    """The request's encoding (:data:`PROTOBUF` or :data:`JSON`), before its body is read.

    Raises:
        DecodeError: ``unsupported_media_type`` or ``unsupported_encoding`` (415).
    """
    if content_type in (PROTOBUF, "application/protobuf"):
        kind = PROTOBUF
    elif content_type == JSON:
        kind = JSON
    else:
        exc = DecodeError(
            "unsupported_media_type",
            f"content type {content_type!r:.80} is neither {PROTOBUF} nor {JSON}",
        )
        exc.status = 415
        raise exc
    if content_encoding.strip().lower() not in ENCODINGS:
        exc = DecodeError(
            "unsupported_encoding",
            f"content encoding {content_encoding!r:.80} is not gzip, deflate or identity",
        )
        exc.status = 415
        raise exc
    return kind


def decode_request(signal: str, body: bytes, kind: str) -> Any:
    """The ``Export…ServiceRequest`` of ``signal`` (``traces`` or ``logs``) in ``body``.

    JSON follows the OTLP rules: trace and span ids are hex strings (not base64, as
    protobuf's own JSON mapping would have them), enums are integers, field names
    lowerCamelCase (snake_case accepted), unknown fields ignored.

    Raises:
        DecodeError: ``bad_protobuf`` or ``bad_json`` (400).
    """
    message = (
        trace_service.ExportTraceServiceRequest()
        if signal == "traces"
        else logs_service.ExportLogsServiceRequest()
    )
    if kind == PROTOBUF:
        try:
            message.ParseFromString(body)
        except (ProtobufDecodeError, RecursionError) as exc:
            raise DecodeError("bad_protobuf", f"not an OTLP {signal} request: {exc}") from exc
        return message
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("bad_json", f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("bad_json", f"an OTLP {signal} request is an object")
    _hex_ids_to_base64(data, signal)
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
        raise DecodeError("bad_json", f"not an OTLP {signal} request: {exc}") from exc
    return message


def _hex_ids_to_base64(data: dict[str, Any], signal: str) -> None:
    """OTLP/JSON's hex trace and span ids, as protobuf's JSON parser reads bytes (base64)."""
    ids: tuple[str, ...] = ("traceId", "trace_id", "spanId", "span_id")
    path: tuple[tuple[str, ...], ...]
    if signal == "traces":
        path = (("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"))
        leaf: tuple[str, ...] = ("spans",)
        ids_all = (*ids, "parentSpanId", "parent_span_id")
    else:
        path = (("resourceLogs", "resource_logs"), ("scopeLogs", "scope_logs"))
        leaf, ids_all = ("logRecords", "log_records"), ids
    for resource in _items(data, path[0]):
        for scope in _items(resource, path[1]):
            for item in _items(scope, leaf):
                _convert_ids(item, ids_all)
                if signal == "traces":
                    for link in _items(item, ("links",)):
                        _convert_ids(link, ids)


def _items(obj: Any, keys: Iterable[str]) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return value
    return []


def _convert_ids(obj: Any, keys: Iterable[str]) -> None:
    if not isinstance(obj, dict):
        return
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str):
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                obj[key] = _NOT_HEX


# ---------------------------------------------------------------------- mapping


@dataclass(slots=True)
class Mapped:
    """One request mapped onto the event model (see :func:`map_traces`)."""

    events: list[Event] = field(default_factory=list)
    """The events to feed now."""
    held: list[Event] = field(default_factory=list)
    """Root spans' ends, held for the settle (:class:`Settle`)."""
    items: int = 0
    """Spans or log records in the request."""
    refused: list[tuple[int, InvalidEvent]] = field(default_factory=list)
    """(item index, why) for each item refused."""
    starts: list[int] = field(default_factory=list)
    """Where each item's events begin in :attr:`events` (to name the item of an event the
    engine refuses)."""

    def item_of(self, index: int) -> int:
        """The item the event at ``index`` of :attr:`events` came from."""
        from bisect import bisect_right

        return bisect_right(self.starts, index) - 1


class _Limits:
    """The wire limits, as locals the mapping reads for every value."""

    __slots__ = ("array", "depth", "keys", "measure", "record", "string")

    def __init__(self, limits: wire.WireLimits, body_bytes: int) -> None:
        self.string = limits.max_string_length
        self.keys = limits.max_keys_per_map
        self.depth = limits.max_depth
        self.array = limits.max_array_length
        self.record = limits.max_record_bytes
        # As on the wire: no item is measured unless the body could hold one over the limit.
        self.measure = body_bytes * wire.RECORD_EXPANSION > limits.max_record_bytes


def _too_long(what: str, n: int, lim: _Limits) -> InvalidEvent:
    return InvalidEvent(
        "string_too_long", f"{what} of {n} characters is over the limit of {lim.string}"
    )


def _attributes(kvs: Any, lim: _Limits, depth: int, what: str = "attributes") -> dict[str, Any]:
    """OTLP ``KeyValue`` list → a dict (``depth``: the map's nesting, the event being 1)."""
    if len(kvs) > lim.keys:
        raise InvalidEvent(
            "too_many_keys", f"{what}: {len(kvs)} keys, over the limit of {lim.keys}"
        )
    if depth > lim.depth:
        raise InvalidEvent("too_deep", f"{what} nested deeper than the limit of {lim.depth}")
    out: dict[str, Any] = {}
    max_len = lim.string
    for kv in kvs:
        key = kv.key
        if len(key) > max_len:
            raise _too_long(f"a key in {what}", len(key), lim)
        v = kv.value
        x: Any = v.string_value
        if x:  # the common value, a string: read without asking which value is set
            if len(x) > max_len:
                raise _too_long(f"{what}[{key!r:.40}]", len(x), lim)
        else:
            which = v.WhichOneof("value")
            if which in _SCALARS:
                x = getattr(v, which)
            elif which is None:
                x = None
            elif which != "string_value":
                x = _nested(v, which, lim, depth + 1, what)
        out[key] = x
    return out


def _value(v: Any, lim: _Limits, depth: int, what: str) -> Any:
    """An OTLP ``AnyValue`` as a plain value (bytes as base64, as OTLP/JSON writes them)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        x = v.string_value
        if len(x) > lim.string:
            raise _too_long(what, len(x), lim)
        return x
    if which in _SCALARS:
        return getattr(v, which)
    if which is None:
        return None
    return _nested(v, which, lim, depth + 1, what)


def _nested(v: Any, which: str, lim: _Limits, depth: int, what: str) -> Any:
    if which == "bytes_value":
        encoded = base64.b64encode(v.bytes_value).decode()
        if len(encoded) > lim.string:
            raise _too_long(what, len(encoded), lim)
        return encoded
    if depth > lim.depth:
        raise InvalidEvent("too_deep", f"{what} nested deeper than the limit of {lim.depth}")
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values, lim, depth, what)
    values = v.array_value.values
    if len(values) > lim.array:
        raise InvalidEvent(
            "array_too_long", f"{what}: {len(values)} items, over the limit of {lim.array}"
        )
    return [_value(x, lim, depth, what) for x in values]


def _ms(ns: int, what: str) -> float:
    """Nanoseconds since the epoch as float milliseconds (microseconds kept), in range."""
    ms = ns / 1e6
    if not MIN_TIMESTAMP_MS <= ms <= MAX_TIMESTAMP_MS:
        raise InvalidEvent("bad_timestamp", f"{what} {ns} ns is outside the sane range")
    return ms


def _trace_id(tid: bytes, what: str = "trace id") -> str:
    if len(tid) != 16 or tid == _ZERO_TRACE:
        raise InvalidEvent(
            "bad_trace_id", f"{what} must be 16 bytes, not all zero (32 hex digits in JSON)"
        )
    return tid.hex()


def _span_id(sid: bytes, reason: str = "bad_span_id", what: str = "span id") -> str:
    if len(sid) != 8 or sid == _ZERO_SPAN:
        raise InvalidEvent(reason, f"{what} must be 8 bytes, not all zero (16 hex digits in JSON)")
    return sid.hex()


def span_type(kind: int, attributes: dict[str, Any] | None) -> str:
    """The CAL type of a span: an explicit ``cal.type`` attribute, else ``SQL`` for a
    database call, ``MQ`` for messaging, ``URL`` for an HTTP server span, ``HTTP`` for an
    HTTP client span, ``SPAN`` for anything else."""
    if attributes:
        explicit = attributes.get("cal.type")
        if explicit.__class__ is str and explicit:
            return explicit
        if "db.system" in attributes or "db.system.name" in attributes:
            return "SQL"
        if "messaging.system" in attributes:
            return "MQ"
        if kind == _SERVER:
            if not attributes.keys().isdisjoint(_HTTP_SERVER_KEYS):
                return "URL"
        elif kind == _CLIENT and not attributes.keys().isdisjoint(_HTTP_CLIENT_KEYS):
            return "HTTP"
    return "SPAN"


def _scopes(
    groups: Any, scoped_field: str, items_field: str, lim: _Limits, out: Mapped
) -> Iterator[tuple[dict[str, Any] | None, str | None, str, Any]]:
    """Each scope's items of a request, with what they share: ``(resource, its
    service.name, the scope's name, the items)``. The items under a resource that is
    refused are refused here (in ``out``), with its reason."""
    for group in groups:
        resource, bad_resource = _resource(group.resource, lim)
        pool = resource.get("service.name") if resource else None
        if pool.__class__ is not str:
            pool = None
        for scoped in getattr(group, scoped_field):
            items = getattr(scoped, items_field)
            if bad_resource is None:
                yield resource, pool, scoped.scope.name, items
                continue
            for _ in items:
                out.starts.append(len(out.events))
                out.refused.append((len(out.starts) - 1, bad_resource))


def _resource(resource: Any, lim: _Limits) -> tuple[dict[str, Any] | None, InvalidEvent | None]:
    """A resource's attributes (shared by every item under it), or why they are refused."""
    kvs = resource.attributes
    if not kvs:
        return None, None
    try:
        return _attributes(kvs, lim, 2, "resource"), None
    except InvalidEvent as exc:
        return None, exc


def map_traces(
    request: Any, limits: wire.WireLimits, *, body_bytes: int = 0, hold_roots: bool = False
) -> Mapped:
    """Map an ``ExportTraceServiceRequest`` onto the event model (docs/design.md §12).

    Each span gives a ``begin`` (``uuid`` the trace id, ``event`` the span id, ``parent``
    the parent span id or ``"0"``, ``type`` from :func:`span_type`, ``name``, ``timestamp``
    the start in float ms, ``pool`` the resource's ``service.name``, and ``spanKind``,
    ``attributes``, ``scope``, ``links``, ``traceState`` when set), its span events as
    atomic children (``type`` ``EVENT``), then an ``end`` (``timestamp`` the end,
    ``duration`` in float ms, ``status`` ``"0"`` or the error's message, ``"ERROR"`` when it
    has none; ``type`` and ``name`` again, for an end published alone). The resource's
    attributes (``resource``) go on the spans that begin a service's part of the trace: a
    root, or a span whose parent is remote or not said to be local (the span's ``flags``);
    a span with a local parent shares its parent's resource. With ``hold_roots`` the ends
    of root spans go to :attr:`Mapped.held`.

    A span is refused alone (:attr:`Mapped.refused`) for a bad id, a time out of range,
    an end before its start, or a value past the wire limits (``limits``): strings, keys
    per map, nesting, items per array (attributes, events, links), and its size as JSON
    when ``body_bytes`` could hold one that big.
    """
    lim = _Limits(limits, body_bytes)
    out = Mapped()
    events, held, refused, starts = out.events, out.held, out.refused, out.starts
    append = events.append
    max_len = lim.string
    max_ns = _MAX_NS
    zero_span = _ZERO_SPAN
    kinds = _KINDS
    last_tid: bytes | None = None
    uuid = ""
    for resource, pool, scope, spans in _scopes(
        request.resource_spans, "scope_spans", "spans", lim, out
    ):
        for s in spans:
            index = len(starts)
            starts.append(len(events))
            try:
                tid = s.trace_id
                if tid != last_tid:  # the spans of a trace come together: checked once
                    uuid = _trace_id(tid)
                    last_tid = tid
                sid = s.span_id
                if len(sid) != 8 or sid == zero_span:
                    _span_id(sid)  # raises, naming it
                eid = sid.hex()
                psid = s.parent_span_id
                if psid:
                    if len(psid) != 8 or psid == zero_span:
                        _span_id(psid, "bad_parent_span_id", "parent span id")
                    parent = psid.hex()
                    segment = s.flags & _PARENT_FLAGS != _LOCAL_PARENT
                else:
                    parent = ROOT_PARENT
                    segment = True
                name = s.name
                if len(name) > max_len:
                    raise _too_long("span name", len(name), lim)
                start_ns = s.start_time_unix_nano
                end_ns = s.end_time_unix_nano
                if not 0 <= start_ns <= end_ns <= max_ns:
                    _check_times(start_ns, end_ns)  # raises, naming what is wrong
                kvs = s.attributes
                attrs = _attributes(kvs, lim, 2) if kvs else None
                kind = s.kind
                cal_type = span_type(kind, attrs) if attrs else "SPAN"
                ts = start_ns / 1e6
                begin: Event = {
                    "clazz": BEGIN,
                    "uuid": uuid,
                    "event": eid,
                    "parent": parent,
                    "type": cal_type,
                    "name": name,
                    "timestamp": ts,
                }
                if 0 < kind < 6:
                    begin["spanKind"] = kinds[kind]
                if attrs:
                    begin["attributes"] = attrs
                if pool is not None:
                    begin["pool"] = pool
                if resource and segment:
                    begin["resource"] = resource
                if scope:
                    begin["scope"] = scope
                trace_state = s.trace_state
                if trace_state:
                    begin["traceState"] = trace_state
                links = s.links
                if links:
                    begin["links"] = _links(links, lim)
                evs = s.events
                kids = _span_events(evs, uuid, eid, ts, lim) if evs else None
                status = s.status
                end: Event = {
                    "clazz": END,
                    "uuid": uuid,
                    "event": eid,
                    "parent": parent,
                    "type": cal_type,
                    "name": name,
                    "timestamp": end_ns / 1e6,
                    "duration": (end_ns - start_ns) / 1e6,
                    "status": (status.message or "ERROR") if status.code == _ERROR_CODE else "0",
                }
                # Last, where the engine's mapper puts it: these events skip it (premapped).
                begin["request"] = uuid
                end["request"] = uuid
                if lim.measure:
                    _measure(begin, kids, lim)
            except InvalidEvent as exc:
                refused.append((index, exc))
                continue
            append(begin)
            if kids:
                events.extend(kids)
            if hold_roots and parent == ROOT_PARENT:
                held.append(end)
            else:
                append(end)
    out.items = len(starts)
    return out


def _check_times(start_ns: int, end_ns: int) -> None:
    """Raise the refusal of a span's times (called only when they are wrong)."""
    _ms(start_ns, "start time")
    _ms(end_ns, "end time")
    raise InvalidEvent(
        "bad_duration", f"the span ends {(start_ns - end_ns) / 1e6} ms before it starts"
    )


def _links(links: Any, lim: _Limits) -> list[dict[str, Any]]:
    if len(links) > lim.array:
        raise InvalidEvent("array_too_long", f"{len(links)} links, over the limit of {lim.array}")
    out = []
    for link in links:
        item: dict[str, Any] = {
            "traceId": _trace_id(link.trace_id, "a link's trace id"),
            "spanId": _span_id(link.span_id, what="a link's span id"),
        }
        if link.attributes:
            item["attributes"] = _attributes(link.attributes, lim, 4, "a link's attributes")
        out.append(item)
    return out


def _span_events(evs: Any, uuid: str, parent: str, start: float, lim: _Limits) -> list[Event]:
    """A span's events as atomic children of the span (an exception's message as ``msg``)."""
    if len(evs) > lim.array:
        raise InvalidEvent(
            "array_too_long", f"{len(evs)} span events, over the limit of {lim.array}"
        )
    out: list[Event] = []
    for ev in evs:
        name = ev.name
        if len(name) > lim.string:
            raise _too_long("a span event's name", len(name), lim)
        e: Event = {
            "clazz": ATOMIC,
            "uuid": uuid,
            "parent": parent,
            "type": "EVENT",
            "name": name,
            "timestamp": _ms(ev.time_unix_nano, "a span event's time")
            if ev.time_unix_nano
            else start,
        }
        if ev.attributes:
            attrs = e["attributes"] = _attributes(
                ev.attributes, lim, 2, "a span event's attributes"
            )
            if name == "exception":
                e["level"] = "ERROR"
                message = attrs.get("exception.message")
                if message.__class__ is str:
                    e["msg"] = message
        e["request"] = uuid  # as the engine's mapper would (premapped)
        out.append(e)
    return out


def _measure(e: Event, more: list[Event] | None, lim: _Limits) -> None:
    for item in (e, *(more or ())):
        size = len(orjson.dumps(item))
        if size > lim.record:
            raise InvalidEvent(
                "record_too_big",
                f"an event of {size} bytes as JSON is over the limit of {lim.record}",
            )


def map_logs(request: Any, limits: wire.WireLimits, *, body_bytes: int = 0) -> Mapped:
    """Map an ``ExportLogsServiceRequest`` onto the event model (docs/design.md §12).

    Each log record is an ``atomicEvent`` of ``type`` ``LOG``: ``name`` its event name or
    its scope's (the logger's), ``logger`` the scope's name, ``level`` its severity text
    (or the name of its severity number), ``msg`` its body (a string; another body is kept
    as ``body`` and written as JSON in ``msg``), ``timestamp`` its time (the observed time
    when it has none; the time received when it has neither), ``attributes`` and
    ``pool``. With a trace id it has that ``uuid``, and with a span id too that span as
    ``parent``: it is an event of that span's tree (whose spans carry the resource).
    Without a span id it is published on its own, with the ``resource``. Refusals as in
    :func:`map_traces`.
    """
    lim = _Limits(limits, body_bytes)
    out = Mapped()
    events, refused, starts = out.events, out.refused, out.starts
    max_len = lim.string
    for resource, pool, scope, records in _scopes(
        request.resource_logs, "scope_logs", "log_records", lim, out
    ):
        for r in records:
            index = len(starts)
            starts.append(len(events))
            try:
                name = getattr(r, "event_name", "") or scope or "log"
                if len(name) > max_len:
                    raise _too_long("the log record's name", len(name), lim)
                e: Event = {"clazz": ATOMIC, "type": "LOG", "name": name}
                ns = r.time_unix_nano or r.observed_time_unix_nano
                if ns:
                    e["timestamp"] = _ms(ns, "time")
                if r.trace_id:
                    e["uuid"] = _trace_id(r.trace_id)
                    if r.span_id:
                        e["parent"] = _span_id(r.span_id)
                elif r.span_id:
                    _span_id(r.span_id)  # a span id without a trace id: checked, unused
                if scope:
                    e["logger"] = scope
                level = r.severity_text or _severity(r.severity_number)
                if level:
                    e["level"] = level
                if r.HasField("body"):
                    body = _value(r.body, lim, 1, "the log record's body")
                    if body.__class__ is str:
                        e["msg"] = body
                    elif body is not None:  # an empty AnyValue: no body
                        e["body"] = body
                        e["msg"] = orjson.dumps(body).decode()
                if r.attributes:
                    e["attributes"] = _attributes(r.attributes, lim, 2)
                if pool is not None:
                    e["pool"] = pool
                if resource and "parent" not in e:  # in a span's tree: the span's resource
                    e["resource"] = resource
                if lim.measure:
                    _measure(e, None, lim)
            except InvalidEvent as exc:
                refused.append((index, exc))
                continue
            events.append(e)
    out.items = len(starts)
    return out


def _severity(number: int) -> str:
    """An OTLP severity number (1-24) as its short name (TRACE … FATAL); "" when unset."""
    if 1 <= number <= 24:
        return _SEVERITIES[(number - 1) // 4]
    return ""


def count_items(signal: str, request: Any) -> int:
    """Spans or log records in a request, counted before any is mapped."""
    if signal == "traces":
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)


# ---------------------------------------------------------------------- answers


def success_body(signal: str, kind: str, rejected: int, message: str) -> bytes:
    """The 200 answer's body: an ``Export…ServiceResponse`` in the request's encoding,
    with ``partial_success`` when ``rejected`` items were refused."""
    if signal == "traces":
        response = trace_service.ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
    else:
        response = logs_service.ExportLogsServiceResponse()
        if rejected:
            response.partial_success.rejected_log_records = rejected
    if rejected:
        response.partial_success.error_message = message
    return _encode(response, kind)


def status_body(status: int, kind: str, message: str) -> bytes:
    """An error answer's body: a ``google.rpc.Status`` in the request's encoding."""
    return _encode(
        status_pb2.Status(code=_GRPC_CODES.get(status, code_pb2.UNKNOWN), message=message), kind
    )


def _encode(message: Any, kind: str) -> bytes:
    if kind == JSON:
        return orjson.dumps(json_format.MessageToDict(message))
    return message.SerializeToString()  # type: ignore[no-any-return]


def refusal_message(what: str, refused: list[tuple[int, BadInput]]) -> str:
    """``partial_success.error_message``: how many were refused and the first reasons."""
    first = "; ".join(
        f"{what[:-1]} {i}: {exc.reason}: {exc.detail}" for i, exc in refused[:MAX_REASONS_LISTED]
    )
    return f"{len(refused)} {what} refused ({first})"


# ---------------------------------------------------------------------- settle


@dataclass(slots=True)
class _Held:
    """One request's part of the settle: its root spans' ends, its whole trees."""

    due: float
    ends: list[Event]
    trees: bytes
    roots: int
    uuids: list[str]


class Settle:
    """Root spans held back ``seconds`` so that the rest of their trees joins them.

    Two forms: the ``end`` of a root span whose tree is open in the engine (its trace came
    partly in another request), and whole trees kept outside the engine as one MessagePack
    array of their events (``trees``, :func:`split_whole`), which cost no engine work and no
    cycle collector's scan while they wait, and then go through the native fast path. When
    anything more of a trace held whole comes, :meth:`unhold` turns its request's trees into
    the first form, as if they had been fed when they came.

    Sans-I/O: the caller gives the time (any monotonic clock, in seconds). The same
    ``seconds`` for everything held, so the earliest due is always the first held.
    """

    __slots__ = ("_held", "count", "nbytes", "seconds", "uuids")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._held: deque[_Held] = deque()
        #: Root spans held right now (ends, and roots of the trees held whole).
        self.count = 0
        #: Bytes of the trees held whole.
        self.nbytes = 0
        #: The uuids of the trees held whole.
        self.uuids: set[str] = set()

    def hold(
        self,
        ends: list[Event],
        now: float,
        trees: bytes = b"",
        roots: int = 0,
        uuids: Iterable[str] = (),
    ) -> None:
        """Hold ``ends``, and ``trees`` (of the traces ``uuids``, holding ``roots`` root
        spans), until ``now + seconds``."""
        if ends or trees:
            whole = list(uuids)
            self._held.append(_Held(now + self.seconds, ends, trees, roots, whole))
            self.count += len(ends) + roots
            self.nbytes += len(trees)
            self.uuids.update(whole)

    @property
    def next_due(self) -> float | None:
        """When the earliest held end is due (None: nothing held)."""
        return self._held[0].due if self._held else None

    def due(self, now: float) -> tuple[list[Event], list[bytes]]:
        """The ends and trees due at ``now``, no longer held."""
        return self._release(lambda due: due <= now)

    def shed(self, max_bytes: int) -> tuple[list[Event], list[bytes]]:
        """The oldest ends and trees, before they are due, until the trees still held fit
        ``max_bytes``."""
        return self._release(lambda _: self.nbytes > max_bytes)

    def take_all(self) -> tuple[list[Event], list[bytes]]:
        """Everything held, no longer held (at a drain)."""
        return self._release(lambda _: True)

    def unhold(self, uuids: Set[str]) -> list[Event]:
        """Undo the holding whole of the requests that hold any of ``uuids`` whole.

        Returns their trees' events, but for the ends of their root spans, which stay held,
        due as before: what feeding them when they came would have fed, for the caller to
        feed now (before anything more of those traces).
        """
        out: list[Event] = []
        for entry in self._held:
            if entry.trees and not uuids.isdisjoint(entry.uuids):
                for e in msgspec.msgpack.decode(entry.trees):
                    if e["parent"] == ROOT_PARENT and e["clazz"] == END:
                        entry.ends.append(e)
                        self.count += 1
                    else:
                        out.append(e)
                self.count -= entry.roots
                self.nbytes -= len(entry.trees)
                self.uuids.difference_update(entry.uuids)
                entry.trees, entry.roots, entry.uuids = b"", 0, []
        return out

    def _release(self, take: Callable[[float], bool]) -> tuple[list[Event], list[bytes]]:
        ends: list[Event] = []
        frames: list[bytes] = []
        held = self._held
        while held and take(held[0].due):
            entry = held.popleft()
            ends.extend(entry.ends)
            self.count -= len(entry.ends) + entry.roots
            if entry.trees:
                frames.append(entry.trees)
                self.nbytes -= len(entry.trees)
                self.uuids.difference_update(entry.uuids)
        return ends, frames


_UUID: Final = operator.itemgetter("uuid")
_PARENT: Final = operator.itemgetter("parent")
_EVENT_ID: Final = operator.methodcaller("get", "event")
_ROOT_ONLY: Final = (ROOT_PARENT,)


@dataclass(slots=True)
class Split:
    """A request's span events cut by :func:`split_whole`."""

    whole: list[Event] = field(default_factory=list)
    """The events of the traces the request holds whole, trace after trace."""
    trees: int = 0
    """Root spans among :attr:`whole`."""
    uuids: list[str] = field(default_factory=list)
    """The traces of :attr:`whole`."""
    rest: list[Event] = field(default_factory=list)
    """The other traces' events, to feed to the engine now."""
    held: list[Event] = field(default_factory=list)
    """The ends of the root spans among the rest, when asked to hold them."""


def split_whole(events: list[Event], known: Callable[[str], bool], hold_roots: bool) -> Split:
    """Cut the events :func:`map_traces` made of a request into the traces it holds whole
    and the rest.

    A trace is whole when it has a root span, the parent of each of its spans is among
    them, and nothing of its uuid is ``known`` elsewhere (open in the engine, held whole
    already, published: such events must meet the others in the engine, at once, as they
    would on the reference path). Its spans each came with their begin and end, so its
    tree is complete, and the native fast path can take it as one frame. Whatever that path
    declines is still fed to the engine, so this cut only chooses the faster road. With
    ``hold_roots`` the ends of root spans among the rest go to :attr:`Split.held`, as
    :func:`map_traces` would hold them.
    """
    by_trace: dict[str, list[Event]] = {}
    for uuid, run in groupby(events, _UUID):  # a trace's spans mostly come together
        mine = by_trace.get(uuid)
        if mine is None:
            by_trace[uuid] = list(run)
        else:
            mine.extend(run)
    out = Split()
    for uuid, mine in by_trace.items():
        roots = 0
        if not known(uuid):
            parents = list(map(_PARENT, mine))
            # A span is a begin and an end: a root span, two events whose parent is "0".
            roots = parents.count(ROOT_PARENT) // 2
            if roots and set(parents).difference(map(_EVENT_ID, mine), _ROOT_ONLY):
                roots = 0  # a parent is elsewhere
        if roots:
            out.whole.extend(mine)
            out.trees += roots
            out.uuids.append(uuid)
        elif hold_roots:
            rest, held = out.rest, out.held
            for e in mine:
                if e["parent"] == ROOT_PARENT and e["clazz"] == END:
                    held.append(e)
                else:
                    rest.append(e)
        else:
            out.rest.extend(mine)
    return out


# ---------------------------------------------------------------------- the shell


class OtlpIngest:
    """The OTLP routes of one listener: decode, map, feed the pipeline, answer.

    The listener reads the body (its guard, in-flight budget, size and time limits and
    tokens apply as for ``POST /log``) and calls :meth:`take`; this object owns the settle
    timer and counts what it took (:meth:`snapshot`: ``received{signal}`` spans and log
    records, ``held`` root spans waiting, ``held_bytes`` of trees held whole,
    ``released_early`` trees let go before their settle to keep within that bound).

    In front of the server's own engine with its native fast path and no spool, the traces
    a request holds whole (:func:`split_whole`) skip the engine: they are held whole
    (:class:`Settle`) or, with no settle, go at once through the fast path
    (:meth:`Pipeline.feed_trees <.pipeline.Pipeline.feed_trees>`). The trees held whole
    are bounded by the engine's ``max_open_bytes`` (the bytes of their MessagePack, on top
    of the engine's own open trees): past it the oldest held go early (whole or as held
    ends), complete, counted in ``released_early``. With a spool, whose checkpoint follows
    the trees open in the engine, every span goes to the engine.

    Args:
        pipeline: where the events go (the listener's :class:`~.listener.Ingest`).
        settle: seconds a root span's end is held (0: fed at once). Only in front of the
            server's own engine (a :class:`~.pipeline.Pipeline`): behind a bus, where the
            ack says the bus holds the batch, every end goes with its request.
        limits: the wire limits every item is checked against.
        clock: the loop's clock by default (seconds); injected in tests.
    """

    def __init__(
        self,
        pipeline: Ingest,
        settle: float = DEFAULT_SETTLE,
        limits: wire.WireLimits | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.limits = limits or pipeline.wire_limits
        self.settle = Settle(settle)
        self.received: Counter[str] = Counter()
        #: The settle's clock (seconds; None: the event loop's); tests move their own.
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None
        #: Trees (root spans) let go before their settle, the whole ones held past their bound.
        self.released_early = 0
        # Set by release_all (a drain): nothing is held any more, what comes is fed at once.
        self._released = False

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/metrics``: items received by signal, root spans held, the bytes
        of trees held whole and the trees let go early."""
        return {
            "received": {item: self.received[item] for item in ITEMS},
            "held": self.settle.count,
            "held_bytes": self.settle.nbytes,
            "released_early": self.released_early,
        }

    def _now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    async def take(self, signal: str, kind: str, body: bytes) -> web.Response:
        """Decode, map and feed one request's ``body``; the answer to send.

        Raises:
            BadInput: the request is refused whole (counted by the caller).
        """
        request = decode_request(signal, body, kind)
        items = count_items(signal, request)
        if items > self.limits.max_events_per_frame:
            raise LimitExceeded(
                "too_many_events",
                f"{items} {'spans' if signal == 'traces' else 'log records'} in one request, "
                f"over the limit of {self.limits.max_events_per_frame}",
            )
        pipeline = self.pipeline
        own = pipeline if isinstance(pipeline, Pipeline) else None
        # Whole traces can skip the engine (see the class): no spool, the native path on.
        fast = (
            own is not None
            and signal == "traces"
            and own.spool is None
            and bool(getattr(own.buffer, "native", False))
        )
        if signal == "traces":
            # Root ends are cut out here, unless split_whole does it or nothing is held.
            hold_roots = own is not None and not fast and self.settle.seconds > 0
            mapped = map_traces(request, self.limits, body_bytes=len(body), hold_roots=hold_roots)
            what = "spans"
        else:
            mapped = map_logs(request, self.limits, body_bytes=len(body))
            what = "log_records"
        del request
        refused: list[tuple[int, BadInput]] = list(mapped.refused)
        stats = pipeline.stats
        for _, exc in refused:
            stats.bad_input[exc.reason] += 1
        fed: Fed | None = None
        events = mapped.events
        if own is not None and (events or mapped.held):
            fed, events = await self._into_pipeline(own, signal, mapped, fast)
        elif events:
            raw = None
            if pipeline.spool is not None:
                raw = (spool.REBASE, msgspec.msgpack.encode(events))
            fed = await pipeline.accept(events, raw)
        if fed is not None and fed.rejected:  # never expected: the mapping makes what is taken
            seen = {i for i, _ in refused}
            index = {id(e): i for i, e in enumerate(mapped.events)}
            for i, exc in fed.rejected:
                item = mapped.item_of(index[id(events[i])])
                if item not in seen:
                    seen.add(item)
                    refused.append((item, exc))
            refused.sort(key=lambda r: r[0])
        taken = mapped.items - len(refused)
        self.received[what] += taken
        label = "spans" if signal == "traces" else "log records"
        if refused and taken == 0:  # as POST /log: 400 when every item was refused
            reason = refused[0][1].reason
            return self.status_response(400, reason, refusal_message(label, refused), kind)
        message = refusal_message(label, refused) if refused else ""
        return web.Response(
            body=success_body(signal, kind, len(refused), message), content_type=kind
        )

    async def _into_pipeline(
        self, pipeline: Pipeline, signal: str, mapped: Mapped, fast: bool
    ) -> tuple[Fed | None, list[Event]]:
        """Feed and hold one request's events in front of the server's own engine; what
        was fed to the engine (and the events, to name a refused one's item).

        One wait for room, then no await: the request, and whatever of the settle it lets
        go, is taken whole or not at all (the pipeline cannot start closing meanwhile, nor
        another request come in between).
        """
        await pipeline.wait_for_room()
        settle = self.settle
        hold = settle.seconds > 0 and not self._released
        events, held = mapped.events, mapped.held
        if held and not hold:  # a drain began while this request waited: nothing is held
            events, held = events + held, []
        if settle.uuids and events:
            touched = settle.uuids.intersection([e.get("uuid") for e in events])
            if touched:
                # More of a trace held whole: its request's trees are fed first, their root
                # ends held on, as if they had been fed when they came.
                pipeline.feed_now(settle.unhold(touched), premapped=True)
        if fast and events:
            buffer, whole_held = pipeline.buffer, settle.uuids
            memory = buffer.published_memory
            split = split_whole(
                events,
                lambda uuid: uuid in whole_held or buffer.is_open(uuid) or uuid in memory,
                hold,
            )
            events, held = split.rest, split.held
            if split.whole:
                trees = msgspec.msgpack.encode(split.whole)
                if hold:
                    settle.hold([], self._now(), trees, split.trees, split.uuids)
                else:
                    pipeline.feed_trees(trees)
        fed = None
        if events or held:
            raw = None
            if pipeline.spool is not None:
                # The mapped events (held ends too) as the server's own record: replayed
                # without the wire's per-frame limits, which count events, not spans.
                raw = (spool.REBASE, msgspec.msgpack.encode(events + held))
            fed = pipeline.feed_now(events, raw, premapped=signal == "traces")
            if held:
                settle.hold(held, self._now())
        # Trees are held whole only in front of a LogBuffer, whose bound they keep to.
        if settle.nbytes and settle.nbytes > pipeline.buffer.limits.max_open_bytes:
            before = settle.count
            self._let_go(*settle.shed(pipeline.buffer.limits.max_open_bytes))
            self.released_early += before - settle.count
        self._arm()
        return fed, events

    def error(self, exc: BadInput, kind: str) -> web.Response:
        """The answer to a request refused whole: a ``Status`` naming the reason."""
        return self.status_response(exc.status, exc.reason, exc.detail, kind)

    @staticmethod
    def status_response(status: int, reason: str, detail: str, kind: str) -> web.Response:
        """An error answer (``Retry-After`` on a 503)."""
        response = web.Response(
            status=status,
            body=status_body(status, kind, f"{reason}: {detail}" if detail else reason),
            content_type=kind,
        )
        if status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    # ------------------------------------------------------------------ settle timer

    def _arm(self) -> None:
        """Wake up when the earliest held end is due (one timer at a time)."""
        if self._timer is not None:
            return
        due = self.settle.next_due
        if due is None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, due - self._now()), self.release_due)

    def release_due(self) -> None:
        """Feed what is due (the settle timer calls it; so may a test that moved
        :attr:`clock`), and wait for the next."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._let_go(*self.settle.due(self._now()))
        self._arm()

    def _let_go(self, ends: list[Event], frames: list[bytes]) -> None:
        """Feed held ends (in the spool with their request already, if there is one) and
        trees held whole, at once: taken already and bounded, they wait for no room."""
        if not ends and not frames:
            return
        pipeline = self.pipeline
        try:
            assert isinstance(pipeline, Pipeline)  # only in front of one is anything held
            if ends:
                pipeline.feed_now(ends, premapped=True)
            for trees in frames:
                pipeline.feed_trees(trees)
        except Exception:  # never expected: the drain lets go of all before the close
            log.exception(
                "OTLP settle: %d held root span ends and %d requests' whole trees could not be fed",
                len(ends),
                len(frames),
            )

    async def release_all(self) -> None:
        """Feed everything held now, and hold nothing from then on (the server drains: the
        trees are published complete). Call it before the pipeline closes."""
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._let_go(*self.settle.take_all())

    def close(self) -> None:
        """Stop the timer (what is still held stays held: call :meth:`release_all` first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
