"""After a spool replay the native fast path stays fast, and the replayed uuids are
forgotten once the engine's timeout has passed (issue 12, item 10)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from async_logging import LogBuffer
from async_logging.encoded import NATIVE, EncodedRecords
from async_logging.publishers import BatchPublisher
from async_logging.server.pipeline import Pipeline
from async_logging.server.spool import MSGPACK, Spool

T = 1_700_000_000_000


class Batches(BatchPublisher):
    """Keeps every batch as it was handed over (its type tells whether it stayed encoded)."""

    def __init__(self) -> None:
        self.batches: list[Sequence[dict[str, Any]]] = []

    def publish_many(self, records: Sequence[dict[str, Any]]) -> None:
        self.batches.append(records)


def tx(uuid: str) -> list[dict[str, Any]]:
    return [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T},
        {"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T + 1},
    ]


async def test_native_batches_stay_encoded_after_a_replay_and_the_memory_expires(
    tmp_path: Path,
) -> None:
    """A replay that left a tree open: later native batches are published encoded (not
    decoded to look for replayed uuids), the open tree is flagged replayed when it
    completes, and past the engine's timeout the replayed uuids are forgotten."""
    root = tmp_path / "spool"
    dead = Spool(root / "w-1", 1 << 20)
    dead.append(MSGPACK, msgpack.packb({"seq": 0, "logs": tx("open-1")[:1]}))
    dead.close()
    sink = Batches()
    buffer = LogBuffer(clock=lambda: T, clean_duration=1, clean_cycles=1)
    pipeline = Pipeline(buffer, sink, spool=Spool(root / "w-2", 1 << 20))
    now = [100.0]
    pipeline.clock = lambda: now[0]
    pipeline.start()
    try:
        assert await pipeline.adopt(Spool(root / "w-1", 1 << 20)) == 1
        await pipeline.accept_msgpack(msgpack.packb(tx("fresh")))
        await pipeline.accept(tx("open-1")[1:])
        assert pipeline._replayed  # the open tree's uuid, until the timeout
        now[0] += 2.0  # past clean_duration x clean_cycles (1 s)
        pipeline.expire()
        assert not pipeline._replayed
    finally:
        await pipeline.close()
    records = {r["uuid"]: (r, type(batch)) for batch in sink.batches for r in batch}
    fresh, fresh_type = records["fresh"]
    assert "replayed" not in fresh
    if NATIVE:
        assert fresh_type is EncodedRecords
    reopened, _ = records["open-1"]
    assert reopened["replayed"] is True and reopened["complete"] is True
