"""Counters the admin listener exposes at ``/metrics`` in Prometheus' text format.

Rule: counters only count; they never hold a payload, a phone number or a secret. The client
certificate CN is recorded because it is what an operator watches during the mTLS rollout (is
Meta presenting ``client.webhooks.fbclientcerts.com`` yet?), and it is not personal data.
prometheus-client renders the exposition format, so it stays correct as the format evolves.

With ``workers > 1`` every worker counts into one folder the supervisor made, in
prometheus-client's multiprocess mode, and worker 0's ``/metrics`` sums all of them: what an
operator reads is the gateway's count, not one worker's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["MULTIPROCESS_ENV", "Stats", "Totals"]

# Read by prometheus-client when it is imported: set, its counters live in files in that folder
# (https://prometheus.github.io/client_python/multiprocess/).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_NO_CERTIFICATE = "(none)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """The counters as the admin console shows them (every worker's, like ``/metrics``), and
    the last client certificate CN this process saw, with when (``None``: none yet)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    clients: dict[str, int] = field(default_factory=dict)
    last_client: tuple[str, float] | None = None


class Stats:
    """The gateway's counters; ``shared_dir``: the folder the workers of one gateway count in
    together (``None``: a lone process, counting in memory)."""

    def __init__(self, shared_dir: Path | None = None) -> None:
        if shared_dir is not None and os.environ.get(MULTIPROCESS_ENV) != str(shared_dir):
            # Without it the counters stay in this process and /metrics would sum nothing.
            raise RuntimeError(f"{MULTIPROCESS_ENV} must name {shared_dir} before start-up")
        self._shared_dir = shared_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self._accepted = Counter(
            "waba_gateway_notifications_accepted",
            "Notifications stored in the outbox and acknowledged with 200",
            registry=self.registry,
        )
        self._duplicates = Counter(
            "waba_gateway_notifications_duplicate",
            "Notifications acknowledged as duplicates of one already stored",
            registry=self.registry,
        )
        self._rejected = Counter(
            "waba_gateway_requests_rejected",
            "Requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._handshake_failures = Counter(
            "waba_gateway_tls_handshake_failures",
            "TLS handshakes on the callback listener that failed, by reason (gateway.edge.tls)",
            ["reason"],
            registry=self.registry,
        )
        self._clients = Counter(
            "waba_gateway_client_connections",
            "Connections by accepted client certificate CN ((none): no certificate)",
            ["cn"],
            registry=self.registry,
        )
        self._last_client: tuple[str, float] | None = None
        self._commits = Counter(
            "waba_gateway_outbox_commits",
            "Group transactions the outbox writer committed (each one fsync)",
            registry=self.registry,
        )
        self._jobs = Counter(
            "waba_gateway_outbox_jobs",
            "Jobs (stored notifications, attempt outcomes, reads) those commits held",
            registry=self.registry,
        )

    def accepted(self) -> None:
        self._accepted.inc()

    def duplicate(self) -> None:
        self._duplicates.inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def tls_handshake_failed(self, reason: str) -> None:
        """``reason``: one of the few :func:`gateway.edge.tls.handshake_failure` returns."""
        self._handshake_failures.labels(reason=reason).inc()

    def saw_client(self, cn: str | None) -> None:
        self._clients.labels(cn=cn or _NO_CERTIFICATE).inc()
        if cn:
            # Kept in memory by the process that saw it: with workers, the admin listener's
            # process shows the last CN it saw itself.
            self._last_client = (cn, time.time())

    def committed(self, jobs: int) -> None:
        """One group transaction of ``jobs`` committed (called on the outbox writer's thread;
        counters are thread-safe). The ratio of the two counters is the average group size,
        what makes durable acknowledgements cheap."""
        self._commits.inc()
        self._jobs.inc(jobs)

    def _gathered(self) -> CollectorRegistry:
        if self._shared_dir is None:
            return self.registry
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=str(self._shared_dir))  # type: ignore[no-untyped-call]
        return every_worker

    def render(self) -> bytes:
        return generate_latest(self._gathered())

    def totals(self) -> Totals:
        """The counts ``render`` shows, read back as numbers."""
        values: dict[str, dict[str, int]] = {}
        for family in self._gathered().collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue  # the _created gauges prometheus-client adds
                label = next(iter(sample.labels.values()), "")
                into = values.setdefault(sample.name.removesuffix("_total"), {})
                into[label] = into.get(label, 0) + int(sample.value)
        return Totals(
            accepted=sum(values.get("waba_gateway_notifications_accepted", {}).values()),
            duplicates=sum(values.get("waba_gateway_notifications_duplicate", {}).values()),
            rejected=dict(sorted(values.get("waba_gateway_requests_rejected", {}).items())),
            clients=dict(sorted(values.get("waba_gateway_client_connections", {}).items())),
            last_client=self._last_client,
        )
