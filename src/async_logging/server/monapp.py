"""MonApp: the monitoring port (docs/design.md §5): ``GET /ecv``, ``GET /metrics``, and the viewer.

``/ecv`` is the seed's health check: 200 ``{"status": "AVAILABLE", …}`` while the server
takes traffic and its ``ecv`` switch is on, 503 ``UNAVAILABLE`` while it drains or is
switched off (so a load balancer takes it out of rotation first).

``/metrics`` is Prometheus text from a collector that reads the pipeline's plain counters
(summed over workers when there are several), so the hot path never touches a metrics lock.

Given a :class:`~async_logging.server.viewer.Viewer`, the same port also serves the web
viewer (``/ui/``) and its API (``/api/...``).

Given the server's options, the port asks for a token as
:mod:`~async_logging.server.monauth` decides (every route but ``/ecv``), counts refusals in
``async_logging_auth_failures_total``, and logs one warning at start when it listens on a
non-loopback address without one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .. import model, wire
from ..buffer.engine import INCOMPLETE_REASONS, MAPPER_ERROR
from ..buffer.native import TRANSACTION
from ..publishers import otlp as otlp_export
from . import guard, listener, pipeline, spool
from . import otlp as otlp_ingest
from .monauth import AuthFailures, MonitorAuth, open_warning
from .pipeline import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .config import ServerConfig
    from .viewer import Viewer

__all__ = ["KNOWN_LABELS", "MonApp", "SnapshotCollector"]

Snapshot = Callable[[], dict[str, Any]]
Health = Callable[[], dict[str, Any]]

_P = "async_logging_"

log = logging.getLogger("async_logging.server")

#: The label values each labelled counter is exported with from the start, at 0, so that
#: a dashboard or an alert finds every series before the first event of its kind; each
#: list lives where its values are counted. A value met that is not listed is exported too.
KNOWN_LABELS: Final[dict[str, tuple[str, ...]]] = {
    "frames_received": listener.TRANSPORTS,
    "bytes_received": listener.TRANSPORTS,
    "bad_input": tuple(
        dict.fromkeys(
            (
                *wire.FRAME_REASONS,
                *wire.EVENT_REASONS,
                *model.REFUSAL_REASONS,
                MAPPER_ERROR,
                *spool.REFUSAL_REASONS,
                *pipeline.REFUSAL_REASONS,
                *listener.BAD_INPUT_REASONS,
                *otlp_ingest.REFUSAL_REASONS,
            )
        )
    ),
    "records_published": (TRANSACTION, model.ATOMIC, model.HEARTBEAT),
    "incomplete_transactions": INCOMPLETE_REASONS,
    "connections_refused": (*listener.REFUSAL_REASONS, *guard.ACCESS_REASONS),
    "otlp_received": otlp_ingest.ITEMS,
    "otlp_export_dropped": otlp_export.DROP_REASONS,
}


class SnapshotCollector(Collector):
    """Turns a counters snapshot (:meth:`Stats.snapshot`) into Prometheus metric families."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        buf = s.get("buffer", {})
        yield _counter("events_received", "Log events accepted into the buffer.", s["events"])
        yield _labelled(
            CounterMetricFamily,
            "frames_received",
            "Frames and POST bodies received.",
            "transport",
            s["frames"],
        )
        yield _labelled(
            CounterMetricFamily,
            "bytes_received",
            "Payload bytes received.",
            "transport",
            s["bytes"],
        )
        yield _labelled(
            CounterMetricFamily,
            "bad_input",
            "Refused input (frames, bodies, events) by reason.",
            "reason",
            s["bad_input"],
        )
        yield _labelled(
            CounterMetricFamily,
            "records_published",
            "Records written by the publishers.",
            "kind",
            s["records"],
        )
        tx = CounterMetricFamily(
            _P + "transactions_published", "Transaction trees published.", labels=["complete"]
        )
        tx.add_metric(["true"], buf.get("published_complete", 0))
        tx.add_metric(["false"], buf.get("published_incomplete", 0))
        yield tx
        yield _labelled(
            CounterMetricFamily,
            "incomplete_transactions",
            "Incomplete trees published, by reason.",
            "reason",
            s.get("incomplete", {}),
        )
        for key, help_ in (
            ("duplicates", "Duplicate events dropped (client resends)."),
            ("late", "Events published on their own because their tree had gone."),
            ("evicted", "Trees published early because a cap was reached."),
            ("conflicts", "Events with a reused id and other content."),
        ):
            yield _counter(key, help_, buf.get(key, 0))
        yield _gauge(
            "loop_stall_max_seconds",
            "The longest the event loop was held (a frame, a request...) since start.",
            s.get("loop_stall_max_seconds", 0.0),
        )
        yield _counter(
            "loop_stalls",
            "Times the event loop was held longer than 0.1 s.",
            s.get("loop_stalls", 0),
        )
        for key, help_ in (
            ("open_transactions", "Trees held open in the buffer."),
            ("open_bytes", "Bytes of events held in open trees (JSON size; max_open_bytes)."),
            ("published_memory_digests", "Digests remembered of published trees (8 B each)."),
        ):
            yield _gauge(key, help_, s.get(key, 0))
        yield _gauge("connections", "Open WebSocket connections.", s["connections"])
        yield _counter(
            "connections_accepted", "WebSocket connections accepted.", s["connections_total"]
        )
        yield _labelled(
            CounterMetricFamily,
            "connections_refused",
            "Connections refused or closed, by reason.",
            "reason",
            s["connections_refused"],
        )
        yield _gauge(
            "http_connections",
            "Open HTTP connections on the main port (not WebSockets).",
            s.get("http_connections", 0),
        )
        yield _gauge(
            "inflight_bytes",
            "Bytes of request bodies and WebSocket frames held (bounded by max_inflight_bytes).",
            s.get("inflight_bytes", 0),
        )
        yield _counter(
            "accept_errors",
            "Connections the main port failed to accept (e.g. out of file descriptors).",
            s.get("accept_errors", 0),
        )
        yield _gauge("publish_queue", "Records waiting for the publisher.", s["publish_queue"])
        yield _counter(
            "backpressure_waits",
            "Times ingest paused for a slow publisher.",
            s["backpressure_waits"],
        )
        yield _counter(
            "rate_limited",
            "Times a connection was paused for its rate limit.",
            s.get("rate_limited", 0),
        )
        yield _counter(
            "spool_replayed", "Events replayed from the spool at start.", s.get("spool_replayed", 0)
        )
        yield _counter(
            "native_frames",
            "MessagePack frames reassembled by the native fast path (the rest: decoded and fed).",
            s.get("native_frames", 0),
        )
        yield _counter(
            "publish_errors", "Publisher calls that raised (retried).", s["publish_errors"]
        )
        yield _counter(
            "records_dropped",
            "Records given up at shutdown (publisher failing).",
            s["records_dropped"],
        )
        yield _counter(
            "dead_letters",
            "Records a publisher refused on their own while taking others (poison), "
            "set aside in the dead-letter file.",
            s.get("dead_letters", 0),
        )
        yield from _otlp_metrics(s.get("otlp", {}), s.get("otlp_export", {}))
        bus = s.get("bus")
        if bus:  # serve --bus, reassemble, sink (docs/design.md §8)
            yield from _bus_metrics(bus)
        counts = s["latency_buckets"]
        buckets = []
        acc = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=False):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        yield HistogramMetricFamily(
            _P + "publish_latency_seconds",
            "Time from acceptance to publication, per batch.",
            buckets=buckets,
            sum_value=s["latency_sum"],
        )
        if "workers" in s:
            yield _gauge("workers", "Worker processes running.", s["workers"])
            yield _counter(
                "worker_restarts", "Workers restarted after a crash.", s.get("worker_restarts", 0)
            )
            yield _counter(
                "worker_recycles",
                "Workers recycled (max_life, max_messages).",
                s.get("worker_recycles", 0),
            )
        store = s.get("store")
        if store:  # the store's follower (async_logging.store.follower)
            yield _gauge("store_up", "1 while the store's follower runs.", int(store["running"]))
            yield _gauge(
                "store_lag_records",
                "Records written to the JSON-lines file and not yet in the store.",
                store["lag_records"],
            )
            yield _gauge(
                "store_lag_seconds",
                "How long ago the oldest record not yet in the store was written (0: caught up).",
                store["lag_seconds"],
            )
            yield _gauge(
                "store_status_age_seconds",
                "Seconds since the store's follower last reported (a stuck one grows old).",
                store["status_age"],
            )
            yield _counter("store_records", "Records the store took.", store["stored"])
            yield _counter("store_batches", "Transactions the store wrote.", store["batches"])
            yield _counter(
                "store_errors", "Store batches SQLite refused (retried).", store["errors"]
            )
            yield _counter(
                "store_rotated_away",
                "Times the file the store was reading was rotated away before it was read "
                "(records between were lost to the store, not to the file).",
                store["rotated_away"],
            )
            yield _counter(
                "store_unreadable",
                "Lines the store skipped: not a JSON object, too long, or torn.",
                store["unreadable"],
            )
            yield _counter(
                "store_restarts",
                "Times the store's follower died and was started again.",
                store["restarts"],
            )


