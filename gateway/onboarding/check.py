"""What ``waba-gateway check`` reports: a configuration and its certificate files, before serving.

Rule: ``check`` refuses exactly what ``serve`` would refuse (same loader, same TLS context
builder), and adds what an operator wants to see before a rollout: certificate expiry (a warning
under 30 days) and the subjects and fingerprints of the client CA bundle, so they can be compared
with the CA file Meta publishes. With ``outbox.url``: whether the database is reachable and holds
the schema version this gateway uses.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509

from gateway.certificates import days_left
from gateway.certificates import subject as leaf_subject
from gateway.config import Config
from gateway.edge.tls import build_server_context, client_ca_subjects, stale_crls
from gateway.errors import CertificateError
from gateway.outbox import describe_outbox

__all__ = ["EXPIRY_WARNING_DAYS", "outbox_report", "report"]

EXPIRY_WARNING_DAYS = 30


def _leaf(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        raise CertificateError(f"tls.cert_file = '{path}': {exc}") from exc


def report(config: Config, now: datetime.datetime) -> list[str]:
    """The lines ``check`` prints; raises on anything ``serve`` would refuse."""
    build_server_context(config.tls, source=config.source, now=now)
    lines = [f"ok: configuration {config.source or '(built in)'}"]
    leaf = _leaf(config.tls.cert_file)
    left = days_left(leaf, now)
    subject = leaf_subject(leaf)
    if left < 0:
        raise CertificateError(
            f"tls.cert_file = '{config.tls.cert_file}': certificate {subject} has expired"
        )
    status = "warning" if left < EXPIRY_WARNING_DAYS else "ok"
    lines.append(f"{status}: server certificate {subject} expires in {int(left)} days")
    lines.append("ok: server key matches the certificate")
    lines.append(
        f"ok: client_auth = {config.tls.client_auth}; accepted CN: "
        + ", ".join(config.tls.client_cn)
    )
    if config.tls.client_ca_file is not None:
        for ca_subject, fingerprint in client_ca_subjects(config.tls.client_ca_file):
            lines.append(f"ok: client CA {ca_subject} sha256 {fingerprint}")
    if config.tls.crl_file is not None:
        lines.extend(f"warning: {stale}" for stale in stale_crls(config.tls.crl_file, now))
    lines.append(
        f"ok: {len(config.targets)} target(s): " + ", ".join(t.name for t in config.targets)
    )
    return lines


async def outbox_report(config: Config) -> list[str]:
    """The line about a database outbox: reachable, and at the schema version this gateway
    uses (none for a SQLite file). Raises OutboxError when ``serve`` would refuse it."""
    found = await describe_outbox(config.outbox)
    return [] if found is None else [f"ok: {found}"]
