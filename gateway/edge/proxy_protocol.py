"""The PROXY protocol, version 2: the header a TCP load balancer sends before the client's bytes.

Rule: pure decisions on bytes, no I/O. :func:`header_length` says how many bytes the header
takes once its first bytes are in (so a reader never reads past it into the TLS handshake), and
:func:`parse_header` turns the whole header into a :class:`ProxyHeader` or raises
:class:`~gateway.errors.ProxyHeaderError` with a short reason (a metrics label).

The format is HAProxy's "The PROXY protocol", section 2.2: a 12-byte signature, the version and
command, the address family and transport, a 2-byte length, then the address block and optional
TLVs. With TLS passthrough, which mTLS requires, it is the only way the gateway learns the client's
address: the balancer opens its own TCP connection and the TLS handshake is the client's own.

What it does not do: read the TLVs (they are skipped; none is needed to learn the address), or
decide whether the sender may be trusted. Anyone who can reach the listener directly can send a
header naming any address; only the network (the port open to the balancer alone) makes it true.
Version 1 (text) headers are refused, as is a v2 header for a datagram transport.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from gateway.errors import ProxyHeaderError

__all__ = ["FIXED_BYTES", "SIGNATURE", "ProxyHeader", "header_length", "parse_header"]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_BYTES: Final = 16  # signature, version and command, family and transport, length
_V1_PREFIX: Final = b"PROXY "

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
# The address block's size for each family (section 2.2): addresses, then ports.
_ADDRESS_BYTES: Final = {_INET: 12, _INET6: 36, _UNIX: 216}

Command = Literal["local", "proxy"]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header says. ``source`` is the client's address and port, ``None`` where the
    header carries none: the LOCAL command (the balancer's own health check), or an address
    family that names no host (UNSPEC, UNIX). Then the TCP peer is the client (section 2.2)."""

    command: Command
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None


def header_length(start: bytes) -> int:
    """The whole header's length in bytes, from its first ``FIXED_BYTES`` bytes; or, while
    fewer have arrived, ``FIXED_BYTES``. Raises as soon as ``start`` cannot begin a v2 header,
    so that a client that never sends a header is refused at its first bytes, not after a
    timeout."""
    if not SIGNATURE.startswith(start[: len(SIGNATURE)]):
        if _V1_PREFIX.startswith(start[: len(_V1_PREFIX)]):
            raise ProxyHeaderError("v1", "a PROXY protocol v1 (text) header; send version 2")
        raise ProxyHeaderError(
            "missing", "no PROXY protocol v2 header (is the balancer set to send one?)"
        )
    if len(start) < FIXED_BYTES:
        return FIXED_BYTES
    version = start[12] >> 4
    if version != 2:
        raise ProxyHeaderError("malformed", f"PROXY protocol version {version}; expected 2")
    (length,) = struct.unpack_from("!H", start, 14)
    return FIXED_BYTES + int(length)


def parse_header(data: bytes) -> ProxyHeader:
    """The header that is exactly ``data`` (as long as :func:`header_length` says)."""
    total = header_length(data)
    if len(data) != total:
        raise ProxyHeaderError("truncated", f"PROXY header of {len(data)} bytes, not {total}")
    command, family, transport = data[12] & 0x0F, data[13] >> 4, data[13] & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError("malformed", f"PROXY protocol command {command:#x} is unknown")
    if command == _LOCAL:
        # The balancer's own connection (a health check): its addresses are the real ones and
        # whatever block follows is discarded (section 2.2).
        return ProxyHeader("local", None)
    if family not in (_UNSPEC, *_ADDRESS_BYTES) or transport not in (0, _STREAM, _DGRAM):
        raise ProxyHeaderError(
            "malformed", f"PROXY address family {family:#x}, transport {transport:#x} unknown"
        )
    if transport == _DGRAM:
        raise ProxyHeaderError("unsupported", "a PROXY header for a datagram transport")
    if family in (_UNSPEC, _UNIX):
        return ProxyHeader("proxy", None)
    block = data[FIXED_BYTES:]
    needed = _ADDRESS_BYTES[family]
    if len(block) < needed:
        raise ProxyHeaderError(
            "malformed", f"PROXY address block of {len(block)} bytes; the family needs {needed}"
        )
    size = needed // 2 - 2  # one address: the block holds two, then two ports
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    make = ipaddress.IPv4Address if family == _INET else ipaddress.IPv6Address
    source = make(block[:size])
    destination = make(block[size : 2 * size])
    return ProxyHeader(
        "proxy", (_shown(source), source_port), (_shown(destination), destination_port)
    )


def _shown(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4 client behind a dual-stack balancer arrives as ::ffff:a.b.c.d; logs show it as
    # the IPv4 address it is, as a direct connection to an IPv4 socket would.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
