"""The ordered targets' conversations a SQLite outbox's dispatcher holds in memory: which
delivery a claim hands out, what an outcome, a replay or a delivery let go changes, and when a
fresh delivery is known to be first of its conversation. Pure bookkeeping, no file."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.outbox.sqlite.lineup import Lineup

NOW = 100.0
Row = tuple[str | None, int, int, float]  # key, row id, place, due at


def _id(rowid: int) -> str:
    return f"p-{rowid}"


def _lined(rows: Sequence[Row], target: str = "t") -> Lineup:
    lineup = Lineup()
    lineup.keep([target])
    lineup.load(target, sorted(rows, key=lambda r: (r[0] or "", r[2])), NOW)
    lineup.read_to(max((r[1] for r in rows), default=0), max((r[1] for r in rows), default=0))
    return lineup


def _take(
    lineup: Lineup, limit: int = 100, busy: Sequence[int] = (), now: float = NOW
) -> list[int]:
    return [rowid for rowid, _ in lineup.take("t", limit, now, {_id(r) for r in busy}, _id)]


@pytest.mark.parametrize(
    ("rows", "limit", "handed"),
    [
        pytest.param(
            [("a", 1, 1, 0), ("b", 2, 2, 0), ("a", 3, 3, 0), ("c", 4, 4, 0)],
            10,
            [1, 2, 4],
            id="the first of each conversation, lowest place first",
        ),
        pytest.param(
            [("a", 1, 1, 0), ("b", 2, 2, 0), ("c", 3, 3, 0)],
            2,
            [1, 2],
            id="no more than the limit, the oldest",
        ),
        pytest.param(
            [("a", 1, 9, 0), ("a", 2, 2, 0), ("b", 3, 3, 0)],
            10,
            [2, 3],
            id="a replayed one at its new place, behind the rest of its conversation",
        ),
        pytest.param(
            [("a", 1, 1, NOW + 5), ("a", 2, 2, 0), ("b", 3, 3, 0)],
            10,
            [3],
            id="a first one due later holds its conversation, not the others",
        ),
        pytest.param(
            [(None, 1, 1, 0), (None, 2, 2, 0)],
            10,
            [1, 2],
            id="deliveries stored with no conversation wait for nothing",
        ),
    ],
)
def test_a_claim_hands_out_the_first_due_delivery_of_each_conversation(
    rows: list[Row], limit: int, handed: list[int]
) -> None:
    assert _take(_lined(rows), limit) == handed


def test_a_conversation_whose_first_delivery_is_in_flight_hands_out_nothing() -> None:
    lineup = _lined([("a", 1, 1, 0), ("a", 2, 2, 0), ("b", 3, 3, 0)])
    assert _take(lineup, busy=[1]) == [3]
    assert _take(lineup, busy=[1, 3]) == []


@pytest.mark.parametrize(
    ("again_at", "now", "handed"),
    [
        pytest.param(None, NOW, [2], id="delivered or dead: the next of its conversation"),
        pytest.param(NOW + 10, NOW, [], id="retried: nothing of it before the retry"),
        pytest.param(NOW + 10, NOW + 10, [1], id="retried: the same one once due"),
    ],
)
def test_an_outcome_decides_what_of_its_conversation_goes_next(
    again_at: float | None, now: float, handed: list[int]
) -> None:
    lineup = _lined([("a", 1, 1, 0), ("a", 2, 2, 0)])
    assert _take(lineup) == [1]
    lineup.ended([(1, again_at)])
    lineup.settle(now)
    assert _take(lineup, busy=[], now=now) == handed


def test_a_delivery_let_go_without_an_outcome_is_handed_out_again() -> None:
    lineup = _lined([("a", 1, 1, 0), ("a", 2, 2, 0)])
    assert _take(lineup) == [1]
    assert _take(lineup, busy=[1]) == []  # still out
    assert _take(lineup, busy=[]) == [1]  # not in flight any more, and no outcome


def test_the_outcome_of_a_delivery_replayed_while_out_changes_nothing() -> None:
    """The outbox does not record an outcome over a replay made while the attempt was out:
    the delivery stays pending at its new place, at the back of its conversation."""
    lineup = _lined([("a", 1, 1, 0), ("a", 2, 2, 0)])
    assert _take(lineup) == [1]
    # Read again after the replay: 1 is now behind 2.
    lineup.load("t", [("a", 2, 2, 0), ("a", 1, 3, 0)], NOW)
    lineup.ended([(1, None)])
    lineup.settle(NOW)
    assert _take(lineup) == [2]
    lineup.ended([(2, None)])
    lineup.settle(NOW)
    assert _take(lineup) == [1]


def test_a_delivery_found_gone_or_not_yet_due_at_hand_out_goes_back_as_such() -> None:
    lineup = _lined([("a", 1, 1, 0), ("a", 2, 2, 0), ("b", 3, 3, 0)])
    assert _take(lineup) == [1, 3]
    lineup.gone("t", 1, "a", NOW)  # no longer pending in the file
    lineup.not_due("t", 3, "b", NOW + 5, NOW)
    assert _take(lineup) == [2]
    assert _take(lineup, busy=[2], now=NOW + 5) == [3]


def test_deliveries_stored_later_join_the_back_of_their_conversations() -> None:
    lineup = _lined([("a", 1, 1, 0)])
    lineup.add([("t", "a", 5, 0), ("t", "b", 6, 0), ("elsewhere", "c", 7, 0)], NOW)
    assert _take(lineup) == [1, 6]
    assert lineup.waiting() == {"t": 3}


def test_held_back_counts_the_conversations_with_a_delivery_waiting() -> None:
    lineup = _lined(
        [("a", 1, 1, 0), ("a", 2, 2, 0), ("b", 3, 3, 0), ("c", 4, 4, 0), ("c", 5, 5, 0)]
    )
    assert lineup.held_back(["t", "other"]) == {"t": 2}


def _stored_at(lineup: Lineup, last: int) -> None:
    lineup.read_to(last, last)


@pytest.mark.parametrize(
    ("setup", "rowid", "behind"),
    [
        pytest.param("read", 11, False, id="first of its conversation, every id accounted for"),
        pytest.param("pending", 11, True, id="its conversation has a pending delivery"),
        pytest.param("stored here", 12, True, id="stored here since the last read"),
        pytest.param("stored here other", 12, False, id="stored here since, another one's"),
        pytest.param("elsewhere", 12, True, id="an id stored by another process since"),
        pytest.param("stale", 11, True, id="to be read again (a replay)"),
        pytest.param("other target", 11, True, id="a target not lined up"),
        pytest.param("inactive", 11, True, id="no claim has lined anything up"),
    ],
)
def test_a_fresh_delivery_is_first_of_its_conversation_only_when_that_is_known(
    setup: str, rowid: int, behind: bool
) -> None:
    lineup = _lined([("a", 1, 1, 0)])
    _stored_at(lineup, 10)
    target, key = "t", "new"
    if setup == "pending":
        key = "a"
    elif setup == "stored here":
        assert lineup.behind("t", "new", 11) is False
    elif setup == "stored here other":
        assert lineup.behind("t", "other", 11) is False
    elif setup == "stale":
        lineup.stale = True
    elif setup == "other target":
        target = "u"
    elif setup == "inactive":
        lineup = Lineup()
    assert lineup.behind(target, key, rowid) is behind


def test_a_delivery_that_ended_no_longer_holds_a_fresh_one_back() -> None:
    lineup = _lined([("a", 1, 1, 0)])
    _stored_at(lineup, 10)
    assert _take(lineup) == [1]
    lineup.ended([(1, None)])
    assert lineup.behind("t", "a", 11) is False
