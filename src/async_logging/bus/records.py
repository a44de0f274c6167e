"""Published records on the trees stream, and back (docs/design.md §8): sans-I/O.

A reassembler publishes records as JSON lines, exactly as the JSON-lines sink writes them,
on ``alog.trees.<kind>``. What feeding one events message published goes in one message
per kind, named after that events message (``Nats-Msg-Id: ev-<seq>.<kind>``): a replay
feeds the same messages in the same order and publishes the same names, which JetStream
drops. What a clean cycle publishes (timeouts, settled trees) goes one record per message,
named by its line's digest: a tree built again is the same line. A line longer than one
bus message is cut into parts, each with an ``Alog-Part: <i>/<n> <name>`` header; a sink
joins them.

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


def to_messages(
    batches: Iterable[tuple[str | None, Sequence[dict[str, Any]]]], limit: int
) -> list[Outgoing]:
    """The messages that publish ``batches`` of records, in order.

    Args:
        batches: ``(name, records)``: what the engine published, as lists of record dicts
            or :class:`~async_logging.encoded.EncodedRecords` (lines, not decoded when of
            one kind). A named batch (what feeding one bus message published: named after
            that message) goes in one message per kind, named ``<name>.<kind>``, so that
            a replay of that message publishes the same names; a batch without a name (a
            clean cycle's) goes one record per message, named by its line's digest.
        limit: the largest payload of one message.
    """
    out: list[Outgoing] = []
    for name, batch in batches:
        by_kind: dict[str, list[bytes]] = {}
        if isinstance(batch, EncodedRecords):
            kinds = list(batch.kinds)
            if len(kinds) == 1 and name is not None and batch.nbytes <= limit:
                # The common case, whole trees of one frame: the lines as they are.
                out.append(
                    Outgoing(trees_subject(kinds[0]), batch.lines, {MSG_ID: f"{name}.{kinds[0]}"})
                )
                continue
            if len(kinds) == 1:
                by_kind[kinds[0]] = [
                    line for chunk in batch.chunks for line in chunk.splitlines(keepends=True)
                ]
            else:
                for chunk in batch.chunks:
                    for line in chunk.splitlines(keepends=True):
                        by_kind.setdefault(_kind(orjson.loads(line)), []).append(line)
        else:
            for record in batch:
                by_kind.setdefault(_kind(record), []).append(encode_line(record))
        for kind, lines in by_kind.items():
            if name is None:
                for line in lines:
                    _add(out, kind, line, message_id(line), limit)
            else:
                _add_lines(out, kind, lines, f"{name}.{kind}", limit)
    return out


def _kind(record: Any) -> str:
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if kind in _KINDS else "atomicEvent"


def _add_lines(out: list[Outgoing], kind: str, lines: list[bytes], name: str, limit: int) -> None:
    """Lines in as few messages as fit (``name``, then ``name.1``, ``name.2``...)."""
    runs: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if runs[-1] and size + len(line) > limit:
            runs.append([])
            size = 0
        runs[-1].append(line)
        size += len(line)
    for i, run in enumerate(runs):
        _add(out, kind, b"".join(run), name if i == 0 else f"{name}.{i}", limit)


def _add(out: list[Outgoing], kind: str, payload: bytes, name: str, limit: int) -> None:
    subject = trees_subject(kind)
    if len(payload) <= limit:
        out.append(Outgoing(subject, payload, {MSG_ID: name}))
        return
    n = -(-len(payload) // limit)  # one line longer than a message: cut in parts
    for i in range(n):
        out.append(
            Outgoing(
                subject,
                payload[i * limit : (i + 1) * limit],
                {MSG_ID: f"{name}.part{i}", PART_HEADER: f"{i}/{n} {name}"},
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
                kinds[kind] += payload.count(b"\n")
                tokens.append(token)
                continue
            line, used = self._part(part, payload, token)
            if line is not None:
                chunks.append(line)
                kinds[kind] += line.count(b"\n")
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
