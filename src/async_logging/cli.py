"""The ``async-logging`` command: ``serve`` runs the proxy (docs/design.md §5).

Every option of :class:`~async_logging.server.ServerConfig` is a flag and a TOML key
(``--config FILE``; flags win over the file). A bad flag, value or config file prints a
clear error (a config file's names the file and the key) and exits with status 2; a server
that cannot start (a port in use, a directory it may not write) says why in one line and
exits with status 1. On exit ``serve`` says what its drain published.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .exceptions import ConfigError

__all__ = ["BAD_OPTION", "CANNOT_START", "main"]

#: Exit status of ``serve`` for a bad flag, option value or config file (click's own).
BAD_OPTION = 2
#: Exit status of ``serve`` when the options are good but the server cannot start (a port
#: in use, a directory it may not write, a plug-in that does not import).
CANNOT_START = 1


class _BadOption(click.ClickException):
    """A bad option value told in one line (``Error: ...``), without click's usage block:
    the message names the option (and the config file), the usage would only hide it."""

    exit_code = BAD_OPTION


class _CannotStart(click.ClickException):
    """A server that cannot start, told in one line: not a usage error."""

    exit_code = CANNOT_START


_SERVE_FLAGS: list[tuple[str, Any, str]] = [
    ("--host", str, "Address of the main port [default: 0.0.0.0]."),
    ("--port", int, "Main port: WebSocket and POST /log (0 = any free port) [default: 3000]."),
    ("--mon-host", str, "Address of the monitoring port [default: 127.0.0.1]."),
    ("--mon-port", int, "Monitoring port for /ecv and /metrics (-1 = off) [default: 3001]."),
    ("--workers", int, "Worker processes sharing the port (SO_REUSEPORT) [default: 1]."),
    ("--conn-threshold", int, "Concurrent WebSocket connections accepted [default: 1024]."),
    (
        "--max-http-connections",
        int,
        "Concurrent HTTP (not WebSocket) connections; past it 503 [default: 1024].",
    ),
    (
        "--heartbeat-interval",
        float,
        "Seconds between the server's heartbeats (0 = off) [default: 60].",
    ),
    ("--clean-duration", float, "Seconds between clean cycles [default: 60]."),
    (
        "--clean-cycles",
        int,
        "Idle clean cycles before an open tree is published incomplete [default: 3].",
    ),
    ("--settle", float, "Seconds a closed tree waits for stragglers [default: 0]."),
    ("--machine-name", str, "Machine name on the server's heartbeats [default: hostname]."),
    ("--max-life", float, "Recycle a worker after [N, 2N) seconds (0 = never) [default: 0]."),
    ("--max-messages", int, "Recycle a worker after N frames (0 = never) [default: 0]."),
    ("--wait-for-publisher", float, "Seconds publishers get to finish on shutdown [default: 3]."),
    ("--log-file", str, "JSON-lines output file [default: ./log/all.log]."),
    ("--log-max-bytes", int, "Rotate the output file at this size (0 = never) [default: 100 MiB]."),
    ("--log-backup-count", int, "Rotated files kept [default: 5]."),
    (
        "--dead-letter",
        str,
        "JSON-lines file of records a publisher refuses on their own, with the error "
        "[default: dead-letter.log beside --log-file].",
    ),
    ("--max-message-bytes", int, "Largest frame or POST body [default: 4 MiB]."),
    (
        "--max-inflight-bytes",
        int,
        "Bytes of bodies and frames held at once across connections; past it 503 or "
        "close 1013 [default: 256 MiB].",
    ),
    (
        "--idle-timeout",
        float,
        "Close a WebSocket idle this many seconds (0 = never) [default: 600].",
    ),
    ("--ping-interval", float, "Seconds between WebSocket pings (0 = off) [default: 30]."),
    (
        "--publish-queue",
        int,
        "Records waiting for the publisher before ingest pauses [default: 50000].",
    ),
    ("--max-events-per-frame", int, "Events in one frame or body [default: 10000]."),
    ("--max-depth", int, "Nesting of maps and lists inside one event [default: 32]."),
    ("--max-string-length", int, "Longest string in an event [default: 65536]."),
    ("--max-keys-per-map", int, "Most keys in one map [default: 256]."),
    (
        "--max-array-length",
        int,
        "Most items in an array inside an event; past it the event is refused [default: 10000].",
    ),
    (
        "--max-record-bytes",
        int,
        "Largest event as compact JSON; past it the event is refused [default: 8 MiB].",
    ),
    (
        "--max-open",
        int,
        "Open trees held; past it the oldest is published incomplete (evicted) [default: 100000].",
    ),
    (
        "--max-events-per-tx",
        int,
        "Events held for one tree; past it the tree is published evicted [default: 10000].",
    ),
    (
        "--max-tree-depth",
        int,
        "Nested transactions kept in one record (at most 100); deeper subtrees are published "
        "as fragments flagged depth_cut [default: 64].",
    ),
    (
        "--max-published-memory",
        int,
        "Published uuids remembered to drop resends; older ones come out late [default: 100000].",
    ),
    (
        "--max-open-bytes",
        int,
        "Bytes of events held in open trees; past it the oldest are published evicted "
        "[default: 256 MiB].",
    ),
    (
        "--max-published-digests",
        int,
        "Digests (8 bytes each) remembered of published trees; past it the oldest uuid is "
        "forgotten [default: 8000000].",
    ),
    (
        "--published-memory-age",
        float,
        "Seconds a published uuid is remembered to drop its resends [default: 900].",
    ),
    ("--rate-limit", float, "Events/s one connection may send (0 = no limit) [default: 0]."),
    ("--request-timeout", float, "Seconds an HTTP request may take to arrive [default: 30]."),
    (
        "--tokens",
        str,
        "Comma-separated shared tokens clients must present (or ASYNC_LOGGING_TOKENS).",
    ),
    ("--allowed-origins", str, "Comma-separated Origins browser WebSockets may come from."),
    (
        "--viewer-tokens",
        str,
        "Comma-separated read-only tokens of the monitoring port: the viewer, its API and "
        "/metrics (or ASYNC_LOGGING_VIEWER_TOKENS).",
    ),
    ("--tls-cert", str, "PEM certificate: serve https and wss."),
    ("--tls-key", str, "PEM private key for --tls-cert."),
    (
        "--spool",
        str,
        "Directory of the write-ahead spool: ack only what is on disk (off by default).",
    ),
    ("--spool-max-bytes", int, "Spool size at which new batches are refused [default: 1 GiB]."),
    ("--store", str, "SQLite store behind the viewer ('' = off) [default: ./log/trees.sqlite]."),
    ("--store-max-age", float, "Seconds of trees the store keeps [default: 7 days]."),
    ("--store-max-bytes", int, "Store size past which the oldest trees go [default: 1 GiB]."),
    (
        "--otlp-settle",
        float,
        "Seconds a root span taken over OTLP (POST /v1/traces) waits for the rest of its "
        "trace in later requests (0 = none) [default: 2].",
    ),
    (
        "--otlp-endpoint",
        str,
        "Also export every published tree as spans to this OTLP/HTTP receiver "
        "(http://collector:4318) [default: off].",
    ),
    (
        "--otlp-export-queue",
        int,
        "Published records waiting for the OTLP exporter; past it the oldest are dropped "
        "[default: 10000].",
    ),
    ("--listener", str, "Listener plug-in, module:attr [default: LogListener]."),
    ("--buffer", str, "Buffer plug-in, module:attr [default: LogBuffer]."),
    (
        "--bus",
        str,
        "NATS JetStream URLs (nats://host:4222, comma-separated): publish accepted batches "
        "there for reassemblers instead of reassembling here [default: off].",
    ),
    (
        "--partitions",
        int,
        "Partitions of the bus's events stream, the same on every node (1-1024) [default: 16].",
    ),
    ("--bus-replicas", int, "Copies of each bus stream in the JetStream cluster [default: 1]."),
    ("--bus-max-bytes", int, "Size of each bus stream [default: 1 GiB]."),
    ("--bus-max-age", float, "Seconds the trees stream keeps a tree [default: 1 day]."),
    (
        "--bus-ack-wait",
        float,
        "Seconds JetStream waits for an ack before delivering a message again [default: 30].",
    ),
    (
        "--bus-max-ack-pending",
        int,
        "Unacked messages per partition (or sink) [default: 20000].",
    ),
    (
        "--bus-duplicate-window",
        float,
        "Seconds JetStream drops copies of a message by its id [default: 120].",
    ),
    (
        "--bus-timeout",
        float,
        "Seconds a publish waits for JetStream before the batch is refused [default: 5].",
    ),
    (
        "--bus-compression",
        click.Choice(["zstd", "none"]),
        "What this node's bus messages are compressed with; every node reads both [default: zstd].",
    ),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="async-logging")
def main() -> None:
    """async-logging: a log proxy that restores transaction trees from async log events."""


def _setup_logging(verbose: int) -> None:
    """Log to standard error: warnings, or more with -v (info) and -vv (debug)."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _serve_options(fn: Any) -> Any:
    for flag, kind, help_ in reversed(_SERVE_FLAGS):
        fn = click.option(flag, type=kind, default=None, help=help_)(fn)
    return fn


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file with any of these options (snake_case or camelCase keys).",
)
@click.option(
    "--publisher",
    multiple=True,
    help="Publisher plug-in (module:attr, or jsonl / stdout); repeatable; replaces the file sink.",
)
@click.option("--stdout/--no-stdout", default=None, help="Also write records to stdout.")
@click.option(
    "--compact/--no-compact",
    default=None,
    help="Below a root, keep uuid, request, tid, pid, machine, ... only where they differ.",
)
@click.option(
    "--otlp-header",
    "otlp_headers",
    multiple=True,
    help="K=V header sent with every OTLP export request; repeatable.",
)
@click.option("--ecv/--no-ecv", default=None, help="Report healthy on /ecv [default: on].")
@click.option(
    "--verbose", "-v", count=True, help="Log more (-v info, -vv debug) to standard error."
)
@_serve_options
def serve(
    *,
    config_file: str | None,
    publisher: tuple[str, ...],
    stdout: bool | None,
    compact: bool | None,
    otlp_headers: tuple[str, ...],
    ecv: bool | None,
    verbose: int,
    **flags: Any,
) -> None:
    """Run the log proxy until SIGTERM or SIGINT, then drain and flush.

    Clients connect over WebSocket (any path, subprotocol log-protocol) or POST /log on
    --port; reassembled trees go to --log-file as JSON lines.
    """
    from .server import LogCluster, ServerConfig, load_config_file

    _setup_logging(verbose)
    try:
        values: dict[str, Any] = load_config_file(config_file) if config_file else {}
        config = ServerConfig.from_mapping(values, source=config_file or "config")
        overrides = {k: v for k, v in flags.items() if v is not None}
        for name, var in (
            ("tokens", "ASYNC_LOGGING_TOKENS"),
            ("viewer_tokens", "ASYNC_LOGGING_VIEWER_TOKENS"),
        ):
            env_tokens = os.environ.get(var)
            if env_tokens and name not in overrides and not getattr(config, name):
                overrides[name] = env_tokens
        if publisher:
            overrides["publisher"] = list(publisher)
        if stdout is not None:
            overrides["stdout"] = stdout
        if compact is not None:
            overrides["compact"] = compact
        if otlp_headers:
            overrides["otlp_headers"] = otlp_headers
        if ecv is not None:
            overrides["ecv"] = ecv
        config = config.replace(**overrides)
        if config.bus:  # an ingest node writes nothing: the store is a sink's (design §8)
            config = config.replace(store="")
        cluster = LogCluster(config)
    except ConfigError as exc:  # an option's value: named, without the usage block
        raise _BadOption(str(exc)) from exc
    try:
        code = cluster.run()
    except ConfigError as exc:  # cannot start: a port in use, a directory refused...
        raise _CannotStart(str(exc)) from exc
    sys.exit(code)


