"""What the engine remembers of the trees it published (docs/design.md §3).

A tree that was published may still get events: a client's resend (a duplicate, to drop)
or a straggler (published on its own, flagged ``late``). To tell the two apart the engine
keeps, per published uuid, **digests**: one 64-bit digest per begin id, per end id and
per atomic event's key (event id, parent, timestamp, ``msg``). Never the events' content:
a published tree of 3.9 MB of messages costs 8 bytes an event here, not its messages.

A digest is Python's own hash of the canonical bytes of what it stands for
(:func:`id_digest`, :func:`atomic_digest`): SipHash with a key drawn at start-up, so a
client cannot make two different events collide on purpose. The native fast path
computes the very same digests in C (``_speedups.c``, ``pack_memory``), over the same bytes.

:class:`PublishedMemory` holds them, bounded three ways (oldest forgotten first; an
event of a forgotten uuid is then taken as the start of a new tree):

- by count: ``cap`` uuids (``max_published_memory``);
- by size: ``max_digests`` digests in all (``max_published_digests``);
- by age: entries older than ``max_age_ms`` (``published_memory_age``), dropped by
  :meth:`PublishedMemory.forget_older`, which the engine's clean cycle calls.

Two forms of one entry, cheapest first:

- ``bytes``: the packed digests (``<3I`` counts of begins, ends and atomic keys, then that
  many native int64s), as both paths make them; unpacked into three frozensets on the
  first look-up (so a resend of a 10,000-event tree is 10,000 set look-ups, not a scan);
- :class:`_Done`, three sets: the rare entry that grows (a late event, a second tree of
  one uuid).
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

from ..encoded import native_module
from ..model import BEGIN, END

__all__ = ["PublishedMemory", "Remembered", "atomic_digest", "id_digest", "pack_digests"]

_COUNTS: Final = struct.Struct("<3I")
_U32: Final = struct.Struct("<I")
_I64: Final = struct.Struct("<q")
_F64: Final = struct.Struct("<d")
#: Stands for "no value" where a length would be (an atomic event without an id or a
#: string ``msg``): no string is that long.
_NONE: Final = b"\xff\xff\xff\xff"
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1


def id_digest(value: str) -> int:
    """The digest of an id: the hash of its UTF-8 bytes (what ``_speedups.c`` hashes)."""
    return hash(value.encode("utf-8", "surrogatepass"))


def _part(value: Any) -> bytes:
    """A string as its length and UTF-8 bytes; anything else as "none"."""
    if value.__class__ is not str:
        return _NONE
    data: bytes = value.encode("utf-8", "surrogatepass")
    return _U32.pack(len(data)) + data


def _atomic_digest(eid: Any, parent: str, timestamp: Any, msg: Any) -> int:
    """:func:`atomic_digest` in Python (the oracle, and for what the native one declines)."""
    ts = timestamp
    if ts.__class__ is float and ts.is_integer() and _I64_MIN <= ts <= _I64_MAX:
        ts = int(ts)
    if ts.__class__ is int and _I64_MIN <= ts <= _I64_MAX:
        stamp = b"i" + _I64.pack(ts)
    elif ts.__class__ is float:
        stamp = b"d" + _F64.pack(ts)
    else:
        stamp = b"f" + repr(ts).encode()
    return hash(_part(eid) + _part(parent) + stamp + _part(msg))


_module = native_module()
_native_digest = getattr(_module, "atomic_digest", None)


def atomic_digest(eid: Any, parent: str, timestamp: Any, msg: Any) -> int:
    """The digest of an atomic event's duplicate key (event id, parent, timestamp, msg).

    The canonical bytes: the id, the parent and a string ``msg`` each as a little-endian
    u32 length and its UTF-8 bytes (a missing id or a ``msg`` that is not a string as
    ``ff ff ff ff``), the timestamp as ``i`` and an int64 when it is an integer (or an
    integral float) in range, as ``d`` and its little-endian double for another float
    (microseconds), else ``f`` and its ``repr``. The native path writes the same bytes for
    the timestamps it takes, and computes this digest faster
    (``_speedups.atomic_digest``) where it is built.
    """
    if _native_digest is not None:
        digest = _native_digest(eid, parent, timestamp, msg)
        if digest is not None:
            return digest  # type: ignore[no-any-return]
    return _atomic_digest(eid, parent, timestamp, msg)


def pack_digests(begins: Iterable[int], ends: Iterable[int], atomics: Iterable[int]) -> bytes:
    """One entry's digests in the packed form (the native path's too)."""
    b, e, a = array("q", begins), array("q", ends), array("q", atomics)
    return _COUNTS.pack(len(b), len(e), len(a)) + b.tobytes() + e.tobytes() + a.tobytes()


#: An entry as :meth:`PublishedMemory.get` returns it: the digests of its begin ids, end
#: ids and atomic keys, each a set.
Remembered = tuple[frozenset[int], frozenset[int], frozenset[int]]


class _Done:
    """The mutable form of an entry (late events, a second tree of one uuid)."""

    __slots__ = ("atomics", "begins", "ends")

    def __init__(self, begins: Iterable[int], ends: Iterable[int], atomics: Iterable[int]) -> None:
        self.begins: set[int] = set(begins)
        self.ends: set[int] = set(ends)
        self.atomics: set[int] = set(atomics)

    def __iter__(self) -> Any:
        return iter((self.begins, self.ends, self.atomics))

    def __len__(self) -> int:
        return len(self.begins) + len(self.ends) + len(self.atomics)


def _unpack(packed: bytes) -> Remembered:
    nb, ne, na = _COUNTS.unpack_from(packed)
    digests = array("q")
    digests.frombytes(memoryview(packed)[_COUNTS.size :])
    return (
        frozenset(digests[:nb]),
        frozenset(digests[nb : nb + ne]),
        frozenset(digests[nb + ne : nb + ne + na]),
    )


def _size(entry: bytes | Remembered | _Done) -> int:
    """Digests held by one entry."""
    if isinstance(entry, bytes):
        return (len(entry) - _COUNTS.size) // 8
    if isinstance(entry, _Done):
        return len(entry)
    return sum(map(len, entry))


class PublishedMemory:
    """Published uuids and the digests of what they held (see the module's docstring).

    Args:
        cap: uuids remembered (the engine's ``max_published_memory``).
        max_digests: digests remembered in all (``max_published_digests``).
        max_age_ms: milliseconds an entry is kept (``published_memory_age``).
    """

    __slots__ = ("_digests", "_entries", "cap", "forgotten", "max_age_ms", "max_digests")

    def __init__(
        self, cap: int, max_digests: int = 2**62, max_age_ms: float = float("inf")
    ) -> None:
        self.cap = cap
        self.max_digests = max_digests
        self.max_age_ms = max_age_ms
        # uuid -> (when remembered, entry), oldest first. An OrderedDict, not a dict: a
        # dict whose front was deleted makes next(iter(...)) skip every dead slot (O(n)
        # per eviction: 27 us against 1 us at 100,000 uuids, measured).
        self._entries: OrderedDict[str, tuple[int, bytes | Remembered | _Done]] = OrderedDict()
        self._digests = 0
        #: Entries forgotten, by the bound that made room: ``count``, ``digests``, ``age``.
        self.forgotten = {"count": 0, "digests": 0, "age": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._entries

    @property
    def digests(self) -> int:
        """Digests held right now (8 bytes each when packed)."""
        return self._digests

    def isdisjoint(self, uuids: Iterable[str]) -> bool:
        """Whether none of ``uuids`` was published (as far as memory goes)."""
        return self._entries.keys().isdisjoint(uuids)

    def get(self, uuid: str) -> Remembered | _Done | None:
        """The digests remembered of published ``uuid`` (unpacked on the first look-up)."""
        entries = self._entries
        held = entries.get(uuid)
        if held is None:
            return None
        when, entry = held
        if isinstance(entry, bytes):
            unpacked = _unpack(entry)
            entries[uuid] = (when, unpacked)
            return unpacked
        return entry

    def remember_packed(self, uuid: str, packed: bytes, now: int) -> None:
        """Remember a tree by its packed digests (the native path's, or :meth:`remember_tree`'s)."""
        entries = self._entries
        if uuid in entries:  # a second tree of one uuid: remember both
            merged = _Done(*self.get(uuid))  # type: ignore[misc]
            for mine, more in zip(merged, _unpack(packed), strict=True):
                mine.update(more)
            self._put(uuid, merged, now)
            return
        entries[uuid] = (now, packed)  # the common case, kept short
        self._digests += (len(packed) - _COUNTS.size) >> 3
        if len(entries) > self.cap or self._digests > self.max_digests:
            self._make_room(now)

    def remember_tree(
        self,
        uuid: str,
        begins: Iterable[str],
        ends: Iterable[str],
        atomics: Iterable[Any],
        now: int,
    ) -> None:
        """Remember a tree the reference path published: its ids and atomic keys
        (``(event, parent, timestamp, msg)`` tuples), as digests."""
        packed = pack_digests(
            map(id_digest, begins), map(id_digest, ends), (atomic_digest(*k) for k in atomics)
        )
        self.remember_packed(uuid, packed, now)

    def remember_late(self, uuid: str, clazz: str, eid: str | None, key: Any, now: int) -> None:
        """Add one late event to what is remembered of published ``uuid`` (the rare path).

        ``key`` is the atomic event's key tuple (ignored for a begin or an end).
        """
        done = self.get(uuid)
        if not isinstance(done, _Done):
            done = _Done(*done) if done is not None else _Done((), (), ())
            self._put(uuid, done, now)
        if clazz == BEGIN:
            done.begins.add(id_digest(eid or ""))
        elif clazz == END:
            done.ends.add(id_digest(eid or ""))
        else:
            done.atomics.add(atomic_digest(*key))
        self._digests += 1
        self._make_room(now)

    def forget_older(self, now: int) -> None:
        """Forget the entries remembered more than ``max_age_ms`` before ``now``."""
        entries = self._entries
        cutoff = now - self.max_age_ms
        while entries:
            uuid, (when, _) = next(iter(entries.items()))
            if when >= cutoff:
                break
            self._drop(uuid, "age")

    def _put(self, uuid: str, entry: bytes | Remembered | _Done, now: int) -> None:
        entries = self._entries
        old = entries.pop(uuid, None)
        if old is not None:
            self._digests -= _size(old[1])
        entries[uuid] = (now, entry)  # the newest: age counts from the last change
        self._digests += _size(entry)
        self._make_room(now)

    def _make_room(self, now: int) -> None:
        entries = self._entries
        while len(entries) > self.cap:
            self._drop(next(iter(entries)), "count")
        while self._digests > self.max_digests and len(entries) > 1:
            self._drop(next(iter(entries)), "digests")

    def _drop(self, uuid: str, why: str) -> None:
        _, entry = self._entries.pop(uuid)
        self._digests -= _size(entry)
        self.forgotten[why] += 1
