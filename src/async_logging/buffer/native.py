"""The engine's native fast path: its narrow contract, and the checks that stay in Python.

The extension ``async_logging._speedups`` (optional; see :mod:`async_logging.encoded`)
has one function for the engine, ``reassemble``: **a MessagePack frame of whole trees in,
the engine's JSON lines out**, plus what the engine itself must remember (the uuids
published and their ids, packed) and counts. It keeps no state and knows no sink. (Its
other function, ``split``, is the bus ingest's: the same parse and checks, each event's
bytes by partition out; :func:`async_logging.bus.partition.native_split`.) Whatever it is not
sure of, it declines (None), and the frame takes the reference path
(:func:`async_logging.wire.decode_msgpack` and :meth:`LogBuffer.feed_many
<async_logging.buffer.LogBuffer.feed_many>`), which stays the oracle:
``tests/test_fastpath.py`` checks the two byte for byte.

The engine's state is checked here, on the owner's thread (:func:`prepare`): a frame whose
trees are open already (a straggler joins them), were published (a duplicate or a late
event) or would make the open-tree cap evict takes the reference path too.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import Any, Final, Protocol, cast

import orjson

from ..encoded import EncodedRecords, native_module
from ..model import ATOMIC, HEARTBEAT
from ..wire import WireLimits
from .memory import PublishedMemory

__all__ = ["NativeModule", "NativePath", "Prepared", "Reassembled", "limits_tuple", "prepare"]

#: The kind of a transaction record (the engine's too).
TRANSACTION: Final = "transaction"


class Reassembled(Protocol):
    """What ``_speedups.reassemble`` returns for a frame it takes (a named tuple made in C,
    ``async_logging._speedups.Reassembled``)."""

    @property
    def seq(self) -> int | None:
        """The envelope's ``seq``, or None."""

    @property
    def lines(self) -> bytes:
        """The records as JSON lines, in publication order."""

    @property
    def transactions(self) -> int:
        """Transaction records among the lines."""

    @property
    def atomic_events(self) -> int:
        """Stand-alone atomic event records among the lines."""

    @property
    def heartbeats(self) -> int:
        """Heartbeat records among the lines."""

    @property
    def events(self) -> int:
        """Events the frame held (all taken: the fast path refuses none)."""

    @property
    def uuids(self) -> tuple[str, ...]:
        """The uuid of each tree published."""

    @property
    def memories(self) -> tuple[bytes, ...]:
        """For each of :attr:`uuids`, the digests the engine remembers of it, packed
        (see :mod:`.memory`)."""


class NativeModule(Protocol):
    """The extension's whole interface."""

    def reassemble(
        self,
        payload: bytes,
        now: int,
        limits: tuple[int, ...],
        dumps: Callable[[Any], bytes],
        /,
    ) -> Reassembled | None:
        """The frame reassembled, or None: the reference path must take it."""


class Prepared:
    """A MessagePack frame the native fast path reassembled, not yet taken by the engine.

    Made by :meth:`LogBuffer.prepare_msgpack <async_logging.buffer.LogBuffer.prepare_msgpack>`;
    :meth:`LogBuffer.feed_prepared <async_logging.buffer.LogBuffer.feed_prepared>` takes it.
    Between the two the caller may do what must come first (a write-ahead spool) as long as
    the buffer is fed nothing else.

    Attributes:
        seq: the envelope's ``seq``, or None.
        events: how many events the frame held (all taken: the fast path refuses none).
        records: the records to publish, as JSON lines.
        batch: the engine's batch count when it was made (fed nothing since, or refused).
        standalone: stand-alone records (atomic events and heartbeats) among them.
        uuids: the trees published, and ``memories`` what the engine keeps of each.
    """

    __slots__ = ("batch", "events", "memories", "records", "seq", "standalone", "uuids")

    def __init__(
        self,
        batch: int,
        seq: int | None,
        records: EncodedRecords,
        *,
        events: int,
        standalone: int,
        uuids: tuple[str, ...],
        memories: tuple[bytes, ...],
    ) -> None:
        self.batch = batch
        self.seq = seq
        self.records = records
        self.events = events
        self.standalone = standalone
        self.uuids = uuids
        self.memories = memories


