"""The trees a client's wire events describe, rebuilt on the client side (no server).

Tests of the client assert on what it would send: :func:`trees` puts the decoded events of
a :class:`~async_logging.client.testing.CaptureTransport` (or of envelopes) back into
trees, and :func:`check_tree` asserts what every tree the project's client sends must
satisfy: each ``end`` counts its direct children exactly (``childCount``) and every child
lies within its parent's interval, to the microsecond. The web framework tests share the
request helpers at the end: a chained exception to raise, and what its request's tree
must say.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from async_logging.client import LogClient, registry
from async_logging.client.testing import CaptureTransport
from conftest import TIMEOUT


@contextmanager
def capturing_client(**options: Any) -> Iterator[tuple[LogClient, CaptureTransport]]:
    """A default client over a :class:`CaptureTransport`; the previous default is restored
    and the client closed after."""
    previous = registry.default.client
    capture = CaptureTransport()
    options = {"drain_interval": 0.01, "exit_timeout": 0, **options}
    client = LogClient(transport=capture, default=True, **options)
    try:
        yield client, capture
    finally:
        client.close(TIMEOUT)
        registry.default.client = previous


def sent_trees(client: LogClient, capture: CaptureTransport) -> dict[str, Tx]:
    """The trees of everything enqueued so far, as the proxy would receive them."""
    assert client.flush(TIMEOUT)
    return trees(list(capture.events))


def us(ms: float) -> int:
    """Wire milliseconds (a float with microseconds) as whole microseconds."""
    return round(ms * 1000)


@dataclass
class Tx:
    """A transaction: its begin and end, and its direct children in arrival order."""

    begin: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    children: list[Tx | dict[str, Any]] = field(default_factory=list)

    @property
    def start_us(self) -> int:
        assert self.begin is not None
        return us(self.begin["timestamp"])

    @property
    def end_us(self) -> int:
        assert self.end is not None
        return self.start_us + us(self.end["duration"])

    def atomic(self, type: str) -> list[dict[str, Any]]:
        """The direct atomic children of CAL type ``type``."""
        return [c for c in self.children if isinstance(c, dict) and c.get("type") == type]

    def nested(self) -> list[Tx]:
        """The direct child transactions."""
        return [c for c in self.children if isinstance(c, Tx)]


def trees(events: list[dict[str, Any]]) -> dict[str, Tx]:
    """The root transaction of each uuid among ``events`` (wire maps, as sent)."""
    txs: dict[tuple[str, Any], Tx] = {}
    for e in events:
        if e["clazz"] in ("begin", "end"):
            tx = txs.setdefault((e["uuid"], e["event"]), Tx())
            setattr(tx, e["clazz"], e)
    roots: dict[str, Tx] = {}
    for e in events:
        if e["clazz"] == "end" or "uuid" not in e:
            continue
        node: Tx | dict[str, Any] = txs[(e["uuid"], e["event"])] if e["clazz"] == "begin" else e
        if e["parent"] == 0:
            assert isinstance(node, Tx), e
            roots[e["uuid"]] = node
        else:
            txs[(e["uuid"], e["parent"])].children.append(node)
    return roots


def check_tree(tx: Tx) -> None:
    """Every end counts its direct children; every child lies within its parent's interval
    (in whole microseconds); an end's timestamp is its begin's plus its duration."""
    assert tx.begin is not None and tx.end is not None, tx
    assert tx.end["childCount"] == len(tx.children), (tx.end, len(tx.children))
    assert us(tx.end["timestamp"]) == tx.end_us, (tx.begin, tx.end)
    for child in tx.children:
        if isinstance(child, Tx):
            check_tree(child)
            start, end = child.start_us, child.end_us
        else:
            start = end = us(child["timestamp"])
            assert child["timestamp"] >= tx.begin["timestamp"]  # as floats too
        assert tx.start_us <= start <= end <= tx.end_us, (tx.begin, child)


# --------------------------------------------------------------------------- web requests

#: What a traceback says between an exception and the one it was raised from.
CAUSE = "The above exception was the direct cause of the following exception:"


class CheckoutError(Exception):
    pass


def fail() -> None:
    """Raise a CheckoutError caused by a KeyError (a chained exception)."""
    try:
        {}["cart"]
    except KeyError as exc:
        raise CheckoutError("no cart") from exc


def request_trees(client: LogClient, capture: CaptureTransport) -> dict[str, Tx]:
    """Every request's tree by uuid, each checked (exact counts, children within parents)."""
    roots = sent_trees(client, capture)
    for root in roots.values():
        check_tree(root)
    return roots


def assert_request(tx: Tx, name: str, status: str, status_code: int) -> None:
    """The root of one GET request: its name, status and status_code."""
    assert tx.begin is not None and tx.end is not None
    assert (tx.begin["type"], tx.end["name"], tx.begin["method"]) == ("URL", name, "GET")
    assert (tx.end["status"], tx.end["status_code"]) == (status, status_code), tx.end


def assert_error_child(tx: Tx) -> None:
    """``tx`` has one Exception child: the CheckoutError of :func:`fail`, cause included."""
    [error] = tx.atomic("Exception")
    assert (error["name"], error["msg"], error["level"]) == ("CheckoutError", "no cart", "ERROR")
    text = error["traceback"]
    assert CAUSE in text and "KeyError: 'cart'" in text
    assert text.endswith("CheckoutError: no cart")


def check_shop(
    client: LogClient, capture: CaptureTransport, ids: list[str], item: str, item_id: str
) -> dict[str, Tx]:
    """The trees of a shop app's three requests: ``/items/<id>`` (the route ``item``, one
    ``DB`` child with the id as message), ``/missing`` (404) and ``/boom`` (the chained
    CheckoutError: 500), given their X-Request-IDs in that order; every tree by uuid."""
    roots = request_trees(client, capture)
    ok, nope, error = (roots[i] for i in ids)
    assert_request(ok, item, "0", 200)
    assert [c["msg"] for c in ok.atomic("DB")] == [item_id]
    assert_request(nope, "/missing", "404", 404)
    assert nope.atomic("Exception") == []
    assert_request(error, "/boom", "CheckoutError", 500)
    assert_error_child(error)
    return roots
