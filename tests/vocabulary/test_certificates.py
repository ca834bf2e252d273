"""A certificate's facts as every report shows them (gateway.certificates)."""

from __future__ import annotations

import datetime
import hashlib

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.certificates import days_left, fingerprint, subject


def _certificate() -> x509.Certificate:
    return x509.load_pem_x509_certificate(trustme.CA(organization_name="Facts").cert_pem.bytes())


def test_fingerprint_is_the_sha256_of_the_der_in_upper_case_hex_with_colons() -> None:
    """The text ``openssl x509 -noout -fingerprint -sha256`` prints, byte for byte."""
    certificate = _certificate()
    digest = hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest().upper()
    expected = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    assert fingerprint(certificate) == expected


def test_subject_is_the_rfc4514_string() -> None:
    """The subject reads as RFC 4514 text, the organisation named."""
    assert "O=Facts" in subject(_certificate())


def test_days_left_count_down_to_expiry_and_below_zero_after() -> None:
    """Days left are fractional, zero at the expiry instant and negative after it."""
    certificate = _certificate()
    expiry = certificate.not_valid_after_utc
    assert days_left(certificate, expiry) == 0
    assert days_left(certificate, expiry - datetime.timedelta(hours=36)) == 1.5
    assert days_left(certificate, expiry + datetime.timedelta(days=2)) == -2
