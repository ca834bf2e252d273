"""Every statement the PostgreSQL outbox runs.

Rule: the statements alone, as constants; :mod:`gateway.outbox.postgres.outbox` runs them. Times
are seconds since the epoch as the callers give them (the dispatcher's clock), except leases,
which are measured on the database's clock so that every gateway sharing it agrees on when a
lease has run out, whatever their own clocks say.

Delivery ids are spelled as :mod:`gateway.outbox.rows` says, as in the SQLite outbox: the prefix
is the database's, made with its schema, and the row id an identity column, never handed out
twice. Deliveries are read in the column order :func:`gateway.outbox.rows.delivery_from_row`
names.
"""

from __future__ import annotations

from typing import Any, Final

from gateway.outbox.postgres.schema import SCHEMA
from gateway.outbox.rows import DELIVERY_COLUMNS

__all__ = [
    "ACCEPT",
    "ATTEMPTS",
    "BACKLOG",
    "CHANNEL",
    "CLAIM",
    "CLAIM_ORDERED",
    "CLAIM_ORDERED_OF",
    "CLAIM_RUNS",
    "COUNT",
    "EXCERPT_CHARS",
    "GET",
    "GIVE_BACK_TOKENS",
    "HELD_BACK",
    "PRUNE_BATCH",
    "PRUNE_DELIVERED",
    "PRUNE_DIGESTS",
    "PRUNE_NOTIFICATIONS",
    "PURGE_DEAD",
    "RECORD",
    "RENEW",
    "REPLAY",
    "SIZE",
    "TAKE_TOKENS",
    "list_query",
    "replay_many_query",
    "replay_places_query",
]

# LISTEN/NOTIFY channel: "there are deliveries any gateway may claim now".
CHANNEL: Final = "waba_gateway_due"
PRUNE_BATCH: Final = 5000
EXCERPT_CHARS: Final = 1024
_NOW = "extract(epoch FROM clock_timestamp())"

# One statement, one round trip: the deduplication upsert, the notification, one delivery per
# route (targets $6, bodies $7, NULL for Meta's bytes), leased to $8 for $9 seconds when $8 is
# set; $12: each delivery's conversation key (NULL: none), and ``behind`` the ids of those an
# earlier pending delivery of their conversation holds back (of those committed before this
# statement: the caller adds the notification's own). Always exactly one row: the
# notification id and its delivery ids in route order, or NULLs for a duplicate. $10: announce
# the new deliveries to every gateway (when no lease holds them). $13: the trace context of
# the request that brought it (NULL: not traced).
# A body is new when the digest was last seen outside the window around now ($3 and $11, that
# is now -/+ dedup_window_s): gateways commit concurrently, so the row may hold a later time
# than this request's own.
ACCEPT: Final = f"""
WITH fresh AS (
    INSERT INTO {SCHEMA}.digests AS d (digest, received_at) VALUES ($1, $2)
    ON CONFLICT (digest) DO UPDATE SET received_at = GREATEST(d.received_at, $2)
    WHERE d.received_at < $3 OR d.received_at > $11
    RETURNING 1
), n AS (
    INSERT INTO {SCHEMA}.notifications (received_at, signature, body, trace)
    SELECT $2, $4, $5, $13 FROM fresh
    RETURNING id
), x AS (
    INSERT INTO {SCHEMA}.deliveries (notification_id, target, body, state, created_at,
        next_attempt_at, updated_at, lease_owner, lease_until, order_key)
    SELECT n.id, r.target, r.body, 'pending', $2, $2, $2, $8,
        CASE WHEN $8::text IS NULL THEN NULL ELSE {_NOW} + $9 END, r.key
    FROM n, unnest($6::text[], $7::bytea[], $12::text[]) WITH ORDINALITY
        AS r (target, body, key, ord)
    ORDER BY r.ord
    RETURNING id, target, order_key
)
SELECT (SELECT id FROM n) AS notification_id,
    (SELECT array_agg(id ORDER BY id) FROM x) AS ids,
    (SELECT pg_notify('{CHANNEL}', '') FROM n WHERE $10::boolean) AS announced,
    (SELECT array_agg(x.id) FROM x WHERE x.order_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM {SCHEMA}.deliveries e WHERE e.state = 'pending' AND e.target = x.target
        AND e.order_key = x.order_key AND COALESCE(e.position, e.id) < x.id)) AS behind
"""


