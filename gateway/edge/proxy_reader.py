"""Reading a new connection's PROXY protocol header, before its TLS handshake.

Rule: not a byte past the header is read here. The protocol is buffered and offers a buffer
exactly as large as what is still missing of the header, so each read stops at its end and the
client's first TLS bytes stay in the socket for the handshake that follows (a reader that read
ahead would have to hand them to OpenSSL by hand). The header's meaning is decided in
:mod:`gateway.edge.proxy_protocol`; this module only reads, times out and reports.

A connection whose header is missing or bad is aborted (no TLS, nothing answered: it may not
even speak TLS), logged with the balancer's address and counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, cast

from gateway.edge.proxy_protocol import FIXED_BYTES, header_length, parse_header
from gateway.errors import ProxyHeaderError
from gateway.units import SECONDS

__all__ = ["HEADER_TIMEOUT_S", "ProxyHeaderReader"]

log = logging.getLogger(__name__)

# A balancer sends the header as soon as it has connected (HAProxy's send-proxy-v2 does, before
# any byte of the client's): a connection that has not sent all of it by then never will.
HEADER_TIMEOUT_S = 10 * SECONDS

_CLOSED = "the connection closed before its PROXY header"

# Told the TCP transport (reading paused) and the client's address once the header is read.
OnHeader = Callable[[asyncio.Transport, str], None]


class RefusalCounter(Protocol):
    def proxy_header_refused(self, reason: str) -> None: ...


class ProxyHeaderReader(asyncio.BufferedProtocol):
    """One new TCP connection until its PROXY header is in; ``pending`` holds it meanwhile, so
    that a listener that closes can abort it."""

    def __init__(
        self,
        on_header: OnHeader,
        counter: RefusalCounter,
        pending: set[ProxyHeaderReader],
        timeout_s: float = HEADER_TIMEOUT_S,
    ) -> None:
        self._on_header = on_header
        self._counter = counter
        self._pending = pending
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buffer = bytearray(FIXED_BYTES)
        self._filled = 0
        self._peer = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have their methods.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "-"
        self._pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        data = bytes(self._buffer[: self._filled])
        try:
            total = header_length(data)
            if total > len(self._buffer):
                # A new buffer: the event loop may still hold a view of the old one.
                self._buffer = self._buffer + bytes(total - len(self._buffer))
            if self._filled < total:
                return
            header = parse_header(data)
        except ProxyHeaderError as exc:
            self._refuse(exc)
            return
        transport = self._finish()
        if transport is None:
            return
        # Nothing more for this protocol: the TLS handshake reads what follows.
        transport.pause_reading()
        # The LOCAL command (a health check) or an address-less family: the peer is the client.
        self._on_header(transport, header.source[0] if header.source else self._peer)

    def eof_received(self) -> bool:
        self._refuse(ProxyHeaderError("closed", _CLOSED))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._refuse(ProxyHeaderError("closed", _CLOSED))

    def _timed_out(self) -> None:
        self._timer = None
        waited = f"no complete PROXY header within {self._timeout_s:g} s"
        self._refuse(ProxyHeaderError("timeout", waited))

    def abort(self) -> None:
        """The listener is closing: drop the connection without a word."""
        transport = self._finish()
        if transport is not None:
            transport.abort()

    def _refuse(self, error: ProxyHeaderError) -> None:
        transport = self._finish()
        if transport is None:
            return
        # A balancer's TCP health check without a header only connects and leaves: counted,
        # logged only when debugging, as TLS handshakes that never start are.
        level = logging.DEBUG if error.reason == "closed" else logging.INFO
        log.log(level, "connection from %s refused: %s", self._peer, error)
        self._counter.proxy_header_refused(error.reason)
        transport.abort()

    def _finish(self) -> asyncio.Transport | None:
        """Stop waiting; the transport, the first time only."""
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.discard(self)
        return transport
