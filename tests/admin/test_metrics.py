"""/metrics answers "is it working, and is anything stuck?" (gateway.admin.stats)."""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import (
    admin_get,
    gateway_config,
    message_body,
    metric,
    post,
    sink_target,
    wait_for_state,
)
from pki import Pki
from prometheus_client.parser import text_string_to_metric_families
from sink import Reply, Sink

from gateway import __version__
from gateway.admin.stats import Snapshot, Stats
from gateway.outbox import Backlog
from gateway.runtime.gateway import Gateway

PREFIX = "waba_gateway_"
CA_EXPIRY = f"{PREFIX}client_ca_expiry_timestamp_seconds"


def test_every_metric_is_named_with_the_gateways_prefix() -> None:
    """Prometheus' naming conventions: one application prefix on every metric."""
    stats = Stats()
    stats.answered(200, 0.001)
    stats.attempted("t", "delivered", 0.5)
    stats.reloaded(True)
    stats.tls_handshake_failed("timeout")
    text = stats.render(Snapshot(now=10.0, backlog=[Backlog("t", 1, 4.0, 2)])).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names
    assert [name for name in names if not name.startswith(PREFIX)] == []


@pytest.mark.parametrize(
    ("snapshot", "sample", "value"),
    [
        (Snapshot(now=10.0, backlog=[Backlog("t", 3, 4.0, 0)]), "target_pending_deliveries", 3),
        (
            Snapshot(now=10.0, backlog=[Backlog("t", 3, 4.0, 0)]),
            "target_oldest_pending_age_seconds",
            6,
        ),
        (
            Snapshot(now=10.0, backlog=[Backlog("t", 0, None, 5)]),
            "target_oldest_pending_age_seconds",
            0,
        ),
        (Snapshot(now=10.0, backlog=[Backlog("t", 0, None, 5)]), "target_dead_letters", 5),
    ],
)
def test_backlog_gauges_come_from_the_snapshot(
    snapshot: Snapshot, sample: str, value: float
) -> None:
    """Pending, oldest pending age and dead letters, per target, as read at scrape time."""
    text = Stats().render(snapshot).decode()
    assert metric(text, f'{PREFIX}{sample}{{target="t"}}') == value


@pytest.mark.parametrize(
    ("backlog", "targets", "expected"),
    [
        ([], ["a", "b"], {"a": (0, 0, 0), "b": (0, 0, 0)}),
        ([Backlog("a", 2, 4.0, 1)], ["a", "b"], {"a": (2, 6, 1), "b": (0, 0, 0)}),
        ([Backlog("gone", 1, 9.0, 0)], ["a"], {"gone": (1, 1, 0), "a": (0, 0, 0)}),
        ([], [], {}),
    ],
)
def test_every_configured_target_has_backlog_gauges_before_its_first_delivery(
    backlog: list[Backlog], targets: list[str], expected: dict[str, tuple[float, float, float]]
) -> None:
    """A configured target with no row in the outbox yet reads 0 pending, 0 s, 0 dead."""
    text = Stats().render(Snapshot(now=10.0, backlog=backlog, targets=targets)).decode()
    gauges = ("target_pending_deliveries", "target_oldest_pending_age_seconds")
    names = (*gauges, "target_dead_letters")
    found = {
        target: tuple(metric(text, f'{PREFIX}{name}{{target="{target}"}}') for name in names)
        for target in expected
    }
    assert found == expected
    assert text.count(f"{PREFIX}target_dead_letters{{") == len(expected)


def test_labelled_counters_start_at_zero_for_every_target_and_outcome() -> None:
    """prime(): every target's attempt outcomes and both reload outcomes read 0 before any
    event, so that increase() sees the first one; a count already made is kept."""
    stats = Stats()
    stats.attempted("a", "dead", None)
    stats.prime(["a", "b"])
    text = stats.render().decode()
    attempts = f"{PREFIX}delivery_attempts_total"
    for target in ("a", "b"):
        for outcome in ("delivered", "retry"):
            assert metric(text, f'{attempts}{{outcome="{outcome}",target="{target}"}}') == 0
    assert metric(text, f'{attempts}{{outcome="dead",target="a"}}') == 1
    assert metric(text, f'{attempts}{{outcome="dead",target="b"}}') == 0
    assert metric(text, f'{PREFIX}reloads_total{{outcome="success"}}') == 0
    assert metric(text, f'{PREFIX}reloads_total{{outcome="failure"}}') == 0


