"""The monitoring port follows the tokens (issue 12): the viewer, its API, the live stream and
/metrics ask for one; /ecv stays open; a port open to the network is named at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from async_logging.exceptions import UsageError
from async_logging.server import LogCluster, ServerConfig
from async_logging.server.monauth import (
    COOKIE,
    MAX_SIGN_IN_BYTES,
    SESSION_MAX_AGE,
    MonitorAuth,
    auth_required,
    endpoint_of,
    is_loopback,
    open_warning,
)
from async_logging.tail import TailError, TailFilters, tail
from conftest import TIMEOUT
from helpers import Metrics, post_logs
from test_tail import plain_console, wire_tree

VIEWER = "viewer-s3cret"
INGEST = "ingest-s3cret"
PROTECTED = ["/ui/", "/ui/app.js", "/api/search", "/api/status", "/api/tree/1", "/api/live", "/metrics"]  # fmt: skip
ENDPOINTS = ["ui", "ui", "api", "api", "api", "live", "metrics"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (``hostname -I``), if any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out.split() if "." in a and not is_loopback(a)), None)


# ------------------------------------------------------------------ the decisions, no sockets


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.0.2.2", False),
        ("fe80::1%eth0", False),
        ("::ffff:192.0.2.2", False),
        ("proxy.example", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback_names_only_addresses_that_stay_on_this_machine(
    host: str, loopback: bool
) -> None:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and localhost are loopback; every other address and any other name is not."""
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("options", "required"),
    [
        ({}, False),
        ({"mon_host": "0.0.0.0"}, False),  # open, and warned about at start
        ({"tokens": INGEST}, False),  # loopback: only this machine reaches it
        ({"tokens": INGEST, "mon_host": "0.0.0.0"}, True),
        ({"tokens": INGEST, "mon_host": "localhost"}, False),
        ({"viewer_tokens": VIEWER}, True),  # asked for explicitly: wherever it listens
        ({"viewer_tokens": VIEWER, "mon_host": "0.0.0.0"}, True),
    ],
)
def test_a_token_is_required_for_viewer_tokens_or_for_tokens_off_loopback(
    options: dict[str, Any], required: bool
) -> None:
    """Viewer tokens always close the monitoring port; ingest tokens close it only when it listens beyond loopback."""
    config = ServerConfig(**options)
    assert auth_required(config) is required
    assert MonitorAuth.for_config(config).required is required


def test_viewer_tokens_are_checked_like_tokens() -> None:
    """viewer_tokens takes a comma-separated string or a list; an empty item is an error, not auth half off."""
    assert ServerConfig(viewer_tokens="a, b").viewer_tokens == ("a", "b")
    assert ServerConfig.from_mapping({"viewerTokens": ["c"]}).viewer_tokens == ("c",)
    with pytest.raises(Exception, match="viewer_tokens has an empty item"):
        ServerConfig(viewer_tokens="a,,b")
    with pytest.raises(UsageError, match="needs tokens"):
        MonitorAuth((), required=True)


def test_open_warning_names_what_is_open_and_only_off_loopback() -> None:
    """The warning names the address and what is open (/metrics, and the viewer when a store is on); none on loopback or with a token."""
    line = open_warning("0.0.0.0", required=False, viewer=True)
    assert line is not None and "listens on 0.0.0.0 without a token" in line
    assert "/metrics" in line and "/ui/" in line and "stored logs" in line
    line = open_warning("192.0.2.2", required=False, viewer=False)
    assert line is not None and "/metrics" in line and "/ui/" not in line
    assert "every address" in (open_warning("", required=False, viewer=False) or "")
    assert open_warning("127.0.0.1", required=False, viewer=True) is None
    assert open_warning("0.0.0.0", required=True, viewer=True) is None


def test_every_route_but_ecv_and_the_login_form_is_counted_under_an_endpoint() -> None:
    """Refusals are labelled ui, api, live, metrics or other; /ecv, the login form and its stylesheet are open."""
    assert [endpoint_of(p) for p in PROTECTED] == ENDPOINTS
    assert endpoint_of("/ui") == "ui" and endpoint_of("/favicon.ico") == "other"
    assert [endpoint_of(p) for p in ("/ecv", "/ui/login", "/ui/style.css")] == [None] * 3


