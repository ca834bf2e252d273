"""What each of the gateway's spans carries: attribute rules, pure.

Rule: attributes follow OpenTelemetry's stable HTTP semantic conventions, and none carries
personal data (no body, phone number, user id, name, message text, secret or token): only the
method, path, status, the client certificate's CN and expiry, the addresses of the connection
(Meta's servers, or the load balancer in front of the gateway), the target's name, the delivery
id and the attempt's outcome.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ServerAttributes",
    "attempt_attributes",
    "client_attributes",
    "not_after_iso",
    "server_attributes",
    "status_attributes",
    "target_attributes",
]


@functools.lru_cache(maxsize=64)  # one certificate per connection, the same few over and over
def not_after_iso(not_after: str | None) -> str | None:
    """A certificate's notAfter as Python's ssl module spells it, in ISO 8601 (UTC)."""
    if not not_after:
        return None
    try:
        seconds = ssl.cert_time_to_seconds(not_after)
    except ValueError:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _address(peer: object) -> tuple[str, int] | None:
    """A socket's peer (``getpeername()``) as host and port; None for other families."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class ServerAttributes(Mapping[str, Any]):
    """A callback request's attributes: ``constant``, those of the path and the client
    certificate (one read-only mapping, the same for every connection with them), then the
    connection's ``own`` (its addresses). The encoder encodes ``constant`` once for all of
    them, and per connection only ``own``."""

    __slots__ = ("constant", "own")

    def __init__(self, constant: Mapping[str, Any], own: Mapping[str, Any]) -> None:
        self.constant = constant
        self.own = own

    def __getitem__(self, key: str) -> Any:
        own = self.own
        return own[key] if key in own else self.constant[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.constant  # the keys of the two never overlap
        yield from self.own

    def __len__(self) -> int:
        return len(self.constant) + len(self.own)


@functools.lru_cache(maxsize=64)  # the one path, the same few certificates
def _constant(path: str, cn: str | None, not_after: str | None) -> Mapping[str, Any]:
    found: dict[str, Any] = {
        "http.request.method": "POST",
        "http.route": path,
        "url.path": path,
        "url.scheme": "https",
        "network.protocol.version": "1.1",
    }
    if cn is not None:
        found["tls.client.subject"] = f"CN={cn}"
    expiry = not_after_iso(not_after)
    if expiry is not None:
        found["tls.client.not_after"] = expiry
    return MappingProxyType(found)


def server_attributes(
    path: str, cn: str | None, not_after: str | None, client: str | None, peer: object
) -> ServerAttributes:
    """A callback request's attributes known before it is read, the same for every request of
    one connection. ``client``: the client's address (the PROXY protocol header's, else the TCP
    peer's); ``peer``: the TCP peer's ``getpeername()``. The client's port is known only when
    the client is the TCP peer itself."""
    own: dict[str, Any] = {}
    address = _address(peer)
    if client:
        own["client.address"] = client
        if address is not None and address[0] == client:
            own["client.port"] = address[1]
    if address is not None:
        own["network.peer.address"], own["network.peer.port"] = address
    return ServerAttributes(_constant(path, cn, not_after), own)


def status_attributes(status: int | None, error: str | None) -> dict[str, Any]:
    """A response's attributes: its status code, and ``error.type`` for a failure (the status
    as text from 400 on, or the kind of error when nothing came back)."""
    if status is None:
        kind = (error or "no response").split(" ", 1)[0].rstrip(":")
        return {"error.type": "timeout" if kind == "timed" else kind or "_OTHER"}
    found: dict[str, Any] = {"http.response.status_code": status}
    if status >= 400:
        found["error.type"] = str(status)
    return found


@functools.lru_cache(maxsize=256)  # the same few targets, attempt after attempt
def target_attributes(url: str, target: str, kind: str = "http") -> Mapping[str, Any]:
    """What every attempt to one target carries: for an HTTP target the URL without
    credentials or query (either may hold a secret), for a broker (``kind``) its first
    server's host and port alone. The same read-only mapping for the same target."""
    found: dict[str, Any] = {"gateway.target.name": target}
    try:
        parts = urlsplit(url.split(",", 1)[0])  # a NATS target may list several servers
        port = parts.port
    except ValueError:
        return MappingProxyType(found)
    if kind != "http":
        found["messaging.system"] = kind
        found["server.address"] = parts.hostname or ""
        if port is not None:
            found["server.port"] = port
    else:
        port = port or (443 if parts.scheme == "https" else 80)
        found["http.request.method"] = "POST"
        found["server.address"] = parts.hostname or ""
        found["server.port"] = port
        host = parts.hostname or ""
        # An IPv6 address goes in brackets in a URL (RFC 3986, section 3.2.2), as it came.
        host = f"[{host}]" if ":" in host else host
        found["url.full"] = f"{parts.scheme}://{host}:{port}{parts.path or '/'}"
    return MappingProxyType(found)


def attempt_attributes(delivery_id: str, attempt: int) -> dict[str, Any]:
    """What one attempt carries beside its target's attributes: ``http.request.resend_count``
    only on a retry."""
    found: dict[str, Any] = {
        "gateway.delivery.id": delivery_id,
        "gateway.delivery.attempt": attempt,
    }
    if attempt > 1:
        found["http.request.resend_count"] = attempt - 1
    return found


def client_attributes(
    url: str, target: str, delivery_id: str, attempt: int, kind: str = "http"
) -> dict[str, Any]:
    """A delivery attempt's attributes before it is sent: its target's, then its own."""
    return {**target_attributes(url, target, kind), **attempt_attributes(delivery_id, attempt)}
