"""``async-logging tail``: stream a running server's published trees to the terminal.

Connects to the viewer's live endpoint (``GET /api/live`` on the server's ``mon_port``,
server-sent events), lets the server filter (``--type``, ``--name``, ``--failures``,
``--min-duration``, ``--kind``), and prints each record as an indented tree with
`rich <https://rich.readthedocs.io>`_::

    12:00:01.123  URL /checkout  169 ms  status 1  uuid req-42
    ├── ◆ INFO request  POST /checkout user=1842
    ├── API auth.verify  10 ms  status 0
    │   └── ◆ CACHE session  hit
    └── API payment.charge  88 ms  status 51
        └── ◆ ERROR gateway  card declined (code 51)

When the server's monitoring port asks for a token, ``--token`` (or the environment
variable ``ASYNC_LOGGING_TOKEN``) is sent as ``Authorization: Bearer``; a viewer token or
a client token of that server will do.

``--json`` prints the records as JSON lines instead (for ``jq``): one record per line,
never wrapped. That is the default when standard output is not a terminal (a pipe, a
file); ``--tree`` prints trees there anyway, without colours and without wrapping their
lines (:data:`UNWRAPPED_WIDTH`). The stream reconnects with backoff when the server goes
away (``--no-reconnect`` to stop instead); the first connection failing is an error (exit
status 1). A URL that is the server's main port instead of its monitoring port is told so
(exit status 2).

Limits: one server-sent event may be at most :data:`MAX_EVENT_BYTES` (a longer one is
skipped and reported); a tree prints at most :data:`MAX_CHILDREN` children per node.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any, Final, TextIO

import aiohttp
import orjson
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

__all__ = [
    "DEFAULT_URL",
    "MAX_CHILDREN",
    "MAX_EVENT_BYTES",
    "UNWRAPPED_WIDTH",
    "SseParser",
    "TailError",
    "TailFilters",
    "render",
    "run",
    "tail",
]

#: The monitoring port of a server started with the defaults.
DEFAULT_URL: Final = "http://127.0.0.1:3001"
#: Largest server-sent event accepted, in bytes.
MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
#: Children printed under one node (the rest are summarised in one line).
MAX_CHILDREN: Final = 200
#: Seconds to wait for the server to answer the subscription.
CONNECT_TIMEOUT: Final = 10.0
#: Backoff between reconnections (seconds): starts here, doubles up to the maximum.
RECONNECT_MIN: Final = 0.5
RECONNECT_MAX: Final = 10.0
#: Width of the console a tree is written to when the output is not a terminal: its lines
#: are never wrapped nor cut (a label longer than this would be).
UNWRAPPED_WIDTH: Final = 1 << 22
#: Seconds to wait for the main port's ``GET /ws`` when telling it from the monitoring port.
PROBE_TIMEOUT: Final = 3.0

_FLAGS: Final = ("late", "orphan", "missing_end", "missing_begin", "cycle", "depth_cut", "conflict")
_KINDS: Final = ("transaction", "atomicEvent", "heartbeat")


class TailError(Exception):
    """The live stream cannot be used (no server, live tail off, bad filter).

    Attributes:
        status: the exit status ``async-logging tail`` ends with.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class TailFilters:
    """What to stream: the server applies these before sending anything.

    Attributes:
        kinds: record kinds (``transaction``, ``atomicEvent``, ``heartbeat``); empty = all.
        type: the CAL type, exact.
        name: the name, exact, or a prefix when it ends with ``*``.
        failures_only: only records whose status is not ``"0"``.
        min_duration: only records lasting at least this many ms.
    """

    kinds: tuple[str, ...] = ("transaction",)
    type: str | None = None
    name: str | None = None
    failures_only: bool = False
    min_duration: float | None = None

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in _KINDS:
                raise TailError(f"kind must be one of {', '.join(_KINDS)}, not {kind!r}", 2)
        if self.min_duration is not None and self.min_duration < 0:
            raise TailError("min-duration must not be negative", 2)

    def query(self) -> list[tuple[str, str]]:
        """The query parameters of ``/api/live``."""
        q = [("kind", kind) for kind in self.kinds]
        if self.type:
            q.append(("type", self.type))
        if self.name:
            q.append(("name", self.name))
        if self.failures_only:
            q.append(("failures", "1"))
        if self.min_duration is not None:
            q.append(("min_duration", repr(self.min_duration)))
        return q


