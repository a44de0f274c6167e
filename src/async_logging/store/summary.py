"""The CAL-like summary: counts, failure rates and percentiles by type and name.

Bounds: at most :data:`SUMMARY_MAX_SPANS` spans are read (the most recent of the window;
the answer says ``sampled``), at most :data:`SUMMARY_MAX_GROUPS` (type, name) groups are
reported (the busiest; the answer says ``truncated``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..exceptions import UsageError

__all__ = ["SUMMARY_MAX_GROUPS", "SUMMARY_MAX_SPANS", "summarize"]

#: Spans one summary reads at most (the most recent of its window).
SUMMARY_MAX_SPANS: Final = 500_000
#: (type, name) groups one summary reports at most (the busiest).
SUMMARY_MAX_GROUPS: Final = 1000


def summarize(
    execute: Callable[[str, Sequence[Any]], list[Any]],
    window: float = 3600.0,
    *,
    now: int,
    until: int | None = None,
    type: str | None = None,
    roots_only: bool = False,
) -> dict[str, Any]:
    """Counts, failure rates and duration percentiles by type and name, like a CAL report.

    Every transaction node counts, nested ones too (a DB call inside a URL), unless
    ``roots_only``, in the trees whose root's ``timestamp`` falls in the window (the
    spans are found through the trees' time index). Percentiles are nearest-rank over the
    durations in the window.

    Args:
        execute: runs one query (the reader's, under its deadline).
        window: seconds before ``until``.
        now: ms since the epoch (the window ends there unless ``until`` says).
        until: end of the window, ms since the epoch (default: ``now``).
        type: only this CAL type.
        roots_only: only the root transactions of the trees.

    Returns:
        ``{"since", "until", "spans", "sampled", "truncated", "types", "rows"}``: each of
        ``types`` (one per type) and ``rows`` (one per type and name, the busiest
        :data:`SUMMARY_MAX_GROUPS`) has ``type``, ``name`` (absent in ``types``),
        ``count``, ``failures``, ``failure_rate``, ``avg``, ``p50``, ``p95`` and ``max``
        (ms). ``sampled`` is true when the window held more than
        :data:`SUMMARY_MAX_SPANS` spans and only the most recent were read.

    Raises:
        UsageError: ``window`` is not positive.
    """
    if not window > 0:
        raise UsageError(f"window must be positive, not {window}")
    end = now if until is None else until
    start = end - int(window * 1000)
    sql = (
        "SELECT s.type, s.name, s.failed, s.duration FROM trees AS t "
        "JOIN spans AS s ON s.tree_id = t.id WHERE t.ts >= ? AND t.ts < ?"
    )
    args: list[Any] = [start, end]
    if type:
        sql += " AND s.type = ?"
        args.append(type)
    if roots_only:
        sql += " AND s.depth = 0"
    sql += " ORDER BY t.ts DESC, t.id DESC LIMIT ?"
    args.append(SUMMARY_MAX_SPANS + 1)
    spans = execute(sql, args)
    sampled = len(spans) > SUMMARY_MAX_SPANS
    if sampled:
        spans.pop()
    groups: dict[tuple[str | None, str | None], tuple[list[float], list[int]]] = {}
    for stype, sname, failed, duration in spans:
        group = groups.get((stype, sname))
        if group is None:
            group = groups[(stype, sname)] = ([], [0])
        group[0].append(duration)
        group[1][0] += failed
    by_type: dict[str | None, tuple[list[float], list[int]]] = {}
    for (stype, _), (durations, failures) in groups.items():
        agg = by_type.setdefault(stype, ([], [0]))
        agg[0].extend(durations)
        agg[1][0] += failures[0]
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1][0]))
    truncated = len(ordered) > SUMMARY_MAX_GROUPS
    rows = [
        {"type": t, "name": n, **_stats(d, f[0])} for (t, n), (d, f) in ordered[:SUMMARY_MAX_GROUPS]
    ]
    rows.sort(key=lambda r: (r["type"] or "", -r["count"], r["name"] or ""))
    types = [{"type": t, **_stats(d, f[0])} for t, (d, f) in by_type.items()]
    types.sort(key=lambda r: (-r["count"], r["type"] or ""))
    return {
        "since": start,
        "until": end,
        "spans": len(spans),
        "sampled": sampled,
        "truncated": truncated,
        "types": types,
        "rows": rows,
    }


def _stats(durations: list[float], failures: int) -> dict[str, Any]:
    durations.sort()
    n = len(durations)

    def rank(q: float) -> float:
        return durations[max(0, math.ceil(q * n) - 1)]

    return {
        "count": n,
        "failures": failures,
        "failure_rate": failures / n if n else 0.0,
        "avg": sum(durations) / n if n else 0.0,
        "p50": rank(0.50) if n else 0.0,
        "p95": rank(0.95) if n else 0.0,
        "max": durations[-1] if n else 0.0,
    }
