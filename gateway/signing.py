"""``X-Hub-Signature-256``: Meta's HMAC over the raw body, and the gateway's own to targets.

Rule: signatures are computed over bytes exactly as they crossed the wire. Meta signs its escaped
payload (``\\u00e4``, ``\\/``, surrogate pairs for emoji); parsing and re-serialising first breaks
the signature (whatsapp/webhooks/overview, "Validating payloads"), so nothing here sees parsed JSON.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from gateway.errors import SignatureRejected

__all__ = ["PREFIX", "AppKeys", "gateway_signature", "sign", "verify_signature"]

PREFIX = "sha256="
_HEX_LEN = 64
_HEX_DIGITS = frozenset("0123456789abcdef")


def sign(secret: str, body: bytes) -> str:
    """The header value Meta would send for ``body`` under the app secret ``secret``."""
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class AppKeys:
    """The app secrets as HMAC-SHA256 states already keyed: made once per configuration, each
    request's check copies one and hashes the body, instead of keying a new HMAC (two blocks of
    SHA-256) and looking the algorithm up in OpenSSL (``EVP_Q_mac``) every time; about a tenth
    of the check's instructions (bench/README.md, "Issue 20: the writer's wake-ups")."""

    __slots__ = ("_keyed",)

    def __init__(self, secrets: Sequence[str]) -> None:
        self._keyed = tuple(
            hmac.new(secret.encode(), digestmod=hashlib.sha256) for secret in secrets
        )

    def digests(self, body: bytes) -> list[bytes]:
        """The HMAC of ``body`` under each secret, in order."""
        found = []
        for keyed in self._keyed:
            mac = keyed.copy()
            mac.update(body)
            found.append(mac.digest())
        return found


def verify_signature(secrets: Sequence[str] | AppKeys, body: bytes, header: str | None) -> None:
    """Return ``None`` when ``header`` is a valid signature of ``body`` under one of ``secrets``
    (the secrets, or the :class:`AppKeys` made of them once).

    Raises :class:`SignatureRejected` when the header is missing, malformed or matches no secret.
    Every secret is tried in constant time, so timing does not tell which one is live (several
    are configured during a rotation or for several apps). Does *not* check freshness: Meta's
    signature carries no timestamp, so replay protection is the outbox's deduplication.
    """
    if header is None:
        raise SignatureRejected("missing X-Hub-Signature-256 header")
    if not header.startswith(PREFIX):
        raise SignatureRejected("malformed X-Hub-Signature-256 header: expected sha256=<hex>")
    # Meta sends lowercase hex; accepting uppercase costs nothing and helps hand-made requests.
    digest = header[len(PREFIX) :].strip().lower()
    if len(digest) != _HEX_LEN or not _HEX_DIGITS.issuperset(digest):
        raise SignatureRejected("malformed X-Hub-Signature-256 header: expected sha256=<hex>")
    presented = bytes.fromhex(digest)
    keys = secrets if isinstance(secrets, AppKeys) else AppKeys(secrets)
    matched = False
    for expected in keys.digests(body):
        matched |= hmac.compare_digest(expected, presented)
    if not matched:
        raise SignatureRejected("X-Hub-Signature-256 does not match the body")


def gateway_signature(secret: str, timestamp: str, body: bytes) -> str:
    """``X-Gateway-Signature-256`` for a target: HMAC(secret, timestamp + "." + body).

    The timestamp is signed with the body so a target can refuse stale replays.
    """
    message = timestamp.encode() + b"." + body
    return PREFIX + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
