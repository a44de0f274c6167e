"""The client speaks up about its own problems: once per burst, with the reason, no secret.

The throttle is tested with an injected clock; the network tests use a closed port, the
real proxy (in-process, port 0) and a small aiohttp proxy that takes a frame and never
acknowledges it. Every wait is bounded by TIMEOUT and waits on a condition, never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from async_logging.client import LogClient, LogHandler, registry
from async_logging.client.report import (
    REPORT_EVERY,
    Reporter,
    add_secret,
    describe,
    safe_url,
)
from async_logging.client.testing import CaptureTransport
from async_logging.client.transports import ServerRefused
from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher
from conftest import TIMEOUT
from helpers import free_port

OWN = "async_logging.client"
TOKEN = "tok-s3cret-0123456789"
PASSWORD = "pw-s3cret-9876"


class Clock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Records(logging.Handler):
    """Collects the records of the client's logger; a test can wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # as a real handler would: exc_text, the formatted message
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def having(self, text: str, level: int = logging.DEBUG) -> list[str]:
        """The messages at ``level`` or above that contain ``text``."""
        with self._cond:
            return [
                r.getMessage()
                for r in self.records
                if r.levelno >= level and text in r.getMessage()
            ]

    def wait_for(self, text: str, n: int = 1) -> list[str]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.having(text)) >= n, TIMEOUT)
        return self.having(text)

    def texts(self) -> list[str]:
        """Every record as a handler would write it (the traceback included)."""
        with self._cond:
            return [self.format(r) for r in self.records]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    own = logging.getLogger(OWN)
    level = own.level
    own.addHandler(handler)
    own.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        own.removeHandler(handler)
        own.setLevel(level)


def leaks(records: Records, *secrets: str) -> list[str]:
    """The lines that show a secret or an Authorization header."""
    return [t for t in records.texts() if any(s in t for s in (*secrets, "Authorization"))]


