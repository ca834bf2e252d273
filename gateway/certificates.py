"""Facts about an X.509 certificate, written the one way every report shows them.

Rule: the console, ``waba-gateway check`` and ``doctor`` show a certificate by these functions
alone, so an operator reads the same fingerprint and the same days left everywhere, and can
compare the fingerprint with ``openssl x509 -noout -fingerprint -sha256``. Nothing here checks a
certificate: :mod:`gateway.tlsfiles` reads them and :mod:`gateway.edge.tls` verifies them.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["days_left", "fingerprint", "subject"]

_DAY_S = 86400


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint, upper-case hex with colons, as ``openssl`` prints it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def subject(certificate: x509.Certificate) -> str:
    """The subject as an RFC 4514 string (``CN=...,O=...``)."""
    return certificate.subject.rfc4514_string()


def days_left(certificate: x509.Certificate, now: datetime.datetime) -> float:
    """Days until the certificate expires (negative once it has)."""
    return (certificate.not_valid_after_utc - now).total_seconds() / _DAY_S
