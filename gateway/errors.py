"""The gateway's one error tree.

Rule: every failure the gateway reports to a person or to Meta is one of these classes. Rejections
of an HTTP request carry their status; :mod:`gateway.edge.responses` is the only place that turns
them into HTTP responses, and :func:`gateway.cli.main` the only place that turns them into an exit
code.

::

    GatewayError                      base: ``waba-gateway`` prints "error: <message>", exits 2
    +-- ConfigError                   bad TOML, key, type, value, unset ${ENV}; names file and key
    +-- CertificateError              unreadable or mismatched certificate/key/CA files
    +-- OutboxError                   the outbox cannot be opened or written; a request it
    |                                 fails is answered 503, so Meta retries
    +-- TargetError                   ``check``: a broker target that cannot work as configured
    |   +-- TargetUnreachable         ``check``: a broker that does not answer (a warning)
    +-- PortInUse                     a listener's port is taken; names the port and its key
    +-- ProxyHeaderError              a connection's PROXY protocol header is missing or bad
    |                                 (``listen.proxy_protocol``): closed before TLS
    +-- GraphError                    a Graph API call failed (onboarding commands)
    +-- Rejected                      an HTTP request refused; carries ``status``
        +-- BadRequest           400  missing handshake parameters, invalid JSON
        |   +-- NestedTooDeep    400  valid JSON too deep to read; routing sends it to the
        |                             catch-all targets instead (the request gets its 200)
        +-- SignatureRejected    401  X-Hub-Signature-256 missing, malformed or wrong
        +-- Forbidden            403  wrong verify token, unexpected client certificate CN;
        |   |                         (admin) a state-changing request from another site
        |   +-- IdentityRejected 403  client certificate CN not in ``tls.client_cn``
        +-- NotFound             404  unknown path; unknown delivery id (admin)
        +-- MethodNotAllowed     405  a method other than GET or POST on the callback path
        +-- RequestTimeout       408  a request not fully received in time
        +-- Unauthorized         401  admin token missing or wrong
        +-- PayloadTooLarge      413  body over ``listen.max_body_bytes``
        +-- UnsupportedMediaType 415  (admin) a form's body sent to the JSON API
        +-- MisdirectedRequest   421  (admin) a ``Host`` that is not the admin listener's
        +-- URLTooLong           414  request URL over the listener's limit
        +-- HeadTooLarge         431  request line and headers over the listener's limit
        +-- TransferCodingNotImplemented
        |                        501  a transfer coding other than chunked (RFC 9112, 6.1)
        +-- VersionNotSupported  505  a request line with an HTTP version other than 1.0 or 1.1
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "BadRequest",
    "CertificateError",
    "ConfigError",
    "Forbidden",
    "GatewayError",
    "GraphError",
    "GraphFailure",
    "HeadTooLarge",
    "IdentityRejected",
    "MethodNotAllowed",
    "MisdirectedRequest",
    "NestedTooDeep",
    "NotFound",
    "OutboxError",
    "PayloadTooLarge",
    "PortInUse",
    "ProxyHeaderError",
    "Rejected",
    "RequestTimeout",
    "SignatureRejected",
    "TargetError",
    "TargetUnreachable",
    "TransferCodingNotImplemented",
    "URLTooLong",
    "Unauthorized",
    "UnsupportedMediaType",
    "VersionNotSupported",
]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is unusable; the message names the file, the key path and the value."""


class CertificateError(GatewayError):
    """A certificate, key or CA file is unreadable, expired or does not match."""


class OutboxError(GatewayError):
    """The outbox database cannot be opened or written."""


class TargetError(GatewayError):
    """A target cannot take deliveries as configured (a NATS subject no stream captures)."""


class TargetUnreachable(TargetError):
    """A target cannot be reached now: a broker that is down, which the gateway waits for."""


class PortInUse(GatewayError):
    """A listener cannot bind: ``port`` is in use. ``key`` is the configuration key that sets
    it (``listen.port`` or ``admin.port``); the command line names the option to change."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(f"port {port} is in use; choose another with {key}")
        self.port = port
        self.key = key


class ProxyHeaderError(GatewayError):
    """A connection that should start with a PROXY protocol header (v1 or v2) did not.
    ``reason`` is one of a few fixed words (a metrics label): ``missing``, ``malformed``,
    ``truncated``, ``unsupported``, ``timeout``, ``closed``; the message says what was wrong."""

    REASONS = ("missing", "malformed", "truncated", "unsupported", "timeout", "closed")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


GraphFailure = Literal["failure", "usage", "auth", "rate_limited"]


class GraphError(GatewayError):
    """A Graph API call failed; ``reason`` tells bad input, a refused token or permission, and a
    rate limit from any other failure (the command line gives each its exit code)."""

    reason: GraphFailure = "failure"

    def __init__(self, message: str, *, reason: GraphFailure = "failure") -> None:
        super().__init__(message)
        self.reason = reason


class Rejected(GatewayError):
    """An HTTP request the gateway refuses. ``status`` is the response status, the message its
    reason (sent as the response body, so it never holds a secret or payload content)."""

    status: int = 400


class BadRequest(Rejected):
    status = 400


class NestedTooDeep(BadRequest):
    """Valid JSON nested deeper than the parser reads (about 1,000 levels): its changes cannot
    be read, but Meta signed it, so :func:`gateway.edge.routing.route` sends it to the targets
    that take every notification rather than refusing it."""

    status = 400


class SignatureRejected(Rejected):
    status = 401


class Unauthorized(Rejected):
    status = 401


class Forbidden(Rejected):
    status = 403


class IdentityRejected(Forbidden):
    status = 403


class NotFound(Rejected):
    status = 404


class MethodNotAllowed(Rejected):
    status = 405


class RequestTimeout(Rejected):
    status = 408


class PayloadTooLarge(Rejected):
    status = 413


class UnsupportedMediaType(Rejected):
    status = 415


class MisdirectedRequest(Rejected):
    status = 421


class URLTooLong(Rejected):
    status = 414


class HeadTooLarge(Rejected):
    status = 431


class TransferCodingNotImplemented(Rejected):
    status = 501


class VersionNotSupported(Rejected):
    status = 505
