"""Callbacks for the onboarding command tests (``verify-callback``, ``send``).

Rule: the commands are tried against the real gateway (:func:`running_gateway`) over mTLS, and
against small plain aiohttp servers (:func:`serving`) only for what the gateway never does: a
wrong answer body, a bad server certificate chain, an expired certificate.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from helpers import APP_SECRET, VERIFY_TOKEN, gateway_config, stored_bodies
from loopback_ports import free_port

from gateway.config import Config
from gateway.runtime.gateway import Gateway
from gateway.runtime.ports import bound_port

__all__ = [
    "APP_SECRET",
    "CA_ISSUERS_URL",
    "VERIFY_TOKEN",
    "gateway_config",
    "leaf_with_ca_issuers",
    "refused_url",
    "running_gateway",
    "server_context",
    "serving",
    "stored_bodies",
]

CA_ISSUERS_URL = "http://ca.example.test/intermediate.der"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[tuple[Gateway, str]]:
    """The real gateway and its callback URL."""
    async with Gateway(config) as gateway:
        listen = config.listen
        yield gateway, f"https://{listen.host}:{gateway.port}{listen.path}"


def server_context(tmp_path: Path, chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context presenting exactly ``chain_pem`` (no client certificate asked)."""
    chain_file, key_file = tmp_path / "server-chain.pem", tmp_path / "server.key"
    chain_file.write_bytes(chain_pem)
    key_file.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain_file, key_file)
    return context


@asynccontextmanager
async def serving(
    handler: Handler, context: ssl.SSLContext | None, host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """A plain aiohttp server answering ``/webhook`` with ``handler``; yields its URL."""
    app = web.Application()
    app.router.add_route("*", "/webhook", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=context)
        await site.start()
        scheme = "http" if context is None else "https"
        yield f"{scheme}://{host}:{bound_port(runner)}/webhook"
    finally:
        await runner.cleanup()


def refused_url() -> str:
    """An https:// URL on a loopback port nothing listens on."""
    return f"https://127.0.0.1:{free_port()}/webhook"


def leaf_with_ca_issuers(issuer: trustme.CA) -> tuple[bytes, bytes]:
    """A server certificate for localhost and 127.0.0.1 that, like every publicly trusted one,
    says where its issuer is published (Authority Information Access); PEM certificate and key.
    trustme cannot add that extension, so this one is built with ``cryptography``."""
    issuer_certificate = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), password=None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)  # trustme's default key type
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_issuers = x509.AccessDescription(
        AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(CA_ISSUERS_URL)
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(issuer_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(x509.AuthorityInformationAccess([ca_issuers]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
