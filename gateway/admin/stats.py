"""The metrics the admin listener exposes at ``/metrics`` in Prometheus' text format.

Rule: metrics only count and measure; they never hold a payload, a phone number or a secret. The
client certificate CN is recorded because it is what an operator watches during the mTLS rollout
(is Meta presenting ``client.webhooks.fbclientcerts.com`` yet?), and it is not personal data.
prometheus-client renders the exposition format, so it stays correct as the format evolves.
Every name starts with ``waba_gateway_`` and carries its unit (Prometheus' naming conventions).

Two kinds: what happens (counters, histograms) is counted by the process it happens in; with
``workers > 1`` every worker counts into one folder the supervisor made, in prometheus-client's
multiprocess mode, and worker 0's ``/metrics`` sums all of them. What *is* (deliveries pending per
target, dead letters, circuit breakers, certificate expiry, build info) is read when scraped, by
the process serving ``/metrics``, from the outbox and the live configuration (:class:`Snapshot`):
never stale, and nothing to sum across workers.
"""

from __future__ import annotations

import bisect
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.errors import ProxyHeaderError
from gateway.outbox import Backlog
from gateway.version import __version__

__all__ = [
    "ATTEMPT_OUTCOMES",
    "CIRCUIT_STATES",
    "MULTIPROCESS_ENV",
    "RELOAD_OUTCOMES",
    "Snapshot",
    "Stats",
    "Totals",
]

# Read by prometheus-client when it is imported: set, its counters live in files in that folder
# (https://prometheus.github.io/client_python/multiprocess/).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_NO_CERTIFICATE = "(none)"
CIRCUIT_STATES = ("closed", "half_open", "open")
# Every labelled series exists from the start, at 0: Prometheus' increase() needs a sample
# before the first event to see it, so an alert on the first dead letter or failed reload after
# a start would otherwise stay silent.
ATTEMPT_OUTCOMES = ("delivered", "retry", "dead")
RELOAD_OUTCOMES = ("success", "failure")
# From a fast target on loopback (milliseconds) to a backlog drained after an outage (hours).
_LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
)
# The callback answers in about a millisecond; an outbox commit under load takes a few more.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What is, at scrape time: read from the outbox, the dispatcher and the loaded files.
    ``targets``: the configured targets, each given its backlog gauges (0) even before the
    outbox holds a row for it."""

    now: float
    backlog: Sequence[Backlog] = ()
    targets: Sequence[str] = ()
    circuits: Mapping[str, str] = field(default_factory=dict)
    server_certificate_expiry: float | None = None
    # ``(subject, expiry)`` of each client CA; CAs that share a subject are shown as one series,
    # at the earliest expiry of them.
    client_ca_expiries: Sequence[tuple[str, float]] = ()
    last_reload_success: float | None = None
    # The outbox's size: bytes on disk (SQLite, with its write-ahead log) or rows (PostgreSQL).
    outbox_bytes: int | None = None
    outbox_rows: int | None = None
    # Targets with order = "conversation": how many conversations have a delivery held behind
    # an earlier pending one (a count, never a key). Targets with rate_per_s: whether the last
    # claim wanted more deliveries than the limit let go (they wait for tokens).
    held_back: Mapping[str, int] = field(default_factory=dict)
    rate_limited: Mapping[str, bool] = field(default_factory=dict)


class _Times:
    """Times (answers of one status, deliveries to one target) not yet in the histogram: their
    sum, and a count per bucket."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.total = 0.0
        self.counts = [0] * buckets


def _every_target(backlog: Sequence[Backlog], targets: Sequence[str]) -> list[Backlog]:
    """``backlog`` with an empty entry for each of ``targets`` it does not name."""
    named = {each.target for each in backlog}
    empty = [Backlog(name, 0, None, 0) for name in targets if name not in named]
    return [*backlog, *empty]