def _otlp_metrics(ingest: dict[str, Any], export: dict[str, Any]) -> Iterator[Metric]:
    """OTLP in (``POST /v1/traces``, ``/v1/logs``) and out (the exporter), at 0 when off."""
    yield _labelled(
        CounterMetricFamily,
        "otlp_received",
        "Spans and log records taken over OTLP/HTTP, by signal.",
        "signal",
        ingest.get("received", {}),
    )
    yield _gauge(
        "otlp_held",
        "Root spans held for the OTLP settle (their trees wait for spans in flight).",
        ingest.get("held", 0),
    )
    yield _gauge(
        "otlp_held_bytes",
        "Bytes of the whole trees the OTLP settle holds (bounded by max_open_bytes).",
        ingest.get("held_bytes", 0),
    )
    yield _counter(
        "otlp_released_early",
        "Requests' whole trees the OTLP settle let go early, past max_open_bytes.",
        ingest.get("released_early", 0),
    )
    yield _gauge(
        "otlp_export_queue",
        "Published records waiting for the OTLP exporter.",
        export.get("queue", 0),
    )
    for key, help_ in (
        ("spans", "Spans the OTLP receiver took."),
        ("log_records", "Log records the OTLP receiver took."),
        ("rejected", "Spans and log records the OTLP receiver refused in its partial_success."),
        ("requests", "OTLP export requests made (retries included)."),
        ("retries", "OTLP export requests retried (429, 502, 503, 504, no answer)."),
        ("bytes", "Bytes of OTLP export requests the receiver took (as sent, gzipped)."),
    ):
        yield _counter("otlp_export_" + key, help_, export.get(key, 0))
    yield _labelled(
        CounterMetricFamily,
        "otlp_export_dropped",
        "Published records not exported, by reason.",
        "reason",
        export.get("dropped", {}),
    )


