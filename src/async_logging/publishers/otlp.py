"""The OTLP exporter: every published tree also goes out as spans over OTLP/HTTP (docs/design.md §12).

:class:`OtlpExporter` is a publisher (``--otlp-endpoint URL``, ``--otlp-header K=V``) that
follows the published records without ever holding up ingest: ``publish_many`` only puts
the batch on the exporter's own bounded queue (``max_queue`` records; past it the oldest
are dropped, counted ``queue_full``) and returns; a thread of its own turns records into
``ExportTraceServiceRequest`` and ``ExportLogsServiceRequest`` messages (the official
``opentelemetry-proto`` classes), at most :data:`MAX_BATCH_ITEMS` spans or log records a
request, gzipped, and posts them (``application/x-protobuf``).

**Mapping.** A transaction node is a span: trace id from ``uuid`` (32 hex digits are taken
as they are, anything else hashed to 16 bytes), span id from ``event`` (16 hex digits as
they are, else hashed with the uuid), parent span id from ``parent`` (none for ``"0"``),
so the parent links are those the events carried, whatever the record's shape (an orphan
hung under its root keeps its own parent id); ``name``, start and end from ``timestamp``
and ``duration``, status ``UNSET`` for ``"0"`` and ``"-1"``, else ``ERROR`` with the
status as its message; ``spanKind`` (from OTLP) or the CAL type's
(``URL`` server, ``HTTP``/``SQL``/``API`` client, ``MQ`` producer, else internal); the
``attributes`` it came with, and every other key as a ``cal.<key>`` attribute
(``cal.type``, ``cal.complete``, ``cal.reason``, ``cal.msg`` …). Its atomic children are
its span events. The ``resource`` it came with (or ``service.name`` from ``pool``,
``host.name`` from ``machine``) groups it. A record that is not a transaction (a
stand-alone atomic event, a late one, a heartbeat) is a log record, with its trace and
span ids when it has a uuid and a parent.

**Delivery**, as the OTLP specification says: a 2xx is done (a ``partial_success``'s
rejected items are counted ``rejected``); 429, 502, 503 and 504 and connection errors are
retried after an exponential backoff with jitter (:data:`BACKOFF_INITIAL` doubling to
:data:`BACKOFF_MAX`), or after the ``Retry-After`` the receiver asked for, until
``retry_for`` seconds have passed since the first try (then ``retry_exhausted``); any other
status drops the request (``refused``). At :meth:`close` the exporter gets ``close_timeout``
seconds to send what is queued; what is left is counted ``shutdown``. Counters:
:meth:`snapshot` (``async_logging_otlp_export_*`` on ``/metrics``).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import random
import ssl
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Final

from google.protobuf.message import DecodeError as ProtobufDecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import (
    logs_service_pb2 as logs_service,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2 as trace_service,
)
from opentelemetry.proto.common.v1 import common_pb2 as common
from opentelemetry.proto.logs.v1 import logs_pb2 as logs
from opentelemetry.proto.resource.v1 import resource_pb2 as resource_pb
from opentelemetry.proto.trace.v1 import trace_pb2 as trace

from ..buffer import Record
from ..exceptions import ConfigError
from .base import BasePublisher

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "CLOSE_TIMEOUT",
    "DROP_REASONS",
    "MAX_BATCH_ITEMS",
    "RETRYABLE_STATUSES",
    "OtlpExporter",
    "records_to_requests",
]

log = logging.getLogger("async_logging.server")

#: Spans (or log records) in one export request at most (the SDK's batch size).
MAX_BATCH_ITEMS: Final = 512
#: Records waiting for the exporter at most (the ``otlp_export_queue`` option's default).
DEFAULT_MAX_QUEUE: Final = 10_000
#: Seconds one request may take (connect, send, answer).
REQUEST_TIMEOUT: Final = 10.0
#: Seconds a request is retried for, from its first try, before it is given up.
RETRY_FOR: Final = 60.0
#: First backoff (seconds) after a retryable failure; doubled each time up to the max.
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 32.0
#: Jitter of a backoff: a random factor in [1 - JITTER, 1 + JITTER].
JITTER: Final = 0.2
#: Seconds :meth:`OtlpExporter.close` waits for the queue to be sent.
CLOSE_TIMEOUT: Final = 5.0
#: Statuses the OTLP specification has a client retry (with ``Retry-After`` when given).
RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
#: Why published records (trees, stand-alone events) were not delivered
#: (``otlp_export_dropped{reason}``): the queue was full (the oldest dropped), the retries
#: ran out, the receiver refused the request (a status not retried), or the server
#: stopped before they were sent. (Items a receiver refuses inside an accepted request,
#: its ``partial_success``, are counted apart: ``otlp_export_rejected``.)
DROP_REASONS: Final = ("queue_full", "retry_exhausted", "refused", "shutdown")
#: Keys of a record that are the span itself, not ``cal.*`` attributes.
_STRUCTURAL: Final = frozenset(
    {
        "kind",
        "children",
        "uuid",
        "request",
        "event",
        "parent",
        "timestamp",
        "duration",
        "name",
        "status",
        "attributes",
        "resource",
        "scope",
        "spanKind",
        "links",
        "traceState",
    }
)
_SPAN_KINDS: Final = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
_TYPE_KINDS: Final = {"URL": 2, "HTTP": 3, "SQL": 3, "DB": 3, "API": 3, "MQ": 4}
_SEVERITY: Final = {
    "TRACE": 1,
    "DEBUG": 5,
    "INFO": 9,
    "WARN": 13,
    "WARNING": 13,
    "ERROR": 17,
    "CRITICAL": 21,
    "FATAL": 21,
}
_HEX = frozenset("0123456789abcdefABCDEF")
_INT64 = (-(2**63), 2**63 - 1)
_SCOPE: Final = common.InstrumentationScope(name="async-logging")


# ---------------------------------------------------------------------- mapping


def _hex_id(value: str, size: int) -> bytes | None:
    """``value`` as ``size`` bytes when it is that many hex digits and not all zero."""
    if len(value) == 2 * size and _HEX.issuperset(value):
        raw = bytes.fromhex(value)
        if any(raw):
            return raw
    return None


def trace_id(uuid: object) -> bytes:
    """A record's trace id: its uuid when it is 32 hex digits, else a hash of it."""
    text = str(uuid)
    return _hex_id(text, 16) or hashlib.blake2b(text.encode(), digest_size=16).digest()


