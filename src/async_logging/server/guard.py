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
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Refusal", "RequestWatch", "TokenBucket", "check_access"]


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
