"""The one interface every outbox backend provides, and all the rest of the gateway uses.

Rule: the request path, the dispatcher, the admin API and the command line talk to an outbox
only through :class:`Outbox`; none of them opens a database, runs a statement or knows which
engine is behind it. A backend raises :class:`~gateway.errors.OutboxError` when it cannot do
what is asked (the request path answers 503 to that, so Meta retries).

The one promise that matters most: :meth:`Outbox.accept` returns only after the notification
and its deliveries are durable, so a 200 to Meta never stands for something a crash can lose.

What the admin console reads is part of it too (a backend provides all of it): ``offset`` on
:meth:`query` (paging), :meth:`get`, :meth:`attempts` (so :meth:`record_many` also keeps one
:class:`~gateway.outbox.model.AttemptRecord` per attempt, removed with its delivery by
:meth:`prune`), :meth:`backlog` and :meth:`replay_dead`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from gateway.outbox.model import (
    AttemptRecord,
    AttemptResult,
    Backlog,
    Delivery,
    Outcome,
    Route,
    Size,
    State,
)

__all__ = ["AcceptsSoon", "KeepsLeases", "LinesUp", "Outbox", "Settles", "settle_from"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class Settles(Protocol[T_contra]):
    """What the outbox settles once a notification is durable, on the event loop's thread: an
    :class:`asyncio.Future`, or the caller's own object that acts at once rather than at the
    loop's next turn, as a future's done callbacks do (``done()``: nobody waits any more)."""

    def done(self) -> bool: ...
    def set_result(self, result: T_contra, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


def settle_from(into: Settles[T], done: asyncio.Future[T]) -> None:
    """Hand what ``done`` ended with to ``into`` (a done callback: a cancelled future settles
    ``into`` with a :class:`asyncio.CancelledError`)."""
    if done.cancelled():
        into.set_exception(asyncio.CancelledError())
    elif (error := done.exception()) is not None:
        into.set_exception(error)
    else:
        into.set_result(done.result())


class Outbox(Protocol):
    """Durable storage of acknowledged notifications and the deliveries owed for them."""

    async def accept(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
    ) -> list[Delivery] | None:
        """Store a verified notification and one delivery per route, durably; return the
        deliveries, each keyed one saying whether an earlier pending delivery of its
        conversation holds it back (``Delivery.behind``). ``None``: an identical body was
        accepted inside the deduplication window, and nothing new is stored. ``trace``: the
        W3C trace context of the request (:mod:`gateway.tracing`), stored with the
        notification and handed out with each of its deliveries (``Delivery.trace``)."""
        ...

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
        """Pending deliveries whose time has come, oldest first: at most ``limits[target]`` for
        each target named there, leaving out the ids in ``exclude`` (in flight). For the
        targets in ``ordered``, a delivery with a conversation key is left out while an earlier
        one of its conversation (by acknowledgement, a replayed one at the back) is pending,
        for this gateway or any other sharing the outbox; an ordered target that
        ``conversations`` names is asked only for the first deliveries of those conversations
        (the ones whose first delivery may have changed), not for every conversation.

        ``runs``: for an ordered target named there, each first delivery may come with up to
        ``runs[target] - 1`` of the deliveries that follow it in its conversation, in order and
        each due, right after it in the list (the first ones alone count toward the limit).
        They are the caller's, as the first one is: the caller sends each only once the one
        before it has ended in delivery or dead letter (its outcome recorded or about to be),
        and lets the rest go when one is to be retried. A backend may hand out fewer, or none.

        ``more``: for an ordered target looked at in every conversation (not named in
        ``conversations``), a backend may set ``more[target]`` to the keys of conversations
        whose first delivery is due but did not fit the limit, for the caller to ask about by
        key later. A backend may name none."""
        ...

    async def following(
        self, now: float, target: str, after: Mapping[str, str], length: int
    ) -> dict[str, list[Delivery]]:
        """For each conversation of ordered ``target`` that ``after`` names, by its key: the
        due deliveries that follow delivery ``after[key]`` in that conversation (pending, and
        the caller's: the last of a run it holds, see :meth:`due`'s ``runs``), in order, at
        most ``length``, none past the first that is not due; none for a conversation whose
        delivery ``after[key]`` is no longer pending. They are the caller's, as its run is: it
        sends each only once the one before it ended in delivery or dead letter. A backend
        may hand out none (the caller's next claims then find them)."""
        ...

    async def take_tokens(
        self, target: str, rate_per_s: float, burst: int, want: int
    ) -> int | None:
        """Take up to ``want`` tokens from ``target``'s rate limit bucket shared by every
        gateway using this outbox (refilled at ``rate_per_s`` up to ``burst``, on one clock
        they all share); return how many were taken. ``None``: this outbox has a single
        dispatcher, which keeps the bucket itself (see :mod:`gateway.delivery.ratelimit`)."""
        ...

    async def give_back_tokens(
        self, target: str, rate_per_s: float, burst: int, count: int
    ) -> None:
        """Return ``count`` tokens :meth:`take_tokens` gave and no delivery used."""
        ...

    async def record_many(
        self,
        attempts: Sequence[tuple[str, Outcome, AttemptResult]],
        now: float,
        created: Mapping[str, float] | None = None,
        patient: bool = False,
    ) -> None:
        """Store the outcomes of attempts that ended at ``now``. Need not be durable at once:
        an outcome lost in a crash only means the delivery is attempted again. ``patient``:
        nothing but the caller waits on these outcomes (no place in a budget, no claim), so
        a backend may hold them longer, to record more of them in one commit. ``created``:
        each delivery's ``created_at`` as it was handed out; a delivery replayed since then
        (a replay renews it, from this process or any other) keeps its replay, and the
        outcome and its attempt are not recorded: the replay stands, and the delivery goes
        again where the replay put it."""
        ...

    async def backlog(self) -> list[Backlog]:
        """Each target's pending deliveries and dead letters, for every target that has any
        (configured or not: deliveries of a removed target stay, listed and replayable)."""
        ...

    async def query(
        self,
        *,
        state: State | None = None,
        target: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Delivery]:
        """Deliveries, most recently changed first, filtered by state and target, skipping the
        first ``offset`` (a stable order: ties broken by id, newest first)."""
        ...

    async def get(self, delivery_id: str) -> Delivery | None:
        """One delivery; ``None`` when this outbox has no delivery with that id."""
        ...

    async def attempts(self, delivery_id: str) -> list[AttemptRecord]:
        """Every attempt of a delivery :meth:`record_many` stored, oldest first, including
        those before a replay (their numbers start again at 1 after it). Empty for an unknown
        id."""
        ...

    async def counts(self) -> dict[str, int]:
        """The number of deliveries in each state."""
        ...

    async def replay(self, delivery_id: str, now: float) -> bool:
        """Make a delivery pending again, due now, with a fresh attempt count and age. False
        when this outbox has no delivery with that id."""
        ...

    async def replay_many(
        self, *, state: State, target: str | None, since: float | None, now: float
    ) -> int:
        """Make every delivery in ``state`` (of ``target``, last changed at or after ``since``)
        pending again, due now; return how many."""
        ...

    async def purge_dead(self, before: float, now: float | None = None) -> int:
        """Remove dead letters last changed before ``before``, and the notifications no
        delivery and no deduplication needs any more at ``now`` (default: the clock); return
        how many dead letters. In steps of a bounded number of rows: requests committing
        meanwhile never wait behind a large backlog."""
        ...

    async def delivered_targets(self) -> list[str]:
        """The targets that have delivered deliveries in the outbox, configured or not: a
        target removed from the configuration still has its delivered rows pruned."""
        ...

    async def prune(self, now: float, retention_s: float, targets: Collection[str]) -> int:
        """Remove ``targets``' delivered deliveries older than the retention, and notifications
        no longer needed for deduplication; return the number of deliveries removed. Pending
        deliveries and dead letters stay."""
        ...

    async def size(self) -> Size:
        """The outbox's size, for its gauge: bytes on disk for a file, rows for a database."""
        ...

    async def held_back(self, targets: Collection[str]) -> dict[str, int]:
        """For each of ``targets`` (kept in conversation order), how many conversations have
        a delivery waiting behind an earlier pending one: a count, never the keys."""
        ...

    async def ping(self) -> None:
        """Return when the outbox takes a write now; raise OutboxError when it does not."""
        ...

    async def close(self) -> None:
        """Finish what is already queued, then let go of the storage."""
        ...


@runtime_checkable
class AcceptsSoon(Protocol):
    """What a backend may offer besides :class:`Outbox`: :meth:`Outbox.accept` as a future,
    made without a coroutine, with the same promise (it resolves only once the notification
    and its deliveries are durable). The listener's ack path uses it when there, to spare each
    request a task of its own (``isinstance`` tells, once per outbox: the check looks up
    each method, so it is not made per request)."""

    def accept_soon(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
        *,
        then: Callable[[list[Delivery] | None], T],
    ) -> asyncio.Future[T]:
        """The future of ``then(what accept returns)``, called on the event loop's thread once
        the notification is durable (what ``then`` raises fails the future)."""
        ...

    def accept_into(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
        *,
        then: Callable[[list[Delivery] | None], T],
        into: Settles[T],
    ) -> None:
        """:meth:`accept_soon`, settling ``into`` instead of a future of its own."""
        ...


@runtime_checkable
class LinesUp(Protocol):
    """What a backend with a single dispatcher may offer besides :class:`Outbox`: it holds
    each ordered target's conversations in memory, so a claim that looks at every
    conversation costs it no more than one that names a few. The dispatcher then asks about
    every conversation at each claim and takes no runs (:meth:`Outbox.due`'s ``runs``):
    each claim hands out the first deliveries of their conversations in the order they were
    stored, as a target without order gets them."""

    def lines_up(self) -> bool:
        """Whether its claims line conversations up in memory."""
        ...


@runtime_checkable
class KeepsLeases(Protocol):
    """What a backend shared by several gateways offers besides :class:`Outbox`: its gateway
    leases the deliveries it claims and accepts, and keeps them while it lives, so none of the
    others sends them. The dispatcher says which targets it still sends to (its own, and those
    a reload removed while batches are still out for them), at start and whenever that
    changes; the leases on any other target's deliveries are let go."""

    def keep_leases(self, targets: Collection[str]) -> None:
        """Keep, from now on, only the leases on deliveries to ``targets``, and let go of this
        gateway's others soon (not waiting for them to run out), for the gateways that send to
        those targets to claim. Until it is first called, every lease is kept."""
        ...
