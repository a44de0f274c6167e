"""Who may read the monitoring port: the viewer, its API and live stream, and ``/metrics``.

**When a token is required** (:func:`auth_required`): whenever ``viewer_tokens`` are set,
wherever the port listens (asking for viewer tokens is asking for a login); and when
``tokens`` are set and ``mon_host`` is not a loopback address (:func:`is_loopback`). With
``tokens`` only and the default ``mon_host`` (127.0.0.1) the port stays open, as before:
only the machine itself reaches it. Any ingest token also opens the monitoring port; a
viewer token opens only this port (the listener never takes it), so it cannot send logs.
``/ecv`` always stays open: a load balancer's health check carries no secret. A port open
on a non-loopback address is named in one warning at start (:func:`open_warning`).

**How a token is presented:**

- ``Authorization: Bearer <token>`` on any request (``async-logging tail --token``,
  Prometheus' ``authorization`` scrape option, scripts);
- in a browser, a sign-in cookie. The login form (``POST /ui/login``), or a link
  ``/ui/?token=<token>``, checks the token and answers 303 to the page's clean URL with the
  cookie :data:`COOKIE` (HttpOnly, SameSite=Strict, Path=/), so the token stays neither in
  the address bar nor in the history; the page's API calls and its live stream carry the
  cookie. The cookie holds no token: it is the time it was issued and an HMAC-SHA256 of
  that time and the token, under a key drawn when the server starts. It is good for
  :data:`SESSION_MAX_AGE` seconds, or until the server restarts or the token is removed.

**A refusal** is 401 with ``{"error": reason, "detail": ...}`` and ``WWW-Authenticate:
Bearer`` (the login page, for ``/ui``), counted in ``async_logging_auth_failures_total``
by endpoint (``ui``, ``api``, ``live``, ``metrics``, ``login``, ``other``) and reason
(``unauthorized``: none given; ``bad_token``; ``bad_session``: a cookie this server did not
issue; ``expired``; ``origin``, ``too_large``, ``bad_form``: a refused login form). Tokens
are compared in constant time (:func:`~async_logging.server.guard.check_access`) and never
logged.

The monitoring port speaks plain HTTP: a token crossing a network someone else can read
needs a TLS proxy in front of it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..exceptions import UsageError
from .guard import Refusal, check_access
from .viewer import SECURITY_HEADERS, UI_DIR

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = [
    "AUTH_FAILURES",
    "CHECK_REASONS",
    "COOKIE",
    "MAX_SIGN_IN_BYTES",
    "MAX_TOKEN_LENGTH",
    "SESSION_MAX_AGE",
    "SIGN_IN_REASONS",
    "AuthFailures",
    "MonitorAuth",
    "auth_required",
    "endpoint_of",
    "is_loopback",
    "login_page",
    "open_warning",
]

log = logging.getLogger("async_logging.server")

#: Seconds a sign-in cookie is good for (then the login page shows again).
SESSION_MAX_AGE: Final = 12 * 3600
#: Longest token read from a link or the login form; a longer one is refused unread.
MAX_TOKEN_LENGTH: Final = 1024
#: Largest login form body (413 past it, counted ``too_large``).
MAX_SIGN_IN_BYTES: Final = 4096
#: The sign-in cookie's name.
COOKIE: Final = "async_logging_viewer"
#: How far ahead of the server's clock a cookie's issue time may be (clock steps back).
_CLOCK_SLACK: Final = 60
#: Paths that never ask for a token: the health check, the login form and its stylesheet
#: (the package's own CSS, no data), and ``/``, which only redirects to the page.
_OPEN: Final = frozenset({"/ecv", "/ui/login", "/ui/style.css", "/"})

#: Why a request to a protected path is refused (:meth:`MonitorAuth.check`; a ``?token=``
#: link: ``bad_token``).
CHECK_REASONS: Final = ("unauthorized", "bad_token", "bad_session", "expired")
#: Why the login form is refused (:meth:`MonitorAuth.handle_sign_in`).
SIGN_IN_REASONS: Final = ("origin", "too_large", "bad_form", "bad_token")
#: Every (endpoint, reason) ``async_logging_auth_failures_total`` counts, exported at 0
#: from the start: the endpoints of :func:`endpoint_of` with :data:`CHECK_REASONS`, the
#: login form with :data:`SIGN_IN_REASONS`.
AUTH_FAILURES: Final = tuple(
    (endpoint, reason)
    for endpoint in ("ui", "api", "live", "metrics", "other")
    for reason in CHECK_REASONS
) + tuple(("login", reason) for reason in SIGN_IN_REASONS)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches only this machine: 127.0.0.0/8, ``::1`` (also
    as ``::ffff:127.x.y.z``) or ``localhost``.

    Any other name is taken as reachable from elsewhere (a name may resolve anywhere), and
    so is ``""`` or ``0.0.0.0`` (every address).
    """
    name = host.strip().lower().removesuffix(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name.partition("%")[0])  # fe80::1%eth0: the zone apart
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def auth_required(config: ServerConfig) -> bool:
    """Whether the monitoring port asks for a token (see the module's docstring)."""
    if config.viewer_tokens:
        return True
    return bool(config.tokens) and not is_loopback(config.mon_host)


