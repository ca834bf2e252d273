"""The outbox's tables in PostgreSQL: created by the gateway, versioned, checked at every start.

Rule: everything lives in its own PostgreSQL schema, ``waba_gateway``, so the database may hold
other things. The first gateway to start creates the tables (under an advisory lock, so several
starting together create them once) and records :data:`VERSION` with a random delivery id
prefix; every start reads the version back and refuses any other one, untouched, with a message
saying what to do, except versions 1 to 6, which are brought to version 7 in place (see
:data:`_TO_2` to :data:`_TO_7`).

Rule: a start never waits without bound, nor without saying for what. A lock on the outbox's
tables (a backup, an administrator's LOCK TABLE) fails the start within :data:`_LOCK_WAIT_S`;
the lock under which gateways create or migrate the schema, within :data:`_SCHEMA_LOCK_WAIT_S`,
with a log line naming its holder once it has waited :data:`_QUIET_S`. Either way, an
OutboxError on one line names the session to wait for or to end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import asyncpg

from gateway.errors import OutboxError

__all__ = ["CHANNEL", "SCHEMA", "VERSION", "ensure", "read_version"]

log = logging.getLogger(__name__)

SCHEMA = "waba_gateway"
# LISTEN/NOTIFY channel: "there are deliveries any gateway may claim now".
CHANNEL = "waba_gateway_due"
VERSION = 7
# The advisory lock's key while the tables are checked or created: any fixed number ("waba" in
# ASCII); it only has to be the same for every gateway.
_CREATE_LOCK = 0x77616261
# The schema session's bounds. A lock on a table (pg_dump holds ACCESS SHARE on every table it
# dumps until it is done, which the migrations' ALTER TABLE and DROP INDEX wait for) is waited
# for at most _LOCK_WAIT_S: lock_timeout applies to each wait for a lock, and only to that
# (https://www.postgresql.org/docs/15/runtime-config-client.html#GUC-LOCK-TIMEOUT). Any other
# statement of the check runs at most _STATEMENT_S (statement_timeout, same page), longer than
# _LOCK_WAIT_S so that a wait for a lock ends as one, saying so; the migrations' statements
# are let run (see ensure).
_LOCK_WAIT_S = 10.0
_STATEMENT_S = 30.0
# The schema lock is waited for at most this long, polled every _POLL_S: a gateway migrating a
# large table holds it for as long as its index builds take, and one cut off from the database
# mid-migration holds it until the server ends its session.
_SCHEMA_LOCK_WAIT_S = 15.0
_POLL_S = 0.1
# Gateways starting together on a new database wait for the first one's CREATE TABLEs, a
# fraction of a second: only a wait longer than this is worth a log line.
_QUIET_S = 1.0
# The server ends a schema session idle this long inside a transaction, rolling it back and so
# letting go of the schema lock (idle_in_transaction_session_timeout, same page): a gateway cut
# off mid-migration holds the lock this long after its statement ends, not until TCP keepalive
# gives up on it (two hours by default). A check never idles in its transaction longer than a
# poll and a round trip.
_IDLE_S = 5.0
_BOUNDS = (
    f"SET lock_timeout = '{_LOCK_WAIT_S:g}s'; SET statement_timeout = '{_STATEMENT_S:g}s';"
    f" SET idle_in_transaction_session_timeout = '{_IDLE_S:g}s'"
)

_TABLES = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"CREATE TABLE {SCHEMA}.meta (version INTEGER NOT NULL, delivery_id_prefix TEXT NOT NULL)",
    # Deduplication across every gateway sharing the database: the primary key makes a body
    # accepted by two gateways at once wait for the first to commit, then find it.
    f"""CREATE TABLE {SCHEMA}.digests (
    digest BYTEA PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL
)""",
    f"""CREATE TABLE {SCHEMA}.notifications (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL,
    signature TEXT NOT NULL,
    body BYTEA NOT NULL
)""",
    f"CREATE INDEX notifications_received ON {SCHEMA}.notifications (received_at)",
    # An identity column never hands out a number twice, even after pruning: with the database's
    # random prefix, delivery ids stay unique across every gateway.
    f"""CREATE TABLE {SCHEMA}.deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id BIGINT NOT NULL REFERENCES {SCHEMA}.notifications (id),
    target TEXT NOT NULL,
    body BYTEA,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    last_response TEXT,
    -- The gateway sending it, and until when (the database's clock): see outbox.py.
    lease_owner TEXT,
    lease_until DOUBLE PRECISION
)""",
    f"CREATE INDEX deliveries_due ON {SCHEMA}.deliveries (state, target, next_attempt_at)",
    f"CREATE INDEX deliveries_notification ON {SCHEMA}.deliveries (notification_id)",
    f"CREATE INDEX deliveries_updated ON {SCHEMA}.deliveries (updated_at)",
    # Each attempt's outcome, for the admin console; removed with its delivery.
    f"""CREATE TABLE {SCHEMA}.attempts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id BIGINT NOT NULL,
    number INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    response TEXT NOT NULL
)""",
    f"CREATE INDEX attempts_delivery ON {SCHEMA}.attempts (delivery_id)",
    # The lease heartbeat finds a gateway's own leases.
    f"CREATE INDEX deliveries_leased ON {SCHEMA}.deliveries (lease_owner)"
    " WHERE lease_owner IS NOT NULL",
)

# Version 2: each delivery's conversation (``order_key``, for targets with order =
# "conversation") and its place in it after a replay (``position``; else its id), and one token
# bucket per rate-limited target, shared by every gateway. Adding nullable columns rewrites no
# row, so a version 1 database is migrated in place at start, its deliveries keyed by nothing.
_TO_2 = (
    f"ALTER TABLE {SCHEMA}.deliveries ADD COLUMN order_key TEXT",
    f"ALTER TABLE {SCHEMA}.deliveries ADD COLUMN position BIGINT",
    f"CREATE INDEX deliveries_order ON {SCHEMA}.deliveries (target, order_key)"
    " WHERE state = 'pending' AND order_key IS NOT NULL",
    f"""CREATE TABLE {SCHEMA}.buckets (
    target TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    granted INTEGER NOT NULL
)""",
)


# Version 3: each notification's trace context (see gateway.tracing), so an attempt made after
# a restart, or by another gateway, joins the trace of the request that brought it. A nullable
# column rewrites no row; notifications of an older version simply have none.
_TO_3 = (f"ALTER TABLE {SCHEMA}.notifications ADD COLUMN trace TEXT",)
# Version 4: the seconds each delivery spent held by its target's pacing (a rate limit's token,
# an earlier delivery of its conversation), which its age for max_age_s leaves out. A column
# with a constant default rewrites no row (PostgreSQL 11 and later).
_TO_4 = (f"ALTER TABLE {SCHEMA}.deliveries ADD COLUMN held_s DOUBLE PRECISION NOT NULL DEFAULT 0",)
# Version 5: a group commit's accepts as one call (see ACCEPT in sql.py). Different bodies are
# deduplicated by one upsert; a group where a body comes twice, by one upsert per notification
# in the group's order, so that each is decided as it would be in a group of its own (the rows
# are locked in the group's order either way). The group's notifications, then its deliveries,
# are written by one multi-row statement each, their ids drawn in the group's order (a
# conversation's order is its ids'). ``behind``: the new keyed deliveries an earlier pending one
# of their conversation holds back, the group's own earlier ones included.
_TO_5 = (
    f"""CREATE OR REPLACE FUNCTION {SCHEMA}.accept(
    digests BYTEA[], received DOUBLE PRECISION[], signatures TEXT[], bodies BYTEA[],
    traces TEXT[], window_s DOUBLE PRECISION, route_of INTEGER[], route_targets TEXT[],
    route_bodies BYTEA[], route_keys TEXT[], lease_to TEXT, lease_s DOUBLE PRECISION,
    announce BOOLEAN,
    OUT notification_ids BIGINT[], OUT delivery_ids BIGINT[], OUT behind BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    fresh BOOLEAN[] := '{{}}';
    hit INTEGER;
    leased_until DOUBLE PRECISION := CASE WHEN lease_to IS NULL THEN NULL
        ELSE extract(epoch FROM clock_timestamp()) + lease_s END;
    notifications_seq REGCLASS :=
        pg_get_serial_sequence('{SCHEMA}.notifications', 'id')::regclass;
    deliveries_seq REGCLASS := pg_get_serial_sequence('{SCHEMA}.deliveries', 'id')::regclass;
BEGIN
    IF cardinality(digests) = (SELECT count(DISTINCT g) FROM unnest(digests) AS x (g)) THEN
        -- Different bodies (Meta's are): one upsert for all, each row decided on its own.
        WITH up AS (
            INSERT INTO {SCHEMA}.digests AS d (digest, received_at)
            SELECT g, r FROM unnest(digests, received) AS x (g, r)
            ON CONFLICT (digest) DO UPDATE
            SET received_at = GREATEST(d.received_at, EXCLUDED.received_at)
            WHERE d.received_at < EXCLUDED.received_at - window_s
                OR d.received_at > EXCLUDED.received_at + window_s
            RETURNING d.digest
        )
        SELECT array_agg(up.digest IS NOT NULL ORDER BY x.o) INTO fresh
        FROM unnest(digests) WITH ORDINALITY AS x (g, o) LEFT JOIN up ON up.digest = x.g;
    ELSE
        FOR i IN 1 .. cardinality(digests) LOOP
            INSERT INTO {SCHEMA}.digests AS d (digest, received_at)
            VALUES (digests[i], received[i])
            ON CONFLICT (digest) DO UPDATE
            SET received_at = GREATEST(d.received_at, received[i])
            WHERE d.received_at < received[i] - window_s
                OR d.received_at > received[i] + window_s;
            GET DIAGNOSTICS hit = ROW_COUNT;
            fresh := fresh || (hit > 0);
        END LOOP;
    END IF;
    notification_ids := ARRAY(
        SELECT CASE WHEN f THEN nextval(notifications_seq) END FROM unnest(fresh) AS x (f));
    IF NOT true = ANY(fresh) THEN
        RETURN;
    END IF;
    INSERT INTO {SCHEMA}.notifications (id, received_at, signature, body, trace)
    OVERRIDING SYSTEM VALUE
    SELECT n, r, s, b, t FROM unnest(notification_ids, received, signatures, bodies, traces)
        AS x (n, r, s, b, t)
    WHERE n IS NOT NULL;
    WITH r AS (
        SELECT nextval(deliveries_seq) AS id, k, t, b, o
        FROM unnest(route_of, route_targets, route_bodies, route_keys) AS r0 (k, t, b, o)
        WHERE notification_ids[k] IS NOT NULL
    ), x AS (
        INSERT INTO {SCHEMA}.deliveries (id, notification_id, target, body, state, created_at,
            next_attempt_at, updated_at, lease_owner, lease_until, order_key)
        OVERRIDING SYSTEM VALUE
        SELECT r.id, notification_ids[r.k], r.t, r.b, 'pending', received[r.k], received[r.k],
            received[r.k], lease_to, leased_until, r.o
        FROM r
        RETURNING id
    )
    SELECT array_agg(x.id ORDER BY x.id) INTO delivery_ids FROM x;
    IF EXISTS (SELECT 1 FROM unnest(route_keys) AS k (o) WHERE o IS NOT NULL) THEN
        behind := ARRAY(
            SELECT x.id FROM {SCHEMA}.deliveries x
            WHERE x.id = ANY(delivery_ids) AND x.order_key IS NOT NULL AND EXISTS (
                SELECT 1 FROM {SCHEMA}.deliveries e WHERE e.state = 'pending'
                AND e.target = x.target AND e.order_key = x.order_key
                AND COALESCE(e.position, e.id) < x.id));
    END IF;
    IF announce THEN
        PERFORM pg_notify('{CHANNEL}', '');
    END IF;
END
$$""",
)
# Version 6: delivered deliveries leave the claims' index. An outcome's update changes the state,
# so it is never a HOT update and the row gets a new entry in every index whose condition it
# meets: each delivery, the bulk of the table, was one more entry (and its WAL) in an index no
# claim reads for it. What looked for delivered rows there (the prune) reads deliveries_updated
# instead: a delivered row's updated_at is its delivery time. The key stays as it was (state
# first), so the planner keeps preferring deliveries_order for the ordered claim's look at
# earlier deliveries of a conversation. Built in the migration's transaction, which holds off
# writes for as long as its scan of the deliveries takes.
_TO_6 = (
    f"DROP INDEX {SCHEMA}.deliveries_due",
    f"CREATE INDEX deliveries_due ON {SCHEMA}.deliveries (state, target, next_attempt_at)"
    " WHERE state <> 'delivered'",
)
# Version 7: the conversation index holds each pending delivery's place in its conversation
# (its id, or where a replay put it), in the expression every "an earlier pending delivery of
# this conversation" spells (the claim's NOT EXISTS, the accept's ``behind``): that question
# becomes one probe of the index, where version 6's index of (target, key) made PostgreSQL
# read every pending delivery of the conversation for each one asked about. A claim by key over
# 40,000 pending deliveries in 20 conversations took 249 ms with version 6's index, 14 ms with
# this one (bench/README.md). Built in the migration's transaction, as version 6's index was.
_TO_7 = (
    f"DROP INDEX {SCHEMA}.deliveries_order",
    f"CREATE INDEX deliveries_order ON {SCHEMA}.deliveries"
    " (target, order_key, (COALESCE(position, id)))"
    " WHERE state = 'pending' AND order_key IS NOT NULL",
)
# What brings each older version to the current one.
_MIGRATIONS = {
    1: (*_TO_2, *_TO_3, *_TO_4, *_TO_5, *_TO_6, *_TO_7),
    2: (*_TO_3, *_TO_4, *_TO_5, *_TO_6, *_TO_7),
    3: (*_TO_4, *_TO_5, *_TO_6, *_TO_7),
    4: (*_TO_5, *_TO_6, *_TO_7),
    5: (*_TO_6, *_TO_7),
    6: _TO_7,
}


async def read_version(conn: asyncpg.Connection[Any]) -> tuple[int, str] | None:
    """``(version, delivery id prefix)`` of the outbox in this database; ``None``: no outbox
    yet. Raises OutboxError for a ``waba_gateway`` schema that is not an outbox's."""
    has_schema = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", SCHEMA
    )
    if not has_schema:
        return None
    if await conn.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.meta") is None:
        raise OutboxError(
            f"the database holds a schema {SCHEMA!r} that is not a waba-gateway outbox (no"
            " version recorded); point outbox.url at another database"
        )
    row = await conn.fetchrow(f"SELECT version, delivery_id_prefix FROM {SCHEMA}.meta")
    if row is None:
        raise OutboxError(f"the outbox schema {SCHEMA!r} records no version; it is not usable")
    return int(row[0]), str(row[1])


def _check(found: tuple[int, str]) -> str:
    version, prefix = found
    if version != VERSION:
        newer = "a newer" if version > VERSION else "an older"
        raise OutboxError(
            f"the outbox schema in this database was made by {newer} version of waba-gateway"
            f" (schema version {version}, this version uses {VERSION}); run the version that"
            " made it, or point outbox.url at another database"
        )
    return prefix


async def ensure(conn: asyncpg.Connection[Any], *, create: bool) -> str:
    """Check the database's outbox schema, creating it when there is none and ``create``;
    return its delivery id prefix. Another version raises OutboxError, changing nothing, and so
    does a lock held elsewhere past its bound, naming who holds it. ``conn``: a session of the
    check's own, which keeps the bounds set here."""
    await conn.execute(_BOUNDS)
    try:
        return await _ensure(conn, create=create)
    except asyncpg.exceptions.LockNotAvailableError:
        # 55P03, what lock_timeout raises: the transaction is rolled back, so what this session
        # took is let go; those still holding locks on the outbox's tables are the ones waited
        # for (or were, a moment ago).
        holders = await _table_lock_holders(conn)
        raise OutboxError(
            f"waited {_LOCK_WAIT_S:g} s (lock_timeout) for a lock on the outbox schema's"
            f" tables: {holders or 'no other session holds one any more'}; let that session"
            " end (a pg_dump, a long transaction) or end it with pg_terminate_backend, then"
            " start again"
        ) from None
    except asyncpg.exceptions.QueryCanceledError:
        raise OutboxError(
            f"a statement checking the outbox schema ran past {_STATEMENT_S:g} s"
            " (statement_timeout); the database is overloaded, or something else it waits for"
            " (a synchronous standby) does not answer"
        ) from None


async def _ensure(conn: asyncpg.Connection[Any], *, create: bool) -> str:
    found = await read_version(conn)
    if found is not None and found[0] in _MIGRATIONS and create:
        async with conn.transaction():
            await _take_schema_lock(conn)
            found = await read_version(conn)  # again, under the lock
            if found is not None and found[0] in _MIGRATIONS:
                log.info("migrating the outbox schema from version %d to %d", found[0], VERSION)
                # An index build over a large deliveries table takes as long as its scan: that
                # is work, not a wait, and a migration cut short would start over at every
                # start. Waits for locks stay bounded (lock_timeout counts each wait alone).
                await conn.execute("SET LOCAL statement_timeout = 0")
                for statement in _MIGRATIONS[found[0]]:
                    await conn.execute(statement)
                await conn.execute(f"UPDATE {SCHEMA}.meta SET version = $1", VERSION)
                found = (VERSION, found[1])
    if found is not None:
        return _check(found)
    if not create:
        raise OutboxError("no outbox in this database yet (the gateway creates it at start)")
    async with conn.transaction():
        await _take_schema_lock(conn)
        found = await read_version(conn)  # again, under the lock: another gateway may have won
        if found is not None:
            return _check(found)
        for statement in (*_TABLES, *_TO_2, *_TO_3, *_TO_4, *_TO_5, *_TO_6, *_TO_7):
            await conn.execute(statement)
        prefix = secrets.token_hex(8)
        await conn.execute(
            f"INSERT INTO {SCHEMA}.meta (version, delivery_id_prefix) VALUES ($1, $2)",
            VERSION,
            prefix,
        )
    return prefix


async def _take_schema_lock(conn: asyncpg.Connection[Any]) -> None:
    """The schema lock, for the caller's transaction, within _SCHEMA_LOCK_WAIT_S; else
    OutboxError naming its holder. Polled with pg_try_advisory_xact_lock, which returns at once
    (https://www.postgresql.org/docs/15/functions-admin.html#FUNCTIONS-ADVISORY-LOCKS): a
    pg_advisory_xact_lock would wait in silence for as long as the holder keeps it, which
    lock_timeout would end, but with nothing said while it waits nor who holds it."""
    started = time.monotonic()
    told = False
    while not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _CREATE_LOCK):
        waited = time.monotonic() - started
        if waited >= _SCHEMA_LOCK_WAIT_S:
            holder = await _schema_lock_holder(conn)
            raise OutboxError(
                f"waited {_SCHEMA_LOCK_WAIT_S:g} s for the outbox schema lock (advisory lock"
                f" {_CREATE_LOCK}), which {holder} holds to create or migrate the schema; if"
                " that is a gateway migrating a large outbox, start again once it is done,"
                " else end that session with pg_terminate_backend and start again"
            )
        if not told and waited >= _QUIET_S:
            holder = await _schema_lock_holder(conn)
            log.warning(
                "waiting up to %g s for the outbox schema lock (advisory lock %d), which %s"
                " holds to create or migrate the schema",
                _SCHEMA_LOCK_WAIT_S,
                _CREATE_LOCK,
                holder,
            )
            told = True
        await asyncio.sleep(_POLL_S)
    if told:
        log.info("took the outbox schema lock after %.1f s", time.monotonic() - started)


