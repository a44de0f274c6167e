"""Partitions, message ids and ownership: the bus's sans-I/O rules (docs/design.md §8).

Nothing here touches a socket. An ingest node calls :func:`split` to cut a batch of mapped
events into one list per partition (the partition of an event is :func:`partition_of` its
uuid: a stable hash, the same in every process and on every machine) and names each bus
message by its content (:func:`message_id`), so that JetStream drops a resend it already
holds. A reassembler names each published record the same way (:func:`message_id` of its
JSON line), which makes a tree published again after a crash a duplicate JetStream drops.
:func:`parse_member` and :func:`parse_partitions` turn ``--member K/N`` and
``--partitions 0-3,6`` into the partitions a reassembler owns.

:func:`native_split` is the same cut for a MessagePack frame as it came, done by the native
extension without a Python object per event (:func:`split` of the mapped events is its
oracle): each event's bytes by partition, or None when the frame needs the mapping.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from ..buffer.engine import wall_clock_ms
from ..buffer.native import limits_tuple
from ..encoded import native_module
from ..exceptions import ConfigError
from ..wire import WireLimits

__all__ = [
    "ARRAY_HEAD_BYTES",
    "EVENTS_SUBJECT",
    "MAX_PARTITIONS",
    "TREES_SUBJECT",
    "RawSplit",
    "array_body",
    "events_subject",
    "join_arrays",
    "message_id",
    "native_split",
    "parse_member",
    "parse_partitions",
    "partition_of",
    "split",
    "trees_subject",
]

#: Subjects of the events stream: ``alog.events.<partition>``.
EVENTS_SUBJECT: Final = "alog.events"
#: Subjects of the trees stream: ``alog.trees.<kind>`` (``transaction``, ``atomicEvent``,
#: ``heartbeat``), so that a sink knows a record's kind without decoding it.
TREES_SUBJECT: Final = "alog.trees"
#: Bytes of a MessagePack array's header at most (``0xdd`` and a 32-bit count).
ARRAY_HEAD_BYTES: Final = 5
#: Most partitions a deployment may have (each is a durable consumer and an engine).
MAX_PARTITIONS: Final = 1024


def events_subject(partition: int) -> str:
    """The subject of one partition's events."""
    return f"{EVENTS_SUBJECT}.{partition}"


def trees_subject(kind: str) -> str:
    """The subject of a published record of ``kind``."""
    return f"{TREES_SUBJECT}.{kind}"


def partition_of(uuid: str, partitions: int) -> int:
    """The partition of a uuid: CRC-32 of its UTF-8 bytes modulo ``partitions``.

    Stable across processes, machines and Python versions (unlike :func:`hash`), which is
    what lets every ingest node send one uuid's events to one reassembler.
    """
    return zlib.crc32(uuid.encode("utf-8", "surrogatepass")) % partitions


def split(events: Iterable[Any], partitions: int, spread: int = 0) -> dict[int, list[Any]]:
    """Mapped events by partition, each list in the batch's order.

    An event with a uuid goes to :func:`partition_of` its uuid (the mapper made it a
    string); one without (a record of its own, nothing to reassemble) goes to partition
    ``spread % partitions``, so a caller that moves ``spread`` on spreads them.
    """
    out: dict[int, list[Any]] = {}
    other = spread % partitions
    last_uuid: Any = None
    last_part = other
    crc = zlib.crc32
    for e in events:
        uuid = e.get("uuid")
        if uuid.__class__ is not str or not uuid:
            part = other
        elif uuid == last_uuid:  # a tree's events mostly come together
            part = last_part
        else:
            part = last_part = crc(uuid.encode("utf-8", "surrogatepass")) % partitions
            last_uuid = uuid
        bucket = out.get(part)
        if bucket is None:
            out[part] = [e]
        else:
            bucket.append(e)
    return out


