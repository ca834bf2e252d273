"""The PEM files a TLS context is built from, read and checked before OpenSSL sees them.

Rule: every problem with a certificate, key or CA file is a
:class:`~gateway.errors.CertificateError` that names the configuration key and the file, because
OpenSSL's own errors ("PEM lib", "key values mismatch") say neither. The listener's context
(:mod:`gateway.edge.tls`) and the targets' (:mod:`gateway.delivery.target_tls`) both read their
files here. Nothing here checks expiry or trust: building a context does that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from gateway.errors import CertificateError

__all__ = [
    "at",
    "check_ca_bundle",
    "check_key_pair",
    "load",
    "public_key_der",
    "read_bytes",
    "read_certificates",
    "read_private_key",
]


def at(key: str, path: Path) -> str:
    """How a message names a file: by its configuration key and its path."""
    return f"{key} = {str(path)!r}"


def read_bytes(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{at(key, path)}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the path: no file can be named so
        raise CertificateError(f"{at(key, path)}: cannot read: {exc}") from exc


def read_certificates(path: Path, key: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file at ``path`` (configuration key ``key``), at least one."""
    data = read_bytes(path, key)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(f"{at(key, path)}: no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{at(key, path)}: holds a malformed PEM certificate") from exc


def read_private_key(path: Path, key: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key in the file at ``path``."""
    data = read_bytes(path, key)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        # The gateway starts unattended, so there is nobody to type a passphrase.
        raise CertificateError(
            f"{at(key, path)}: the key is encrypted; give an unencrypted key and protect the "
            "file with its permissions"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{at(key, path)}: no usable PEM private key found") from exc


def public_key_der(source: x509.Certificate | PrivateKeyTypes) -> bytes:
    """The public key of a certificate or a private key, to compare the two."""
    return source.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_ca_bundle(path: Path, key: str) -> None:
    """The CA bundle at ``path`` (configuration key ``key``) is readable and holds PEM
    certificates; raises :class:`CertificateError` naming the key and the file."""
    read_certificates(path, key)


def check_key_pair(cert_file: Path, cert_key: str, key_file: Path, key_key: str) -> None:
    """The certificate and the unencrypted private key are readable and belong together;
    raises :class:`CertificateError` naming the key and the file at fault."""
    certificate = read_certificates(cert_file, cert_key)[0]
    private_key = read_private_key(key_file, key_key)
    if public_key_der(certificate) != public_key_der(private_key):
        raise CertificateError(f"{at(key_key, key_file)}: does not match {cert_key}")


def load(key: str, path: Path, load_file: Callable[[], None]) -> None:
    """Run ``load_file`` (an ``SSLContext`` method reading ``path``); OpenSSL's refusal becomes
    a :class:`CertificateError` naming the key and the file."""
    try:
        load_file()
    except OSError as exc:  # ssl.SSLError is an OSError
        raise CertificateError(f"{at(key, path)}: OpenSSL refused it: {exc}") from exc
