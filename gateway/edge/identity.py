"""Client identity: is the verified client certificate Meta's?

Rule: pure decisions on the dict that :meth:`ssl.SSLObject.getpeercert` returns; no I/O, no
sockets. Meta says to verify the chain and then that the subject CN is exactly
``client.webhooks.fbclientcerts.com`` (docs/graph-api/webhooks/getting-started, "mTLS"). The chain
is the TLS layer's job (:mod:`gateway.edge.tls`); the CN is this module's, and it is never optional:
the CA that signed Meta's certificate before April 2026 signs countless others too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.config import ClientAuth
from gateway.errors import IdentityRejected

__all__ = ["check_client_identity", "peer_common_names"]

# RFC 5280's upper bound for a commonName (ub-common-name). A rejected certificate's CN is chosen
# by whoever made it, and it goes into logs and response bodies: show no more than this.
_MAX_SHOWN_CN: Final = 64


def peer_common_names(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Every ``commonName`` in the certificate's subject, in order; ``()`` without a certificate.

    ``getpeercert()`` returns ``None`` (or ``{}``, under ``CERT_NONE``) when there is no verified
    certificate, and otherwise a subject shaped as a tuple of RDNs, each a tuple of
    ``(attribute, value)`` pairs: ``((("commonName", "x"),), (("organizationName", "y"),))``.
    """
    if not peercert:
        return ()
    return tuple(
        value
        for rdn in peercert.get("subject", ())
        for attribute, value in rdn
        if attribute == "commonName"
    )


def check_client_identity(
    peercert: Mapping[str, Any] | None,
    allowed_cns: Sequence[str],
    client_auth: ClientAuth,
) -> str | None:
    """The accepted CN, or ``None`` when no certificate was presented and none is required.

    A presented certificate is accepted when its subject has exactly one CN and that CN equals
    one of ``allowed_cns`` (exact, case-sensitive: Meta names one exact CN). Otherwise this
    raises :class:`~gateway.errors.IdentityRejected`, as it does for a missing certificate under
    ``client_auth = "required"``.

    What it does *not* check:

    - the chain, validity dates and key usage: OpenSSL did that during the handshake, against
      ``tls.client_ca_file`` only (:func:`gateway.edge.tls.build_server_context`);
    - the subjectAltName: Meta identifies its client by the subject CN, so a SAN naming Meta
      proves nothing here;
    - revocation, beyond the ``tls.crl_file`` the TLS layer applies.
    """
    if isinstance(allowed_cns, str):
        # A bare string is a Sequence[str] too, and `in` would then match any substring of it.
        raise TypeError("allowed_cns must be a sequence of names, not a single string")
    if not peercert:
        if client_auth == "required":
            # The TLS layer already refuses such a handshake (CERT_REQUIRED): this is a second
            # lock, for a context built some other way.
            raise IdentityRejected("a client certificate is required and none was presented")
        return None

    names = peer_common_names(peercert)
    if not names:
        raise IdentityRejected("client certificate has no subject CN: not accepted")
    if len(names) > 1:
        # Which of several CNs a given tool reads is anyone's guess (nginx's $ssl_client_s_dn
        # shows them all): refuse rather than pick one.
        raise IdentityRejected(f"client certificate has {len(names)} subject CNs: not accepted")
    (name,) = names
    if name not in allowed_cns:
        raise IdentityRejected(f"client certificate CN {_shown(name)} is not accepted")
    return name


def _shown(name: str) -> str:
    # repr() escapes control characters, so a CN cannot forge log lines.
    if len(name) <= _MAX_SHOWN_CN:
        return repr(name)
    return f"{name[:_MAX_SHOWN_CN]!r}... ({len(name)} characters)"