def test_a_bearer_token_or_a_sign_in_cookie_opens_the_port() -> None:
    """A listed Bearer token passes, a wrong one is bad_token, none is unauthorized; a cookie is good until it expires and only on the server that issued it."""
    now = [1_000_000.0]
    auth = MonitorAuth((VIEWER, INGEST), required=True, clock=lambda: now[0])
    assert auth.check(bearer(INGEST), {}) is None
    assert auth.check(bearer(VIEWER), {}) is None
    assert auth.check(bearer("nope"), {}).reason == "bad_token"  # type: ignore[union-attr]
    assert auth.check({}, {}).reason == "unauthorized"  # type: ignore[union-attr]
    cookie = auth.session(VIEWER)
    assert VIEWER not in cookie  # the cookie holds no token
    assert auth.check({}, {COOKIE: cookie}) is None
    now[0] += SESSION_MAX_AGE - 1
    assert auth.check({}, {COOKIE: cookie}) is None
    now[0] += 1
    assert auth.check({}, {COOKIE: cookie}).reason == "expired"  # type: ignore[union-attr]
    other = MonitorAuth((VIEWER,), required=True, clock=lambda: now[0])  # a restarted server
    assert other.check({}, {COOKIE: auth.session(VIEWER)}).reason == "bad_session"  # type: ignore[union-attr]
    stamp, _, mac = auth.session(VIEWER).partition(".")
    forged = f"{int(stamp) + 1}.{mac}"  # a later issue time under the same MAC
    for bad in (forged, "x", "1.2", "１２.%s" % ("a" * 64), f"{stamp}.{'é' * 64}"):
        assert auth.check({}, {COOKIE: bad}).reason == "bad_session", bad  # type: ignore[union-attr]
    assert not auth.valid("x" * 2000) and not auth.valid("") and auth.valid(INGEST)
    assert MonitorAuth((VIEWER,)).check({}, {}) is None  # not required: everything passes


# ------------------------------------------------------------------ a real server


@pytest.fixture
def server_options(tmp_path: Path) -> dict[str, Any]:
    """Viewer tokens on loopback: the port asks for a token (ingest stays open)."""
    return {"store": str(tmp_path / "trees.sqlite"), "viewer_tokens": VIEWER}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of a server named by its IP address
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=TIMEOUT), cookie_jar=jar
    ) as s:
        yield s


def mon(server: LogCluster, path: str = "") -> str:
    return f"http://127.0.0.1:{server.mon_port}{path}"


async def metrics(session: aiohttp.ClientSession, server: LogCluster) -> Metrics:
    async with session.get(mon(server, "/metrics"), headers=bearer(VIEWER)) as resp:
        assert resp.status == 200
        return Metrics(await resp.text())


async def test_without_a_token_every_route_but_ecv_is_401_and_counted(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """The page, its files, its API, the live stream and /metrics answer 401 (JSON with a reason, or the login page); /ecv answers 200; each refusal is counted by endpoint."""
    for path in PROTECTED:
        async with session.get(mon(server, path)) as resp:
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), path
            if path.startswith("/ui/"):
                assert resp.content_type == "text/html"
                page = await resp.text()
                assert 'action="/ui/login"' in page and "{{message}}" not in page
                assert "Content-Security-Policy" in resp.headers
            else:
                body = await resp.json()
                assert body["error"] == "unauthorized" and "Bearer" in body["detail"], path
    async with session.get(mon(server, "/ecv")) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "AVAILABLE"
    async with session.get(mon(server, "/ui/style.css")) as resp:
        assert resp.status == 200  # the login page's stylesheet
    async with session.get(mon(server, "/metrics"), headers=bearer("wrong")) as resp:
        assert resp.status == 401 and (await resp.json())["error"] == "bad_token"
    m = await metrics(session, server)
    failures = m.samples["async_logging_auth_failures_total"]
    assert {
        dict(k)["endpoint"]: v for k, v in failures.items() if ("reason", "unauthorized") in k
    } == {
        "ui": 2,
        "api": 3,
        "live": 1,
        "metrics": 1,
        "other": 0,  # every endpoint is there from the start
    }
    assert m.get("async_logging_auth_failures_total", endpoint="metrics", reason="bad_token") == 1


