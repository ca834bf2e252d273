"""Every statement the PostgreSQL outbox runs, but a dispatcher's claim (claim.py).

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

from gateway.outbox.postgres.schema import CHANNEL, SCHEMA
from gateway.outbox.rows import DELIVERY_COLUMNS

__all__ = [
    "ACCEPT",
    "ATTEMPTS",
    "BACKLOG",
    "CHANNEL",
    "COUNT",
    "DELIVERED_TARGETS",
    "EXCERPT_CHARS",
    "GET",
    "GIVE_BACK_TOKENS",
    "HELD_BACK",
    "PLACE_BOUND",
    "PRUNE_BATCH",
    "PRUNE_DELIVERED",
    "PRUNE_DIGESTS",
    "PRUNE_NOTIFICATIONS",
    "PURGE_DEAD",
    "RECORD",
    "RELEASE",
    "RENEW",
    "REPLAY",
    "REPLAY_BATCH",
    "SIZE",
    "TAKE_TOKENS",
    "list_query",
    "replay_batch_query",
]

PRUNE_BATCH: Final = 5000
# Deliveries one step of a replay of many changes (see replay_batch_query).
REPLAY_BATCH: Final = 5000
EXCERPT_CHARS: Final = 1024
_NOW = "extract(epoch FROM clock_timestamp())"
# A replay keeps a lease that is still live: the gateway holding it may be sending the
# delivery right now, and another gateway must not send it beside that send. The holder sends
# it again at the back of its conversation (its outcome of the earlier send is not recorded
# over the replay, and its lease lasts while it lives); a lease run out is let go.
_LIVE_LEASE_KEPT = (
    f"lease_owner = CASE WHEN lease_until > {_NOW} THEN lease_owner END,"
    f" lease_until = CASE WHEN lease_until > {_NOW} THEN lease_until END"
)

# One call, one round trip, for a whole group commit (schema.py's ``accept``): one element
# per notification in $1 to $5 (digest, received at, signature, body, trace context or NULL),
# the dedup window $6 (a body is new when its digest was last seen outside now -/+ $6: gateways
# commit concurrently, so the row may hold a later time than this request's own), one element
# per route in $7 to $10 (the 1-based notification it belongs to, target, body or NULL for
# Meta's bytes, conversation key or NULL), leased to $11 for $12 seconds when $11 is set, and
# $13: announce the new deliveries to every gateway (when no lease holds them). One row: each
# notification's id (NULL: a duplicate), the new deliveries' ids in route order, and those of
# them an earlier pending delivery of their conversation holds back.
ACCEPT: Final = f"""
SELECT notification_ids, delivery_ids, behind FROM {SCHEMA}.accept(
    $1::bytea[], $2::float8[], $3::text[], $4::bytea[], $5::text[], $6::float8,
    $7::integer[], $8::text[], $9::bytea[], $10::text[], $11::text, $12::float8, $13::boolean)
