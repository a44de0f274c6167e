"""Take the README's screenshots of the viewer from the real page.

Starts an in-process server on free ports with a store in a temporary directory, sends it
a realistic mix of request trees (successes, failures, an incomplete tree, a late event),
then drives Debian's headless Chromium with Playwright and saves the search + waterfall,
the live tail and the summary as PNGs beside this file::

    python docs/screenshots/take.py            # needs /usr/bin/chromium and playwright

The same demo load is used by ``tests/test_viewer_browser.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from async_logging.server import LogCluster
from async_logging.testing import MemoryPublisher

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 940}


def checkout_tree(
    uuid: str, t0: int, *, fail: bool = False, slow: float = 1.0
) -> list[dict[str, Any]]:
    """The wire events of one checkout request: nested API and DB calls, log events."""
    jitter = random.Random(uuid).randint(0, 9)

    def at(ms: float) -> int:
        return t0 + int(ms * slow)

    # (clazz, event, parent, type, name, time, extra)
    rows: list[tuple[str, str, str, str, str, int, dict[str, Any]]] = [
        ("begin", "1", "0", "URL", "/checkout", t0, {}),
        ("atomicEvent", "2", "1", "INFO", "request", t0 + 1, {"msg": "POST /checkout user=1842"}),
        ("begin", "3", "1", "API", "auth.verify", t0 + 2, {}),
        ("atomicEvent", "4", "3", "CACHE", "session", t0 + 4, {"msg": "hit"}),
        ("end", "3", "1", "", "", at(9), {"status": "0"}),
        ("begin", "5", "1", "DB", "cart.load", at(10), {}),
        ("atomicEvent", "6", "5", "SQL", "select", at(12), {"msg": "SELECT * FROM cart WHERE user_id = ?"}),
        ("end", "5", "1", "", "", at(31), {"status": "0"}),
        ("begin", "7", "1", "API", "payment.charge", at(33), {}),
        ("begin", "8", "7", "API", "fraud.score", at(35), {}),
        ("end", "8", "7", "", "", at(52 + jitter), {"status": "0"}),
    ]  # fmt: skip
    if fail:
        rows.append(("atomicEvent", "9", "7", "ERROR", "gateway", at(88), {"msg": "card declined (code 51)", "level": "ERROR"}))  # fmt: skip
    rows += [
        ("end", "7", "1", "", "", at(96), {"status": "51" if fail else "0"}),
        ("begin", "10", "1", "DB", "order.insert", at(98), {}),
        ("end", "10", "1", "", "", at(117), {"status": "0"}),
        ("atomicEvent", "11", "1", "WARN" if fail else "INFO", "response", at(119),
         {"msg": "402 Payment Required" if fail else "200 OK", "level": "WARN" if fail else "INFO"}),
        ("end", "1", "0", "", "", at(121), {"status": "1" if fail else "0"}),
    ]  # fmt: skip
    common = {"uuid": uuid, "pid": 4242, "machine": "web-1", "pool": "checkout"}
    events = []
    for clazz, eid, parent, type_, name, ts, extra in rows:
        event = {**common, "clazz": clazz, "event": eid, "parent": parent, "timestamp": ts}
        if type_:
            event.update(type=type_, name=name)
        events.append({**event, **extra})
    return events


def demo_load(now_ms: int, n: int = 120) -> list[dict[str, Any]]:
    """Many requests of a few kinds over the last minutes (for search and the summary)."""
    rnd = random.Random(7)
    events: list[dict[str, Any]] = []
    for i in range(n):
        t0 = now_ms - 600_000 + i * 4_000 + rnd.randint(0, 2_000)
        kind = rnd.random()
        if kind < 0.55:
            events += checkout_tree(
                f"req-{i:05d}", t0, fail=rnd.random() < 0.12, slow=rnd.uniform(0.6, 2.2)
            )
        else:
            name = rnd.choice(["/search", "/product/{id}", "/cart"])
            uid = f"req-{i:05d}"
            dur = int(rnd.lognormvariate(3.2, 0.6))
            status = "0" if rnd.random() > 0.04 else "500"
            events += [
                {
                    "clazz": "begin",
                    "uuid": uid,
                    "event": "1",
                    "parent": "0",
                    "type": "URL",
                    "name": name,
                    "timestamp": t0,
                },
                {
                    "clazz": "begin",
                    "uuid": uid,
                    "event": "2",
                    "parent": "1",
                    "type": "DB",
                    "name": "catalog.query",
                    "timestamp": t0 + 2,
                },
                {
                    "clazz": "end",
                    "uuid": uid,
                    "event": "2",
                    "parent": "1",
                    "status": "0",
                    "timestamp": t0 + 2 + dur // 2,
                },
                {
                    "clazz": "end",
                    "uuid": uid,
                    "event": "1",
                    "parent": "0",
                    "status": status,
                    "timestamp": t0 + dur,
                },
            ]
    return events


async def post(session: aiohttp.ClientSession, port: int, events: list[dict[str, Any]]) -> None:
    async with session.post(f"http://127.0.0.1:{port}/log", json={"logs": events}) as resp:
        assert resp.status == 200, await resp.text()


async def take(out: Path = HERE) -> list[Path]:
    from playwright.async_api import async_playwright

    publisher = MemoryPublisher()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LogCluster(
            host="127.0.0.1",
            port=0,
            mon_port=0,
            heartbeat_interval=0,
            publisher=publisher,
            store=os.path.join(tmp, "trees.sqlite"),
            clean_duration=0.2,
            clean_cycles=1,
        )
        await cluster.start()
        saved: list[Path] = []
        try:
            now = int(time.time() * 1000)
            async with aiohttp.ClientSession() as session:
                await post(session, cluster.port, demo_load(now))
                # The tree the first screenshot shows: a failed checkout, plus a late event.
                await post(
                    session,
                    cluster.port,
                    checkout_tree("req-demo-failed", now - 5_000, fail=True, slow=1.4),
                )
                await asyncio.to_thread(
                    publisher.wait_for,
                    lambda p: any(r.get("uuid") == "req-demo-failed" for r in p.transactions),
                    10,
                )
                await post(
                    session,
                    cluster.port,
                    [
                        {
                            "clazz": "atomicEvent",
                            "uuid": "req-demo-failed",
                            "event": "40",
                            "parent": "1",
                            "type": "INFO",
                            "name": "audit",
                            "msg": "arrived after the tree",
                            "timestamp": now - 4_870,
                        }
                    ],
                )
                # An incomplete tree: its end never comes; the clean cycle publishes it.
                await post(
                    session,
                    cluster.port,
                    [
                        {
                            "clazz": "begin",
                            "uuid": "req-demo-open",
                            "event": "1",
                            "parent": "0",
                            "type": "URL",
                            "name": "/checkout",
                            "timestamp": now - 3_000,
                        },
                        {
                            "clazz": "begin",
                            "uuid": "req-demo-open",
                            "event": "2",
                            "parent": "1",
                            "type": "API",
                            "name": "payment.charge",
                            "timestamp": now - 2_990,
                        },
                        {
                            "clazz": "end",
                            "uuid": "req-demo-open",
                            "event": "2",
                            "parent": "1",
                            "status": "0",
                            "timestamp": now - 2_900,
                        },
                    ],
                )
                await asyncio.to_thread(
                    publisher.wait_for,
                    lambda p: any(r.get("uuid") == "req-demo-open" for r in p.transactions),
                    10,
                )
                base = f"http://127.0.0.1:{cluster.mon_port}/ui/"
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    try:
                        page = await browser.new_page(viewport=VIEWPORT)
                        await page.goto(base)
                        await page.fill("#search-form input[name=name]", "/checkout")
                        await page.click("#search-form button[type=submit]")
                        await page.wait_for_selector("#results tbody tr")
                        await page.click("#results tbody tr:has-text('req-demo-failed')")
                        await page.wait_for_selector(".wf-bar.fail")
                        await page.click(".wf-row:has-text('payment.charge')")
                        saved.append(out / "search-waterfall.png")
                        await page.screenshot(path=str(saved[-1]), full_page=True)

                        await page.click("#results tbody tr:has-text('req-demo-open')")
                        await page.wait_for_selector(".wf-bar.incomplete")
                        saved.append(out / "incomplete-tree.png")
                        await page.locator("#tree-pane").screenshot(path=str(saved[-1]))

                        await page.click("#tab-btn-summary")
                        await page.wait_for_selector("#summary tbody tr.type-row")
                        saved.append(out / "summary.png")
                        await page.screenshot(path=str(saved[-1]), full_page=True)

                        await page.click("#tab-btn-live")
                        await page.click("#live-toggle")
                        await page.wait_for_selector("#live-state.on")
                        for i in range(8):
                            t = int(time.time() * 1000)
                            await post(
                                session,
                                cluster.port,
                                checkout_tree(f"live-{i}", t, fail=i % 4 == 3, slow=0.8 + i / 5),
                            )
                        await page.wait_for_selector("#live tbody tr:nth-child(8)")
                        await page.click("#live tbody tr:nth-child(1)")
                        await page.wait_for_selector(".wf-row")
                        saved.append(out / "live.png")
                        await page.screenshot(path=str(saved[-1]), full_page=True)
                    finally:
                        await browser.close()
        finally:
            await cluster.stop()
    return saved


if __name__ == "__main__":
    for path in asyncio.run(take(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)):
        print(path)
