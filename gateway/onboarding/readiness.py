"""Readiness judgments behind ``waba-gateway doctor``: certificates and settings in, findings out.

Rule: nothing here reads a file, opens a socket or looks at the clock. Each judge takes values
(certificates, settings, an HTTP answer, ``now``) and returns :class:`Finding` objects; a problem
it is judging is a finding, never an exception. :mod:`gateway.onboarding.doctor` gathers the inputs.

A client CA is Meta's only by its SHA-256 fingerprint (:class:`KnownCa`): the DigiCert chain
Meta documented until April 15, 2026 ships here, and Meta's current CA, which Meta offers only as
a download, is recognised by the fingerprints in ``tls.meta_ca_sha256``. An organisation that
names Meta proves nothing (the dev stand-in CA's does): such a CA is reported as not Meta's.

Not checked here: revocation of the server certificate, Certificate Transparency, key sizes and
signature algorithms.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from gateway.certificates import days_left
from gateway.certificates import fingerprint as certificate_fingerprint
from gateway.config import META_CLIENT_CN, ClientAuth, TlsConfig
from gateway.onboarding.check import EXPIRY_WARNING_DAYS
from gateway.onboarding.verify_callback import Verdict

__all__ = [
    "META_CA_FILE",
    "SHIPPED_CAS",
    "Finding",
    "KnownCa",
    "fingerprint",
    "judge_ca_bundle",
    "judge_handshake",
    "judge_server_chain",
    "judge_tls_settings",
    "judge_trust",
    "known_cas",
]

Level = Literal["OK", "WARN", "FAIL"]

# The file Meta's "mTLS for Webhooks" page offers (docs/graph-api/webhooks/getting-started).
META_CA_FILE = "meta-outbound-api-ca-2025-12.pem"
_META_ORGANIZATION = re.compile(r"\bMeta\b")
_RETIRED = "Meta's DigiCert-signed certificate expired on April 15, 2026"


@dataclass(frozen=True, slots=True)
class KnownCa:
    """A CA Meta documents for its webhook client certificate: its name, its SHA-256
    fingerprint as ``openssl x509 -fingerprint -sha256`` prints it, and ``retired``: why
    Meta's certificate no longer chains to it (``None``: current)."""

    name: str
    sha256: str
    retired: str | None = None


# The chain Meta's client certificate came from until it expired on April 15, 2026
# (docs/graph-api/webhooks/getting-started, "mTLS for Webhooks"). The root's fingerprint is the
# one of Debian's ca-certificates (tests/onboarding/test_doctor.py compares them); the
# intermediate's is DigiCert's published one.
SHIPPED_CAS: tuple[KnownCa, ...] = (
    KnownCa(
        "DigiCert High Assurance EV Root CA",
        "74:31:E5:F4:C3:C1:CE:46:90:77:4F:0B:61:E0:54:40:88:3B:A9:A0:1E:D0:0B:A6:AB:D7:80:6E:D3:B1:18:CF",
        retired=_RETIRED,
    ),
    KnownCa(
        "DigiCert SHA2 High Assurance Server CA",
        "19:40:0B:E5:B7:A3:1F:B7:33:91:77:00:78:9D:2F:0A:24:71:C0:C9:D5:06:C0:E5:04:C0:6C:16:D7:CB:17:C0",
        retired=_RETIRED,
    ),
)


