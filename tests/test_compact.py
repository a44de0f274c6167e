"""Compact records (``--compact``): below a root, the fields that say where an event comes
from are kept only where they differ from the root's (docs/design.md §3)."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest

from async_logging import LogBuffer
from async_logging.buffer.engine import COMPACT_KEYS
from async_logging.encoded import NATIVE
from helpers import Clock

T0 = 1_700_000_000_000
WHERE = {"pid": 4242, "machine": "web-1", "ipAddress": "10.0.0.1", "pool": "p", "rlogid": "r"}


def tree(uuid: str = "u", **child_extra: Any) -> list[dict[str, Any]]:
    return [
        {"clazz": "begin", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T0, **WHERE},
        {"clazz": "begin", "uuid": uuid, "event": "2", "parent": "1", "timestamp": T0 + 1, **WHERE},
        {
            "uuid": uuid,
            "event": "3",
            "parent": "2",
            "timestamp": T0 + 2,
            "msg": "q",
            **WHERE,
            **child_extra,
        },
        {"clazz": "end", "uuid": uuid, "event": "2", "parent": "1", "timestamp": T0 + 3},
        {"clazz": "end", "uuid": uuid, "event": "1", "parent": "0", "timestamp": T0 + 4},
    ]


def nodes(record: dict[str, Any]) -> list[dict[str, Any]]:
    out, stack = [], [record]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.get("children", ()))
    return out


def test_children_keep_only_what_differs_from_the_root() -> None:
    full = LogBuffer(clock=Clock(), native=False).feed_many(tree()).records[0]
    compact = (
        LogBuffer(clock=Clock(), native=False, compact=True)
        .feed_many(tree(machine="web-2"))
        .records[0]
    )
    root, inner, leaf = nodes(compact)
    assert all(k in root for k in ("uuid", "request", "tid", "pid", "machine"))
    assert not set(COMPACT_KEYS) & set(inner)
    assert leaf["machine"] == "web-2"  # it differs: kept
    assert not (set(COMPACT_KEYS) - {"machine"}) & set(leaf)

    # Nothing else changed, and the records are smaller.
    def strip(n: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in n.items() if k not in (*COMPACT_KEYS, "children")}

    assert strip(nodes(full)[1]) == strip(inner)
    assert len(orjson.dumps(compact)) < len(orjson.dumps(full)) - 150


def test_a_value_of_another_type_is_kept() -> None:
    record = (
        LogBuffer(clock=Clock(), native=False, compact=True).feed_many(tree(pid="4242")).records[0]
    )
    assert nodes(record)[2]["pid"] == "4242"


def test_incomplete_trees_are_compact_too() -> None:
    buf = LogBuffer(clock=Clock(), native=False, compact=True)
    buf.feed_many(tree()[:3])
    (record,) = buf.flush_all()
    assert record["complete"] is False
    assert not set(COMPACT_KEYS) & set(nodes(record)[1])


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_the_native_path_writes_the_same_compact_lines() -> None:
    payload = msgpack.packb(tree(machine="web-2") + tree("v"))
    native = LogBuffer(clock=Clock(), native=True, compact=True).feed_msgpack(payload)
    assert native is not None
    reference = LogBuffer(clock=Clock(), native=False, compact=True).feed_many(
        msgpack.unpackb(payload)
    )
    assert list(native.records) == reference.records
    # A compact key holding a map below the root: the native path lets the reference decide.
    odd = tree("w", machine={"a": 1})
    odd[0]["machine"] = {"a": 1}
    assert LogBuffer(clock=Clock(), compact=True).feed_msgpack(msgpack.packb(odd)) is None
