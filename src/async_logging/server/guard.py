"""Who may send, and how fast: shared tokens, an Origin allow-list, a per-connection rate.

Sans-I/O helpers used by the listener (the refusal is mapped to an HTTP status there):

- :func:`check_access` reads a request's headers and query: ``Authorization: Bearer <token>``
  (or ``?token=`` for WebSocket clients that cannot set headers, such as browsers) against
  the configured tokens, compared in constant time; and, for browser WebSockets, the
  ``Origin`` header against the allow-list (the 2013 original accepted every origin).
- :class:`TokenBucket` spreads a connection's events over time: when a connection sends
  faster than ``rate_limit`` events/s, the listener stops reading it for the time the bucket
  says (TCP pushes back on the client); nothing is dropped.
- :class:`RequestWatch` is the slow-request guard's view of one connection: the listener
  tells it when a request's head has arrived and when its handling ends, and asks it every
  ``request_timeout`` seconds whether the connection has earned its keep (slow-loris).
- :class:`InflightBudget` bounds the bytes of bodies and frames held at once across every
  connection (``max_inflight_bytes``): the listener takes from it before it reads a body or
  a frame and gives back once the batch is fed; past it the body or frame is refused.
- :class:`FrameScan` reads the heads of a client's WebSocket frames (RFC 6455 §5.2) from
  the raw byte stream, before aiohttp's reader sees them: whether each frame is masked (a
  client must mask every frame), how big it is, and whether one has been arriving for a
  whole ``request_timeout`` period.
- :class:`LogThrottle` lets one log line through per interval and counts the ones it held
  back (a flood of accept errors must not become a flood of tracebacks).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final, NamedTuple

__all__ = [
    "ACCESS_REASONS",
    "FrameHead",
    "FrameScan",
    "InflightBudget",
    "LogThrottle",
    "Refusal",
    "RequestWatch",
    "TokenBucket",
    "check_access",
]


#: Every reason :func:`check_access` refuses a request with (counted by the listener in
#: ``connections_refused{reason}``, by the monitoring port in ``auth_failures``).
ACCESS_REASONS: Final = ("origin", "unauthorized", "bad_token")


class Refusal(NamedTuple):
    """Why a request is refused: HTTP status, a reason label (metrics) and a detail."""

    status: int
    reason: str
    detail: str


def _bearer(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def check_access(
    headers: Mapping[str, str],
    query: Mapping[str, str],
    tokens: tuple[str, ...],
    allowed_origins: tuple[str, ...],
    *,
    websocket: bool,
) -> Refusal | None:
    """Return why a request may not send logs, or None when it may.

    Args:
        headers: the request headers (case-insensitive mapping).
        query: the query parameters.
        tokens: accepted shared tokens; empty means no token is required.
        allowed_origins: accepted ``Origin`` values (browsers send one on WebSockets and
            cross-site posts); empty means any. Requests without ``Origin`` pass.
        websocket: whether this is a WebSocket upgrade (``?token=`` and Origin apply).
    """
    if allowed_origins:
        origin = headers.get("Origin")
        if origin is not None and origin not in allowed_origins:
            return Refusal(403, "origin", f"origin {origin!r:.100} is not allowed")
    if tokens:
        given = _bearer(headers, query if websocket else {})
        if given is None:
            return Refusal(401, "unauthorized", "a token is required (Authorization: Bearer …)")
        # Compare against every token so the time taken does not say which one was close.
        ok = False
        raw = given.encode("utf-8", "surrogateescape")  # headers may hold any byte
        for token in tokens:
            ok |= hmac.compare_digest(raw, token.encode())
        if not ok:
            return Refusal(401, "bad_token", "the token is not valid")
    return None


class TokenBucket:
    """A token bucket: ``rate`` events/s on average, bursts up to ``burst`` events.

    Args:
        rate: events per second (> 0).
        burst: bucket size; defaults to one second's worth.
        now: the current time in seconds (monotonic), injected for tests.
    """

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.level = self.burst
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        """Spend ``n`` events at time ``now``; return the seconds to wait before reading on."""
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        self.level -= n
        if self.level >= 0:
            return 0.0
        return -self.level / self.rate


class RequestWatch:
    """Whether one HTTP connection delivers requests: the slow-request guard's decision.

    A connection must deliver a whole request head within each period (``request_timeout``
    seconds) unless a request is being handled (a body being read, a WebSocket being
    served). One slow client could otherwise hold a socket for an hour, sending its headers
    a byte at a time or nothing at all. Sans-I/O: the listener reports :meth:`started` and
    :meth:`finished` and calls :meth:`expired` at the end of every period.
    """

    __slots__ = ("_seen", "events", "handling")

    def __init__(self) -> None:
        self.events = 0  # request heads arrived and requests finished
        self.handling = 0  # requests being handled now
        self._seen = 0  # events at the end of the last period

    def started(self) -> None:
        """A request's head arrived; its handling begins."""
        self.events += 1
        self.handling += 1

    def finished(self) -> None:
        """A request's handling ended (answered, failed or cancelled); the client then has a
        whole period to send its next request."""
        self.events += 1
        self.handling -= 1

    def expired(self) -> bool:
        """End of a period: True when no request began or ended during it and none is being
        handled, i.e. the connection should be closed."""
        if self.events == self._seen and not self.handling:
            return True
        self._seen = self.events
        return False