@main.command()
@click.option(
    "--url",
    default=None,
    help="The server's monitoring port [default: http://127.0.0.1:3001].",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["transaction", "atomicEvent", "heartbeat", "all"]),
    help="Record kinds to show; repeatable [default: transaction].",
)
@click.option("--type", "type_", default=None, help="Only this CAL type (URL, API, DB, ...).")
@click.option("--name", default=None, help="Only this name; a trailing * makes it a prefix.")
@click.option("--failures", is_flag=True, help="Only records whose status is not 0.")
@click.option(
    "--min-duration", type=float, default=None, help="Only records lasting at least N ms."
)
@click.option("--count", "-n", type=int, default=None, help="Stop after N records.")
@click.option(
    "--json/--tree",
    "json_lines",
    default=None,
    help="JSON lines (one record per line) or indented trees [default: trees in a terminal, "
    "JSON lines into a pipe or a file].",
)
@click.option("--no-color", is_flag=True, help="Print without colours.")
@click.option(
    "--token",
    envvar="ASYNC_LOGGING_TOKEN",
    default=None,
    help="Token the server's monitoring port asks for: a viewer or client token "
    "(or ASYNC_LOGGING_TOKEN).",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    help="Reconnect when the server ends the stream [default: reconnect].",
)
def tail(
    *,
    url: str | None,
    kinds: tuple[str, ...],
    type_: str | None,
    name: str | None,
    failures: bool,
    min_duration: float | None,
    count: int | None,
    json_lines: bool | None,
    no_color: bool,
    reconnect: bool,
    token: str | None,
) -> None:
    """Stream a running server's published trees to the terminal, as indented trees.

    Reads the live stream of the viewer (GET /api/live on the server's --mon-port). With
    server workers the live tail is not available.
    """
    from .tail import DEFAULT_URL, TailError, TailFilters, run

    try:
        filters = TailFilters(
            kinds=() if "all" in kinds else (kinds or ("transaction",)),
            type=type_,
            name=name,
            failures_only=failures,
            min_duration=min_duration,
        )
    except TailError as exc:
        raise click.UsageError(str(exc)) from exc
    if count is not None and count < 1:
        raise click.UsageError("--count must be at least 1")
    sys.exit(
        run(
            url or DEFAULT_URL,
            filters,
            count=count,
            reconnect=reconnect,
            json_lines=json_lines,
            no_color=no_color,
            token=token,
        )
    )