def span_id(uuid: object, event: object) -> bytes:
    """A span id: the event id when it is 16 hex digits, else a hash of it and its uuid."""
    text = str(event)
    got = _hex_id(text, 8)
    if got is not None:
        return got
    digest = hashlib.blake2b(f"{uuid}\0{text}".encode(), digest_size=8).digest()
    return digest if any(digest) else b"\0" * 7 + b"\1"


def any_value(value: object) -> Any:
    """A plain value as an OTLP ``AnyValue``."""
    if value is None:
        return common.AnyValue()
    if isinstance(value, str):
        return common.AnyValue(string_value=value)
    if isinstance(value, bool):
        return common.AnyValue(bool_value=value)
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return common.AnyValue(int_value=value)
        return common.AnyValue(string_value=str(value))
    if isinstance(value, float):
        return common.AnyValue(double_value=value)
    if isinstance(value, dict):
        return common.AnyValue(kvlist_value=common.KeyValueList(values=key_values(value)))
    if isinstance(value, list | tuple):
        return common.AnyValue(array_value=common.ArrayValue(values=[any_value(v) for v in value]))
    return common.AnyValue(string_value=str(value))


def key_values(attrs: Mapping[str, object]) -> list[Any]:
    """A dict as OTLP ``KeyValue`` s."""
    return [common.KeyValue(key=str(k), value=any_value(v)) for k, v in attrs.items()]


def _attributes(node: Record) -> list[Any]:
    """A node's own ``attributes`` and its other keys as ``cal.<key>``."""
    out: list[Any] = []
    own = node.get("attributes")
    if isinstance(own, dict):
        out.extend(key_values(own))
    for k, v in node.items():
        if k not in _STRUCTURAL:
            out.append(common.KeyValue(key="cal." + str(k), value=any_value(v)))
    return out


