"""Bus message payloads compressed or plain (async_logging.bus.codec): sans-I/O."""

from __future__ import annotations

import os

import pytest
import zstandard
from click.testing import CliRunner

from async_logging.bus.codec import (
    ENCODING_HEADER,
    MAX_DECODED_BYTES,
    Compressor,
    Unreadable,
    decode,
)
from async_logging.bus.jetstream import MSG_ID, Outgoing
from async_logging.cli import main
from async_logging.exceptions import ConfigError
from async_logging.server import ServerConfig

LINES = b"".join(
    b'{"kind":"transaction","uuid":"u-%d","name":"GET /a","status":"0"}\n' % i for i in range(200)
)


def test_a_compressed_message_keeps_its_id_says_its_encoding_and_reads_back() -> None:
    c = Compressor("zstd")
    sent = c.encode(Outgoing("alog.trees.transaction", LINES, {MSG_ID: "ev-1.transaction"}))
    assert sent.subject == "alog.trees.transaction"
    assert sent.headers == {MSG_ID: "ev-1.transaction", ENCODING_HEADER: "zstd"}
    assert len(sent.payload) < len(LINES) // 4
    assert decode(sent.payload, sent.headers) == LINES


def test_a_message_compression_would_not_shrink_goes_plain() -> None:
    noise = os.urandom(4096)
    c = Compressor("zstd")
    message = Outgoing("alog.events.0", noise, {MSG_ID: "x"})
    assert c.encode(message) is message
    assert decode(noise, message.headers) == noise


def test_compression_none_publishes_as_it_is_and_a_message_without_headers_is_plain() -> None:
    c = Compressor("none")
    message = Outgoing("alog.events.0", LINES, None)
    assert c.encode(message) is message
    assert decode(LINES, None) == LINES
    assert decode(LINES, {MSG_ID: "y"}) == LINES


def test_an_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="bus_compression"):
        Compressor("gzip")


@pytest.mark.parametrize(
    ("payload", "encoding", "says"),
    [
        (b"not zstd at all", "zstd", "not a Zstandard frame"),
        (zstandard.ZstdCompressor().compress(LINES)[:-9], "zstd", "damaged"),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(LINES),
            "zstd",
            "does not say its size",
        ),
        (zstandard.ZstdCompressor().compress(LINES), "br", "unknown Alog-Encoding"),
    ],
    ids=["garbage", "cut short", "no size", "unknown encoding"],
)
def test_an_unreadable_payload_says_why(payload: bytes, encoding: str, says: str) -> None:
    with pytest.raises(Unreadable, match=says):
        decode(payload, {ENCODING_HEADER: encoding})


def test_a_frame_that_would_expand_past_the_cap_is_not_expanded() -> None:
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(MAX_DECODED_BYTES + 1))
    assert len(bomb) < 10_000
    with pytest.raises(Unreadable, match="at most"):
        decode(bomb, {ENCODING_HEADER: "zstd"})


def test_the_option_is_checked_and_reaches_the_bus_settings() -> None:
    from async_logging.bus.jetstream import BusSettings

    with pytest.raises(ConfigError, match="bus_compression must be zstd or none"):
        ServerConfig(bus_compression="lz4")
    c = ServerConfig(bus="nats://127.0.0.1:4222", bus_compression="none")
    assert BusSettings.from_config(c).compression == "none"
    assert BusSettings.from_config(c.replace(bus_compression="zstd")).compression == "zstd"


def test_every_bus_command_takes_the_flag() -> None:
    runner = CliRunner()
    for command in ("serve", "reassemble", "sink"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "--bus-compression" in result.output, command
    bad = runner.invoke(main, ["reassemble", "--bus", "nats://x:1", "--bus-compression", "lz4"])
    assert bad.exit_code == 2 and "lz4" in bad.output
