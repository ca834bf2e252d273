"""TLS for the webhook listener: the server context that asks Meta for its client certificate.

Rule: the client's *chain* is verified here, by OpenSSL, against the configured CA bundle and
nothing else; the subject CN is checked by :mod:`gateway.edge.identity`. Every file problem is a
:class:`~gateway.errors.CertificateError` naming the config key and the file, raised when the
context is built (at start-up), never at the first handshake.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509

from gateway.certificates import fingerprint, subject
from gateway.config import ClientAuth, TlsConfig
from gateway.edge.server_chain import (
    SESSION_ID_CONTEXT_BYTES,
    send_only_configured_chain,
    set_session_id_context,
)
from gateway.errors import CertificateError
from gateway.tlsfiles import (
    at,
    load,
    public_key_der,
    read_bytes,
    read_certificates,
    read_private_key,
)

__all__ = [
    "SwappableContext",
    "build_server_context",
    "certificate_expiries",
    "client_ca_subjects",
    "handshake_failure",
    "stale_crls",
]

_VERIFY_MODES: Final[Mapping[ClientAuth, ssl.VerifyMode]] = {
    "required": ssl.CERT_REQUIRED,
    # A certificate that is presented is still verified; only its absence is let through, for the
    # roll-out window before mTLS is switched on in Meta's App Dashboard.
    "optional": ssl.CERT_OPTIONAL,
    "off": ssl.CERT_NONE,
}

# The gateway speaks HTTP/1.1 only (aiohttp's server); saying so in ALPN (RFC 7301) lets a client
# that offers h2 settle on http/1.1 instead of guessing.
_ALPN_PROTOCOLS: Final = ["http/1.1"]

log = logging.getLogger(__name__)

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)

# OpenSSL's X509_V_ERR_* codes worth a reason of their own; any other is "untrusted".
_VERIFY_REASONS: Final[Mapping[int, str]] = {9: "not_yet_valid", 10: "expired", 23: "revoked"}


def build_server_context(
    tls: TlsConfig, *, source: Path | None = None, now: datetime | None = None
) -> ssl.SSLContext:
    """The listener's ``SSLContext`` for ``tls``; raises :class:`CertificateError` for any bad file.

    The files are read with ``cryptography`` first, so that each problem names the file at fault:
    OpenSSL's own errors ("PEM lib", "key values mismatch") do not say which file they mean.
    ``source``, the configuration file, starts every message, as configuration errors do.
    A server certificate that has expired (at ``now``) is refused: Meta would refuse it too.
    """
    try:
        return _build(tls, now or datetime.now(UTC))
    except CertificateError as exc:
        if source is None:
            raise
        raise CertificateError(f"{source}: {exc}") from exc


def _build(tls: TlsConfig, now: datetime) -> ssl.SSLContext:
    certificates = read_certificates(tls.cert_file, "tls.cert_file")
    expires = certificates[0].not_valid_after_utc
    if expires <= now:
        raise CertificateError(
            f"{at('tls.cert_file', tls.cert_file)}: expired on {expires:%Y-%m-%d %H:%M} UTC"
        )
    private_key = read_private_key(tls.key_file, "tls.key_file")
    if public_key_der(certificates[0]) != public_key_der(private_key):
        raise CertificateError(f"{at('tls.key_file', tls.key_file)}: does not match tls.cert_file")

    # Built by hand rather than with ssl.create_default_context(), which would load the system
    # trust store: any public CA could then vouch for a client. Before April 2026 Meta's client
    # certificate came from a DigiCert intermediate that also signs countless public server
    # certificates, so trust comes only from the configured bundle.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0 and 1.1 are deprecated (RFC 8996); Meta's webhook client speaks 1.2 and 1.3.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS compression leaks secrets through sizes (CRIME, RFC 7457 section 2.6).
    context.options |= ssl.OP_NO_COMPRESSION
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        # A client-initiated TLS 1.2 renegotiation costs the server a full handshake each time
        # and buys nothing here; TLS 1.3 has no renegotiation at all (RFC 8446).
        context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(_ALPN_PROTOCOLS)
    # A TLS 1.3 server sends its session tickets after every full handshake (OpenSSL: two by
    # default). Each costs the server about 150 us of CPU (a bare uvloop TLS server here: 770 us
    # per full handshake without tickets, 925 with one), wasted on a client that does not
    # resume (Meta does not say that it does). Nor could most tickets be used: each worker
    # process has its own ticket key, and new connections go to whichever worker accepts
    # first, so a ticket resumes only on the worker that issued it. Hence none by default;
    # tls.session_tickets = 1 suits a resuming client and one worker. TLS 1.2 tickets are
    # unaffected (OP_NO_TICKET is not set).
    context.num_tickets = tls.session_tickets
    load(
        "tls.cert_file",
        tls.cert_file,
        lambda: context.load_cert_chain(tls.cert_file, tls.key_file),
    )
    # The chain sent is tls.cert_file's, not one OpenSSL builds from the client CA bundle at
    # every handshake (gateway.edge.server_chain: about 9 % of a new connection's CPU).
    send_only_configured_chain(context)

    context.verify_mode = _VERIFY_MODES[tls.client_auth]
    if tls.client_ca_file is None:
        if tls.client_auth != "off":
            raise CertificateError(
                f"tls.client_ca_file is not set: it is needed when tls.client_auth = "
                f"{tls.client_auth!r}"
            )
    else:
        # Meta presents its leaf plus the signing intermediate; the bundle holds only the root(s)
        # (docs/graph-api/webhooks/getting-started, "mTLS"). A bundle of several roots is how a CA
        # rotation becomes an overlap window rather than an outage.
        ca_file = tls.client_ca_file
        read_certificates(ca_file, "tls.client_ca_file")
        load("tls.client_ca_file", ca_file, lambda: context.load_verify_locations(cafile=ca_file))

    if tls.crl_file is not None:
        crl_file = tls.crl_file
        _check_crl_file(crl_file)
        load("tls.crl_file", crl_file, lambda: context.load_verify_locations(cafile=crl_file))
        # Only the leaf is checked, so the file must hold the CRL of the CA that issued the
        # leaf (Meta's intermediate): without it every handshake fails with "unable to get
        # certificate CRL".
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_ca_subjects(path: Path) -> list[tuple[str, str]]:
    """``(subject, SHA-256 fingerprint)`` of every certificate in the CA bundle at ``path``.

    The subject is an RFC 4514 string, the fingerprint upper-case hex with colons, as
    ``openssl x509 -noout -fingerprint -sha256`` prints it, so an operator can compare the two.
    """
    return [
        (subject(certificate), fingerprint(certificate))
        for certificate in read_certificates(path, "tls.client_ca_file")
    ]


def certificate_expiries(tls: TlsConfig) -> tuple[float, list[tuple[str, float]]]:
    """When the server certificate expires, and ``(subject, expiry)`` of every client CA, as
    Unix times: what the metrics show, so that an alert fires well before the day."""
    server = read_certificates(tls.cert_file, "tls.cert_file")[0].not_valid_after_utc
    cas = []
    if tls.client_ca_file is not None:
        cas = [
            (subject(ca), ca.not_valid_after_utc.timestamp())
            for ca in read_certificates(tls.client_ca_file, "tls.client_ca_file")
        ]
    return server.timestamp(), cas


class SwappableContext:
    """The listening context, whose new handshakes use whichever context is current.

    A reload must not drop connections, yet new handshakes must use the renewed certificate,
    key, client CA and CRL at once. The listening context's ``sni_callback`` runs for every
    ClientHello, before the server's certificate is chosen, and hands the connection to the
    current context (the pattern of serving several certificates by SNI). Established
    connections keep the context they were made with. What OpenSSL copies into a connection
    when it is created stays the listening context's: the verify mode (``tls.client_auth``),
    the CRL check flag (``tls.crl_file`` set or not) and ``tls.session_tickets``; changing those
    takes a restart.

    No session made before a swap is resumed after it. A resumed handshake carries no client
    certificate: the server takes the session's and verifies nothing again (RFC 5246 section
    7.3, RFC 5077 section 4, RFC 8446 section 2.2). Left alone, a session made before a
    reload that took a root out of ``tls.client_ca_file`` or revoked the certificate in
    ``tls.crl_file`` would go on being resumed under the new trust for its whole lifetime
    (OpenSSL's default: two hours). And OpenSSL looks sessions up before the ``sni_callback``
    runs, in the listening context's own cache and with its ticket keys, whichever context is
    current. So each swap gives the listening and the new context one new random session ID
    context (nginx derives its own from the client CAs, for the same reason): every session
    made before it is then a cache miss and a full handshake, judged by the trust now
    configured, and sessions made after it resume as before. A connection accepted before the
    swap keeps the session ID context it was made with, as it keeps the listening context's
    verify mode: it is judged as of its accept, as the connections already open are. The cost
    is one full handshake per client after each reload, and nothing per handshake.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.listening = context
        self.current = context
        context.sni_callback = self._choose

    def swap(self, context: ssl.SSLContext) -> None:
        sid_ctx = os.urandom(SESSION_ID_CONTEXT_BYTES)
        # Both get the same value: a connection made from the listening context keeps it when
        # _choose moves it to the new one (SSL_set_SSL_CTX takes the new context's value only
        # where the connection's was its old context's), so the sessions made from here on
        # resume.
        if not (
            set_session_id_context(context, sid_ctx)
            and set_session_id_context(self.listening, sid_ctx)
        ):
            log.warning(
                "TLS sessions made before this reload can still be resumed after it, for up"
                " to their lifetime, without their client certificate being checked against"
                " the reloaded tls.client_ca_file and tls.crl_file (this Python's OpenSSL"
                " cannot be told otherwise); restart the gateway to end them"
            )
        self.current = context

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: ssl.SSLContext
    ) -> None:
        current = self.current
        if current is not self.listening:
            connection.context = current


