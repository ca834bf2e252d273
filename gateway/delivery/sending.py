"""The one interface the dispatcher sends through, and the adapter for each target kind.

Rule: the dispatcher and :mod:`gateway.delivery.outcome` never look at a target's ``kind``. Each
kind has an adapter that turns a batch of deliveries into one :class:`AttemptResult` per delivery
(HTTP status, broker acknowledgement, or an error, transient or permanent); adding a kind is one
adapter module and one line in :data:`_ADAPTERS`. Adapters are imported at first use, so a driver
that is not installed only matters to a configuration that names its kind (and ``load_config``
refuses that first, naming the extra).
"""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.config import TargetConfig
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult

__all__ = ["Sender", "sender_for"]


class Sender(Protocol):
    """Sends deliveries to one target."""

    target: TargetConfig

    async def send_many(
        self,
        deliveries: Sequence[Delivery],
        attempts: Sequence[int],
        trace_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> list[AttemptResult]:
        """Attempt number ``attempts[i]`` of each ``deliveries[i]``; what came back for each,
        in order. Never raises for what the target did: that is an :class:`AttemptResult`.
        ``trace_headers[i]``: the ``traceparent`` (and ``tracestate``) of attempt ``i``'s
        span when traced, sent beside the gateway's own headers (a broker's message headers
        or entry fields); the body stays exactly as it is."""
        ...

    async def warm(self) -> None:
        """Connect ahead of the first delivery; a target that is down is no error here."""
        ...

    async def probe(self) -> str | None:
        """Connect now and say what was found (for ``waba-gateway check``); raises
        :class:`gateway.errors.TargetError` when the target cannot be used. None: nothing to
        check ahead (an HTTP target; ``waba-gateway doctor`` connects to it)."""
        ...

    async def close(self) -> None: ...


# kind -> "module:class" of its adapter.
_ADAPTERS = {
    "http": "gateway.delivery.forwarder:Forwarder",
    "redis": "gateway.delivery.redis_stream:RedisStreamSender",
    "nats": "gateway.delivery.nats_jetstream:JetStreamSender",
}


def sender_for(target: TargetConfig, tls: ssl.SSLContext | None = None) -> Sender:
    """The adapter for ``target``'s kind; ``tls``: the context built from the target's own
    ``ca_file`` / ``cert_file`` (gateway.delivery.target_tls), which every adapter takes: an
    https://, rediss:// or tls:// target's, the only ones the configuration gives them to."""
    module, name = _ADAPTERS[target.kind].split(":")
    adapter = getattr(importlib.import_module(module), name)
    sender: Sender = adapter(target, tls)
    return sender
