"""Client identity: is the verified client certificate Meta's?

Rule: pure decisions on the dict that :meth:`ssl.SSLObject.getpeercert` returns; no I/O, no
sockets. Meta says to verify the chain and then that the subject CN is exactly
``client.webhooks.fbclientcerts.com`` (docs/graph-api/webhooks/getting-started, "mTLS"). The chain
is the TLS layer's job (:mod:`gateway.edge.tls`); the CN is this module's, and it is never optional:
the CA that signed Meta's certificate before April 2026 signs countless others too.

:class:`Verdicts` keeps the decisions made for the last few certificates, keyed by the
certificate's DER bytes: Meta presents the same client certificate on every connection, and
decoding it into that dict costs more than the rest of the check (about 64,000 instructions per
new connection). A certificate not seen before is decoded and decided exactly as above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.config import ClientAuth
from gateway.errors import IdentityRejected

__all__ = ["Verdict", "Verdicts", "check_client_identity", "peer_common_names"]

# RFC 5280's upper bound for a commonName (ub-common-name). A rejected certificate's CN is chosen
# by whoever made it, and it goes into logs and response bodies: show no more than this.
_MAX_SHOWN_CN: Final = 64
# Certificates whose verdicts are kept: Meta's, and room for a rotation's overlap and a few
# others. Only certificates whose chain OpenSSL verified get this far, and never more are kept.
VERDICTS_KEPT: Final = 16


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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`check_client_identity` said of one certificate: the accepted CN (or
    ``None``), or the reason it was refused; and the certificate's ``notAfter`` as
    ``getpeercert()`` shows it, for the traces."""

    cn: str | None
    refusal: str | None
    not_after: str | None

    def accepted(self) -> str | None:
        """The CN, or raises :class:`~gateway.errors.IdentityRejected` as the check did."""
        if self.refusal is not None:
            raise IdentityRejected(self.refusal)
        return self.cn


class Verdicts:
    """:func:`check_client_identity` under fixed rules, remembered per certificate.

    Keyed by the DER bytes (``getpeercert(binary_form=True)``): the same bytes are the same
    certificate, so the same verdict. The rules (``allowed_cns``, ``client_auth``) are fixed
    for the object's life: a reload makes a new one. At most :data:`VERDICTS_KEPT` are kept,
    the oldest forgotten first."""

    __slots__ = ("_allowed_cns", "_client_auth", "_kept", "_size")

    def __init__(
        self, allowed_cns: Sequence[str], client_auth: ClientAuth, size: int = VERDICTS_KEPT
    ) -> None:
        self._allowed_cns = tuple(allowed_cns)
        self._client_auth = client_auth
        self._size = size
        self._kept: dict[bytes, Verdict] = {}

    def of(self, der: bytes | None, peercert: Callable[[], Mapping[str, Any] | None]) -> Verdict:
        """The verdict on the certificate ``der`` (``None``: none presented); ``peercert()``
        gives its ``getpeercert()`` dict, asked only for a certificate not seen before."""
        if der is None:
            return self._decide(None)
        found = self._kept.get(der)
        if found is None:
            found = self._decide(peercert())
            if len(self._kept) >= self._size:
                del self._kept[next(iter(self._kept))]  # the oldest (dicts keep their order)
            self._kept[der] = found
        return found

    def _decide(self, peercert: Mapping[str, Any] | None) -> Verdict:
        not_after = str(peercert.get("notAfter") or "") or None if peercert else None
        try:
            cn = check_client_identity(peercert, self._allowed_cns, self._client_auth)
        except IdentityRejected as exc:
            return Verdict(None, str(exc), not_after)
        return Verdict(cn, None, not_after)
