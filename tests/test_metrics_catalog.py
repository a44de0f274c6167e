"""Every documented metric is on ``/metrics`` from the start, labelled counters with every label value the code counts at 0 (issue 13, item 8)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from async_logging.server import LogCluster, ServerConfig
from async_logging.server.monapp import KNOWN_LABELS, SnapshotCollector
from async_logging.server.monauth import AUTH_FAILURES
from async_logging.server.supervisor import Supervisor
from helpers import Metrics, fetch_metrics

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "async_logging"
_TOKEN = re.compile(r"`((?:async_logging)?_[a-z_]+)(\{[a-z_, ]+\})?`")


def documented() -> dict[str, dict[str, tuple[str, ...]]]:
    """The README's metrics, by group (``always``, ``workers``, ``store``): name → labels.

    Read from the Monitoring paragraph (short names there stand for ``async_logging_...``)
    and from ``async_logging_...`` names anywhere in the README.
    """
    text = (ROOT / "README.md").read_text()
    start = text.index("`GET /metrics` is Prometheus text")
    end = text.index("####", start)
    paragraph = text[start:end]
    groups: dict[str, dict[str, tuple[str, ...]]] = {"always": {}, "workers": {}, "store": {}}
    group = "always"
    for m in _TOKEN.finditer(paragraph):
        before = paragraph[: m.start()]
        workers_at, store_at = before.rfind("with workers"), before.rfind("with the store on")
        if max(workers_at, store_at) >= 0:
            group = "workers" if workers_at > store_at else "store"
        name = m.group(1)
        name = name if name.startswith("async_logging_") else "async_logging" + name
        labels = tuple(x.strip() for x in (m.group(2) or "{}")[1:-1].split(",") if x.strip())
        groups[group][name] = labels
    for m in _TOKEN.finditer(text):  # full names elsewhere (the viewer's auth failures)
        if m.group(1).startswith("async_logging_") and not any(
            m.group(1) in g for g in groups.values()
        ):
            labels = tuple(x.strip() for x in (m.group(2) or "{}")[1:-1].split(",") if x.strip())
            groups["always"][m.group(1)] = labels
    return groups


def families(metrics: Metrics) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Samples by metric name, the ``_total`` of counters and a histogram's parts folded in."""
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for sample, values in metrics.samples.items():
        name = re.sub(r"_(bucket|count|sum)$", "", sample) if "latency" in sample else sample
        out.setdefault(name, {}).update(values)
    return out


def check_group(doc: dict[str, tuple[str, ...]], got: Metrics) -> None:
    """Every documented name is exported with its labels, a labelled counter with every
    known label value, at 0 (a fresh server counted nothing)."""
    exported = families(got)
    for name, labels in doc.items():
        assert name in exported, f"{name} is documented but not on /metrics"
        samples = exported[name]
        if not labels:
            continue
        assert {k for key in samples for k, _ in key} == set(labels), name
        short = name.removeprefix("async_logging_").removesuffix("_total")
        if short == "auth_failures":
            known = {
                frozenset(zip(("endpoint", "reason"), pair, strict=True)) for pair in AUTH_FAILURES
            }
        elif short == "transactions_published":
            known = {frozenset({("complete", v)}) for v in ("true", "false")}
        else:
            known = {frozenset({(labels[0], v)}) for v in KNOWN_LABELS[short]}
        assert known <= set(samples), (name, known - set(samples))
        assert all(samples[k] == 0 for k in known), name


@pytest.fixture
def server_options(tmp_path: Path) -> dict[str, Any]:
    """The store on (its follower's metrics are documented), beside the test's files."""
    return {"store": str(tmp_path / "trees.sqlite"), "log_file": str(tmp_path / "all.log")}


