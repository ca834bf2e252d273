"""The client side of Meta's webhook calls, for the onboarding commands that imitate it.

Rule: a failed connection is explained in the words of what Meta would see, and the explanation
is decided by pure functions (:func:`classify_tls_error`, :func:`explain_unknown_issuer`,
:func:`describe_failure`); the only I/O here is :func:`presented_chain`, a second handshake that
looks at the certificates a server sends when OpenSSL could not find their issuer.

Meta's own server checks: the callback's certificate must be publicly trusted and correctly
chained; self-signed certificates are not supported (graph-api/webhooks/getting-started).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from OpenSSL import SSL

from gateway.errors import CertificateError

__all__ = [
    "UNKNOWN_ISSUER_CODES",
    "classify_tls_error",
    "client_context",
    "describe_failure",
    "diagnose",
    "explain_unknown_issuer",
    "presented_chain",
]

# OpenSSL's X509_V_ERR_* codes that mean "the issuer of a certificate could not be found": the
# server sent too little of its chain, or the chain leads to a CA nobody trusts.
UNKNOWN_ISSUER_CODES = frozenset({2, 20, 21})
_PUBLIC = "Meta requires a certificate from a publicly trusted CA"
_READ_SIZE = 64 * 1024


def client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """A client context like Meta's: the system trust store (``ca_file`` replaces it), hostname
    checking, and with ``cert_file``/``key_file`` a client certificate (leaf + intermediate)."""
    if (cert_file is None) != (key_file is None):
        raise CertificateError("--cert and --key go together: pass both or neither")
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"--ca-file {ca_file}: cannot load CA certificates: {exc}") from exc
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"--cert {cert_file} --key {key_file}: cannot load the client certificate: {exc}"
            ) from exc
    return context


def _verification_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error behind ``exc`` (aiohttp wraps it), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        inner = getattr(seen, "certificate_error", None)  # aiohttp.ClientConnectorCertificateError
        if isinstance(inner, ssl.SSLError):
            return inner
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def classify_tls_error(exc: BaseException) -> str:
    """A plain-words reason for a failed TLS handshake, starting with a short label.

    Decides by OpenSSL's verify code only. For an unknown issuer (codes 2, 20, 21) it cannot tell
    an incomplete chain from an untrusted CA: :func:`explain_unknown_issuer` can, given the
    certificates the server sent.
    """
    error = _verification_error(exc)
    if isinstance(error, ssl.SSLCertVerificationError):
        code, text = error.verify_code, error.verify_message
        if code == 10:
            return "expired server certificate: the certificate has expired; renew it"
        if code == 9:
            return "server certificate not yet valid: check the server's clock and the certificate"
        if code == 18:
            return f"untrusted server certificate: it is self-signed; {_PUBLIC}"
        if code == 19:
            return (
                "untrusted server certificate: the chain ends in a self-signed root that is not "
                f"trusted; {_PUBLIC}"
            )
        if code in UNKNOWN_ISSUER_CODES:
            return (
                "untrusted server certificate or incomplete chain: the certificate's issuer is "
                "not trusted; the server may not send its intermediate certificate, or the "
                "certificate is not from a publicly trusted CA"
            )
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return f"hostname mismatch: {text.rstrip('.')}"
        if code == 23:
            return "revoked server certificate: its CA has revoked it"
        return f"server certificate refused: {text} (OpenSSL verify code {code})"
    if error is not None:
        reason = error.reason or str(error)
        if "CERTIFICATE_REQUIRED" in reason.upper():
            return "client certificate required: the server wants one; pass --cert and --key"
        return f"TLS handshake failed: {reason}"
    return f"TLS failed: {exc}"


def _name(certificate: x509.Certificate, *, issuer: bool = False) -> str:
    name = certificate.issuer if issuer else certificate.subject
    common_names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common_names[0].value) if common_names else name.rfc4514_string()


def _ca_issuers_url(certificate: x509.Certificate) -> str | None:
    """Where the issuer of ``certificate`` is published (Authority Information Access)."""
    try:
        access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return None
    for description in access.value:
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS:
            return str(description.access_location.value)
    return None


def explain_unknown_issuer(chain: Sequence[x509.Certificate]) -> str | None:
    """Tell an incomplete chain from an untrusted CA, given the certificates the server sent.

    The last certificate sent names its issuer. When it also says where that issuer is published
    (Authority Information Access "CA Issuers", as publicly trusted certificates do), the issuer
    is an intermediate the server should have sent: an incomplete chain. Otherwise the chain leads
    to a CA that is not trusted. Does *not* fetch the issuer to prove it; ``None`` for no chain.
    """
    if not chain:
        return None
    last = chain[-1]
    issuer = _name(last, issuer=True)
    url = _ca_issuers_url(last)
    if url is not None:
        sent = "only its own certificate" if len(chain) == 1 else f"{len(chain)} certificates"
        return (
            f"incomplete chain: the server sends {sent} and not the intermediate "
            f"'{issuer}' (published at {url}); configure it to send the full chain "
            "(its certificate followed by the intermediates, e.g. fullchain.pem)"
        )
    return f"untrusted server certificate: issued by '{issuer}', which is not trusted; {_PUBLIC}"


async def presented_chain(host: str, port: int, *, timeout_s: float) -> list[x509.Certificate]:
    """The certificates the server at ``host:port`` sends, read without verifying them.

    The standard library only shows the leaf before Python 3.13, so this handshake is pyOpenSSL's,
    through memory buffers over an asyncio connection. No client certificate is presented: a
    server that insists still sends its own certificates before it refuses.
    """
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    if not _is_ip(host):
        connection.set_tlsext_host_name(host.encode("idna"))  # SNI, as aiohttp sends it
    connection.set_connect_state()
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                try:
                    connection.do_handshake()
                    break
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    break  # refused after the server's certificates: they are already here
                with suppress(SSL.WantReadError):
                    writer.write(connection.bio_read(_READ_SIZE))
                await writer.drain()
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                connection.bio_write(data)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
    return connection.get_peer_cert_chain(as_cryptography=True) or []


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_failure(
    exc: BaseException, timeout_s: float, *, sent_certificate: bool = True
) -> tuple[str, str]:
    """``(kind, sentence)`` for a request that got no answer: kind is ``tls``, ``refused``,
    ``timeout``, ``closed`` (the server hung up after the connection was made) or ``connection``,
    the sentence a plain-words reason. ``sent_certificate``: whether a client certificate was
    presented (a server that requires one may just hang up)."""
    if isinstance(exc, TimeoutError):
        return "timeout", f"timeout: no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientSSLError) or _verification_error(exc) is not None:
        return "tls", classify_tls_error(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "refused", f"connection refused: nothing listens on {exc.host}:{exc.port}"
        if isinstance(exc.os_error, socket.gaierror):
            return "connection", f"cannot resolve {exc.host}: {exc.os_error.strerror}"
        return "connection", f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}"
    hung_up = isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    if hung_up or isinstance(exc, aiohttp.ServerDisconnectedError):
        message = "the server closed the connection without answering"
        if not sent_certificate:
            # What a server requiring a client certificate does when it gets none (TLS 1.3).
            message += "; if it requires a client certificate, pass --cert and --key"
        return "closed", message
    if isinstance(exc, UnicodeError):
        # The resolver IDNA-encodes the host name first, and an empty label or one over 63
        # characters cannot be encoded (RFC 1035 section 2.3.4).
        return "connection", f"cannot resolve the host name: {exc.__cause__ or exc}"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.ClientResponseError | ValueError):
        # Their text may hold the URL, and a handshake URL holds the verify token.
        return "connection", f"request failed: {exc.__class__.__name__}"
    return "connection", f"request failed: {exc}"


async def diagnose(
    exc: BaseException, host: str, port: int, timeout_s: float, *, sent_certificate: bool
) -> tuple[str, str]:
    """:func:`describe_failure`, refined for an unknown issuer by looking at the chain sent."""
    kind, message = describe_failure(exc, timeout_s, sent_certificate=sent_certificate)
    error = _verification_error(exc)
    if (
        isinstance(error, ssl.SSLCertVerificationError)
        and error.verify_code in UNKNOWN_ISSUER_CODES
    ):
        try:
            chain = await presented_chain(host, port, timeout_s=timeout_s)
        except (OSError, TimeoutError, ValueError):
            chain = []
        message = explain_unknown_issuer(chain) or message
    return kind, message