"""


# A delivery's place in its conversation: its id, or where a replay put it (REPLAY).
_PLACE = "COALESCE({0}.position, {0}.id)"

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

# Attempts' outcomes, one element each ($1 to $8: delivery id, state, next attempt at, status,
# error, response excerpt, held seconds, when it was recorded; $10: its created_at as handed
# out, or NULL; $11: whether another outcome of it follows in the same transaction), by gateway
# $9. An outcome counts only while the delivery is pending and still leased to $9 (a lease run
# out is still its own until another gateway claims the delivery): once another gateway took
# it over, that gateway's outcome is the one that counts, and a stalled gateway's late outcome
# must not overwrite it, whether the taker has recorded it yet or not (recording clears the
# lease, so "not leased" cannot stand for "still mine"). Each ends the lease, but for an outcome
# another of the same delivery follows (two attempts recorded together, in two rounds): the
# lease is what lets the later one count. Skipped too when it was replayed since it was handed
# out (a replay renews created_at): the replay stands. Each is also kept in the delivery's
# attempt history. Not waiting for the flush (``synchronous_commit`` off for this transaction
# only): an outcome lost in a crash of the database server only means the delivery is sent
# again, which at-least-once allows. A delivery may appear once per statement (see the caller).
# The rows are locked in the order of their ids before any is changed, whatever the batch's
# order or the join's plan: the order every statement that locks many deliveries keeps (see
# replay_batch_query), so none waits for another that waits for it (PostgreSQL would abort one
# as a deadlock; an aborted record sends its whole batch again).
RECORD: Final = f"""
WITH v AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::integer[], $5::text[],
        $6::text[], $7::float8[], $8::float8[], $10::float8[], $11::boolean[])
        AS v (id, state, next_at, status, error, response, held, at, created, more)
    WHERE set_config('synchronous_commit', 'off', true) = 'off'
), locked AS (
    SELECT id FROM {SCHEMA}.deliveries WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
), u AS (
    UPDATE {SCHEMA}.deliveries d SET state = v.state, attempts = d.attempts + 1,
        next_attempt_at = v.next_at, updated_at = v.at, last_status = v.status,
        last_error = v.error, last_response = v.response,
        lease_owner = CASE WHEN v.more THEN d.lease_owner END,
        lease_until = CASE WHEN v.more THEN d.lease_until END, held_s = v.held
    FROM v
    WHERE d.id = v.id AND d.id IN (SELECT id FROM locked)
      AND d.state = 'pending' AND d.lease_owner = $9
      AND (v.created IS NULL OR d.created_at = v.created)
    RETURNING d.id, d.attempts, v.state, v.status, v.error, v.response, v.at
)
INSERT INTO {SCHEMA}.attempts (delivery_id, number, at, state, status, error, response)
SELECT id, attempts, at, state, status, error, response FROM u
"""

# The heartbeat of a living gateway: its leases last while it does, whatever its targets'
# timeouts; a dead one's run out lease_s after its last beat. Only the leases on deliveries to
# the targets in $3 (NULL: every target) are renewed: the others are let go at once, as the
# deliveries of a target a reload removed from this gateway, which its dispatcher will not send
# (a lease renewed for them would keep them from every gateway that still sends to that target
# for as long as this one lives). Returns how many were let go, announced to every gateway
# (NOTIFY, once per transaction) for them to claim at once. It never waits for a row another
# transaction holds (SKIP LOCKED): those are being recorded (which ends the lease) or claimed
# (which sets it anew), and the next beat renews or lets go any still leased. Waiting, it
# locked the gateway's leased rows in the table's order while a record locked its batch's in
# the batch's: each waited for the other, PostgreSQL aborted one as a deadlock, and an aborted
# record sent its whole batch again (bench/README.md, "Issue 22: what the drained counts
# meant").
_KEPT = "($3::text[] IS NULL OR target = ANY($3::text[]))"
RENEW: Final = f"""
WITH beat AS (
    UPDATE {SCHEMA}.deliveries
    SET lease_until = CASE WHEN {_KEPT} THEN {_NOW} + $2 END,
        lease_owner = CASE WHEN {_KEPT} THEN lease_owner END
    WHERE id IN (SELECT id FROM {SCHEMA}.deliveries
        WHERE lease_owner = $1 AND state = 'pending' FOR UPDATE SKIP LOCKED)
    RETURNING lease_owner
)
SELECT count(pg_notify('{CHANNEL}', '')) FROM beat WHERE lease_owner IS NULL
"""

# A gateway closing cleanly lets go of its leases on pending deliveries ($1: this gateway), so
# that the other gateways, or this one started again (a new owner), claim them at once rather
# than lease_s after its last beat; announced (NOTIFY, once per transaction) for them to do so
# now. Run only once nothing of this gateway sends or records any more (its dispatcher stopped,
# its queued outcomes committed): a lease let go while a send was still out would let another
# gateway send the same delivery beside it, and a lease let go before its outcome was recorded
# would make that outcome not count (RECORD counts an outcome only under its own lease). It
# waits for rows another transaction holds, and reads them again as they then stand: one
# recorded or taken over meanwhile is no longer this gateway's, and is left as it is. The rows
# are locked in the order of their ids, as RECORD and the replays lock theirs, so none of
# them waits for this while this waits for it: FOR UPDATE locks the rows as the sort hands them
# out (https://www.postgresql.org/docs/15/sql-select.html#SQL-FOR-UPDATE-SHARE), and a row
# another transaction changed meanwhile is tested again, as it then stands, against the locking
# query's conditions, and left out if it no longer meets them
# (https://www.postgresql.org/docs/15/transaction-iso.html#XACT-READ-COMMITTED).
# The rows are found once, as an array: an ARRAY(subquery) that refers to nothing outside it is
# an InitPlan, run once per statement (https://www.postgresql.org/docs/15/using-explain.html).
# The update then finds them by id alone, through the primary key (each row of the array is
# this statement's, locked after that test, so no other transaction changes it before this one
# ends, and testing the owner and the state again would find nothing new). Written as "id IN
# (the locking query)", on a table grown since its last ANALYZE the planner guessed the gateway
# held a handful of leases and ran the locking query, its sort and its locks again for each row
# it compared: 12,980 leases took 48 s (EXPLAIN ANALYZE), outran the statement timeout at close,
# and the leases were let go only lease_s later. Testing the owner and the state again beside
# "= ANY" let that guess pick the index of leases instead, and test each row against the whole
# array: quadratic still, if with a smaller factor.
RELEASE: Final = f"""
WITH released AS (
    UPDATE {SCHEMA}.deliveries SET lease_owner = NULL, lease_until = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM {SCHEMA}.deliveries
        WHERE lease_owner = $1 AND state = 'pending' ORDER BY id FOR UPDATE))
    RETURNING id
)
SELECT count(pg_notify('{CHANNEL}', '')) FROM released
"""

# A replayed delivery with a conversation goes to its back: a new place from the deliveries'
# own identity sequence, so every delivery accepted later comes after it too. Announced with
# its id (REPLAYED and the id; REPLAYED alone: any pending one, after a replay of many), so
# that a gateway holding it in memory, in a conversation's run, lets the run go.
REPLAYED: Final = "replayed "
_NEXT_PLACE = f"nextval(pg_get_serial_sequence('{SCHEMA}.deliveries', 'id'))"
# Above every place held now (ids and places come from one sequence): where a replay of many
# stops, so that it never reaches what it put at the back itself.
PLACE_BOUND: Final = f"SELECT {_NEXT_PLACE}"
REPLAY: Final = f"""
UPDATE {SCHEMA}.deliveries SET state = 'pending', attempts = 0, held_s = 0, created_at = $2,
    next_attempt_at = $2, updated_at = $2, {_LIVE_LEASE_KEPT},
    position = CASE WHEN order_key IS NULL THEN position ELSE {_NEXT_PLACE} END