def _earliest_per_subject(expiries: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The earliest expiry of each subject in ``expiries``. A rotation bundle holds the old and
    the new CA under one subject: one sample each would be the same series twice in a scrape,
    and Prometheus keeps only one of them, perhaps the one that does not expire soon. The
    earliest is the one the expiry alert is for."""
    earliest: dict[str, float] = {}
    for subject, expiry in expiries:
        earliest[subject] = min(expiry, earliest.get(subject, expiry))
    return earliest


def _hand_over(child: Histogram, times: _Times) -> None:
    """Add gathered ``times`` to one labelled histogram. Histogram.observe() does exactly this
    per observation: add to the sum and to the first bucket whose bound is not below the value
    (tests/admin/test_metrics.py holds it to observe()'s result)."""
    child._sum.inc(times.total)
    for bucket, count in zip(child._buckets, times.counts, strict=True):
        if count:
            bucket.inc(count)


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        pending = GaugeMetricFamily(
            "waba_gateway_target_pending_deliveries",
            "Deliveries waiting to be delivered, per target (configured or not)",
            labels=["target"],
        )
        oldest = GaugeMetricFamily(
            "waba_gateway_target_oldest_pending_age_seconds",
            "Age of the oldest pending delivery, per target (0: none pending)",
            labels=["target"],
        )
        dead = GaugeMetricFamily(
            "waba_gateway_target_dead_letters",
            "Dead letters kept in the outbox until replayed or purged, per target",
            labels=["target"],
        )
        for each in _every_target(snap.backlog, snap.targets):
            pending.add_metric([each.target], each.pending)
            age = 0.0 if each.oldest_pending_at is None else snap.now - each.oldest_pending_at
            oldest.add_metric([each.target], max(0.0, age))
            dead.add_metric([each.target], each.dead)
        yield from (pending, oldest, dead)
        circuit = GaugeMetricFamily(
            "waba_gateway_target_circuit_state",
            "Each target's circuit breaker: 1 for its current state (closed, half_open, open)",
            labels=["target", "state"],
        )
        for target, current in sorted(snap.circuits.items()):
            for state in CIRCUIT_STATES:
                circuit.add_metric([target, state], 1.0 if state == current else 0.0)
        yield circuit
        held = GaugeMetricFamily(
            "waba_gateway_target_conversations_held_back",
            "Conversations with a delivery waiting behind an earlier pending one, per target"
            ' with order = "conversation"',
            labels=["target"],
        )
        for target, count in sorted(snap.held_back.items()):
            held.add_metric([target], count)
        yield held
        limited = GaugeMetricFamily(
            "waba_gateway_target_rate_limited",
            "1 while a target with rate_per_s has more due deliveries than its limit lets go",
            labels=["target"],
        )
        for target, waiting in sorted(snap.rate_limited.items()):
            limited.add_metric([target], 1.0 if waiting else 0.0)
        yield limited
        if snap.server_certificate_expiry is not None:
            yield GaugeMetricFamily(
                "waba_gateway_server_certificate_expiry_timestamp_seconds",
                "When the server certificate in use expires (Unix time)",
                value=snap.server_certificate_expiry,
            )
        cas = GaugeMetricFamily(
            "waba_gateway_client_ca_expiry_timestamp_seconds",
            "When the client CAs in tls.client_ca_file expire, per subject: the earliest of"
            " the CAs that share one (Unix time)",
            labels=["subject"],
        )
        for subject, expiry in _earliest_per_subject(snap.client_ca_expiries).items():
            cas.add_metric([subject], expiry)
        yield cas
        if snap.last_reload_success is not None:
            yield GaugeMetricFamily(
                "waba_gateway_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded successfully (start or reload)",
                value=snap.last_reload_success,
            )
        if snap.outbox_bytes is not None:
            yield GaugeMetricFamily(
                "waba_gateway_outbox_size_bytes",
                "The outbox file's size on disk, with its write-ahead log (SQLite)",
                value=snap.outbox_bytes,
            )
        if snap.outbox_rows is not None:
            yield GaugeMetricFamily(
                "waba_gateway_outbox_rows",
                "Rows in the outbox schema's tables, as PostgreSQL's statistics count them",
                value=snap.outbox_rows,
            )
        info = GaugeMetricFamily(
            "waba_gateway_build_info",
            "The running version (always 1)",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """The counters as the admin console shows them (every worker's, like ``/metrics``), and
    the last client certificate CN this process saw, with when (``None``: none yet) and from
    which address (the PROXY protocol header's with ``listen.proxy_protocol``)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    clients: dict[str, int] = field(default_factory=dict)
    last_client: tuple[str, float] | None = None
    last_address: str | None = None


class _WholeFiles:
    """prometheus_client's collector of every worker's counts, over the files that are whole:
    a worker creates its file empty and then sizes it, and a scrape in between failed on the
    empty file (its worker has counted nothing yet, so leaving it out loses nothing)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self._folder.glob("*.db"):
            try:
                if path.stat().st_size > 0:
                    files.append(str(path))
            except OSError:  # gone meanwhile (a worker that ended)
                continue
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


class Stats:
    """The gateway's metrics; ``shared_dir``: the folder the workers of one gateway count in
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
        self._seen_clients: dict[str, int] = {}  # since the last flush, by CN
        self._last_client: tuple[str, float] | None = None
        self._last_address: str | None = None
        self._proxy_refusals = Counter(
            "waba_gateway_proxy_header_refused",
            "Connections closed before TLS because their PROXY protocol header was missing or"
            " bad (listen.proxy_protocol), by reason (gateway.errors.ProxyHeaderError)",
            ["reason"],
            registry=self.registry,
        )
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
        self._requests = Histogram(
            "waba_gateway_request_duration_seconds",
            "Callback requests, from the first byte to the answer, by status",
            ["status"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._request_bounds = [*_REQUEST_BUCKETS, math.inf]
        self._answered: dict[int, _Times] = {}
        # Counted in plain numbers, handed to the counters by flush (see accepted, committed),
        # in a lone process only: there every reading of the counters flushes first, while the
        # workers' shared files are read by other processes, which must see every count at once.
        self._lazy = shared_dir is None
        self._accepted_since = 0
        self._committed_total = (0, 0)  # (commits, jobs), only ever replaced by the writer
        self._committed_flushed = (0, 0)
        self._attempts = Counter(
            "waba_gateway_delivery_attempts",
            "Delivery attempts by target and outcome (delivered, retry, dead)",
            ["target", "outcome"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "waba_gateway_delivery_latency_seconds",
            "From a notification's acknowledgement to its delivery, per target",
            ["target"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._auth_failures = Counter(
            "waba_gateway_admin_auth_failures",
            "Failed admin authentications, by where (bearer: the API, sign-in: the console)",
            ["where"],
            registry=self.registry,
        )
        self._auth_delay = Counter(
            "waba_gateway_admin_auth_delay_seconds",
            "Seconds failed admin authentications were held before their answer",
            registry=self.registry,
        )
        self._latency_bounds = [*_LATENCY_BUCKETS, math.inf]
        self._attempted: dict[tuple[str, str], int] = {}
        self._delivered: dict[str, _Times] = {}
        self._expired = Counter(
            "waba_gateway_dead_letters_expired",
            "Dead letters removed for being older than outbox.dead_retention_s",
            registry=self.registry,
        )
        self._reloads = Counter(
            "waba_gateway_reloads",
            "Configuration reloads by outcome (success, failure)",
            ["outcome"],
            registry=self.registry,
        )

    def prime(self, targets: Iterable[str]) -> None:
        """Create the labelled series of ``targets`` and of the reload outcomes at 0 (see
        :data:`ATTEMPT_OUTCOMES`); a series already counting keeps its count."""
        for target in targets:
            for outcome in ATTEMPT_OUTCOMES:
                self._attempts.labels(target=target, outcome=outcome)
        for outcome in RELOAD_OUTCOMES:
            self._reloads.labels(outcome=outcome)

    def accepted(self) -> None:
        """A notification stored. On every request, so in a lone process counted in a plain
        number and handed to the counter by :meth:`flush`, which every reading of the counters
        runs first (an ``inc()`` takes a lock: about 3,400 instructions)."""
        if self._lazy:
            self._accepted_since += 1
        else:
            self._accepted.inc()

    def duplicate(self) -> None:
        self._duplicates.inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def tls_handshake_failed(self, reason: str) -> None:
        """``reason``: one of the few :func:`gateway.edge.tls.handshake_failure` returns."""
        self._handshake_failures.labels(reason=reason).inc()

    def saw_client(self, cn: str | None, address: str | None = None) -> None:
        """A new connection's client, by its CN. On every new connection: in one process
        counted in plain numbers and handed over by :meth:`flush`, which every scrape runs
        first (a ``labels()`` lookup and an increment cost more than the rest of the identity
        check); with workers written at once, as a scrape reads what each worker wrote."""
        key = cn or _NO_CERTIFICATE
        if self._shared_dir is None:
            self._seen_clients[key] = self._seen_clients.get(key, 0) + 1
        else:
            self._clients.labels(cn=key).inc()
        if cn:
            # Kept in memory by the process that saw it: with workers, the admin listener's
            # process shows the last CN it saw itself. The address is no label: one series
            # per client address would grow without bound.
            self._last_client = (cn, time.time())
            self._last_address = address

    def expect_proxy_headers(self) -> None:
        """``listen.proxy_protocol`` is on: every refusal reason's series exists from the start
        (at 0), so an alert on its increase fires on the first refusal too."""
        for reason in ProxyHeaderError.REASONS:
            self._proxy_refusals.labels(reason=reason)

    def proxy_header_refused(self, reason: str) -> None:
        """``reason``: one of the few :class:`gateway.errors.ProxyHeaderError` carries."""
        self._proxy_refusals.labels(reason=reason).inc()

    def answered(self, status: int, seconds: float) -> None:
        """A callback request answered. On every request, so gathered here in plain numbers
        (under a microsecond) and handed to the histogram by :meth:`flush`: an observation
        costs 3 us in one process and 5 to 8 in multiprocess mode, a tenth of a request."""
        times = self._answered.get(status)
        if times is None:
            times = self._answered[status] = _Times(len(self._request_bounds))
        times.total += seconds
        times.counts[bisect.bisect_left(self._request_bounds, seconds)] += 1

    def flush(self) -> None:
        """Hand the answer times, clients, attempts and delivery latencies gathered since the
        last flush to their metrics (the runtime calls it every second and before each scrape)."""
        for status, times in self._answered.items():
            _hand_over(self._requests.labels(status=str(status)), times)
        self._answered.clear()
        for cn, count in self._seen_clients.items():
            self._clients.labels(cn=cn).inc(count)
        self._seen_clients.clear()
        if self._accepted_since:
            self._accepted.inc(self._accepted_since)
            self._accepted_since = 0
        # Read once: the writer thread replaces the pair as a whole, and only it does.
        committed, flushed = self._committed_total, self._committed_flushed
        if committed != flushed:
            self._commits.inc(committed[0] - flushed[0])
            self._jobs.inc(committed[1] - flushed[1])
            self._committed_flushed = committed
        for (target, outcome), count in self._attempted.items():
            self._attempts.labels(target=target, outcome=outcome).inc(count)
        self._attempted.clear()
        for target, times in self._delivered.items():
            _hand_over(self._latency.labels(target=target), times)
        self._delivered.clear()

    def attempted(self, target: str, outcome: str, latency_s: float | None) -> None:
        """A delivery attempt's outcome, with the delivery's latency when delivered. On every
        delivery, so gathered in plain numbers and handed over by :meth:`flush`, as
        :meth:`answered` is: a ``labels()`` lookup and an observation cost more than the rest
        of recording the outcome on the event loop."""
        key = (target, outcome)
        self._attempted[key] = self._attempted.get(key, 0) + 1
        if latency_s is not None:
            times = self._delivered.get(target)
            if times is None:
                times = self._delivered[target] = _Times(len(self._latency_bounds))
            times.total += latency_s
            times.counts[bisect.bisect_left(self._latency_bounds, latency_s)] += 1

    def auth_failed(self, where: str, delay_s: float) -> None:
        """An admin authentication failed at ``where`` and is answered after ``delay_s``."""
        self._auth_failures.labels(where=where).inc()
        self._auth_delay.inc(delay_s)

    def dead_letters_expired(self, count: int) -> None:
        self._expired.inc(count)

    def reloaded(self, ok: bool) -> None:
        self._reloads.labels(outcome="success" if ok else "failure").inc()

    def committed(self, jobs: int) -> None:
        """One group transaction of ``jobs`` committed. The ratio of the two counters is the
        average group size, what makes durable acknowledgements cheap.

        Called on the outbox writer's thread (the SQLite outbox) or the event loop's (the
        PostgreSQL one), by one caller at a time: running totals that only that caller
        replaces, each time with a new pair, which :meth:`flush` hands over on the event
        loop's thread as the difference from the last pair it saw. Nothing is lost between
        the two threads, and a commit costs no lock. (Workers count in the shared files at
        once, as :meth:`accepted` does.)"""
        if not self._lazy:
            self._commits.inc()
            self._jobs.inc(jobs)
            return
        commits, total = self._committed_total
        self._committed_total = (commits + 1, total + jobs)

    def _gathered(self) -> CollectorRegistry:
        if self._shared_dir is None:
            return self.registry
        every_worker = CollectorRegistry()
        every_worker.register(_WholeFiles(self._shared_dir))
        return every_worker

    def render(self, snapshot: Snapshot | None = None) -> bytes:
        """Every worker's counts, and with ``snapshot`` what is at this moment."""
        self.flush()
        counted = generate_latest(self._gathered())
        if snapshot is None:
            return counted
        now = CollectorRegistry(auto_describe=False)
        now.register(_SnapshotCollector(snapshot))
        return counted + generate_latest(now)

    def totals(self) -> Totals:
        """The counts ``render`` shows, read back as numbers."""
        self.flush()
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
            last_address=self._last_address,
        )
