"""Which conversations an ordered target's next claim looks at, and the runs a claim hands out
(gateway.delivery.ordering): pure bookkeeping, the time passed in."""

from __future__ import annotations

import itertools

import pytest

from gateway.delivery.ordering import (
    EXTEND_AT,
    FULL_AGAIN_S,
    FULL_EVERY_S,
    RUN,
    Conversations,
    Runs,
)
from gateway.outbox import Delivery


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
    # While conversations are announced (the target busy with them), a cut-short look waits.
    conversations.claimed("t", None, [], complete=False)
    conversations.changed("t", "k3")
    assert conversations.request(101.1 + FULL_AGAIN_S / 2, ["t"]) == {"t": {"k3"}}
    conversations.changed("t", "k3")
    assert conversations.request(101.1 + FULL_AGAIN_S, ["t"]) == {"t": None}
    conversations.claimed("t", None, [], complete=False, took_s=0.05)  # a slow look: 10x
    conversations.changed("t", "k4")
    assert conversations.request(101.1 + FULL_AGAIN_S + 0.4, ["t"]) == {"t": {"k4"}}
    conversations.changed("t", "k4")
    assert conversations.request(101.1 + FULL_AGAIN_S + 0.5, ["t"]) == {"t": None}


def test_a_target_that_answers_again_is_looked_at_in_full_at_the_next_claim() -> None:
    """A look at every conversation made while the target was probed (room for one) named a
    handful beyond it; with the whole budget's room the next claim would ask about those
    alone. The target answering again makes the next claim look at every conversation at
    once instead; a target that does not keep order is not named."""
    conversations = _tracking()
    more = [f"k{n}" for n in range(8)]
    conversations.claimed("t", None, ["k"], complete=False, took_s=0.02, more=more)
    assert conversations.request(100.01, ["t"], {"t": 1}) == {"t": {"k0"}}
    conversations.recovered("t")
    conversations.recovered("plain")
    assert conversations.request(100.02, ["t", "plain"], {"t": 256, "plain": 256}) == {"t": None}


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


def test_a_claim_asks_about_as_many_announced_conversations_as_it_has_room_for() -> None:
    """Announced conversations beyond a claim's room wait for the next claims, oldest first,
    rather than being sought again at every claim; those it found due with no room to start
    come first in the next; more_to_ask says whether any wait."""
    conversations = _tracking()
    for key in ("k1", "k2", "k3", "k4", "k5"):
        conversations.changed("t", key)
    asked = conversations.request(100.1, ["t"], {"t": 2})["t"]
    assert asked == {"k1", "k2"}
    assert conversations.more_to_ask("t")
    conversations.claimed("t", asked, ["k1"], complete=False)  # k2 due, no room for it
    assert conversations.request(100.2, ["t"], {"t": 2}) == {"t": {"k2", "k3"}}
    conversations.claimed("t", {"k2", "k3"}, ["k2"], complete=True)  # k3: nothing due
    assert conversations.request(100.3, ["t"], {"t": 5}) == {"t": {"k4", "k5"}}
    assert not conversations.more_to_ask("t")
    assert conversations.request(100.4, ["t"], {"t": 5}) == {"t": set()}


def _delivery(n: int, key: str | None, target: str = "t") -> Delivery:
    return Delivery(
        id=f"p-{n}",
        notification_id=n,
        target=target,
        body=b"{}",
        signature="",
        split=False,
        state="pending",
        attempts=0,
        created_at=1.0,
        next_attempt_at=1.0,
        received_at=1.0,
        order_key=key,
    )


def test_a_claim_s_followers_wait_behind_the_first_of_their_conversation() -> None:
    """Of a claim's deliveries, the first of each conversation starts; those that follow it
    in the claim wait in its run, left out of later claims; unkeyed ones and other targets'
    start at once."""
    runs = Runs()
    a1, b1, a2, free, a3, other = (
        _delivery(1, "a"),
        _delivery(2, "b"),
        _delivery(3, "a"),
        _delivery(4, None),
        _delivery(5, "a"),
        _delivery(6, "a", target="plain"),
    )
    assert runs.sort([a1, b1, a2, free, a3, other], {"t"}) == [a1, b1, free, other]
    assert runs.parked == {a2.id, a3.id}


