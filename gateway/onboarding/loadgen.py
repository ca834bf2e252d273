"""POSTing notifications the way Meta does, once or as a load, and the load report.

Rule: a request carries the body's bytes as given, ``Content-Type: application/json`` and
``X-Hub-Signature-256`` computed over those same bytes; nothing here parses or re-serialises a
payload. The report (:func:`tally`) is pure: percentiles by nearest rank, errors counted by kind
(``HTTP <status>``, ``TLS``, ``connection refused``, ``connection``, ``timeout``).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.errors import GatewayError
from gateway.onboarding.meta_client import describe_failure
from gateway.signing import sign

__all__ = [
    "Answer",
    "LoadReport",
    "make_unique",
    "meta_headers",
    "percentile",
    "post",
    "run_load",
    "tally",
]

# The gateway acknowledges a body it already stored with this first line
# (gateway.edge.callback.DUPLICATE).
_DUPLICATE = "ok (duplicate)"
_FAILURE_KINDS = {
    "tls": "TLS",
    "refused": "connection refused",
    "connection": "connection",
    # A hang-up is counted with the other connection failures; its example line says which.
    "closed": "connection",
    "timeout": "timeout",
}


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's outcome: a status and the first line of the body, or a failure."""

    latency_ms: float
    status: int | None = None
    reason: str = ""
    first_line: str = ""
    failure: str | None = None  # a key of _FAILURE_KINDS
    error: BaseException | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def kind(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return _FAILURE_KINDS.get(self.failure or "", "connection")


def meta_headers(app_secret: str, body: bytes) -> dict[str, str]:
    """The headers of Meta's POST (whatsapp/webhooks/overview, "Validating payloads")."""
    return {"Content-Type": "application/json", "X-Hub-Signature-256": sign(app_secret, body)}


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    app_secret: str,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Answer:
    """POST ``body`` to ``url`` as Meta would; failures are answers too, never raised."""
    started = clock()
    try:
        async with session.post(url, data=body, headers=meta_headers(app_secret, body)) as response:
            text = (await response.read()).decode("utf-8", "replace")
            lines = text.splitlines()
            return Answer(
                latency_ms=(clock() - started) * 1000,
                status=response.status,
                reason=response.reason or "",
                first_line=lines[0] if lines else "",
            )
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, ValueError) as exc:
        # ValueError (UnicodeError is one): a host name the resolver cannot encode, should one
        # get past the check of the URL; an answer all the same, never a traceback.
        kind, message = describe_failure(exc, timeout_s)
        latency_ms = (clock() - started) * 1000
        return Answer(latency_ms=latency_ms, failure=kind, first_line=message, error=exc)


def percentile(ordered: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of ``ordered`` (sorted ascending; 0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    requests: int
    ok: int
    duplicates: int
    elapsed_s: float
    latencies_ms: tuple[float, ...]  # of answered requests, sorted
    errors: dict[str, int]
    examples: dict[str, str]  # one first line or reason per error kind

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The report as JSON-ready data (``send --json``)."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "duplicates": self.duplicates,
            "elapsed_s": round(self.elapsed_s, 6),
            "requests_per_s": round(self.requests_per_s, 1),
            "latency_ms": {
                name: round(percentile(self.latencies_ms, percent), 3)
                for name, percent in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
            },
            "errors": self.errors,
        }

    def lines(self) -> list[str]:
        """The report as text."""
        latency = self.summary()["latency_ms"]
        lines = [
            f"{self.requests} requests in {self.elapsed_s:.2f} s: "
            f"{self.requests_per_s:.1f} requests/s",
            f"ok (2xx): {self.ok}"
            + (f", {self.duplicates} acknowledged as duplicates" if self.duplicates else ""),
            "latency ms: " + "  ".join(f"{name} {value:.1f}" for name, value in latency.items()),
        ]
        if not self.errors:
            return [*lines, "errors: none"]
        lines.append("errors:")
        for kind, count in self.errors.items():
            lines.append(f"  {kind}: {count} ({self.examples[kind]})")
        return lines


def tally(answers: Sequence[Answer], elapsed_s: float) -> LoadReport:
    """The load report for ``answers``, in order of first occurrence for the error kinds."""
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for answer in answers:
        if not answer.ok:
            errors[answer.kind] += 1
            examples.setdefault(answer.kind, answer.first_line)
    return LoadReport(
        requests=len(answers),
        ok=sum(answer.ok for answer in answers),
        duplicates=sum(answer.ok and answer.first_line == _DUPLICATE for answer in answers),
        elapsed_s=elapsed_s,
        latencies_ms=tuple(sorted(a.latency_ms for a in answers if a.status is not None)),
        errors=dict(errors),
        examples=examples,
    )


async def run_load(
    url: str,
    body_for: Callable[[int], bytes],
    app_secret: str,
    *,
    count: int,
    concurrency: int,
    context: ssl.SSLContext,
    new_connections: bool,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> LoadReport:
    """``count`` POSTs of ``body_for(i)`` from ``concurrency`` workers sharing one connector.

    Connections are kept alive and reused, unless ``new_connections``: then each request opens
    (and pays the TLS handshake of) a connection of its own, as Meta's client may, and closes it.
    """
    indexes = iter(range(count))
    answers: list[Answer] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def send(shared: aiohttp.ClientSession | None, index: int) -> Answer:
        body = body_for(index)
        if shared is not None:
            return await post(shared, url, body, app_secret, timeout_s=timeout_s, clock=clock)
        # A session of its own: closing it waits until the TLS connection is really closed,
        # which force_close on a shared connector would leave running in the background.
        async with session() as own:
            return await post(own, url, body, app_secret, timeout_s=timeout_s, clock=clock)

    async def worker(shared: aiohttp.ClientSession | None) -> None:
        for index in indexes:  # one iterator shared by all workers: each index is sent once
            answers.append(await send(shared, index))

    async with session() as shared:
        started = clock()
        workers = min(concurrency, count)
        await asyncio.gather(*(worker(None if new_connections else shared) for _ in range(workers)))
        elapsed_s = clock() - started
    return tally(answers, elapsed_s)


_WAMID = b"wamid."


def make_unique(body: bytes, run_id: str, index: int) -> bytes:
    """``body`` with ``run_id`` and ``index`` inserted after its first ``wamid.``."""
    at = body.find(_WAMID)
    if at < 0:
        raise GatewayError(
            "--unique needs a payload holding a 'wamid.' id (a messages or statuses notification)"
        )
    at += len(_WAMID)
    return body[:at] + f"{run_id}{index:06d}".encode() + body[at:]
