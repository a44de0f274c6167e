"""An exception leaving a transaction is reported as its ``Exception`` child.

A real client over the in-memory CaptureTransport: what is asserted is exactly what would
reach the proxy; no server, no sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from async_logging.client import CoreLimits, LogClient, event, transaction
from async_logging.client.items import TRACEBACK_CUT, cut_traceback
from async_logging.client.testing import CaptureTransport
from client_trees import (
    CheckoutError,
    assert_error_child,
    capturing_client,
    check_tree,
    fail,
    sent_trees,
)


@pytest.fixture
def client() -> Iterator[tuple[LogClient, CaptureTransport]]:
    with capturing_client() as pair:
        yield pair


def test_an_exception_leaving_a_transaction_is_its_error_child(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """The end's status is the class name; just before it comes an atomic child of type
    Exception, level ERROR, with the class name, the message and the whole traceback,
    the cause kept; the child is counted in childCount."""
    with pytest.raises(CheckoutError), transaction("URL", "/pay") as tx:
        event("DB", "select card")
        fail()
    [root] = sent_trees(*client).values()
    check_tree(root)
    assert root.end is not None and root.end["status"] == "CheckoutError"
    assert root.end["childCount"] == 2
    db, error = root.children
    assert isinstance(error, dict) and isinstance(db, dict)
    assert (error["clazz"], error["type"]) == ("atomicEvent", "Exception")
    assert (error["uuid"], error["parent"]) == (tx.uuid, tx.event)
    assert_error_child(root)
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert 'raise CheckoutError("no cart") from exc' in error["traceback"]


def test_an_exception_is_reported_by_every_transaction_it_leaves(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """Nested transactions the exception passes through each get the child; a transaction
    that catches it inside does not, and ends "0"."""
    with transaction("URL", "/outer"):
        with pytest.raises(ValueError), transaction("API", "middle"), transaction("DB", "inner"):
            raise ValueError("bad row")
        with transaction("DB", "handled"):
            try:
                raise KeyError("x")
            except KeyError:
                pass
    [root] = sent_trees(*client).values()
    check_tree(root)
    middle, handled = root.nested()
    [inner] = middle.nested()
    assert [e["msg"] for e in middle.atomic("Exception")] == ["bad row"]
    assert [e["msg"] for e in inner.atomic("Exception")] == ["bad row"]
    assert "in test_an_exception_is_reported" in middle.atomic("Exception")[0]["traceback"]
    assert handled.atomic("Exception") == [] and root.atomic("Exception") == []
    assert handled.end is not None and handled.end["status"] == "0"
    assert root.end is not None and root.end["status"] == "0"


def test_a_status_set_by_hand_stays_but_the_error_is_still_reported(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """tx.status set before the exception wins; the exception is reported all the same."""
    with pytest.raises(RuntimeError), transaction("API", "call") as tx:
        tx.status = "E42"
        raise RuntimeError("boom")
    [root] = sent_trees(*client).values()
    assert root.end is not None and root.end["status"] == "E42"
    assert [e["name"] for e in root.atomic("Exception")] == ["RuntimeError"]


def test_tx_exception_reports_an_exception_that_never_left_the_block(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """An exception a framework turned into a response is reported through tx.exception."""
    with transaction("URL", "/page") as tx:
        try:
            raise LookupError("gone")
        except LookupError as exc:
            tx.exception = exc
    [root] = sent_trees(*client).values()
    check_tree(root)
    assert root.end is not None and root.end["status"] == "LookupError"
    [error] = root.atomic("Exception")
    assert error["msg"] == "gone" and error["traceback"].endswith("LookupError: gone")


async def test_a_cancelled_task_is_no_error(client: tuple[LogClient, CaptureTransport]) -> None:
    """CancelledError ends the transaction with its name as status, but no Exception child."""
    started = asyncio.Event()

    async def work() -> None:
        async with transaction("API", "slow"):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [root] = (await asyncio.to_thread(sent_trees, *client)).values()
    assert root.end is not None and root.end["status"] == "CancelledError"
    assert root.children == [] and root.end["childCount"] == 0


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_an_unprintable_exception_is_still_reported(
    client: tuple[LogClient, CaptureTransport],
) -> None:
    """An exception whose str() raises costs neither the report nor the exception itself."""
    with pytest.raises(Unprintable), transaction("API", "odd"):
        raise Unprintable
    [root] = sent_trees(*client).values()
    [error] = root.atomic("Exception")
    assert (error["name"], error["msg"]) == ("Unprintable", "<unprintable Unprintable>")
    assert "Unprintable" in error["traceback"]


def test_a_long_traceback_keeps_its_end_within_the_string_limit() -> None:
    """A traceback over max_string_length is cut from the top: the raise and the error line
    stay, behind a line saying how much was cut; the frame is not refused for it."""
    with (
        capturing_client(limits=CoreLimits(max_string_length=2000)) as (client, capture),
        pytest.raises(ValueError),
        transaction("API", "long"),
    ):
        raise ValueError("x" * 5000 + " at the bottom")
    [root] = sent_trees(client, capture).values()
    [error] = root.atomic("Exception")
    text = error["traceback"]
    assert len(text) == 2000 and client.stats.rejected == 0
    assert len(error["msg"]) == 2000  # a message is cut too, keeping its start
    assert text.startswith("[traceback cut: its first ") and text.endswith("at the bottom")
    whole = cut_traceback(text, 10**6)
    assert whole == text
    assert cut_traceback("abcdef", 3) == "def"
    cut = cut_traceback("x" * 100 + "END", 80)
    assert len(cut) <= 80 and cut.endswith("END")
    assert cut.startswith(TRACEBACK_CUT.format(103 - (80 - len(TRACEBACK_CUT.format(103)))))
