"""What holds a target's deliveries back on purpose: its conversation order and its rate limit.

Rule: a target with neither (``order = "none"``, no ``rate_per_s``) is not touched here at all:
its deliveries start as they are stored (the dispatcher's ``offer``) and its claims ask the
outbox for as many as it has room for. A rate-limited target gets every delivery through a
claim, which is cut to the tokens the limit grants. An ordered one starts a
fresh delivery at once only when the outbox found no earlier one of its conversation pending as
it stored it (``Delivery.behind``, here or at another gateway); every other delivery waits for a
claim, which asks only about the conversations whose first delivery may have changed
(:mod:`gateway.delivery.ordering`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from gateway.config import TargetConfig
from gateway.delivery.ordering import RUN, Conversations, Runs
from gateway.delivery.ratelimit import TokenBucket
from gateway.outbox import Delivery, Outbox

__all__ = ["Claim", "Pacing"]

# The shortest wait before asking a shared bucket again, when it granted less than was wanted.
_MIN_WAIT_S = 0.005


@dataclass(frozen=True, slots=True)
class Claim:
    """What to ask the outbox for: ``limits`` per target, and for ordered targets the
    conversations whose first delivery may have changed (absent: every conversation)."""

    limits: dict[str, int]
    conversations: dict[str, set[str]]
    asked: dict[str, set[str] | None]


class Pacing:
    def __init__(self, targets: Sequence[TargetConfig], now: float, lined_up: bool = False) -> None:
        """``lined_up``: the outbox lines conversations up in memory (gateway.outbox.LinesUp):
        every claim looks at every conversation, and none takes runs."""
        self.ordered: frozenset[str] = frozenset()
        self.claim_only: frozenset[str] = frozenset()
        self.unpaced_ordered: frozenset[str] = frozenset()
        self._targets: dict[str, TargetConfig] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._starved: set[str] = set()
        # Starved targets whose last claim used every token it was granted: more is due than
        # the limit lets go.
        self._behind: set[str] = set()
        # Whether the outbox keeps the buckets for every gateway (learnt at the first take).
        self._shared = False
        self.lined_up = lined_up
        self.conversations = Conversations(free_looks=lined_up)
        self.runs = Runs()
        self.reconfigure(targets, now)

    def reconfigure(self, targets: Sequence[TargetConfig], now: float) -> None:
        """Take new target settings. A reload hands out no fresh burst: a target whose rate and
        burst are unchanged keeps its bucket, and one whose limit changed keeps the tokens its
        bucket holds, at most its new burst (as the PostgreSQL outbox's shared bucket does)."""
        limited = {t.name: t for t in targets if t.rate_per_s is not None}
        buckets = {}
        for name, target in limited.items():
            rate, burst = float(target.rate_per_s or 0), target.burst_size
            old = self._buckets.get(name)
            if old is not None and (old.rate_per_s, old.burst) == (rate, burst):
                buckets[name] = old
            elif old is not None:
                buckets[name] = old.retuned(rate, burst, now)
            else:
                buckets[name] = TokenBucket.full(rate, burst, now)
        self._targets, self._buckets = limited, buckets
        self.ordered = frozenset(t.name for t in targets if t.order == "conversation")
        self.claim_only = self.ordered | frozenset(limited)
        # Ordered without a rate limit: a fresh delivery first of its conversation may start
        # at once, after a check of its order alone (no token to take).
        self.unpaced_ordered = self.ordered - frozenset(limited)
        # The ordered targets whose claims hand out runs (see run_lengths).
        self.with_runs = frozenset() if self.lined_up else self.unpaced_ordered
        self._starved &= set(limited)
        self._behind &= set(limited)
        self.conversations.reconfigure(self.ordered)
        self.runs.forget(self.unpaced_ordered)

    def run_lengths(self) -> dict[str, int]:
        """How many deliveries of each conversation a claim may take, per ordered target
        without a rate limit (a rate limit grants one token per delivery, so a claim for a
        rate-limited target takes first deliveries only). None when the outbox lines
        conversations up: its claims take first deliveries in the order they were stored,
        which reads the file in that order too."""
        return dict.fromkeys(self.with_runs, RUN)

    async def plan(self, outbox: Outbox, limits: Mapping[str, int], now: float) -> Claim:
        """The claim to make: an ordered target with no conversation changed is left out (no
        query at all), and each rate-limited target is cut to the tokens it may spend now
        (taken from the bucket: :meth:`settle` gives back what is not used)."""
        asked = self.conversations.request(now, limits, limits)
        wanted = {name: n for name, n in limits.items() if asked.get(name, None) != set()}
        granted = await self._grant(outbox, wanted, now)
        for name, keys in asked.items():
            if name not in granted:  # no token: asked about again at the next claim
                self.conversations.claimed(name, keys, (), complete=False)
        conversations = {
            name: keys for name, keys in asked.items() if keys is not None and name in granted
        }
        return Claim(limits=granted, conversations=conversations, asked=asked)

    async def settle(
        self,
        outbox: Outbox,
        claim: Claim,
        claimed: Mapping[str, int],
        started: Sequence[Delivery],
        took_s: float = 0.0,
        more: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """Tokens taken for deliveries that were not there go back; conversations the claim had
        no room for are asked about again (``took_s``: how long the claim took; ``more``: the
        conversations a look at every one found beyond its room, by target)."""
        await self._give_back(outbox, claim.limits, claimed)
        for name in self._targets:
            if name in self._starved and claimed.get(name, 0) >= claim.limits.get(name, 0):
                self._behind.add(name)
            else:
                self._behind.discard(name)
        if self.lined_up:
            return  # the outbox keeps the conversations: nothing to note here
        for delivery in started:
            self.conversations.started(delivery.target, delivery.order_key, delivery.id)
        for name in claim.limits:
            if name not in claim.asked:
                continue
            keys = [d.order_key or "" for d in started if d.target == name]
            complete = claimed.get(name, 0) < claim.limits[name]
            self.conversations.claimed(
                name,
                claim.asked[name],
                keys,
                complete=complete,
                took_s=took_s,
                more=(more or {}).get(name, ()),
            )

    async def _grant(self, outbox: Outbox, limits: Mapping[str, int], now: float) -> dict[str, int]:
        granted = dict(limits)
        for name, target in self._targets.items():
            want = granted.get(name, 0)
            if want <= 0:
                continue
            rate, burst = float(target.rate_per_s or 0), target.burst_size
            shared = await outbox.take_tokens(name, rate, burst, want)
            self._shared = shared is not None
            got = self._buckets[name].take(now, want) if shared is None else shared
            if got < want:
                self._starved.add(name)
            else:
                self._starved.discard(name)
            if got:
                granted[name] = got
            else:
                del granted[name]
        return granted

    async def _give_back(
        self, outbox: Outbox, granted: Mapping[str, int], claimed: Mapping[str, int]
    ) -> None:
        for name, target in self._targets.items():
            unused = granted.get(name, 0) - claimed.get(name, 0)
            if unused <= 0:
                continue
            if self._shared:
                rate = float(target.rate_per_s or 0)
                await outbox.give_back_tokens(name, rate, target.burst_size, unused)
            else:
                self._buckets[name].give_back(unused)

    def rate_limited(self) -> dict[str, bool]:
        """Each rate-limited target: whether its last claim was cut short by the limit and
        used every token it got (more deliveries are due than the limit lets go)."""
        return {name: name in self._behind for name in self._targets}

    def held_s(self, delivery: Delivery, started: float) -> float:
        """The seconds ``delivery`` waited, due, before its attempt started at ``started``,
        when its target paces deliveries (order or a rate limit): held on purpose, for a token
        or behind an earlier delivery of its conversation, so not counted in its age for
        ``max_age_s``. Any other target's deliveries wait only for its breaker or its
        concurrency, and that time counts, as it always has."""
        if delivery.target not in self.claim_only:
            return 0.0
        return max(0.0, started - delivery.next_attempt_at)

    def wait_s(self, now: float, poll_s: float) -> float:
        """How long the dispatcher may sleep: until a target whose last claim the limit cut
        short has a token again, or a conversation's retry comes due. A target granted fewer
        tokens than it asked for, whose claim then found fewer deliveries than it was granted,
        has nothing more due: it waits for the poll like any other (or for a wake-up when a
        notification arrives), not for its next token, which on an idle gateway would be a
        claim every few milliseconds (a claim asks for the target's whole free budget, more
        than a burst holds)."""
        wait = poll_s
        retry = self.conversations.next_at()
        if retry is not None:
            wait = min(wait, max(0.0, retry - now))
        for name in self._behind:
            bucket = self._buckets[name]
            # A shared bucket's level is the database's: ask again after one token's time.
            until = 1 / bucket.rate_per_s if self._shared else bucket.wait_s(now)
            wait = min(wait, max(_MIN_WAIT_S, until))
        return wait
