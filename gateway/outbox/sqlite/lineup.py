"""Each ordered target's pending deliveries in their conversations' order, held in memory by
the one dispatcher of a SQLite outbox: what its claims hand out.

Rule: pure bookkeeping; the rows come from the file (:mod:`gateway.outbox.sqlite.conversations`
reads them, :func:`gateway.outbox.sqlite.store.due_deliveries` feeds them in) and the outcomes
from the outbox once they are committed (:meth:`Lineup.ended`). A claim hands out the first
delivery of each conversation that is due and not in flight, lowest place first: the order the
deliveries were acknowledged in. So a backlog over many conversations drains in the order it was
stored, each claim reading rows next to the last claim's, as a target without order does, where
reading each conversation's next deliveries from the file walked the whole table at every step
(``bench/README.md``, "Issue 22").

Why it can be kept exact: a SQLite outbox has one dispatcher (one gateway holds the file), and
the only ways a pending delivery appears are an insert, which takes the next id (each write
transaction in turn, so every delivery stored later has a larger id than every one read), and a
replay, which takes a place from the same counter without a row. A claim reads the rows with an
id above the last one read, after checking that the counter moved by exactly as many rows:
otherwise a replay happened (or something removed new rows) and it reads every conversation
again (:attr:`Lineup.stale`). Anything that ends a delivery elsewhere (a purge, a delivery dead-
lettered as damaged) only leaves a row here that is no longer pending: a claim that hands it out
finds no row for it, and drops it (:meth:`Lineup.gone`).

Memory: a row id per pending delivery of an ordered target, and a heap entry for the first of
each conversation: about 90 bytes per pending delivery (90 MB for a million over 100,000
conversations, read in some 2 s at the start).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Candidate", "Lineup"]

# One row handed out by :meth:`Lineup.take`: its row id and its conversation.
Candidate = tuple[int, str]


def _own_key(rowid: int) -> str:
    """The conversation of a delivery stored with none (accepted before its target kept
    order): its own, so it waits for nothing and holds nothing back. No real key starts with
    a NUL."""
    return f"\0{rowid}"


@dataclass(slots=True)
class _Lines:
    """One target's conversations."""

    # Per conversation, its pending deliveries' row ids in their order.
    lines: dict[str, deque[int]] = field(default_factory=dict)
    # The place of each replayed one (its place is its row id otherwise).
    places: dict[int, int] = field(default_factory=dict)
    # The first delivery of each conversation that may go now: (place, row id, key).
    ready: list[tuple[int, int, str]] = field(default_factory=list)
    # Those due later: (due at, place, row id, key).
    later: list[tuple[float, int, int, str]] = field(default_factory=list)
    # The row ids in ready or later (a row is in one heap once).
    queued: set[int] = field(default_factory=set)
    # Handed out, or found in flight, and not ended: row id to (key, delivery id).
    out: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Of those, the ones a replay moved while out: their outcome is not recorded over the
    # replay (see store.record_attempts), so it changes nothing here either.
    moved: set[int] = field(default_factory=set)

    def place(self, rowid: int) -> int:
        return self.places.get(rowid, rowid)

    def add(self, key: str, rowid: int, place: int, due_at: float, now: float) -> None:
        if place != rowid:
            self.places[rowid] = place
        line = self.lines.get(key)
        if line is None:
            self.lines[key] = deque((rowid,))
            self.offer(key, rowid, due_at, now)
            return
        if self.place(line[-1]) < place:
            line.append(rowid)
            return
        # Behind a replayed one read earlier (a replay and the rows after it read together):
        # in its place. Rare; a deque has no bisect of its own.
        rows = list(line)
        at = bisect.bisect([self.place(r) for r in rows], place)
        rows.insert(at, rowid)
        self.lines[key] = deque(rows)
        if at == 0:
            self.offer(key, rowid, due_at, now)

    def offer(self, key: str, rowid: int, due_at: float, now: float) -> None:
        """``rowid`` is first of conversation ``key``: it may go at ``due_at``."""
        if rowid in self.queued or rowid in self.out:
            return
        self.queued.add(rowid)
        if due_at <= now:
            heapq.heappush(self.ready, (self.place(rowid), rowid, key))
        else:
            heapq.heappush(self.later, (due_at, self.place(rowid), rowid, key))

    def back(self, key: str, rowid: int, now: float) -> None:
        """``rowid`` is no longer out and keeps its place (let go without an outcome, or its
        outcome did not stand over a replay): it goes again once it is first of its
        conversation."""
        self.moved.discard(rowid)
        line = self.lines.get(key)
        if line and line[0] == rowid:
            self.offer(key, rowid, now, now)

    def remove(self, key: str, rowid: int, now: float) -> None:
        """``rowid`` is no longer pending: the next of its conversation comes first (due, as
        far as is known: a claim that finds it is not puts it back)."""
        self.places.pop(rowid, None)
        line = self.lines.get(key)
        if line is None:
            return
        if line[0] != rowid:
            with contextlib.suppress(ValueError):
                line.remove(rowid)
            return
        line.popleft()
        if line:
            self.offer(key, line[0], now, now)
        else:
            del self.lines[key]


