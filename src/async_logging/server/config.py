"""Server options (docs/design.md §5): one frozen value built from keywords, CLI flags or TOML.

Every seed option keeps its meaning; Python names are snake_case and a config file may use
either spelling (``connThreshold`` or ``conn_threshold``). Unknown keys and wrong types are a
:class:`~async_logging.exceptions.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..buffer import BufferLimits
from ..exceptions import ConfigError, UsageError
from ..wire import DEFAULT_MAX_ARRAY_LENGTH, DEFAULT_MAX_RECORD_BYTES

__all__ = ["ENGINE_OPTIONS", "ServerConfig", "announcement", "load_config_file"]

#: Seed defaults and the limits the server enforces (each overridable).
DEFAULT_PORT = 3000
DEFAULT_MON_PORT = 3001
DEFAULT_CONN_THRESHOLD = 1024
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_HTTP_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_PUBLISH_QUEUE = 50_000
#: Seconds a root span's end taken over OTLP waits for the rest of its trace.
DEFAULT_OTLP_SETTLE = 2.0
#: Published records waiting for the OTLP exporter.
DEFAULT_OTLP_EXPORT_QUEUE = 10_000
#: What ``bus_compression`` may be (:mod:`async_logging.bus.codec`).
BUS_COMPRESSIONS = ("zstd", "none")
_ENGINE = BufferLimits()

#: The options that are the engine's limits (:class:`~async_logging.buffer.BufferLimits`),
#: option name → the engine's name. Only the depth differs: ``max_depth`` is the wire
#: decoder's (maps and lists inside one event), ``max_tree_depth`` the engine's (nested
#: transactions kept in one record).
ENGINE_OPTIONS: dict[str, str] = {
    "clean_duration": "clean_duration",
    "clean_cycles": "clean_cycles",
    "settle": "settle",
    "max_open": "max_open",
    "max_events_per_tx": "max_events_per_tx",
    "max_tree_depth": "max_depth",
    "max_published_memory": "max_published_memory",
    "max_open_bytes": "max_open_bytes",
    "max_published_digests": "max_published_digests",
    "published_memory_age": "published_memory_age",
    "compact": "compact",
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every option of ``async-logging serve``.

    Attributes:
        host: address to listen on (main port).
        port: the main port: WebSocket and ``POST /log`` (seed: 3000; 0 picks a free one).
        mon_host: address of the monitoring app (``/ecv``, ``/metrics``).
        mon_port: the monitoring port (seed: 3001; 0 picks a free one; -1 disables it).
        workers: worker processes sharing the port (SO_REUSEPORT); 1 runs in-process.
        conn_threshold: concurrent WebSocket connections accepted; the next gets HTTP 503.
        max_http_connections: concurrent HTTP connections (those not upgraded to a
            WebSocket) on the main port; a request on a connection opened past it gets
            503 ``too_many_connections`` and the connection is closed (counted).
        ecv: whether ``GET /ecv`` reports healthy (the seed's ECV switch; False = out of rotation).
        heartbeat_interval: seconds between the server's own heartbeat records (0 = off).
        listener, buffer, publisher: plug-ins: a class, an instance or ``"module:attr"``
            (None = the defaults: LogListener, LogBuffer, JSON lines to ``log_file``).
        clean_duration: seconds between clean cycles; ``clean_cycles`` idle cycles time a tree out.
        settle: seconds a closed tree waits for stragglers (0 = publish at once).
        machine_name: name stamped on the server's heartbeats (default: hostname).
        max_life: seconds after which a worker is recycled, at a random point in
            [max_life, 2*max_life) (0 = never).
        max_messages: frames after which a worker is recycled (0 = never).
        wait_for_publisher: seconds to let publishers finish on shutdown.
        log_file: path of the default JSON-lines sink.
        log_max_bytes, log_backup_count: rotation of the default sink.
        dead_letter: JSON-lines file of the records a publisher refuses on their own while
            it takes others (poison records), each with its error (empty:
            ``dead-letter.log`` beside ``log_file``); see :meth:`dead_letter_file`.
        stdout: also write records to standard output.
        max_message_bytes: largest frame or request body (seed: 4 MiB).
        max_inflight_bytes: bytes of request bodies and WebSocket frames held at once,
            across every connection of a process (at least ``max_message_bytes``): a body
            past it gets 503 ``inflight_full``, a frame closes its WebSocket with 1013
            (try again later); both counted.
        idle_timeout: seconds without a frame after which a WebSocket is closed (seed: 10 min).
        ping_interval: seconds between protocol pings.
        publish_queue: records waiting for the publisher before ingest pauses (backpressure).
        max_events_per_frame, max_depth, max_string_length, max_keys_per_map: input limits
            of the wire decoder (see :class:`async_logging.wire.WireLimits`); ``max_depth``
            is the nesting of maps and lists inside one event.
        max_array_length, max_record_bytes: wire limits that refuse one event, not the
            frame: items in any array inside an event (``array_too_long``), and an event's
            size as compact JSON (``record_too_big``).
        max_open, max_events_per_tx, max_tree_depth, max_published_memory: caps of the
            reassembly engine (see :class:`async_logging.buffer.BufferLimits`, where
            ``max_tree_depth`` is called ``max_depth``): open trees held, events held for
            one tree, nesting of transactions kept in one record, published uuids remembered.
        max_open_bytes, max_published_digests, published_memory_age: the engine's bounds in
            bytes and time: bytes of events held in open trees (past it the oldest are
            published ``evicted``), digests remembered of published trees, and seconds a
            published uuid is remembered.
        compact: below a root, drop the fields that say where an event comes from (uuid,
            request, tid, pid, machine, ...) where they equal the root's (smaller records).
        rate_limit: events per second one connection may send (0 = no limit); past it the
            server stops reading that connection for a while (TCP backpressure), counted.
        request_timeout: seconds an HTTP request may take to arrive (slow-loris guard).
        tokens: shared secrets; when any is set every client must present one
            (``Authorization: Bearer``, or ``?token=`` for WebSocket clients).
        allowed_origins: ``Origin`` values a browser WebSocket may come from (empty: any
            request without an Origin header, i.e. non-browser clients, and any origin).
        viewer_tokens: read-only tokens of the monitoring port (the viewer, its API and
            live stream, ``/metrics``); the listener does not take them. Set, they are
            required wherever ``mon_host`` is; without them, ``tokens`` are required there
            when ``mon_host`` is not a loopback address (see
            :mod:`async_logging.server.monauth`). ``/ecv`` stays open.
        tls_cert, tls_key: PEM files; when set the main port speaks https and wss.
        spool: directory of the write-ahead spool (empty: off); batches are appended there
            before they are acked and replayed on restart.
        spool_max_bytes: size of the spool at which new batches are refused (HTTP 503,
            error frame ``spool_full``) rather than acked without being durable.
        store: SQLite file of the queryable store behind the viewer (empty: off).
        store_max_age: seconds of trees the store keeps.
        store_max_bytes: size of the store past which the oldest trees are deleted.
        otlp_settle: seconds the end of a root span taken over OTLP (``POST /v1/traces``)
            is held, so that spans of its trace still in flight in other requests join
            its tree (0: fed at once; docs/design.md §12).
        otlp_endpoint: OTLP/HTTP receiver every published tree is also exported to, as
            spans (empty: off). A base URL (``http://collector:4318``) gets ``/v1/traces``
            and ``/v1/logs`` appended; a URL ending in one of them is taken as given.
        otlp_headers: ``K=V`` headers sent with every export request (TOML: a list of
            them or a table; a string: comma-separated).
        otlp_export_queue: published records waiting for the exporter; past it the
            oldest are dropped, counted (``otlp_export_dropped{reason="queue_full"}``).
        bus: comma-separated ``nats://`` URLs of a JetStream cluster (empty: off). Set,
            ``serve`` publishes accepted batches there instead of reassembling them, and
            ``reassemble`` and ``sink`` read from there (docs/design.md §8).
        partitions: partitions of the events stream (``alog.events.<p>``), 1 to 1024;
            fixed when the stream is made, the same on every node.
        bus_replicas: copies of each stream in the JetStream cluster (1, 3 or 5).
        bus_max_bytes: size of each stream: past it the events stream refuses new batches
            (the client resends) and the trees stream drops its oldest trees.
        bus_max_age: seconds the trees stream keeps a tree for its sinks.
        bus_ack_wait: seconds JetStream waits for a reassembler's or sink's ack before it
            delivers a message again (held messages get in-progress acks meanwhile).
        bus_max_ack_pending: unacked messages per partition (and per sink) before
            JetStream delivers no more there.
        bus_duplicate_window: seconds JetStream remembers message ids to drop copies.
        bus_timeout: seconds a publish waits for JetStream before the batch is refused.
        bus_compression: what this node publishes to the bus with: ``zstd`` (default) or
            ``none``; every node reads both (:mod:`async_logging.bus.codec`).
    """

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    mon_host: str = "127.0.0.1"
    mon_port: int = DEFAULT_MON_PORT
    workers: int = 1
    conn_threshold: int = DEFAULT_CONN_THRESHOLD
    max_http_connections: int = DEFAULT_MAX_HTTP_CONNECTIONS
    ecv: bool = True
    heartbeat_interval: float = 60.0
    listener: Any = None
    buffer: Any = None
    publisher: Any = None
    clean_duration: float = 60.0
    clean_cycles: int = 3
    settle: float = 0.0
    machine_name: str = field(default_factory=socket.gethostname)
    max_life: float = 0.0
    max_messages: int = 0
    wait_for_publisher: float = 3.0
    log_file: str = "./log/all.log"
    log_max_bytes: int = 100 * 1024 * 1024
    log_backup_count: int = 5
    dead_letter: str = ""
    stdout: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    publish_queue: int = DEFAULT_PUBLISH_QUEUE
    max_events_per_frame: int = 10_000
    max_depth: int = 32
    max_string_length: int = 64 * 1024
    max_keys_per_map: int = 256
    max_array_length: int = DEFAULT_MAX_ARRAY_LENGTH
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_open: int = _ENGINE.max_open
    max_events_per_tx: int = _ENGINE.max_events_per_tx
    max_tree_depth: int = _ENGINE.max_depth
    max_published_memory: int = _ENGINE.max_published_memory
    max_open_bytes: int = _ENGINE.max_open_bytes
    max_published_digests: int = _ENGINE.max_published_digests
    published_memory_age: float = _ENGINE.published_memory_age
    compact: bool = False
    rate_limit: float = 0.0
    request_timeout: float = 30.0
    tokens: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    viewer_tokens: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    spool: str = ""
    spool_max_bytes: int = 1024 * 1024 * 1024
    store: str = "./log/trees.sqlite"
    store_max_age: float = 7 * 24 * 3600.0
    store_max_bytes: int = 1024 * 1024 * 1024
    otlp_settle: float = DEFAULT_OTLP_SETTLE
    otlp_endpoint: str = ""
    otlp_headers: tuple[str, ...] = ()
    otlp_export_queue: int = DEFAULT_OTLP_EXPORT_QUEUE
    bus: str = ""
    partitions: int = 16
    bus_replicas: int = 1
    bus_max_bytes: int = 1024 * 1024 * 1024
    bus_max_age: float = 24 * 3600.0
    bus_ack_wait: float = 30.0
    bus_max_ack_pending: int = 20_000
    bus_duplicate_window: float = 120.0
    bus_timeout: float = 5.0
    bus_compression: str = "zstd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "otlp_headers", _headers(self.otlp_headers))
        if self.otlp_endpoint and not re.match(r"https?://[^/\s]+", str(self.otlp_endpoint)):
            raise ConfigError(
                f"option otlp_endpoint must be an http:// or https:// URL, not "
                f"{self.otlp_endpoint!r:.80}"
            )
        for name in ("tokens", "allowed_origins", "viewer_tokens"):
            value = getattr(self, name)
            if isinstance(value, str):
                parts = [v.strip() for v in value.split(",")]
                if value.strip() and not all(parts):
                    # " , " or "a,,b": a typo must not turn authentication off (or half on).
                    raise ConfigError(f"option {name} has an empty item: {value!r}")
                value = tuple(v for v in parts if v)
            elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                if not all(v.strip() for v in value):
                    raise ConfigError(f"option {name} has an empty item")
                value = tuple(v.strip() for v in value)
            else:
                raise ConfigError(f"option {name} must be a list of strings")
            object.__setattr__(self, name, value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _SCALARS.get(f.type)  # type: ignore[arg-type]  # annotations are strings
            if kind is None:
                continue
            if kind is float and type(value) is int:
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(
                    f"option {f.name} must be {kind.__name__}, not {type(value).__name__}"
                )
        for name in ("port", "mon_port"):
            value = getattr(self, name)
            if not (-1 <= value <= 65535) or (name == "port" and value < 0):
                raise ConfigError(f"option {name} must be a port number, not {value}")
        positive = (
            "workers",
            "conn_threshold",
            "max_http_connections",
            "clean_cycles",
            "max_message_bytes",
            "max_events_per_frame",
            "max_depth",
            "max_string_length",
            "max_keys_per_map",
            "max_array_length",
            "max_record_bytes",
            "max_open",
            "max_events_per_tx",
            "max_tree_depth",
            "max_published_memory",
            "max_open_bytes",
            "max_published_digests",
            "otlp_export_queue",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"option {name} must be at least 1")
        non_negative = (
            "heartbeat_interval",
            "clean_duration",
            "settle",
            "published_memory_age",
            "max_life",
            "max_messages",
            "wait_for_publisher",
            "log_max_bytes",
            "log_backup_count",
            "idle_timeout",
            "ping_interval",
            "rate_limit",
            "request_timeout",
            "spool_max_bytes",
            "store_max_age",
            "store_max_bytes",
            "otlp_settle",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"option {name} must not be negative")
        if self.clean_duration == 0:
            raise ConfigError("option clean_duration must be more than 0")
        if self.max_inflight_bytes < self.max_message_bytes:
            raise ConfigError(
                f"option max_inflight_bytes ({self.max_inflight_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        if self.publish_queue < 100:
            raise ConfigError("option publish_queue must be at least 100")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("options tls_cert and tls_key go together")
        self._check_bus()
        self.buffer_limits()  # the engine's own rules (e.g. max_tree_depth at most 100)

    def _check_bus(self) -> None:
        """The bus options' ranges, and what does not go with the bus (docs/design.md §8)."""
        if not 1 <= self.partitions <= 1024:
            raise ConfigError("option partitions must be from 1 to 1024")
        if self.bus_replicas not in (1, 3, 5):
            raise ConfigError("option bus_replicas must be 1, 3 or 5")
        for name in ("bus_max_bytes", "bus_max_ack_pending"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option {name} must be at least 1")
        for name in ("bus_max_age", "bus_ack_wait", "bus_duplicate_window", "bus_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"option {name} must be more than 0")
        if self.bus_compression not in BUS_COMPRESSIONS:
            raise ConfigError(
                f"option bus_compression must be {' or '.join(BUS_COMPRESSIONS)}, "
                f"not {self.bus_compression!r:.40}"
            )
        if self.bus and not all(
            re.match(r"(nats|tls)://[^\s,]+$", u.strip()) for u in self.bus.split(",")
        ):
            raise ConfigError(
                f"option bus must be nats:// URLs, comma-separated, not {self.bus!r:.120}"
            )
        if self.bus and self.spool:
            raise ConfigError(
                "options bus and spool do not go together: the bus is the durable copy"
            )

    def buffer_limits(self) -> BufferLimits:
        """The engine's limits these options set (see :data:`ENGINE_OPTIONS`).

        Raises:
            ConfigError: the engine refuses a value; the message names the option.
        """
        try:
            return BufferLimits(**self.engine_options())
        except UsageError as exc:
            message = str(exc)
            for option, name in ENGINE_OPTIONS.items():
                if message.startswith(name + " "):
                    message = option + message[len(name) :]
                    break
            raise ConfigError(f"option {message}") from exc

    def dead_letter_file(self) -> str:
        """The dead-letter file: :attr:`dead_letter`, or ``dead-letter.log`` beside the log."""
        return self.dead_letter or os.path.join(
            os.path.dirname(self.log_file) or ".", "dead-letter.log"
        )

    def engine_options(self) -> dict[str, Any]:
        """The engine's limits as keywords of :class:`~async_logging.buffer.LogBuffer`
        (its names: ``max_depth`` for :attr:`max_tree_depth`)."""
        return {name: getattr(self, option) for option, name in ENGINE_OPTIONS.items()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, source: str = "config") -> ServerConfig:
        """Build from a mapping whose keys may be snake_case or the seed's camelCase.

        Raises:
            ConfigError: a key is unknown or its value refused; the message names
                ``source`` (the config file) and the key as it is spelled there.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in values.items():
            name = _ALIASES.get(key, _snake(key))
            if name not in names:
                raise ConfigError(f"{source}: unknown option {key!r}")
            kwargs[name] = value
            spelled[name] = key
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            message = str(exc)
            for name, key in spelled.items():  # "option port must be int": the file's key
                message = re.sub(rf"\b{name}\b", key, message, count=1)
            raise ConfigError(f"{source}: {message}") from exc

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Options whose annotation is one of these are type-checked (the annotations are strings:
# ``from __future__ import annotations``); plug-ins (Any) and lists are checked elsewhere.
_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}

# The seed's spellings that are not plain camelCase of ours.
_ALIASES = {
    "noWorkers": "workers",
    "noWorders": "workers",  # sic, as the seed's README spells it
    "cluster": "workers",
    "LogListener": "listener",
    "LogBuffer": "buffer",
    "LogPublisher": "publisher",
    "monPort": "mon_port",
    "waitForPublisher": "wait_for_publisher",
}


def _headers(value: object) -> tuple[str, ...]:
    """``otlp_headers`` as ``K=V`` strings: from a list of them, a table, or a
    comma-separated string.

    Raises:
        ConfigError: an item is not ``K=V`` with a header name, or holds a line break.
    """
    if isinstance(value, str):
        items: list[object] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError("option otlp_headers must be a list of K=V strings or a table")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"option otlp_headers: {item!r} is not a K=V string")
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key):
            raise ConfigError(f"option otlp_headers: {item!r:.80} is not K=V with a header name")
        if "\r" in val or "\n" in val:
            raise ConfigError(f"option otlp_headers: the value of {key} holds a line break")
        out.append(f"{key}={val.strip()}")
    return tuple(out)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("-", "_")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; options may sit at the top level or under ``[server]``.

    Raises:
        ConfigError: the file is missing or is not valid TOML.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    server = data.pop("server", None)
    if isinstance(server, dict):
        data.update(server)
    if "cluster" in data and isinstance(data["cluster"], bool):
        # The seed's boolean `cluster` means "fork workers"; it does not say how many.
        data.pop("cluster")
    return data


def announcement(c: ServerConfig, port: int, mon_port: int, workers: int = 1) -> str:
    """The line ``serve`` prints once it listens: where, how many workers, where it writes."""
    if c.bus:  # an ingest node: the reassemblers and sinks write (docs/design.md §8)
        sink = f"to the bus {c.bus} ({c.partitions} partitions)"
    elif c.publisher is None:
        sink = os.path.abspath(c.log_file)
    else:
        sink = ", ".join(map(str, c.publisher if isinstance(c.publisher, list) else [c.publisher]))
    mon = f"http://{c.mon_host}:{mon_port}/ecv /metrics" if c.mon_port >= 0 else "off"
    s = "s" if c.tls_cert else ""
    return (
        f"async-logging: listening on ws{s}://{c.host}:{port}/ and http{s}://{c.host}:{port}/log "
        f"({workers} worker{'s' if workers != 1 else ''}), monitoring {mon}, "
        f"writing {sink}{' and stdout' if c.stdout else ''}"
        + (f", store {os.path.abspath(c.store)}" if c.store else "")
        + (f", viewer http://{c.mon_host}:{mon_port}/ui/" if c.store and c.mon_port >= 0 else "")
    )
