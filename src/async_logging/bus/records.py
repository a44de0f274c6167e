"""Published records on the trees stream, and back (docs/design.md §8): sans-I/O.

A reassembler publishes each record (a tree, or an event published on its own) as one
message on ``alog.trees.<kind>``: its JSON line, exactly as the JSON-lines sink writes it,
named by the line's digest (``Nats-Msg-Id``). A tree that a replay builds again is the same
line, so JetStream drops the copy. A line longer than one bus message is cut into parts,
each ``<digest>.<i>`` with an ``Alog-Part: <i>/<n> <digest>`` header; a sink joins them.

:func:`to_messages` is the reassembler's side, :class:`Joiner` the sink's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import orjson

from ..encoded import EncodedRecords
from ..publishers.jsonl import encode_line
from .jetstream import MSG_ID, Outgoing
from .partition import message_id, trees_subject

__all__ = ["MAX_PARTIAL_BYTES", "PART_HEADER", "Joined", "Joiner", "to_messages"]

#: Header of a part of a record cut in parts: ``<i>/<n> <digest>`` (i from 0).
PART_HEADER: Final = "Alog-Part"
_KINDS: Final = ("transaction", "atomicEvent", "heartbeat")


def to_messages(batches: Iterable[Sequence[dict[str, Any]]], limit: int) -> list[Outgoing]:
    """The messages that publish ``batches`` of records, in order.

    Args:
        batches: what the engine published: lists of record dicts, or
            :class:`~async_logging.encoded.EncodedRecords` (lines, never decoded when the
            batch holds one kind).
        limit: the largest payload of one message.
    """
    out: list[Outgoing] = []
    for batch in batches:
        if isinstance(batch, EncodedRecords):
            lines = [line for chunk in batch.chunks for line in chunk.splitlines(keepends=True)]
            kinds = list(batch.kinds)
            if len(kinds) == 1:
                kind = kinds[0]
                for line in lines:
                    _add(out, kind, line, limit)
            else:
                for line in lines:
                    _add(out, _kind(orjson.loads(line)), line, limit)
        else:
            for record in batch:
                _add(out, _kind(record), encode_line(record), limit)
    return out


def _kind(record: Any) -> str:
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if kind in _KINDS else "atomicEvent"


def _add(out: list[Outgoing], kind: str, line: bytes, limit: int) -> None:
    subject = trees_subject(kind)
    digest = message_id(line)
    if len(line) <= limit:
        out.append(Outgoing(subject, line, {MSG_ID: digest}))
        return
    n = -(-len(line) // limit)
    for i in range(n):
        out.append(
            Outgoing(
                subject,
                line[i * limit : (i + 1) * limit],
                {MSG_ID: f"{digest}.{i}", PART_HEADER: f"{i}/{n} {digest}"},
            )
        )


class Joined(NamedTuple):
    """A batch of whole records: their lines, their kinds, and the tokens (messages) they
    came in, to ack once the lines are published."""

    records: EncodedRecords
    tokens: list[Any]


class Joiner:
    """Turns trees-stream messages into JSON lines, joining the parts of a cut record.

    Parts wait (with their tokens) until every part of their record arrived; a record's
    parts are published back to back, so few wait at once. At most
    :data:`MAX_PARTIAL_BYTES` bytes wait: past it the oldest partial record is given up,
    counted in :attr:`given_up` (its parts are acked; never expected).
    """

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, tuple[bytes, Any]]] = {}
        self._bytes = 0
        self.given_up = 0

    def take(self, messages: Iterable[tuple[str, bytes, dict[str, str] | None, Any]]) -> Joined:
        """``(subject, payload, headers, token)`` of messages in stream order → the whole
        records among them (and the parts they complete), with their tokens."""
        chunks: list[bytes] = []
        kinds: Counter[str] = Counter()
        tokens: list[Any] = []
        for subject, payload, headers, token in messages:
            kind = subject.rpartition(".")[2]
            part = headers.get(PART_HEADER) if headers else None
            if part is None:
                chunks.append(payload)
                kinds[kind] += 1
                tokens.append(token)
                continue
            line, used = self._part(part, payload, token)
            if line is not None:
                chunks.append(line)
                kinds[kind] += 1
                tokens.extend(used)
        given_up = self._trim()
        tokens.extend(given_up)
        return Joined(EncodedRecords(b"".join(chunks), kinds), tokens)

    def _part(self, part: str, payload: bytes, token: Any) -> tuple[bytes | None, list[Any]]:
        where, _, digest = part.partition(" ")
        i_text, _, n_text = where.partition("/")
        try:
            i, n = int(i_text), int(n_text)
        except ValueError:
            return None, [token]  # not ours: dropped (acked)
        parts = self._parts.setdefault(digest, {})
        if i in parts:  # a redelivery: the newer token acks it
            self._bytes -= len(parts[i][0])
        parts[i] = (payload, token)
        self._bytes += len(payload)
        if len(parts) < n:
            return None, []
        del self._parts[digest]
        self._bytes -= sum(len(p) for p, _ in parts.values())
        ordered = [parts[k] for k in range(n) if k in parts]
        return b"".join(p for p, _ in ordered), [t for _, t in parts.values()]

    def _trim(self) -> list[Any]:
        tokens: list[Any] = []
        while self._bytes > MAX_PARTIAL_BYTES and self._parts:
            digest = next(iter(self._parts))
            parts = self._parts.pop(digest)
            self._bytes -= sum(len(p) for p, _ in parts.values())
            tokens.extend(t for _, t in parts.values())
            self.given_up += 1
        return tokens

    @property
    def waiting(self) -> int:
        """Records some of whose parts arrived and others not yet."""
        return len(self._parts)


#: Bytes of parts a sink keeps waiting for the rest of their record.
MAX_PARTIAL_BYTES: Final = 256 * 1024 * 1024
