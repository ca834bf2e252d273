"""What both SQL backends share: how a delivery id is spelled, a delivery row's columns, and
what an attempt's outcome leaves in its row.

Rule: a delivery id is ``<prefix>-<row id>``: the row id is the deliveries table's own key (never
handed out twice, even after pruning) and the prefix is random, made once with the store, so
ids stay unique across outboxes and gateways. Targets receive it as ``X-Gateway-Delivery-Id``
and may deduplicate on it. Both backends read deliveries as the same seventeen columns, in the
order :func:`delivery_from_row` names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from gateway.errors import OutboxError
from gateway.outbox.model import (
    STATES,
    Backlog,
    DeadLetter,
    Delivered,
    Delivery,
    Outcome,
    RetryAt,
    State,
    made,
)

__all__ = [
    "DELIVERY_COLUMNS",
    "MORE_KEYS",
    "backlog_from_rows",
    "delivery_from_row",
    "delivery_id_of",
    "rowid_of",
    "rowids_named",
    "state_of",
    "stored_outcome",
]

# The conversations beyond its limit a look at every conversation of an ordered target names
# (Outbox.due's ``more``), per delivery of the limit: their keys only (no body is read), enough
# for a few claims' worth of first deliveries.
MORE_KEYS: Final = 8

_MAX_ROWID: Final = 2**63 - 1  # SQLite's INTEGER and PostgreSQL's BIGINT alike
# The select list, in both dialects, of a delivery ``d`` joined to its notification ``n``: the
# columns delivery_from_row reads, in its order (a split part's own body, else Meta's bytes).
DELIVERY_COLUMNS: Final = (
    "d.id, d.notification_id, d.target, COALESCE(d.body, n.body), n.signature,"
    " d.body IS NOT NULL, d.state, d.attempts, d.created_at, d.next_attempt_at, n.received_at,"
    " d.last_status, d.last_error, d.last_response, d.order_key, n.trace, d.held_s"
)


def delivery_id_of(prefix: str, rowid: int) -> str:
    """The id of delivery ``rowid`` in the store whose prefix is ``prefix`` (see
    :func:`rowid_of`, its inverse)."""
    return f"{prefix}-{rowid}"


def rowid_of(delivery_id: str, prefix: str) -> int | None:
    """The row id that ``delivery_id`` names in the store whose prefix is ``prefix``; ``None``
    when it is another store's id or no delivery id at all (so it finds nothing)."""
    head, _, digits = delivery_id.rpartition("-")
    if head != prefix or not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        return None
    rowid = int(digits)
    # Only the spelling delivery_id_of writes: "p-007" names nothing rather than delivery 7.
    return rowid if str(rowid) == digits and rowid <= _MAX_ROWID else None


def rowids_named(named: Mapping[str, str], prefix: str) -> dict[str, int]:
    """For each key of ``named``, the row id its delivery id names in the store whose prefix
    is ``prefix``; a key whose id names nothing there is left out."""
    return {
        key: rowid
        for key, delivery_id in named.items()
        if (rowid := rowid_of(delivery_id, prefix)) is not None
    }


_STATE_OF: Final[dict[object, State]] = {state: state for state in STATES}


def state_of(value: object) -> State:
    """A delivery's state as stored; raises OutboxError for anything but the three known (a
    file or schema written by something else)."""
    state = _STATE_OF.get(value)
    if state is None:
        raise OutboxError(f"a delivery row holds an unknown state {value!r}")
    return state


def delivery_from_row(row: Sequence[Any], prefix: str) -> Delivery:
    """A delivery read as (id, notification id, target, body, signature, split, state,
    attempts, created at, next attempt at, received at, last status, last error, last
    response, conversation key, trace context, seconds held by pacing)."""
    return made(
        (
            delivery_id_of(prefix, row[0]),
            row[1],
            row[2],
            bytes(row[3]),
            row[4],
            bool(row[5]),
            state_of(row[6]),
            row[7],
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13],
            row[14],
            False,  # behind: said only of a delivery just accepted (Delivery.fresh)
            row[15],
            row[16],
        )
    )


def backlog_from_rows(rows: Iterable[Sequence[Any]]) -> list[Backlog]:
    """Each target's :class:`Backlog` from rows of (target, state, count, oldest creation
    time), one per target and state (``pending`` or ``dead``), sorted by target."""
    found: dict[str, Backlog] = {}
    for target, state, count, oldest in rows:
        known = found.get(target) or Backlog(target, 0, None, 0)
        if state == "pending":
            found[target] = Backlog(target, int(count), oldest, known.dead)
        else:
            found[target] = Backlog(target, known.pending, known.oldest_pending_at, int(count))
    return [found[name] for name in sorted(found)]


def stored_outcome(outcome: Outcome, now: float) -> tuple[State, float, str | None, float]:
    """What an attempt's ``outcome``, recorded at ``now``, leaves in its delivery's row: the
    state, the next attempt's time (``now`` once none is due), the error, and the seconds held
    by pacing kept for the next attempt (0 unless retried)."""
    if isinstance(outcome, Delivered):
        return "delivered", now, None, 0.0
    if isinstance(outcome, RetryAt):
        return "pending", outcome.at, outcome.reason, outcome.held_s
    assert isinstance(outcome, DeadLetter)
    return "dead", now, outcome.reason, 0.0