async def test_a_started_gateway_shows_every_alerted_series_at_zero(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Before any notification: each target's dead-letter count and backlog, and the failed
    reloads, exist at 0."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink), sink_target(sink, "b")])
    async with Gateway(config) as gateway:
        text = (await admin_get(gateway, "/metrics")).text
    for target in ("sink", "b"):
        dead = f'{PREFIX}delivery_attempts_total{{outcome="dead",target="{target}"}}'
        assert metric(text, dead) == 0
        assert metric(text, f'{PREFIX}target_pending_deliveries{{target="{target}"}}') == 0
        assert metric(text, f'{PREFIX}target_dead_letters{{target="{target}"}}') == 0
    assert metric(text, f'{PREFIX}reloads_total{{outcome="failure"}}') == 0


def test_circuit_state_is_one_for_the_current_state_only() -> None:
    """One sample per state, so an alert can ask for state="open" == 1."""
    text = Stats().render(Snapshot(now=0.0, circuits={"t": "open"})).decode()
    assert metric(text, f'{PREFIX}target_circuit_state{{state="open",target="t"}}') == 1
    assert metric(text, f'{PREFIX}target_circuit_state{{state="closed",target="t"}}') == 0
    assert metric(text, f'{PREFIX}target_circuit_state{{state="half_open",target="t"}}') == 0


async def test_metrics_of_a_delivered_and_a_dead_notification(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Attempts by outcome, delivery latency, request durations by status, the backlog, the
    circuit, the certificate expiries and the build info, from one running gateway."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    async with Gateway(config) as gateway:
        assert (await post(gateway, pki, message_body("one"))).status == 200
        await wait_for_state(gateway, "delivered")
        sink.script(Reply(status=400))
        assert (await post(gateway, pki, message_body("two"))).status == 200
        await wait_for_state(gateway, "dead")
        assert (await post(gateway, pki, b"{}", secret="wrong")).status == 401
        text = (await admin_get(gateway, "/metrics")).text

    attempts = f"{PREFIX}delivery_attempts_total"
    assert metric(text, f'{attempts}{{outcome="delivered",target="sink"}}') == 1
    assert metric(text, f'{attempts}{{outcome="dead",target="sink"}}') == 1
    assert metric(text, f'{PREFIX}delivery_latency_seconds_count{{target="sink"}}') == 1
    assert metric(text, f'{PREFIX}request_duration_seconds_count{{status="200"}}') == 2
    assert metric(text, f'{PREFIX}request_duration_seconds_count{{status="401"}}') == 1
    assert metric(text, f'{PREFIX}target_pending_deliveries{{target="sink"}}') == 0
    assert metric(text, f'{PREFIX}target_dead_letters{{target="sink"}}') == 1
    assert metric(text, f'{PREFIX}target_circuit_state{{state="closed",target="sink"}}') == 1
    leaf = x509.load_pem_x509_certificates(pki.server_chain_file.read_bytes())[0]
    expiry = metric(text, f"{PREFIX}server_certificate_expiry_timestamp_seconds")
    assert expiry == leaf.not_valid_after_utc.timestamp()
    (ca_line,) = [
        line
        for line in text.splitlines()
        if line.startswith(f"{PREFIX}client_ca_expiry_timestamp_seconds{{")
    ]
    ca = x509.load_pem_x509_certificate(pki.client_ca_file.read_bytes())
    assert float(ca_line.split()[-1]) == ca.not_valid_after_utc.timestamp()
    assert re.search(
        rf'^{PREFIX}build_info{{python="[^"]+",version="{__version__}"}} 1.0$', text, re.M
    )


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Each sample of ``name`` in a /metrics text: its labels and its value, as scraped."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


@pytest.mark.parametrize(
    ("expiries", "shown"),
    [
        # A rotation bundle: the old CA and the new one under one subject, in either order.
        ([("CN=ca", 50.0), ("CN=ca", 900.0)], {"CN=ca": 50.0}),
        ([("CN=ca", 900.0), ("CN=ca", 50.0)], {"CN=ca": 50.0}),
        ([("CN=ca", 900.0), ("CN=ca", 50.0), ("CN=ca", 70.0)], {"CN=ca": 50.0}),
        # Subjects of their own stay apart, each with its expiry.
        ([("CN=a", 900.0), ("CN=b", 50.0)], {"CN=a": 900.0, "CN=b": 50.0}),
        ([("CN=a", 900.0), ("CN=b", 50.0), ("CN=a", 70.0)], {"CN=a": 70.0, "CN=b": 50.0}),
        ([], {}),
    ],
    ids=["old-then-new", "new-then-old", "three", "two-subjects", "mixed", "no-client-ca"],
)
def test_client_cas_sharing_a_subject_are_one_series_at_the_earliest_expiry(
    expiries: list[tuple[str, float]], shown: dict[str, float]
) -> None:
    """One sample per subject (the exposition format allows one per label set; Prometheus
    drops a repeated one), holding the expiry the CA-expiry alert must see first."""
    text = Stats().render(Snapshot(now=0.0, client_ca_expiries=expiries)).decode()
    samples = _samples(text, CA_EXPIRY)
    assert len(samples) == len(shown)
    assert {labels["subject"]: value for labels, value in samples} == shown


def _self_signed_ca(name: x509.Name, days: int) -> tuple[bytes, float]:
    """A CA certificate named ``name`` that expires in ``days``: its PEM and its expiry."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return pem, cert.not_valid_after_utc.timestamp()


async def test_a_rotation_bundle_of_one_subject_shows_its_ca_expiring_first_once(
    pki: Pki, tmp_path: Path
) -> None:
    """A running gateway whose tls.client_ca_file holds the new CA and the old one (10 days
    left) under one subject, as the README advises during a rotation: one series for that
    subject, at the old CA's expiry, and no series twice in the scrape."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Client Root")])
    new, _ = _self_signed_ca(name, 3650)
    old, old_expiry = _self_signed_ca(name, 10)
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(new + old)
    config = gateway_config(pki, tmp_path)
    tls = dataclasses.replace(config.tls, client_ca_file=bundle)
    async with Gateway(dataclasses.replace(config, tls=tls)) as gateway:
        text = (await admin_get(gateway, "/metrics")).text
    assert _samples(text, CA_EXPIRY) == [({"subject": "CN=Example Client Root"}, old_expiry)]
    series = Counter(
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )
    assert [key for key, count in series.items() if count > 1] == []


def test_gathered_answer_times_render_exactly_as_observed_ones() -> None:
    """answered() gathers times and flush() hands them over: the same histogram, bucket for
    bucket, as Histogram.observe() of each value."""
    values = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.2, 2.5, 7.0]
    gathered = Stats()
    for value in values:
        gathered.answered(200, value)
        gathered.answered(404, value / 2)
    observed = Stats()
    for value in values:
        observed._requests.labels(status="200").observe(value)
        observed._requests.labels(status="404").observe(value / 2)

    def histogram(stats: Stats) -> list[str]:
        lines = stats.render().decode().splitlines()
        return [line for line in lines if line.startswith(f"{PREFIX}request_duration_seconds_")]

    assert [line for line in histogram(gathered) if "_created" not in line] == [
        line for line in histogram(observed) if "_created" not in line
    ]
    assert len(histogram(gathered)) > 20


def test_gathered_attempts_and_latencies_render_exactly_as_observed_ones() -> None:
    """attempted() gathers outcomes and latencies and flush() hands them over: the same counters
    and histogram, sample for sample, as labels().inc() and observe() of each one."""
    attempts = [
        ("a", "delivered", 0.004),
        ("a", "delivered", 0.3),
        ("a", "retry", None),
        ("b", "delivered", 4000.0),
        ("b", "dead", None),
        ("a", "delivered", 0.004),
    ]
    gathered = Stats()
    for target, outcome, latency in attempts:
        gathered.attempted(target, outcome, latency)
    observed = Stats()
    for target, outcome, latency in attempts:
        observed._attempts.labels(target=target, outcome=outcome).inc()
        if latency is not None:
            observed._latency.labels(target=target).observe(latency)

    def delivery_lines(stats: Stats) -> list[str]:
        lines = stats.render().decode().splitlines()
        return [
            line
            for line in lines
            if line.startswith(f"{PREFIX}delivery_") and "_created" not in line
        ]

    assert delivery_lines(gathered) == delivery_lines(observed)
    assert len(delivery_lines(gathered)) > 30
