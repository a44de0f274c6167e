"""Reassembly past one machine, over NATS JetStream (docs/design.md §8).

Three kinds of node share two streams:

.. code-block:: text

    clients ──▶ ingest nodes (serve --bus)         events stream ALOG_EVENTS
                map, split by partition  ──────▶   alog.events.<p>  (work queue)
                ack the client once stored               │ one durable consumer
                                                         ▼ per partition
                reassemblers (reassemble --member K/N)   LogBuffer per partition
                ack a message once its trees are stored  │
                                                         ▼
                                                   trees stream ALOG_TREES
                                                   alog.trees.<kind> (limits: age, size)
                                                         │ a durable consumer per sink
                                                         ▼
                sinks (sink)  ──▶ the publishers of serve: JSON lines, store and viewer, OTLP

JetStream holds the data, its order and the acks; the processes keep no state of their own
that a crash could lose. The package, file by file:

- :mod:`.partition`: partitions of uuids, message ids, ``--member`` and ``--partitions``;
- :mod:`.ledger`: when a reassembler may ack a message (sans-I/O);
- :mod:`.records`: published records as trees-stream messages, and back (sans-I/O);
- :mod:`.jetstream`: settings, connecting, the streams, pipelined publishes;
- :mod:`.ingest`: :class:`BusIngest`, the ingest node's seam behind the listener;
- :mod:`.reassembler`: :class:`Reassembler`, the ``reassemble`` node;
- :mod:`.sink`: :class:`TreesConsumer`, the ``sink`` node's listener.

nats-py is imported only when a node connects: without ``--bus`` nothing here runs.
"""

from .ingest import BusIngest
from .jetstream import EVENTS_STREAM, TREES_STREAM, BusLink, BusSettings, BusUnavailable
from .ledger import AckLedger
from .partition import parse_member, parse_partitions, partition_of
from .reassembler import Reassembler
from .sink import TreesConsumer

__all__ = [
    "EVENTS_STREAM",
    "TREES_STREAM",
    "AckLedger",
    "BusIngest",
    "BusLink",
    "BusSettings",
    "BusUnavailable",
    "Reassembler",
    "TreesConsumer",
    "parse_member",
    "parse_partitions",
    "partition_of",
]