def _bus_metrics(bus: dict[str, Any]) -> Iterator[Metric]:
    """The node's side of the bus: up, errors, refusals, what it published, and per
    durable consumer (``alog-reasm-<partition>``, ``alog-sink-<name>``) its lag."""
    yield _gauge(
        "bus_up", "1 while the node can use the bus (connected, streams ready).", bus["up"]
    )
    yield _labelled(
        CounterMetricFamily,
        "bus_errors",
        "What went wrong with the bus, by kind (connect, disconnected, publish, fetch...).",
        "kind",
        bus.get("errors", {}),
    )
    yield _labelled(
        CounterMetricFamily,
        "bus_refused",
        "Batches an ingest node refused because the bus did not store them, by reason.",
        "reason",
        bus.get("refused", {}),
    )
    for key, help_ in (
        ("published_messages", "Messages this node published to the bus and JetStream stored."),
        ("duplicates", "Messages JetStream dropped as copies (a replay's trees, a resend)."),
        ("carried", "Messages a reassembler published again to let a published tree's go."),
        ("payload_bytes", "Bytes of message payloads this node published, before compression."),
        ("sent_bytes", "Bytes of message payloads this node published, as sent (compressed)."),
    ):
        yield _counter("bus_" + key, help_, bus.get(key, 0))
    consumers: dict[str, dict[str, int]] = bus.get("consumers", {})
    for key, help_, cls in (
        ("lag", "Messages of the consumer's stream not delivered to it yet.", GaugeMetricFamily),
        ("ack_pending", "Messages delivered to the consumer and not acked.", GaugeMetricFamily),
        ("held", "Messages this node holds unacked (their trees are open).", GaugeMetricFamily),
        ("redelivered", "Messages delivered to this node again.", CounterMetricFamily),
        ("messages", "Messages delivered to this node.", CounterMetricFamily),
        ("unreadable", "Messages dropped because they could not be read.", CounterMetricFamily),
        (
            "lease_waiting",
            "1 while this node waits for another process to give the partition up.",
            GaugeMetricFamily,
        ),
        (
            "leases_lost",
            "Times this node lost the partition's lease (cut off from the bus past its TTL).",
            CounterMetricFamily,
        ),
    ):
        family = cls(_P + "bus_" + key, help_, labels=["consumer"])
        for name, values in sorted(consumers.items()):
            family.add_metric([name], values.get(key, 0))
        yield family


