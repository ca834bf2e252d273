"""The PostgreSQL outbox: one database shared by every gateway, on every host.

Rule: a notification is acknowledged only after the transaction that stores it and its
deliveries has committed with ``synchronous_commit`` on (set on every connection, whatever the
server's default), so neither a crash of the gateway nor of the database server loses it.

Several gateways share one database safely:

- A delivery is sent by one dispatcher at a time. Dispatchers claim due deliveries with a lease
  (``FOR UPDATE SKIP LOCKED``, then ``lease_owner`` and ``lease_until`` set, on the database's
  clock); recording an attempt's outcome ends the lease, and counts only while the lease is
  still the recording gateway's (see :data:`sql.RECORD`). A living gateway renews its leases
  (a heartbeat, three times per ``outbox.lease_s``), so a slow target never makes another
  gateway send the same delivery; one that dies leaves its leases to run out ``lease_s`` after
  its last beat, and then any other gateway claims those deliveries; one that stops cleanly
  lets go of them as its outbox closes, once nothing of it sends or records any more (its
  dispatcher stopped first), and says so: the others claim them at once. It renews only the
  leases on the targets its dispatcher still sends to (``keep_leases``) and lets go of the
  others, so the deliveries of a target a reload removed from one gateway go to the gateways
  that still have it, at once.
- A gateway that dispatches takes the lease on what it accepts in the same statement, and
  starts sending at once (the dispatcher's ``offer``); one that does not (``dispatching=False``)
  leaves its deliveries unleased and announces them with ``NOTIFY``.
- Deduplication holds across gateways: the digests table's primary key (see schema.py).
- Delivery ids are the database's prefix and an identity column: unique across gateways.

The database going away makes every operation raise :class:`OutboxError` within
``_TIMEOUT_S`` (the request path answers 503, ``/readyz`` too); the pool connects again by itself
when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, TypeVar

import asyncpg

from gateway.config import OutboxConfig, redact_url
from gateway.errors import OutboxError
from gateway.outbox.model import (
    STATES,
    AttemptRecord,
    AttemptResult,
    Backlog,
    Delivery,
    Outcome,
    Route,
    Size,
    State,
)
from gateway.outbox.postgres import claim, schema, sql
from gateway.outbox.postgres.committer import (
    FAILURES,
    Committer,
    pool_failure,
    statement_failure,
)
from gateway.outbox.postgres.listener import Listener
from gateway.outbox.rows import (
    MORE_KEYS,
    backlog_from_rows,
    delivery_from_row,
    delivery_id_of,
    rowid_of,
    rowids_named,
    stored_outcome,
)

__all__ = ["PostgresOutbox", "inspect"]

T = TypeVar("T")
log = logging.getLogger(__name__)

# Connecting, acquiring a connection and each statement: a database that does not answer
# within this is unavailable (503), well inside the time Meta waits for an answer.
_TIMEOUT_S = 5.0
_POOL_SIZE = 10
# Records of outcomes running at once, each on a connection it keeps: more than the group
# commits' two, since on a server short of CPU each record waits its turn for a core, and
# deliveries whose outcome is not yet recorded hold their target's budget (bench/README.md).
_RECORDS_IN_FLIGHT = 4
# A lease renewal that failed is tried again this soon (or at the next beat, if sooner): as
# soon as the database answers again, not a third of lease_s later.
_RENEW_AGAIN_S = 1.0
# Every connection commits durably, whatever the server or the role was set to. And compiles
# nothing: PostgreSQL compiles a statement the planner prices above ``jit_above_cost`` at each
# execution (https://www.postgresql.org/docs/15/jit-decision.html), which the outbox's short
# statements never repay: a claim over 40,000 pending deliveries in 20 conversations spent
# 2,614 ms of its 2,815 compiling (bench/README.md, "PostgreSQL's ordered claims").
_SETTINGS = {"synchronous_commit": "on", "application_name": "waba-gateway", "jit": "off"}


# Connecting: also a URL asyncpg cannot parse.
_OPEN_FAILURES: tuple[type[BaseException], ...] = (*FAILURES, ValueError)


def _where(config: OutboxConfig) -> str:
    return f"outbox.url = '{redact_url(config.url or '')}'"


async def _connect(url: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(url, timeout=_TIMEOUT_S, server_settings=_SETTINGS)


async def _on_a_connection(
    config: OutboxConfig, step: Callable[[asyncpg.Connection[Any]], Awaitable[T]]
) -> T:
    """``step`` on a connection of its own to the database, closed after it; any failure (to
    connect, or of the step) as OutboxError naming the (redacted) URL."""
    try:
        conn = await _connect(config.url or "")
    except _OPEN_FAILURES as exc:
        raise OutboxError(f"{_where(config)}: cannot connect: {_reason(exc)}") from None
    try:
        return await step(conn)
    except OutboxError as exc:
        raise OutboxError(f"{_where(config)}: {exc}") from None
    except FAILURES as exc:
        raise OutboxError(f"{_where(config)}: {_reason(exc)}") from None
    finally:
        await conn.close()


async def _leave_session(conn: asyncpg.Connection[Any]) -> None:
    """A pooled connection going back to the pool keeps its session as it is (the pool has
    already rolled back any open transaction). Only the outbox's own statements run on the pool,
    and they leave nothing behind in the session (no LISTEN, which has a connection of its own,
    no cursor, advisory lock or session setting), so the default reset (``RESET ALL``, ``UNLISTEN
    *`` and the rest) would only cost a round trip and four statements on every release."""


def _record_args(
    batch: list[tuple[Any, ...]], owner: str, more: Collection[int]
) -> tuple[Any, ...]:
    """RECORD's arguments for one round of rows (the values of $1 to $8, the owner, then
    $10: each row's created_at as handed out, and $11: whether its delivery, by row id, is
    among ``more``, those with an outcome in a later round)."""
    columns = [list(column) for column in zip(*batch, strict=True)]
    return (*columns[:8], owner, columns[8], [rowid in more for rowid in columns[0]])


class PostgresOutbox:
    """The :class:`~gateway.outbox.interface.Outbox` on a PostgreSQL database; made by
    :meth:`open`."""

    def __init__(
        self,
        config: OutboxConfig,
        pool: asyncpg.Pool[Any],
        prefix: str,
        *,
        dispatching: bool,
        on_commit: Callable[[int], None] | None,
        on_wake: Callable[[], None] | None,
        on_replay: Callable[[str | None], None] | None = None,
    ) -> None:
        self.config = config
        self._pool = pool
        self._prefix = prefix
        self._dispatching = dispatching
        # Names this gateway in the leases it holds: host, process, and a random part so that a
        # restarted process with a reused pid is a new owner.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Accepts are safe to run twice (a second finds its digest stored): see Committer.
        self._committer = Committer(
            pool, self._accept_group, timeout_s=_TIMEOUT_S, on_commit=on_commit, idempotent=True
        )
        # Outcomes recorded while every record slot is busy wait and go together, in the order
        # they were recorded: one statement and one transaction for all of them.
        self._recorder = Committer(
            pool,
            self._record_group,
            timeout_s=_TIMEOUT_S,
            in_flight=_RECORDS_IN_FLIGHT,
            ordered=False,
        )
        self._listener: Listener | None = None
        if on_wake is not None:
            url = config.url or ""
            self._listener = Listener(
                lambda: _connect(url),
                on_wake,
                timeout_s=_TIMEOUT_S,
                on_replay=None if on_replay is None else self._replayed(on_replay),
            )
            self._listener.start()
        self._closed = False
        # The targets whose leases the heartbeat keeps (None: every target), and a beat asked
        # for now, to let go of the others without waiting for the next one (keep_leases).
        self._kept: frozenset[str] | None = None
        self._beat_now = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        if dispatching:
            self._heartbeat = asyncio.create_task(self._beat(), name="outbox-lease-heartbeat")

    async def _beat(self) -> None:
        """Renew this gateway's leases three times per ``lease_s``, for as long as it lives,
        and at once when the targets to keep them for change. A renewal that failed is tried
        again after :data:`_RENEW_AGAIN_S` (or a beat, if shorter), until one succeeds: the
        next beat may come after the leases ran out, when a renewal that failed waited its
        timeout first (a lock, a database that hangs) or two in a row failed (a restart), and
        then another gateway claims, and sends again, deliveries this one is still sending."""
        every = self.config.lease_s / 3
        wait = every
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), wait)
            self._beat_now.clear()
            try:
                await self.renew()
            except OutboxError as exc:
                if not failing:  # said once until a renewal succeeds, not at every try
                    log.warning("could not renew the outbox leases (trying again): %s", exc)
                failing, wait = True, min(every, _RENEW_AGAIN_S)
                continue
            if failing:
                log.info("renewed the outbox leases again")
            failing, wait = False, every

    def keep_leases(self, targets: Collection[str]) -> None:
        """See :class:`~gateway.outbox.interface.KeepsLeases`: the next beat, at once, lets go
        of the leases on other targets' deliveries."""
        kept = frozenset(targets)
        if kept != self._kept:
            self._kept = kept
            self._beat_now.set()

    async def renew(self) -> int:
        """Renew this gateway's leases now (the heartbeat's beat) on the targets it keeps them
        for, let go of the others, but touch no row another transaction holds: see
        :data:`sql.RENEW`. Returns how many were let go."""
        kept = None if self._kept is None else sorted(self._kept)
        released = await self._run(
            lambda conn: conn.fetchval(sql.RENEW, self.owner, self.config.lease_s, kept)
        )
        return int(released)

    @classmethod
    async def open(
        cls,
        config: OutboxConfig,
        *,
        dispatching: bool = True,
        on_commit: Callable[[int], None] | None = None,
        on_wake: Callable[[], None] | None = None,
        create: bool = True,
        on_replay: Callable[[str | None], None] | None = None,
    ) -> PostgresOutbox:
        """Connect, check (or create) the schema, and open the pool. ``on_wake``: called when
        another gateway announces deliveries; ``on_replay`` (with ``on_wake``), when any
        gateway or command replays a delivery (its id; ``None``: pending ones, any of them).
        Raises OutboxError naming the (redacted) URL."""
        prefix = await _on_a_connection(config, lambda conn: schema.ensure(conn, create=create))
        try:
            pool = await asyncpg.create_pool(
                config.url or "",
                min_size=1,
                max_size=_POOL_SIZE,
                timeout=_TIMEOUT_S,
                command_timeout=_TIMEOUT_S,
                server_settings=_SETTINGS,
                reset=_leave_session,
            )
        except FAILURES as exc:
            raise OutboxError(f"{_where(config)}: cannot connect: {_reason(exc)}") from None
        return cls(
            config,
            pool,
            prefix,
            dispatching=dispatching,
            on_commit=on_commit,
            on_wake=on_wake,
            on_replay=on_replay,
        )

    def _replayed(self, on_replay: Callable[[str | None], None]) -> Callable[[str], None]:
        """The listener's hook for a replay announced with a row id (or none): the id as this
        outbox spells it."""

        def heard(rowid: str) -> None:
            on_replay(delivery_id_of(self._prefix, int(rowid)) if rowid.isdigit() else None)

        return heard

    async def _run(self, func: Callable[[Any], Awaitable[T]]) -> T:
        """``func`` on a pooled connection; any database failure as OutboxError."""
        if self._closed:
            raise OutboxError("outbox is closed")
        acquired = False
        try:
            async with self._pool.acquire(timeout=_TIMEOUT_S) as conn:
                acquired = True
                return await func(conn)
        except FAILURES as exc:
            raise OutboxError(
                f"outbox database unavailable: {self._failure(exc, acquired)}"
            ) from None

    def _failure(self, exc: BaseException, acquired: bool) -> str:
        """Why an operation failed: its statement (with a connection ``acquired``), or the
        pool, which had none to give (a timeout says which)."""
        if acquired:
            return statement_failure(exc, _TIMEOUT_S)
        return pool_failure(self._pool, exc, _TIMEOUT_S)

    async def close(self) -> None:
        """Finish the accepts and outcomes already queued, let go of this gateway's leases
        (:meth:`_let_go`), then of the connections. Called once nothing sends any more: the
        runtime stops the dispatcher first (its batches finished or cancelled)."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._committer.close()
        # Every outcome submitted is committed (or failed) before the leases go: one recorded
        # after them would not count (RECORD wants the lease), and its delivery be sent again.
        await self._recorder.close()
        if self._dispatching:
            await self._let_go()
        if self._listener is not None:
            await self._listener.close()
        try:
            await self._pool.close()
        except FAILURES:
            self._pool.terminate()

    async def _let_go(self) -> None:
        """Let go of this gateway's leases on pending deliveries and announce them
        (:data:`sql.RELEASE`): a clean stop (SIGTERM, a restart) hands what this gateway had
        not sent to the other gateways, or to its next start (a new owner), at once, rather
        than ``lease_s`` after its last beat. Failing (the database away), the leases run out
        as a dead gateway's do."""
        acquired = False
        try:
            async with self._pool.acquire(timeout=_TIMEOUT_S) as conn:
                acquired = True
                released = await conn.fetchval(sql.RELEASE, self.owner, timeout=_TIMEOUT_S)
        except FAILURES as exc:
            reason = self._failure(exc, acquired)
            log.warning("could not let go of the outbox leases at close: %s", reason)
            return
        if released:
            log.info("let go of the leases on %d pending deliveries", released)

    # -- operations --------------------------------------------------------------------------

    async def accept(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
    ) -> list[Delivery] | None:
        if self._closed:
            raise OutboxError("outbox is closed")
        found = await self._committer.submit(
            (hashlib.sha256(body).digest(), now, signature, body, trace, routes)
        )
        if found is None:
            return None
        notification_id, ids, held = found
        return Delivery.fresh(
            [delivery_id_of(self._prefix, rowid) for rowid in ids],
            routes,
            notification_id=notification_id,
            body=body,
            signature=signature,
            now=now,
            behind=[delivery_id_of(self._prefix, rowid) for rowid in ids if rowid in held],
            trace=trace,
        )

    async def _accept_group(
        self, conn: Any, group: list[tuple[Any, ...]]
    ) -> list[tuple[int, list[int], frozenset[int]] | None]:
        """One group commit's accepts (``(digest, now, signature, body, trace, routes)`` each,
        in the order their digests' rows are to be locked) as one call: for each, None for a
        duplicate, else its notification id, its deliveries' ids in route order and the ids
        among them an earlier pending delivery of their conversation holds back."""
        owner = self.owner if self._dispatching else None
        route_of: list[int] = []
        targets: list[str] = []
        bodies: list[bytes | None] = []
        keys: list[str | None] = []
        for number, item in enumerate(group, 1):
            for route in item[5]:
                route_of.append(number)
                targets.append(route.target)
                bodies.append(route.body)
                keys.append(route.key)
        row = await conn.fetchrow(
            sql.ACCEPT,
            [item[0] for item in group],
            [item[1] for item in group],
            [item[2] for item in group],
            [item[3] for item in group],
            [item[4] for item in group],
            self.config.dedup_window_s,
            route_of,
            targets,
            bodies,
            keys,
            owner,
            self.config.lease_s,
            owner is None,
            timeout=_TIMEOUT_S,
        )
        notification_ids, delivery_ids, behind = row[0], row[1] or [], frozenset(row[2] or ())
        found: list[tuple[int, list[int], frozenset[int]] | None] = []
        taken = 0
        for item, notification_id in zip(group, notification_ids, strict=True):
            if notification_id is None:
                found.append(None)
                continue
            count = len(item[5])
            found.append((notification_id, delivery_ids[taken : taken + count], behind))
            taken += count
        return found

    async def following(
        self, now: float, target: str, after: Mapping[str, str], length: int
    ) -> dict[str, list[Delivery]]:
        """What follows each named delivery in its conversation, leased to this gateway as a
        claim leases a run (:data:`claim.EXTEND`): as far as each is due and no other gateway
        holds it, so the order holds across gateways as it does for a claim's runs. One
        statement for every conversation named."""
        heads = {rowid: key for key, rowid in rowids_named(after, self._prefix).items()}
        if not heads:
            return {}
        args = (list(heads), target, length, self.config.lease_s, now, self.owner)
        rows = await self._run(lambda conn: conn.fetch(claim.EXTEND, *args))
        found: dict[str, list[Delivery]] = {}
        for row in sorted(rows, key=lambda row: (row[-2], row[-1])):  # by run, then step
            found.setdefault(heads[row[-2]], []).append(self._delivery(row))
        return found

    async def take_tokens(
        self, target: str, rate_per_s: float, burst: int, want: int
    ) -> int | None:
        granted = await self._run(
            lambda conn: conn.fetchval(sql.TAKE_TOKENS, target, rate_per_s, float(burst), want)
        )
        return int(granted)

    async def give_back_tokens(
        self, target: str, rate_per_s: float, burst: int, count: int
    ) -> None:
        await self._run(
            lambda conn: conn.execute(sql.GIVE_BACK_TOKENS, target, float(count), float(burst))
        )

    async def due(
        self,
        now: float,
        limits: Mapping[str, int],
        exclude: Collection[str] = (),
        ordered: Collection[str] = (),
        conversations: Mapping[str, Collection[str]] | None = None,
        runs: Mapping[str, int] | None = None,
        more: MutableMapping[str, Collection[str]] | None = None,
    ) -> list[Delivery]:
        skip = [r for r in (rowid_of(i, self._prefix) for i in exclude) if r is not None]
        targets, lims, modes, followers, key_of, keys = claim.claim_args(
            limits, frozenset(ordered), conversations or {}, runs or {}
        )
        if not targets:
            return []
        args = (targets, lims, modes, followers, now, self.owner, skip, self.config.lease_s)
        rows = claim.in_order(
            await self._run(lambda conn: conn.fetch(claim.CLAIM, *args, key_of, keys))
        )
        handed = [self._delivery(row) for row in rows]
        if more is not None:
            named = conversations or {}
            for target in frozenset(ordered).intersection(limits).difference(named):
                heads = sum(
                    1
                    for row, d in zip(rows, handed, strict=True)
                    if d.target == target and not row[-1]  # a first delivery, not a follower
                )
                if heads >= limits[target]:  # filled its limit: more may be due
                    await self._more(target, now, limits[target], handed, more)
        return handed

    async def _more(
        self,
        target: str,
        now: float,
        limit: int,
        handed: Sequence[Delivery],
        more: MutableMapping[str, Collection[str]],
    ) -> None:
        """After a look at every conversation of ordered ``target`` that filled its limit:
        the keys of other conversations with a delivery due (not leased: the claims that ask
        for them by key lease what they find first), from the order index alone."""
        taken = {d.order_key for d in handed if d.target == target}
        rows = await self._run(
            lambda conn: conn.fetch(sql.DUE_KEYS, target, now, MORE_KEYS * limit + len(taken))
        )
        more[target] = [row[0] for row in rows if row[0] not in taken][: MORE_KEYS * limit]

    def _delivery(self, row: Any) -> Delivery:
        return delivery_from_row(row, self._prefix)

    async def record_many(
        self,
        attempts: Sequence[tuple[str, Outcome, AttemptResult]],
        now: float,
        created: Mapping[str, float] | None = None,
        patient: bool = False,
    ) -> None:
        # ``patient`` changes nothing here: the committer's groups are bounded by the database
        # round trip, not by a wait for company.
        since = created or {}
        rows = []
        for delivery_id, outcome, result in attempts:
            rowid = rowid_of(delivery_id, self._prefix)
            if rowid is None:
                continue
            state, next_at, error, held = stored_outcome(outcome, now)
            excerpt = result.response_excerpt[: sql.EXCERPT_CHARS]
            handed = since.get(delivery_id)
            rows.append((rowid, state, next_at, result.status, error, excerpt, held, now, handed))

        if rows:
            if self._closed:
                raise OutboxError("outbox is closed")
            await self._recorder.submit((rows,))

    async def _record_group(self, conn: Any, group: list[tuple[Any, ...]]) -> list[None]:
        """The outcomes of one or more :meth:`record_many` calls (``(rows,)`` each, in the
        order they were made) as one transaction and one round trip: one statement per round;
        a delivery recorded twice goes in two rounds, as two attempts in their order."""
        rounds: list[list[tuple[Any, ...]]] = []
        times: dict[int, int] = {}
        for (rows,) in group:
            for values in rows:
                turn = times.get(values[0], 0)
                times[values[0]] = turn + 1
                if turn == len(rounds):
                    rounds.append([])
                rounds[turn].append(values)
        # A delivery with an outcome in the next round keeps its lease through this one.
        later = [{values[0] for values in batch} for batch in rounds[1:]] + [set()]
        args = [
            _record_args(batch, self.owner, more) for batch, more in zip(rounds, later, strict=True)
        ]
        if len(args) == 1:  # one statement: no executemany's batch machinery
            await conn.execute(sql.RECORD, *args[0], timeout=_TIMEOUT_S)
        else:  # in one transaction: executemany's is implicit
            await conn.executemany(sql.RECORD, args, timeout=_TIMEOUT_S)
        return [None] * len(group)

    async def backlog(self) -> list[Backlog]:
        return backlog_from_rows(await self._run(lambda conn: conn.fetch(sql.BACKLOG)))

    async def query(
        self,
        *,
        state: State | None = None,
        target: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Delivery]:
        statement, params = sql.list_query(state, target)
        rows = await self._run(lambda conn: conn.fetch(statement, *params, limit, offset))
        return [delivery_from_row(row, self._prefix) for row in rows]

    async def get(self, delivery_id: str) -> Delivery | None:
        rowid = rowid_of(delivery_id, self._prefix)
        if rowid is None:
            return None
        row = await self._run(lambda conn: conn.fetchrow(sql.GET, rowid))
        return None if row is None else delivery_from_row(row, self._prefix)

    async def attempts(self, delivery_id: str) -> list[AttemptRecord]:
        rowid = rowid_of(delivery_id, self._prefix)
        if rowid is None:
            return []
        rows = await self._run(lambda conn: conn.fetch(sql.ATTEMPTS, rowid))
        return [
            AttemptRecord(number=n, at=at, state=state, status=status, error=error, response=resp)
            for n, at, state, status, error, resp in rows
        ]

    async def replay_many(
        self, *, state: State, target: str | None, since: float | None, now: float
    ) -> int:
        """In steps of a bounded number of rows, each its own transaction (see
        :func:`sql.replay_batch_query`), as :meth:`purge_dead`: one transaction for every
        matching row outran the pool's command timeout on a large backlog, was rolled back,
        and so could never replay it. A failure part way leaves the steps before it replayed
        (running the command again replays the rest). One announcement at the end."""
        statement, params = sql.replay_batch_query(state, target, since)
        bound = int(await self._run(lambda conn: conn.fetchval(sql.PLACE_BOUND)))
        after, count = 0, 0
        while True:
            row = await self._run(
                lambda conn, after=after: conn.fetchrow(statement, *params, after, bound, now)  # type: ignore[misc]
            )
            assert row is not None
            count += int(row[0])
            if int(row[1]) < sql.REPLAY_BATCH:
                break
            after = int(row[2])
        if count:  # every gateway may claim them now
            # Pending ones may wait in memory in a run, at any gateway: it lets go.
            said = sql.REPLAYED if state == "pending" else ""
            await self._run(lambda conn: conn.execute(f"NOTIFY {sql.CHANNEL}, '{said}'"))
        return count

    async def purge_dead(self, before: float, now: float | None = None) -> int:
        """Each step its own statement of a bounded number of rows, as :meth:`prune` (one
        statement for every expired dead letter outran the pool's command timeout on a large
        backlog, was rolled back, and so never ended). Their notifications go with the next
        prune, which looks at every one (``now`` is not needed here).

        A step that fails after others have removed dead letters ends the purge with their
        count, the failure logged: the steps before it have committed, and the count is what
        the caller's warning and counter say was removed (raised, it was lost, and those dead
        letters went silently). The next purge removes the rest."""
        removed = 0
        while True:
            try:
                row = await self._run(lambda conn: conn.fetchrow(sql.PURGE_DEAD, before))
            except OutboxError as exc:
                if not removed:
                    raise
                log.warning("stopped removing expired dead letters after %d: %s", removed, exc)
                return removed
            assert row is not None
            removed += int(row[0])
            if int(row[1]) < sql.PRUNE_BATCH:
                return removed

    async def counts(self) -> dict[str, int]:
        rows = await self._run(lambda conn: conn.fetch(sql.COUNT))
        found = {row[0]: int(row[1]) for row in rows}
        return {state: found.get(state, 0) for state in STATES}

    async def replay(self, delivery_id: str, now: float) -> bool:
        rowid = rowid_of(delivery_id, self._prefix)
        if rowid is None:
            return False
        rows = await self._run(lambda conn: conn.fetch(sql.REPLAY, rowid, now))
        return len(rows) == 1

    async def delivered_targets(self) -> list[str]:
        rows = await self._run(lambda conn: conn.fetch(sql.DELIVERED_TARGETS))
        return [str(row[0]) for row in rows]

    async def prune(self, now: float, retention_s: float, targets: Collection[str]) -> int:
        """Each step its own statement of a bounded number of rows: requests committing
        meanwhile never wait behind a large backlog."""
        removed = 0
        for name in tuple(targets):
            while True:
                count = int(
                    await self._run(
                        lambda conn, name=name: conn.fetchval(  # type: ignore[misc]
                            sql.PRUNE_DELIVERED, name, now - retention_s
                        )
                    )
                )
                removed += count
                if count < sql.PRUNE_BATCH:
                    break
        await self._prune_notifications(now - retention_s)
        while True:
            status = await self._run(
                lambda conn: conn.execute(sql.PRUNE_DIGESTS, now - self.config.dedup_window_s)
            )
            if _affected(status) < sql.PRUNE_BATCH:
                break
        return removed

    async def _prune_notifications(self, before: float) -> None:
        """Remove the notifications received ``before`` that no delivery uses, walking through
        them from the oldest id in steps of a bounded number (:data:`sql.PRUNE_NOTIFICATIONS`).
        Ids grow with time, so a step that read none received before ``before`` ends the walk;
        one that read some goes on, so that a notification of a gateway whose clock runs a
        little ahead, among older ones, holds none of them back. Every prune walks from the
        oldest: those a delivery still used when the last one passed them may be unused now."""
        after = 0
        while True:
            row = await self._run(
                lambda conn, after=after: conn.fetchrow(sql.PRUNE_NOTIFICATIONS, before, after)  # type: ignore[misc]
            )
            assert row is not None
            if int(row[1]) < sql.PRUNE_BATCH or not row[3]:
                return
            after = int(row[2])

    async def size(self) -> Size:
        rows = await self._run(lambda conn: conn.fetchval(sql.SIZE))
        return Size(rows=int(rows or 0))

    async def held_back(self, targets: Collection[str]) -> dict[str, int]:
        wanted = list(targets)
        if not wanted:
            return {}
        rows = await self._run(lambda conn: conn.fetch(sql.HELD_BACK, wanted))
        return {str(row[0]): int(row[1]) for row in rows}

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1"))


def _affected(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3``."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def inspect(config: OutboxConfig) -> str:
    """What ``check`` says about the database: reachable, and the schema version it holds.
    Raises OutboxError when it is unreachable or holds another version."""

    async def read(
        conn: asyncpg.Connection[Any],
    ) -> tuple[tuple[int, str] | None, asyncpg.ServerVersion]:
        return await schema.read_version(conn), conn.get_server_version()

    found, server = await _on_a_connection(config, read)
    where = f"outbox database {redact_url(config.url or '')} (PostgreSQL {server.major})"
    if found is None:
        return f"{where} is reachable; its schema is created at the first start"
    if found[0] != schema.VERSION:
        raise OutboxError(
            f"{_where(config)}: schema version {found[0]}, this version of waba-gateway uses"
            f" {schema.VERSION}"
        )
    return f"{where} is reachable, schema version {found[0]}"
