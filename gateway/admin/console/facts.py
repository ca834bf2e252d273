"""What the console may show of a delivery's body and of the certificates: facts, never content.

Rule: a notification body holds message text, names and phone numbers, so the console never
shows it; it shows the fields and WABA ids the body's changes name, and its size. Certificates are
shown by subject, SHA-256 fingerprint and days left, as ``waba-gateway check`` prints them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.certificates import days_left, fingerprint, subject
from gateway.config import TlsConfig
from gateway.edge.routing import iter_changes, parse
from gateway.errors import BadRequest

__all__ = ["CertificateFacts", "body_facts", "certificate_facts"]


def body_facts(body: bytes) -> tuple[list[str], list[str]]:
    """The distinct ``(fields, WABA ids)`` the body's changes name, in order of appearance;
    nothing for a body that is not a notification."""
    try:
        payload = parse(body)
    except BadRequest:
        return [], []
    fields: dict[str, None] = {}
    wabas: dict[str, None] = {}
    for change in iter_changes(payload):
        if change.field:
            fields[change.field] = None
        for waba in (change.entry_id, change.waba_id):
            if waba:
                wabas[waba] = None
    return list(fields), list(wabas)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateFacts:
    """One certificate as the console lists it; ``problem``: why it could not be read."""

    role: str
    subject: str = ""
    fingerprint: str = ""
    not_after: datetime.datetime | None = None
    days_left: float | None = None
    problem: str | None = None


def _read(role: str, path: Path, now: datetime.datetime) -> list[CertificateFacts]:
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        return [CertificateFacts(role=role, problem=f"{path}: cannot read: {exc}")]
    return [
        CertificateFacts(
            role=role,
            subject=subject(cert),
            fingerprint=fingerprint(cert),
            not_after=cert.not_valid_after_utc,
            days_left=days_left(cert, now),
        )
        for cert in certificates
    ]


def certificate_facts(tls: TlsConfig, now: datetime.datetime) -> list[CertificateFacts]:
    """The server certificate (the chain's leaf) and every CA of the client CA bundle."""
    server = _read("server", tls.cert_file, now)[:1]
    clients = [] if tls.client_ca_file is None else _read("client CA", tls.client_ca_file, now)
    return server + clients
