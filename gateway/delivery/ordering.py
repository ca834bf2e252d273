"""Which conversations of each ordered target the next claim must look at.

Rule: pure bookkeeping with the time passed in; the outbox alone decides what is first of a
conversation (:meth:`gateway.outbox.Outbox.due`). A claim is needed for a conversation only when
a delivery of it waits (stored behind another, or with no room to start: :meth:`held`) and the
one ahead ends in delivery or dead letter (:meth:`finished`), or when its first delivery's retry
comes due (:meth:`retry_at`). So a claim asks for those conversations alone, one index seek
each, instead of a pass over every pending delivery of the target; a conversation with nothing
waiting (the usual case: one message answered before the next) costs no query at all.

What it cannot see: deliveries stored by another worker or gateway, replays, and anything lost
between a crash and a restart. For those a claim looks at every conversation: at the start, after
a wake-up from outside (:meth:`everything`), and at the latest every :data:`FULL_EVERY_S`. Such a
look that had no room for every conversation it found names those beyond its room (their keys
only: see :meth:`gateway.outbox.Outbox.due`'s ``more``); they are asked about by key, as many
as each later claim has room for, oldest first, so that a backlog of many conversations keeps
its target busy between two looks at every conversation, each of which costs a pass over every
pending delivery of the target and so comes seldom: no sooner than :data:`FULL_AGAIN_S` after
the names run out while the conversations it started announce more, but at once when a claim
has room and nothing to ask about, since what it did not name would wait for it.

A backlog drains in runs (:class:`Runs`): a claim takes up to :data:`RUN` deliveries of each
conversation it starts, in order, and each goes as soon as the target's answer ended the one
before it in delivery or dead letter, with no claim in between and before that outcome is
recorded (what a crash or a failed record sends again: the dispatcher's ``_go_on``). A run as
long as a claim takes may have more behind it: once only :data:`EXTEND_AT` of it wait, what
follows its last delivery is read (:meth:`gateway.outbox.Outbox.following`) and joins it
(:meth:`Runs.extend`), so that a long conversation goes on with no claim, and no idle target,
between two runs. A replay of a delivery waiting in a run lets the run go
(:meth:`Runs.release`). The claim owns
the run as it owns its first delivery (its lease, with a shared outbox), so the order holds
across workers and gateways just as it does one claim at a time.

An outbox that holds every conversation in memory (:class:`gateway.outbox.LinesUp`: SQLite,
with its one dispatcher) needs none of this: each claim looks at every conversation, at no
cost, and hands out first deliveries only; :class:`Conversations` then keeps just the retries'
times (for the dispatcher's sleep) and :class:`Runs` holds nothing.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence

from gateway.outbox import Delivery

__all__ = ["EXTEND_AT", "FULL_AGAIN_S", "FULL_EVERY_S", "RUN", "Conversations", "Runs"]

# The deliveries of one conversation a claim (or a read of what follows a run) may take at
# once: enough that a backlog of one conversation costs a read per eight deliveries rather than
# one each, few enough that the bodies held in memory stay within eleven times the target's
# batch (dispatcher.batch_size): one on its way, EXTEND_AT waiting, and RUN read behind them.
RUN = 8

# A run that may have more behind it asks for what follows its last delivery once this few of
# its deliveries wait in memory: the read then runs while those go, one round trip each, and
# the run goes on without a claim in between (:meth:`Runs.extend`). Runs started together (a
# look at every conversation starts as many as the target's budget) go in step, so without it
# they all ended in the same round trip and the target waited, idle, for the claim after them.
EXTEND_AT = 2

# Stands for deliveries not known one by one: a look at every conversation started the first
# of this one, and whatever was stored behind it (by another worker or gateway, or before a
# restart) is not known here. Kept until a claim finds nothing more due in the conversation.
_UNKNOWN = ""

# The longest a conversation change no one announced (another worker's or gateway's delivery)
# waits for a claim to notice it; the pass over every conversation costs about 2 us per pending
# delivery of the target, so once a second is a few per cent of a core at 20,000 pending.
FULL_EVERY_S = 1.0
# After a look at every conversation that had no room for all it found: the next such look,
# at the soonest, or ten times as long as that look took (a look at a million pending
# deliveries takes most of a second: it then gets a tenth of the dispatcher's time, at most).
# Meanwhile the conversations it did start announce their next deliveries.
FULL_AGAIN_S = 0.05
_FULL_SHARE = 10


class Conversations:
    def __init__(self, free_looks: bool = False) -> None:
        # The outbox lines every conversation up in memory (gateway.outbox.LinesUp): each
        # claim looks at every one, at no cost, and nothing is kept here but the retries.
        self._free_looks = free_looks
        self._ordered: frozenset[str] = frozenset()
        # Per target, the conversations the next claims must ask about, oldest announcement
        # first (an insertion-ordered dict as an ordered set): a claim takes as many as it has
        # room for, so that a backlog over many conversations costs one seek per delivery
        # started, not one per conversation waiting at every claim.
        self._keys: dict[str, dict[str, None]] = {}
        self._full: set[str] = set()
        self._last_full: dict[str, float] = {}
        self._retries: list[tuple[float, str, str]] = []
        # Per target and conversation, the ids of the deliveries this process knows to wait.
        self._waiting: dict[str, dict[str, set[str]]] = {}
        # Per target, the conversations the last look at every one found beyond its room, in
        # its order (an insertion-ordered dict as an ordered set).
        self._more: dict[str, dict[str, None]] = {}
        # Per target, the wait before the next full look once those are all asked about.
        self._again: dict[str, float] = {}
        # Targets whose last full look had no room for all it found: more may be due than it
        # named (see request()).
        self._cut: set[str] = set()

    def reconfigure(self, ordered: Collection[str]) -> None:
        """Keep order for ``ordered`` now: a target new to it is looked at in full first."""
        self._ordered = frozenset(ordered)
        if self._free_looks:
            self._retries = [r for r in self._retries if r[1] in self._ordered]
            heapq.heapify(self._retries)
            return
        for name in list(self._keys):
            if name not in ordered:
                del self._keys[name], self._waiting[name]
                self._last_full.pop(name, None)
                self._more.pop(name, None)
                self._again.pop(name, None)
                self._cut.discard(name)
        for name in ordered:
            if name not in self._keys:
                self._keys[name] = {}
                self._waiting[name] = {}
                self._full.add(name)
        self._full &= set(ordered)
        self._retries = [r for r in self._retries if r[1] in self._keys]
        heapq.heapify(self._retries)

    def everything(self) -> None:
        """Something this process did not see may have changed any conversation."""
        self._full |= set(self._keys)

    def recovered(self, target: str) -> None:
        """``target`` answers again after failing: its claims meanwhile had room for the one
        delivery that probed it, so their looks at every conversation named only a handful
        beyond it (``more``), and the claims with the whole budget's room would ask about
        those alone. The next claim looks at every conversation instead: a backlog that
        built up while the target was down starts draining at once."""
        if target in self._keys:
            self._full.add(target)

    def changed(self, target: str, key: str | None) -> None:
        """A delivery of ``key`` was stored, delivered or dead-lettered (``None``: a delivery
        with no conversation, which only a full look finds)."""
        if target not in self._keys:
            return
        if key is None:
            self._full.add(target)
        else:
            self._keys[target][key] = None

    def held(self, target: str, key: str | None, delivery_id: str) -> None:
        """Delivery ``delivery_id`` of ``key`` was stored and could not start: the next claim
        looks at its conversation, and so does the one after each delivery of it ends, until
        it starts."""
        waiting = self._waiting.get(target)
        if waiting is not None and key is not None:
            waiting.setdefault(key, set()).add(delivery_id)
        self.changed(target, key)

    def started(self, target: str, key: str | None, delivery_id: str) -> None:
        """A claim started delivery ``delivery_id``: it no longer waits."""
        waiting = self._waiting.get(target)
        if waiting is None or key is None or key not in waiting:
            return
        waiting[key].discard(delivery_id)
        if not waiting[key]:
            del waiting[key]

    def finished(self, target: str, key: str | None) -> None:
        """A delivery of ``key`` was delivered or dead-lettered: its conversation is looked at
        again only when something is known to wait in it."""
        waiting = self._waiting.get(target)
        if waiting is not None and key is not None and waiting.get(key):
            self._keys[target][key] = None

    def retry_at(self, target: str, key: str | None, at: float) -> None:
        """The first delivery of ``key`` is due again at ``at``."""
        if target in self._ordered:
            heapq.heappush(self._retries, (at, target, key or ""))

    def request(
        self, now: float, targets: Iterable[str], rooms: Mapping[str, int] | None = None
    ) -> dict[str, set[str] | None]:
        """For each ordered one of ``targets``, the conversations to look at (``None``: all).
        An empty set: nothing changed, no need to ask. ``rooms``: how many deliveries each
        target's claim may start: as many of the conversations announced are asked about,
        oldest first (the others wait for the next claims: :meth:`more_to_ask`), and as many
        of those found beyond the last full look's room. Without ``rooms``, every one
        announced."""
        while self._retries and self._retries[0][0] <= now:
            _, target, key = heapq.heappop(self._retries)
            self.changed(target, key or None)
        if self._free_looks:
            return {name: None for name in targets if name in self._ordered}
        asked: dict[str, set[str] | None] = {}
        for name in targets:
            keys = self._keys.get(name)
            if keys is None:
                continue
            if name in self._full or now - self._last_full.get(name, 0.0) >= FULL_EVERY_S:
                self._look_at_all(name, now)
                asked[name] = None
            else:
                # Taken out: a change announced while the claim runs is asked about again.
                room = 0 if rooms is None else rooms.get(name, 0)
                if rooms is None or len(keys) <= room:
                    look = set(keys)
                    keys.clear()
                else:
                    # The claim can start ``room`` at most: asking about every conversation
                    # announced would seek each again at every claim until its turn came.
                    look = set(itertools.islice(keys, room))
                    for key in look:
                        del keys[key]
                more = self._more.get(name)
                while more and room > 0:
                    key = next(iter(more))
                    del more[key]
                    if key not in look:
                        look.add(key)
                        room -= 1
                if not more and name in self._again:  # all asked about: look again soon
                    self._last_full[name] = min(
                        self._last_full.get(name, 0.0), now - FULL_EVERY_S + self._again.pop(name)
                    )
                if not look and not more and name in self._cut and (rooms is None or room > 0):
                    # Room, nothing known to ask about, and the last full look had no room for
                    # all it found: what it did not name waits for the next look, and so would
                    # the target. Look now.
                    self._look_at_all(name, now)
                    asked[name] = None
                    continue
                asked[name] = look
        return asked

    def _look_at_all(self, name: str, now: float) -> None:
        """The next claim for ``name`` looks at every conversation: what was announced or
        named before is in it."""
        self._full.discard(name)
        self._last_full[name] = now
        self._keys[name].clear()
        self._more.pop(name, None)
        self._again.pop(name, None)

    def claimed(
        self,
        target: str,
        asked: set[str] | None,
        started: Collection[str],
        complete: bool,
        took_s: float = 0.0,
        more: Iterable[str] = (),
    ) -> None:
        """What a claim for ``asked`` found: ``started`` conversations now have a delivery out
        (its outcome announces the next); ``complete``: the claim had room for every first
        delivery it found, so the others asked about have none due. Otherwise (or when the
        claim did not happen: ``complete`` false, nothing started) they are asked about
        again. ``more``: conversations a look at every one found due beyond its room."""
        keys = self._keys.get(target)
        if keys is None:
            return
        waiting = self._waiting[target]
        if asked is None:
            for key in started:
                waiting.setdefault(key, set()).add(_UNKNOWN)
            self._more[target] = dict.fromkeys(more)
            if complete:
                self._cut.discard(target)
            else:
                self._cut.add(target)
        elif complete:
            for key in asked.difference(started):
                ids = waiting.get(key)
                if ids is not None:
                    ids.discard(_UNKNOWN)
                    if not ids:
                        del waiting[key]
        if complete:
            return
        if asked is None:
            # Not at once: each look reads every pending delivery's index entry, and while the
            # target is this busy its started conversations keep it supplied.
            again = min(FULL_EVERY_S, max(FULL_AGAIN_S, _FULL_SHARE * took_s))
            if self._more.get(target):
                # It named more: those keep the target supplied, the next look comes once
                # they are all asked about.
                self._again[target] = again
                return
            last = self._last_full.get(target, 0.0)
            self._last_full[target] = min(last, last - FULL_EVERY_S + again)
        else:
            # Found due with no room: first in line for the next claim.
            first = dict.fromkeys(asked.difference(started))
            first.update(keys)
            self._keys[target] = first

    def more_to_ask(self, target: str) -> bool:
        """Whether conversations announced for ``target`` wait for a claim to ask about them
        (a claim asks about as many as it has room for)."""
        return bool(self._keys.get(target))

    def next_at(self) -> float | None:
        """When the next retry comes due (for the dispatcher's sleep)."""
        return self._retries[0][0] if self._retries else None


class Runs:
    """The deliveries claims handed out behind the first of their conversation (see
    :meth:`gateway.outbox.Outbox.due`'s ``runs``), each waiting in memory for the one before it.

    Rule: pure bookkeeping; a run goes on only after an outcome that releases its conversation
    (delivery or dead letter, as judged), and is let go whole otherwise: its deliveries stay
    pending in the outbox and a later claim finds them in their order."""

    def __init__(self) -> None:
        # The run behind each delivery in flight, by that delivery's id.
        self._behind: dict[str, deque[Delivery]] = {}
        # The ids of the deliveries waiting in a run. A claim need not leave them out: the one
        # before each is pending, so the outbox hands one out as first of its conversation
        # only when that one was replayed to the back while the claim ran; sort() then leaves
        # it to its run, as it leaves one that started meanwhile.
        self.parked: set[str] = set()
        # Runs that were as long as a claim takes: more may wait behind their last one.
        self._full: set[str] = set()
        # Runs whose last delivery (by id) waits for a read of what follows it: the run it
        # ends, kept while that delivery has not ended (see extend()).
        self._extending: dict[str, deque[Delivery]] = {}
        # Of those, the ones not yet handed to a read (wanted()).
        self._wanted: dict[str, Delivery] = {}

    def sort(
        self, due: Sequence[Delivery], ordered: Collection[str], busy: Collection[str] = ()
    ) -> list[Delivery]:
        """The deliveries of a claim to start now, in order: each delivery that follows an
        earlier one of its conversation in ``due`` (of an ``ordered`` target) is kept behind
        the first one instead, unless that one is ``busy`` (started while the claim ran, by the
        run it belongs to: which already holds the rest) or waits in a run itself (``parked``:
        its run holds the rest too; the caller starts neither). A follower that is itself
        ``busy`` or parked ends its run there, it and what follows left to the outbox: it is on
        its way already (sent again after a record that failed, while its own first send is
        still out), or will be by its own run, and parked here too it would be sent a second
        time beside that send."""
        firsts: list[Delivery] = []
        heads: dict[tuple[str, str], str] = {}
        cut: set[str] = set()
        parked = self.parked
        for delivery in due:
            key = delivery.order_key
            if delivery.target not in ordered or key is None:
                firsts.append(delivery)
                continue
            head = heads.get((delivery.target, key))
            if head is None:
                heads[(delivery.target, key)] = delivery.id
                firsts.append(delivery)
            elif head in busy or head in cut or head in parked:
                continue
            elif delivery.id in busy or delivery.id in parked:
                cut.add(head)
            else:
                self._behind.setdefault(head, deque()).append(delivery)
                parked.add(delivery.id)
        for head in heads.values():
            run = None if head in busy or head in parked else self._behind.get(head)
            if run is not None and len(run) + 1 >= RUN:
                self._full.add(run[-1].id)
        for head in cut:  # its end asks for a look at what it left to the outbox
            run = self._behind.get(head)
            self._full.add(run[-1].id if run else head)
        return firsts

    def after(self, delivery_id: str, released: bool) -> tuple[Delivery | None, bool]:
        """Delivery ``delivery_id`` ended: the next of its run to start (``None``: none, or
        not ``released``, when the run is let go), and whether a claim should look at its
        conversation again (the run was cut short by its length, or let go)."""
        # Once for every delivery a run sends: each lookup is guarded by a test that is
        # cheaper than the lookup it saves, in the usual case (a run going on, no read asked).
        run = self._behind.pop(delivery_id, None)
        full = delivery_id in self._full
        if full:
            self._full.discard(delivery_id)
        if self._extending:
            self._extending.pop(delivery_id, None)
            self._wanted.pop(delivery_id, None)
        if not run:
            return None, full
        if not released:
            self.drop(run)
            return None, True
        following = run.popleft()
        self.parked.discard(following.id)
        if run:
            self._behind[following.id] = run
            if len(run) <= EXTEND_AT:
                self._want_more(run[-1], run)
        else:
            self._want_more(following, run)
        return following, False

    def _want_more(self, last: Delivery, run: deque[Delivery]) -> None:
        """A run now this short (``last``: its last delivery, or the one starting when none
        waits behind it): when more may follow ``last``, it asks for a read of what does."""
        if last.id in self._full and last.id not in self._extending:
            self._extending[last.id] = run
            self._wanted[last.id] = last

    @property
    def wants_more(self) -> bool:
        """Whether a run waits for a read of what follows it (:meth:`wanted`)."""
        return bool(self._wanted)

    def wanted(self) -> dict[str, dict[str, str]]:
        """Per target, for each conversation whose run asked for more (keyed by conversation),
        the id of the run's last delivery: what follows it is to be read (:meth:`extend`).
        Each is given once."""
        asked: dict[str, dict[str, str]] = {}
        for last in self._wanted.values():
            if last.order_key is not None:
                asked.setdefault(last.target, {})[last.order_key] = last.id
        self._wanted.clear()
        return asked

    def extend(self, last_id: str, more: Sequence[Delivery], full: bool) -> bool:
        """What follows delivery ``last_id`` in its conversation was read: ``more``, in order
        (``full``: as many as were asked for, so more may follow them). It joins the end of
        the run ``last_id`` ends, if that delivery has not ended meanwhile and its run was not
        let go; else the read is dropped (those deliveries stay pending in the outbox, and
        the delivery's end asks a claim to look at its conversation). Whether it joined."""
        run = self._extending.pop(last_id, None)
        self._wanted.pop(last_id, None)
        if run is None or not more:
            return False
        if not run:
            # It started since the read was asked for (and has not ended: its end forgets the
            # ask): the run behind it starts anew.
            self._behind[last_id] = run
        elif run[-1].id != last_id:
            return False
        run.extend(more)
        self.parked.update(delivery.id for delivery in more)
        self._full.discard(last_id)
        if full:
            self._full.add(more[-1].id)
        return True

    def let_go(self, delivery_id: str) -> bool:
        """A first delivery did not start after all: its run goes back to the outbox. Whether
        it had one."""
        run = self._behind.pop(delivery_id, None)
        self._full.discard(delivery_id)
        if run:
            self.drop(run)
        return bool(run)

    def release(self, ids: Collection[str] | None) -> None:
        """Let go of each run that holds one of ``ids`` or waits behind one (``None``: every
        run), its deliveries back to the outbox: the delivery in flight ahead of it then asks
        for a look at its conversation when it ends. (A replayed delivery goes to the back of
        its conversation: what waited behind it in memory is now ahead of it, as the outbox
        orders them.)"""
        for head, run in list(self._behind.items()):
            if ids is None or head in ids or any(delivery.id in ids for delivery in run):
                del self._behind[head]
                self.drop(run)
                self._full.add(head)
        # A run's last delivery waiting for a read of what follows it: the read would start
        # from the replayed delivery's new place at the back, past deliveries now ahead of it.
        for last in list(self._extending):
            if ids is None or last in ids:
                del self._extending[last]
                self._wanted.pop(last, None)
                self._full.add(last)

    def drop(self, run: Iterable[Delivery]) -> None:
        for delivery in run:
            self.parked.discard(delivery.id)
            self._full.discard(delivery.id)
            self._extending.pop(delivery.id, None)
            self._wanted.pop(delivery.id, None)

    def forget(self, keep: Collection[str]) -> None:
        """Let go of every run of a target not in ``keep`` (no longer ordered, or removed)."""
        for head, run in list(self._behind.items()):
            if run and run[0].target not in keep:
                del self._behind[head]
                self.drop(run)
