"""One HTTP request to one target: build the headers, send, report what came back.

Rule: the forwarder never decides what a result means (that is :mod:`gateway.outcome`) and never
copies an inbound header: every header a target sees is built here, so nothing from outside can
impersonate the gateway's own ``X-Gateway-*`` headers.
"""

from __future__ import annotations

import time

from gateway import __version__
from gateway.backoff import parse_retry_after
from gateway.config import TargetConfig
from gateway.outbox import Delivery
from gateway.outcome import AttemptResult
from gateway.signature import gateway_signature
from gateway.upstream import Upstream, UpstreamError

__all__ = ["Forwarder", "build_headers"]

USER_AGENT = f"waba-gateway/{__version__}"


def build_headers(
    delivery: Delivery, target: TargetConfig, attempt: int, now: float
) -> dict[str, str]:
    """Headers for attempt number ``attempt`` (1-based) of ``delivery``."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        # Stable across retries: targets use it to drop the duplicates at-least-once implies.
        "X-Gateway-Delivery-Id": delivery.id,
        "X-Gateway-Attempt": str(attempt),
    }
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


class Forwarder:
    """Sends deliveries to one target over its pool of keep-alive connections."""

    def __init__(self, target: TargetConfig) -> None:
        self.target = target
        self._upstream = Upstream(target.url)

    async def send(self, delivery: Delivery, attempt: int) -> AttemptResult:
        headers = build_headers(delivery, self.target, attempt, time.time())
        try:
            response = await self._upstream.post(headers, delivery.body, self.target.timeout_s)
        except TimeoutError:
            return AttemptResult(error=f"timed out after {self.target.timeout_s:g}s")
        except UpstreamError as exc:
            return AttemptResult(error=str(exc)[:300])
        return AttemptResult(
            status=response.status,
            retry_after_s=parse_retry_after(response.retry_after, time.time()),
            response_excerpt=response.excerpt.decode("utf-8", "replace"),
        )

    async def warm(self) -> None:
        """Open a keep-alive connection now; a target that is down is tried again later."""
        await self._upstream.warm(self.target.timeout_s)

    async def close(self) -> None:
        await self._upstream.close()
