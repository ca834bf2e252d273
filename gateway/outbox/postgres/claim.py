"""A dispatcher's claim on the PostgreSQL outbox: every target's due deliveries, and the runs
that follow the first delivery of each conversation, in one statement (one round trip).

Rule: the statement takes one element per target (its name, how many it may claim, how its
order is kept, how long its runs may be), so its text is the same whichever targets a claim
names and the driver prepares it once per connection. :func:`claim_args` turns the
dispatcher's question into those arrays and :func:`in_order` puts the answer in the order a
claim promises; both are pure.

What each target's part claims is what it claimed as a statement of its own: rows another
dispatcher holds locked are skipped (``FOR UPDATE SKIP LOCKED``: no waiting, no double send),
rows another living gateway leased are left alone until the lease runs out, rows this gateway
leased (at accept) are its own. A run is leased only as far as it is contiguous: a follower
another gateway holds, locked or leased, ends the run there, and nothing behind it is leased.
What follows a run near its end (:data:`EXTEND`, the outbox's ``following``) is leased the
same way, by the same common table expressions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from gateway.outbox.postgres.schema import SCHEMA
from gateway.outbox.rows import DELIVERY_COLUMNS

__all__ = [
    "ANY_ORDER",
    "CLAIM",
    "CONVERSATION",
    "EXTEND",
    "NAMED_CONVERSATIONS",
    "claim_args",
    "in_order",
]

# How a target's part keeps order: none; the first pending delivery of each conversation only;
# the same, for the conversations the claim names only (those whose first may have changed).
ANY_ORDER: Final = 0
CONVERSATION: Final = 1
NAMED_CONVERSATIONS: Final = 2

_NOW = "extract(epoch FROM clock_timestamp())"
# A delivery's place in its conversation: its id, or where a replay put it.
_PLACE = "COALESCE({0}.position, {0}.id)"
# Due, and free to lease: not leased, leased by this gateway ($6), or its lease has run out.
_FREE = (
    "{0}.next_attempt_at <= $5"
    " AND ({0}.lease_until IS NULL OR {0}.lease_owner = $6 OR {0}.lease_until <= {_NOW})"
)
# A keyed delivery waits while an earlier one of its conversation is pending (in flight here or
# at another gateway, retrying, behind an open breaker); a dead letter is not pending, so it
# releases the key. Ids are handed out before commit: two gateways accepting the same
# conversation within the same milliseconds may commit out of id order, and that pair goes in
# id order (Meta itself guarantees no order there). Answered by the deliveries_order index.
_FIRST_OF_ITS_CONVERSATION = f"""
          AND (c0.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM {SCHEMA}.deliveries e
            WHERE e.state = 'pending' AND e.target = c0.target AND e.order_key = c0.order_key
              AND {_PLACE.format("e")} < {_PLACE.format("c0")}))"""
# One target's part: its due deliveries, oldest first, up to its limit, locked; ``rows``: what
# they are taken from.
_PART = """
    SELECT c1.id, t.run FROM t CROSS JOIN LATERAL (
        SELECT c0.id FROM {rows}
        WHERE c0.state = 'pending' AND c0.target = t.target AND {free}
          AND c0.id <> ALL($7::bigint[]){ordered}
        ORDER BY c0.next_attempt_at
        LIMIT t.lim
        FOR UPDATE OF c0 SKIP LOCKED) c1
    WHERE t.mode = {mode}"""
# Every pending delivery of the target.
_EVERY = f"{SCHEMA}.deliveries c0"
# The first pending delivery of each conversation the claim names: one probe of the
# conversation index per key, in place order. Only a first one can be claimed: taking every
# pending delivery of the named conversations and asking each whether an earlier one is pending
# read every pending delivery of them, each compared with the ids in flight (491 ms a claim over
# 20 conversations of 2,000 with 256 in flight, now 2 ms: bench/README.md).
_FIRSTS_NAMED = f"""unnest(t.keys) AS k (key)
        CROSS JOIN LATERAL (
            SELECT f0.id FROM {SCHEMA}.deliveries f0
            WHERE f0.state = 'pending' AND f0.target = t.target AND f0.order_key = k.key
            ORDER BY {_PLACE.format("f0")}
            LIMIT 1) f1
        JOIN {SCHEMA}.deliveries c0 ON c0.id = f1.id"""


def _part(mode: int, ordered: str = "", rows: str = _EVERY) -> str:
    return _PART.format(rows=rows, free=_FREE.format("c0", _NOW=_NOW), ordered=ordered, mode=mode)


# Runs (f, g, r), behind each delivery of ``h`` (its id, target, order_key, place and ``run``,
# how many may follow it): the deliveries after it in its conversation, in order, up to ``run``,
# as far as each is due and free to lease (f.free); those are locked skipping what another
# dispatcher holds (g), and a run is kept up to its first row not locked here (r: the count of
# locked rows up to each step equals the step), so nothing past a gap is leased. Rows are found
# again by id one at a time (LATERAL) or as an array (= ANY), so the primary key finds them
# however few the planner guesses a CTE holds (a guess of one row made a join of two CTEs, or a
# scan of every pending row, of a claim of hundreds). $5 is now, $6 this gateway.
_RUNS = f"""f AS (
    SELECT e.id, h.id AS head, row_number() OVER w AS step,
        bool_and({_FREE.format("e", _NOW=_NOW)}) OVER w AS free
    FROM h CROSS JOIN LATERAL (
        SELECT e0.id, e0.next_attempt_at, e0.lease_owner, e0.lease_until,
            {_PLACE.format("e0")} AS place
        FROM {SCHEMA}.deliveries e0
        WHERE e0.state = 'pending' AND e0.target = h.target AND e0.order_key = h.order_key
          AND {_PLACE.format("e0")} > h.place
        ORDER BY {_PLACE.format("e0")}
        LIMIT h.run) e
    WINDOW w AS (PARTITION BY h.id ORDER BY e.place)
), g AS (
    SELECT g1.id FROM f CROSS JOIN LATERAL (
        SELECT g0.id FROM {SCHEMA}.deliveries g0
        WHERE g0.id = f.id AND g0.state = 'pending'
        FOR UPDATE SKIP LOCKED) g1
    WHERE f.free
), r AS (
    SELECT f.id, f.head, f.step,
        count(*) FILTER (WHERE f.id IN (SELECT g.id FROM g))
            OVER (PARTITION BY f.head ORDER BY f.step) AS held
    FROM f
)"""

# $1 to $4, one element per target: name, limit, mode (ANY_ORDER...), followers per first
# delivery (0: no runs); $5 now (the dispatcher's clock), $6 this gateway, $7 ids in flight
# here, $8 the lease in seconds (on the database's clock), $9 and $10 the named conversations
# (the 1-based target each belongs to, its key). Each row: a delivery, the first delivery of
# the run it belongs to (itself for a first one) and its step behind it (0 for a first one).
# The runs are _RUNS behind each first delivery claimed with a run length (h).
CLAIM: Final = f"""
WITH t AS (
    SELECT t0.*, ARRAY(SELECT k.key FROM unnest($9::integer[], $10::text[]) AS k (i, key)
        WHERE k.i = t0.i) AS keys
    FROM unnest($1::text[], $2::integer[], $3::integer[], $4::integer[])
        WITH ORDINALITY AS t0 (target, lim, mode, run, i)
), c AS ({_part(ANY_ORDER)}
    UNION ALL{_part(CONVERSATION, _FIRST_OF_ITS_CONVERSATION)}
    UNION ALL{_part(NAMED_CONVERSATIONS, rows=_FIRSTS_NAMED)}
), h AS (
    SELECT h0.id, h0.target, h0.order_key, {_PLACE.format("h0")} AS place, c.run
    FROM c JOIN {SCHEMA}.deliveries h0 ON h0.id = c.id
    WHERE c.run > 0 AND h0.order_key IS NOT NULL
), {_RUNS}, l AS (
    SELECT c.id, c.id AS head, 0::bigint AS step FROM c
    UNION ALL
    SELECT r.id, r.head, r.step FROM r WHERE r.held = r.step
)
UPDATE {SCHEMA}.deliveries d SET lease_owner = $6, lease_until = {_NOW} + $8
FROM l, {SCHEMA}.notifications n
WHERE d.id = l.id AND d.id = ANY(ARRAY(SELECT l.id FROM l)) AND n.id = d.notification_id
RETURNING {DELIVERY_COLUMNS}, l.head, l.step
"""

# What follows the last delivery of each of a gateway's runs near their end, leased to it as a
# claim leases a run (the dispatcher's _extend_runs): $1 those deliveries' row ids (each still
# pending, of target $2, in a conversation), $3 how many may follow each, $4 the lease in
# seconds, $5 now, $6 this gateway. Each row: a delivery, the run's last delivery it follows,
# and its step behind it (from 1). A conversation another gateway holds a delivery of ends
# there, as a claim's run does. Only from a last delivery this gateway still leases: one whose
# lease ran out (a gateway stalled past lease_s) may be another gateway's now, and so may what
# follows it.
EXTEND: Final = f"""
WITH h AS (
    SELECT h0.id, h0.target, h0.order_key, {_PLACE.format("h0")} AS place, $3::integer AS run
    FROM {SCHEMA}.deliveries h0
    WHERE h0.id = ANY($1::bigint[]) AND h0.state = 'pending' AND h0.target = $2
      AND h0.order_key IS NOT NULL AND h0.lease_owner = $6 AND h0.lease_until > {_NOW}
), {_RUNS}, l AS (
    SELECT r.id, r.head, r.step FROM r WHERE r.held = r.step
)
UPDATE {SCHEMA}.deliveries d SET lease_owner = $6, lease_until = {_NOW} + $4::float8
FROM l, {SCHEMA}.notifications n
WHERE d.id = l.id AND d.id = ANY(ARRAY(SELECT l.id FROM l)) AND n.id = d.notification_id
RETURNING {DELIVERY_COLUMNS}, l.head, l.step
"""


def claim_args(
    limits: Mapping[str, int],
    ordered: Collection[str],
    conversations: Mapping[str, Collection[str]],
    runs: Mapping[str, int],
) -> tuple[list[str], list[int], list[int], list[int], list[int], list[str]]:
    """CLAIM's per-target arrays ($1 to $4) and named conversations ($9, $10) for a claim of
    ``limits`` (see :meth:`gateway.outbox.interface.Outbox.due` for the rest): order and runs
    apply to the ordered targets only, and a run of one is no run."""
    targets, lims, modes, followers, key_of, keys = [], [], [], [], [], []
    for number, (target, limit) in enumerate(limits.items(), 1):
        targets.append(target)
        lims.append(limit)
        if target not in ordered:
            modes.append(ANY_ORDER)
            followers.append(0)
            continue
        named = conversations.get(target)
        modes.append(CONVERSATION if named is None else NAMED_CONVERSATIONS)
        for key in named or ():
            key_of.append(number)
            keys.append(key)
        followers.append(max(runs.get(target, 1) - 1, 0))
    return targets, lims, modes, followers, key_of, keys


def in_order(rows: Sequence[Any]) -> list[Any]:
    """CLAIM's rows oldest first deliveries first (by due time, then id), each followed by its
    run in its order; rows as CLAIM returns them (a delivery's columns, its first, its step)."""
    due = {row[0]: row[9] for row in rows if row[-1] == 0}
    return sorted(rows, key=lambda row: (due.get(row[-2], row[9]), row[-2], row[-1]))