def fingerprint(text_or_cert: str | x509.Certificate) -> str:
    """A SHA-256 fingerprint in one form (upper case, colons between bytes), from a
    certificate or from text with or without colons."""
    if isinstance(text_or_cert, x509.Certificate):
        return certificate_fingerprint(text_or_cert)
    digits = text_or_cert.replace(":", "").upper()
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def known_cas(meta_ca_sha256: Sequence[str]) -> tuple[KnownCa, ...]:
    """The shipped CAs, and Meta's current CA by each fingerprint of ``tls.meta_ca_sha256``."""
    configured = (
        KnownCa(f"tls.meta_ca_sha256[{index}]", fingerprint(each))
        for index, each in enumerate(meta_ca_sha256)
    )
    return (*SHIPPED_CAS, *configured)


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: a level, what was found and, unless all is well, what to do."""

    level: Level
    what: str
    todo: str = ""

    def line(self) -> str:
        text = f"{self.level:<4} {self.what}"
        return f"{text}: {self.todo}" if self.todo else text


def judge_server_chain(
    certs: Sequence[x509.Certificate], hostname: str | None, now: datetime
) -> list[Finding]:
    """The server chain in ``tls.cert_file``: self-signed, complete and in order, expiry, and
    (when ``hostname`` is given) whether the leaf's subjectAltName covers it.

    Meta's servers refuse self-signed and incompletely chained certificates (getting-started,
    "mTLS for Webhooks"). Whether the chain reaches a *trusted* root is :func:`judge_trust`'s.
    """
    if not certs:
        return [Finding("FAIL", "tls.cert_file holds no certificate", "put the chain in it")]
    findings = [_shape(certs)]
    findings.extend(_expiry(certs, now))
    if hostname is not None:
        findings.append(_hostname(certs[0], hostname))
    return findings


def judge_trust(error: str | None, ca_file: str | None) -> Finding:
    """The outcome of verifying the server chain: ``error`` is ``None`` when it verified, against
    ``ca_file`` or, when that is ``None``, the system trust store."""
    if ca_file is not None:
        if error is None:
            return Finding("OK", f"server chain verifies against --ca-file {ca_file}")
        return Finding(
            "WARN",
            f"server chain does not verify against --ca-file {ca_file} ({error})",
            "give the CA that issued tls.cert_file",
        )
    if error is None:
        return Finding("OK", "server chain is publicly trusted (verifies against the system store)")
    return Finding(
        "WARN",
        f"server certificate not publicly trusted ({error})",
        "fine for tests, Meta will refuse it: use a certificate from a public CA",
    )


def judge_ca_bundle(
    certs: Sequence[x509.Certificate],
    now: datetime,
    known: Sequence[KnownCa] = SHIPPED_CAS,
) -> list[Finding]:
    """The client CA bundle: each CA with its SHA-256 fingerprint, and which CA of ``known``
    (by fingerprint, see the module docstring) can admit Meta's current certificate, or only
    the expired DigiCert chain."""
    if not certs:
        return [
            Finding("FAIL", "tls.client_ca_file holds no certificate", f"install {META_CA_FILE}")
        ]
    by_fingerprint = {fingerprint(ca.sha256): ca for ca in known}
    findings: list[Finding] = []
    current: list[tuple[x509.Certificate, KnownCa]] = []
    retired: list[tuple[x509.Certificate, KnownCa]] = []
    for cert in certs:
        # Formatted as `openssl x509 -noout -fingerprint -sha256` and `waba-gateway check` print it.
        sha256 = fingerprint(cert)
        named = f"client CA {cert.subject.rfc4514_string()} sha256 {sha256}"
        if cert.not_valid_after_utc < now:
            expired = f"{named} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            findings.append(Finding("WARN", expired, "nothing chains to it: remove it"))
        else:
            findings.append(Finding("OK", named))
        ca = by_fingerprint.get(sha256)
        if ca is not None:
            (current if ca.retired is None else retired).append((cert, ca))
    # An expired CA admits no certificate: Meta's is present only if one of them is in date.
    in_date = [(cert, ca) for cert, ca in current if cert.not_valid_after_utc >= now]
    if current and not in_date:
        cert, ca = current[0]
        findings.append(
            Finding(
                "FAIL",
                f"Meta's CA {cert.subject.rfc4514_string()} (its sha256 is {ca.name}) expired on"
                f" {cert.not_valid_after_utc:%Y-%m-%d}: it admits no client certificate",
                'install the CA Meta\'s "mTLS for Webhooks" page gives now, and its sha256 in'
                " tls.meta_ca_sha256",
            )
        )
        return findings
    if in_date:
        cert, ca = in_date[0]
        found = f"Meta's CA present: {cert.subject.rfc4514_string()} (its sha256 is {ca.name})"
        findings.append(Finding("OK", found))
        if retired:
            findings.append(
                Finding(
                    "WARN",
                    f"the DigiCert chain is still trusted ({retired[0][1].name})",
                    f"{_RETIRED}: remove it from the bundle",
                )
            )
        return findings
    if retired and len(retired) == len(certs):
        names = ", ".join(ca.name for _, ca in retired)
        findings.append(
            Finding(
                "FAIL",
                f"only the DigiCert chain ({names}), which expired on April 15, 2026",
                f"install {META_CA_FILE}",
            )
        )
        return findings
    claimed = [cert for cert in certs if _names_meta(cert)]
    for cert in claimed:
        findings.append(
            Finding(
                "WARN",
                f"client CA {cert.subject.rfc4514_string()} names Meta, but its sha256 is not"
                " one of Meta's (tls.meta_ca_sha256)",
                'compare it with the fingerprint on Meta\'s "mTLS for Webhooks" page and, if it'
                " is Meta's, add it to tls.meta_ca_sha256 (a stand-in CA never is)",
            )
        )
    if not claimed:
        findings.append(
            Finding(
                "WARN",
                "no Meta CA recognised (a test or private CA?)",
                f"for Meta's webhooks install {META_CA_FILE} and set tls.meta_ca_sha256",
            )
        )
    return findings


def judge_tls_settings(tls: TlsConfig) -> list[Finding]:
    """``client_auth`` and what it means for the rollout, and whether ``client_cn`` admits Meta."""
    mode = f"client_auth = {tls.client_auth}"
    findings = [
        {
            "required": Finding("OK", f"{mode}: only clients with an accepted certificate get in"),
            "optional": Finding(
                "WARN",
                f"{mode}: certificate optional",
                "switch to required once Meta presents its certificate",
            ),
            "off": Finding(
                "WARN",
                f"{mode}: no client certificate is asked for",
                "set optional, save the callback, switch on mTLS in the App Dashboard, then "
                "required",
            ),
        }[tls.client_auth]
    ]
    if META_CLIENT_CN in tls.client_cn:
        findings.append(Finding("OK", f"client_cn accepts {META_CLIENT_CN}"))
    else:
        findings.append(
            Finding(
                "WARN",
                f"client_cn does not list {META_CLIENT_CN}",
                "Meta's requests will get 403: add it to tls.client_cn",
            )
        )
    return findings


def judge_handshake(url: str, verdict: Verdict, client_auth: ClientAuth) -> Finding:
    """Meta's GET handshake through ``url``, as :func:`gateway.onboarding.verify_callback.judge` (or
    its TLS diagnosis) saw it: OK only when the exact challenge came back.

    A TLS failure is a WARN: its causes (an untrusted, expired or mismatched certificate) have
    their own lines above, and a listener that requires a client certificate refuses doctor,
    which has none of Meta's. Only the two ways such a listener refuses are excused: the TLS
    alert, or (TLS 1.3, where the client's certificate is checked after the handshake) a hang-up
    once connected. Nothing listening, no answer in time or a name that does not resolve mean
    no gateway answers there, whatever ``client_auth`` says.
    """
    if verdict.accepted:
        return Finding("OK", f"handshake through {url}: {verdict.message}")
    hung_up = verdict.kind == "closed" and client_auth == "required"
    if verdict.message.startswith("client certificate required") or hung_up:
        return Finding(
            "WARN",
            f"handshake not checked: {url} wants a client certificate, and doctor has none",
            "expected with client_auth = required; use optional while the callback is saved",
        )
    if verdict.kind == "tls":
        return Finding(
            "WARN",
            f"handshake not checked: {verdict.message}",
            "the check needs a trusted certificate; for a private CA pass --ca-file",
        )
    todo = {
        "token_refused": "the running gateway lacks this config's first meta.verify_tokens entry: "
        "restart it with this config",
        **dict.fromkeys(
            ("refused", "timeout", "closed", "connection"),
            "is the gateway running, and does this address reach it?",
        ),
    }.get(verdict.kind, "Meta would not verify this callback")
    return Finding("FAIL", f"handshake through {url}: {verdict.message}", todo)


def _shape(certs: Sequence[x509.Certificate]) -> Finding:
    """Self-signed, a lone leaf, out of order, or leaf and issuers in turn."""
    leaf = certs[0]
    subject = leaf.subject.rfc4514_string()
    if len(certs) == 1 and _issued_by(leaf, leaf):
        return Finding(
            "FAIL",
            f"server certificate {subject} is self-signed",
            "Meta refuses self-signed certificates: get one from a public CA",
        )
    if len(certs) == 1:
        return Finding(
            "WARN",
            f"tls.cert_file holds only the leaf {subject}, no intermediate",
            "append the issuer's intermediate certificate(s), leaf first (fullchain.pem, not "
            "cert.pem): Meta refuses incomplete chains",
        )
    for position, (cert, issuer) in enumerate(itertools.pairwise(certs), start=1):
        if not _issued_by(cert, issuer):
            return Finding(
                "FAIL",
                f"server chain breaks: certificate {position} ({cert.subject.rfc4514_string()}) "
                "is not issued by the next one",
                "order tls.cert_file leaf first, then each issuer in turn",
            )
    return Finding("OK", f"server chain complete: {subject} and {len(certs) - 1} CA certificate(s)")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _expiry(certs: Sequence[x509.Certificate], now: datetime) -> list[Finding]:
    findings: list[Finding] = []
    for position, cert in enumerate(certs):
        name = "server certificate" if position == 0 else "chain certificate"
        shown = f"{name} {cert.subject.rfc4514_string()}"
        left = days_left(cert, now)
        until = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        if cert.not_valid_before_utc > now:
            since = f"{cert.not_valid_before_utc:%Y-%m-%d}"
            findings.append(
                Finding("FAIL", f"{shown} is not valid before {since}", "check the clock")
            )
        elif left < 0:
            findings.append(Finding("FAIL", f"{shown} expired on {until}", "renew it and restart"))
        elif left < EXPIRY_WARNING_DAYS:
            expiring = f"{shown} expires in {int(left)} days ({until})"
            findings.append(Finding("WARN", expiring, "renew it before then"))
        elif position == 0:
            findings.append(Finding("OK", f"{name} valid for {int(left)} more days ({until})"))
    return findings


def _hostname(leaf: x509.Certificate, hostname: str) -> Finding:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: list[str] = []
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    else:
        dns = names.get_values_for_type(x509.DNSName)
        ips = [
            ip
            for ip in names.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ]
    if _covers(dns, ips, hostname):
        return Finding("OK", f"the server certificate covers {hostname}")
    listed = ", ".join([*dns, *map(str, ips)]) or "no subjectAltName"
    return Finding(
        "FAIL",
        f"the server certificate does not cover {hostname} (it names {listed})",
        "get a certificate whose subjectAltName lists the callback's host",
    )


def _covers(
    dns: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    hostname: str,
) -> bool:
    # Clients match the subjectAltName only, never the subject CN (RFC 6125 section 6.4.4;
    # the CA/Browser Forum requires the SAN). A wildcard stands for exactly one leftmost label.
    try:
        return ipaddress.ip_address(hostname) in ips
    except ValueError:
        pass
    host = hostname.lower().rstrip(".")
    label, _, rest = host.partition(".")
    for pattern in (name.lower().rstrip(".") for name in dns):
        if pattern == host or (pattern.startswith("*.") and label and rest == pattern[2:]):
            return True
    return False


def _names_meta(cert: x509.Certificate) -> bool:
    organizations = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(_META_ORGANIZATION.search(str(name.value)) for name in organizations)
