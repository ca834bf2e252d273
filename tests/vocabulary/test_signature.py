"""X-Hub-Signature-256 verification over raw bytes (gateway.signing)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from gateway.errors import SignatureRejected
from gateway.signing import AppKeys, gateway_signature, sign, verify_signature

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
@pytest.mark.parametrize("keyed", [False, True], ids=["secrets", "keyed once"])
def test_accepts_valid_signature(secrets: list[str], header: str, keyed: bool) -> None:
    """A signature under any configured secret is accepted, from the secrets or their AppKeys."""
    verify_signature(AppKeys(secrets) if keyed else secrets, BODY, header)


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
@pytest.mark.parametrize("keyed", [False, True], ids=["secrets", "keyed once"])
def test_rejects_missing_malformed_or_wrong_signature(
    header: str | None, reason: str, keyed: bool
) -> None:
    """Missing, malformed and wrong signatures raise SignatureRejected (401), from the secrets or
    their AppKeys."""
    with pytest.raises(SignatureRejected, match=reason) as info:
        verify_signature(AppKeys([SECRET]) if keyed else [SECRET], BODY, header)
    assert info.value.status == 401


def test_keys_made_once_give_each_bodys_own_hmac_however_often_used() -> None:
    """AppKeys hashes each body from its secret's keyed state, which no check consumes: the
    same keys used for body after body give each one the HMAC a fresh key gives it."""
    keys = AppKeys([OTHER, SECRET])
    for body in (BODY, b"", BODY + b" ", b"x" * 100_000, BODY):
        expected = [hmac.digest(key.encode(), body, "sha256") for key in (OTHER, SECRET)]
        assert keys.digests(body) == expected
        verify_signature(keys, body, sign(SECRET, body))


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
    with pytest.raises(SignatureRejected):
        verify_signature(AppKeys([]), BODY, sign(SECRET, BODY))


def test_gateway_signature_covers_timestamp_and_body() -> None:
    """The target signature is HMAC(secret, timestamp + '.' + body)."""
    expected = hmac.new(b"s", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert gateway_signature("s", "1700000000", BODY) == f"sha256={expected}"
    assert gateway_signature("s", "1700000001", BODY) != f"sha256={expected}"
