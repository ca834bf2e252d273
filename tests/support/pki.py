"""A throw-away PKI for the tests, made afresh each run with trustme.

Rule: the ``meta`` shape is Meta's own set-up (docs/graph-api/webhooks/getting-started, "mTLS"): the
client presents its leaf plus the signing intermediate, and the gateway trusts only the root. Every
other shape is exactly one thing wrong with that picture, so a test that refuses it proves one rule.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import META_CLIENT_CN, ClientAuth, TlsConfig

__all__ = ["ClientKind", "Pki", "make_pki", "stale_crl"]

ClientKind = Literal["meta", "leaf_only", "impostor", "wrong_cn", "expired", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pki:
    """The CAs, and the PEM files the gateway and the test clients load."""

    meta_root_ca: trustme.CA
    meta_intermediate: trustme.CA
    # What the gateway trusts: Meta's root only.
    client_ca_file: Path
    # Leaf + intermediate, as Meta presents them.
    client_chain_file: Path
    client_leaf_only_file: Path
    client_key_file: Path
    # Same CN, from a root the gateway does not trust.
    impostor_chain_file: Path
    impostor_key_file: Path
    # Meta's chain, CN evil.example.com.
    wrong_cn_chain_file: Path
    wrong_cn_key_file: Path
    # Meta's chain and CN, not_after in the past.
    expired_chain_file: Path
    expired_key_file: Path
    # The intermediate's CRLs: one revoking the Meta-like client leaf, one revoking nothing.
    client_revoked_crl_file: Path
    empty_crl_file: Path
    server_ca: trustme.CA
    server_ca_file: Path
    server_chain_file: Path
    server_key_file: Path

    def client_context(self, kind: ClientKind) -> ssl.SSLContext:
        """A client context trusting the test server, presenting ``kind``'s certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.server_ca_file)
        files: dict[ClientKind, tuple[Path, Path]] = {
            "meta": (self.client_chain_file, self.client_key_file),
            "leaf_only": (self.client_leaf_only_file, self.client_key_file),
            "impostor": (self.impostor_chain_file, self.impostor_key_file),
            "wrong_cn": (self.wrong_cn_chain_file, self.wrong_cn_key_file),
            "expired": (self.expired_chain_file, self.expired_key_file),
        }
        if kind != "none":
            chain_file, key_file = files[kind]
            context.load_cert_chain(chain_file, key_file)
        return context

    def tls_config(
        self,
        client_auth: ClientAuth = "required",
        client_cn: Sequence[str] | None = None,
        crl_file: Path | None = None,
    ) -> TlsConfig:
        """The gateway's TLS settings: the test server certificate, Meta's root as client CA."""
        return TlsConfig(
            cert_file=self.server_chain_file,
            key_file=self.server_key_file,
            client_ca_file=self.client_ca_file,
            client_auth=client_auth,
            client_cn=(META_CLIENT_CN,) if client_cn is None else tuple(client_cn),
            crl_file=crl_file,
        )


def make_pki(directory: Path) -> Pki:
    """Issue every CA and certificate, and write the PEM files into ``directory``."""
    meta_root = trustme.CA()
    meta_intermediate = meta_root.create_child_ca()
    client = _meta_client(meta_intermediate)
    impostor = _meta_client(trustme.CA().create_child_ca())
    wrong_cn = meta_intermediate.issue_cert("evil.example.com", common_name="evil.example.com")
    now = datetime.now(UTC)
    expired = _meta_client(
        meta_intermediate, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    server_ca = trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")

    def write(name: str, pem: bytes) -> Path:
        path = directory / name
        path.write_bytes(pem)
        return path

    return Pki(
        meta_root_ca=meta_root,
        meta_intermediate=meta_intermediate,
        client_ca_file=write("meta-root.pem", meta_root.cert_pem.bytes()),
        client_chain_file=write("client-chain.pem", _chain(client)),
        client_leaf_only_file=write("client-leaf.pem", client.cert_chain_pems[0].bytes()),
        client_key_file=write("client.key", client.private_key_pem.bytes()),
        impostor_chain_file=write("impostor-chain.pem", _chain(impostor)),
        impostor_key_file=write("impostor.key", impostor.private_key_pem.bytes()),
        wrong_cn_chain_file=write("wrong-cn-chain.pem", _chain(wrong_cn)),
        wrong_cn_key_file=write("wrong-cn.key", wrong_cn.private_key_pem.bytes()),
        expired_chain_file=write("expired-chain.pem", _chain(expired)),
        expired_key_file=write("expired.key", expired.private_key_pem.bytes()),
        client_revoked_crl_file=write(
            "intermediate-revokes-client.crl.pem", _crl(meta_intermediate, revoked=[client])
        ),
        empty_crl_file=write("intermediate-empty.crl.pem", _crl(meta_intermediate, revoked=[])),
        server_ca=server_ca,
        server_ca_file=write("server-ca.pem", server_ca.cert_pem.bytes()),
        server_chain_file=write("server-chain.pem", _chain(server)),
        server_key_file=write("server.key", server.private_key_pem.bytes()),
    )


def _meta_client(
    issuer: trustme.CA,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> trustme.LeafCert:
    return issuer.issue_cert(
        META_CLIENT_CN, common_name=META_CLIENT_CN, not_before=not_before, not_after=not_after
    )


def _chain(leaf: trustme.LeafCert) -> bytes:
    # trustme puts the leaf first, then every CA up to (not including) the root: for a leaf from
    # a child CA that is leaf + intermediate, exactly what Meta sends.
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def stale_crl(issuer: trustme.CA) -> bytes:
    """A CRL of ``issuer`` revoking nothing, whose next update was due yesterday."""
    return _crl(issuer, revoked=[], age=timedelta(days=2))


def _crl(
    issuer: trustme.CA,
    *,
    revoked: Sequence[trustme.LeafCert],
    age: timedelta = timedelta(hours=1),
) -> bytes:
    issuer_certificate = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), password=None)
    # trustme's default key type; sign() needs to know it is an issuer key.
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_certificate.subject)
        .last_update(now - age)
        .next_update(now - age + timedelta(days=1))
    )
    for leaf in revoked:
        certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(now - timedelta(hours=1))
            .build()
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
