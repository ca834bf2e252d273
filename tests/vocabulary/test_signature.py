"""X-Hub-Signature-256 verification over raw bytes (gateway.signing)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.errors import SignatureRejected
from gateway.signing import gateway_signature, sign, verify_signature

SECRET = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
# Meta sends escaped unicode and "\/": these bytes, not a re-serialisation, are what is signed.
BODY = b'{"text":{"body":"Caf\\u00e9 \\ud83d\\ude2e https:\\/\\/x.example"}}'


def test_sign_matches_hmac_sha256_of_raw_bytes() -> None:
    """sign() is sha256= and the lowercase hex HMAC of the exact bytes."""
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY) == f"sha256={expected}"


@pytest.mark.parametrize(
    ("secrets", "header"),
    [
        pytest.param([SECRET], sign(SECRET, BODY), id="single-secret"),
        pytest.param([OTHER, SECRET], sign(SECRET, BODY), id="second-of-two-secrets"),
        pytest.param(
            [SECRET], sign(SECRET, BODY).upper().replace("SHA256=", "sha256="), id="upper-hex"
        ),
    ],
)
def test_accepts_valid_signature(secrets: list[str], header: str) -> None:
    """A signature under any configured secret is accepted."""
    verify_signature(secrets, BODY, header)  # returns None, raises on failure


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param(None, "missing", id="missing"),
        pytest.param("", "malformed", id="empty"),
        pytest.param("sha1=" + "0" * 40, "malformed", id="sha1-legacy"),
        pytest.param("sha256=", "malformed", id="no-digest"),
        pytest.param("sha256=" + "z" * 64, "malformed", id="not-hex"),
        pytest.param("sha256=" + "0" * 63, "malformed", id="short"),
        pytest.param(sign(OTHER, BODY), "does not match", id="other-secret"),
        pytest.param(sign(SECRET, BODY + b" "), "does not match", id="other-body"),
    ],
)
def test_rejects_missing_malformed_or_wrong_signature(header: str | None, reason: str) -> None:
    """Missing, malformed and wrong signatures raise SignatureRejected (401)."""
    with pytest.raises(SignatureRejected, match=reason) as info:
        verify_signature([SECRET], BODY, header)
    assert info.value.status == 401


def test_rejects_signature_of_reserialised_body() -> None:
    """Signing the parsed-and-dumped JSON (the classic library bug) does not verify."""
    import json

    reserialised = json.dumps(json.loads(BODY), ensure_ascii=False).encode()
    with pytest.raises(SignatureRejected):
        verify_signature([SECRET], BODY, sign(SECRET, reserialised))


def test_rejects_when_no_secret_configured() -> None:
    """With no secrets nothing verifies (config refuses this, but fail closed anyway)."""
    with pytest.raises(SignatureRejected):
        verify_signature([], BODY, sign(SECRET, BODY))


def test_gateway_signature_covers_timestamp_and_body() -> None:
    """The target signature is HMAC(secret, timestamp + '.' + body)."""
    expected = hmac.new(b"s", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert gateway_signature("s", "1700000000", BODY) == f"sha256={expected}"
    assert gateway_signature("s", "1700000001", BODY) != f"sha256={expected}"
