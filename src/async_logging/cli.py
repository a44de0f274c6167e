"""The ``async-logging`` command: ``serve`` runs the proxy (docs/design.md §5).

Every option of :class:`~async_logging.server.ServerConfig` is a flag and a TOML key
(``--config FILE``; flags win over the file). A bad flag, value or config file prints a
clear error and exits with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from .exceptions import ConfigError

__all__ = ["main"]

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
    ("--listener", str, "Listener plug-in, module:attr [default: LogListener]."),
    ("--buffer", str, "Buffer plug-in, module:attr [default: LogBuffer]."),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="async-logging")
def main() -> None:
    """async-logging: a log proxy that restores transaction trees from async log events."""


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
@click.option("--ecv/--no-ecv", default=None, help="Report healthy on /ecv [default: on].")
@click.option(
    "--verbose", "-v", count=True, help="Log more (-v info, -vv debug) to standard error."
)
@_serve_options
def serve(
    config_file: str | None,
    publisher: tuple[str, ...],
    stdout: bool | None,
    ecv: bool | None,
    verbose: int,
    **flags: Any,
) -> None:
    """Run the log proxy until SIGTERM or SIGINT, then drain and flush.

    Clients connect over WebSocket (any path, subprotocol log-protocol) or POST /log on
    --port; reassembled trees go to --log-file as JSON lines.
    """
    from .server import LogCluster, ServerConfig, load_config_file

    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
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
        if ecv is not None:
            overrides["ecv"] = ecv
        config = config.replace(**overrides)
        cluster = LogCluster(config)
        code = cluster.run()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
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
@click.option("--json", "json_lines", is_flag=True, help="Print JSON lines instead of trees.")
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
    json_lines: bool,
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


if __name__ == "__main__":  # pragma: no cover
    main()