class NativePath:
    """The extension bound to one engine's caps (the limits tuple is built once per
    :class:`~async_logging.wire.WireLimits` object).

    Args:
        module: the extension.
        max_depth: the engine's tree depth (``BufferLimits.max_depth``).
        max_events_per_tx: the engine's cap on events per uuid.
        compact: whether records are compact (``BufferLimits.compact``).
    """

    __slots__ = ("_cache", "_module", "compact", "max_depth", "max_events_per_tx")

    def __init__(
        self, module: NativeModule, *, max_depth: int, max_events_per_tx: int, compact: bool
    ) -> None:
        self._module = module
        self.max_depth = max_depth
        self.max_events_per_tx = max_events_per_tx
        self.compact = compact
        self._cache: tuple[WireLimits, tuple[int, ...]] | None = None

    @classmethod
    def load(
        cls, *, max_depth: int, max_events_per_tx: int, compact: bool = False
    ) -> NativePath | None:
        """The fast path, or None when the extension is not there (or turned off)."""
        module = native_module()
        if module is None:
            return None
        return cls(
            cast(NativeModule, module),
            max_depth=max_depth,
            max_events_per_tx=max_events_per_tx,
            compact=compact,
        )

    def reassemble(self, payload: bytes, now: int, limits: WireLimits) -> Reassembled | None:
        """Reassemble ``payload`` (no engine state is read; safe on any thread)."""
        cached = self._cache
        if cached is None or cached[0] is not limits:
            cached = self._cache = (
                limits,
                limits_tuple(limits, self.max_depth, self.max_events_per_tx, self.compact),
            )
        return self._module.reassemble(payload, now, cached[1], orjson.dumps)


def limits_tuple(
    limits: WireLimits, max_depth: int = 0, max_events_per_tx: int = 0, compact: bool = False
) -> tuple[int, ...]:
    """The ``limits`` argument of the extension's functions: the wire limits, then the
    engine's tree limits and ``compact`` (which ``split`` does not read)."""
    return (
        limits.max_message_bytes,
        limits.max_events_per_frame,
        limits.max_depth,
        limits.max_string_length,
        limits.max_keys_per_map,
        limits.max_array_length,
        limits.max_record_bytes,
        max_depth,
        max_events_per_tx,
        int(compact),
    )


def prepare(
    result: Reassembled,
    *,
    batch: int,
    open_uuids: Set[str],
    published: PublishedMemory,
    max_open: int,
) -> Prepared | None:
    """Check a reassembled frame against the engine's state; None: the reference path.

    Args:
        result: what the extension returned.
        batch: the engine's batch count now.
        open_uuids: the uuids of the trees the engine holds open (a keys view).
        published: what the engine remembers of published trees.
        max_open: the engine's cap on open trees.
    """
    uuids = result.uuids
    if uuids:
        # Opening the frame's trees one by one would evict once the cap is reached, even
        # though they all close within the frame (the reference path decides).
        if len(open_uuids) + len(uuids) > max_open:
            return None
        if open_uuids and not open_uuids.isdisjoint(uuids):
            return None
        if not published.isdisjoint(uuids):
            return None
    transactions = result.transactions
    atomics, heartbeats = result.atomic_events, result.heartbeats
    standalone = atomics + heartbeats
    if standalone:
        kinds = {TRANSACTION: transactions, ATOMIC: atomics, HEARTBEAT: heartbeats}
        kinds = {kind: n for kind, n in kinds.items() if n}
    else:
        kinds = {TRANSACTION: transactions} if transactions else {}
    records = EncodedRecords._made(result.lines, kinds, transactions + standalone)
    return Prepared(
        batch,
        result.seq,
        records,
        events=result.events,
        standalone=standalone,
        uuids=uuids,
        memories=result.memories,
    )
