"""What the outbox stores and hands out: routes in, deliveries and attempt outcomes out.

Rule: plain frozen values with no behaviour beyond describing themselves, shared by every outbox
backend and by the parts that talk to the outbox (routing makes :class:`Route`, the dispatcher
reads :class:`Delivery` and records an :data:`Outcome`). No storage engine is named here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

__all__ = [
    "STATES",
    "AttemptRecord",
    "AttemptResult",
    "Backlog",
    "DeadLetter",
    "Delivered",
    "Delivery",
    "Outcome",
    "RetryAt",
    "Route",
    "Size",
    "State",
    "made",
]

State = Literal["pending", "delivered", "dead"]
STATES: Final[tuple[State, ...]] = ("pending", "delivered", "dead")


@dataclass(frozen=True, slots=True)
class Route:
    """One request to make: to ``target``, with ``body`` (``None``: the bytes Meta sent);
    ``key``: its conversation, for a target that keeps conversations in order (``None``: no
    order to keep). The key is a digest, never a user id."""

    target: str
    body: bytes | None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request owed to one target. ``body`` is what to send; ``signature`` is Meta's.
    ``id`` is unique across outboxes and gateways (each backend says how it makes sure); targets
    receive it as ``X-Gateway-Delivery-Id`` and may deduplicate on it."""

    id: str
    notification_id: int
    target: str
    body: bytes
    signature: str
    split: bool
    state: State
    attempts: int
    created_at: float
    next_attempt_at: float
    received_at: float
    last_status: int | None = None
    last_error: str | None = None
    last_response: str | None = None
    # Its conversation (a digest, see Route), for a target that keeps conversations in order,
    # and whether an earlier delivery of that conversation was pending when it was accepted,
    # or may have been as far as the backend knew (a fresh delivery that is not behind one may
    # start at once; one that is starts through a claim).
    order_key: str | None = None
    behind: bool = False
    # The trace context of the request that brought it (traceparent, then a newline and the
    # tracestate, if any): each attempt's span joins that trace. None: not traced.
    trace: str | None = None
    # Seconds of its age it spent held, due, by its target's pacing (a rate limit's token, an
    # earlier delivery of its conversation) before its attempts so far: not counted toward
    # ``max_age_s`` (see :func:`gateway.delivery.outcome.classify`). 0 again when replayed.
    held_s: float = 0.0

    @classmethod
    def fresh(
        cls,
        ids: Sequence[str],
        routes: Sequence[Route],
        *,
        notification_id: int,
        body: bytes,
        signature: str,
        now: float,
        behind: Collection[str] = (),
        trace: str | None = None,
    ) -> list[Delivery]:
        """The deliveries a backend has just stored for one notification, one per route (the
        ids in the same order), as :meth:`Outbox.accept` returns them: built after the commit,
        never read back. ``behind``: the ids of those an earlier pending delivery of their
        conversation holds back, or may (see :attr:`Delivery.behind`)."""
        return [
            made(
                (
                    delivery_id,
                    notification_id,
                    route.target,
                    body if route.body is None else route.body,
                    signature,
                    route.body is not None,
                    "pending",
                    0,
                    now,
                    now,
                    now,
                    None,
                    None,
                    None,
                    route.key,
                    delivery_id in behind,
                    trace,
                    0.0,
                )
            )
            for route, delivery_id in zip(routes, ids, strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        """What the admin API and CLI show: never the body (it holds message text)."""
        return {
            "id": self.id,
            "target": self.target,
            "state": self.state,
            "attempts": self.attempts,
            "received_at": self.received_at,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_response": self.last_response,
            "bytes": len(self.body),
        }


# A frozen dataclass's __init__ sets each field through object.__setattr__, a lookup and a call
# per field: 7 us for a Delivery's eighteen, and a delivery is made once per notification
# accepted (Delivery.fresh) and once per delivery claimed (gateway.outbox.rows). Setting the
# slots through their own descriptors makes the same frozen object in 3 us.
_SETTERS: Final = tuple(vars(Delivery)[field.name].__set__ for field in fields(Delivery))


def made(values: tuple[Any, ...]) -> Delivery:
    """The :class:`Delivery` of ``values``, one per field in the order the class declares
    them (``id`` first, ``held_s`` last), as ``Delivery(*values)`` would make it."""
    delivery: Delivery = object.__new__(Delivery)
    for set_field, value in zip(_SETTERS, values, strict=True):
        set_field(delivery, value)
    return delivery


@dataclass(frozen=True, slots=True)
class Backlog:
    """What one target is owed: its pending deliveries (and when the oldest was made) and its
    dead letters. What an operator asks first: is anything stuck?"""

    target: str
    pending: int
    oldest_pending_at: float | None
    dead: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Size:
    """How big the outbox is: ``bytes`` on disk (a file), or ``rows`` (a shared database)."""

    bytes: int | None = None
    rows: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRecord:
    """One finished attempt of a delivery, as the outbox keeps it for the admin console:
    ``number`` counts from 1 since the delivery was made or last replayed, ``state`` is what the
    delivery became (``pending`` again: a retry), ``response`` an excerpt of the target's
    answer. Never the body sent."""

    number: int
    at: float
    state: str
    status: int | None
    error: str | None
    response: str

    @property
    def outcome(self) -> str:
        """delivered, retry or dead: what the attempt led to."""
        return "retry" if self.state == "pending" else self.state

    def summary(self) -> dict[str, Any]:
        """What the admin API and CLI show of it."""
        return {
            "number": self.number,
            "at": self.at,
            "outcome": self.outcome,
            "status": self.status,
            "error": self.error,
            "response": self.response,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptResult:
    """What came back from one attempt: an HTTP status, a broker's acknowledgement
    (``accepted``), or an error (timeout, refused, reset...), ``permanent`` when the target
    said it will never take this delivery (no stream for the subject, too large)."""

    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    response_excerpt: str = ""
    accepted: bool = False
    permanent: bool = False

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no response"


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class RetryAt:
    at: float
    reason: str
    # The delivery's held time so far (see Delivery.held_s), kept with it for its next attempt.
    held_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


Outcome = Delivered | RetryAt | DeadLetter