def open_warning(host: str, *, required: bool, viewer: bool) -> str | None:
    """The warning line for a monitoring port listening on ``host`` without a token, or None
    when it asks for one or listens on a loopback address.

    Args:
        host: the address the monitoring port listens on.
        required: whether it asks for a token.
        viewer: whether it serves the viewer of a store (stored logs).
    """
    if required or is_loopback(host):
        return None
    what = "/metrics, the viewer /ui/ and its API /api/ (the stored logs)" if viewer else "/metrics"
    return (
        f"the monitoring port listens on {host or 'every address'} "
        f"without a token: {what} open to anyone who can reach it "
        "(set viewer_tokens or tokens, or mon_host 127.0.0.1)"
    )


def endpoint_of(path: str) -> str | None:
    """The endpoint label a path's refusals are counted under; None for the open paths."""
    if path in _OPEN:
        return None
    if path == "/metrics":
        return "metrics"
    if path == "/api/live":
        return "live"
    if path.startswith("/api/"):
        return "api"
    if path == "/ui" or path.startswith("/ui/"):
        return "ui"
    return "other"


class MonitorAuth:
    """The monitoring port's tokens and sign-in cookies, and the middleware that checks them.

    Args:
        tokens: the tokens accepted (viewer tokens and ingest tokens).
        required: whether requests must present one; False lets every request through.
        clock: the current time in seconds since the epoch (injected for tests).
        max_age: seconds a sign-in cookie is good for.

    Attributes:
        failures: refused requests by (endpoint, reason).

    Raises:
        UsageError: a token is required and there is none to accept.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        required: bool = False,
        clock: Callable[[], float] = time.time,
        max_age: int = SESSION_MAX_AGE,
    ) -> None:
        self.tokens = tuple(tokens)
        if required and not self.tokens:
            raise UsageError("a monitoring port that requires a token needs tokens")
        self.required = required
        self.clock = clock
        self.max_age = max_age
        self.failures: Counter[tuple[str, str]] = Counter()
        self._key = secrets.token_bytes(32)  # new at every start: old cookies then fail

    @classmethod
    def for_config(cls, config: ServerConfig) -> MonitorAuth:
        """The monitoring port's auth as the server's options set it."""
        return cls(config.viewer_tokens + config.tokens, required=auth_required(config))

    # -- sans-I/O ----------------------------------------------------------------------------

    def valid(self, token: str) -> bool:
        """Whether ``token`` is one of the tokens (constant time, as the listener compares)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return False
        # The listener's comparison; a token given in a query is read by its WebSocket path.
        return check_access({}, {"token": token}, self.tokens, (), websocket=True) is None

    def check(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> Refusal | None:
        """Why a request may not read the monitoring port, or None when it may.

        An ``Authorization`` header is checked when there is one; otherwise the sign-in
        cookie.
        """
        if not self.required:
            return None
        if "Authorization" in headers:
            return check_access(headers, {}, self.tokens, (), websocket=False)
        cookie = cookies.get(COOKIE)
        if cookie:
            return self._check_session(cookie)
        return Refusal(
            401,
            "unauthorized",
            "a token is required: Authorization: Bearer <token> (in a browser: sign in at /ui/)",
        )

    def session(self, token: str) -> str:
        """A sign-in cookie's value for ``token`` (a valid one), issued now."""
        issued = int(self.clock())
        return f"{issued}.{self._mac(issued, token)}"

    def _mac(self, issued: int, token: str) -> str:
        message = b"%d\0%b" % (issued, token.encode("utf-8", "surrogateescape"))
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _check_session(self, value: str) -> Refusal | None:
        stamp, _, mac = value.partition(".")
        if (
            not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12 and mac.isascii())
            or len(mac) != 64
        ):
            return Refusal(401, "bad_session", "the sign-in cookie is not valid: sign in again")
        issued = int(stamp)
        age = self.clock() - issued
        if not -_CLOCK_SLACK <= age < self.max_age:
            return Refusal(401, "expired", "the sign-in has expired: sign in again")
        given = mac.encode()
        ok = False
        for token in self.tokens:  # every one, so the time taken does not say which matched
            ok |= hmac.compare_digest(given, self._mac(issued, token).encode())
        if not ok:
            return Refusal(
                401,
                "bad_session",
                "the sign-in is not valid (the server restarted?): sign in again",
            )
        return None

    # -- the aiohttp shell -------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Mount the login form's target (``POST /ui/login``) and the middleware."""
        if self.required:
            app.middlewares.append(self.middleware)
            app.router.add_post("/ui/login", self.handle_sign_in)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let a request through when it may read the port; refuse it otherwise."""
        endpoint = endpoint_of(request.path)
        if endpoint is None:
            return await handler(request)
        if endpoint == "ui" and "token" in request.query:
            return self._sign_in_link(request)
        refusal = self.check(request.headers, request.cookies)
        if refusal is None:
            return await handler(request)
        return self._refuse(request, endpoint, refusal)

    def _sign_in_link(self, request: web.Request) -> web.Response:
        """``/ui/...?token=``: sign in, then go to the same URL without the token."""
        token = request.query.get("token", "")
        if not self.valid(token):
            return self._refuse(request, "ui", Refusal(401, "bad_token", "the token is not valid"))
        rest = [(k, v) for k, v in request.query.items() if k != "token"]
        return self._signed_in(request, token, str(request.rel_url.with_query(rest)))

    async def handle_sign_in(self, request: web.Request) -> web.Response:
        """``POST /ui/login`` (the login form): sign in, then go to the page."""
        if not _same_origin(request):
            refusal = Refusal(403, "origin", "the login form was posted from another site")
            return self._refuse(request, "login", refusal)
        length = request.content_length
        if length is None or length > MAX_SIGN_IN_BYTES:
            detail = f"a login form is at most {MAX_SIGN_IN_BYTES} bytes, with its length"
            return self._refuse(request, "login", Refusal(413, "too_large", detail))
        try:
            token = (await request.post()).get("token")
        except ValueError:  # a multipart body without its boundary, and the like
            refusal = Refusal(400, "bad_form", "the login form could not be read")
            return self._refuse(request, "login", refusal)
        if not isinstance(token, str) or not self.valid(token):
            return self._refuse(
                request, "login", Refusal(401, "bad_token", "the token is not valid")
            )
        return self._signed_in(request, token, "/ui/")

    def _signed_in(self, request: web.Request, token: str, location: str) -> web.Response:
        """303 to ``location`` with a sign-in cookie for ``token`` (checked by the caller)."""
        resp = web.Response(
            status=303,
            headers={"Location": location, "Cache-Control": "no-store", **_NO_REFERRER},
        )
        resp.set_cookie(
            COOKIE,
            self.session(token),
            max_age=self.max_age,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure or None,
        )
        return resp

    def _refuse(self, request: web.Request, endpoint: str, refusal: Refusal) -> web.Response:
        """The answer to a refused request, counted (and logged unless no token was given)."""
        self.failures[(endpoint, refusal.reason)] += 1
        if refusal.reason != "unauthorized":  # a browser's first visit is not worth a line
            log.warning(
                "monitoring port: refused %s from %s: %s",
                request.path,
                request.remote,
                refusal.detail,
            )
        if endpoint in ("ui", "login"):
            message = "" if refusal.reason == "unauthorized" else refusal.detail
            return login_page(message, refusal.status)
        resp = web.Response(
            status=refusal.status,
            body=orjson.dumps({"error": refusal.reason, "detail": refusal.detail}),
            content_type="application/json",
        )
        if refusal.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="async-logging"'
        return resp


_NO_REFERRER: Final = {"Referrer-Policy": "no-referrer"}


def _same_origin(request: web.Request) -> bool:
    """Whether a form post comes from this port's own page (login CSRF).

    Browsers say so in ``Sec-Fetch-Site``; older ones in ``Origin``, which is ``null`` under
    the page's ``no-referrer`` policy (not told apart: let through).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin in (None, "null", f"{request.scheme}://{request.host}")


@functools.cache
def _login_template() -> str:
    return (UI_DIR / "login.html").read_text(encoding="utf-8")


def login_page(message: str, status: int = 401) -> web.Response:
    """The login page, saying ``message`` (escaped) above the form."""
    body = _login_template().replace("{{message}}", html.escape(message))
    resp = web.Response(
        status=status, text=body, content_type="text/html", headers=SECURITY_HEADERS
    )
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="async-logging"'
    return resp


class AuthFailures(Collector):
    """``async_logging_auth_failures_total{endpoint, reason}`` from a :class:`MonitorAuth`."""

    def __init__(self, auth: MonitorAuth) -> None:
        self._auth = auth

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "async_logging_auth_failures",
            "Requests to the monitoring port refused for want of a valid token.",
            labels=["endpoint", "reason"],
        )
        counts = dict.fromkeys(AUTH_FAILURES, 0) | self._auth.failures
        for (endpoint, reason), n in sorted(counts.items()):
            family.add_metric([endpoint, reason], n)
        yield family
