"""Reading a new connection's PROXY protocol header, before its TLS handshake.

Rule: not a byte past the header is read here. The accepted socket is read directly, never more
than what is still missing of the header, so each read stops at its end and the client's first
TLS bytes stay in the socket for the handshake that follows (a reader that read ahead would have
to hand them to OpenSSL by hand). The socket is read before any transport owns it, so this holds
alike on every event loop the gateway offers. A v2 header says its length in its first 16
bytes; a v1 line ends at its CRLF, so each read takes no more than the shortest rest the line's
grammar allows (section 2.1), and the first read no more than the shortest header of either
version (15 bytes): a valid header is never read past. The header's meaning is decided in
:mod:`gateway.edge.proxy_protocol`; this module only reads, times out and reports.

A connection whose header is missing or bad is closed (no TLS, nothing answered: it may not even
speak TLS), logged with the balancer's address and counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol

from gateway.edge.proxy_protocol import bytes_missing, parse_header
from gateway.errors import ProxyHeaderError
from gateway.units import SECONDS

__all__ = ["HEADER_TIMEOUT_S", "ProxyHeaderReader"]

log = logging.getLogger(__name__)

# A balancer sends the header as soon as it has connected (HAProxy's send-proxy-v2 does, before
# any byte of the client's): a connection that has not sent all of it by then never will.
HEADER_TIMEOUT_S = 10 * SECONDS

_CLOSED = "the connection closed before its PROXY header"


class RefusalCounter(Protocol):
    def proxy_header_refused(self, reason: str) -> None: ...


class ProxyHeaderReader:
    """Reads each new connection's PROXY header: ``await reader(sock, peer)`` is the client's
    address, or ``None`` once the connection was refused (logged and counted)."""

    def __init__(self, counter: RefusalCounter, timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self._counter = counter
        self._timeout_s = timeout_s

    async def __call__(self, sock: socket.socket, peer: str) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                header = parse_header(await _read_header(sock))
        except TimeoutError:
            waited = f"no complete PROXY header within {self._timeout_s:g} s"
            self._refuse(peer, ProxyHeaderError("timeout", waited))
            return None
        except ProxyHeaderError as exc:
            self._refuse(peer, exc)
            return None
        except OSError:  # reset while the header was due
            self._refuse(peer, ProxyHeaderError("closed", _CLOSED))
            return None
        # The LOCAL command (a health check) or an address-less family: the peer is the client.
        return header.source[0] if header.source else peer

    def _refuse(self, peer: str, error: ProxyHeaderError) -> None:
        # A balancer's TCP health check without a header only connects and leaves: counted,
        # logged only when debugging, as TLS handshakes that never start are.
        level = logging.DEBUG if error.reason == "closed" else logging.INFO
        log.log(level, "connection from %s refused: %s", peer, error)
        self._counter.proxy_header_refused(error.reason)


async def _read_header(sock: socket.socket) -> bytes:
    """The header's bytes, and not one more; raises ProxyHeaderError as soon as what arrived
    cannot begin a header."""
    loop = asyncio.get_running_loop()
    data = b""
    missing = bytes_missing(data)
    while missing:
        chunk = await loop.sock_recv(sock, missing)
        if not chunk:
            raise ProxyHeaderError("closed", _CLOSED)
        data += chunk
        missing = bytes_missing(data)
    # Only a v1 line that broke its grammar can have run past its CRLF: judged up to there.
    end = data.find(b"\r\n") if data[:1] == b"P" else -1
    return data[: end + 2] if end >= 0 else data
