"""The PROXY protocol header, v2 and v1, parsed from bytes with no I/O
(gateway.edge.proxy_protocol)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edge.proxy_protocol import (
    FIRST_READ_BYTES,
    FIXED_BYTES,
    SIGNATURE,
    V1_MAX_BYTES,
    ProxyHeader,
    bytes_missing,
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
        pytest.param(b"POST / HTTP/1.1\r\n\r\n", "missing", id="plain-http-post"),
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
        bytes_missing(data[:FIXED_BYTES])  # what a reader checks first, as the bytes arrive
        return parse_header(data)

    with pytest.raises(ProxyHeaderError) as raised:
        read()
    assert raised.value.reason == reason
    assert str(raised.value)  # the log line says what was wrong


def test_garbage_is_refused_at_its_first_byte() -> None:
    """A client that sends no header is refused on its first byte, not after a timeout."""
    assert bytes_missing(b"") == FIRST_READ_BYTES == 15  # the shortest v1 line
    for first in range(256):
        start = bytes((first,))
        if SIGNATURE.startswith(start):
            assert bytes_missing(start) == FIXED_BYTES - 1
        elif start == b"P":
            assert bytes_missing(start) == 15 - 1
        else:
            with pytest.raises(ProxyHeaderError):
                bytes_missing(start)


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


# -- version 1: one line of text (section 2.1) ---------------------------------------------

V1_TCP4 = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
# The longest line a receiver must take (section 2.1): UNKNOWN with full IPv6 addresses.
FULL_IPV6 = ":".join(["ffff"] * 8).encode()
V1_LONGEST = b"PROXY UNKNOWN " + FULL_IPV6 + b" " + FULL_IPV6 + b" 65535 65535\r\n"
TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))


def read_off(stream: bytes, cuts: list[int]) -> bytes:
    """What a reader takes off ``stream``: reads no longer than :func:`bytes_missing` allows,
    each also cut short where the network delivered only part (``cuts``, in turn)."""
    data = b""
    arrivals = iter(cuts)
    while missing := bytes_missing(data):
        size = min(missing, next(arrivals, missing))
        chunk = stream[len(data) : len(data) + size]
        assert chunk, "read past the end of the stream"
        data += chunk
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            V1_TCP4,
            ProxyHeader("proxy", ("203.0.113.7", 51234), ("10.0.0.5", 8443)),
            id="tcp4",
        ),
        pytest.param(
            V1_TCP6,
            ProxyHeader("proxy", ("2001:db8::7", 40000), ("2001:db8::1", 443)),
            id="tcp6",
        ),
        pytest.param(
            b"PROXY TCP6 ::FFFF:198.51.100.9 ::1 1 2\r\n",
            ProxyHeader("proxy", ("198.51.100.9", 1), ("::1", 2)),
            id="tcp6-ipv4-mapped-shown-as-ipv4",
        ),
        pytest.param(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            ProxyHeader("proxy", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
            id="tcp4-port-bounds",
        ),
        pytest.param(
            b"PROXY TCP6 :: :: 0 0\r\n",
            ProxyHeader("proxy", ("::", 0), ("::", 0)),
            id="tcp6-shortest",
        ),
        pytest.param(V1_UNKNOWN, ProxyHeader("proxy", None), id="unknown-short-form"),
        pytest.param(
            b"PROXY UNKNOWN 203.0.113.7 10.0.0.5 1 2\r\n",
            ProxyHeader("proxy", None),
            id="unknown-rest-ignored",
        ),
        pytest.param(V1_LONGEST, ProxyHeader("proxy", None), id="longest-107-bytes"),
    ],
)
def test_v1_parses_the_client_address(data: bytes, expected: ProxyHeader) -> None:
    """A whole v1 line gives the client's address; UNKNOWN leaves the TCP peer as the client."""
    assert parse_header(data) == expected
    assert read_off(data + TLS_HELLO, []) == data


def test_v1_longest_line_is_107_bytes() -> None:
    """Section 2.1's worst case, CRLF included, is the bound: one byte more is refused."""
    assert len(V1_LONGEST) == V1_MAX_BYTES == 107
    longer = b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 14 - 1) + b"\r\n"
    assert len(longer) == V1_MAX_BYTES + 1
    for data in (longer, longer[:-2] + b"\r"):
        with pytest.raises(ProxyHeaderError) as raised:
            read_off(data + TLS_HELLO, [])
        assert raised.value.reason == "malformed"
    with pytest.raises(ProxyHeaderError) as raised:
        parse_header(longer)
    assert raised.value.reason == "malformed"


