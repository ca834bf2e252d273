"""``kind = "http"``: one HTTP request to one target: build the headers, send, report.

Rule: the forwarder never decides what a result means (that is :mod:`gateway.delivery.outcome`) and
never copies an inbound header: every header a target sees is built here and in
:mod:`gateway.delivery.headers`, so nothing from outside can impersonate the gateway's own
``X-Gateway-*`` headers.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Mapping, Sequence

from gateway.config import TargetConfig
from gateway.delivery.answers import kept_answer
from gateway.delivery.backoff import parse_retry_after
from gateway.delivery.headers import delivery_headers
from gateway.delivery.outcome import AttemptResult
from gateway.delivery.upstream import Response, Upstream, UpstreamError
from gateway.outbox import Delivery
from gateway.version import __version__

__all__ = ["Forwarder", "build_headers"]

USER_AGENT = f"waba-gateway/{__version__}"

log = logging.getLogger(__name__)


def build_headers(
    delivery: Delivery, target: TargetConfig, attempt: int, now: float
) -> dict[str, str]:
    """HTTP headers for attempt number ``attempt`` (1-based) of ``delivery``."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **delivery_headers(delivery, target, attempt, now),
    }


class Forwarder:
    """Sends deliveries to one target over its pool of keep-alive connections; ``tls``: the
    target's own client context (:mod:`gateway.delivery.target_tls`), if it has one."""

    def __init__(self, target: TargetConfig, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self._upstream = Upstream(target.url, tls)

    async def send_many(
        self,
        deliveries: Sequence[Delivery],
        attempts: Sequence[int],
        trace_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> list[AttemptResult]:
        """Attempt number ``attempts[i]`` of each ``deliveries[i]``, pipelined on one
        connection (see :mod:`gateway.delivery.upstream`); what came back for each, in order.
        ``trace_headers[i]``: the traceparent (and tracestate) of attempt ``i``'s span, when
        traced; they are added to the gateway's own headers, the body stays as it is."""
        now = time.time()
        requests = [
            (build_headers(delivery, self.target, attempt, now), delivery.body)
            for delivery, attempt in zip(deliveries, attempts, strict=True)
        ]
        if trace_headers is not None:
            for (headers, _), trace in zip(requests, trace_headers, strict=True):
                headers.update(trace)
        answers = await self._upstream.post_many(requests, self.target.timeout_s)
        now = time.time()
        return [
            self._result(delivery, answer, now)
            for delivery, answer in zip(deliveries, answers, strict=True)
        ]

    def _result(
        self, delivery: Delivery, answer: Response | UpstreamError | TimeoutError, now: float
    ) -> AttemptResult:
        if isinstance(answer, TimeoutError):
            return AttemptResult(error=f"timed out after {self.target.timeout_s:g}s")
        if isinstance(answer, UpstreamError):
            return AttemptResult(error=str(answer)[:300])
        try:
            return AttemptResult(
                status=answer.status,
                retry_after_s=parse_retry_after(answer.retry_after, now),
                # Only what cannot carry the notification back (gateway.delivery.answers).
                response_excerpt=kept_answer(
                    delivery.body, answer.status, answer.content_type, answer.excerpt
                ),
            )
        except Exception as exc:
            # The target did answer: whatever the gateway fails to make of the answer's
            # details, its status stands (a 400 is a dead letter, a 200 delivered), and
            # raised out of send_many it would cost every delivery of the batch its answer.
            # Nothing of the answer is kept, since it could not be checked.
            log.warning(
                "the answer of %s to delivery %s was not read (%s): only its status is kept",
                self.target.name,
                delivery.id,
                type(exc).__name__,
            )
            return AttemptResult(
                status=answer.status,
                retry_after_s=parse_retry_after(answer.retry_after, now),  # never raises
                response_excerpt="(not kept)",
            )

    async def warm(self) -> None:
        """Open a keep-alive connection now; a target that is down is tried again later."""
        await self._upstream.warm(self.target.timeout_s)

    async def probe(self) -> None:
        """Nothing: ``check`` judges the configuration; ``doctor`` connects to HTTP targets."""

    async def close(self) -> None:
        await self._upstream.close()
