"""What the engine remembers of the trees it published (docs/design.md §3).

A tree that was published may still get events: a client's resend (a duplicate, to drop)
or a straggler (published on its own, flagged ``late``). To tell the two apart the engine
keeps, per published uuid, the ids of its begins and ends and the keys of its atomic
events. :class:`PublishedMemory` holds them, bounded by count: past ``cap`` uuids the
oldest is forgotten first (an event for it is then taken as the start of a new tree).

Three forms of one entry, cheapest first:

- ``bytes``: packed by the native fast path (``[[begins], [ends], [[e, p, ts, msg]]]`` in
  MessagePack), unpacked on the first look-up;
- a tuple of three tuples: what the reference path keeps (untracked by the cycle
  collector, so many are cheap);
- :class:`_Done`, three sets: the rare entry that grows (a late event, a second tree of
  one uuid).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from ..model import BEGIN, END

__all__ = ["PublishedMemory", "Remembered"]


class _Done:
    """The mutable form of an entry (late events, a second tree of one uuid)."""

    __slots__ = ("atomics", "begins", "ends")

    def __init__(self, begins: Iterable[Any], ends: Iterable[Any], atomics: Iterable[Any]) -> None:
        self.begins: set[Any] = set(begins)
        self.ends: set[Any] = set(ends)
        self.atomics: set[Any] = set(atomics)

    def __iter__(self) -> Any:
        return iter((self.begins, self.ends, self.atomics))

    def update(self, begins: Iterable[Any], ends: Iterable[Any], atomics: Iterable[Any]) -> None:
        self.begins.update(begins)
        self.ends.update(ends)
        self.atomics.update(atomics)


#: An entry as :meth:`PublishedMemory.get` returns it: (begin ids, end ids, atomic keys),
#: each a container that answers ``in``.
Remembered = tuple[tuple[str, ...], tuple[str, ...], tuple[Any, ...]] | _Done
_Entry = Remembered | bytes

_unpack: Final = msgspec.msgpack.Decoder().decode


def _unpack_memory(packed: bytes) -> Remembered:
    """The tuple form of what ``_speedups`` packed: ``[[begins], [ends], [[e, p, ts, msg]]]``."""
    begins, ends, atomics = _unpack(packed)
    return (tuple(begins), tuple(ends), tuple(map(tuple, atomics)))


class PublishedMemory:
    """Published uuids and what they held, at most ``cap`` of them (oldest forgotten first).

    Args:
        cap: uuids remembered (the engine's ``max_published_memory``).
    """

    __slots__ = ("_entries", "cap")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        # An OrderedDict, not a dict: a dict whose front was deleted makes
        # next(iter(...)) skip every dead slot (O(n) per eviction: 27 us against 1 us at
        # 100,000 uuids, measured).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._entries

    def isdisjoint(self, uuids: Iterable[str]) -> bool:
        """Whether none of ``uuids`` was published (as far as memory goes)."""
        return self._entries.keys().isdisjoint(uuids)

    def get(self, uuid: str) -> Remembered | None:
        """What is remembered of published ``uuid`` (unpacked if the fast path packed it)."""
        entries = self._entries
        entry = entries.get(uuid)
        if isinstance(entry, bytes):
            unpacked = entries[uuid] = _unpack_memory(entry)
            return unpacked
        return entry

    def _make_room(self) -> None:
        entries = self._entries
        while len(entries) >= self.cap:
            entries.popitem(last=False)

    def remember_packed(self, uuid: str, packed: bytes) -> None:
        """Remember a tree the native fast path published (its ids, packed)."""
        self._make_room()
        self._entries[uuid] = packed

    def remember_tree(
        self, uuid: str, begins: Iterable[str], ends: Iterable[str], atomics: Iterable[Any]
    ) -> None:
        """Remember a tree the reference path published; a second tree of a uuid adds up."""
        # Tuples of strings are not tracked by the cycle collector: cheap to keep many.
        memory = (tuple(begins), tuple(ends), tuple(atomics))
        self._make_room()
        before = self.get(uuid)
        if before is not None:  # a second tree of one uuid: remember both
            merged = _Done(*before)
            merged.update(*memory)
            self._entries[uuid] = merged
        else:
            self._entries[uuid] = memory

    def remember_late(self, uuid: str, clazz: str, eid: str | None, key: Any) -> None:
        """Add one late event to what is remembered of published ``uuid`` (the rare path)."""
        done = self.get(uuid)
        if type(done) is tuple:
            done = self._entries[uuid] = _Done(*done)
        assert isinstance(done, _Done)
        if clazz == BEGIN:
            done.begins.add(eid)
        elif clazz == END:
            done.ends.add(eid)
        else:
            done.atomics.add(key)