class InflightBudget:
    """Bytes of bodies and frames held at once, across every connection of one process.

    The listener takes a body's ``Content-Length`` (a chunked body: each chunk as it
    arrives) or a WebSocket frame's length, as its head arrives and before the bytes are
    read, and gives it back once the batch is fed; what does not fit is refused. So many
    large requests at once cannot hold more than ``limit`` bytes between them (each one is
    bounded by ``max_message_bytes`` already).

    Args:
        limit: bytes that may be held at once (``max_inflight_bytes``).
    """

    __slots__ = ("held", "limit", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once (for tests and reports)

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes; False (nothing taken) when that would pass the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        self.peak = max(self.peak, self.held)
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken before."""
        self.held -= n


class FrameHead(NamedTuple):
    """The head of one WebSocket frame, as :class:`FrameScan` read it."""

    offset: int  # where the head starts in the data fed (0 when it began in earlier data)
    fin: bool  # the last frame of its message
    opcode: int  # 0 continuation, 1 text, 2 binary, 8-10 control frames
    masked: bool
    length: int  # payload bytes


#: The longest frame head: 2 bytes, an 8-byte length, a 4-byte masking key.
_MAX_HEAD = 14


class FrameScan:
    """Reads the frame heads of one client's WebSocket byte stream, skipping payloads.

    Sans-I/O: :meth:`feed` takes the bytes as they arrive (any split) and returns the heads
    that completed in them; payloads are skipped by count, never copied, so a frame costs
    a few operations however large it is. :meth:`stalled` is the slow-frame guard's
    decision at the end of each ``request_timeout`` period.
    """

    __slots__ = ("_mark", "_partial", "_skip", "heads")

    def __init__(self) -> None:
        self._partial = b""  # the start of a head split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._mark = -1  # heads read at the last period's end, while a frame was arriving
        self.heads = 0  # frame heads read so far

    @property
    def payload_left(self) -> int:
        """Payload bytes of the last frame whose head was read still to come."""
        return self._skip

    @property
    def busy(self) -> bool:
        """Whether a frame (its head or its payload) is part-way in."""
        return bool(self._skip or self._partial)

    def feed(self, data: bytes) -> list[FrameHead]:
        """The heads completed by ``data`` (the stream's next bytes), in order."""
        heads: list[FrameHead] = []
        pos, end = 0, len(data)
        if self._partial:  # a head split across reads: complete it first
            kept = len(self._partial)
            buf = self._partial + data[:_MAX_HEAD]
            size = _head_size(buf)
            if size == 0 or len(buf) < size:
                self._partial = buf
                return heads
            self._partial = b""
            heads.append(self._head(buf, 0, 0))
            pos = size - kept
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            size = _head_size(data, pos)
            if size == 0 or end - pos < size:
                self._partial = data[pos:]  # wait for the rest of the head
                break
            heads.append(self._head(data, pos, pos))
            pos += size
        return heads

    def _head(self, buf: bytes, at: int, offset: int) -> FrameHead:
        """The head at ``buf[at:]`` (whole); its payload is skipped next."""
        first, second = buf[at], buf[at + 1]
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(buf[at + 2 : at + 4], "big")
        elif length == 127:
            length = int.from_bytes(buf[at + 2 : at + 10], "big")
        self.heads += 1
        self._skip = length
        return FrameHead(offset, bool(first & 0x80), first & 0x0F, bool(second & 0x80), length)

    def stalled(self) -> bool:
        """End of a period: True when a frame was part-way in at the last period's end and
        still is, with no new head since (a frame must arrive whole within one to two
        periods of its head, as a body must within ``request_timeout``)."""
        if not self.busy:
            self._mark = -1
            return False
        if self._mark == self.heads:
            return True
        self._mark = self.heads
        return False


def _head_size(buf: bytes, at: int = 0) -> int:
    """The size of the head starting at ``buf[at]`` (0: not enough bytes to tell)."""
    if len(buf) - at < 2:
        return 0
    second = buf[at + 1]
    length = second & 0x7F
    return (2 if length < 126 else 4 if length == 126 else 10) + (4 if second & 0x80 else 0)


class LogThrottle:
    """At most one log line per ``interval`` seconds; counts the lines held back.

    Args:
        interval: seconds between two lines let through.
    """

    __slots__ = ("_next", "interval", "suppressed")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = float("-inf")
        self.suppressed = 0  # lines held back since the last one let through

    def allow(self, now: float) -> int | None:
        """At time ``now``: None when this line is held back, else how many were held
        back since the last line let through (say so in the line)."""
        if now < self._next:
            self.suppressed += 1
            return None
        held, self.suppressed = self.suppressed, 0
        self._next = now + self.interval
        return held