WHERE id = $1
RETURNING pg_notify('{CHANNEL}', '{REPLAYED}' || $1::text)
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
# Dead letters go with their attempt history, PRUNE_BATCH at most per statement (the caller
# repeats it while it finds a full batch); their notifications with the prune. The rows are
# locked in the order of their ids before any is removed, as RECORD and a replay lock theirs, so
# a purge never deadlocks with a replay of dead letters (one of them would be aborted); the
# locking statement tests their state again, as PRUNE_DELIVERED's does. Returns the dead
# letters removed and the candidates found (fewer than PRUNE_BATCH: none is left).
PURGE_DEAD: Final = f"""
WITH found AS (
    SELECT id FROM {SCHEMA}.deliveries WHERE state = 'dead' AND updated_at < $1
    LIMIT {PRUNE_BATCH}
), doomed AS (
    SELECT id FROM {SCHEMA}.deliveries
    WHERE id IN (SELECT id FROM found) AND state = 'dead' AND updated_at < $1
    ORDER BY id FOR UPDATE
), d AS (
    DELETE FROM {SCHEMA}.deliveries WHERE id IN (SELECT id FROM doomed) RETURNING id
), a AS (DELETE FROM {SCHEMA}.attempts WHERE delivery_id IN (SELECT id FROM d))
SELECT (SELECT COUNT(*) FROM d), (SELECT COUNT(*) FROM found)
"""

