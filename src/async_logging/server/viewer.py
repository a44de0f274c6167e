"""The web viewer on the monitoring port (issue 6): a page and its JSON API.

Routes (mounted on the MonApp, ``mon_port``, next to ``/ecv`` and ``/metrics``):

- ``GET /ui/``: the page (plain HTML, JS and CSS from ``async_logging/ui/``, no build
  step): search, results, a waterfall of one tree, a live tail, a summary table. The
  search is in the page's address (``/ui/?name=/checkout&failures=1#tree=12``), so it can
  be shared and bookmarked and the back button walks through it. ``GET /`` (and
  ``/ui``) redirect to it, a query kept (``/?token=...``: the sign-in link).
- ``GET /api/search``: stored records, newest first. Query parameters: ``uuid``,
  ``type``, ``name`` (a trailing ``*`` makes it a prefix), ``kind``, ``failures``,
  ``incomplete`` (``1``/``true``), ``min_duration`` (ms), ``since``/``until`` (ms since
  the epoch), ``limit`` (1 to :data:`~async_logging.store.reader.SEARCH_MAX_LIMIT`).
  Answers ``{"results": [...]}``.
- ``GET /api/tree/{id}``: one stored record, ``{"id", "row", "record"}`` (404 when gone).
- ``GET /api/summary``: counts, failure rates and p50/p95 durations by type and name;
  ``window`` (seconds, default 3600), ``until`` (ms), ``type``, ``roots``.
- ``GET /api/live``: server-sent events (``text/event-stream``): a ``record`` event per
  stored record that passes the filters (``kind``, ``type``, ``name``, ``failures``,
  ``min_duration``), a ``dropped`` event when this subscriber fell behind and lost some,
  a comment every :data:`LIVE_KEEPALIVE` seconds. The live tail follows the store (new
  rows, every :data:`LIVE_STORE_POLL` seconds while someone watches), so it shows every
  worker's trees, a record seen live is in the store already, and it is off (503) when
  the store is.
- ``GET /api/status``: what the store holds, its follower (``running``, ``lag_records``,
  ``lag_seconds``, ...: the page's header shows the lag) and the live hub's counters.

Errors are JSON ``{"error": reason, "detail": ...}``: 400 for a bad parameter, 404 for a
missing tree, 503 when the store is off or unusable, when a query ran past
:data:`~async_logging.store.reader.QUERY_TIMEOUT`, or when
:data:`~async_logging.server.live.MAX_SUBSCRIBERS` live streams are open already.

The store is read by a :class:`~async_logging.store.reader.StoreReader` in one
thread of the viewer's own, so a slow query never blocks the event loop and queries never
pile up threads. Limits: :data:`MAX_PARAM_LENGTH` characters per parameter; result and
summary sizes as the store bounds them; live queues as the hub bounds them. The viewer
checks no token itself: the monitoring port's middleware does, for the page, the API and
the live stream alike (:mod:`async_logging.server.monauth`: Bearer header or a sign-in
cookie; the live stream, an EventSource, carries the cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import orjson
from aiohttp import web

from ..exceptions import AsyncLoggingError, ConfigError, UsageError
from ..store.reader import (
    QUERY_TIMEOUT,
    SEARCH_DEFAULT_LIMIT,
    SEARCH_MAX_LIMIT,
    SINCE_MAX_ROWS,
    StoreError,
    StoreReader,
)
from ..store.schema import load_body
from .live import HubFull, LiveHub, Subscription, record_filter

if TYPE_CHECKING:
    from .followers import Followers

__all__ = [
    "LIVE_KEEPALIVE",
    "LIVE_POLL",
    "LIVE_STORE_POLL",
    "MAX_PARAM_LENGTH",
    "SECURITY_HEADERS",
    "UI_DIR",
    "Viewer",
]

#: The page's files (served as they are, no build step).
UI_DIR: Final = Path(__file__).resolve().parent.parent / "ui"
#: Longest query-parameter value accepted.
MAX_PARAM_LENGTH: Final = 1024
#: Seconds between keep-alive comments on an idle live stream.
LIVE_KEEPALIVE: Final = 15.0
#: Seconds between checks that a live client is still connected.
LIVE_POLL: Final = 1.0
#: A live client reconnects after this many ms (the SSE ``retry`` field).
LIVE_RETRY_MS: Final = 2000
#: Seconds between two looks for new rows in the store while the live tail is watched.
LIVE_STORE_POLL: Final = 0.25

_UI_FILE = re.compile(r"^[A-Za-z0-9_-]+\.(html|js|css|svg|png|ico)$")
_CONTENT_TYPES: Final = {
    "html": "text/html",
    "js": "text/javascript",
    "css": "text/css",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
}
#: The page loads nothing from elsewhere and runs no inline script: log data is shown with
#: textContent only, and this policy is the second fence against injected markup.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})
_KINDS: Final = frozenset({"transaction", "atomicEvent", "heartbeat"})
_I64: Final = 1 << 63

T = TypeVar("T")


class BadParam(AsyncLoggingError):
    """A query parameter of the viewer's API is malformed (HTTP 400)."""