# ---------------------------------------------------------------------- the bus (§8)

_F = TypeVar("_F", bound=Callable[..., Any])

#: Options of ``reassemble`` and ``sink`` taken from ``serve``'s, by flag.
_BUS_FLAGS = (
    "--bus",
    "--bus-replicas",
    "--bus-max-bytes",
    "--bus-max-age",
    "--bus-ack-wait",
    "--bus-max-ack-pending",
    "--bus-duplicate-window",
    "--bus-timeout",
    "--bus-compression",
    "--mon-host",
    "--mon-port",
    "--machine-name",
)
_ENGINE_FLAGS = (
    "--clean-duration",
    "--clean-cycles",
    "--settle",
    "--max-open",
    "--max-events-per-tx",
    "--max-tree-depth",
    "--max-published-memory",
    "--max-open-bytes",
    "--max-published-digests",
    "--published-memory-age",
)
_SINK_FLAGS = (
    "--heartbeat-interval",
    "--wait-for-publisher",
    "--publish-queue",
    "--log-file",
    "--log-max-bytes",
    "--log-backup-count",
    "--dead-letter",
    "--store",
    "--store-max-age",
    "--store-max-bytes",
    "--viewer-tokens",
    "--tokens",
    "--otlp-endpoint",
    "--otlp-export-queue",
)