def _counter(name: str, help_: str, value: float) -> Metric:
    return CounterMetricFamily(_P + name, help_, value=value)


def _gauge(name: str, help_: str, value: float) -> Metric:
    return GaugeMetricFamily(_P + name, help_, value=value)


def _labelled(cls: Any, name: str, help_: str, label: str, values: dict[str, float]) -> Metric:
    """A family with one sample per label value: every known one (:data:`KNOWN_LABELS`),
    at 0 until counted, and any other value counted."""
    family = cls(_P + name, help_, labels=[label])
    for key, value in sorted((dict.fromkeys(KNOWN_LABELS.get(name, ()), 0) | values).items()):
        family.add_metric([key], value)
    return family  # type: ignore[no-any-return]


class MonApp:
    """The monitoring HTTP app.

    Args:
        snapshot: returns the counters to export.
        health: returns ``{"available": bool, ...}`` for ``/ecv``.
        viewer: the web viewer to mount beside them (None: no viewer).
        config: the server's options, for the tokens the port asks for (None: it asks
            for none).
    """

    def __init__(
        self,
        snapshot: Snapshot,
        health: Health,
        viewer: Viewer | None = None,
        *,
        config: ServerConfig | None = None,
    ) -> None:
        self.viewer = viewer
        self.auth = MonitorAuth.for_config(config) if config is not None else MonitorAuth()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self.registry.register(AuthFailures(self.auth))
        self._health = health
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.started = time.time()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ecv", self.handle_ecv)
        app.router.add_get("/metrics", self.handle_metrics)
        self.auth.add_routes(app)
        if self.viewer is not None:
            self.viewer.add_routes(app)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port bound (and warns when it is open to the network)."""
        warning = open_warning(
            host,
            required=self.auth.required,
            viewer=self.viewer is not None and bool(self.viewer.store_path),
        )
        if warning is not None:
            log.warning("%s", warning)
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        addresses = self._runner.addresses
        self.port = addresses[0][1] if addresses else port
        return self.port

    async def cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle_ecv(self, request: web.Request) -> web.Response:
        health = dict(self._health())
        ok = bool(health.pop("available", False))
        body = {
            "status": "AVAILABLE" if ok else "UNAVAILABLE",
            "uptime": round(time.time() - self.started, 3),
            **health,
        }
        return web.Response(
            status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json"
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        payload = generate_latest(self.registry)
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
