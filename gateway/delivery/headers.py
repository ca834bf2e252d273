"""What every target kind receives beside the body: the delivery's id and attempt, and the
signature of the target's ``signature`` mode.

Rule: every header a target sees is built here (HTTP adds only ``Content-Type`` and
``User-Agent``), never copied from the inbound request, so nothing from outside can impersonate
the gateway's own ``X-Gateway-*`` headers; a Redis entry's fields and a NATS message's headers
carry these same names, so one consumer check fits every kind.
"""

from __future__ import annotations

from gateway.config import TargetConfig
from gateway.edge.signature import gateway_signature, sign
from gateway.outbox import Delivery

__all__ = ["delivery_headers"]


def delivery_headers(
    delivery: Delivery, target: TargetConfig, attempt: int, now: float
) -> dict[str, str]:
    """For attempt number ``attempt`` (1-based) of ``delivery``."""
    headers = {
        # Stable across retries: targets use it to drop the duplicates at-least-once implies.
        "X-Gateway-Delivery-Id": delivery.id,
        "X-Gateway-Attempt": str(attempt),
    }
    if target.signature == "meta":
        # What Meta would send for these exact bytes, keyed with the target's secret instead of
        # the app secret, so a consumer written for Meta's webhooks verifies them unchanged.
        assert target.secret is not None  # load_config refuses signature = "meta" without one
        headers["X-Hub-Signature-256"] = sign(target.secret, delivery.body)
        return headers
    if not delivery.split:
        # The exact bytes Meta signed, so a target may verify Meta's signature itself.
        headers["X-Hub-Signature-256"] = delivery.signature
    if target.secret is not None:
        timestamp = str(int(now))
        headers["X-Gateway-Timestamp"] = timestamp
        headers["X-Gateway-Signature-256"] = gateway_signature(
            target.secret, timestamp, delivery.body
        )
    return headers