# A delivery's place in its conversation: its id, or where a replay put it (REPLAY).
_PLACE = "COALESCE({0}.position, {0}.id)"
# For a target with order = "conversation": a keyed delivery waits while an earlier one of its
# conversation is pending (in flight here or at another gateway, retrying, behind an open
# breaker); a dead letter is not pending, so it releases the key. Ids are handed out before
# commit: two gateways accepting the same conversation within the same milliseconds may commit
# out of id order, and that pair goes in id order (Meta itself guarantees no order there).
_FIRST_OF_ITS_CONVERSATION = f"""
      AND (c0.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM {SCHEMA}.deliveries e
        WHERE e.state = 'pending' AND e.target = c0.target AND e.order_key = c0.order_key
          AND {_PLACE.format("e")} < {_PLACE.format("c0")}))"""

# Claim one target's due deliveries for $3 until $6 seconds from now: rows another dispatcher
# holds locked are skipped (no waiting, no double send), rows it leased are left alone until
# the lease runs out, rows this gateway leased (at accept) are its own. $4: ids in flight here.
_CLAIM = """
WITH c AS (
    SELECT id FROM {SCHEMA}.deliveries c0
    WHERE state = 'pending' AND target = $1 AND next_attempt_at <= $2
      AND (lease_until IS NULL OR lease_owner = $3 OR lease_until <= {_NOW})
      AND id <> ALL($4::bigint[]){ordered}
    ORDER BY next_attempt_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
)
UPDATE {SCHEMA}.deliveries d SET lease_owner = $3, lease_until = {_NOW} + $6
FROM c, {SCHEMA}.notifications n
WHERE d.id = c.id AND n.id = d.notification_id
RETURNING {DELIVERY_COLUMNS}
"""
CLAIM: Final = _CLAIM.format(
    SCHEMA=SCHEMA, _NOW=_NOW, DELIVERY_COLUMNS=DELIVERY_COLUMNS, ordered=""
)
CLAIM_ORDERED: Final = _CLAIM.format(
    SCHEMA=SCHEMA,
    _NOW=_NOW,
    DELIVERY_COLUMNS=DELIVERY_COLUMNS,
    ordered=_FIRST_OF_ITS_CONVERSATION,
)
# The same for the conversations $7 only (those whose first delivery may have changed).
CLAIM_ORDERED_OF: Final = _CLAIM.format(
    SCHEMA=SCHEMA,
    _NOW=_NOW,
    DELIVERY_COLUMNS=DELIVERY_COLUMNS,
    ordered=f"\n      AND c0.order_key = ANY($7::text[]){_FIRST_OF_ITS_CONVERSATION}",
)

# The deliveries that follow each claimed first delivery $4 of target $1 in its conversation,
# in order: up to $5 each, as far as each is due by $2 and free to lease (not another living
# gateway's), leased to $3 for $6 seconds like the first. Each row says which first delivery it
# follows, and its step behind it: a row locked elsewhere is skipped, and the caller keeps a
# run only up to its first gap.
CLAIM_RUNS: Final = f"""
WITH h AS (
    SELECT id, order_key, {_PLACE.format("h0")} AS place FROM {SCHEMA}.deliveries h0
    WHERE id = ANY($4::bigint[]) AND order_key IS NOT NULL
), f AS (
    SELECT e.id, h.id AS head,
        row_number() OVER (PARTITION BY h.id ORDER BY e.place) AS step,
        bool_and(e.next_attempt_at <= $2
            AND (e.lease_until IS NULL OR e.lease_owner = $3 OR e.lease_until <= {_NOW}))
            OVER (PARTITION BY h.id ORDER BY e.place) AS free
    FROM h CROSS JOIN LATERAL (
        SELECT e0.id, e0.next_attempt_at, e0.lease_owner, e0.lease_until,
            {_PLACE.format("e0")} AS place
        FROM {SCHEMA}.deliveries e0
        WHERE e0.state = 'pending' AND e0.target = $1 AND e0.order_key = h.order_key
          AND {_PLACE.format("e0")} > h.place
        ORDER BY {_PLACE.format("e0")}
        LIMIT $5) e
), c AS (
    SELECT d0.id FROM {SCHEMA}.deliveries d0 JOIN f ON f.id = d0.id
    WHERE f.free AND d0.state = 'pending'
    FOR UPDATE OF d0 SKIP LOCKED
)
UPDATE {SCHEMA}.deliveries d SET lease_owner = $3, lease_until = {_NOW} + $6
FROM c, f, {SCHEMA}.notifications n
WHERE d.id = c.id AND f.id = c.id AND n.id = d.notification_id
RETURNING {DELIVERY_COLUMNS}, f.head, f.step
"""

