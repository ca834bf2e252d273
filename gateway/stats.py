"""Counters the admin listener exposes at ``/metrics`` in Prometheus' text format.

Rule: counters only count; they never hold a payload, a phone number or a secret. The client
certificate CN is recorded because it is what an operator watches during the mTLS rollout (is
Meta presenting ``client.webhooks.fbclientcerts.com`` yet?), and it is not personal data.
prometheus-client renders the exposition format, so it stays correct as the format evolves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Stats"]

_NO_CERTIFICATE = "(none)"


class Stats:
    def __init__(self) -> None:
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
        self._clients = Counter(
            "waba_gateway_client_connections",
            "Connections by accepted client certificate CN ((none): no certificate)",
            ["cn"],
            registry=self.registry,
        )

    def accepted(self) -> None:
        self._accepted.inc()

    def duplicate(self) -> None:
        self._duplicates.inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def saw_client(self, cn: str | None) -> None:
        self._clients.labels(cn=cn or _NO_CERTIFICATE).inc()

    def watch_commits(self, read: Callable[[], tuple[int, int]]) -> None:
        """Expose the outbox writer's group commits: ``read()`` gives (commits, jobs). Their
        ratio is the average group size, what makes durable acknowledgements cheap."""
        self.registry.register(_Commits(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Commits(Collector):
    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        commits, jobs = self._read()
        yield CounterMetricFamily(
            "waba_gateway_outbox_commits",
            "Group transactions the outbox writer committed (each one fsync)",
            value=commits,
        )
        yield CounterMetricFamily(
            "waba_gateway_outbox_jobs",
            "Jobs (stored notifications, attempt outcomes, reads) those commits held",
            value=jobs,
        )