def _check_crl_file(path: Path) -> None:
    # load_verify_locations() takes certificates as readily as CRLs: a CA bundle given as
    # tls.crl_file by mistake would silently become trust anchors. Hence: CRLs and nothing else.
    data = read_bytes(path, "tls.crl_file")
    labels = _PEM_LABEL.findall(data)
    if not labels:
        raise CertificateError(f"{at('tls.crl_file', path)}: no PEM CRL found")
    others = sorted({label.decode() for label in labels if label != b"X509 CRL"})
    if others:
        raise CertificateError(
            f"{at('tls.crl_file', path)}: holds {', '.join(others)}; only X509 CRL is allowed"
        )


def stale_crls(path: Path, now: datetime) -> list[str]:
    """A warning for each CRL in ``path`` whose next update is past: revocations since then
    are unknown to the gateway until a fresh CRL is installed (RFC 5280 section 5.1.2.5). Says
    nothing of a file that cannot be read: building the TLS context reports that."""
    try:
        blocks = _PEM_CRL.findall(path.read_bytes())
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
    except (OSError, ValueError):
        return []
    warnings = []
    for crl in crls:
        due = crl.next_update_utc
        if due is not None and due < now:
            issuer = crl.issuer.rfc4514_string()
            warnings.append(
                f"{at('tls.crl_file', path)}: the CRL of {issuer} is past its next update"
                f" ({due:%Y-%m-%d %H:%M} UTC); install a fresh one from its issuer"
            )
    return warnings


def handshake_failure(exc: BaseException) -> tuple[str, str]:
    """Why a client's TLS handshake failed: a reason from a short fixed list (a metrics label)
    and a detail for the log, both from OpenSSL or the socket, never from the peer's certificate.

    ``no_certificate``, ``untrusted``, ``expired``, ``not_yet_valid``, ``revoked``: the client
    certificate; ``client_alert``: the client refused the handshake (often: it does not trust the
    server certificate); ``protocol``: no common version or cipher, not TLS at all; ``timeout``;
    ``closed``: the peer went away mid-handshake (port scans, TCP health checks).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "untrusted"), str(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        detail = str(exc.reason or exc)
        if detail == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", detail
        if "_ALERT_" in detail:  # e.g. TLSV1_ALERT_UNKNOWN_CA, SSLV3_ALERT_BAD_CERTIFICATE
            return "client_alert", detail
        return "protocol", detail
    # asyncio ends a handshake that outlives ssl_handshake_timeout with ConnectionAbortedError.
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout", type(exc).__name__
    return "closed", type(exc).__name__