async def test_a_bearer_token_opens_the_page_its_api_the_live_stream_and_metrics(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """With Authorization: Bearer (a viewer token) every protected route answers as without auth."""
    for path in PROTECTED:
        async with session.get(mon(server, path), headers=bearer(VIEWER)) as resp:
            assert resp.status == (404 if path == "/api/tree/1" else 200), path
    m = await metrics(session, server)
    assert m.total("async_logging_auth_failures_total") == 0


async def test_a_token_link_sets_a_cookie_and_goes_to_the_clean_url(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """/ui/?token= answers 303 to the URL without the token, with an HttpOnly SameSite=Strict cookie; the page, its API and the live stream then work with the cookie alone."""
    async with session.get(
        mon(server, f"/ui/?tab=live&token={VIEWER}"), allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/ui/?tab=live"
        set_cookie = resp.headers["Set-Cookie"]
    assert VIEWER not in set_cookie
    attributes = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    async with session.get(mon(server, "/ui/")) as resp:
        assert resp.status == 200 and 'src="app.js"' in await resp.text()
    async with session.get(mon(server, "/api/live?kind=transaction")) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
    async with session.get(mon(server, "/api/status")) as resp:
        assert resp.status == 200 and (await resp.json())["live"]["enabled"] is True
    async with session.get(mon(server, "/metrics")) as resp:
        assert resp.status == 200  # the cookie opens the whole port, as a token does


async def test_a_wrong_token_link_shows_the_login_page_saying_so(
    server: LogCluster, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """/ui/?token=wrong answers 401 with the login page and no cookie, counted bad_token; neither token appears in the log."""
    caplog.set_level(logging.DEBUG, logger="async_logging")
    async with session.get(mon(server, "/ui/?token=wrong-guess"), allow_redirects=False) as resp:
        assert resp.status == 401 and "Set-Cookie" not in resp.headers
        assert "the token is not valid" in await resp.text()
    async with session.get(mon(server, "/api/search"), headers=bearer("other-guess")) as resp:
        assert resp.status == 401
    m = await metrics(session, server)
    assert m.get("async_logging_auth_failures_total", endpoint="ui", reason="bad_token") == 1
    assert m.get("async_logging_auth_failures_total", endpoint="api", reason="bad_token") == 1
    assert "refused /ui/" in caplog.text
    for secret in ("wrong-guess", "other-guess", VIEWER):
        assert secret not in caplog.text


async def test_the_login_form_signs_in_and_refuses_what_it_should(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """POST /ui/login with a good token: 303 to /ui/ with the cookie; a wrong one: 401 and the form; from another site: 403; an oversized form: 413; an unreadable one: 400."""
    login = mon(server, "/ui/login")
    async with session.post(login, data={"token": "nope"}, allow_redirects=False) as resp:
        assert resp.status == 401 and "the token is not valid" in await resp.text()
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a no-referrer page elsewhere
    ):
        async with session.post(
            login, data={"token": VIEWER}, headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == 403 and "Set-Cookie" not in resp.headers
    big = {"token": VIEWER, "pad": "x" * MAX_SIGN_IN_BYTES}
    async with session.post(login, data=big, allow_redirects=False) as resp:
        assert resp.status == 413
    headers = {"Content-Type": "multipart/form-data"}  # no boundary: cannot be read
    async with session.post(login, data=b"token", headers=headers) as resp:
        assert resp.status == 400
    assert len(session.cookie_jar) == 0
    origin = {"Origin": mon(server)}
    async with session.post(
        login, data={"token": VIEWER}, headers=origin, allow_redirects=False
    ) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/ui/"
    async with session.get(mon(server, "/api/search")) as resp:
        assert resp.status == 200
    m = await metrics(session, server)
    counted = {k: v for k, v in m.samples["async_logging_auth_failures_total"].items() if v}
    assert {dict(k)["reason"]: v for k, v in counted.items()} == {
        "bad_token": 1,
        "origin": 2,
        "too_large": 1,
        "bad_form": 1,
    }
    assert {dict(k)["endpoint"] for k in counted} == {"login"}


@pytest.mark.parametrize(
    "server_options",
    [{"tokens": INGEST, "viewer_tokens": VIEWER}],
)
async def test_an_ingest_token_opens_the_viewer_but_a_viewer_token_cannot_send_logs(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """Any client token reads the monitoring port; a viewer token is read-only: POST /log refuses it with 401."""
    async with session.get(mon(server, "/api/status"), headers=bearer(INGEST)) as resp:
        assert resp.status == 200
    url = f"http://127.0.0.1:{server.port}/log"
    async with session.post(url, json={"logs": []}, headers=bearer(VIEWER)) as resp:
        assert resp.status == 401


@pytest.mark.parametrize("server_options", [{"tokens": INGEST}])
async def test_ingest_tokens_leave_a_loopback_monitoring_port_open(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """Tokens without viewer tokens, monitoring on 127.0.0.1: the viewer and /metrics answer without a token (pinned)."""
    for path in ("/api/status", "/metrics", "/ui/"):
        async with session.get(mon(server, path)) as resp:
            assert resp.status == 200, path


async def test_ingest_tokens_close_a_monitoring_port_on_a_network_address(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Tokens only, monitoring on this machine's network address: /metrics and the API want a token, an ingest token opens them, /ecv stays open."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address (hostname -I)")
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_host=address,
        mon_port=0,
        heartbeat_interval=0,
        store=str(tmp_path / "trees.sqlite"),
        log_file=str(tmp_path / "all.log"),
        tokens=INGEST,
    )
    await cluster.start()
    try:
        base = f"http://{address}:{cluster.mon_port}"
        for path in ("/metrics", "/api/status"):
            async with session.get(base + path) as resp:
                assert resp.status == 401, path
            async with session.get(base + path, headers=bearer(INGEST)) as resp:
                assert resp.status == 200, path
        async with session.get(base + "/ecv") as resp:
            assert resp.status == 200
        async with session.get(base + f"/ui/?token={INGEST}", allow_redirects=False) as resp:
            assert resp.status == 303
        assert session.cookie_jar.filter_cookies(URL(base))[COOKIE].value
    finally:
        await cluster.stop()


# ------------------------------------------------------------------ tail


async def test_tail_with_a_token_streams_from_a_protected_live_stream(server: LogCluster) -> None:
    """tail() sends --token as a Bearer token and prints the tree; without one it fails naming --token."""
    console, out = plain_console()
    with pytest.raises(TailError, match=r"HTTP 401.*--token or ASYNC_LOGGING_TOKEN"):
        await tail(mon(server), TailFilters(), console, count=1, err=console, reconnect=False)
    with pytest.raises(TailError, match="printable ASCII") as info:
        await tail(mon(server), TailFilters(), console, count=1, token="a\nb")
    assert info.value.status == 2
    task = asyncio.create_task(
        tail(mon(server), TailFilters(), console, count=1, err=console, token=VIEWER)
    )
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
    await post_logs(server, wire_tree("tailed", "/t", status="4"))
    assert await asyncio.wait_for(task, TIMEOUT) == 1
    assert "uuid tailed" in out.getvalue()


async def test_tail_command_takes_its_token_from_the_environment(server: LogCluster) -> None:
    """`async-logging tail` with ASYNC_LOGGING_TOKEN set streams from a port that asks for a token."""
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "async_logging.cli", "tail", "--url", mon(server), "--json"],
        *["-n", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "ASYNC_LOGGING_TOKEN": VIEWER},
    )
    finished = asyncio.ensure_future(proc.communicate())
    try:
        await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
        await post_logs(server, wire_tree("env-tailed", "/e"))
        await asyncio.wait_for(asyncio.shield(finished), TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # only when it did not stop at -n 1
        out, err = await finished
    assert (proc.returncode, err) == (0, b"")
    assert b'"uuid":"env-tailed"' in out


# ------------------------------------------------------------------ `serve` warns at start

ANNOUNCE = re.compile(r"listening on ws://")


def serve_stderr(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """Start `async-logging serve` with ``args`` (and ``env``, but no other ASYNC_LOGGING_*
    variable); its standard error up to its announcement."""
    cmd = [sys.executable, "-m", "async_logging.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--mon-port", "0", "--heartbeat-interval", "0", "--store", "x.sqlite"]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("ASYNC_LOGGING_")}, **env},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + TIMEOUT * 3
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if ANNOUNCE.search(line):
                return lines
        raise AssertionError(f"serve did not announce itself: {''.join(lines)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the server and the store's follower
        proc.wait(TIMEOUT)
        proc.stderr.close()


def test_serve_warns_once_when_monitoring_is_open_to_the_network(tmp_path: Path) -> None:
    """`serve --mon-host 0.0.0.0` without tokens prints one warning naming the address and what is open; with a viewer token (flag or ASYNC_LOGGING_VIEWER_TOKENS), or on loopback, none."""
    lines = serve_stderr(tmp_path, "--mon-host", "0.0.0.0")
    warnings = [line for line in lines if "without a token" in line]
    assert len(warnings) == 1, lines
    assert "WARNING" in warnings[0] and "listens on 0.0.0.0" in warnings[0]
    assert "/metrics" in warnings[0] and "/ui/" in warnings[0]
    quiet = serve_stderr(tmp_path, "--mon-host", "0.0.0.0", "--viewer-tokens", VIEWER)
    assert not [line for line in quiet if "without a token" in line], quiet
    quiet = serve_stderr(tmp_path, "--mon-host", "0.0.0.0", ASYNC_LOGGING_VIEWER_TOKENS=VIEWER)
    assert not [line for line in quiet if "without a token" in line], quiet
    assert not [line for line in serve_stderr(tmp_path) if "without a token" in line]
