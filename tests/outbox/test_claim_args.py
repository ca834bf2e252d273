"""The PostgreSQL claim's arguments and the order of its answer: pure decisions, no server
(gateway.outbox.postgres.claim)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.outbox.postgres.claim import (
    ANY_ORDER,
    CONVERSATION,
    NAMED_CONVERSATIONS,
    claim_args,
    in_order,
)

CASES: list[tuple[str, dict[str, Any], tuple[list[Any], ...]]] = [
    (
        "a target in any order has no runs, whatever runs says",
        {"limits": {"a": 5}, "ordered": set(), "conversations": {}, "runs": {"a": 4}},
        (["a"], [5], [ANY_ORDER], [0], [], []),
    ),
    (
        "an ordered target with runs of four: three followers each",
        {"limits": {"o": 3}, "ordered": {"o"}, "conversations": {}, "runs": {"o": 4}},
        (["o"], [3], [CONVERSATION], [3], [], []),
    ),
    (
        "a run of one is no run",
        {"limits": {"o": 3}, "ordered": {"o"}, "conversations": {}, "runs": {"o": 1}},
        (["o"], [3], [CONVERSATION], [0], [], []),
    ),
    (
        "named conversations belong to their target by its place in the arrays",
        {
            "limits": {"a": 1, "n": 2, "m": 3},
            "ordered": {"n", "m"},
            "conversations": {"n": ["x", "y"], "m": ["z"], "a": ["ignored"]},
            "runs": {},
        },
        (
            ["a", "n", "m"],
            [1, 2, 3],
            [ANY_ORDER, NAMED_CONVERSATIONS, NAMED_CONVERSATIONS],
            [0, 0, 0],
            [2, 2, 3],
            ["x", "y", "z"],
        ),
    ),
    (
        "no conversation named: the target is asked for none of them",
        {"limits": {"n": 2}, "ordered": {"n"}, "conversations": {"n": []}, "runs": {}},
        (["n"], [2], [NAMED_CONVERSATIONS], [0], [], []),
    ),
]


@pytest.mark.parametrize(("case", "given", "expected"), CASES, ids=[c[0] for c in CASES])
def test_claim_args_spell_each_target_as_its_own_claim_would(
    case: str, given: dict[str, Any], expected: tuple[list[Any], ...]
) -> None:
    """Each target's limit, order mode, followers and named conversations, element by element."""
    assert claim_args(**given) == expected


def _row(rowid: int, due: float, head: int, step: int) -> tuple[Any, ...]:
    return (rowid, *[None] * 8, due, *[None] * 7, head, step)


def test_in_order_puts_first_deliveries_by_due_time_each_followed_by_its_run() -> None:
    """Oldest first deliveries first (ties by id), each run right behind its first, in steps."""
    rows = [
        _row(7, 5.0, 3, 2),
        _row(3, 5.0, 3, 0),
        _row(9, 1.0, 9, 0),
        _row(6, 5.0, 3, 1),
        _row(2, 5.0, 2, 0),
    ]
    assert [row[0] for row in in_order(rows)] == [9, 2, 3, 6, 7]