class RawSplit(NamedTuple):
    """A frame's events as they came, by partition (:func:`native_split`)."""

    #: The envelope's ``seq``, or None.
    seq: int | None
    #: Events in the frame.
    events: int
    #: ``(partition, count, bytes)`` in ascending partition order: the MessagePack bytes of
    #: that partition's events back to back, in frame order (an array body: :func:`array_body`).
    parts: tuple[tuple[int, int, bytes], ...]


def native_split(
    payload: bytes, limits: WireLimits, partitions: int, other: int, max_event_bytes: int
) -> RawSplit | None:
    """A MessagePack frame's events by partition, as the bytes they came in, when the native
    extension takes the frame: every event one the default mapper takes (none to refuse) and
    none longer than ``max_event_bytes``. An event goes to :func:`partition_of` its uuid as
    the mapper makes it (``4242`` where ``"4242"`` goes), one without a uuid to ``other``.

    None: the extension is not there, or the frame needs the mapping (something to refuse,
    an unusual encoding: whatever the native path declines).
    """
    module = native_module()
    if module is None:
        return None
    lim = limits_tuple(limits)  # split does not read the tree limits
    got = module.split(payload, wall_clock_ms(), lim, partitions, other, max_event_bytes)
    return None if got is None else RawSplit(*got)


def array_body(payload: bytes) -> tuple[int, bytes]:
    """A MessagePack array's item count and the bytes of its items (its header cut off),
    so that several arrays can be joined into one without decoding them
    (:func:`join_arrays`)."""
    head = payload[0]
    if head & 0xF0 == 0x90:
        return head & 0x0F, payload[1:]
    if head == 0xDC:
        return int.from_bytes(payload[1:3], "big"), payload[3:]
    if head == 0xDD:
        return int.from_bytes(payload[1:5], "big"), payload[5:]
    raise ValueError(f"not a MessagePack array (first byte 0x{head:02x})")


def join_arrays(bodies: list[tuple[int, bytes]]) -> bytes:
    """One MessagePack array of the items of ``bodies`` (from :func:`array_body`), in order."""
    n = sum(count for count, _ in bodies)
    if n <= 15:
        head = bytes((0x90 | n,))
    elif n <= 0xFFFF:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(body for _, body in bodies)


def message_id(payload: bytes) -> str:
    """A message's ``Nats-Msg-Id``: a 128-bit BLAKE2b digest of its payload, in hex.

    The same bytes get the same id wherever and whenever they are published, so JetStream
    drops a copy within its duplicate window.
    """
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def parse_member(spec: str, partitions: int) -> list[int]:
    """The partitions of member ``K/N`` (K from 1 to N): those ``p`` with ``p % N == K - 1``.

    N members share the partitions evenly (at most one apart); the operator runs exactly
    one process for each K.

    Raises:
        ConfigError: ``spec`` is not ``K/N`` with 1 ≤ K ≤ N ≤ partitions.
    """
    k_text, sep, n_text = spec.partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        k = n = 0
    if not sep or not 1 <= k <= n:
        raise ConfigError(f"--member must be K/N with 1 <= K <= N (e.g. 1/2), not {spec!r}")
    if n > partitions:
        raise ConfigError(f"--member {spec}: more members ({n}) than partitions ({partitions})")
    return [p for p in range(partitions) if p % n == k - 1]


def parse_partitions(spec: str, partitions: int) -> list[int]:
    """Partitions from a list of numbers and ranges: ``0-3``, ``1,5,7``, ``0-1,6``.

    Raises:
        ConfigError: a malformed item, or a partition outside ``0 .. partitions - 1``.
    """
    chosen: set[int] = set()
    for item in spec.split(","):
        first, dash, last = item.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ConfigError(f"--partitions: {item.strip()!r} is not N or N-M") from None
        if not 0 <= lo <= hi < partitions:
            raise ConfigError(
                f"--partitions: {item.strip()!r} is outside 0-{partitions - 1} "
                f"(the bus has {partitions} partitions)"
            )
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)