class CountingBackoff:
    """A backoff of 10 ms delays that counts them: one per failed connection attempt."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> Iterator[float]:
        while True:
            with self._cond:
                self.count += 1
                self._cond.notify_all()
            yield 0.01

    async def reach(self, n: int) -> None:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self.count >= n, TIMEOUT)

        assert await asyncio.to_thread(wait)


@pytest.fixture
def clients() -> Iterator[Callable[..., LogClient]]:
    """Builds clients (not the default one); closes them after."""
    made: list[LogClient] = []

    def make(url: str, **options: Any) -> LogClient:
        options.setdefault("drain_interval", 0.01)
        options.setdefault("exit_timeout", 0)
        options.setdefault("default", False)
        client = LogClient(url=url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(0)


# --------------------------------------------------------------------------- the throttle


def test_a_problem_is_reported_at_once_then_at_most_every_report_every_seconds() -> None:
    """The first occurrence is reported; the next ones are counted, and the first one
    REPORT_EVERY seconds after the last report says how many the silence hid."""
    clock = Clock()
    reports = Reporter(clock)
    first = reports.hit("down")
    assert first is not None and first.first and first.note("attempts") == ""
    for _ in range(9):
        clock.now += 1
        assert reports.hit("down") is None
    clock.now += REPORT_EVERY - 9
    again = reports.hit("down", 2)
    assert again is not None and not again.first
    assert (again.count, again.hidden, again.seconds) == (12, 11, REPORT_EVERY)
    assert "11 attempts since the last report; 12 in 60 s" in again.note("attempts")
    assert reports.hit("down") is None  # the interval starts again from this report
    assert reports.hit("other") is not None  # each problem has its own burst


def test_a_burst_that_ends_is_summed_up_and_the_next_one_is_reported_at_once() -> None:
    """end() closes the burst with its totals; the next occurrence opens a new one."""
    clock = Clock()
    reports = Reporter(clock)
    assert reports.end("drops") is None and reports.quiet_for("drops") is None
    reports.hit("drops", 5)
    clock.now += 2
    assert reports.hit("drops", 3) is None
    clock.now += 1.5
    assert reports.quiet_for("drops") == 1.5
    over = reports.end("drops")
    assert over is not None and (over.count, over.hidden, over.seconds) == (8, 3, 3.5)
    assert reports.hit("drops") is not None


# --------------------------------------------------------------------------- what lines show


def test_urls_and_errors_in_log_lines_show_no_credentials_and_no_headers() -> None:
    """safe_url drops user info and query; describe() of a refused handshake shows its
    status, never the request's headers (aiohttp's repr of it holds the token)."""
    url = f"ws://user:{PASSWORD}@proxy:3000/in?token={TOKEN}"
    assert safe_url(url) == "ws://proxy:3000/in"
    info = aiohttp.RequestInfo(
        URL(url),
        "GET",
        CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {TOKEN}"})),
        URL(url),
    )
    handshake = aiohttp.WSServerHandshakeError(
        info, (), status=401, message="Invalid response status"
    )
    assert TOKEN in repr(handshake)  # what a "%r" used to print
    text = describe(handshake)
    assert (
        text == "WSServerHandshakeError: HTTP 401 Invalid response status from ws://proxy:3000/in"
    )
    assert "user" not in describe(OSError(f"cannot open {url}"))
    assert describe(ServerRefused(401, "bad_token")) == "ServerRefused: HTTP 401: bad_token"


def test_the_client_logger_scrubs_registered_secrets_from_messages_and_tracebacks(
    records: Records,
) -> None:
    """A registered secret never reaches a handler from the client's logger, whether in the
    message, its arguments or a traceback; URLs lose their user info."""
    add_secret("s3cret")  # inside the token: the token must still be masked whole
    add_secret(TOKEN)
    add_secret("ab")  # too short to scrub: it would garble every line
    log = logging.getLogger(OWN)
    log.warning("sending Bearer %s to %s (ab)", TOKEN, f"ws://u:{PASSWORD}@h/")
    try:
        raise RuntimeError(f"boom {TOKEN}")
    except RuntimeError:
        log.exception("failed")
    first, second = records.texts()
    assert first == "sending Bearer *** to ws://h/ (ab)"
    assert "boom ***" in second and TOKEN not in second


# --------------------------------------------------------------------------- loss at close


class SilentProxy:
    """A WebSocket proxy that says ready, takes one frame, then neither reads nor acks
    (not even the close) until released."""

    def __init__(self) -> None:
        self.got = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("log-protocol",))
        await ws.prepare(request)
        await ws.send_str("ready")
        await ws.receive()
        self.got.set()
        await self.release.wait()
        return ws


@pytest.fixture
async def silent() -> AsyncIterator[tuple[SilentProxy, str]]:
    proxy = SilentProxy()
    app = web.Application()
    app.router.add_get("/", proxy.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield proxy, f"ws://127.0.0.1:{server.port}/"
    finally:
        proxy.release.set()
        await server.close()


async def test_close_against_a_proxy_that_never_acks_reports_the_loss_before_it_returns(
    silent: tuple[SilentProxy, str], records: Records, clients: Callable[..., LogClient]
) -> None:
    """close(timeout) against a proxy that took the frame but never acks (nor answers the
    close) returns with the unacknowledged events counted and one warning already logged,
    saying how many and why (it used to come when the connection closed, seconds later)."""
    proxy, url = silent
    client = clients(url)
    for i in range(10):
        client.event("LOG", "x", n=i)
    await asyncio.wait_for(proxy.got.wait(), TIMEOUT)  # in flight
    assert not await client.aclose(0.3)
    s = client.stats  # read at once: nothing may arrive after close() returned
    warned = records.having("not acknowledged", logging.WARNING)
    assert (s.lost_at_close, s.kept_at_close, s.lost, s.queued) == (10, 0, 10, 0), s
    assert warned == [
        f"async-logging client: 10 events not acknowledged at close(timeout=0.3): connected "
        f"to {url}, but the proxy has not acknowledged them; they are lost"
    ]


async def test_close_with_a_spool_says_the_unacknowledged_events_are_kept_not_lost(
    tmp_path: Path,
    silent: tuple[SilentProxy, str],
    records: Records,
    clients: Callable[..., LogClient],
) -> None:
    """With a spool_dir, what the proxy did not acknowledge is kept for the next start:
    counted in kept_at_close, not in lost, and the one warning says so."""
    proxy, url = silent
    client = clients(url, spool_dir=tmp_path / "spool")
    for i in range(10):
        client.event("LOG", "x", n=i)
    await asyncio.wait_for(proxy.got.wait(), TIMEOUT)
    assert not await client.aclose(0.3)
    s = client.stats
    assert (s.lost_at_close, s.kept_at_close, s.lost) == (0, 10, 0), s
    [warned] = records.having("not acknowledged", logging.WARNING)
    assert warned.startswith("async-logging client: 10 events not acknowledged at close")
    assert warned.endswith("for the next start (not lost), 0 lost"), warned
    assert f"kept in the spool {tmp_path / 'spool'}" in warned


async def test_a_client_closed_before_it_started_reports_what_it_held(
    records: Records,
) -> None:
    """A client closed before its sender started counts and reports the events it queued."""
    client = LogClient(
        url=f"ws://127.0.0.1:{free_port()}/", start=False, exit_timeout=0, default=False
    )
    client.event("LOG", "never sent")
    client.event("LOG", "nor this")
    assert not client.close(0)
    assert (client.stats.lost_at_close, client.stats.queued) == (2, 0)
    [warned] = records.having("not acknowledged", logging.WARNING)
    assert "2 events not acknowledged at close(timeout=0): not connected to" in warned


async def test_the_exit_time_flush_reports_what_was_not_acknowledged(
    silent: tuple[SilentProxy, str],
) -> None:
    """A script that exits with events its proxy never acknowledged says so on stderr,
    each client once, even one with exit_timeout=0 (which does not wait)."""
    _, url = silent
    script = (
        "import sys\n"
        "from async_logging.client import LogClient\n"
        "waits = LogClient(url=sys.argv[1], exit_timeout=0.3)\n"
        "hurries = LogClient(url=sys.argv[1], exit_timeout=0, default=False)\n"
        "for i in range(3):\n"
        "    waits.event('LOG', 'x')\n"
        "for i in range(2):\n"
        "    hurries.event('LOG', 'y')\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, url, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err
    lines = [line for line in err.decode().splitlines() if "not acknowledged" in line]
    assert len(lines) == 2, err
    assert any(
        "3 events not acknowledged at interpreter exit (exit_timeout=0.3)" in line
        and line.endswith("they are lost")
        for line in lines
    ), lines
    assert any(
        "2 events not acknowledged at interpreter exit (exit_timeout=0)" in line for line in lines
    )


# --------------------------------------------------------------------------- problems


async def test_the_proxy_down_is_reported_once_per_burst_with_the_reason_and_no_secret(
    records: Records, clients: Callable[..., LogClient], publisher: MemoryPublisher
) -> None:
    """Failed connection attempts give one warning naming the URL (without credentials) and
    the error, another one REPORT_EVERY seconds later counting the attempts in between, and
    an info line once the proxy answers; no line shows the token or the password."""
    port = free_port()
    backoff = CountingBackoff()
    clock = Clock()
    # Credentials in the URL (aiohttp refuses them beside a token= header).
    client = clients(
        f"ws://user:{PASSWORD}@127.0.0.1:{port}/?token={TOKEN}",
        backoff=backoff,
        connect_timeout=1.0,  # an attempt that hangs for any reason is one more failure
        start=False,
    )
    client._sender.reports.clock = clock
    client.event("LOG", "waits")  # before the first attempt, which counts it
    client.start()
    await backoff.reach(5)
    [warned] = records.having("cannot reach", logging.WARNING)
    assert warned.startswith(
        f"async-logging client: cannot reach the proxy at ws://127.0.0.1:{port}/ "
        "(ClientConnectorError: Cannot connect to host"
    ), warned
    assert warned.endswith("retrying with backoff, 1 events wait")
    clock.now += REPORT_EVERY
    seen = backoff.count
    await backoff.reach(seen + 2)
    _, again = records.having("cannot reach", logging.WARNING)
    assert "more failed attempts since the last report" in again
    server = LogCluster(
        host="127.0.0.1", port=port, mon_port=-1, heartbeat_interval=0, publisher=publisher
    )
    await server.start()
    try:
        assert await client.aflush(TIMEOUT)
        [back] = records.having("reached the proxy")
        assert f"reached the proxy at ws://127.0.0.1:{port}/ after " in back
        assert len(records.having("cannot reach")) == 2
    finally:
        await server.stop()  # a new burst begins: the client cannot reach it again
    assert leaks(records, TOKEN, PASSWORD) == []


@pytest.mark.parametrize("server_options", [{"tokens": ("the-right-token",)}])
@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_a_refused_token_is_reported_once_with_the_reason_and_never_shown(
    transport: str, server: LogCluster, records: Records, clients: Callable[..., LogClient]
) -> None:
    """A 401 makes the client give up with one error saying the token was refused (or is
    missing); the drops that follow are reported once, naming that reason; no line shows
    the token or an Authorization header (aiohttp's repr of the refusal holds it, and the
    proxy's 401 answer quotes the header it wants)."""
    url = f"ws://127.0.0.1:{server.port}/"
    options: dict[str, Any] = {"token": TOKEN} if transport == "websocket" else {}
    client = clients(url, transport=transport, max_queue_events=10, **options)
    client.event("LOG", "first")
    assert not await client.aflush(TIMEOUT)
    for i in range(100):  # refused at the door now: dropped
        client.event("LOG", "after", n=i)
    records.wait_for("dropping new events")
    await client.aclose(TIMEOUT)
    [gave_up] = records.having("giving up", logging.ERROR)
    if transport == "websocket":
        assert "the proxy refused the token (HTTP 401)" in gave_up
    else:
        assert "the proxy requires a token (HTTP 401) and none was given" in gave_up
    [dropping] = records.having("dropping new events", logging.WARNING)
    assert "gave up" in dropping and "HTTP 401" in dropping
    assert leaks(records, TOKEN) == []


async def test_a_log_handler_on_the_root_logger_never_sends_the_clients_own_warnings(
    records: Records, clients: Callable[..., LogClient]
) -> None:
    """The client's warnings reach the root logger's handlers, but a LogHandler there
    sends none of them (no feedback loop), while it sends the application's records."""
    capture = CaptureTransport()
    sink = LogClient(transport=capture, default=False, exit_timeout=0)
    handler = LogHandler(sink)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = registry.default.client
    try:
        failing = clients(f"ws://127.0.0.1:{free_port()}/", backoff=CountingBackoff())
        failing.event("LOG", "queued")
        records.wait_for("cannot reach")
        logging.getLogger("app").warning("the application's own line")
        assert sink.flush(TIMEOUT)
    finally:
        root.removeHandler(handler)
        sink.close(TIMEOUT)
        registry.default.client = previous
    loggers = [e.get("logger") for e in capture.events]
    assert "app" in loggers
    assert not [name for name in loggers if str(name).startswith("async_logging")], loggers
