"""AckLedger: which messages of one partition a reassembler may ack, and when (design §8).

The rule that makes a crash lose nothing and publish nothing twice: a message is acked
only once every tree with events in it is durable on the trees stream, and the messages of
one tree are acked together, in one burst. The ledger keeps the messages still held:

- a message whose events all went into trees published in the same batch is *free*: the
  caller acks it as soon as that batch's records are durable;
- otherwise it is *held*, by the uuids of its trees: *open* ones (still in the engine)
  and *done* ones (published, durable);
- held messages that share a uuid belong together (a *group*: messages and uuids linked
  through each other). A group is acked when all its uuids are done and every message of it
  was delivered, all at once. So at any moment the unacked messages hold every event of
  every tree that is still open or was published while a message of its group was still
  needed: a replacement that replays them rebuilds those trees whole, and the ones already
  published come out byte for byte as before, a duplicate JetStream drops by message id.

A message holding a done tree beside an open one (*mixed*) keeps the done tree's whole
group unacked. After ``carry_after`` seconds the caller *carries* it: it publishes that
message's events of the open trees again on the partition (a new message, delivered back
later: the engine drops its events as duplicates) and the ledger moves the open trees over
to the copy, which frees the done group. Carrying bounds how long a published tree's
messages stay unacked (below JetStream's duplicate window, so a replay of them is always
dropped) and breaks chains of trees that each hold the next.

Sans-I/O: a message is an opaque ``token`` the caller acks; time comes from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["AckLedger", "Held"]

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Held(Generic[T]):
    """One message the ledger holds.

    Attributes:
        seq: its stream sequence number.
        token: what the caller acks (None: a carried copy not delivered yet).
        open: uuids of open trees with events in it.
        done: uuids of its trees already durable on the trees stream.
        mixed_since: when it first held a done tree beside an open one (None: it does not).
    """

    seq: int
    token: T | None
    open: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    mixed_since: float | None = None


class AckLedger(Generic[T]):
    """The held messages of one partition and the trees that hold them.

    Args:
        carry_after: seconds a mixed message waits before :meth:`due_carries` names it.
    """

    def __init__(self, carry_after: float) -> None:
        self.carry_after = carry_after
        self._held: dict[int, Held[T]] = {}
        self._by_uuid: dict[str, set[int]] = {}
        self._touched: set[int] = set()
        #: Messages carried forward so far.
        self.carries = 0

    @property
    def held(self) -> int:
        """Messages held (not acked), carried copies not delivered yet included."""
        return len(self._held)

    def tokens(self) -> list[T]:
        """Every held message delivered so far (for in-progress acks, or a nak at a stop)."""
        return [h.token for h in self._held.values() if h.token is not None]

    def holds(self, seq: int) -> bool:
        """Whether message ``seq`` is held (a redelivery of it, or a carried copy)."""
        return seq in self._held

    def take(
        self,
        seq: int,
        token: T,
        uuids: Iterable[str],
        is_open: Callable[[str], bool],
        now: float,
    ) -> bool:
        """A message's events were fed: hold it, or say it is free.

        Args:
            seq: its stream sequence.
            token: what acks it (a redelivery replaces the one held).
            uuids: the uuids of its events.
            is_open: whether a uuid's tree is open in the engine after the feed.
            now: the caller's clock, in seconds.

        Returns:
            True when held; False when free: ack it once the records of its batch are
            durable (no tree of it is open, and none is held here).
        """
        held = self._held.get(seq)
        by_uuid = self._by_uuid
        uuids = set(uuids)
        if held is None:
            if not any(u in by_uuid or is_open(u) for u in uuids):
                return False
            held = self._held[seq] = Held(seq, token)
        else:
            uuids |= held.open | held.done
        held.token = token
        for u in uuids:
            if is_open(u):
                held.open.add(u)
                held.done.discard(u)
            else:
                # Closed in this batch (its records durable before published() is called,
                # and nothing is acked before), or before.
                held.open.discard(u)
                held.done.add(u)
            seqs = by_uuid.get(u)
            if seqs is None:
                by_uuid[u] = {seq}
            else:
                seqs.add(seq)
        if held.open and held.done and held.mixed_since is None:
            held.mixed_since = now
        self._touched.add(seq)
        return True

    def published(self, uuids: Iterable[str], now: float) -> list[T]:
        """The trees of ``uuids`` are durable on the trees stream (or were dropped as
        duplicates): mark them done and return the tokens to ack now, together.

        Pass every uuid the engine closed since the last call (trees published, or
        dropped); the groups of messages taken since then are checked too.
        """
        by_uuid = self._by_uuid
        seeds = self._touched
        self._touched = set()
        for u in uuids:
            seqs = by_uuid.get(u)
            if seqs is None:
                continue
            for seq in seqs:
                h = self._held[seq]
                h.open.discard(u)
                h.done.add(u)
                if h.open and h.mixed_since is None:
                    h.mixed_since = now
                seeds.add(seq)
        return self._release(seeds)

    def due_carries(self, now: float) -> list[Held[T]]:
        """Delivered mixed messages that have waited ``carry_after`` seconds: the caller
        publishes their events of the trees in ``open`` again, then calls :meth:`carried`."""
        return [
            h
            for h in self._held.values()
            if h.open
            and h.done
            and h.token is not None
            and h.mixed_since is not None
            and now - h.mixed_since >= self.carry_after
        ]

    def carried(self, held: Held[T], copy_seq: int, now: float) -> list[T]:
        """The events of ``held``'s open trees are durable again as message ``copy_seq``:
        those trees move to the copy (held until delivered), and the tokens of what that
        frees are returned, to ack now."""
        by_uuid = self._by_uuid
        copy = self._held.get(copy_seq) or Held(copy_seq, None)
        self._held[copy_seq] = copy
        for u in held.open:
            seqs = by_uuid[u]
            seqs.discard(held.seq)
            seqs.add(copy_seq)
            copy.open.add(u)
        held.open.clear()
        held.mixed_since = None
        self.carries += 1
        return self._release({held.seq})

    def _release(self, seeds: set[int]) -> list[T]:
        """Ack every group reached from ``seeds`` whose uuids are all done and whose
        messages were all delivered; forget it."""
        held, by_uuid = self._held, self._by_uuid
        out: list[T] = []
        seen: set[int] = set()
        for seed in seeds:
            if seed in seen or seed not in held:
                continue
            group: set[int] = set()
            uuids: set[str] = set()
            todo = [seed]
            ready = True
            while todo:
                seq = todo.pop()
                if seq in group:
                    continue
                group.add(seq)
                h = held[seq]
                if h.open or h.token is None:
                    ready = False
                for u in h.done | h.open:
                    if u not in uuids:
                        uuids.add(u)
                        todo.extend(by_uuid.get(u, ()))
            seen |= group
            if not ready:
                continue
            for seq in group:
                token = held.pop(seq).token
                assert token is not None
                out.append(token)
            for u in uuids:
                by_uuid.pop(u, None)
        return out