class Viewer:
    """The viewer's routes and the resources behind them.

    Args:
        store_path: the SQLite store to read, or None when the store is off.
        hub: the live hub to stream from (fed from the store), or None: no live tail.
        live_keepalive: seconds between keep-alive comments on idle live streams.
        query_timeout: seconds a store query may run.
        follower_status: returns the store's follower status (for ``/api/status``).
        live_store_poll: seconds between looks for new rows while the live tail runs.

    Nothing is opened until the first request; :meth:`close` releases it all.
    """

    def __init__(
        self,
        store_path: str | None,
        hub: LiveHub | None,
        *,
        live_keepalive: float = LIVE_KEEPALIVE,
        query_timeout: float = QUERY_TIMEOUT,
        follower_status: Callable[[], dict[str, Any] | None] | None = None,
        live_store_poll: float = LIVE_STORE_POLL,
    ) -> None:
        self.store_path = store_path
        self.hub = hub
        self.live_keepalive = live_keepalive
        self.query_timeout = query_timeout
        self.follower_status = follower_status
        self.live_store_poll = live_store_poll
        self._executor: ThreadPoolExecutor | None = None
        self._reader: StoreReader | None = None
        self._streams: set[Subscription] = set()
        self._closed = False
        self._tail_task: asyncio.Task[None] | None = None
        if hub is not None and store_path:
            hub.when_watched(self._watch_store)

    @classmethod
    def for_followers(cls, followers: Followers | None) -> Viewer:
        """The viewer of a server whose store and live hub ``followers`` runs (or none)."""
        if followers is None:
            return cls(None, None)
        return cls(followers.store_path, followers.hub, follower_status=followers.snapshot)

    def add_routes(self, app: web.Application) -> None:
        """Mount the page and the API on ``app``."""
        app.router.add_get("/", self.handle_ui_redirect)
        app.router.add_get("/ui", self.handle_ui_redirect)
        app.router.add_get("/ui/", self.handle_ui_file)
        app.router.add_get("/ui/{file}", self.handle_ui_file)
        app.router.add_get("/api/search", self.handle_search)
        app.router.add_get("/api/tree/{id}", self.handle_tree)
        app.router.add_get("/api/summary", self.handle_summary)
        app.router.add_get("/api/live", self.handle_live)
        app.router.add_get("/api/status", self.handle_status)
        app.on_shutdown.append(self._on_shutdown)

    async def close(self) -> None:
        """End the live streams, close the store reader and its thread. Idempotent."""
        self._closed = True
        self._end_streams()
        task, self._tail_task = self._tail_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_reader)
            executor.shutdown(wait=True)

    # -- the page --------------------------------------------------------------------------

    async def handle_ui_redirect(self, request: web.Request) -> web.StreamResponse:
        """``/`` and ``/ui``: to the page, with the query (a sign-in link's token too)."""
        query = request.query_string
        raise web.HTTPFound("/ui/" + (f"?{query}" if query else ""))

    async def handle_ui_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("file", "index.html")
        match = _UI_FILE.match(name)
        path = UI_DIR / name
        if match is None or not path.is_file():
            return _error(404, "not_found", f"no such file: {name}")
        resp = web.FileResponse(path, headers=SECURITY_HEADERS)
        resp.content_type = _CONTENT_TYPES[match.group(1)]
        return resp

    # -- the API ---------------------------------------------------------------------------

    async def handle_search(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            kind = _text(q, "kind")
            if kind is not None and kind not in _KINDS:
                raise BadParam(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
            params: dict[str, Any] = {
                "uuid": _text(q, "uuid"),
                "type": _text(q, "type"),
                "name": _text(q, "name"),
                "kind": kind,
                "failures_only": _flag(q, "failures"),
                "incomplete_only": _flag(q, "incomplete"),
                "min_duration": _number(q, "min_duration"),
                "since": _int(q, "since"),
                "until": _int(q, "until"),
                "limit": _int(q, "limit"),
            }
            if params["limit"] is None:
                params["limit"] = SEARCH_DEFAULT_LIMIT
            if not 1 <= params["limit"] <= SEARCH_MAX_LIMIT:
                raise BadParam(f"limit must be between 1 and {SEARCH_MAX_LIMIT}")
        except BadParam as exc:
            return _error(400, "bad_param", str(exc))
        results = await self._query(lambda r: r.search(**params))
        if isinstance(results, web.Response):
            return results
        return _json({"results": results, "limit": params["limit"]})

    async def handle_tree(self, request: web.Request) -> web.Response:
        try:
            tree_id = int(request.match_info["id"])
        except ValueError:
            return _error(400, "bad_param", "a tree id is an integer")
        if not 0 <= tree_id < _I64:
            return _error(404, "not_found", f"no tree {str(tree_id)[:40]}")

        def fetch(reader: StoreReader) -> tuple[dict[str, Any] | None, bytes | None]:
            return reader.row(tree_id), reader.get_raw(tree_id)

        found = await self._query(fetch)
        if isinstance(found, web.Response):
            return found
        row, raw = found
        if row is None or raw is None:
            return _error(404, "not_found", f"no tree {tree_id} (never stored, or expired)")
        body = b'{"id":%d,"row":%b,"record":%b}' % (tree_id, orjson.dumps(row), raw.strip())
        return web.Response(body=body, content_type="application/json")

    async def handle_summary(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            window = _number(q, "window")
            window = 3600.0 if window is None else window
            if not window > 0:
                raise BadParam("window must be a positive number of seconds")
            until = _int(q, "until")
            stype = _text(q, "type")
            roots = _flag(q, "roots")
        except BadParam as exc:
            return _error(400, "bad_param", str(exc))
        result = await self._query(
            lambda r: r.summary(window, until=until, type=stype, roots_only=roots)
        )
        if isinstance(result, web.Response):
            return result
        return _json(result)

    async def handle_status(self, request: web.Request) -> web.Response:
        hub = self.hub
        live: dict[str, Any] = {"enabled": hub is not None}
        if hub is not None:
            live.update(subscribers=hub.subscribers, **hub.stats)
        store: Any = None
        if self.store_path:
            result = await self._query(lambda r: r.status())
            store = result if not isinstance(result, web.Response) else None
        follower = self.follower_status() if self.follower_status is not None else None
        return _json({"store": store, "follower": follower, "live": live})

    async def handle_live(self, request: web.Request) -> web.StreamResponse:
        hub = self.hub
        if hub is None or self._closed:
            return _error(
                503,
                "live_off",
                "the live tail follows the store, which is off (the server's store option is '')",
            )
        q = request.query
        try:
            kinds = q.getall("kind", [])
            for kind in kinds:
                if kind not in _KINDS:
                    raise BadParam(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
            accept = record_filter(
                kinds=kinds,
                type=_text(q, "type"),
                name=_text(q, "name"),
                failures_only=_flag(q, "failures"),
                min_duration=_number(q, "min_duration"),
            )
        except BadParam as exc:
            return _error(400, "bad_param", str(exc))
        try:
            sub = hub.subscribe(accept)
        except HubFull as exc:
            return _error(503, "live_full", str(exc))
        self._streams.add(sub)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await resp.prepare(request)
            await resp.write(b"retry: %d\n: live\n\n" % LIVE_RETRY_MS)
            last_write = time.monotonic()
            while True:
                try:
                    records, lost = await sub.next_batch(LIVE_POLL)
                except EOFError:
                    break
                chunks: list[bytes] = []
                if lost:
                    chunks.append(b'event: dropped\ndata: {"dropped":%d}\n\n' % lost)
                for record in records:
                    chunks.append(b"event: record\ndata: %b\n\n" % _dumps(record))
                now = time.monotonic()
                if not chunks:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break  # the client went away while the stream was idle
                    if now - last_write < self.live_keepalive:
                        continue
                    chunks.append(b": keep-alive\n\n")
                await resp.write(b"".join(chunks))
                last_write = now
            await resp.write_eof()
        except ConnectionResetError:  # the client went away mid-write
            pass
        finally:
            sub.close()
            self._streams.discard(sub)
        return resp

    # -- internals -------------------------------------------------------------------------

    def _watch_store(self) -> None:
        """Someone subscribed to the hub: follow the store, unless that runs already."""
        hub = self.hub
        if hub is None or self._closed:
            return
        if self._tail_task is None or self._tail_task.done():
            self._tail_task = asyncio.get_running_loop().create_task(
                self._tail_store(hub), name="viewer-live"
            )

    async def _tail_store(self, hub: LiveHub) -> None:
        """Hand the rows stored from now on to the hub, while anyone subscribes."""
        last = await self._query(lambda r: r.last_id())
        while isinstance(last, web.Response):  # the store is not there yet, or busy
            await asyncio.sleep(self.live_store_poll)
            if not hub.subscribers or self._closed:
                return
            last = await self._query(lambda r: r.last_id())
        while hub.subscribers and not self._closed:
            rows = await self._query(functools.partial(StoreReader.since, after_id=last))
            if not isinstance(rows, web.Response) and rows:
                last = rows[-1][0]
                hub.publish_many([load_body(body) for _, body in rows])
                if len(rows) == SINCE_MAX_ROWS:
                    continue  # more are there: no pause
            await asyncio.sleep(self.live_store_poll)

    async def _query(self, fn: Callable[[StoreReader], T]) -> T | web.Response:
        """Run ``fn(reader)`` in the viewer's thread; errors become JSON responses."""
        if not self.store_path:
            return _error(503, "store_off", "the store is off (the server's store option is '')")
        if self._closed:
            return _error(503, "closing", "the server is shutting down")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="async-logging-viewer")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, fn)
        except ConfigError as exc:  # the file cannot be opened: not the caller's fault
            return _error(503, "store_unusable", str(exc))
        except StoreError as exc:
            return _error(503, exc.reason, exc.detail)
        except UsageError as exc:
            return _error(400, "bad_param", str(exc))

    def _run(self, fn: Callable[[StoreReader], T]) -> T:
        """In the viewer's thread: open the reader on first use, then run ``fn``."""
        if self._reader is None:
            assert self.store_path
            self._reader = StoreReader(self.store_path, query_timeout=self.query_timeout)
        return fn(self._reader)

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._end_streams()

    def _end_streams(self) -> None:
        for sub in list(self._streams):
            sub.close()


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


def _error(status: int, reason: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": reason, "detail": detail}),
        content_type="application/json",
    )


def _dumps(record: Any) -> bytes:
    try:
        return orjson.dumps(record)
    except TypeError:  # an odd value from a custom mapper: show it as text
        return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)


def _text(q: Any, key: str) -> str | None:
    value = q.get(key)
    if value is None or value == "":
        return None
    if len(value) > MAX_PARAM_LENGTH:
        raise BadParam(f"{key} is longer than {MAX_PARAM_LENGTH} characters")
    return str(value)


def _flag(q: Any, key: str) -> bool:
    value = str(q.get(key, "")).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadParam(f"{key} must be 1 or 0, not {value[:40]!r}")


def _number(q: Any, key: str) -> float | None:
    value = _text(q, key)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadParam(f"{key} must be a number, not {value[:40]!r}") from None
    if not math.isfinite(number) or number < 0:
        raise BadParam(f"{key} must be a finite number >= 0")
    return number


def _int(q: Any, key: str) -> int | None:
    value = _text(q, key)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadParam(f"{key} must be an integer, not {value[:40]!r}") from None
    if not -_I64 <= number < _I64:  # what SQLite holds: a larger one is a bad request
        raise BadParam(f"{key} is out of range")
    return number
