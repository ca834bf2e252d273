"""The PostgreSQL outbox's claim as text to EXPLAIN: its placeholders filled with the values a
claim of one conversation-ordered target passes."""

from __future__ import annotations

from gateway.outbox.postgres import claim


def ordered_claim(target: str, now: float, limit: int, run: int = 1) -> str:
    """CLAIM for ``target`` (order = "conversation", every conversation, runs of ``run``)
    claiming up to ``limit`` due by ``now``, as a literal statement."""
    values = {
        "$1": f"ARRAY['{target}']::text[]",
        "$2": f"ARRAY[{limit}]::integer[]",
        "$3": f"ARRAY[{claim.CONVERSATION}]::integer[]",
        "$4": f"ARRAY[{run - 1}]::integer[]",
        "$5": repr(float(now)),
        "$6": "'explain'",
        "$7": "'{}'::bigint[]",
        "$8": "60",
        "$9": "'{}'::integer[]",
        "$10": "'{}'::text[]",
    }
    statement = claim.CLAIM
    for mark in sorted(values, key=lambda mark: -int(mark[1:])):  # $10 before $1
        statement = statement.replace(mark, values[mark])
    return statement