async def test_a_fresh_server_exports_every_documented_metric_with_every_known_label_at_0(
    server: LogCluster,
) -> None:
    """A server that has seen nothing lists every metric the README documents (the store's included), each labelled counter with each reason, kind and transport the code counts, at 0."""
    doc = documented()
    assert len(doc["always"]) > 25 and doc["store"] and doc["workers"]  # the parse found them
    assert server.mon_port
    got = await asyncio.to_thread(fetch_metrics, server.mon_port)
    check_group({**doc["always"], **doc["store"]}, got)
    # And the other way round: nothing is exported that the README does not name.
    named = {n for g in doc.values() for n in g}
    undocumented = set(families(got)) - named
    assert not undocumented, f"exported but not in the README: {sorted(undocumented)}"


def test_a_supervisor_exports_the_worker_metrics_before_any_worker_reported() -> None:
    """With workers, the supervisor's /metrics has the documented worker metrics and every known label at 0 before a worker reports."""
    sup = Supervisor(ServerConfig(workers=2, store="", mon_port=-1))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(sup.snapshot))
    got = Metrics(generate_latest(registry).decode())
    doc = documented()
    always = {k: v for k, v in doc["always"].items() if "auth_failures" not in k}
    check_group({**always, **doc["workers"]}, got)


# ------------------------------------------------------------------ the lists stay whole

_SCANS: list[tuple[str, str, str]] = [
    # (metric, glob under src/async_logging, pattern whose groups are label values)
    ("bad_input", "**/*.py", r"(?:InvalidEvent|DecodeError|LimitExceeded)\(\s*\"(\w+)\""),
    ("bad_input", "server/*.py", r"bad_input\[\"(\w+)\"\]"),
    ("connections_refused", "server/*.py", r"connections_refused\[\"(\w+)\"\]"),
    ("connections_refused", "server/guard.py", r"Refusal\(\s*\d+,\s*\"(\w+)\""),
    ("frames_received", "server/*.py", r"\.frames\[\"(\w+)\"\]"),
    ("bytes_received", "server/*.py", r"\.bytes\[\"(\w+)\"\]"),
    ("incomplete_transactions", "buffer/engine.py", r"_publish\(\w+, \"(\w+)\"\)"),
    ("incomplete_transactions", "buffer/engine.py", r"reason = \"(\w+)\""),
    ("incomplete_transactions", "server/cluster.py", r"\.stop\(\"(\w+)\"\)"),
    ("incomplete_transactions", "server/supervisor.py", r"reason = \"(\w+)\" if"),
    # A reason chosen between two: both.
    ("bad_input", "*.py", r"reason = \"(\w+)\" if [^\n]* else \"(\w+)\""),
    ("bad_input", "server/listener.py", r"reason = \"(\w+)\" if [^\n]* else \"(\w+)\""),
]


@pytest.mark.parametrize(("metric", "where", "pattern"), _SCANS)
def test_every_label_value_the_code_counts_is_a_known_label(
    metric: str, where: str, pattern: str
) -> None:
    """Each reason, transport or kind written literally where it is raised or counted is in the list exported at 0 (a new one without its list entry fails here)."""
    found: dict[str, str] = {}
    for path in SRC.glob(where):
        if "client" in path.parts:
            continue  # the client's own refusals are not the server's metrics
        for m in re.finditer(pattern, path.read_text()):
            value = next(g for g in m.groups() if g)
            found.setdefault(value, path.name)
    assert found, f"{pattern} found nothing: the scan is stale"
    missing = {v: f for v, f in found.items() if v not in KNOWN_LABELS[metric]}
    assert not missing, f"counted but not exported at 0 from the start: {missing}"


def test_every_login_and_token_refusal_is_a_known_auth_failure() -> None:
    """Each reason monauth refuses a request with is among the (endpoint, reason) pairs exported at 0."""
    text = (SRC / "server" / "monauth.py").read_text()
    reasons = set(re.findall(r"Refusal\(\s*\d+,\s*\"(\w+)\"", text))
    reasons |= set(
        re.findall(r"Refusal\(\s*\d+,\s*\"(\w+)\"", (SRC / "server" / "guard.py").read_text())
    )
    reasons.discard("origin")  # guard's Origin check: the monitoring port passes no origins
    assert reasons <= {r for _, r in AUTH_FAILURES}, reasons - {r for _, r in AUTH_FAILURES}
    assert ("login", "origin") in AUTH_FAILURES  # the login form's own origin check
