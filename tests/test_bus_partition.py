"""Partitions, message ids and ownership (async_logging.bus.partition): sans-I/O."""

from __future__ import annotations

import pytest

from async_logging.bus.partition import (
    events_subject,
    message_id,
    parse_member,
    parse_partitions,
    partition_of,
    split,
)
from async_logging.exceptions import ConfigError


def test_partition_of_is_a_stable_crc32() -> None:
    """The same uuid lands in the same partition in every process (CRC-32, not hash())."""
    # CRC-32 of b"req-1" is 0x6D0F1B31 (any CRC-32 says so), and 0x31 % 16 == 1
    assert partition_of("req-1", 16) == 1
    assert partition_of("é", 1024) == 318
    assert {partition_of(f"u{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_split_keeps_a_uuids_events_together_and_in_order() -> None:
    """Events go to their uuid's partition in batch order; events without a uuid go to the
    spread partition."""
    events = [{"uuid": f"u{i % 5}", "n": i} for i in range(20)] + [{"n": 99}, {"uuid": "", "n": 98}]
    parts = split(events, 4, spread=6)
    assert sum(map(len, parts.values())) == 22
    for p, bucket in parts.items():
        uuids = {e.get("uuid") for e in bucket if e.get("uuid")}
        assert all(partition_of(u, 4) == p for u in uuids)
        assert [e["n"] for e in bucket] == sorted(e["n"] for e in bucket if e["n"] < 98) + [
            e["n"] for e in bucket if e["n"] >= 98
        ]
    assert {e["n"] for e in parts[6 % 4] if not e.get("uuid")} == {98, 99}


def test_message_id_names_content() -> None:
    """Equal bytes, equal ids; other bytes, another id."""
    assert message_id(b"abc") == message_id(b"abc") != message_id(b"abd")
    assert len(message_id(b"")) == 32
    assert events_subject(3) == "alog.events.3"


def test_members_share_every_partition_once() -> None:
    """N members with --member K/N take every partition exactly once, evenly."""
    shares = [parse_member(f"{k}/3", 16) for k in (1, 2, 3)]
    assert sorted(p for share in shares for p in share) == list(range(16))
    assert sorted(map(len, shares)) == [5, 5, 6]


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/2/3", ""])
def test_bad_member_is_refused(spec: str) -> None:
    """A member spec that is not K/N with 1 <= K <= N is a ConfigError naming the flag."""
    with pytest.raises(ConfigError, match="--member"):
        parse_member(spec, 16)


def test_more_members_than_partitions_is_refused() -> None:
    with pytest.raises(ConfigError, match="more members"):
        parse_member("1/5", 4)


def test_partition_lists_and_ranges() -> None:
    assert parse_partitions("0-3", 16) == [0, 1, 2, 3]
    assert parse_partitions("5, 1,2-3,2", 16) == [1, 2, 3, 5]
    for bad in ("0-16", "x", "3-1", "-1", ""):
        with pytest.raises(ConfigError, match="--partitions"):
            parse_partitions(bad, 16)
