"""`async-logging serve` as a command (issue 13, item 7): errors told plainly, the drain summed up at exit."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from conftest import TIMEOUT

SERVE = [sys.executable, "-m", "async_logging.cli", "serve"]
ANNOUNCE = re.compile(r"listening on ws://[^:]+:(\d+)/")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, *args], capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=cwd
    )


def quiet(tmp_path: Path) -> list[str]:
    """Options for a serve that starts nothing else: no store, no monitoring port."""
    return ["--host", "127.0.0.1", "--store", "", "--mon-port", "-1", "--heartbeat-interval", "0",
            "--log-file", str(tmp_path / "log" / "all.log")]  # fmt: skip


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_in_use_is_told_in_one_line_without_the_usage_block(
    tmp_path: Path, busy_port: int
) -> None:
    """A server that cannot listen exits 1 saying why, without click's usage block (which is for bad flags) and without a traceback."""
    r = run(*quiet(tmp_path), "--port", str(busy_port), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "cannot listen" in r.stderr and "address already in use" in r.stderr
    assert "Usage:" not in r.stderr and "Traceback" not in r.stderr


def test_an_unwritable_log_file_is_told_without_the_usage_block(tmp_path: Path) -> None:
    """A log file the server cannot create (its directory is a file) stops serve with status 1 and one line naming the file."""
    (tmp_path / "afile").write_text("")
    args = [
        a if not a.endswith("all.log") else str(tmp_path / "afile" / "all.log")
        for a in quiet(tmp_path)
    ]
    r = run(*args, "--port", "0", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert str(tmp_path / "afile" / "all.log") in r.stderr
    assert "Usage:" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("toml", "key", "wanted"),
    [
        ('connThreshold = "many"\n', "connThreshold", "must be int, not str"),
        ('[server]\nport = "x"\n', "port", "must be int, not str"),
        ("ecv = 1\n", "ecv", "must be bool, not int"),
        ("log_file = 3\n", "log_file", "must be str, not int"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_the_file_and_the_key(
    tmp_path: Path, toml: str, key: str, wanted: str
) -> None:
    """A value of the wrong type in the config file exits 2 naming the file and the key as the file spells it, without the usage block."""
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(toml)
    r = run("--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}: option {key} {wanted}" in r.stderr
    assert "Usage:" not in r.stderr


def post(port: int, logs: list[dict[str, object]]) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/log",
        data=orjson.dumps({"logs": logs}),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        assert resp.status == 200


def begin(uuid: str) -> dict[str, object]:
    return {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "name": "/open"}


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_says_at_exit_what_its_drain_published(tmp_path: Path, workers: int) -> None:
    """On SIGTERM serve prints how many trees the drain published and how many of them incomplete, by reason (with workers, one line per worker)."""
    args = [*quiet(tmp_path), "--port", "0"]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = subprocess.Popen(
        [*SERVE, *args], cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line, "serve ended before it listened"
            if m := ANNOUNCE.search(line):
                port = int(m.group(1))
        # Open trees (begins whose ends never come): the drain publishes them incomplete.
        for uuid in ("open-1", "open-2", "open-3"):
            post(port, [begin(uuid)])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT * 3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    if workers == 1:
        assert (
            "async-logging: the drain published 3 trees, 3 of them incomplete (shutdown 3)" in err
        ), err
    else:  # each worker its own line; between them, the three trees
        said = re.findall(r"async-logging: worker \d+: the drain published (\d+) tree", err)
        assert len(said) == workers and sum(map(int, said)) == 3, err
