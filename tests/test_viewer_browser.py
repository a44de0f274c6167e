"""End to end in headless Chromium (issue 6): trees sent to a real server are drawn by the page.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it) and
Playwright for Python; it never downloads a browser of its own. Skipped, saying why, when
either is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from async_logging import LogBuffer
from async_logging.server import LogCluster
from conftest import TIMEOUT
from helpers import Clock, post_logs, stored

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True
    )
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Playwright for Python is not installed (pip install playwright)"
)

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MS = TIMEOUT * 1000  # Playwright counts milliseconds
UNAUTHORIZED = "the server responded with a status of 401 (Unauthorized)"
T0 = int(time.time() * 1000) - 30_000


def request_tree(uuid: str, status: str = "0", name: str = "/checkout") -> list[dict[str, Any]]:
    """A URL request: a log line, an auth call, a payment call holding an error event."""
    e = {"uuid": uuid}
    return [
        {**e, "clazz": "begin", "event": "1", "parent": "0", "type": "URL", "name": name, "timestamp": T0},
        {**e, "clazz": "atomicEvent", "event": "2", "parent": "1", "type": "INFO", "name": "req", "msg": "POST", "timestamp": T0 + 1},
        {**e, "clazz": "begin", "event": "3", "parent": "1", "type": "API", "name": "auth", "timestamp": T0 + 2},
        {**e, "clazz": "end", "event": "3", "parent": "1", "status": "0", "timestamp": T0 + 20},
        {**e, "clazz": "begin", "event": "4", "parent": "1", "type": "API", "name": "pay", "timestamp": T0 + 50},
        {**e, "clazz": "atomicEvent", "event": "5", "parent": "4", "type": "ERROR", "name": "gw", "msg": "declined", "level": "ERROR", "timestamp": T0 + 80},
        {**e, "clazz": "end", "event": "4", "parent": "1", "status": status, "timestamp": T0 + 90},
        {**e, "clazz": "end", "event": "1", "parent": "0", "status": status, "timestamp": T0 + 100},
    ]  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    """The server engine's clock: a tree times out when the test moves it, not with time."""
    return Clock(T0)


@pytest.fixture
def viewer_tokens() -> tuple[str, ...]:
    """The monitoring port's tokens (none: open); a test parametrizes it to ask for one."""
    return ()


@pytest.fixture
def compact() -> bool:
    """Whether the engine writes compact records; a test parametrizes it."""
    return False


@pytest.fixture
def server_options(
    tmp_path: Path, clock: Clock, viewer_tokens: tuple[str, ...], compact: bool
) -> dict[str, Any]:
    return {
        "store": str(tmp_path / "trees.sqlite"),
        "buffer": LogBuffer(clock=clock, compact=compact),
        "viewer_tokens": viewer_tokens,
    }


async def time_out(server: LogCluster, clock: Clock) -> None:
    """Move the engine's clock past its clean cycles and run one: open trees go out ``timeout``."""
    assert server.pipeline is not None
    limits = server.pipeline.buffer.limits
    clock.advance(limits.clean_duration * limits.clean_cycles)
    server.pipeline.expire()


@pytest.fixture
def errors() -> list[str]:
    """The page's script errors and console errors; none may be left when a test ends."""
    return []


@pytest.fixture
async def page(server: LogCluster, errors: list[str]) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=MS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            yield page
            assert errors == []  # no script error and no CSP violation on the way
        finally:
            await browser.close()


