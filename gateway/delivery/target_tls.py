"""TLS towards HTTPS targets: the system's trust store, or a target's own CA and certificate.

Rule: a target's ``ca_file`` replaces the system's trust store for that target alone (a private
CA: trusting it for every target would let it vouch for public names too), and ``cert_file`` with
``key_file`` is the client certificate a target asks for (internal mTLS). Every file is read and
checked when the contexts are built, at start, at each reload and by ``waba-gateway check``, so a
bad file stops the start or fails the reload with the key at fault, never a delivery later.
Hostname verification stays on: the target's certificate must name the URL's host.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from gateway.config import TargetConfig
from gateway.errors import CertificateError
from gateway.tlsfiles import check_ca_bundle, check_key_pair, load

__all__ = ["build_target_context", "target_contexts"]


def build_target_context(target: TargetConfig, key: str) -> ssl.SSLContext | None:
    """The client context for ``target`` (configuration key ``key``, e.g. ``targets[0]``), or
    ``None`` where the default (the system's trust store, no client certificate) applies."""
    if target.ca_file is None and target.cert_file is None:
        return None
    if target.ca_file is None:
        context = ssl.create_default_context()  # the system's trust store, as for any target
    else:
        ca_file = target.ca_file
        check_ca_bundle(ca_file, f"{key}.ca_file")
        # Verifies the certificate and the host name as create_default_context() does, but
        # loads no trust store of its own: this bundle is the only one.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
        load(f"{key}.ca_file", ca_file, lambda: context.load_verify_locations(cafile=ca_file))
    if target.cert_file is not None and target.key_file is not None:
        cert_file, key_file = target.cert_file, target.key_file
        check_key_pair(cert_file, f"{key}.cert_file", key_file, f"{key}.key_file")
        load(f"{key}.cert_file", cert_file, lambda: context.load_cert_chain(cert_file, key_file))
    return context


def target_contexts(
    targets: Sequence[TargetConfig], *, source: Path | None = None
) -> dict[str, ssl.SSLContext]:
    """The contexts of the targets that have a CA or client certificate of their own, by
    target name; raises :class:`CertificateError` starting with ``source``, as configuration
    errors do."""
    contexts: dict[str, ssl.SSLContext] = {}
    for index, target in enumerate(targets):
        try:
            context = build_target_context(target, f"targets[{index}]")
        except CertificateError as exc:
            if source is None:
                raise
            raise CertificateError(f"{source}: {exc}") from exc
        if context is not None:
            contexts[target.name] = context
    return contexts