# Who holds the schema lock. pg_locks shows a bigint advisory key as its high half in classid,
# its low half in objid, and objsubid 1; advisory locks are per database
# (https://www.postgresql.org/docs/15/view-pg-locks.html).
_SCHEMA_LOCK_HOLDER = """
SELECT l.pid, a.application_name, a.client_addr::text, a.state,
    extract(epoch FROM clock_timestamp() - a.state_change)
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1
LIMIT 1
"""
# Who holds locks on the outbox's tables (and their indexes), oldest transaction first.
_TABLE_LOCK_HOLDERS = """
SELECT l.pid, a.application_name, a.client_addr::text, a.state,
    extract(epoch FROM clock_timestamp() - a.state_change),
    array_agg(l.mode || ' on ' || n.nspname || '.' || c.relname ORDER BY c.relname, l.mode)
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid() AND n.nspname = $1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY l.pid, a.application_name, a.client_addr, a.state, a.state_change, a.xact_start
ORDER BY a.xact_start NULLS LAST, l.pid
"""


def _session(row: asyncpg.Record) -> str:
    """``pid 123 ('pg_dump' from 10.0.0.5, idle in transaction for 42 s)``, as far as this
    role may see (another role's sessions show little but their pid to an unprivileged one)."""
    pid, application, client, state, seconds = row[0], row[1], row[2], row[3], row[4]
    about = [repr(application or "")]
    if client:
        about.append(f"from {client}")
    if state is not None and seconds is not None:
        about.append(f"{state} for {float(seconds):.0f} s")
    return f"pid {pid} ({', '.join(about)})"


async def _schema_lock_holder(conn: asyncpg.Connection[Any]) -> str:
    row = await conn.fetchrow(_SCHEMA_LOCK_HOLDER, _CREATE_LOCK >> 32, _CREATE_LOCK & 0xFFFFFFFF)
    return "a session that has just let go of it" if row is None else f"session {_session(row)}"


async def _table_lock_holders(conn: asyncpg.Connection[Any], most: int = 3) -> str:
    """``session pid 123 (...) holds AccessShareLock on waba_gateway.deliveries, ...``: at most
    ``most`` sessions, each with at most ``most`` of its locks."""
    rows = await conn.fetch(_TABLE_LOCK_HOLDERS, SCHEMA)
    told = []
    for row in rows[:most]:
        locks = list(row[5])
        more = f" and {len(locks) - most} more" if len(locks) > most else ""
        told.append(f"session {_session(row)} holds {', '.join(locks[:most])}{more}")
    if len(rows) > most:
        told.append(f"{len(rows) - most} more sessions")
    return "; ".join(told)