def _ns(ms: object) -> int:
    """Milliseconds (int, or float to the microsecond) as nanoseconds; 0 when not a number.

    A float's whole milliseconds and its fraction are converted apart: ``ms * 1e6`` as a
    float would lose the microseconds of a timestamp (past 2**53 ns).
    """
    if isinstance(ms, bool) or ms is None:
        return 0
    if isinstance(ms, int):
        return max(0, ms * 1_000_000)
    if isinstance(ms, float) and math.isfinite(ms) and ms > 0:
        whole = int(ms)
        return whole * 1_000_000 + round((ms - whole) * 1_000) * 1_000
    return 0


def _resource_of(node: Record) -> dict[str, Any]:
    """A record's own ``resource`` (from OTLP), else one made of its ``pool`` and
    ``machine``."""
    own = node.get("resource")
    if isinstance(own, dict):
        return own
    out: dict[str, Any] = {"service.name": str(node.get("pool") or "async-logging")}
    if node.get("machine"):
        out["host.name"] = str(node["machine"])
    return out


#: Per signal: the request class, and how its items nest (resource → scope → items).
_SHAPES: Final[dict[str, tuple[Any, str, Any, str, Any, str]]] = {
    "traces": (
        trace_service.ExportTraceServiceRequest,
        "resource_spans",
        trace.ResourceSpans,
        "scope_spans",
        trace.ScopeSpans,
        "spans",
    ),
    "logs": (
        logs_service.ExportLogsServiceRequest,
        "resource_logs",
        logs.ResourceLogs,
        "scope_logs",
        logs.ScopeLogs,
        "log_records",
    ),
}


class _Batch:
    """Spans and log records of one request each, grouped by resource."""

    def __init__(self) -> None:
        # signal -> resource key -> (resource, items)
        self.groups: dict[str, dict[bytes, tuple[dict[str, Any], list[Any]]]] = {
            "traces": {},
            "logs": {},
        }
        self.items = {"traces": 0, "logs": 0}
        self.records = {"traces": 0, "logs": 0}  # published records they were made of
        self._keys: dict[int, bytes] = {}  # id(resource dict) -> its key, for this batch
        self._held: list[dict[str, Any]] = []  # the dicts behind those ids, kept alive

    def add(self, signal: str, res: dict[str, Any], item: Any) -> None:
        key = self._keys.get(id(res))
        if key is None:
            key = repr(sorted(res.items(), key=lambda kv: str(kv[0]))).encode()
            self._keys[id(res)] = key
            self._held.append(res)
        groups = self.groups[signal]
        group = groups.get(key)
        if group is None:
            group = groups[key] = (res, [])
        group[1].append(item)
        self.items[signal] += 1

    def request(self, signal: str) -> Any:
        """The ``Export…ServiceRequest`` of ``signal``."""
        request, groups_field, group_cls, scoped_field, scoped_cls, items_field = _SHAPES[signal]
        return request(
            **{
                groups_field: [
                    group_cls(
                        resource=resource_pb.Resource(attributes=key_values(res)),
                        **{scoped_field: [scoped_cls(scope=_SCOPE, **{items_field: items})]},
                    )
                    for res, items in self.groups[signal].values()
                ]
            }
        )


def _span(node: Record, tid: bytes, uuid: object) -> tuple[Any, list[Record]]:
    """One transaction node as a span (its atomic children as span events), and its
    transaction children, which are spans of their own."""
    start = _ns(node.get("timestamp"))
    end = start + _ns(node.get("duration"))
    parent = node.get("parent")
    status = node.get("status")
    kind = _SPAN_KINDS.get(str(node.get("spanKind")), 0) or _TYPE_KINDS.get(
        str(node.get("type")), 1
    )
    events: list[Any] = []
    nested: list[Record] = []
    for child in node.get("children") or ():
        if not isinstance(child, dict):
            continue
        if child.get("kind") == "transaction":
            nested.append(child)
        else:
            events.append(
                trace.Span.Event(
                    time_unix_nano=_ns(child.get("timestamp")),
                    name=str(child.get("name") or child.get("msg") or child.get("type") or ""),
                    attributes=_attributes(child),
                )
            )
    span = trace.Span(
        trace_id=tid,
        span_id=span_id(uuid, node.get("event")),
        parent_span_id=b"" if parent in (None, "0") else span_id(uuid, parent),
        name=str(node.get("name") or node.get("type") or "transaction"),
        kind=kind,  # type: ignore[arg-type]  # an enum value: an int
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=_attributes(node),
        events=events,
        status=trace.Status()
        if status in (None, "0", "-1")
        else trace.Status(code=trace.Status.STATUS_CODE_ERROR, message=str(status)),
    )
    if isinstance(node.get("traceState"), str):
        span.trace_state = node["traceState"]
    return span, nested


