"""Access control and hostile input on the proxy's main port (issue 5, items 1 and 2).

Real clients on loopback against an in-process server (the ``server`` fixture of conftest,
options set per test with ``server_options``) or, where the command line is what is
pinned, a real ``async-logging serve``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import psutil
import pytest

from async_logging.exceptions import ConfigError
from async_logging.server import LogCluster, ServerConfig
from async_logging.testing import MemoryPublisher
from helpers import TIMEOUT, Metrics, Served, answer, connect, serve, tx, walk

TOKENS = ("s3cret-a", "s3cret-b")
ORIGIN = "https://app.example"
#: The viewer's SQLite store (on by default, under ./log) is not what these tests pin.
NO_STORE: dict[str, Any] = {"store": ""}


@pytest.fixture
def server_options() -> dict[str, Any]:
    return dict(NO_STORE)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def ws_url(server: LogCluster, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/{query}"


async def metrics(session: aiohttp.ClientSession, server: LogCluster) -> Metrics:
    async with session.get(f"http://127.0.0.1:{server.mon_port}/metrics") as resp:
        return Metrics(await resp.text())


async def upgrade_status(session: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    """The HTTP status of a refused WebSocket upgrade (fails if it is accepted)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        ws = await session.ws_connect(url, protocols=("log-protocol",), **kw)
        await ws.close()
    return info.value.status


async def post_logs(
    session: aiohttp.ClientSession, server: LogCluster, logs: list[Any], **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with session.post(
        f"http://127.0.0.1:{server.port}/log{headers.pop('query', '')}",
        data=orjson.dumps(logs),
        headers={"Content-Type": "application/json", **headers},
    ) as resp:
        return resp.status, await resp.json(), resp.headers


async def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes; return the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        return status, body
    finally:
        writer.close()


# ====================================================================== access: tokens


@pytest.mark.parametrize("server_options", [{"tokens": TOKENS, **NO_STORE}])
async def test_no_token_is_refused_401_on_post_and_websocket(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """With tokens configured, a POST or an upgrade without one gets 401 naming the scheme, and nothing is taken."""
    status, body, headers = await post_logs(session, server, tx("no-token"))
    assert status == 401 and body["error"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await upgrade_status(session, ws_url(server)) == 401
    assert server.stats.events == 0 and publisher.records == []
    assert server.stats.connections_refused == {"unauthorized": 2}


@pytest.mark.parametrize("server_options", [{"tokens": TOKENS, **NO_STORE}])
async def test_wrong_token_is_refused_401(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A token that is not configured is refused (header on POST and upgrade, query on upgrade) as bad_token."""
    status, body, _ = await post_logs(session, server, tx("wrong"), Authorization="Bearer s3cret-c")
    assert (status, body["error"]) == (401, "bad_token")
    bad = {"Authorization": "Bearer s3cret-a-but-longer"}
    assert await upgrade_status(session, ws_url(server), headers=bad) == 401
    assert await upgrade_status(session, ws_url(server, "?token=nope")) == 401
    # A prefix of a good token is not good either (the comparison is over the whole value).
    assert await upgrade_status(session, ws_url(server, "?token=s3cret")) == 401
    assert server.stats.connections_refused == {"bad_token": 4}
    assert server.stats.events == 0 and publisher.records == []


@pytest.mark.parametrize("server_options", [{"tokens": TOKENS, **NO_STORE}])
async def test_bearer_header_admits_post_and_websocket(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Either configured token in Authorization: Bearer lets a POST and a WebSocket send logs."""
    status, body, _ = await post_logs(
        session, server, tx("by-post"), Authorization=f"Bearer {TOKENS[0]}"
    )
    assert (status, body) == (200, {"accepted": 4})
    ws = await connect(session, server, headers={"Authorization": f"bearer {TOKENS[1]}"})
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("by-ws")}))
    assert await answer(ws) == {"ack": 1}
    await ws.close()
    got = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) == 2 and p.transactions, TIMEOUT
    )
    assert {t["uuid"] for t in got} == {"by-post", "by-ws"}
    assert server.stats.connections_refused == {}