async def test_a_tree_sent_to_the_server_is_found_and_drawn_as_a_waterfall(
    server: LogCluster, clock: Clock, page: Any
) -> None:
    """Searching by uuid lists the tree; clicking it draws one row per node, bars by start and duration coloured by status, events as markers, incomplete flagged."""
    await stored(server, {"req-fail"}, post_logs(server, request_tree("req-fail", status="51")))
    # Begins only: published incomplete once the engine's clock passes the clean cycles.
    await post_logs(server, request_tree("req-open")[:3])
    await stored(server, {"req-open"}, time_out(server, clock))

    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/")
    await page.fill("#search-form input[name=uuid]", "req-fail")
    await page.click("#search-form button[type=submit]")
    row = page.locator("#results tbody tr")
    # The page lists recent trees on load; wait for the search's own answer to replace them.
    await page.wait_for_function(
        "() => { const r = document.querySelectorAll('#results tbody tr');"
        " return r.length === 1 && r[0].textContent.includes('req-fail'); }",
        timeout=MS,
    )
    assert await row.count() == 1
    await row.click()
    await page.locator(".wf-row").first.wait_for()

    rows = page.locator("#waterfall .wf-row")
    drawn = await rows.evaluate_all(
        "rows => rows.map(r => [r.dataset.depth, r.querySelector('.type').textContent,"
        " r.querySelector('.name').textContent])"
    )
    assert drawn == [  # tree order, nesting depth, type and name (events: name, else msg)
        ["0", "URL", "/checkout"],
        ["1", "INFO", "req"],
        ["1", "API", "auth"],
        ["1", "API", "pay"],
        ["2", "ERROR", "gw"],
    ]
    bars = page.locator("#waterfall .wf-bar")
    assert await bars.count() == 3
    colours = await bars.evaluate_all(
        "bars => bars.map(b => ['ok', 'fail', 'unknown'].filter(c => b.classList.contains(c)))"
    )
    assert colours == [["fail"], ["ok"], ["fail"]]
    # Bars sit by start and duration on the tree's time axis (100 ms): pay starts at 50 ms.
    left = await bars.nth(2).evaluate("b => b.style.left")
    width = await bars.nth(2).evaluate("b => b.style.width")
    assert (left, width) == ("50%", "40%")
    markers = page.locator("#waterfall .wf-marker")
    assert await markers.count() == 2
    assert await markers.nth(1).get_attribute("class") == "wf-marker error"
    assert await markers.nth(1).evaluate("m => m.style.left") == "80%"
    box = await page.locator("#waterfall .wf-bar.ok").bounding_box()
    assert box is not None and box["width"] > 20  # really drawn, not just in the DOM

    # The incomplete tree: its row and its waterfall say so.
    await page.fill("#search-form input[name=uuid]", "req-open")
    await page.click("#search-form button[type=submit]")
    await page.locator("#results tbody tr", has_text="req-open").click()
    await page.locator(".wf-bar.incomplete").first.wait_for()
    assert "incomplete: timeout" in await page.locator("#tree-head").inner_text()
    assert await page.locator("#waterfall .badge", has_text="missing_end").count() == 2


async def test_the_live_tail_streams_new_trees_and_the_summary_counts_them(
    server: LogCluster, page: Any
) -> None:
    """The live tab shows a tree published after it connected and draws it on click; the summary tab counts it by type and name."""
    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/#live")
    await page.locator("#live-state.on").wait_for()
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
    await post_logs(server, request_tree("req-live", status="7"))
    row = page.locator("#live tbody tr", has_text="req-live")
    await row.wait_for()
    await row.click()
    await page.locator("#waterfall .wf-bar.fail").first.wait_for()
    assert await page.locator("#waterfall .wf-row").count() == 5

    await page.click("#tab-btn-summary")
    type_row = page.locator("#summary tr.type-row", has_text="API")
    await type_row.wait_for()
    cells = await type_row.locator("td").all_inner_texts()
    assert cells[:4] == ["API", "2", "1", "50.0 %"]


@pytest.mark.parametrize("viewer_tokens", [("browser-s3cret",)])
async def test_a_protected_viewer_shows_the_login_form_then_works_signed_in(
    server: LogCluster, page: Any, errors: list[str]
) -> None:
    """With a viewer token the page is a login form; a wrong token says so; the right one opens the viewer, whose search and live tail work on the cookie; a ?token= link leaves a clean URL."""
    await stored(server, {"req-auth"}, post_logs(server, request_tree("req-auth")))
    base = f"http://127.0.0.1:{server.mon_port}/ui/"
    await page.goto(f"http://127.0.0.1:{server.mon_port}/")  # the port's root: to the page
    assert page.url == base
    await page.fill("#login-form input[name=token]", "wrong")
    await page.click("#login-form button[type=submit]")
    assert "not valid" in await page.locator("#login-error").inner_text()
    # The login page comes with its 401 (the first visit, the wrong token): nothing else.
    assert errors == [f"Failed to load resource: {UNAUTHORIZED}"] * 2
    errors.clear()
    await page.fill("#login-form input[name=token]", "browser-s3cret")
    await page.click("#login-form button[type=submit]")
    await page.locator("#results tbody tr", has_text="req-auth").wait_for()
    assert page.url == base
    cookies = await page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("async_logging_viewer", True, "Strict")
    ]
    await page.click("#tab-btn-live")
    await page.click("#live-form button[type=submit]")
    await page.locator("#live-state.on").wait_for()  # the EventSource carried the cookie

    await page.context.clear_cookies()  # signed out (expired, or the server restarted)
    await page.click("#tab-btn-search")
    await page.click("#search-form button[type=submit]")
    await page.locator("#login-form").wait_for()  # a refused API call brings the form back
    errors[:] = [e for e in errors if UNAUTHORIZED not in e]
    await page.goto(base + "?token=browser-s3cret#summary")
    assert page.url == base + "#summary"  # the token is in neither the address bar nor history
    await page.locator("#summary tr.type-row").first.wait_for()


# ------------------------------------------------------------------ issue 13: the viewer


