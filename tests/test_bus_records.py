"""Records on the trees stream and back (async_logging.bus.records): sans-I/O."""

from __future__ import annotations

import orjson

from async_logging.bus.records import PART_HEADER, Joiner, to_messages
from async_logging.encoded import EncodedRecords
from async_logging.publishers.jsonl import encode_line

TX = {"kind": "transaction", "uuid": "u", "children": []}
HB = {"kind": "heartbeat", "msg": "hi"}


def test_a_feeds_records_go_in_one_message_per_kind_named_after_the_feed() -> None:
    """What feeding one bus message published: one message per kind, of the JSON lines the
    file sink writes, named after that bus message (a replay publishes the same names)."""
    other = {**TX, "uuid": "v"}
    messages = to_messages([("ev-7", [TX, HB, other])], limit=1 << 20)
    assert [(m.subject, m.headers) for m in messages] == [
        ("alog.trees.transaction", {"Nats-Msg-Id": "ev-7.transaction"}),
        ("alog.trees.heartbeat", {"Nats-Msg-Id": "ev-7.heartbeat"}),
    ]
    assert messages[0].payload == encode_line(TX) + encode_line(other)


def test_a_clean_cycles_records_go_one_per_message_named_by_content() -> None:
    """Without a name (a clean cycle's timeouts): one record per message, named by its
    line's digest: the same tree built again gets the same name."""
    messages = to_messages([(None, [TX, HB]), (None, [TX])], limit=1 << 20)
    assert [m.subject for m in messages] == [
        "alog.trees.transaction",
        "alog.trees.heartbeat",
        "alog.trees.transaction",
    ]
    assert messages[0].headers == messages[2].headers != messages[1].headers


def test_encoded_records_are_not_decoded_when_of_one_kind() -> None:
    """A natively published batch of one kind goes as its lines, never decoded."""
    lines = b'{"kind":"transaction","uuid":"a"}\n{"kind":"transaction","uuid":"b"}\n'
    batch = EncodedRecords(lines, {"transaction": 2})
    (message,) = to_messages([("ev-1", batch)], limit=1 << 20)
    assert message.payload == lines
    assert batch._decoded is None


def test_a_batch_over_the_limit_is_split_between_lines_then_within_one() -> None:
    """Lines that do not fit one message go in several (each of whole lines); a line
    longer than a message is cut in parts; a sink joins the parts, in any order and
    interleaved with other messages, and acks every part with its record."""
    big = {"kind": "transaction", "uuid": "big", "msg": "x" * 250}
    small = [{"kind": "transaction", "uuid": f"s{i}"} for i in range(4)]
    messages = to_messages([("ev-2", [*small, big])], limit=100)
    whole = [m for m in messages if PART_HEADER not in m.headers]
    parts = [m for m in messages if PART_HEADER in m.headers]
    assert all(m.payload.endswith(b"\n") and len(m.payload) <= 100 for m in whole)
    assert b"".join(m.payload for m in whole) == b"".join(map(encode_line, small))
    assert len(parts) == 3 and all(len(m.payload) <= 100 for m in parts)
    assert len({m.headers["Nats-Msg-Id"] for m in messages}) == len(messages)
    joiner = Joiner()
    shuffled = [parts[2], whole[0], parts[0]]
    first = joiner.take((m.subject, m.payload, m.headers, i) for i, m in enumerate(shuffled))
    assert first.records.lines == whole[0].payload
    assert first.tokens == [1] and joiner.waiting == 1
    second = joiner.take([(parts[1].subject, parts[1].payload, parts[1].headers, 9)])
    assert orjson.loads(second.records.lines) == big
    assert sorted(second.tokens) == [0, 2, 9] and joiner.waiting == 0
    assert second.records.kinds == {"transaction": 1}
