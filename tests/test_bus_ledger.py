"""AckLedger (async_logging.bus.ledger): when a reassembler may ack, sans-I/O.

Tokens are plain strings here; ``is_open`` is a set the test moves by hand.
"""

from __future__ import annotations

from async_logging.bus.ledger import AckLedger


def ledger() -> AckLedger[str]:
    return AckLedger(carry_after=10.0)


def test_a_message_of_whole_trees_is_free() -> None:
    """No tree of it open and none held: acked as soon as its batch is durable."""
    led = ledger()
    assert led.take(1, "m1", {"a", "b"}, lambda u: False, 0.0) is False
    assert led.held == 0


def test_messages_of_one_tree_are_acked_together_once_it_is_published() -> None:
    """A tree spread over three messages: all three held until its tree is durable, then
    released in one burst."""
    led = ledger()
    is_open = {"t"}.__contains__
    assert led.take(1, "m1", {"t"}, is_open, 0.0)
    assert led.take(2, "m2", {"t"}, is_open, 0.0)
    assert led.published(set(), 0.0) == []
    # The third message closes the tree: it is held too (its tree's group is held).
    assert led.take(3, "m3", {"t"}, lambda u: False, 0.0)
    assert sorted(led.published({"t"}, 0.0)) == ["m1", "m2", "m3"]
    assert led.held == 0
    assert led.published({"t"}, 0.0) == []


def test_a_published_tree_waits_for_an_open_tree_sharing_a_message() -> None:
    """Message 2 holds the end of tree a and the start of open tree b: a's messages stay
    unacked (a replay would rebuild a whole, a duplicate JetStream drops) until b closes."""
    led = ledger()
    opened = {"a"}
    assert led.take(1, "m1", {"a"}, opened.__contains__, 0.0)
    opened = {"b"}
    assert led.take(2, "m2", {"a", "b"}, opened.__contains__, 1.0)
    assert led.published({"a"}, 1.0) == []
    assert led.held == 2
    assert led.take(3, "m3", {"b"}, lambda u: False, 2.0)
    assert sorted(led.published({"b"}, 2.0)) == ["m1", "m2", "m3"]


def test_a_mixed_message_is_carried_after_carry_after() -> None:
    """After carry_after seconds the mixed message is due; once its open part is carried
    to a copy, the published tree's messages are acked, and the copy holds the open tree
    until it is delivered and its tree closes."""
    led = ledger()
    assert led.take(1, "m1", {"a"}, {"a"}.__contains__, 0.0)
    assert led.take(2, "m2", {"a", "b"}, {"b"}.__contains__, 0.0)
    assert led.published({"a"}, 0.0) == []
    assert led.due_carries(5.0) == []
    (due,) = led.due_carries(10.0)
    assert due.seq == 2 and due.open == {"b"}
    assert sorted(led.carried(due, 7, 10.0)) == ["m1", "m2"]
    assert led.holds(7) and led.held == 1 and led.carries == 1
    # b closes before the copy is delivered: nothing to ack yet (the copy is not in hand).
    assert led.published({"b"}, 11.0) == []
    # The copy arrives (its events are duplicates of the published tree): acked.
    assert led.take(7, "m7", {"b"}, lambda u: False, 12.0)
    assert led.published(set(), 12.0) == ["m7"]
    assert led.held == 0


def test_a_redelivered_held_message_takes_the_new_token() -> None:
    """JetStream delivered a held message again (its ack_wait ran out): the newer delivery
    is what gets acked."""
    led = ledger()
    is_open = {"t"}.__contains__
    assert led.take(1, "first", {"t"}, is_open, 0.0)
    assert led.take(1, "again", {"t"}, is_open, 1.0)
    assert led.tokens() == ["again"]
    assert led.published({"t"}, 2.0) == ["again"]


def test_a_chain_of_trees_is_one_group() -> None:
    """a-b share a message, b-c share another: nothing is acked until all three closed."""
    led = ledger()
    assert led.take(1, "m1", {"a", "b"}, {"a", "b"}.__contains__, 0.0)
    assert led.take(2, "m2", {"b", "c"}, {"a", "b", "c"}.__contains__, 0.0)
    assert led.published({"a"}, 0.0) == []
    assert led.published({"b"}, 0.0) == []
    assert sorted(led.published({"c"}, 0.0)) == ["m1", "m2"]
