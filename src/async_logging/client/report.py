"""How the client speaks about its own problems: once per burst, with the reason, no secret.

Every line goes to the ``async_logging.client`` logger, whose records
:class:`~async_logging.client.LogHandler` never sends (no feedback loop).

- :class:`Reporter` (no I/O, an injected clock) decides when a problem that keeps happening
  (the proxy unreachable, events dropped, frames refused) is worth a line: at its first
  occurrence, then at most once every :data:`REPORT_EVERY` seconds while it lasts, each
  time with how many occurrences the silence hid, and once more when the caller says it
  is over.
- :func:`safe_url` and :func:`describe` are all a log line shows of a URL and of an error:
  no user info, no query string (a ``?token=`` travels there), and never a request's
  headers (aiohttp's ``repr`` of a refused handshake holds them, ``Authorization``
  included).
- :class:`Scrub`, a filter on the ``async_logging.client`` logger, is the last line of
  defence: a secret registered with :func:`add_secret` (a client's token, a URL's password)
  is replaced by ``***`` in every record of that logger, its traceback included, and so is
  the user info of any URL in it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from yarl import URL

__all__ = [
    "MIN_SECRET_LENGTH",
    "REPORT_EVERY",
    "SCRUB",
    "Report",
    "Reporter",
    "Scrub",
    "add_secret",
    "describe",
    "safe_url",
    "scrub",
]

#: Seconds between two lines about the same problem while it lasts (the lines in between
#: are counted and the next one says how many it hid).
REPORT_EVERY: Final = 60.0
#: Secrets shorter than this are not scrubbed from log lines: replacing a two-letter token
#: everywhere would garble every line (such a token is no secret anyway).
MIN_SECRET_LENGTH: Final = 4
#: What replaces a secret in a log line.
MASK: Final = "***"
#: The user info of a URL written in text (``scheme://user:password@``).
_USERINFO: Final = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")


@dataclass(frozen=True, slots=True)
class Report:
    """What to say about a problem now.

    Attributes:
        first: whether this is the first line of the burst.
        count: occurrences since the burst began.
        hidden: occurrences since the previous line of this burst (this one included).
        seconds: since the burst began.
    """

    first: bool
    count: int
    hidden: int
    seconds: float

    def note(self, unit: str) -> str:
        """A suffix for a repeated line: how much was hidden since the previous one."""
        if self.first:
            return ""
        return (
            f" [{self.hidden} {unit} since the last report; {self.count} in {self.seconds:.0f} s]"
        )


@dataclass(slots=True)
class _Burst:
    began: float
    last: float
    reported: float
    count: int
    unreported: int = 0


class Reporter:
    """Throttles the lines about recurring problems, one burst per problem key.

    Used by one thread only (the sender's).

    Args:
        clock: monotonic seconds (inject one to test without sleeping).
        every: seconds between two lines about the same ongoing problem.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, every: float = REPORT_EVERY
    ) -> None:
        self.clock = clock
        self.every = every
        self._bursts: dict[str, _Burst] = {}

    def hit(self, key: str, n: int = 1) -> Report | None:
        """Count ``n`` occurrences of problem ``key``.

        Returns:
            What to say when a line is due (the first occurrence of a burst, or the first
            one ``every`` seconds after the previous line); ``None`` to stay silent (the
            occurrences are counted and the next line says how many).
        """
        now = self.clock()
        b = self._bursts.get(key)
        if b is None:
            self._bursts[key] = _Burst(now, now, now, n)
            return Report(True, n, n, 0.0)
        b.last = now
        b.count += n
        b.unreported += n
        if now - b.reported < self.every:
            return None
        hidden, b.unreported, b.reported = b.unreported, 0, now
        return Report(False, b.count, hidden, now - b.began)

    def quiet_for(self, key: str) -> float | None:
        """Seconds since the last occurrence of ``key``; ``None`` when no burst is open."""
        b = self._bursts.get(key)
        return None if b is None else self.clock() - b.last

    def end(self, key: str) -> Report | None:
        """Problem ``key`` is over: close its burst.

        Returns:
            The burst's totals (``hidden``: occurrences since its last line), or ``None``
            when none was open.
        """
        b = self._bursts.pop(key, None)
        if b is None:
            return None
        return Report(False, b.count, b.unreported, self.clock() - b.began)


# --------------------------------------------------------------------------- what lines show


def safe_url(url: str | URL) -> str:
    """``url`` as a log line may show it: without user info, query string or fragment."""
    try:
        u = URL(url) if isinstance(url, str) else url
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unparsable URL>"


def describe(exc: BaseException | None) -> str:
    """``exc`` as a log line may show it: its class and message, never a request's headers.

    aiohttp's response errors (a refused WebSocket handshake among them) carry the request,
    headers included, in their ``repr``: they are described by status and URL only.
    """
    if exc is None:
        return "no error seen"
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        info = getattr(exc, "request_info", None)
        where = f" from {safe_url(info.real_url)}" if info is not None else ""
        return f"{name}: HTTP {exc.status} {exc.message}{where}"
    text = scrub(str(exc))
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------- the safety net


class Scrub(logging.Filter):
    """Removes secrets from the records of the logger it is added to (see :func:`scrub`).

    The message is formatted here (these records are rare: warnings about problems) and a
    traceback is formatted into ``exc_text``, both scrubbed. A record this cannot format is
    passed on untouched, for the handler to report as usual.

    Attributes:
        secrets: the strings replaced by ``***`` (see :func:`add_secret`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        """Scrub ``secret`` from now on (any thread)."""
        with self._lock:
            if secret not in self.secrets:
                # Longest first, so a secret containing another is masked whole. Replaced
                # whole: readers never lock.
                self.secrets = tuple(sorted((*self.secrets, secret), key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """``text`` without the user info of its URLs and without any of :attr:`secrets`."""
        text = _USERINFO.sub(r"\1", text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):  # a bad format string: the handler says so
            msg = record.getMessage()
            clean = self.scrub(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[0] is not None:
                if not record.exc_text:
                    record.exc_text = _FORMATTER.formatException(record.exc_info)
                record.exc_text = self.scrub(record.exc_text)
        return True


_FORMATTER: Final = logging.Formatter()
#: The filter on the ``async_logging.client`` logger (records of its child loggers pass
#: only through their own filters: the client logs on this one only).
SCRUB: Final = Scrub()
logging.getLogger("async_logging.client").addFilter(SCRUB)


def add_secret(secret: str | None) -> None:
    """Never let ``secret`` appear in a line of the client's logger (see :class:`Scrub`).

    Secrets shorter than :data:`MIN_SECRET_LENGTH` are ignored.
    """
    if secret and len(secret) >= MIN_SECRET_LENGTH:
        SCRUB.add(secret)


def scrub(text: str) -> str:
    """``text`` without the user info of its URLs and without any registered secret."""
    return SCRUB.scrub(text)
