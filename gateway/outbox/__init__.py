"""The outbox: every acknowledged notification, kept until it is delivered.

Rule: the rest of the gateway talks to the outbox through what this package exports alone: the
:class:`Outbox` interface (:mod:`gateway.outbox.interface`), the values it takes and hands out
(:mod:`gateway.outbox.model`) and :func:`open_outbox`, which picks the backend the configuration
names. The storage engines live behind it (``sqlite/``, ``postgres/``).
"""

from gateway.outbox.backends import describe_outbox, open_outbox
from gateway.outbox.interface import Outbox
from gateway.outbox.model import (
    STATES,
    AttemptResult,
    DeadLetter,
    Delivered,
    Delivery,
    Outcome,
    RetryAt,
    Route,
    State,
)

__all__ = [
    "STATES",
    "AttemptResult",
    "DeadLetter",
    "Delivered",
    "Delivery",
    "Outbox",
    "Outcome",
    "RetryAt",
    "Route",
    "State",
    "describe_outbox",
    "open_outbox",
]