def _some_options(flags: tuple[str, ...]) -> Callable[[_F], _F]:
    """Click options for some of ``serve``'s flags (same names, types and help)."""
    chosen = [f for f in _SERVE_FLAGS if f[0] in flags]
    assert len(chosen) == len(flags), "a flag of _BUS_FLAGS is not a serve flag"

    def decorate(fn: Any) -> Any:
        for flag, kind, help_ in reversed(chosen):
            fn = click.option(flag, type=kind, default=None, help=help_)(fn)
        return fn

    return decorate


def _bus_config(config_file: str | None, flags: dict[str, Any], verbose: int) -> Any:
    """The options of a ``reassemble`` or ``sink`` node: the config file, then the flags
    (``--bus`` required); logging set up."""
    from .server import ServerConfig, load_config_file

    _setup_logging(verbose)
    try:
        values: dict[str, Any] = load_config_file(config_file) if config_file else {}
        config = ServerConfig.from_mapping(values, source=config_file or "config")
        config = config.replace(**{k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        raise _BadOption(str(exc)) from exc
    if not config.bus:
        raise _BadOption("--bus (or bus in the config file) is required: nats://host:4222")
    return config


_CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file with any of these options (snake_case or camelCase keys).",
)
_VERBOSE_OPTION = click.option(
    "--verbose", "-v", count=True, help="Log more (-v info, -vv debug) to standard error."
)


@main.command()
@_CONFIG_OPTION
@click.option("--member", default=None, help="K/N: member K (1..N) of N takes every Nth partition.")
@click.option(
    "--partitions",
    "owned",
    default=None,
    help="The partitions this node takes: numbers and ranges, e.g. 0-3 or 0,2,5-7.",
)
@click.option("--ecv/--no-ecv", default=None, help="Report healthy on /ecv [default: on].")
@_VERBOSE_OPTION
@_some_options(_BUS_FLAGS + _ENGINE_FLAGS)
def reassemble(
    *,
    config_file: str | None,
    member: str | None,
    owned: str | None,
    ecv: bool | None,
    verbose: int,
    **flags: Any,
) -> None:
    """Reassemble trees from the bus: some partitions, one engine each (docs/design.md §8).

    Reads alog.events.<p> with a durable consumer per partition, publishes finished trees
    to alog.trees.<kind> and acks a partition's messages once the trees holding them are
    stored: a replacement started with the same --member or --partitions replays what this
    one had not finished. Run exactly one process per member.
    """
    import asyncio

    from .bus import Reassembler, parse_member, parse_partitions
    from .bus.jetstream import BusSettings, stream_partitions

    if (member is None) == (owned is None):
        raise _BadOption("give one of --member K/N or --partitions (e.g. 0-3)")
    config = _bus_config(config_file, flags, verbose)
    if ecv is not None:
        config = config.replace(ecv=ecv)

    async def total() -> int:  # the stream's partitions, or the configured ones if none
        import nats

        settings = BusSettings.from_config(config)
        try:
            nc = await nats.connect(
                list(settings.servers), connect_timeout=2, max_reconnect_attempts=0
            )
        except Exception:  # unreachable now: the node waits for it with the configured count
            return int(config.partitions)
        try:
            found = await stream_partitions(nc.jetstream(timeout=settings.timeout))
        except Exception:
            found = None
        finally:
            await nc.close()
        return int(found or config.partitions)

    count = asyncio.run(total())
    config = config.replace(partitions=count)
    try:
        parts = parse_member(member, count) if member else parse_partitions(owned or "", count)
        code = Reassembler(config, parts).run()
    except ConfigError as exc:
        raise _BadOption(str(exc)) from exc
    sys.exit(code)


@main.command()
@_CONFIG_OPTION
@click.option(
    "--name",
    default="default",
    show_default=True,
    help="The sink's consumer (alog-sink-NAME): each name gets every tree.",
)
@click.option(
    "--publisher",
    multiple=True,
    help="Publisher plug-in (module:attr, or jsonl / stdout); repeatable; replaces the file sink.",
)
@click.option("--stdout/--no-stdout", default=None, help="Also write records to stdout.")
@click.option(
    "--otlp-header",
    "otlp_headers",
    multiple=True,
    help="K=V header sent with every OTLP export request; repeatable.",
)
@_VERBOSE_OPTION
@_some_options(_BUS_FLAGS + _SINK_FLAGS)
def sink(
    *,
    config_file: str | None,
    name: str,
    publisher: tuple[str, ...],
    stdout: bool | None,
    otlp_headers: tuple[str, ...],
    verbose: int,
    **flags: Any,
) -> None:
    """Write the bus's published trees to the publishers of serve (docs/design.md §8).

    Consumes alog.trees.* into the JSON-lines file (--log-file), the store and viewer
    that follow it (--store, --mon-port), OTLP export (--otlp-endpoint) and plug-ins, and
    acks what they took. One sink with a store shows the whole fleet in one viewer.
    """
    import re

    from .bus.sink import run_sink

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise _BadOption(f"--name must be letters, digits, - and _ (at most 64), not {name!r}")
    extra: dict[str, Any] = {}
    if publisher:
        extra["publisher"] = list(publisher)
    if stdout is not None:
        extra["stdout"] = stdout
    if otlp_headers:
        extra["otlp_headers"] = otlp_headers
    config = _bus_config(config_file, {**flags, **extra}, verbose)
    try:
        code = run_sink(config, name)
    except ConfigError as exc:
        raise _CannotStart(str(exc)) from exc
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
