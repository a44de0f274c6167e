"""LogBuffer: the sans-I/O reassembly engine (docs/design.md §3).

Feed it mapped or raw log maps, get back the records to publish. It does no I/O, starts no
timers and reads the time only through the clock it is given, so it can sit behind a
websocket listener, an HTTP handler, a queue consumer or a test with no sockets.

Contract (docs/design.md §3):

- a top-level (``parent == "0"``) ``atomicEvent`` / ``heartbeat``, or any event with no
  uuid, is published at once as a stand-alone record;
- every other event is held in the *group* of its uuid; a transaction is a ``begin`` and an
  ``end`` with the same ``event`` id, its children are the events whose ``parent`` is that id;
- a group is published once it has a root and every transaction referenced in it (as a
  ``begin``, an ``end`` or a ``parent``) has both its ``begin`` and its ``end``. Inside one
  :meth:`LogBuffer.feed_many` batch the check runs after the whole batch, so any order of
  the batch gives the same tree; ``settle`` (seconds, default 0) keeps a closed group open
  that much longer for events that arrive later over other connections;
- an incomplete group is published, never dropped: after ``clean_duration * clean_cycles``
  seconds without a new event (``timeout``), when a cap pushes it out (``evicted``) or on
  :meth:`LogBuffer.flush_all` (``shutdown``), with ``complete: false`` and ``reason``;
- duplicates (same uuid, clazz, event, parent, timestamp and content) are dropped; a
  second ``begin``/``end`` with the same id but other content is published on its own
  flagged ``conflict``; children whose parent never came are kept under the root flagged
  ``orphan``; parent cycles are cut (``cycle``); trees deeper than ``max_depth`` are cut
  into fragments (``depth_cut``); an event for a tree already published is published on
  its own flagged ``late``.

Published records are the mapped event maps themselves, with ``clazz`` replaced by
``kind`` (``transaction``, ``atomicEvent``, ``heartbeat``); transactions also carry
``children``, ``complete``, ``duration`` and ``status`` (``"-1"`` when none was sent).

The package, file by file:

- :mod:`.engine`: :class:`LogBuffer` (the rules, in Python: the oracle), its
  :class:`BufferLimits`, and how trees are built;
- :mod:`.native`: the native fast path's contract (a MessagePack frame of whole trees in,
  the engine's JSON lines out) and the checks of the engine's state it needs;
- :mod:`.memory`: what is remembered of published trees (duplicates, late events).

The engine knows nothing of the sinks: what it publishes goes to the caller, which hands
it to the publishers (:mod:`async_logging.server.pipeline`).
"""

from .engine import BufferLimits, Fed, LogBuffer, Record, wall_clock_ms
from .native import Prepared, Reassembled

__all__ = [
    "BufferLimits",
    "Fed",
    "LogBuffer",
    "Prepared",
    "Reassembled",
    "Record",
    "wall_clock_ms",
]