# Take up to $4 tokens from target $1's bucket (refilled at $2 per second on the database's
# clock, up to $3), for every gateway at once: the row is locked by the statement, and the new
# level and the grant are both computed from the row as it stood. Returns the grant.
_LEVEL = f"LEAST($3::float8, b.tokens + GREATEST(0, {_NOW} - b.at) * $2::float8)"
TAKE_TOKENS: Final = f"""
INSERT INTO {SCHEMA}.buckets AS b (target, tokens, at, granted)
VALUES ($1, $3::float8 - LEAST($4::integer, floor($3::float8)), {_NOW},
    LEAST($4::integer, floor($3::float8)))
ON CONFLICT (target) DO UPDATE SET
    tokens = {_LEVEL} - LEAST($4::integer, floor({_LEVEL})),
    at = {_NOW},
    granted = LEAST($4::integer, floor({_LEVEL}))
RETURNING granted
"""
# Tokens taken and not used (fewer deliveries were due), given back.
GIVE_BACK_TOKENS: Final = f"""
UPDATE {SCHEMA}.buckets SET tokens = LEAST($3::float8, tokens + $2::float8) WHERE target = $1
"""

# An attempt's outcome, which ends the lease; skipped when another gateway took the delivery
# over meanwhile (this one's lease ran out): its outcome is the one that counts.
# It is also kept in the delivery's attempt history.
RECORD: Final = f"""
WITH u AS (
    UPDATE {SCHEMA}.deliveries SET state = $1, attempts = attempts + 1, next_attempt_at = $2,
        updated_at = $3, last_status = $4, last_error = $5, last_response = $6,
        lease_owner = NULL, lease_until = NULL, held_s = $9
    WHERE id = $7 AND (lease_owner IS NULL OR lease_owner = $8)
    RETURNING id, attempts
)
INSERT INTO {SCHEMA}.attempts (delivery_id, number, at, state, status, error, response)
SELECT id, attempts, $3, $1, $4, $5, $6 FROM u
"""

# The heartbeat of a living gateway: its leases last while it does, whatever its targets'
# timeouts; a dead one's run out lease_s after its last beat.
RENEW: Final = f"""
UPDATE {SCHEMA}.deliveries SET lease_until = {_NOW} + $2
WHERE lease_owner = $1 AND state = 'pending'
"""

# A replayed delivery with a conversation goes to its back: a new place from the deliveries'
# own identity sequence, so every delivery accepted later comes after it too.
_NEXT_PLACE = f"nextval(pg_get_serial_sequence('{SCHEMA}.deliveries', 'id'))"
REPLAY: Final = f"""
UPDATE {SCHEMA}.deliveries SET state = 'pending', attempts = 0, held_s = 0, created_at = $2,
    next_attempt_at = $2, updated_at = $2, lease_owner = NULL, lease_until = NULL,
    position = CASE WHEN order_key IS NULL THEN position ELSE {_NEXT_PLACE} END
WHERE id = $1
RETURNING pg_notify('{CHANNEL}', '')
"""

# The conversations of each target with a delivery waiting behind an earlier pending one.
HELD_BACK: Final = f"""
SELECT target, COUNT(*) FROM (
    SELECT target FROM {SCHEMA}.deliveries
    WHERE state = 'pending' AND order_key IS NOT NULL AND target = ANY($1::text[])
    GROUP BY target, order_key HAVING COUNT(*) > 1) AS held
GROUP BY target
"""
# The outbox's rows, as PostgreSQL's statistics count them (kept as rows change, read without
# scanning the tables: a scrape never waits on a table of millions of rows).
SIZE: Final = f"""
SELECT COALESCE(SUM(n_live_tup), 0) FROM pg_stat_user_tables WHERE schemaname = '{SCHEMA}'
"""
COUNT: Final = f"SELECT state, COUNT(*) FROM {SCHEMA}.deliveries GROUP BY state"
BACKLOG: Final = f"""
SELECT target, state, COUNT(*), MIN(created_at) FROM {SCHEMA}.deliveries
WHERE state IN ('pending', 'dead') GROUP BY state, target
"""
ATTEMPTS: Final = f"""
SELECT number, at, state, status, error, response FROM {SCHEMA}.attempts
WHERE delivery_id = $1 ORDER BY id
"""
# Dead letters go with their attempt history; their notifications with the prune.
PURGE_DEAD: Final = f"""
WITH d AS (DELETE FROM {SCHEMA}.deliveries WHERE state = 'dead' AND updated_at < $1 RETURNING id),
a AS (DELETE FROM {SCHEMA}.attempts WHERE delivery_id IN (SELECT id FROM d))
SELECT COUNT(*) FROM d
"""