@pytest.mark.parametrize("server_options", [{"tokens": TOKENS, **NO_STORE}])
async def test_query_token_admits_websocket_but_not_post(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """?token= is for WebSocket clients that cannot set headers; POST /log must use the header."""
    ws = await session.ws_connect(
        ws_url(server, f"?token={TOKENS[1]}"), protocols=("log-protocol",)
    )
    assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("q-ws")}))
    assert await answer(ws) == {"ack": 1}
    await ws.close()
    status, body, _ = await post_logs(session, server, tx("q-post"), query=f"?token={TOKENS[1]}")
    assert (status, body["error"]) == (401, "unauthorized")
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "q-ws"
    assert server.stats.connections_refused == {"unauthorized": 1}


@pytest.mark.parametrize("server_options", [{"tokens": TOKENS, **NO_STORE}])
async def test_token_that_is_not_utf8_is_refused_401_not_a_crash(server: LogCluster) -> None:
    """An Authorization header holding bytes that are not UTF-8 is a bad token (401, counted), not a 500."""
    status, body = await raw_http(
        server.port,
        b"POST /log HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
    )
    assert status == 401, (status, body)
    assert server.stats.connections_refused == {"bad_token": 1}


def test_serve_reads_tokens_from_the_environment(
    tmp_path: Path, procs: list[Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` takes its tokens from ASYNC_LOGGING_TOKENS when no flag or config names any."""
    monkeypatch.setenv("ASYNC_LOGGING_TOKENS", "env-a, env-b")
    s = serve(tmp_path)
    procs.append(s)

    async def probe() -> None:
        url = f"http://127.0.0.1:{s.port}/log"
        body = orjson.dumps(tx("env-1"))
        async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as c:
            async with c.post(url, data=body) as resp:
                assert resp.status == 401
            async with c.post(url, data=body, headers={"Authorization": "Bearer env-b"}) as resp:
                assert resp.status == 200, await resp.text()
            ws = await c.ws_connect(f"ws://127.0.0.1:{s.port}/?token=env-a")
            assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
            await ws.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await c.ws_connect(f"ws://127.0.0.1:{s.port}/?token=env-c")
            assert info.value.status == 401

    asyncio.run(probe())
    assert s.stop() == 0
    assert [r["uuid"] for r in s.records()] == ["env-1"]


@pytest.mark.parametrize("tokens", [" , ", "a,,b", ["a", " "]])
def test_a_token_list_with_an_empty_item_is_a_config_error_not_no_auth(tokens: Any) -> None:
    """A blank item in the tokens (a typo like " , ") is refused at start, never read as
    'no tokens', which would turn authentication off."""
    with pytest.raises(ConfigError, match="tokens has an empty item"):
        ServerConfig(tokens=tokens)
    assert ServerConfig(tokens=" a , b ").tokens == ("a", "b")
    assert ServerConfig(tokens="").tokens == ()


# ====================================================================== access: origins


@pytest.mark.parametrize("server_options", [{"allowed_origins": (ORIGIN,), **NO_STORE}])
async def test_origin_not_allowed_is_refused_403(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A browser WebSocket from an Origin outside the allow-list gets 403; the listed origin and no Origin pass."""
    assert await upgrade_status(session, ws_url(server), origin="https://evil.example") == 403
    assert await upgrade_status(session, ws_url(server), origin="null") == 403
    allowed = await connect(session, server, origin=ORIGIN)
    await allowed.send_bytes(msgpack.packb({"seq": 1, "logs": tx("from-browser")}))
    assert await answer(allowed) == {"ack": 1}
    await allowed.close()
    cli = await connect(session, server)  # aiohttp sends no Origin: a non-browser client
    await cli.send_bytes(msgpack.packb({"seq": 2, "logs": tx("from-service")}))
    assert await answer(cli) == {"ack": 2}
    await cli.close()
    got = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) == 2 and p.transactions, TIMEOUT
    )
    assert {t["uuid"] for t in got} == {"from-browser", "from-service"}
    assert server.stats.connections_refused == {"origin": 2}


@pytest.mark.parametrize(
    "server_options", [{"tokens": TOKENS, "allowed_origins": (ORIGIN,), **NO_STORE}]
)
async def test_every_refusal_is_counted_by_reason_in_metrics_and_logged(
    server: LogCluster, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused request adds one to connections_refused_total{reason} and logs a warning naming why."""
    caplog.set_level(logging.WARNING, logger="async_logging.server")
    good = {"Authorization": f"Bearer {TOKENS[0]}"}
    assert await upgrade_status(session, ws_url(server)) == 401
    assert await upgrade_status(session, ws_url(server, "?token=x")) == 401
    assert await upgrade_status(session, ws_url(server), headers=good, origin="https://x") == 403
    status, _, _ = await post_logs(session, server, tx("p"))
    assert status == 401
    status, _, _ = await post_logs(session, server, tx("p"), Authorization="Bearer y")
    assert status == 401
    ws = await connect(session, server, headers=good, origin=ORIGIN)
    await ws.close()
    m = await metrics(session, server)
    assert m.by_label("async_logging_connections_refused_total", "reason") == {
        "unauthorized": 2,
        "bad_token": 2,
        "origin": 1,
    }
    assert m.get("async_logging_connections_accepted_total") == 1
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 5
    assert sum("not allowed" in r.getMessage() for r in refusals) == 1


# ====================================================================== access: TLS


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """A throw-away CA and a certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    trustme = pytest.importorskip("trustme")  # dev dependency: makes test certificates
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    return ca, {"tls_cert": str(cert), "tls_key": str(key)}


async def test_tls_serves_wss_and_https_to_a_client_that_trusts_the_ca(
    tls: tuple[Any, dict[str, str]], publisher: MemoryPublisher
) -> None:
    """With tls_cert/tls_key the main port speaks wss and https; a client verifying against the CA sends logs."""
    ca, files = tls
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        **files,
        **NO_STORE,
    )
    await cluster.start()
    try:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(
                f"wss://127.0.0.1:{cluster.port}/", protocols=("log-protocol",), ssl=trusting
            )
            assert (await ws.receive(timeout=TIMEOUT)).data == "ready"
            await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("over-wss")}))
            assert await answer(ws) == {"ack": 1}
            await ws.close()
            async with s.post(
                f"https://localhost:{cluster.port}/log", json=tx("over-https"), ssl=trusting
            ) as resp:
                assert resp.status == 200 and (await resp.json())["accepted"] == 4
            async with s.get(f"https://127.0.0.1:{cluster.port}/ws", ssl=trusting) as resp:
                assert (await resp.json())["url"] == f"wss://127.0.0.1:{cluster.port}/"
        got = await asyncio.to_thread(
            publisher.wait_for, lambda p: len(p.transactions) == 2 and p.transactions, TIMEOUT
        )
        assert {t["uuid"] for t in got} == {"over-wss", "over-https"}
    finally:
        await cluster.stop()


async def test_tls_client_that_does_not_trust_the_certificate_fails_verification(
    tls: tuple[Any, dict[str, str]], publisher: MemoryPublisher
) -> None:
    """A client verifying with the system CAs refuses the self-signed server; plain ws to the TLS port fails too."""
    _, files = tls
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        **files,
        **NO_STORE,
    )
    await cluster.start()
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.ws_connect(f"wss://127.0.0.1:{cluster.port}/")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.post(f"https://127.0.0.1:{cluster.port}/log", json=tx("untrusted"))
            with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
                await s.ws_connect(
                    f"ws://127.0.0.1:{cluster.port}/",
                    timeout=aiohttp.ClientWSTimeout(ws_receive=2),
                )
        assert publisher.records == [] and cluster.stats.events == 0
    finally:
        await cluster.stop()


def test_monitoring_port_listens_on_loopback_by_default(
    tmp_path: Path, procs: list[Served]
) -> None:
    """`serve` without --mon-host binds /ecv and /metrics to 127.0.0.1 only."""
    s = serve(tmp_path)
    procs.append(s)
    listening = {
        c.laddr.port: c.laddr.ip
        for c in psutil.Process(s.proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening[s.mon_port] == "127.0.0.1", listening
    assert s.stop() == 0


# ====================================================================== hostile input: limits

LIMITS = {
    **NO_STORE,
    "max_events_per_frame": 5,
    "max_depth": 4,
    "max_string_length": 100,
    "max_keys_per_map": 10,
}


def ev(uuid: str, **extra: Any) -> dict[str, Any]:
    return {"clazz": "atomicEvent", "uuid": uuid, "event": "2", "parent": "1", "msg": "m", **extra}


OVER_LIMITS = [
    ("too_many_events", tx("lim-many", 5)),  # 7 events > 5
    ("too_deep", [ev("lim-deep", data={"a": {"b": {"c": {"d": 1}}}})]),  # 5 levels > 4
    ("string_too_long", [ev("lim-long", msg="x" * 101)]),
    ("too_many_keys", [ev("lim-keys", **{f"k{i}": i for i in range(6)})]),  # 11 keys > 10
    ("string_too_long", [ev("lim-longkey", **{"k" * 101: 1})]),
    ("too_many_keys", [ev("lim-nested-keys", data={f"k{i}": i for i in range(11)})]),
]


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize("server_options", [LIMITS])
async def test_over_limit_frames_are_refused_by_reason_and_the_connection_stays_up(
    server: LogCluster,
    publisher: MemoryPublisher,
    session: aiohttp.ClientSession,
    encoding: str,
) -> None:
    """Events per frame, depth, string length and keys per map each refuse the whole frame with its reason; later good frames are published."""
    ws = await connect(session, server)

    async def send(seq: int, logs: list[Any]) -> None:
        env = {"seq": seq, "logs": logs}
        if encoding == "msgpack":
            await ws.send_bytes(msgpack.packb(env))
        else:
            await ws.send_str(orjson.dumps(env).decode())

    for seq, (reason, logs) in enumerate(OVER_LIMITS):
        await send(seq, logs)
        err = await answer(ws)
        assert (err["error"], err["seq"]) == (reason, seq), err
        assert err["detail"]
    await send(100, tx("lim-fine", 3))  # 5 events: at the limit, accepted
    assert await answer(ws) == {"ack": 100}
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "lim-fine" and len(tree["children"]) == 3
    assert not ws.closed
    await ws.close()
    m = await metrics(session, server)
    assert m.by_label("async_logging_bad_input_total", "reason") == {
        "too_many_events": 1,
        "too_deep": 1,
        "string_too_long": 2,
        "too_many_keys": 2,
    }
    assert [r["uuid"] for r in publisher.records] == ["lim-fine"]


async def test_invalid_utf8_in_a_text_frame_is_refused_as_bad_utf8(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A text frame that is not UTF-8 gets a bad_utf8 error (with its seq) and the connection goes on."""
    ws = await connect(session, server)
    await ws.send_frame(b'{"seq": 4, "logs": [{"msg": "\xc3\x28"}]}', aiohttp.WSMsgType.TEXT)
    err = await answer(ws)
    assert (err["error"], err["seq"]) == ("bad_utf8", 4)
    await ws.send_frame(b"\xff\xfe\xfd", aiohttp.WSMsgType.TEXT)
    assert (await answer(ws))["error"] == "bad_utf8"
    # A lone surrogate encoded as UTF-8 (CESU) is not UTF-8 either.
    await ws.send_frame(b'[{"msg": "\xed\xa0\x80"}]', aiohttp.WSMsgType.TEXT)
    assert (await answer(ws))["error"] == "bad_utf8"
    await ws.send_str(orjson.dumps({"seq": 5, "logs": tx("utf8-ok")}).decode())
    assert await answer(ws) == {"ack": 5}
    await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    await ws.close()
    assert server.stats.bad_input == {"bad_utf8": 3}


async def test_msgpack_extension_and_binary_values_are_refused(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """MessagePack extension types (the timestamp too) and binary values are refused by name; good frames go on."""
    ws = await connect(session, server)
    cases = [
        ("msgpack_ext", {"seq": 1, "logs": [ev("x1", data=msgpack.ExtType(5, b"xx"))]}),
        ("msgpack_ext", {"seq": 2, "logs": [ev("x2", at=msgpack.Timestamp(1, 0))]}),
        ("msgpack_ext", {"seq": 3, "logs": [ev("x3", deep=[{"e": msgpack.ExtType(127, b"")}])]}),
        ("msgpack_bin", {"seq": 4, "logs": [ev("x4", blob=b"\x00\x01")]}),
    ]
    for reason, env in cases:
        await ws.send_bytes(msgpack.packb(env, datetime=False))
        err = await answer(ws)
        assert (err["error"], err["seq"]) == (reason, env["seq"]), err
    await ws.send_bytes(msgpack.packb(msgpack.ExtType(1, b"whole frame")))
    assert (await answer(ws))["error"] == "msgpack_ext"
    await ws.send_bytes(b"\x91\x81\xa1e\xd4\xf9\x00")  # [{"e": fixext1 of type -7}]
    assert (await answer(ws))["error"] == "msgpack_ext"
    await ws.send_bytes(msgpack.packb({"seq": 9, "logs": tx("ext-ok")}))
    assert await answer(ws) == {"ack": 9}
    await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    await ws.close()
    assert server.stats.bad_input == {"msgpack_ext": 5, "msgpack_bin": 1}


async def test_huge_declared_lengths_are_refused_without_allocating(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Headers claiming 4 GB strings, binaries, arrays, maps or extensions are bad_msgpack, and memory does not grow."""
    claims = [
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
        b"\xc9\xff\xff\xff\xff\x05",  # ext32
        b"\x82\xa3seq\x07\xa4logs\xdd\xff\xff\xff\xff\x80",  # envelope whose logs claim 4 G items
        b"\x91\x81\xa3msg\xdb\x7f\xff\xff\xffabc",  # a log whose msg claims 2 GiB
    ]
    rss = psutil.Process().memory_info().rss
    ws = await connect(session, server)
    for raw in claims:
        for _ in range(20):
            await ws.send_bytes(raw)
            err = await answer(ws)
            assert err["error"] == "bad_msgpack", (raw, err)
    assert err["seq"] is None
    await ws.send_bytes(claims[5])
    assert (await answer(ws))["seq"] == 7  # the seq is still read for the error answer
    await ws.send_bytes(msgpack.packb({"seq": 8, "logs": tx("huge-ok")}))
    assert await answer(ws) == {"ack": 8}
    await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    await ws.close()
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 64 * 1024 * 1024, f"resident memory grew by {grown} bytes"
    assert server.stats.bad_input == {"bad_msgpack": 20 * len(claims) + 1}


@pytest.mark.parametrize("timestamp", [2**63, 1e300])
async def test_a_timestamp_past_64_bits_does_not_stop_publication(
    tmp_path: Path, publisher: MemoryPublisher, session: aiohttp.ClientSession, timestamp: Any
) -> None:
    """With the default store on, an event whose timestamp no 64-bit column holds does not stall the pipeline: trees sent after it are published."""
    pytest.importorskip("async_logging.publishers.sqlite")
    cluster = LogCluster(
        host="127.0.0.1",
        port=0,
        mon_port=-1,
        heartbeat_interval=0,
        publisher=publisher,
        store=str(tmp_path / "trees.sqlite"),
        wait_for_publisher=0.5,
    )
    await cluster.start()
    try:
        ws = await connect(session, cluster)  # type: ignore[arg-type]
        hostile = {"clazz": "atomicEvent", "msg": "from the future", "timestamp": timestamp}
        await ws.send_bytes(msgpack.packb({"seq": 1, "logs": [hostile]}))
        if "error" not in await answer(ws):  # refused (bad_timestamp) or taken: either is fine
            # Taken: the sinks before the store get it; the next batch must not wait behind it.
            await asyncio.to_thread(
                publisher.wait_for,
                lambda p: any(r.get("msg") == hostile["msg"] for r in p.records),
                TIMEOUT,
            )
        await ws.send_bytes(msgpack.packb({"seq": 2, "logs": tx("after-hostile")}))
        assert await answer(ws) == {"ack": 2}
        await ws.close()
        await asyncio.to_thread(
            publisher.wait_for,
            lambda p: any(r.get("uuid") == "after-hostile" for r in p.records),
            TIMEOUT,
        )
        # It flowed: no publisher call failed and was retried (with backoff) on the way.
        assert cluster.stats.publish_errors == 0
    finally:
        await cluster.stop()


async def test_nesting_far_past_the_limit_is_too_deep_not_a_recursion_error(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """100,000 levels of nested arrays or maps (JSON and MessagePack) are refused as too_deep; the server goes on."""
    ws = await connect(session, server)
    n = 100_000
    frames = [
        ("text", "[" * n + "]" * n),
        ("text", '{"a":' * n + "1" + "}" * n),
        ("bytes", b"\x91" * n + b"\xc0"),
        ("bytes", b"\x81\xa1a" * n + b"\xc0"),
        ("bytes", msgpack.packb({"seq": 3, "logs": [ev("d", data=nested(40))]})),
    ]
    for kind, data in frames:
        if kind == "text":
            await ws.send_str(data)
        else:
            await ws.send_bytes(data)
        err = await answer(ws)
        assert err["error"] == "too_deep", (data[:20], err)
    await ws.send_bytes(msgpack.packb({"seq": 4, "logs": tx("deep-ok")}))
    assert await answer(ws) == {"ack": 4}
    await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    await ws.close()
    assert server.stats.bad_input == {"too_deep": len(frames)}


def nested(depth: int) -> Any:
    """A value ``depth`` lists deep."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# ====================================================================== hostile input: trees


def chain(uuid: str, depth: int) -> list[dict[str, Any]]:
    """A transaction nested ``depth`` levels deep with one atomic event at the bottom."""
    events = [
        {"clazz": "begin", "uuid": uuid, "event": str(i), "parent": str(i - 1), "name": f"n{i}"}
        for i in range(1, depth + 1)
    ]
    events.append(
        {"clazz": "atomicEvent", "uuid": uuid, "event": str(depth + 1), "parent": str(depth)}
    )
    events += [
        {"clazz": "end", "uuid": uuid, "event": str(i), "parent": str(i - 1), "status": "0"}
        for i in range(depth, 0, -1)
    ]
    return events


async def test_a_500_deep_tree_is_published_in_fragments_without_loss(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A 500-level parent chain over a real connection is reassembled: every event once, the cut pieces flagged depth_cut."""
    ws = await connect(session, server)
    events = chain("deep-500", 500)
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": events[:600]}))
    assert await answer(ws) == {"ack": 1}
    await ws.send_str(orjson.dumps({"seq": 2, "logs": events[600:]}).decode())
    assert await answer(ws) == {"ack": 2}
    recs = await asyncio.to_thread(
        publisher.wait_for,
        lambda p: sum(1 for r in p.records for _ in walk(r)) >= 501 and list(p.records),
        TIMEOUT,
    )
    await ws.close()
    ids = [n["event"] for r in recs for n in walk(r)]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 502)]
    assert len(recs) > 1 and any(r.get("depth_cut") for r in recs)
    assert server.stats.events == len(events)


async def test_cyclic_parents_are_cut_and_published_not_looped_on(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """Transactions that are each other's parent (and an event that is its own parent) are published flagged, every event once."""
    ws = await connect(session, server)
    cyc = [
        {"clazz": "begin", "uuid": "cyc", "event": "1", "parent": "0", "name": "root"},
        {"clazz": "begin", "uuid": "cyc", "event": "2", "parent": "3", "name": "a"},
        {"clazz": "begin", "uuid": "cyc", "event": "3", "parent": "2", "name": "b"},
        {"clazz": "atomicEvent", "uuid": "cyc", "event": "4", "parent": "3", "msg": "x"},
        {"clazz": "atomicEvent", "uuid": "cyc", "event": "5", "parent": "5", "msg": "self"},
        {"clazz": "end", "uuid": "cyc", "event": "3", "parent": "2", "status": "0"},
        {"clazz": "end", "uuid": "cyc", "event": "2", "parent": "3", "status": "0"},
        {"clazz": "end", "uuid": "cyc", "event": "1", "parent": "0", "status": "0"},
    ]
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": cyc}))
    assert await answer(ws) == {"ack": 1}
    await ws.send_bytes(msgpack.packb({"seq": 2, "logs": tx("after-cycle")}))
    assert await answer(ws) == {"ack": 2}
    await asyncio.to_thread(
        publisher.wait_for, lambda p: any(r["uuid"] == "after-cycle" for r in p.records), TIMEOUT
    )
    await ws.close()
    await server.stop()  # publish whatever the cycle left open
    cyc_recs = [r for r in publisher.records if r["uuid"] == "cyc"]
    assert sorted(n["event"] for r in cyc_recs for n in walk(r)) == ["1", "2", "3", "4", "5"]
    assert any(n.get("cycle") for r in cyc_recs for n in walk(r)), cyc_recs


# ====================================================================== hostile input: rate


@pytest.mark.parametrize("server_options", [{"rate_limit": 500.0, **NO_STORE}])
async def test_rate_limit_paces_a_fast_connection_without_losing_events(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A connection sending 1,000 events at once against 500/s is paused (counted) and loses nothing, and not faster than the limit; another connection is served while it is held back."""
    fast = await connect(session, server)
    other = await connect(session, server)
    frames = 100  # 10 events each: a burst of 500 passes, the other 500 take at least 1 s
    start = time.monotonic()
    for seq in range(frames):
        await fast.send_bytes(msgpack.packb({"seq": seq, "logs": tx(f"rl-{seq}", 8)}))
    await asyncio.wait_for(answer(fast), TIMEOUT)  # the first frames are acked at once
    # While the fast connection is held back, another one is served: its ack comes before
    # the server has taken all of the fast one's frames.
    await other.send_bytes(msgpack.packb({"seq": 1, "logs": tx("rl-other", 8)}))
    assert await answer(other) == {"ack": 1}
    taken_meanwhile = server.stats.events - 10
    acks = [(await answer(fast))["ack"] for _ in range(frames - 1)]
    elapsed = time.monotonic() - start
    assert acks == list(range(1, frames))
    assert server.stats.rate_limited >= 1
    assert taken_meanwhile < frames * 10, "the other connection waited for the fast one"
    rate = (frames * 10 - 500) / elapsed
    assert rate <= 500 * 1.2, f"{rate:.0f} events/s past the burst of 500, limit 500"
    got = await asyncio.to_thread(
        publisher.wait_for, lambda p: len(p.transactions) == frames + 1 and p.transactions, TIMEOUT
    )
    assert sum(len(t["children"]) for t in got) == (frames + 1) * 8
    await fast.close()
    await other.close()
    assert server.stats.rate_limited >= 1
    m = await metrics(session, server)
    assert m.get("async_logging_rate_limited_total") == server.stats.rate_limited
    assert m.get("async_logging_events_received_total") == (frames + 1) * 10


def test_token_bucket_on_an_injected_clock() -> None:
    """The rate limiter's arithmetic: a burst passes, then each event costs 1/rate seconds of
    waiting, and idle time refills the bucket up to the burst, no further."""
    from async_logging.server.guard import TokenBucket

    bucket = TokenBucket(100.0, now=0.0)  # burst: one second's worth, 100 events
    assert bucket.take(100, 0.0) == 0.0
    assert bucket.take(50, 0.0) == pytest.approx(0.5)  # 50 over: half a second
    assert bucket.take(10, 0.5) == pytest.approx(0.1)  # the half second paid the debt only
    assert bucket.take(0, 10.0) == 0.0 and bucket.level == 100.0  # full, not 1,000
    assert bucket.take(1, 10.0) == 0.0


@pytest.mark.parametrize("server_options", [{"rate_limit": 100.0, **NO_STORE}])
async def test_rate_limit_also_paces_a_flood_of_malformed_frames(
    server: LogCluster, session: aiohttp.ClientSession
) -> None:
    """A connection sending 300 malformed frames against a 100/s limit is paused too (each frame costs at least one)."""
    ws = await connect(session, server)
    start = time.monotonic()
    for _ in range(300):
        await ws.send_bytes(b"\xc1")
    for _ in range(300):
        assert (await answer(ws))["error"] == "bad_msgpack"
    elapsed = time.monotonic() - start
    await ws.close()
    assert elapsed >= 1.0 and server.stats.rate_limited >= 1, (elapsed, server.stats.rate_limited)


# ====================================================================== hostile input: slow HTTP


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.5, **NO_STORE}])
async def test_slow_http_body_gets_408_while_others_are_served(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A POST whose body dribbles in slower than request_timeout gets 408 (counted); a normal POST meanwhile gets 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = orjson.dumps(tx("slow"))
    writer.write(
        b"POST /log HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    start = time.monotonic()
    head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    try:
        sent = 0
        while not head.done() and sent < len(body) - 1:
            writer.write(body[sent : sent + 1])  # one byte every 0.1 s: 10 bytes/s
            sent += 1
            if sent == 2:  # the server is busy with the slow one: another client is served
                status, got, _ = await post_logs(session, server, tx("fast"))
                assert (status, got) == (200, {"accepted": 4})
            await asyncio.wait([head], timeout=0.1)
        status_line = (await asyncio.wait_for(head, TIMEOUT)).split(b"\r\n", 1)[0]
        elapsed = time.monotonic() - start
    finally:
        writer.close()
    assert status_line.split()[1] == b"408", status_line
    assert elapsed >= 0.4, f"answered 408 after {elapsed:.2f} s, before request_timeout 0.5 s"
    assert server.stats.bad_input == {"request_timeout": 1}
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "fast"


async def cut_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drip: bytes) -> bytes:
    """Send ``drip`` every 0.05 s until the server answers or closes; return what it sent.

    Bounded by TIMEOUT: a server that never cuts the connection fails the test.
    """
    got = asyncio.ensure_future(reader.read(1000))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not got.done():
                if drip:
                    writer.write(drip)
                await asyncio.wait([got], timeout=0.05)
        return got.result()
    finally:
        got.cancel()
        writer.close()


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.3, **NO_STORE}])
async def test_slow_http_headers_are_cut_off(server: LogCluster) -> None:
    """A client that sends the request head one byte at a time is disconnected (counted), however long it keeps sending."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /log HTTP/1.1\r\nHost: t\r\n")
    assert await cut_off(reader, writer, b"X") == b""
    assert server.stats.connections_refused == {"request_timeout": 1}


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.3, **NO_STORE}])
async def test_a_connection_that_sends_nothing_is_closed(server: LogCluster) -> None:
    """A connection that never sends a request is closed after request_timeout (counted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await cut_off(reader, writer, b"") == b""
    assert server.stats.connections_refused == {"request_timeout": 1}


@pytest.mark.parametrize("server_options", [{"request_timeout": 0.3, **NO_STORE}])
async def test_the_request_guard_spares_connections_being_served(
    server: LogCluster, publisher: MemoryPublisher, session: aiohttp.ClientSession
) -> None:
    """A WebSocket (a request being handled) outlives two of the guard's periods, decided by
    idle connections opened after it: when the second is cut, the guard has looked at the
    WebSocket twice, and it still serves."""
    ws = await connect(session, server)
    for _ in range(2):  # each idle connection opens after the previous one was cut
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await cut_off(reader, writer, b"") == b""
    assert server.stats.connections_refused == {"request_timeout": 2}
    await ws.send_bytes(msgpack.packb({"seq": 1, "logs": tx("spared")}))
    assert await answer(ws) == {"ack": 1}
    await ws.close()
    (tree,) = await asyncio.to_thread(publisher.wait_for, lambda p: p.transactions, TIMEOUT)
    assert tree["uuid"] == "spared"


def test_request_watch_decides_by_requests_not_by_time() -> None:
    """The guard's decision at the end of each period: a connection is closed only after a
    whole period in which no request began or ended and none was being handled."""
    from async_logging.server.guard import RequestWatch

    fresh = RequestWatch()
    assert fresh.expired()  # connected, sent no head during a whole period

    keepalive = RequestWatch()
    keepalive.started()
    keepalive.finished()
    assert not keepalive.expired()  # a request came during this period
    assert keepalive.expired()  # none during the next

    busy = RequestWatch()
    busy.started()  # a body still arriving, or a WebSocket
    assert not busy.expired() and not busy.expired()
    busy.finished()
    assert not busy.expired()  # a whole period for the next request after an answer
    assert busy.expired()
