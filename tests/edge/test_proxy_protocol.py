"""The PROXY protocol v2 header, parsed from bytes with no I/O (gateway.edge.proxy_protocol)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edge.proxy_protocol import (
    FIXED_BYTES,
    SIGNATURE,
    ProxyHeader,
    header_length,
    parse_header,
)
from gateway.errors import ProxyHeaderError

# Byte 13: version 2 in the high nibble, the command in the low one; byte 14: family, transport.
PROXY, LOCAL = 0x21, 0x20
TCP4, TCP6, UDP4, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x12, 0x31, 0x00


def v2(command: int, family: int, block: bytes) -> bytes:
    """A v2 header as HAProxy's specification (section 2.2) lays it out."""
    return SIGNATURE + bytes((command, family)) + struct.pack("!H", len(block)) + block


def inet(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """The address block: both addresses, then both ports, in network order."""
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", source_port, destination_port)
    )


TLV = bytes((0x04,)) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP, three bytes
IPV4 = v2(PROXY, TCP4, inet("203.0.113.7", 51234, "10.0.0.5", 8443))
IPV6 = v2(PROXY, TCP6, inet("2001:db8::7", 40000, "2001:db8::1", 443))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            IPV4,
            ProxyHeader("proxy", ("203.0.113.7", 51234), ("10.0.0.5", 8443)),
            id="tcp4",
        ),
        pytest.param(
            IPV6,
            ProxyHeader("proxy", ("2001:db8::7", 40000), ("2001:db8::1", 443)),
            id="tcp6",
        ),
        pytest.param(
            v2(PROXY, TCP6, inet("::ffff:198.51.100.9", 1, "::ffff:10.0.0.5", 2)),
            ProxyHeader("proxy", ("198.51.100.9", 1), ("10.0.0.5", 2)),
            id="ipv4-mapped-shown-as-ipv4",
        ),
        pytest.param(
            v2(PROXY, TCP4, inet("203.0.113.7", 1, "10.0.0.5", 2) + TLV),
            ProxyHeader("proxy", ("203.0.113.7", 1), ("10.0.0.5", 2)),
            id="tlvs-skipped",
        ),
        pytest.param(v2(LOCAL, UNSPEC, b""), ProxyHeader("local", None), id="local-health-check"),
        pytest.param(
            v2(LOCAL, TCP4, inet("203.0.113.7", 1, "10.0.0.5", 2)),
            ProxyHeader("local", None),
            id="local-block-discarded",
        ),
        pytest.param(v2(PROXY, UNSPEC, b""), ProxyHeader("proxy", None), id="unspec-family"),
        pytest.param(
            v2(PROXY, UNIX_STREAM, b"\0" * 216), ProxyHeader("proxy", None), id="unix-family"
        ),
    ],
)
def test_parses_the_client_address(data: bytes, expected: ProxyHeader) -> None:
    """A whole v2 header gives the client's address, or none where the TCP peer is the client."""
    assert header_length(data[:FIXED_BYTES]) == len(data)
    assert parse_header(data) == expected


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        pytest.param(b"", FIXED_BYTES, id="nothing-yet"),
        pytest.param(SIGNATURE[:5], FIXED_BYTES, id="part-of-the-signature"),
        pytest.param(IPV4[:15], FIXED_BYTES, id="length-not-in-yet"),
        pytest.param(IPV4[:16], 16 + 12, id="ipv4"),
        pytest.param(IPV6[:16], 16 + 36, id="ipv6"),
        pytest.param(IPV4 + b"\x16\x03\x01", 16 + 12, id="tls-bytes-behind-it"),
    ],
)
def test_header_length_stops_at_the_end_of_the_header(start: bytes, expected: int) -> None:
    """The reader learns how far to read, and never into the client's TLS handshake."""
    assert header_length(start) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "missing", id="tls-hello"),
        pytest.param(b"\x16", "missing", id="one-tls-byte"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "missing", id="plain-http"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\r", "missing", id="signature-wrong-last-byte"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2\r\n", "v1", id="v1-text"),
        pytest.param(b"PRO", "v1", id="v1-prefix"),
        pytest.param(SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12, "malformed", id="version-1"),
        pytest.param(SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, "malformed", id="version-3"),
        pytest.param(v2(0x22, TCP4, b"\0" * 12), "malformed", id="unknown-command"),
        pytest.param(v2(PROXY, 0x41, b"\0" * 12), "malformed", id="unknown-family"),
        pytest.param(v2(PROXY, 0x13, b"\0" * 12), "malformed", id="unknown-transport"),
        pytest.param(v2(PROXY, TCP4, b"\0" * 11), "malformed", id="ipv4-block-short"),
        pytest.param(v2(PROXY, TCP6, b"\0" * 12), "malformed", id="ipv6-block-ipv4-sized"),
        pytest.param(v2(PROXY, UDP4, b"\0" * 12), "unsupported", id="datagram"),
        pytest.param(IPV4[:-1], "truncated", id="truncated-block"),
        pytest.param(IPV4[:10], "truncated", id="truncated-signature"),
        pytest.param(IPV4 + b"\x16", "truncated", id="longer-than-announced"),
    ],
)
def test_refuses_what_is_not_a_v2_header(data: bytes, reason: str) -> None:
    """Garbage, v1, unknown values, a short block or a cut header: refused, with its reason."""

    def read() -> ProxyHeader:
        header_length(data[:FIXED_BYTES])  # what a reader checks first, as the bytes arrive
        return parse_header(data)

    with pytest.raises(ProxyHeaderError) as raised:
        read()
    assert raised.value.reason == reason
    assert str(raised.value)  # the log line says what was wrong


def test_garbage_is_refused_at_its_first_byte() -> None:
    """A client that sends no header is refused on its first byte, not after a timeout."""
    for first in range(256):
        start = bytes((first,))
        if SIGNATURE.startswith(start):
            assert header_length(start) == FIXED_BYTES
        else:
            with pytest.raises(ProxyHeaderError):
                header_length(start)


@given(
    address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    port=st.integers(0, 65535),
    tlvs=st.binary(max_size=300),
    after=st.binary(max_size=64),
)
@settings(max_examples=300)
def test_any_header_reads_back_its_address_and_stops_at_its_end(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, tlvs: bytes, after: bytes
) -> None:
    """Whatever the address, the TLVs and the bytes behind it, the length read from the fixed
    part ends exactly where the header does, and the source comes back as sent."""
    family = TCP4 if address.version == 4 else TCP6
    destination = "10.0.0.5" if address.version == 4 else "2001:db8::1"
    header = v2(PROXY, family, inet(str(address), port, destination, 443) + tlvs)
    stream = header + after
    length = header_length(stream[:FIXED_BYTES])
    assert stream[:length] == header
    source = parse_header(stream[:length]).source
    assert source is not None
    mapped = getattr(address, "ipv4_mapped", None)
    assert source == (str(mapped or address), port)