async def rows_are(page: Any, uuids: list[str]) -> None:
    """Wait until the search results list exactly these uuids, in this order."""
    await page.wait_for_function(
        "want => [...document.querySelectorAll('#results tbody tr td.uuid')]"
        ".map(td => td.textContent).join(',') === want.join(',')",
        arg=uuids,
        timeout=MS,
    )


async def test_the_search_is_in_the_address_so_links_bookmarks_and_the_back_button_work(
    server: LogCluster, page: Any
) -> None:
    """A search writes its fields into the page's address and an opened tree its id; back and forward walk through them (form, results and tree following); the address opened afresh shows the same search and tree."""
    await stored(
        server,
        {"a-1", "a-ok", "b-1"},
        post_logs(
            server,
            request_tree("a-1", "5", name="/a")
            + request_tree("a-ok", name="/a")
            + request_tree("b-1", name="/b"),
        ),
    )
    base = f"http://127.0.0.1:{server.mon_port}/ui/"
    await page.goto(base)
    await page.fill("#search-form input[name=name]", "/a")
    await page.check("#search-form input[name=failures]")
    await page.click("#search-form button[type=submit]")
    await rows_are(page, ["a-1"])
    searched = page.url
    assert searched == base + "?name=%2Fa&failures=1"
    await page.locator("#results tbody tr", has_text="a-1").click()
    await page.locator("#tree-head", has_text="uuid a-1").wait_for()
    opened = page.url
    assert opened.startswith(searched + "#tree=")

    await page.fill("#search-form input[name=name]", "/b")
    await page.uncheck("#search-form input[name=failures]")
    await page.click("#search-form button[type=submit]")
    await rows_are(page, ["b-1"])
    assert page.url == base + "?name=%2Fb"
    assert await page.locator("#tree-pane").is_hidden()  # a new search: no tree open yet

    await page.go_back()  # the tree opened from the first search, and that search
    await page.locator("#tree-head", has_text="uuid a-1").wait_for()
    await rows_are(page, ["a-1"])
    assert page.url == opened
    assert await page.input_value("#search-form input[name=name]") == "/a"
    assert await page.is_checked("#search-form input[name=failures]")
    await page.go_back()  # the first search, before the tree was opened
    await page.locator("#tree-pane").wait_for(state="hidden")
    assert page.url == searched
    await page.go_forward()
    await page.go_forward()
    await rows_are(page, ["b-1"])
    assert await page.input_value("#search-form input[name=name]") == "/b"
    assert not await page.is_checked("#search-form input[name=failures]")

    # A bookmark, or a link shared: the same search and the same tree, loaded afresh.
    browser = page.context.browser
    assert browser is not None
    fresh = await browser.new_page()
    try:
        await fresh.goto(opened)
        await fresh.locator("#tree-head", has_text="uuid a-1").wait_for()
        await rows_are(fresh, ["a-1"])
        assert await fresh.input_value("#search-form input[name=name]") == "/a"
        assert await fresh.is_checked("#search-form input[name=failures]")
    finally:
        await fresh.close()


async def test_the_live_tail_and_a_tree_opened_from_search_keep_apart(
    server: LogCluster, page: Any
) -> None:
    """A tree opened from the search is not shown under the live tail, nor replaced by one opened from it: each tab shows its own, side by side with its list, never over it."""
    await stored(server, {"s-1"}, post_logs(server, request_tree("s-1")))
    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/?uuid=s-1")
    await page.locator("#results tbody tr", has_text="s-1").click()
    await page.locator("#tree-head", has_text="uuid s-1").wait_for()

    await page.click("#tab-btn-live")
    assert await page.locator("#tree-pane").is_hidden()  # the search's tree stays with it
    await page.click("#live-form button[type=submit]")
    await page.locator("#live-state.on").wait_for()
    await asyncio.wait_for(server.live_hub.wait_for_subscribers(1), TIMEOUT)
    await post_logs(server, request_tree("l-1", status="9"))
    await page.locator("#live tbody tr", has_text="l-1").click()
    await page.locator("#tree-head", has_text="uuid l-1").wait_for()
    live_box = await page.locator("#panel-live").bounding_box()
    tree_box = await page.locator("#tree-pane").bounding_box()
    assert live_box is not None and tree_box is not None
    assert live_box["y"] + live_box["height"] <= tree_box["y"]  # below the list, not over it

    await page.click("#tab-btn-search")
    await page.locator("#tree-head", has_text="uuid s-1").wait_for()
    assert "#tree=" in page.url
    await page.click("#tab-btn-live")
    await page.locator("#tree-head", has_text="uuid l-1").wait_for()


