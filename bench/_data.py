"""Shared load for the benchmarks: shuffled 12-event transactions (docs/design.md §7).

Each transaction: root begin/end; two nested transactions with two atomic events each;
two atomic events under the root (2 + 2×(2+2) + 2 = 12 events).
"""

from __future__ import annotations

import random
from typing import Any

EVENTS_PER_TX = 12


def transaction(n: int, t0: int = 1_795_463_406_000, pid: int = 4242) -> list[dict[str, Any]]:
    """The 12 wire events of transaction number ``n``, in emission order."""
    uuid = f"req-{n:08d}"
    common = {"uuid": uuid, "pid": pid, "machine": "bench", "pool": "bench", "level": "INFO"}
    ev: list[dict[str, Any]] = [
        {
            **common,
            "clazz": "begin",
            "parent": "0",
            "event": "1",
            "type": "URL",
            "name": "/checkout",
            "timestamp": t0,
        },
    ]
    eid = 2
    for k in range(2):
        tx = str(eid)
        ev.append(
            {
                **common,
                "clazz": "begin",
                "parent": "1",
                "event": tx,
                "type": "API",
                "name": f"svc{k}",
                "timestamp": t0 + 1 + 4 * k,
            }
        )
        for j in range(2):
            eid += 1
            ev.append(
                {
                    **common,
                    "clazz": "atomicEvent",
                    "parent": tx,
                    "event": str(eid),
                    "type": "DB",
                    "name": "query",
                    "msg": f"select {j}",
                    "timestamp": t0 + 2 + 4 * k + j,
                }
            )
        ev.append(
            {
                **common,
                "clazz": "end",
                "parent": "1",
                "event": tx,
                "type": "API",
                "name": f"svc{k}",
                "status": "0",
                "duration": 3,
                "timestamp": t0 + 4 + 4 * k,
            }
        )
        eid += 1
    for j in range(2):
        eid += 1
        ev.append(
            {
                **common,
                "clazz": "atomicEvent",
                "parent": "1",
                "event": str(eid),
                "type": "INFO",
                "name": "note",
                "msg": f"step {j}",
                "timestamp": t0 + 10 + j,
            }
        )
    ev.append(
        {
            **common,
            "clazz": "end",
            "parent": "0",
            "event": "1",
            "type": "URL",
            "name": "/checkout",
            "status": "0",
            "duration": 12,
            "timestamp": t0 + 12,
        }
    )
    assert len(ev) == EVENTS_PER_TX
    return ev


def shuffled_transactions(
    count: int, seed: int = 7, t0: int = 1_795_463_406_000
) -> list[list[dict[str, Any]]]:
    """``count`` transactions, each with its events in a random order, starting at ``t0`` ms.

    The default ``t0`` is fixed (reproducible records); a server run wants the current time,
    or its store's age retention (7 days) deletes the trees as soon as they are stored.
    """
    rng = random.Random(seed)
    out = []
    for n in range(count):
        ev = transaction(n, t0)
        rng.shuffle(ev)
        out.append(ev)
    return out