class Lineup:
    """The conversations of every ordered target, for one process's claims. Fed and asked on
    the outbox writer's thread alone (its claims and inserts), but for :meth:`ended`."""

    def __init__(self) -> None:
        self._targets: dict[str, _Lines] = {}
        # The last delivery row id read, and the deliveries' id counter then.
        self.last_id = 0
        self.last_seq = 0
        # Every conversation is to be read again before the next claim.
        self.stale = True
        # Outcomes committed since the last claim, from the event loop's thread (a deque's
        # append and popleft are safe across threads): (row id, due again at, or None when
        # it ended).
        self._ended: deque[tuple[int, float | None]] = deque()
        # Stored by this process since the last read: how many deliveries (of any target),
        # and the conversations of those with one, per target. Counted as they are inserted,
        # before their commit: one rolled back makes the count disagree with the id counter,
        # which only makes behind() answer yes until the next read.
        self._stored = 0
        self._recent: dict[str, set[str]] = {}

    # -- the event loop's side ---------------------------------------------------------------

    def ended(self, outcomes: Iterable[tuple[int, float | None]]) -> None:
        """Outcomes committed to the file: each delivery ended (``None``) or is due again at
        the time given. Taken in by the next claim, on the writer's thread; none kept while it
        keeps order for no target (no claim would take them in)."""
        if self._targets:
            self._ended.extend(outcomes)

    # -- the writer thread's side ------------------------------------------------------------

    def read_to(self, last_id: int, seq: int) -> None:
        """Every delivery up to ``last_id`` is read, and the id counter stood at ``seq``."""
        self.last_id, self.last_seq = last_id, seq
        self.stale = False
        self._stored = 0
        self._recent.clear()

    def behind(self, target: str, key: str, rowid: int) -> bool:
        """Whether delivery ``rowid`` of conversation ``key``, being stored by this process,
        may have an earlier delivery of its conversation pending (then only a claim starts
        it). No only when that is known: every id before it is accounted for (read, or stored
        here since), and none of them is of its conversation and pending. Then counts it.
        Always yes in a process whose claims keep order for no target (it keeps no count)."""
        if not self._targets:
            return True
        self.settle(None)
        known = (
            not self.stale
            and rowid - 1 == self.last_seq + self._stored
            and (lines := self._targets.get(target)) is not None
            and key not in lines.lines
            and key not in self._recent.get(target, ())
        )
        self.stored(target, key)
        return not known

    def stored(self, target: str, key: str | None) -> None:
        """This process stored a delivery (see :meth:`behind`)."""
        if not self._targets:
            return
        self._stored += 1
        if key is not None:
            self._recent.setdefault(target, set()).add(key)

    def held_back(self, targets: Collection[str]) -> dict[str, int]:
        """Of ``targets``, those kept in order here: for each, its conversations with more
        than one pending delivery."""
        return {
            name: sum(len(line) > 1 for line in lines.lines.values())
            for name, lines in self._targets.items()
            if name in targets
        }

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self._targets)

    def keep(self, targets: Collection[str]) -> list[str]:
        """Keep order for ``targets`` now; the ones new to it (to be read whole)."""
        for name in list(self._targets):
            if name not in targets:
                del self._targets[name]
        return [name for name in targets if name not in self._targets]

    def load(
        self, target: str, rows: Iterable[tuple[str | None, int, int, float]], now: float
    ) -> None:
        """Read ``target``'s conversations anew from ``rows``: (key, row id, place, due at)
        of every pending delivery, each conversation's in their order. What was out stays
        out if it is still pending where it was; one a replay moved is no longer out, and its
        outcome changes nothing (see ``_Lines.moved``)."""
        old = self._targets.get(target)
        lines = self._targets[target] = _Lines()
        was_out = old.out if old is not None else {}
        found: dict[int, int] = {}
        for key, rowid, place, due_at in rows:
            if rowid in was_out:
                found[rowid] = place
            lines.add(_own_key(rowid) if key is None else key, rowid, place, due_at, now)
        for rowid, (key, delivery_id) in was_out.items():
            if rowid not in found:
                continue  # ended, and recorded
            lines.out[rowid] = (key, delivery_id)
            if old is None or found[rowid] != old.place(rowid) or rowid in old.moved:
                lines.moved.add(rowid)

    def add(self, rows: Iterable[tuple[str, str | None, int, float]], now: float) -> None:
        """Deliveries stored since the last read: (target, key, row id, due at), by id."""
        targets = self._targets
        for target, key, rowid, due_at in rows:
            lines = targets.get(target)
            if lines is not None:
                lines.add(_own_key(rowid) if key is None else key, rowid, rowid, due_at, now)

    def settle(self, now: float | None) -> None:
        """Take in the outcomes committed since the last claim (``now``: the claim's time;
        ``None``: not in a claim, nothing is due before the next one)."""
        ended = self._ended
        if not ended:
            return
        if now is None:
            now = float("-inf")
        while ended:
            rowid, again_at = ended.popleft()
            for lines in self._targets.values():
                held = lines.out.pop(rowid, None)
                if held is None:
                    continue
                key = held[0]
                if rowid in lines.moved:
                    lines.back(key, rowid, now)
                elif again_at is None:
                    lines.remove(key, rowid, now)
                else:
                    lines.offer(key, rowid, again_at, now)
                break

    def take(
        self,
        target: str,
        limit: int,
        now: float,
        busy: Collection[str],
        id_of: Callable[[int], str],
    ) -> list[Candidate]:
        """Up to ``limit`` deliveries of ``target`` to hand out, lowest place first: each first
        of its conversation, due by ``now`` (as far as is known: the caller checks the row),
        not in flight (``busy``: delivery ids). Each is out from now on, as is every first one
        found in flight, until its outcome is taken in or a later claim finds it no longer in
        flight (let go without an outcome)."""
        lines = self._targets.get(target)
        if lines is None:
            return []
        out = lines.out
        for rowid, (key, delivery_id) in list(out.items()):
            if delivery_id not in busy:
                del out[rowid]
                lines.back(key, rowid, now)
        later, ready, queued = lines.later, lines.ready, lines.queued
        while later and later[0][0] <= now:
            _, place, rowid, key = heapq.heappop(later)
            heapq.heappush(ready, (place, rowid, key))
        taken: list[Candidate] = []
        while ready and len(taken) < limit:
            _, rowid, key = heapq.heappop(ready)
            queued.discard(rowid)
            line = lines.lines.get(key)
            if not line or line[0] != rowid or rowid in out:
                continue
            delivery_id = id_of(rowid)
            out[rowid] = (key, delivery_id)
            if delivery_id not in busy:
                taken.append((rowid, key))
        return taken

    def gone(self, target: str, rowid: int, key: str, now: float) -> None:
        """Handed out, ``rowid`` turned out to be no longer pending."""
        lines = self._targets.get(target)
        if lines is not None:
            lines.out.pop(rowid, None)
            lines.remove(key, rowid, now)

    def not_due(self, target: str, rowid: int, key: str, due_at: float, now: float) -> None:
        """Handed out, ``rowid`` turned out to be due only at ``due_at``."""
        lines = self._targets.get(target)
        if lines is not None:
            lines.out.pop(rowid, None)
            lines.offer(key, rowid, due_at, now)

    def waiting(self) -> Mapping[str, int]:
        """Per target, the deliveries held in order (for tests and figures)."""
        return {
            name: sum(len(line) for line in lines.lines.values())
            for name, lines in self._targets.items()
        }