async def test_the_legend_names_every_marker_the_waterfall_draws(
    server: LogCluster, page: Any
) -> None:
    """Atomic events are drawn as plain, error, warning and late markers, and the legend shows a swatch of each."""
    e = {"uuid": "mk-1", "clazz": "atomicEvent", "parent": "1", "type": "LOG"}
    tree = request_tree("mk-1")
    tree.insert(1, {**e, "event": "7", "name": "slow", "level": "WARN", "timestamp": T0 + 3})
    await stored(server, {"mk-1"}, post_logs(server, tree))
    late = {**e, "event": "8", "name": "after", "timestamp": T0 + 95}  # after its tree went out
    await stored(server, {"mk-1"}, post_logs(server, [late]))
    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/?uuid=mk-1&kind=any")
    await page.locator("#results tbody tr", has_text="tx").click()
    await page.locator("#waterfall .wf-marker.late").wait_for()

    def modifiers(base: str) -> str:
        return f"els => els.map(e => [...e.classList].filter(c => c !== '{base}').sort().join(' '))"

    drawn = set(await page.locator("#waterfall .wf-marker").evaluate_all(modifiers("wf-marker")))
    assert drawn == {"", "error", "warn", "late"}
    legend = set(await page.locator(".legend .mk").evaluate_all(modifiers("mk")))
    assert drawn <= legend
    for swatch in await page.locator(".legend .mk").all():
        assert await swatch.is_visible()


async def test_times_are_local_dates_with_ms_and_short_durations_are_in_microseconds(
    server: LogCluster, page: Any
) -> None:
    """Durations below 1 ms are written in µs, others in ms or s; timestamps as local dates with ms, in the lists and in a node's details (with the number sent beside)."""
    await stored(server, {"t-1"}, post_logs(server, request_tree("t-1")))
    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/?uuid=t-1")
    durations = await page.evaluate(
        "[0.34, 0.0004, 0.9999, 0, 12.34, 1500].map(ViewerFormat.duration)"
    )
    assert durations == ["340 µs", "0 µs", "1 ms", "0 ms", "12.3 ms", "1.50 s"]
    moment = T0 + 0.25  # µs precision: the date keeps its ms
    local = time.localtime(moment / 1000)
    date = time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{int(moment) % 1000:03d}"
    assert await page.evaluate(f"ViewerFormat.time({moment})") == date

    row = page.locator("#results tbody tr", has_text="t-1")
    assert await row.locator("td.time").inner_text() == date
    await row.click()
    stamp = page.locator("#detail tr[data-key=timestamp] td")
    await stamp.wait_for()
    assert await stamp.evaluate("td => td.firstChild.textContent") == date
    assert await stamp.locator(".raw").inner_text() == str(T0)  # the number sent, beside
    assert await page.locator("#detail tr[data-key=duration] td").inner_text() == "100 ms"


async def test_the_results_list_takes_the_height_of_the_page(server: LogCluster, page: Any) -> None:
    """With no tree open, the results list reaches down to the bottom of the window, however few rows it holds; a tree opened leaves it a good part of the window."""
    await stored(server, {"h-1"}, post_logs(server, request_tree("h-1")))
    await page.goto(f"http://127.0.0.1:{server.mon_port}/")
    assert page.url.endswith("/ui/")  # GET / on the monitoring port: the page
    await rows_are(page, ["h-1"])
    viewport = page.viewport_size
    box = await page.locator("#panel-search .results-box").bounding_box()
    assert box is not None
    assert box["y"] + box["height"] >= viewport["height"] - 40, box  # the page's padding only
    await page.locator("#results tbody tr").click()
    await page.locator(".wf-row").first.wait_for()
    box = await page.locator("#panel-search .results-box").bounding_box()
    assert box is not None and box["height"] >= viewport["height"] / 4, box


@pytest.mark.parametrize("compact", [True])
async def test_a_compact_childs_details_show_what_it_takes_from_its_root(
    server: LogCluster, page: Any
) -> None:
    """A compact record leaves uuid, machine... out below its root; a child's details show
    them, marked as the root's, and a field the child has itself stays its own."""
    tree = request_tree("c-1")
    for e in tree:
        e["machine"] = "web-1"
    tree[2]["machine"] = "web-2"  # the auth call's begin: its own machine
    await stored(server, {"c-1"}, post_logs(server, tree))
    await page.goto(f"http://127.0.0.1:{server.mon_port}/ui/?uuid=c-1")
    await page.locator("#results tbody tr", has_text="c-1").click()
    await page.locator(".wf-row", has_text="pay").click()
    machine = page.locator("#detail tr[data-key=machine]")
    await machine.wait_for()
    assert await machine.get_attribute("class") == "inherited"
    assert await machine.locator("td").inner_text() == "web-1the root's"
    assert await page.locator("#detail tr[data-key=uuid]").get_attribute("class") == "inherited"
    await page.locator(".wf-row", has_text="auth").click()
    own = page.locator("#detail tr[data-key=machine]")
    await own.wait_for()
    assert await own.get_attribute("class") is None
    assert await own.locator("td").inner_text() == "web-2"