@pytest.mark.parametrize("header", [V1_TCP4, V1_TCP6, V1_UNKNOWN, V1_LONGEST])
def test_v1_split_over_reads_stops_at_its_crlf(header: bytes) -> None:
    """However the line arrives (a byte at a time, cut at any one place, in two reads), the
    reader takes exactly the line and not one byte of the ClientHello behind it."""
    stream = header + TLS_HELLO
    assert read_off(stream, [1] * len(header)) == header
    for cut in range(1, len(header)):
        assert read_off(stream, [cut]) == header
        assert read_off(stream, [cut, 1, 1, 2]) == header


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        pytest.param(b"", 15, id="nothing-yet"),
        pytest.param(b"PROXY", 10, id="prefix"),
        pytest.param(b"PROXY T", 22 - 7, id="tcp-word-tcp6-shortest"),
        pytest.param(b"PROXY TCP4 ", 32 - 11, id="tcp4-shortest"),
        pytest.param(b"PROXY TCP4 203.0.113.7", 1 + 7 + 2 + 2 + 2, id="after-source"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443", 2, id="crlf-left"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443\r", 1, id="lf-left"),
        pytest.param(V1_TCP4, 0, id="whole"),
        pytest.param(b"PROXY UNKNOWN", 2, id="unknown"),
        pytest.param(b"PROXY UNKNOWN ffff", 2, id="unknown-rest"),
    ],
)
def test_v1_bytes_missing_is_what_the_grammar_still_requires(start: bytes, expected: int) -> None:
    """Each read is bounded by the shortest way the line could still end."""
    assert bytes_missing(start) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443\n", "truncated", id="lf-only"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234", "truncated", id="no-crlf"),
        pytest.param(b"PROXY UDP4 203.0.113.7 10.0.0.5 1 2\r\n", "malformed", id="udp4"),
        pytest.param(b"PROXY tcp4 203.0.113.7 10.0.0.5 1 2\r\n", "malformed", id="lowercase"),
        pytest.param(b"PROXY TCP4\r\n", "malformed", id="no-fields"),
        pytest.param(b"PROXY TCP\r\n", "malformed", id="cut-word"),
        pytest.param(b"PROXY UNKNOWNX\r\n", "malformed", id="unknown-no-space"),
        pytest.param(b"PROXY  TCP4 203.0.113.7 10.0.0.5 1 2\r\n", "malformed", id="two-spaces"),
        pytest.param(b"PROXY TCP4 203.0.113.7  10.0.0.5 1 2\r\n", "malformed", id="double-space"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2 \r\n", "malformed", id="trailing"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1\r\n", "malformed", id="three-fields"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2 3\r\n", "malformed", id="five"),
        pytest.param(b"PROXY TCP4 203.0.113.07 10.0.0.5 1 2\r\n", "malformed", id="octet-0"),
        pytest.param(b"PROXY TCP4 203.0.113.256 10.0.0.5 1 2\r\n", "malformed", id="octet-256"),
        pytest.param(b"PROXY TCP4 203.0.113 10.0.0.5 1 2\r\n", "malformed", id="three-octets"),
        pytest.param(b"PROXY TCP4 2001:db8::7 10.0.0.5 1 2\r\n", "malformed", id="tcp4-ipv6"),
        pytest.param(b"PROXY TCP6 203.0.113.7 ::1 1 2\r\n", "malformed", id="tcp6-ipv4"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed", id="ipv6-zone"),
        pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "malformed", id="ipv6-nine"),
        pytest.param(b"PROXY TCP6 12345:: ::1 1 2\r\n", "malformed", id="ipv6-group-5"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 01 2\r\n", "malformed", id="port-0"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 00\r\n", "malformed", id="port-00"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 65536 2\r\n", "malformed", id="port-big"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 +1 2\r\n", "malformed", id="port-sign"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2\r\r\n", "malformed", id="cr-cr-lf"),
        pytest.param(b"PROXY TCP4 203.0.113.7\r\n", "malformed", id="crlf-early"),
        pytest.param(V1_TCP4 + b"\x16", "malformed", id="bytes-after-crlf"),
        pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "malformed", id="108-bytes"),
        pytest.param(b"PROXYTCP4 203.0.113.7 10.0.0.5 1 2\r\n", "missing", id="no-space"),
        pytest.param(b"PUT / HTTP/1.1\r\n\r\n", "missing", id="http-put"),
    ],
)
def test_v1_refuses_a_malformed_line(data: bytes, reason: str) -> None:
    """Section 2.1 read strictly: the protocol word, single spaces, each address in its
    family's form, ports in decimal without leading zeros, CRLF, at most 107 bytes."""
    with pytest.raises(ProxyHeaderError) as raised:
        parse_header(data)
    assert raised.value.reason == reason
    assert str(raised.value)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443 1", id="fifth-field"),
        pytest.param(b"PROXY TCP4 2001:", id="ipv6-bytes-in-tcp4"),
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.5 x", id="letter-in-port"),
        pytest.param(b"PROXY TCP4 203.0.113.7\n", id="lone-lf"),
        pytest.param(b"PROXY UDP4", id="unknown-protocol"),
        pytest.param(b"PROXY UNKNOWN\t", id="unknown-then-tab"),
        pytest.param(b"PROXY UNKNOWN " + b"x" * 92, id="no-crlf-in-107"),
    ],
)
def test_v1_refused_while_reading_as_soon_as_it_goes_wrong(stream: bytes) -> None:
    """A line that has already broken the grammar is refused before the reader waits for
    more of it, and without reading past what arrived."""
    with pytest.raises(ProxyHeaderError) as raised:
        read_off(stream, [])
    assert raised.value.reason == "malformed"


@given(
    address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    port=st.integers(0, 65535),
    after=st.binary(max_size=64),
    cut=st.integers(1, 120),
)
@settings(max_examples=300)
def test_any_v1_line_reads_back_its_address_and_stops_at_its_crlf(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, after: bytes, cut: int
) -> None:
    """Whatever the address, the port and the bytes behind it, however the first read is
    cut, the reader stops exactly at the CRLF and the source comes back as sent."""
    word, destination = (b"TCP4", "10.0.0.5") if address.version == 4 else (b"TCP6", "::1")
    fields = (word, str(address).encode(), destination.encode(), port)
    header = b"PROXY %s %s %s %d 443\r\n" % fields
    assert read_off(header + after, [cut]) == header
    source = parse_header(header).source
    mapped = getattr(address, "ipv4_mapped", None)
    assert source == (str(mapped or address), port)