class SseParser:
    """Incremental parser of a ``text/event-stream`` body (the subset the server sends).

    Feed it bytes as they arrive; it returns the complete events as ``(event, data)``
    pairs. Comments and ``retry`` fields are ignored. An event longer than ``max_bytes``
    is skipped, counted in :attr:`oversized`.
    """

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.oversized = 0
        self._buf = bytearray()
        self._skipping = False
        self._cr = b""

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Add ``chunk``; return the events it completed."""
        data = self._cr + chunk
        # A CRLF may be split between two chunks: hold a trailing CR back until the next.
        self._cr = b"\r" if data.endswith(b"\r") else b""
        self._buf += data[: len(data) - len(self._cr)].replace(b"\r\n", b"\n")
        events: list[tuple[str, str]] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                if len(self._buf) > self.max_bytes:
                    # Keep only a possible partial separator; skip to the next blank line.
                    if not self._skipping:
                        self.oversized += 1
                    self._skipping = True
                    del self._buf[:-1]
                return events
            block = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if self._skipping:
                self._skipping = False
                continue
            if len(block) > self.max_bytes:
                self.oversized += 1
                continue
            event, values = "message", []
            for line in block.decode("utf-8", "replace").split("\n"):
                if not line or line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    values.append(value)
            if values:
                events.append((event, "\n".join(values)))


def _clock(ts: Any) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "--:--:--.---"
    seconds = ts / 1000
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{int(ts) % 1000:03d}"


def _ms(duration: Any) -> str:
    """A duration in ms as the viewer shows it: µs below 1 ms, s from 1,000 ms."""
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        return ""
    if 0 < duration < 1:
        return f"{round(duration * 1000)} µs"
    if duration < 1000:
        return f"{round(duration, 1):g} ms"
    return f"{duration / 1000:.2f} s"


def _status_style(status: Any) -> str:
    if status is None or str(status) == "-1":
        return "yellow"
    return "green" if str(status) == "0" else "bold red"


def _label(node: dict[str, Any], *, root: bool) -> Text:
    kind = node.get("kind")
    parts: list[str] = []
    if root:
        parts.append(f"[dim]{_clock(node.get('timestamp'))}[/dim]")
    head = escape(str(node.get("type", "")))
    name = node.get("name")
    msg = node.get("msg")
    if kind == "transaction":
        parts.append(f"[cyan]{head}[/cyan] [bold]{escape(str(name or ''))}[/bold]")
        parts.append(_ms(node.get("duration")))
        status = node.get("status")
        parts.append(f"[{_status_style(status)}]status {escape(str(status))}[/]")
        if msg:
            parts.append(f"[dim]{escape(str(msg))}[/dim]")
    else:
        level = str(node.get("level", "")).upper()
        if (
            level.startswith(("ERR", "FATAL", "CRIT"))
            or _status_style(node.get("status")) == "bold red"
        ):
            style = "red"
        elif level.startswith("WARN"):
            style = "yellow"
        else:
            style = "blue"
        marker = "♥" if kind == "heartbeat" else "◆"
        parts.append(f"[{style}]{marker}[/] [cyan]{head}[/cyan] {escape(str(name or ''))}")
        if msg:
            parts.append(escape(str(msg)))
    if kind == "transaction" and node.get("complete") is False:
        reason = node.get("reason")
        parts.append(
            "[black on yellow] incomplete" + (f": {escape(str(reason))}" if reason else "") + " [/]"
        )
    for flag in _FLAGS:
        if node.get(flag):
            parts.append(f"[magenta]\\[{flag}][/magenta]")
    if root and node.get("uuid"):
        parts.append(f"[dim]uuid {escape(str(node['uuid']))}[/dim]")
    return Text.from_markup("  ".join(p for p in parts if p))


def render(record: dict[str, Any], *, max_children: int = MAX_CHILDREN) -> Tree:
    """One record as a rich :class:`~rich.tree.Tree`: children nested, in order."""
    tree = Tree(_label(record, root=True), guide_style="dim")
    stack: list[tuple[Tree, dict[str, Any]]] = [(tree, record)]
    while stack:
        branch, node = stack.pop()
        children = node.get("children")
        if not isinstance(children, list):
            continue
        for child in children[:max_children]:
            if isinstance(child, dict):
                sub = branch.add(_label(child, root=False))
                stack.append((sub, child))
        if len(children) > max_children:
            branch.add(Text(f"… {len(children) - max_children} more", style="dim"))
    return tree


async def tail(
    url: str,
    filters: TailFilters,
    console: Console,
    *,
    count: int | None = None,
    reconnect: bool = True,
    json_lines: bool = False,
    err: Console | None = None,
    session: aiohttp.ClientSession | None = None,
    token: str | None = None,
) -> int:
    """Stream records from the server at ``url`` (its monitoring port) to ``console``.

    Args:
        url: base URL of the server's monitoring port, e.g. ``http://127.0.0.1:3001``.
        filters: what the server should send.
        console: where trees (or JSON lines) are printed.
        count: stop after this many records (None: until cancelled or the stream ends
            with ``reconnect`` off).
        reconnect: reconnect with backoff when an established stream ends.
        json_lines: print each record as one JSON line instead of a tree.
        err: where notices (dropped records, reconnections) go; default stderr.
        session: an aiohttp session to use (one is made and closed otherwise).
        token: sent as ``Authorization: Bearer`` when the server asks for one.

    Returns:
        How many records were printed.

    Raises:
        TailError: the first connection failed, or the server refused the stream.
    """
    headers = {"Accept": "text/event-stream"}
    if token:
        if not (token.isascii() and token.isprintable()):
            raise TailError("the token must be printable ASCII (it is sent in a header)", 2)
        headers["Authorization"] = f"Bearer {token}"
    err = err or Console(stderr=True, highlight=False, soft_wrap=True)
    own = session is None
    session = session or aiohttp.ClientSession()
    printed = 0
    delay = RECONNECT_MIN
    connected_once = False
    endpoint = url.rstrip("/") + "/api/live"
    try:
        while True:
            try:
                async with session.get(
                    endpoint,
                    params=filters.query(),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                    headers=headers,
                ) as resp:
                    if resp.status != 200:
                        if await _is_main_port(session, url):
                            raise TailError(_main_port_message(url), 2)
                        raise TailError(await _refusal(resp), 2 if resp.status == 400 else 1)
                    connected_once = True
                    delay = RECONNECT_MIN
                    parser = SseParser()
                    async for chunk in resp.content.iter_any():
                        for event, data in parser.feed(chunk):
                            if event == "dropped":
                                lost = orjson.loads(data).get("dropped", 0)
                                err.print(
                                    f"[yellow]… {lost} records dropped: this tail fell behind[/]"
                                )
                                continue
                            if event != "record":
                                continue
                            record = orjson.loads(data)
                            if json_lines:
                                # One record, one line, whatever the server's line breaks.
                                line = data if "\n" not in data else orjson.dumps(record).decode()
                                console.file.write(line + "\n")
                                console.file.flush()
                            else:
                                console.print(render(record))
                            printed += 1
                            if count is not None and printed >= count:
                                return printed
                        if parser.oversized:
                            err.print(f"[yellow]… skipped {parser.oversized} oversized events[/]")
                            parser.oversized = 0
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if not connected_once:
                    raise TailError(f"cannot stream from {endpoint}: {exc}") from exc
                err.print(f"[yellow]… connection lost ({exc}); reconnecting[/]")
            else:
                if not reconnect:
                    return printed
                err.print("[yellow]… the server ended the stream; reconnecting[/]")
            if not reconnect:
                return printed
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX, delay * 2)
    finally:
        if own:
            await session.close()


async def _is_main_port(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url`` is a server's main port: its ``GET /ws`` names the log protocol."""
    try:
        async with session.get(
            url.rstrip("/") + "/ws", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        ) as resp:
            if resp.status != 200:
                return False
            body = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("protocol") == "log-protocol"