# A delivered row's updated_at is its delivery time (see RECORD's callers): the deliveries_updated
# index finds them oldest first (the claims' index holds pending deliveries only). Those found
# are locked in the order of their ids (as PURGE_DEAD), and the locking statement tests their
# state again: one a replay made pending while the prune waited for it is read as it now
# stands and left alone (a condition inside the inner query alone is not tested again, and
# PostgreSQL would delete the replayed delivery).
PRUNE_DELIVERED: Final = f"""
WITH doomed AS (
    SELECT id FROM {SCHEMA}.deliveries
    WHERE id IN (
        SELECT id FROM {SCHEMA}.deliveries
        WHERE state = 'delivered' AND target = $1 AND updated_at < $2
        LIMIT {PRUNE_BATCH})
      AND state = 'delivered' AND updated_at < $2
    ORDER BY id FOR UPDATE
), d AS (
    DELETE FROM {SCHEMA}.deliveries WHERE id IN (SELECT id FROM doomed) RETURNING id
), a AS (DELETE FROM {SCHEMA}.attempts WHERE delivery_id IN (SELECT id FROM d))
SELECT COUNT(*) FROM d
"""
# The targets with delivered rows, in order (the prune's, for targets removed from the
# configuration too). No index holds delivered rows by target (deliveries_due leaves them out
# since version 6), so this reads the deliveries once: once for all, where asking for the next
# target after each one read them once per target and once more.
DELIVERED_TARGETS: Final = f"""
SELECT DISTINCT target FROM {SCHEMA}.deliveries WHERE state = 'delivered' ORDER BY target
"""
# The digests table alone answers "seen inside the window?", so notifications may go with the
# retention once no delivery needs their body. One step of a walk through them in the order of
# their ids, from just after $2: the next PRUNE_BATCH notifications, and of those the ones
# received before $1 that no delivery uses are removed. Returns the notifications removed, those
# the step read (fewer than PRUNE_BATCH: the end of the table), the last one's id (where the
# next step starts) and whether any it read was received before $1. A step reads its batch
# whatever lies around it: one statement that looked for unused notifications among every old
# one read all those a delivery still uses (a backlog of dead letters or of pending deliveries)
# before it found any, at every statement, so that past some millions it outran the statement
# timeout at every prune and no notification was removed any more. The same range of ids on
# the deliveries' side lets PostgreSQL merge two short ranges of their indexes (it does not
# carry a range over from one side of a join to the other, and read every delivery instead).
PRUNE_NOTIFICATIONS: Final = f"""
WITH step AS (
    SELECT count(*) AS seen, max(id) AS upto, bool_or(received_at < $1) AS old
    FROM (SELECT id, received_at FROM {SCHEMA}.notifications WHERE id > $2 ORDER BY id
        LIMIT {PRUNE_BATCH}) AS batch
), d AS (
    DELETE FROM {SCHEMA}.notifications n
    WHERE n.id > $2 AND n.id <= (SELECT upto FROM step) AND n.received_at < $1
      AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.deliveries d WHERE d.notification_id = n.id
          AND d.notification_id > $2 AND d.notification_id <= (SELECT upto FROM step))
    RETURNING 1
)
SELECT (SELECT count(*) FROM d), seen, upto, COALESCE(old, false) FROM step
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


def replay_batch_query(
    state: str, target: str | None, since: float | None
) -> tuple[str, list[Any]]:
    """One bounded step of a replay of many: the next :data:`REPLAY_BATCH` deliveries in
    ``state`` (of ``target``, changed since ``since``) in the order of their places, after a
    place and up to another (the first two arguments after the filters'), made pending, due at
    the last argument. The statement and the filters' arguments.

    Its own transaction: one statement for every matching row outran the pool's command
    timeout on a large backlog, was rolled back, and so could never replay it. The steps go
    through the places in their order, so the keyed deliveries each step replays go to the
    back of their conversations (new places from the id sequence, drawn in their order), behind
    those an earlier step put there: each conversation keeps the order it had among its
    replayed deliveries, wherever the steps cut it. The upper bound (a place drawn before the
    first step) keeps a step from finding again what an earlier one put at the back (a replay
    of pending deliveries). The rows are locked in the order of their ids (as RECORD locks its
    batch) before any is changed, and the locking query tests the filters again: one that
    changed while the step waited for it is read as it now stands. Rows are found again by
    id through the primary key (as an array, = ANY, or one at a time), never by a join of one
    common table expression with another: the planner, guessing how few rows each holds,
    compared every pair (25 million comparisons, 10 s, for a step of 5,000). Returns the
    deliveries replayed, the candidates found (fewer than REPLAY_BATCH: none is left) and the
    last candidate's place (where the next step starts)."""
    where, params = _filters(state=state, target=target, since=since)
    after, upto, now = (f"${len(params) + n}" for n in (1, 2, 3))
    place = _PLACE.format("d")
    return (
        f"""
WITH found AS (
    SELECT d.id, {place} AS place FROM {SCHEMA}.deliveries d{where}
      AND {place} > {after} AND {place} <= {upto}
    ORDER BY {place} LIMIT {REPLAY_BATCH}
), locked AS (
    SELECT d.id, d.order_key, {place} AS place FROM {SCHEMA}.deliveries d{where}
      AND d.id = ANY(ARRAY(SELECT id FROM found))
    ORDER BY d.id FOR UPDATE
), placed AS (
    SELECT id, CASE WHEN order_key IS NOT NULL THEN {_NEXT_PLACE} END AS place
    FROM (SELECT id, order_key FROM locked ORDER BY place) AS ordered
), replayed AS (
    UPDATE {SCHEMA}.deliveries d SET state = 'pending', attempts = 0, held_s = 0,
        created_at = {now}, next_attempt_at = {now}, updated_at = {now}, {_LIVE_LEASE_KEPT},
        position = COALESCE(p.place, d.position)
    FROM placed p
    WHERE d.id = p.id
    RETURNING d.id
)
SELECT (SELECT count(*) FROM replayed), (SELECT count(*) FROM found),
    (SELECT max(place) FROM found)
""",
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

# The conversations of an ordered target with a delivery due, oldest first, keys only (the
# order index): named beside a claim of every conversation that filled its limit, for later
# claims to ask about by key. Not a claim: it leases nothing.
DUE_KEYS: Final = (
    f"SELECT order_key FROM {SCHEMA}.deliveries WHERE state = 'pending' AND target = $1"
    " AND order_key IS NOT NULL AND next_attempt_at <= $2"
    " GROUP BY order_key ORDER BY MIN(next_attempt_at), MIN(id) LIMIT $3"
)
