"""The PROXY protocol: the header a TCP load balancer sends before the client's bytes.

Rule: pure decisions on bytes, no I/O. :func:`bytes_missing` says how many more bytes a reader
may take once some of the header is in (so it never reads past the header into the TLS
handshake), and :func:`parse_header` turns the whole header into a :class:`ProxyHeader` or raises
:class:`~gateway.errors.ProxyHeaderError` with a short reason (a metrics label).

Both versions of HAProxy's "The PROXY protocol" are read. Version 2 (section 2.2): a 12-byte
signature, the version and command, the address family and transport, a 2-byte length, then the
address block and optional TLVs. Version 1 (section 2.1): one line of text, ``PROXY``, the
protocol (``TCP4``, ``TCP6`` or ``UNKNOWN``), both addresses and both ports, then CRLF, at most
107 bytes; some balancers send only this one (AWS Classic ELB, Google Cloud's TCP proxy). With
TLS passthrough, which mTLS requires, the header is the only way the gateway learns the client's
address: the balancer opens its own TCP connection and the TLS handshake is the client's own.

What it does not do: read v2's TLVs (they are skipped; none is needed to learn the address), or
decide whether the sender may be trusted. Anyone who can reach the listener directly can send a
header naming any address; only the network (the port open to the balancer alone) makes it true.
A v2 header for a datagram transport is refused.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

from gateway.errors import ProxyHeaderError

__all__ = [
    "FIRST_READ_BYTES",
    "FIXED_BYTES",
    "SIGNATURE",
    "V1_MAX_BYTES",
    "ProxyHeader",
    "bytes_missing",
    "header_length",
    "parse_header",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_BYTES: Final = 16  # signature, version and command, family and transport, length

# Version 1 (section 2.1). The longest line a receiver must take, CRLF included, is 107 bytes
# ("PROXY UNKNOWN" and two full IPv6 addresses and ports); one without its CRLF by then is
# refused. The shortest is "PROXY UNKNOWN\r\n", 15 bytes: so a first read of 15 bytes cannot
# pass the end of any valid header of either version (v2's is at least FIXED_BYTES).
V1_MAX_BYTES: Final = 107
_V1_PREFIX: Final = b"PROXY "
_CRLF: Final = b"\r\n"
_UNKNOWN: Final = b"UNKNOWN"
# Each protocol word with the shortest whole line it can begin: UNKNOWN alone; TCP4 with
# "0.0.0.0" twice and one-digit ports; TCP6 with "::" twice and one-digit ports.
_V1_SHORTEST: Final = {_UNKNOWN: 15, b"TCP4 ": 32, b"TCP6 ": 22}
FIRST_READ_BYTES: Final = min(FIXED_BYTES, *_V1_SHORTEST.values())
# Section 2.1: IPv4 in dotted decimal, IPv6 as RFC 4291 writes it (hex groups, colons, an
# embedded dotted IPv4 tail); ports in decimal. Any other byte in a field is refused at once.
_DIGITS: Final = frozenset(b"0123456789")
_FIELD_BYTES: Final = {
    b"TCP4 ": (frozenset(b"0123456789."), 7),
    b"TCP6 ": (frozenset(b"0123456789abcdefABCDEF:."), 2),
}
# Section 2.1: a port is a decimal integer in [0..65535], "heading zeroes are not permitted".
_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")

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


def bytes_missing(start: bytes) -> int:
    """How many more bytes the header starting with ``start`` takes at least: 0 once it is
    whole. A reader that reads no more than this at a time never reads past a valid header's
    end. Raises as soon as ``start`` cannot begin a header, so that a client that never sends
    one is refused at its first bytes, not after a timeout."""
    if not start:
        return FIRST_READ_BYTES
    if start[:1] == _V1_PREFIX[:1]:
        return _v1_missing(start)
    return header_length(start) - len(start)


def header_length(start: bytes) -> int:
    """A v2 header's whole length in bytes, from its first ``FIXED_BYTES`` bytes; or, while
    fewer have arrived, ``FIXED_BYTES``. Raises as soon as ``start`` cannot begin a v2 header."""
    if not SIGNATURE.startswith(start[: len(SIGNATURE)]):
        raise ProxyHeaderError(
            "missing", "no PROXY protocol header (is the balancer set to send one?)"
        )
    if len(start) < FIXED_BYTES:
        return FIXED_BYTES
    version = start[12] >> 4
    if version != 2:
        raise ProxyHeaderError("malformed", f"PROXY protocol version {version}; expected 2")
    (length,) = struct.unpack_from("!H", start, 14)
    return FIXED_BYTES + int(length)


def parse_header(data: bytes) -> ProxyHeader:
    """The header that is exactly ``data``: a v2 header as long as :func:`header_length` says,
    or a v1 line up to its CRLF."""
    if data[:1] == _V1_PREFIX[:1]:
        return _parse_v1(data)
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


def _v1_missing(start: bytes) -> int:
    """:func:`bytes_missing` for a v1 line: what its grammar (section 2.1) still requires, so
    long as the line can still end within its 107 bytes."""
    if not _V1_PREFIX.startswith(start[: len(_V1_PREFIX)]):
        raise ProxyHeaderError(
            "missing", "no PROXY protocol header (is the balancer set to send one?)"
        )
    if _CRLF in start:
        return 0  # the line ends at its first CRLF; parse_header judges it
    missing = 1 if start.endswith(b"\r") else _v1_grammar_missing(start)
    if len(start) + missing > V1_MAX_BYTES:
        raise ProxyHeaderError(
            "malformed", f"a PROXY v1 header with no CRLF in its first {V1_MAX_BYTES} bytes"
        )
    return missing


def _v1_grammar_missing(start: bytes) -> int:
    """The shortest rest of a line begun with ``start`` that section 2.1 allows."""
    if len(start) < len(_V1_PREFIX):
        return _V1_SHORTEST[_UNKNOWN] - len(start)
    rest = start[len(_V1_PREFIX) :]
    if rest.startswith(_UNKNOWN):
        # Whatever follows UNKNOWN up to the CRLF is ignored (section 2.1): one space first.
        if len(rest) > len(_UNKNOWN) and rest[len(_UNKNOWN)] != ord(" "):
            raise ProxyHeaderError("malformed", "a PROXY v1 header: UNKNOWN and then no space")
        return len(_CRLF)
    for word, (allowed, shortest) in _FIELD_BYTES.items():
        if rest.startswith(word):
            return _tcp_missing(rest[len(word) :], allowed, shortest)
    lines = [total for word, total in _V1_SHORTEST.items() if word.startswith(rest)]
    if not lines:
        raise ProxyHeaderError("malformed", "a PROXY v1 header with an unknown protocol")
    return min(lines) - len(start)


def _tcp_missing(fields: bytes, allowed: frozenset[int], shortest: int) -> int:
    """The bytes still required after ``PROXY TCP4 `` (or ``TCP6``): the rest of the field
    being written, then each later field at its shortest, one space before each, and CRLF."""
    parts = fields.split(b" ")
    if len(parts) > 4 or b"" in parts[:-1]:
        raise ProxyHeaderError("malformed", "a PROXY v1 header not of four fields, one space apart")
    for index, part in enumerate(parts):
        if not set(part) <= (allowed if index < 2 else _DIGITS):
            raise ProxyHeaderError("malformed", "a PROXY v1 header with a byte out of place")
    least = (shortest, shortest, 1, 1)
    here = len(parts) - 1
    return (
        max(least[here] - len(parts[-1]), 0)
        + sum(1 + size for size in least[here + 1 :])
        + len(_CRLF)
    )


def _parse_v1(data: bytes) -> ProxyHeader:
    """A v1 line, ``data`` ending at its first CRLF (section 2.1), checked strictly."""
    _v1_missing(data[: len(_V1_PREFIX)])  # "PROXY " or no PROXY header at all
    if len(data) > V1_MAX_BYTES:
        raise ProxyHeaderError("malformed", f"a PROXY v1 header longer than {V1_MAX_BYTES} bytes")
    if _CRLF not in data:
        raise ProxyHeaderError("truncated", f"a PROXY v1 header of {len(data)} bytes, no CRLF")
    if not data.endswith(_CRLF) or data.index(_CRLF) != len(data) - len(_CRLF):
        raise ProxyHeaderError("malformed", "bytes after a PROXY v1 header's CRLF")
    line = data[: -len(_CRLF)]
    _v1_missing(line)  # the prefix, the protocol word and each field's bytes
    rest = line[len(_V1_PREFIX) :] if line.startswith(_V1_PREFIX) else b""
    if rest.startswith(_UNKNOWN):
        # The sender could not name the client: the TCP peer is taken, as with no header.
        return ProxyHeader("proxy", None)
    word, fields = rest[:5], rest[5:].split(b" ")
    if word not in _FIELD_BYTES or len(fields) != 4 or b"" in fields or b"\r" in line:
        raise ProxyHeaderError(
            "malformed", "a PROXY v1 header is TCP4 or TCP6 and four fields, one space apart"
        )
    make = ipaddress.IPv4Address if word == b"TCP4 " else ipaddress.IPv6Address
    try:
        source, destination = (make(field.decode("ascii")) for field in fields[:2])
    except ValueError as exc:
        raise ProxyHeaderError("malformed", f"a PROXY v1 header's address: {exc}") from None
    ports = fields[2:]
    if not all(_PORT.fullmatch(port) and int(port) <= 0xFFFF for port in ports):
        raise ProxyHeaderError(
            "malformed", "a PROXY v1 header's port is not 0 to 65535 without leading zeros"
        )
    return ProxyHeader(
        "proxy",
        (_shown(source), int(ports[0])),
        (_shown(destination), int(ports[1])),
    )


def _shown(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4 client behind a dual-stack balancer arrives as ::ffff:a.b.c.d; logs show it as
    # the IPv4 address it is, as a direct connection to an IPv4 socket would.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