def _main_port_message(url: str) -> str:
    base = url.rstrip("/")
    return (
        f"{base} is the server's main port, where clients send their logs; tail reads the "
        "live stream of its monitoring port (serve --mon-port, 3001 by default): "
        "--url http://HOST:3001"
    )


async def _refusal(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
        detail = body.get("detail") or body.get("error")
    except (aiohttp.ClientError, ValueError, AttributeError):
        detail = None
    message = f"the server refused the live stream (HTTP {resp.status}): {detail or resp.reason}"
    if resp.status == 401:
        message += " (give a token: --token or ASYNC_LOGGING_TOKEN)"
    return message


def run(
    url: str,
    filters: TailFilters,
    *,
    count: int | None = None,
    reconnect: bool = True,
    json_lines: bool | None = None,
    stdout: TextIO | None = None,
    no_color: bool = False,
    token: str | None = None,
) -> int:
    """Run :func:`tail` until done or interrupted; returns the exit status.

    ``json_lines`` None: JSON lines when ``stdout`` is not a terminal, trees when it is.
    Trees written elsewhere than a terminal are not wrapped (:data:`UNWRAPPED_WIDTH`).
    """
    out = stdout or sys.stdout
    terminal = out.isatty()
    if json_lines is None:
        json_lines = not terminal
    console = Console(
        file=out,
        highlight=False,
        no_color=no_color,
        width=None if terminal else UNWRAPPED_WIDTH,
    )
    err = Console(stderr=True, highlight=False, no_color=no_color, soft_wrap=True)
    try:
        asyncio.run(
            tail(
                url,
                filters,
                console,
                count=count,
                reconnect=reconnect,
                json_lines=json_lines,
                err=err,
                token=token,
            )
        )
    except TailError as exc:
        err.print(f"[red]async-logging tail: {escape(str(exc))}[/red]")
        return exc.status
    except KeyboardInterrupt:
        return 0
    return 0
