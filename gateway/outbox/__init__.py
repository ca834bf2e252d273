"""The outbox: every acknowledged notification, kept until it is delivered.

Rule: the rest of the gateway talks to the outbox through what this package exports alone: the
:class:`Outbox` interface (:mod:`gateway.outbox.interface`), the values it takes and hands out
(:mod:`gateway.outbox.model`) and :func:`open_outbox`, which picks the backend the configuration
names. The storage engines live behind it (``sqlite/``, ``postgres/``).
"""

from gateway.outbox.backends import (
    OutboxHold,
    backup_outbox,
    describe_outbox,
    hold_outbox,
    open_outbox,
)
from gateway.outbox.interface import (
    AcceptsSoon,
    KeepsLeases,
    LinesUp,
    Outbox,
    Settles,
    settle_from,
)
from gateway.outbox.model import (
    STATES,
    AttemptRecord,
    AttemptResult,
    Backlog,
    DeadLetter,
    Delivered,
    Delivery,
    Outcome,
    RetryAt,
    Route,
    Size,
    State,
)

__all__ = [
    "STATES",
    "AcceptsSoon",
    "AttemptRecord",
    "AttemptResult",
    "Backlog",
    "DeadLetter",
    "Delivered",
    "Delivery",
    "KeepsLeases",
    "LinesUp",
    "Outbox",
    "OutboxHold",
    "Outcome",
    "RetryAt",
    "Route",
    "Settles",
    "Size",
    "State",
    "backup_outbox",
    "describe_outbox",
    "hold_outbox",
    "open_outbox",
    "settle_from",
]
