"""One HTTP request to one target: build the headers, send, report what came back.

Rule: the forwarder never decides what a result means (that is :mod:`gateway.outcome`) and never
copies an inbound header: every header a target sees is built here, so nothing from outside can
impersonate the gateway's own ``X-Gateway-*`` headers.
"""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp

from gateway import __version__
from gateway.backoff import parse_retry_after
from gateway.config import TargetConfig
from gateway.outbox import Delivery
from gateway.outcome import AttemptResult
from gateway.signature import gateway_signature

__all__ = ["Forwarder", "build_headers"]

_EXCERPT_BYTES = 1024
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
    """Sends deliveries to one target over one shared keep-alive client session."""

    def __init__(self, target: TargetConfig) -> None:
        self.target = target
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.target.concurrency)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.target.timeout_s),
                # Only the headers build_headers makes: no cookies carried between deliveries.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(self, delivery: Delivery, attempt: int) -> AttemptResult:
        headers = build_headers(delivery, self.target, attempt, time.time())
        try:
            async with self._client().post(
                self.target.url,
                # A file object, not bytes: aiohttp warns (ResourceWarning) on every raw body
                # over 1 MiB, and Meta's notifications reach 3 MB.
                data=io.BytesIO(delivery.body),
                headers=headers,
                allow_redirects=False,
            ) as response:
                excerpt = await response.content.read(_EXCERPT_BYTES)
                return AttemptResult(
                    status=response.status,
                    retry_after_s=parse_retry_after(
                        response.headers.get("Retry-After"), time.time()
                    ),
                    response_excerpt=excerpt.decode("utf-8", "replace"),
                )
        except TimeoutError:
            return AttemptResult(error=f"timed out after {self.target.timeout_s:g}s")
        except aiohttp.ClientError as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}"[:300])
        except OSError as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}"[:300])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            # Let the connector's transports close before the loop does (aiohttp advice).
            await asyncio.sleep(0)
