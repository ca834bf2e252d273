"""Which conversations an ordered target's next claim looks at (gateway.delivery.ordering):
pure bookkeeping, the time passed in."""

from __future__ import annotations

from gateway.delivery.ordering import FULL_AGAIN_S, FULL_EVERY_S, Conversations


def _tracking(now: float = 100.0) -> Conversations:
    """Ordered target "t", its first full look already made at ``now``."""
    conversations = Conversations()
    conversations.reconfigure({"t"})
    assert conversations.request(now, ["t"]) == {"t": None}
    return conversations


def test_a_new_ordered_target_is_looked_at_in_full_then_only_where_something_changed() -> None:
    """The first claim looks at every conversation; later ones at those announced, and an
    empty set when nothing changed (no query needed); unordered targets are not named."""
    conversations = _tracking()
    assert conversations.request(100.1, ["t", "plain"]) == {"t": set()}
    conversations.changed("t", "k1")
    conversations.changed("t", "k2")
    conversations.changed("plain", "k3")
    assert conversations.request(100.2, ["t"]) == {"t": {"k1", "k2"}}
    assert conversations.request(100.3, ["t"]) == {"t": set()}


def test_what_a_claim_had_no_room_for_is_asked_again_and_a_full_look_recurs() -> None:
    """A claim cut short asks again about what it did not start; a full look cut short comes
    again FULL_AGAIN_S later; a full look comes at least every FULL_EVERY_S, and after a
    wake-up from outside."""
    conversations = _tracking()
    conversations.changed("t", "k1")
    conversations.changed("t", "k2")
    asked = conversations.request(100.1, ["t"])["t"]
    conversations.claimed("t", asked, ["k1"], complete=False)
    assert conversations.request(100.2, ["t"]) == {"t": {"k2"}}
    conversations.claimed("t", {"k2"}, [], complete=True)
    assert conversations.request(100.3, ["t"]) == {"t": set()}
    assert conversations.request(100.0 + FULL_EVERY_S, ["t"]) == {"t": None}
    conversations.everything()
    assert conversations.request(101.1, ["t"]) == {"t": None}
    conversations.claimed("t", None, [], complete=False)
    assert conversations.request(101.1 + FULL_AGAIN_S / 2, ["t"]) == {"t": set()}
    assert conversations.request(101.1 + FULL_AGAIN_S, ["t"]) == {"t": None}
    conversations.claimed("t", None, [], complete=False, took_s=0.05)  # a slow look: 10x
    assert conversations.request(101.1 + FULL_AGAIN_S + 0.4, ["t"]) == {"t": set()}
    assert conversations.request(101.1 + FULL_AGAIN_S + 0.5, ["t"]) == {"t": None}


def test_a_change_during_a_claim_is_not_lost() -> None:
    """A conversation announced while the claim for it runs is asked about again."""
    conversations = _tracking()
    conversations.changed("t", "k1")
    asked = conversations.request(100.1, ["t"])["t"]
    conversations.changed("t", "k1")  # a new delivery of k1 stored meanwhile
    conversations.claimed("t", asked, [], complete=True)
    assert conversations.request(100.2, ["t"]) == {"t": {"k1"}}


def test_a_retry_brings_its_conversation_back_when_due() -> None:
    """A first delivery retrying at t is looked at from t on, not before; next_at says when."""
    conversations = _tracking()
    conversations.retry_at("t", "k1", 100.5)
    assert conversations.next_at() == 100.5
    assert conversations.request(100.4, ["t"]) == {"t": set()}
    assert conversations.request(100.5, ["t"]) == {"t": {"k1"}}
    assert conversations.next_at() is None


def test_a_delivery_without_a_key_or_a_target_no_longer_ordered() -> None:
    """A keyless delivery can only be found by a full look; a target that stops keeping order
    is forgotten, and one that starts is looked at in full."""
    conversations = _tracking()
    conversations.changed("t", None)
    assert conversations.request(100.1, ["t"]) == {"t": None}
    conversations.retry_at("t", "k", 100.2)
    conversations.reconfigure({"u"})
    assert conversations.next_at() is None
    assert conversations.request(100.3, ["t", "u"]) == {"u": None}


def test_a_finished_delivery_brings_its_conversation_back_only_when_one_waits_in_it() -> None:
    """Delivered alone, a conversation needs no claim; with a delivery held behind it, the
    next claim looks at it, until a claim starts that delivery (a retry of the first one
    started meanwhile does not count as it)."""
    conversations = _tracking()
    conversations.finished("t", "alone")
    assert conversations.request(100.1, ["t"]) == {"t": set()}
    conversations.held("t", "busy", "d2")
    asked = conversations.request(100.2, ["t"])["t"]
    assert asked == {"busy"}
    conversations.claimed("t", asked, [], complete=True)  # d1 still in flight
    conversations.started("t", "busy", "d1")  # d1's retry, claimed again
    conversations.finished("t", "busy")
    assert conversations.request(100.3, ["t"]) == {"t": {"busy"}}
    conversations.started("t", "busy", "d2")
    conversations.finished("t", "busy")
    assert conversations.request(100.4, ["t"]) == {"t": set()}


def test_conversations_started_by_a_full_look_are_followed_until_nothing_more_is_due() -> None:
    """What a full look started may have deliveries behind it that this process never saw:
    each of its deliveries brings the conversation back, until a claim finds nothing more."""
    conversations = Conversations()
    conversations.reconfigure({"t"})
    assert conversations.request(100.0, ["t"]) == {"t": None}
    conversations.claimed("t", None, ["other-workers"], complete=True)
    conversations.finished("t", "other-workers")
    asked = conversations.request(100.1, ["t"])["t"]
    assert asked == {"other-workers"}
    conversations.claimed("t", asked, ["other-workers"], complete=True)  # the next one
    conversations.finished("t", "other-workers")
    asked = conversations.request(100.2, ["t"])["t"]
    assert asked == {"other-workers"}
    conversations.claimed("t", asked, [], complete=True)  # nothing more
    conversations.finished("t", "other-workers")
    assert conversations.request(100.3, ["t"]) == {"t": set()}