@pytest.mark.parametrize(
    ("busy", "parked"),
    [
        pytest.param(set(), {"p-3", "p-5", "p-7"}, id="none busy: all wait behind the first"),
        pytest.param({"p-5"}, {"p-3"}, id="a follower on its way ends the run before it"),
        pytest.param({"p-3"}, set(), id="the next one on its way: no run"),
        pytest.param({"p-1"}, set(), id="the first on its way: its run holds the rest"),
    ],
)
def test_a_follower_already_on_its_way_is_never_parked_to_be_sent_again(
    busy: set[str], parked: set[str]
) -> None:
    """A claim's run stops at a follower that is busy (its first send still out after a
    record that failed, the claim finding it pending behind the first): it and what follows
    stay with the outbox, never parked to be sent a second time beside that send."""
    runs = Runs()
    run = [_delivery(n, "a") for n in (1, 3, 5, 7)]
    firsts = runs.sort(run, {"t"}, busy)
    assert [d.id for d in firsts] == ["p-1"]
    assert runs.parked == parked
    if busy and "p-1" not in busy:  # a run cut short asks for a look when it ends
        last = max(parked | {"p-1"})
        current = "p-1"
        while current != last:
            following, _ = runs.after(current, True)
            assert following is not None
            current = following.id
        assert runs.after(last, True) == (None, True)


@pytest.mark.parametrize(
    ("outcomes", "started", "look"),
    [
        # Each ends released (delivered or dead letter): the run goes on to its end.
        ([True, True, True], ["p-3", "p-5", None], [False, False, False]),
        # A retry lets the rest go: the outbox keeps them, a claim finds them again.
        ([True, False], ["p-3", None], [False, True]),
        ([False], [None], [True]),
    ],
)
def test_a_run_goes_on_only_after_an_outcome_that_releases_its_conversation(
    outcomes: list[bool], started: list[str | None], look: list[bool]
) -> None:
    """after(): the next of the run once the one before it is released; a retry lets the
    whole rest go (and asks for a look at the conversation)."""
    runs = Runs()
    a1, a2, a3 = _delivery(1, "a"), _delivery(3, "a"), _delivery(5, "a")
    runs.sort([a1, a2, a3], {"t"})
    current = a1.id
    for released, expected, expected_look in zip(outcomes, started, look, strict=True):
        following, asked = runs.after(current, released)
        assert (None if following is None else following.id) == expected
        assert asked is expected_look
        if following is not None:
            current = following.id
    if outcomes[-1] is False:
        assert runs.parked == set()


def test_a_run_as_long_as_a_claim_takes_asks_for_a_look_when_it_ends() -> None:
    """A run of RUN deliveries may have more behind it: its last one's end asks for a look at
    the conversation; a first delivery that did not start lets its run go."""
    runs = Runs()
    run = [_delivery(n, "a") for n in range(RUN)]
    runs.sort(run, {"t"})
    for delivery, following in itertools.pairwise(run):
        assert runs.after(delivery.id, True) == (following, False)
    assert runs.after(run[-1].id, True) == (None, True)
    runs.sort([_delivery(100, "b"), _delivery(101, "b")], {"t"})
    assert runs.let_go("p-100")
    assert runs.parked == set()


@pytest.mark.parametrize(
    ("room", "asked"),
    [
        pytest.param(2, [{"m1", "m2"}, {"m3", "m4"}, {"m5"}, None], id="two at a time, in order"),
        pytest.param(10, [{"m1", "m2", "m3", "m4", "m5"}, None], id="all when there is room"),
        pytest.param(0, [set(), set()], id="none without room"),
    ],
)
def test_conversations_a_full_look_found_beyond_its_room_are_asked_about_as_room_allows(
    room: int, asked: list[set[str]]
) -> None:
    """A full look cut short names the conversations it found beyond its room: each later
    claim asks about as many of them as it has room for, oldest first, each once; then,
    nothing left to ask, the next claim with room looks at every conversation again."""
    conversations = _tracking()
    conversations.claimed("t", None, ["s1"], complete=False, more=["m1", "m2", "m3", "m4", "m5"])
    for n, expected in enumerate(asked, start=1):
        assert conversations.request(100.0 + n / 100, ["t"], {"t": room}) == {"t": expected}


