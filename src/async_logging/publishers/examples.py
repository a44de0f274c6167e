"""A worked example of a custom publisher: CAL-like text lines.

This is the code shown in the :mod:`async_logging.publishers.base` docstring (a test keeps
the two identical), the Python counterpart of the seed's ``CalPublisher``: a publisher
"could be as simple as log file appender" (seed README). It writes one line per node of a
published record, in the spirit of eBay CAL's text format (tabs shown as spaces):

.. code-block:: text

    t22:13:20.00  URL   /checkout
      t22:13:20.01  DB    select
        E22:13:20.02  SQL   rows    0   msg=3 rows
      T22:13:20.04  DB    select  0   30
      A22:13:20.05  API   pay     1   60  reason=timeout
      E22:13:20.11  INFO  done    0
    T22:13:20.12  URL   /checkout   0   120
    H22:13:21.00  HB    cpu     0   msg=load=0.5

Each line starts with a class letter: ``t`` and ``T`` open and close a transaction with
children, ``A`` is a transaction without children, ``E`` an atomic event, ``H`` a
heartbeat. Fields are tab-separated: the letter glued to the UTC time ``HH:MM:SS.cc``
(for ``T``, the end time), type, name, status, duration in ms (transactions only) and data
``msg=...&reason=...`` (``reason`` on incomplete transactions). Nested nodes are indented
by two spaces per level.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TextIO

from ..buffer import Record
from .base import BasePublisher

__all__ = ["CalTextPublisher"]


class CalTextPublisher(BasePublisher):
    """Write each record as CAL-like text lines (t/T, A, E, H) to a text stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def transaction(self, record: Record) -> None:
        self.stream.write("".join(self.lines(record)))

    atomic_event = heartbeat = transaction

    def flush(self) -> None:
        self.stream.flush()

    def lines(self, node: Record, depth: int = 0) -> Iterator[str]:
        """The text lines of ``node`` and, recursively, of its children."""
        pad, kind, ts = "  " * depth, node.get("kind"), node.get("timestamp", 0)
        head = f"{node.get('type', '')}\t{node.get('name', '')}"
        data = "&".join(f"{k}={node[k]}" for k in ("msg", "reason") if k in node)
        status, duration = node.get("status", "0"), node.get("duration", 0)
        if kind != "transaction":
            code = "H" if kind == "heartbeat" else "E"
            yield f"{pad}{code}{self.clock(ts)}\t{head}\t{status}\t{data}\n"
        elif not node.get("children"):
            yield f"{pad}A{self.clock(ts)}\t{head}\t{status}\t{duration}\t{data}\n"
        else:
            yield f"{pad}t{self.clock(ts)}\t{head}\n"
            for child in node["children"]:
                yield from self.lines(child, depth + 1)
            end = self.clock(ts + duration)
            yield f"{pad}T{end}\t{head}\t{status}\t{duration}\t{data}\n"

    @staticmethod
    def clock(ms: int) -> str:
        """``ms`` since the epoch as CAL's UTC ``HH:MM:SS.cc``."""
        hms = time.strftime("%H:%M:%S", time.gmtime(ms // 1000))
        return f"{hms}.{ms % 1000 // 10:02d}"
