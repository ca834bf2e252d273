"""The HTTP/1.1 core (gateway.edge.http1) with bytes alone: no socket, no TLS, no clock.

Each request kind below comes with the events it must give; a stream of kinds must give their
events in order, up to the first that ends the connection, however the stream is cut into reads.
The real-socket tests (test_listener.py) and the adversarial suite check the same over mTLS.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.edge.http1 import Continue, Event, Http1, Limits, Refusal, Request, State
from gateway.errors import Forbidden, RequestTimeout

PATH = "/webhook"
LIMITS = Limits(max_body_bytes=200, max_head_bytes=1024, max_url_bytes=256)

# What a test compares: ("request", method, url, signature, keep_alive, body), ("continue",) or
# ("refusal", status).
Seen = tuple[object, ...]


def _seen(events: list[Event]) -> list[Seen]:
    seen: list[Seen] = []
    for event in events:
        if isinstance(event, Request):
            seen.append(
                ("request", event.method, event.url, event.signature, event.keep_alive, event.body)
            )
        elif isinstance(event, Refusal):
            seen.append(("refusal", event.error.status))
        else:
            seen.append(("continue",))
    return seen


def _post(body: bytes, *, version: str = "1.1", extra: str = "", path: str = PATH) -> bytes:
    head = (
        f"POST {path} HTTP/{version}\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        f"X-Hub-Signature-256: sha256={len(body):064x}\r\n{extra}\r\n"
    )
    return head.encode() + body


def _signature(body: bytes) -> str:
    return f"sha256={len(body):064x}"


def _chunked(body: bytes) -> bytes:
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part)
    return (
        b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        + pieces
        + b"0\r\n\r\n"
    )


def _kind(kind: str, index: int) -> tuple[bytes, list[Seen], bool]:
    """The bytes of one request of ``kind``, the events they give, and whether it is the last
    request the connection reads."""
    body = b'{"n": %d, "pad": "%s"}' % (index, b"x" * (index % 5))
    url = f"{PATH}?hub.mode=subscribe&hub.challenge={index}".encode()
    get = b"GET %s HTTP/1.1\r\nHost: localhost\r\n" % url
    post = ("request", b"POST", PATH.encode(), _signature(body), True, body)
    if kind == "post":
        return _post(body), [post], False
    if kind == "chunked":
        return _chunked(body), [("request", b"POST", PATH.encode(), None, True, body)], False
    if kind == "handshake":
        return get + b"\r\n", [("request", b"GET", url, None, True, b"")], False
    if kind == "head":
        request = b"HEAD %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % url
        return request, [("request", b"HEAD", url, None, True, b"")], False
    if kind == "blank":  # RFC 9112, 2.2: empty lines before a request are ignored
        return b"\r\n", [], False
    if kind == "expect":
        return _post(body, extra="Expect: 100-continue\r\n"), [("continue",), post], False
    if kind == "expect_http10":  # a 1.0 client cannot know 100: no Continue
        request = _post(
            body, version="1.0", extra="Connection: keep-alive\r\nExpect: 100-continue\r\n"
        )
        return request, [("request", b"POST", PATH.encode(), _signature(body), True, body)], False
    if kind == "http10":
        return _post(body, version="1.0"), [(*post[:4], False, body)], True
    if kind == "close":
        request = get + b"Connection: close\r\n\r\n"
        return request, [("request", b"GET", url, None, False, b"")], True
    if kind == "expect_elsewhere":  # refused at once rather than promised a reading
        request = _post(body, extra="Expect: 100-continue\r\n", path="/elsewhere")
        return request, [("refusal", 404)], True
    if kind == "expect_put":
        request = _post(body, extra="Expect: 100-continue\r\n").replace(b"POST", b"PUT", 1)
        return request, [("refusal", 405)], True
    if kind == "announced_too_large":
        return _post(b"y" * (LIMITS.max_body_bytes + 1 + index)), [("refusal", 413)], True
    if kind == "chunked_too_large":
        return _chunked(b"z" * (LIMITS.max_body_bytes + 1)), [("refusal", 413)], True
    if kind == "url_too_long":
        request = b"GET /webhook?%s HTTP/1.1\r\n\r\n" % (b"q" * LIMITS.max_url_bytes)
        return request, [("refusal", 414)], True
    if kind == "head_too_large":
        lines = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"f" * 100) for n in range(12))
        return get + lines + b"\r\n", [("refusal", 431)], True
    if kind == "coding":
        request = get + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        return request, [("refusal", 501)], True
    if kind == "version":
        return b"GET /webhook HTTP/2.0\r\n\r\n", [("refusal", 505)], True
    if kind == "malformed":
        return b"NOT HTTP AT ALL\r\n\r\n", [("refusal", 400)], True
    if kind == "no_host":  # RFC 9112, 3.2: an HTTP/1.1 request must name its host
        return _post(body).replace(b"Host: localhost\r\n", b""), [("refusal", 400)], True
    if kind == "two_hosts":  # and only once
        return _post(body, extra="Host: elsewhere\r\n"), [("refusal", 400)], True
    if kind == "http10_no_host":  # HTTP/1.0 had no Host header: none is asked of it
        request = _post(body, version="1.0").replace(b"Host: localhost\r\n", b"")
        return request, [(*post[:4], False, body)], True
    if kind == "upgrade_post":  # one answer, the refusal: never one to the body left unread
        return (
            _post(body, extra="Connection: Upgrade\r\nUpgrade: h2c\r\n"),
            [("refusal", 400)],
            True,
        )
    assert kind == "upgrade"  # refused, and answered once: no protocol switch
    request = get + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    return request, [("refusal", 400)], True


KINDS = (
    "post",
    "chunked",
    "handshake",
    "head",
    "blank",
    "expect",
    "expect_http10",
    "http10",
    "close",
    "expect_elsewhere",
    "expect_put",
    "announced_too_large",
    "chunked_too_large",
    "url_too_long",
    "head_too_large",
    "coding",
    "version",
    "malformed",
    "no_host",
    "two_hosts",
    "http10_no_host",
    "upgrade_post",
    "upgrade",
)


_EXPECTING = ("expect", "expect_elsewhere", "expect_put")
_NOT_META = Forbidden("client certificate CN not allowed")


def _stream(kinds: list[str], *, not_meta: bool = False) -> tuple[bytes, list[Seen], bool]:
    """The requests of ``kinds`` in one stream, the events expected of it, and whether one of
    them ends the connection. ``not_meta``: every request will be refused (the client's CN),
    so an HTTP/1.1 ``Expect: 100-continue`` gets that refusal at once."""
    data, expected = b"", []
    for index, kind in enumerate(kinds):
        request, seen, last = _kind(kind, index)
        if not_meta and kind in _EXPECTING:
            seen, last = [("refusal", 403)], True
        data += request
        expected += seen
        if last:
            return data, expected, True
    return data, expected, False


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _feed(pieces: list[bytes], *, not_meta: bool = False) -> tuple[Http1, list[Event]]:
    http = Http1(LIMITS, PATH)
    if not_meta:
        http.refuse_every_request = _NOT_META
    events: list[Event] = []
    for when, piece in enumerate(pieces):
        events += http.feed(piece, float(when))
    return http, events


@pytest.mark.parametrize("kind", KINDS)
def test_each_request_kind_gives_its_events_in_one_read(kind: str) -> None:
    """Each kind alone, in one read, gives exactly the events written beside it."""
    data, expected, _ = _stream([kind])
    assert _seen(_feed([data])[1]) == expected


@settings(max_examples=1000, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=40),
    not_meta=st.booleans(),
)
@example(kinds=["post", "expect", "handshake", "close"], cuts=list(range(2000)), not_meta=False)
def test_any_cut_of_a_request_stream_gives_the_expected_events(
    kinds: list[str], cuts: list[int], not_meta: bool
) -> None:
    """Pipelined requests, limits and refusals, cut into reads anywhere (down to single bytes),
    give the events expected of them, in order, and nothing after the connection's last."""
    data, expected, ended = _stream(kinds, not_meta=not_meta)
    http, events = _feed(_cut(data, cuts), not_meta=not_meta)
    assert _seen(events) == expected
    starts = [event.started for event in events if not isinstance(event, Continue)]
    assert starts == sorted(starts), "each request starts no earlier than the one before"
    assert (http.state is State.DONE) == ended
    if ended:
        assert http.feed(_post(b"{}"), 9e9) == [], "nothing is read after the last request"
    else:
        assert _seen(http.feed(_post(b"{}"), 9e9))[0][0] == "request"


def test_every_single_cut_of_a_pipelined_stream_gives_the_same_events() -> None:
    """A stream of every kind that keeps the connection, cut in two at each byte, then in
    three at each pair of a coarse grid: the events of one read every time."""
    kinds = [k for k in KINDS if not _kind(k, 0)[2]] + ["close"]
    data, expected, _ = _stream(kinds)
    for cut in range(len(data) + 1):
        assert _seen(_feed([data[:cut], data[cut:]])[1]) == expected, cut
    for first in range(0, len(data), 37):
        for second in range(first, len(data), 41):
            pieces = [data[:first], data[first:second], data[second:]]
            assert _seen(_feed(pieces)[1]) == expected, (first, second)


def test_a_header_line_that_never_ends_is_refused_past_the_head_limit() -> None:
    """Reads that never complete a header line are counted: 431 once they pass the limit."""
    http = Http1(LIMITS, PATH)
    assert http.feed(b"GET /webhook HTTP/1.1\r\nX-Endless: ", 0.0) == []
    events: list[Event] = []
    for when in range(1, 20):
        events += http.feed(b"y" * 100, float(when))
    assert _seen(events) == [("refusal", 431)]
    assert http.state is State.DONE


def test_large_bodies_in_many_reads_are_not_mistaken_for_a_large_head() -> None:
    """Reads that carry a body and the start of the next head never count toward that head."""
    big = Limits(max_body_bytes=100_000, max_head_bytes=1024)
    http = Http1(big, PATH)
    body = b"b" * 50_000
    one = _post(body)
    data = one * 3
    # Each read ends 20 bytes into the next request's head, then 2,000 bytes into its body.
    ends = sorted(
        {n * len(one) + 20 for n in range(1, 3)} | {n * len(one) + 2000 for n in range(3)}
    )
    events: list[Event] = []
    for start, end in itertools.pairwise([0, *ends, len(data)]):
        events += http.feed(data[start:end], 0.0)
    assert [e.body for e in events if isinstance(e, Request)] == [body] * 3


def test_a_malformed_line_after_an_unknown_coding_gets_one_refusal_however_it_is_read() -> None:
    """httptools hands a header over when the next one starts, or when a read ends there: the
    coding is judged at the end of the head, so one read and single bytes agree (found by
    fuzz/run.sh http1)."""
    data = b"POST /webhook HTTP/1.1\r\nTransfer-Encoding: gzip\r\n5\r\n\r\n"
    one = _seen(Http1(LIMITS, PATH).feed(data, 0.0))
    bytewise = Http1(LIMITS, PATH)
    events: list[Event] = []
    for index in range(len(data)):
        events += bytewise.feed(data[index : index + 1], 0.0)
    assert _seen(events) == one == [("refusal", 400)]


def test_a_refused_identity_gets_its_refusal_instead_of_100_continue() -> None:
    """With every request to be refused (a CN not Meta's), Expect gets that refusal at once."""
    http = Http1(LIMITS, PATH)
    http.refuse_every_request = _NOT_META
    events = http.feed(_post(b"{}", extra="Expect: 100-continue\r\n"), 0.0)
    assert _seen(events) == [("refusal", 403)]


def test_a_request_too_slow_is_refused_with_its_start_and_method_kept() -> None:
    """refuse() ends the request being received: its refusal keeps when it began."""
    http = Http1(LIMITS, PATH)
    assert http.receiving_since is None
    http.feed(b"\r\n", 1.0)
    assert http.receiving_since is None, "empty lines start no request"
    http.feed(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{", 2.0)
    assert http.state is State.BODY
    assert http.receiving_since == 2.0
    refusal = http.refuse(RequestTimeout("request not received in time"), 9.0)
    assert refusal is not None
    assert (refusal.error.status, refusal.started, refusal.method) == (408, 2.0, b"POST")
    assert (http.state, http.feed(b"}", 10.0)) == (State.DONE, [])
    assert http.refuse(RequestTimeout("again"), 11.0) is None, "a stream refuses once"


@pytest.mark.parametrize(
    ("data", "state"),
    [
        pytest.param(b"", State.IDLE, id="nothing"),
        pytest.param(b"\r\n", State.IDLE, id="an empty line"),
        pytest.param(b"GET /webhook HT", State.HEAD, id="a request line"),
        pytest.param(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", State.BODY, id="head"
        ),
        pytest.param(
            b"GET /webhook HTTP/1.1\r\nHost: x\r\n\r\n", State.IDLE, id="a request, keep-alive"
        ),
        pytest.param(b"GET /webhook HTTP/1.0\r\n\r\n", State.DONE, id="a request, close"),
        pytest.param(b"\x16\x03\x01", State.DONE, id="refused"),
    ],
)
def test_the_state_says_where_the_stream_stands(data: bytes, state: State) -> None:
    """The state after some bytes: between requests, in a head, in a body, or done."""
    http = Http1(LIMITS, PATH)
    http.feed(data, 0.0)
    assert http.state is state