def test_a_full_look_replaces_what_the_last_one_found_beyond_its_room() -> None:
    """What a full look found beyond its room is news only until the next full look; a
    conversation announced meanwhile is asked about beside them."""
    conversations = _tracking()
    conversations.claimed("t", None, [], complete=False, more=["m1", "m2"])
    conversations.changed("t", "k")
    assert conversations.request(100.01, ["t"], {"t": 1}) == {"t": {"k", "m1"}}
    assert conversations.request(100.0 + FULL_EVERY_S, ["t"], {"t": 1}) == {"t": None}
    conversations.claimed("t", None, [], complete=True)
    assert conversations.request(101.01, ["t"], {"t": 1}) == {"t": set()}


def test_the_next_full_look_comes_soon_only_once_what_the_last_one_named_is_asked_about() -> None:
    """A full look cut short that named more conversations is not repeated while they last:
    they keep the target supplied; once all are asked about, and while the conversations
    they started announce more, the next comes FULL_AGAIN_S later."""
    conversations = _tracking()
    conversations.claimed("t", None, [], complete=False, more=["m1", "m2"])
    assert conversations.request(100.0 + FULL_AGAIN_S, ["t"], {"t": 1}) == {"t": {"m1"}}
    last = 100.0 + FULL_AGAIN_S + 0.01
    assert conversations.request(last, ["t"], {"t": 1}) == {"t": {"m2"}}
    conversations.changed("t", "m1")
    assert conversations.request(last + FULL_AGAIN_S - 0.001, ["t"], {"t": 1}) == {"t": {"m1"}}
    conversations.changed("t", "m1")
    assert conversations.request(last + FULL_AGAIN_S + 0.001, ["t"], {"t": 1}) == {"t": None}


@pytest.mark.parametrize(
    ("last_look", "announced", "room", "asked"),
    [
        pytest.param("cut short", [], 5, None, id="cut short, nothing to ask: look now"),
        pytest.param("cut short", ["k"], 5, {"k"}, id="cut short, something to ask: ask it"),
        pytest.param("cut short", [], 0, set(), id="cut short, no room: nothing"),
        pytest.param("complete", [], 5, set(), id="complete, nothing to ask: nothing"),
        pytest.param("complete", ["k"], 5, {"k"}, id="complete, something to ask: ask it"),
    ],
)
def test_a_claim_with_room_and_nothing_to_ask_looks_again_after_a_look_cut_short(
    last_look: str, announced: list[str], room: int, asked: set[str] | None
) -> None:
    """When the last look at every conversation had no room for all it found, a claim with
    room and nothing announced or named to ask about looks at every conversation again at
    once: what that look did not name would otherwise wait for the next one, and the target
    with it. After a look that found room for all, nothing is due that it did not start."""
    conversations = _tracking()
    conversations.claimed("t", None, ["s"], complete=last_look == "complete")
    for key in announced:
        conversations.changed("t", key)
    assert conversations.request(100.01, ["t"], {"t": room}) == {"t": asked}


def _full_run(runs: Runs, key: str = "a", first: int = 0) -> list[Delivery]:
    """A claim's run as long as a claim takes (so more may follow it), sorted into ``runs``."""
    run = [_delivery(first + n, key) for n in range(RUN)]
    assert runs.sort(run, {"t"}) == [run[0]]
    return run


def _go_on(runs: Runs, run: list[Delivery], upto: int, start: int = 0) -> None:
    """Each of ``run`` from index ``start`` ends delivered, and the next starts, until the
    one at index ``upto`` has started."""
    for delivery, following in itertools.pairwise(run[start : upto + 1]):
        assert runs.after(delivery.id, True) == (following, False)


