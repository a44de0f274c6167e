"""Records on the trees stream and back (async_logging.bus.records): sans-I/O."""

from __future__ import annotations

import orjson

from async_logging.bus.records import PART_HEADER, Joiner, to_messages
from async_logging.encoded import EncodedRecords
from async_logging.publishers.jsonl import encode_line


def test_records_become_one_message_each_named_by_their_line() -> None:
    """Each record is its JSON line (as the file sink writes it) on alog.trees.<kind>,
    named by the line's digest: the same tree built again gets the same name."""
    tx = {"kind": "transaction", "uuid": "u", "children": []}
    hb = {"kind": "heartbeat", "msg": "hi"}
    messages = to_messages([[tx, hb], [tx]], limit=1 << 20)
    assert [m.subject for m in messages] == [
        "alog.trees.transaction",
        "alog.trees.heartbeat",
        "alog.trees.transaction",
    ]
    assert messages[0].payload == encode_line(tx)
    assert messages[0].headers == messages[2].headers != messages[1].headers


def test_encoded_records_are_not_decoded_when_of_one_kind() -> None:
    """A natively published batch of one kind is cut into its lines as they are."""
    lines = b'{"kind":"transaction","uuid":"a"}\n{"kind":"transaction","uuid":"b"}\n'
    batch = EncodedRecords(lines, {"transaction": 2})
    messages = to_messages([batch], limit=1 << 20)
    assert [m.payload for m in messages] == lines.splitlines(keepends=True)
    assert batch._decoded is None  # never decoded


def test_a_record_over_the_limit_is_cut_in_parts_and_joined_whole() -> None:
    """A line longer than a bus message goes in parts; a sink joins them, in any order and
    interleaved with other records, and acks every part with its record."""
    big = {"kind": "transaction", "uuid": "big", "msg": "x" * 250}
    small = {"kind": "atomicEvent", "uuid": "s"}
    messages = to_messages([[big, small]], limit=100)
    parts = [m for m in messages if m.headers.get(PART_HEADER)]
    assert len(parts) == 3 and all(len(m.payload) <= 100 for m in parts)
    joiner = Joiner()
    shuffled = [parts[2], messages[-1], parts[0]]
    first = joiner.take((m.subject, m.payload, m.headers, i) for i, m in enumerate(shuffled))
    assert [orjson.loads(line) for line in first.records.lines.splitlines()] == [small]
    assert first.tokens == [1] and joiner.waiting == 1
    second = joiner.take([(parts[1].subject, parts[1].payload, parts[1].headers, 9)])
    assert orjson.loads(second.records.lines) == big
    assert sorted(second.tokens) == [0, 2, 9] and joiner.waiting == 0
    assert second.records.kinds == {"transaction": 1}