def _log_record(record: Record) -> Any:
    uuid = record.get("uuid")
    parent = record.get("parent")
    level = str(record.get("level") or "")
    msg = record.get("msg")
    out = logs.LogRecord(
        time_unix_nano=_ns(record.get("timestamp")),
        severity_text=level,
        severity_number=_SEVERITY.get(level.upper(), 0),  # type: ignore[arg-type]
        body=any_value(msg if msg is not None else record.get("name")),
        attributes=_attributes(record),
    )
    if uuid:
        out.trace_id = trace_id(uuid)
        if parent not in (None, "0"):
            out.span_id = span_id(uuid, parent)
    return out


def add_record(batch: _Batch, record: Record) -> None:
    """Put one published record into ``batch``: a tree as spans, anything else as a log."""
    if record.get("kind") != "transaction":
        batch.add("logs", _resource_of(record), _log_record(record))
        batch.records["logs"] += 1
        return
    batch.records["traces"] += 1
    uuid = record.get("uuid")
    tid = trace_id(uuid)
    # (node, the resource it inherits): a span taken over OTLP carries its resource only
    # where its service's part of the trace begins; the spans below it share it.
    stack: list[tuple[Record, dict[str, Any] | None]] = [(record, None)]
    while stack:  # never recursive: a tree may be deep
        node, inherited = stack.pop()
        own = node.get("resource")
        if isinstance(own, dict):
            inherited = own
        span, nested = _span(node, tid, uuid)
        batch.add("traces", inherited if inherited is not None else _resource_of(node), span)
        stack.extend((child, inherited) for child in nested)


def records_to_requests(
    records: Iterable[Record], max_items: int = MAX_BATCH_ITEMS
) -> Iterator[tuple[str, Any, int, int]]:
    """Published records as export requests: ``(signal, request, items, records)``, each
    of about ``max_items`` spans or log records at most (a tree is never split across
    requests: one bigger than that goes alone)."""
    batch = _Batch()
    for record in records:
        add_record(batch, record)
        if max(batch.items.values()) >= max_items:
            yield from _requests(batch)
            batch = _Batch()
    yield from _requests(batch)


def _requests(batch: _Batch) -> Iterator[tuple[str, Any, int, int]]:
    for signal, items in batch.items.items():
        if items:
            yield signal, batch.request(signal), items, batch.records[signal]


# ---------------------------------------------------------------------- the exporter