def test_a_run_that_may_have_more_asks_once_for_what_follows_it_when_it_is_nearly_done() -> None:
    """A run as long as a claim takes asks, once EXTEND_AT of it wait, for what follows its
    last delivery (by target and conversation, once); a shorter run never asks."""
    runs = Runs()
    run = _full_run(runs)
    _go_on(runs, run, RUN - EXTEND_AT - 2)
    assert not runs.wants_more
    _go_on(runs, run, RUN - EXTEND_AT - 1, start=RUN - EXTEND_AT - 2)
    assert runs.wants_more
    assert runs.wanted() == {"t": {"a": run[-1].id}}
    assert not runs.wants_more
    assert runs.wanted() == {}
    short = [_delivery(100 + n, "b") for n in range(RUN - 1)]
    runs.sort(short, {"t"})
    _go_on(runs, short, len(short) - 1)
    assert runs.wanted() == {}


@pytest.mark.parametrize(
    ("started_upto", "more_count", "full", "joined", "look_at_end"),
    [
        pytest.param(RUN - EXTEND_AT - 1, 3, False, True, False, id="joins while its last waits"),
        pytest.param(RUN - 1, 3, False, True, False, id="joins behind its last on its way"),
        pytest.param(RUN - 1, RUN, True, True, True, id="a full read asks again at its end"),
        pytest.param(RUN - 1, 0, False, False, True, id="nothing read: a look at the end"),
    ],
)
def test_what_follows_a_run_joins_it_and_goes_on_in_order(
    started_upto: int, more_count: int, full: bool, joined: bool, look_at_end: bool
) -> None:
    """What was read behind a run's last delivery joins the run whether that delivery waits
    or is on its way: the run goes on through it in order, and its end asks for a look at
    the conversation only when more may follow (the read was full, or nothing was read)."""
    runs = Runs()
    run = _full_run(runs)
    _go_on(runs, run, RUN - EXTEND_AT - 1)
    assert runs.wanted() == {"t": {"a": run[-1].id}}
    _go_on(runs, run, started_upto, start=RUN - EXTEND_AT - 1)
    more = [_delivery(100 + n, "a") for n in range(more_count)]
    assert runs.extend(run[-1].id, more, full=full) is joined
    assert runs.parked == {d.id for d in run[started_upto + 1 :]} | {d.id for d in more}
    whole = run[started_upto:] + more
    _go_on(runs, whole, len(whole) - 1)
    assert runs.after(whole[-1].id, True) == (None, look_at_end)
    assert runs.parked == set()


@pytest.mark.parametrize(
    "meanwhile",
    [
        "its last ended",
        "a retry let the run go",
        "a replay let the run go",
        "its last was replayed on its way",
        "not a run's last",
    ],
)
def test_what_follows_a_run_that_ended_or_was_let_go_is_dropped(meanwhile: str) -> None:
    """A read that comes back after the run's last delivery ended, or after the run was let
    go, joins nothing: those deliveries stay with the outbox for a claim to find in order. So
    does one asked for behind a last delivery that was replayed while on its way (to the back
    of its conversation: what the read finds follows its new place, not this run), and that
    delivery's end asks for a look at the conversation."""
    runs = Runs()
    run = _full_run(runs)
    _go_on(runs, run, RUN - EXTEND_AT - 1)
    last = run[-1].id
    assert runs.wanted() == {"t": {"a": last}}
    if meanwhile == "its last ended":
        _go_on(runs, run, RUN - 1, start=RUN - EXTEND_AT - 1)
        assert runs.after(last, True) == (None, True)
    elif meanwhile == "a retry let the run go":
        assert runs.after(run[RUN - EXTEND_AT - 1].id, False) == (None, True)
    elif meanwhile == "a replay let the run go":
        runs.release({last})
    elif meanwhile == "its last was replayed on its way":
        _go_on(runs, run, RUN - 1, start=RUN - EXTEND_AT - 1)
        runs.release({last})
    else:
        last = run[-2].id
    more = [_delivery(100, "a"), _delivery(101, "a")]
    assert runs.extend(last, more, full=False) is False
    assert not runs.parked & {d.id for d in more}
    if meanwhile == "its last was replayed on its way":
        assert runs.after(last, True) == (None, True)
