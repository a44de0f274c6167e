"""Shared fixtures: real servers on free ports, the original client's captures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher

#: One factor scales every network timeout in the tests (slow CI machines: raise it).
TIMEOUT = float(os.environ.get("ASYNC_LOGGING_TEST_TIMEOUT", "10"))

#: Byte-exact captures of what the 2013 Node client sends, kept in the repository (their
#: README.md lists the records each must produce; docs/design.md §4 says how they are used).
VECTORS = Path(__file__).resolve().parent / "vectors" / "original-node-client"


def vector(name: str) -> bytes:
    """The bytes of one capture of the original Node client (a missing one is an error)."""
    return (VECTORS / name).read_bytes()


def vector_http_body(name: str) -> tuple[str, bytes]:
    """The ``Content-Type`` and the body of a captured HTTP request (its head cut off)."""
    raw = vector(name).replace(b"\r\n", b"\n")
    head, _, body = raw.partition(b"\n\n")
    ctype = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\n")
        if line.lower().startswith(b"content-type:")
    )
    return ctype, body


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def server_options() -> dict[str, Any]:
    """Override in a test module to change the server's options."""
    return {}


@pytest.fixture
async def server(
    publisher: MemoryPublisher, server_options: dict[str, Any]
) -> AsyncIterator[LogCluster]:
    """An in-process proxy on free ports, publishing into memory."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "mon_port": 0,
        "heartbeat_interval": 0,
        "publisher": publisher,
        "store": "",  # no SQLite file in the working directory unless a test asks
        **server_options,
    }
    cluster = LogCluster(**options)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory, so default paths (./log/...) never land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """`serve` subprocesses a test starts (``Served``, test_server_process); each is closed,
    with whatever it started, when the test ends."""
    started: list[Any] = []
    yield started
    for s in started:
        s.close()
