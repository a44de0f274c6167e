"""The client's inbox: room, wake-up, drops and closing, with no sender and no threads."""

from __future__ import annotations

from async_logging.client.inbox import Inbox
from async_logging.client.items import Release, make_item
from async_logging.model import ATOMIC


def item(n: int = 0) -> object:
    return make_item(ATOMIC, None, "LOG", str(n), None)


def test_puts_past_the_room_are_dropped_and_counted() -> None:
    """An inbox of room 3 queues three items and refuses (and counts) the next ones."""
    inbox = Inbox(3, wake_at=100)
    assert [inbox.put(item(i)) for i in range(5)] == [True, True, True, False, False]
    assert len(inbox) == 3 and inbox.dropped == 2


def test_a_full_batch_wakes_the_consumer_once() -> None:
    """The put that makes the queue exceed wake_at wakes the attached consumer; no other does."""
    inbox = Inbox(100, wake_at=2)
    wakes: list[int] = []
    inbox.attach(lambda: wakes.append(len(inbox)))
    for i in range(5):
        inbox.put(item(i))
    assert wakes == [3]


def test_take_empties_the_queue_in_order_and_lowers_the_room_first() -> None:
    """What the consumer takes still counts against the room until it sets a new one."""
    inbox = Inbox(10, wake_at=100)
    queued = [item(i) for i in range(4)]
    for it in queued:
        inbox.put(it)
    assert inbox.take() == queued
    assert len(inbox) == 0 and inbox.room == 6
    assert inbox.take() == []
    inbox.set_room(10)
    assert inbox.room == 10


def test_a_closed_inbox_drops_everything_and_keeps_no_room() -> None:
    """After close(), puts are dropped and counted, and the consumer cannot reopen the room."""
    inbox = Inbox(10, wake_at=100)
    inbox.close()
    assert inbox.closed and not inbox.put(item())
    inbox.set_room(50)
    assert inbox.room == 0 and inbox.dropped == 1 and len(inbox) == 0


def test_markers_pass_the_room_wake_the_consumer_and_are_not_events() -> None:
    """A consumer's marker is queued even when the room is full and wakes the consumer;
    events() counts only items."""
    inbox = Inbox(1, wake_at=100)
    woken: list[bool] = []
    inbox.attach(lambda: woken.append(True))
    inbox.put(item())
    marker = Release("u")
    inbox.put_marker(marker)
    assert woken == [True]
    assert len(inbox) == 2 and inbox.events() == 1
    assert inbox.take()[-1] is marker