# A delivered row's next_attempt_at is its delivery time (see RECORD's callers).
PRUNE_DELIVERED: Final = f"""
WITH d AS (
    DELETE FROM {SCHEMA}.deliveries WHERE id IN (
        SELECT id FROM {SCHEMA}.deliveries
        WHERE state = 'delivered' AND target = $1 AND next_attempt_at < $2
        LIMIT {PRUNE_BATCH})
    RETURNING id
), a AS (DELETE FROM {SCHEMA}.attempts WHERE delivery_id IN (SELECT id FROM d))
SELECT COUNT(*) FROM d
"""
# The digests table alone answers "seen inside the window?", so notifications may go with the
# retention once no delivery needs their body.
PRUNE_NOTIFICATIONS: Final = f"""
DELETE FROM {SCHEMA}.notifications WHERE id IN (
    SELECT id FROM {SCHEMA}.notifications n
    WHERE received_at < $1
      AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.deliveries d WHERE d.notification_id = n.id)
    LIMIT {PRUNE_BATCH})
"""
PRUNE_DIGESTS: Final = f"""
DELETE FROM {SCHEMA}.digests WHERE digest IN (
    SELECT digest FROM {SCHEMA}.digests WHERE received_at < $1 LIMIT {PRUNE_BATCH})
"""


def list_query(state: str | None, target: str | None) -> tuple[str, list[Any]]:
    """The most recently changed deliveries, filtered: the statement and its arguments before
    the limit and the offset (ties broken by id, newest first: a stable order to page in)."""
    where, params = _filters(state=state, target=target)
    return (
        f"SELECT {DELIVERY_COLUMNS} FROM {SCHEMA}.deliveries d"
        f" JOIN {SCHEMA}.notifications n ON n.id = d.notification_id{where}"
        f" ORDER BY d.updated_at DESC, d.id DESC LIMIT ${len(params) + 1}"
        f" OFFSET ${len(params) + 2}",
        params,
    )


def replay_many_query(state: str, target: str | None, since: float | None) -> tuple[str, list[Any]]:
    """Make the deliveries in ``state`` (of ``target``, changed since ``since``) pending, due
    at the last argument: the statement and its arguments before that one."""
    where, params = _filters(state=state, target=target, since=since)
    now = f"${len(params) + 1}"
    return (
        f"UPDATE {SCHEMA}.deliveries d SET state = 'pending', attempts = 0, held_s = 0,"
        f" created_at = {now},"
        f" next_attempt_at = {now}, updated_at = {now}, lease_owner = NULL, lease_until = NULL"
        f"{where}",
        params,
    )


def replay_places_query(
    state: str, target: str | None, since: float | None
) -> tuple[str, list[Any]]:
    """Run before :func:`replay_many_query` with the same filters: the keyed deliveries it will
    replay go to the back of their conversations, in the order they had among themselves
    (places drawn from the id sequence as the ordered subquery yields them)."""
    where, params = _filters(state=state, target=target, since=since)
    return (
        f"UPDATE {SCHEMA}.deliveries d SET position = p.place FROM (SELECT id, {_NEXT_PLACE}"
        f" AS place FROM (SELECT d.id FROM {SCHEMA}.deliveries d{where}"
        f"{' AND' if where else ' WHERE'} d.order_key IS NOT NULL"
        f" ORDER BY {_PLACE.format('d')}) AS keyed) AS p WHERE d.id = p.id",
        params,
    )


def _filters(
    *, state: str | None, target: str | None, since: float | None = None
) -> tuple[str, list[Any]]:
    clauses, params = [], list[Any]()
    pairs = (("d.state = ", state), ("d.target = ", target), ("d.updated_at >= ", since))
    for clause, value in pairs:
        if value is not None:
            params.append(value)
            clauses.append(f"{clause}${len(params)}")
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


GET: Final = f"""
SELECT {DELIVERY_COLUMNS} FROM {SCHEMA}.deliveries d
JOIN {SCHEMA}.notifications n ON n.id = d.notification_id WHERE d.id = $1
"""