def _endpoints(url: str) -> dict[str, str]:
    """The traces and logs URLs of an endpoint (base URL, or one ending in a signal path)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"OTLP endpoint {url!r:.80} must be an http:// or https:// URL")
    base = parsed.path.rstrip("/")
    for suffix in ("/v1/traces", "/v1/logs"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return {
        signal: urllib.parse.urlunsplit(
            (parsed.scheme, parsed.netloc, f"{base}/v1/{signal}", parsed.query, "")
        )
        for signal in ("traces", "logs")
    }


def _parse_headers(headers: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    if isinstance(headers, Mapping):
        return {str(k): str(v) for k, v in headers.items()}
    out: dict[str, str] = {}
    for item in headers:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"OTLP header {item!r:.80} is not K=V")
        out[key.strip()] = value.strip()
    return out


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Answer:
    """What one HTTP request got: a status (0: no answer), its Retry-After, its body."""

    __slots__ = ("body", "error", "retry_after", "status")

    def __init__(
        self, status: int, retry_after: float | None = None, body: bytes = b"", error: str = ""
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.error = error


class OtlpExporter(BasePublisher):
    """Exports published records as OTLP spans and log records, from a thread of its own.

    Args:
        endpoint: the receiver (base URL, or the ``/v1/traces`` URL).
        headers: sent with every request (a mapping, or ``K=V`` strings).
        max_queue: records waiting at most; past it the oldest are dropped, counted.
        max_items: spans (or log records) per request.
        timeout: seconds one request may take.
        retry_for: seconds a request is retried for before it is given up.
        close_timeout: seconds :meth:`close` waits for the queue to be sent.
        backoff: the first backoff and the most (seconds); tests shorten them.
        compress: gzip the bodies.

    Raises:
        ConfigError: the endpoint or a header is unusable.
    """

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str] | Iterable[str] = (),
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_items: int = MAX_BATCH_ITEMS,
        timeout: float = REQUEST_TIMEOUT,
        retry_for: float = RETRY_FOR,
        close_timeout: float = CLOSE_TIMEOUT,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
        compress: bool = True,
    ) -> None:
        if max_queue < 1 or max_items < 1:
            raise ConfigError("OtlpExporter: max_queue and max_items must be at least 1")
        self.urls = _endpoints(endpoint)
        self.headers = _parse_headers(headers)
        self.max_queue = max_queue
        self.max_items = max_items
        self.timeout = timeout
        self.retry_for = retry_for
        self.close_timeout = close_timeout
        self.backoff = backoff
        self.compress = compress
        self._queue: deque[Sequence[Record]] = deque()
        self._queued = 0  # records in _queue
        self._cond = threading.Condition()
        self._stop = threading.Event()  # close(): give up waiting and retrying
        self._closing = False
        self._busy = False  # the thread holds a taken batch
        self._conns: dict[str, http.client.HTTPConnection] = {}
        #: Counters (:meth:`snapshot`), changed under ``_count_lock`` (two threads count).
        self._count_lock = threading.Lock()
        self.spans = 0
        self.log_records = 0
        self.rejected = 0
        self.requests = 0
        self.retries = 0
        self.bytes = 0
        self.dropped: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="otlp-exporter", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ publisher

    def publish_many(self, records: Sequence[Record]) -> None:
        """Queue the batch for the exporter's thread; never waits. Past ``max_queue``
        records the oldest queued ones are dropped (counted ``queue_full``)."""
        if not records:
            return
        with self._cond:
            if self._closing:
                self._drop(records, "shutdown")
                return
            self._queue.append(records)
            self._queued += len(records)
            while self._queued > self.max_queue and len(self._queue) > 1:
                old = self._queue.popleft()
                self._queued -= len(old)
                self._drop(old, "queue_full")
            if self._queued > self.max_queue:  # one batch bigger than the queue: its head
                only = self._queue[0]
                cut = len(only) - self.max_queue
                self._drop(cut, "queue_full")
                self._queue[0] = only[cut:]
                self._queued = self.max_queue
            self._cond.notify()

    def transaction(self, record: Record) -> None:
        self.publish_many((record,))

    atomic_event = heartbeat = transaction

    def flush(self) -> None:
        """Wake the thread (it sends as soon as it has records; nothing to wait for here)."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Send what is queued within ``close_timeout`` seconds, then stop; what is left
        is counted dropped (``shutdown``)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join(self.close_timeout)
        self._stop.set()  # past the grace: stop retrying, give up what is left
        with self._cond:
            self._cond.notify()
        self._thread.join(self.timeout + 1.0)
        for conn in self._conns.values():
            conn.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every record queued so far was exported or given up (counted);
        False when ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._queue and not self._busy) or not self._thread.is_alive(),
                timeout,
            )

    @property
    def queued(self) -> int:
        """Records waiting to be exported."""
        return self._queued

    def snapshot(self) -> dict[str, Any]:
        """The counters: items exported, requests, retries, bytes, drops by reason."""
        return {
            "queue": self._queued,
            "spans": self.spans,
            "log_records": self.log_records,
            "rejected": self.rejected,
            "requests": self.requests,
            "retries": self.retries,
            "bytes": self.bytes,
            "dropped": {reason: self.dropped[reason] for reason in DROP_REASONS},
        }

    def _drop(self, records: Sequence[Record] | int, reason: str) -> None:
        """Count records given up (a batch, or how many), logged."""
        n = records if isinstance(records, int) else len(records)
        if n:
            with self._count_lock:
                self.dropped[reason] += n
            log.warning("OTLP export: %d published records not exported (%s)", n, reason)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue and not self._closing:
                    cond.wait()
                if not self._queue or self._stop.is_set():
                    break
                taken: list[Record] = []
                while self._queue and len(taken) < self.max_items:
                    batch = self._queue.popleft()
                    self._queued -= len(batch)
                    taken.extend(batch)
                self._busy = True
            try:
                for signal, request, items, records in records_to_requests(taken, self.max_items):
                    self._send(signal, request, items, records)
            except Exception:  # never expected; the exporter must go on
                log.exception("OTLP export: a batch could not be exported")
            finally:
                with cond:
                    self._busy = False
                    cond.notify_all()
        with cond:
            left = list(self._queue)
            self._queue.clear()
            self._queued = 0
        for batch in left:
            self._drop(batch, "shutdown")
        with cond:
            cond.notify_all()

    def _send(self, signal: str, request: Any, items: int, records: int) -> None:
        """Post one request (``items`` spans or log records made of ``records`` published
        records), retrying as the OTLP specification says; count the outcome."""
        body = request.SerializeToString()
        headers = {**self.headers, "Content-Type": "application/x-protobuf"}
        if self.compress:
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        first = time.monotonic()
        wait = self.backoff[0]
        while True:
            if self._stop.is_set():
                self._drop(records, "shutdown")
                return
            answer = self._post(signal, body, headers)
            with self._count_lock:
                self.requests += 1
            if 200 <= answer.status < 300:
                rejected = min(items, _rejected(signal, answer.body))
                if rejected:
                    log.warning("OTLP export: the receiver rejected %d of %d", rejected, items)
                with self._count_lock:
                    self.bytes += len(body)
                    self.rejected += rejected
                    if signal == "traces":
                        self.spans += items - rejected
                    else:
                        self.log_records += items - rejected
                return
            if answer.status and answer.status not in RETRYABLE_STATUSES:
                log.warning(
                    "OTLP export: %s answered HTTP %d to %d %s",
                    self.urls[signal],
                    answer.status,
                    items,
                    signal,
                )
                self._drop(records, "refused")
                return
            delay = answer.retry_after
            if delay is None:
                delay = wait * random.uniform(1 - JITTER, 1 + JITTER)
                wait = min(wait * 2, self.backoff[1])
            if time.monotonic() + delay - first > self.retry_for:
                log.warning(
                    "OTLP export: %d %s given up after %.1f s (%s)",
                    items,
                    signal,
                    time.monotonic() - first,
                    answer.error or f"HTTP {answer.status}",
                )
                self._drop(records, "retry_exhausted")
                return
            with self._count_lock:
                self.retries += 1
            if self._stop.wait(delay):
                self._drop(records, "shutdown")
                return

    def _post(self, signal: str, body: bytes, headers: dict[str, str]) -> _Answer:
        """One HTTP request on a kept-alive connection (opened again after an error)."""
        url = urllib.parse.urlsplit(self.urls[signal])
        conn = self._conns.get(signal)
        if conn is None:
            conn = self._conns[signal] = _connect(url, self.timeout)
        path = url.path + (f"?{url.query}" if url.query else "")
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            del self._conns[signal]
            return _Answer(0, error=f"{type(exc).__name__}: {exc}")
        if response.will_close:
            conn.close()
            del self._conns[signal]
        return _Answer(response.status, retry_after(response.getheader("Retry-After")), data)


def _connect(url: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    if url.scheme == "https":
        return http.client.HTTPSConnection(
            url.hostname or "", url.port, timeout=timeout, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)


def _rejected(signal: str, body: bytes) -> int:
    """Items a 2xx answer's ``partial_success`` says were rejected (0 when it says none)."""
    if not body:
        return 0
    response = (
        trace_service.ExportTraceServiceResponse()
        if signal == "traces"
        else logs_service.ExportLogsServiceResponse()
    )
    try:
        response.ParseFromString(body)
    except ProtobufDecodeError:
        return 0
    partial = response.partial_success
    return int(partial.rejected_spans if signal == "traces" else partial.rejected_log_records)
