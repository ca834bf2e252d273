"""HTTP/1.1 as a state machine: bytes in, requests and refusals out, and no I/O.

Rule: everything that decides what a connection's bytes mean lives here: framing (llhttp, through
httptools), the limits on the head and the body, the version, keep-alive and ``Expect:
100-continue``. :meth:`Http1.feed` takes the bytes of one read and the time it arrived and returns
the events they complete; it reads no clock, socket or setting of its own. The asyncio adapter
(:mod:`gateway.edge.listener`) writes answers, keeps flow control and runs the timers.

A connection's life, in :class:`State`::

    IDLE --first byte--> HEAD --headers complete--> BODY --body complete--> IDLE (keep-alive)
                                                                       \\--> DONE (close)
    any state --refusal--> DONE          DONE: every further byte is ignored

Not checked here: whether the request is one the gateway serves (signature, JSON, routing). Its
target is checked only to decide ``Expect: 100-continue``, and with the same functions the
adapter uses to answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import unquote

import httptools

from gateway.errors import (
    BadRequest,
    HeadTooLarge,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Rejected,
    TransferCodingNotImplemented,
    UnsupportedMediaType,
    URLTooLong,
    VersionNotSupported,
)

__all__ = [
    "CONTINUE",
    "CONTINUE_LINE",
    "MAX_HEAD_BYTES",
    "MAX_URL_BYTES",
    "Continue",
    "Event",
    "Http1",
    "Limits",
    "Refusal",
    "Request",
    "State",
    "content_coded",
    "not_allowed",
    "response",
    "shortened",
    "signature_twice",
    "split_target",
]

MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers together (431 beyond)
MAX_URL_BYTES: Final = 8 * 1024  # (414 beyond)

_SHOWN_PATH = 100  # characters of an unknown path that answers and logs show
_TEXT = b"text/plain; charset=utf-8"
CONTINUE_LINE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Every status line, built once rather than looked up and encoded for each answer.
_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}


class State(enum.Enum):
    """Where a connection's byte stream stands."""

    IDLE = "idle"  # between requests: nothing of the next one yet (empty lines are skipped)
    HEAD = "head"  # inside a request line and its headers
    BODY = "body"  # the head is complete; its body is arriving
    DONE = "done"  # the last request is read (it asked to close, or was refused)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one request may hold; each limit has its refusal."""

    max_body_bytes: int  # 413 beyond, announced or arriving (chunked)
    max_head_bytes: int = MAX_HEAD_BYTES  # 431 beyond
    max_url_bytes: int = MAX_URL_BYTES  # 414 beyond


@dataclass(slots=True, eq=True)
class Request:
    """A complete request: the facts of its head the gateway uses, and its whole body."""

    started: float  # when its first byte was read
    method: bytes = b""
    url: bytes = b""  # the raw request target, path and query
    signature: str | None = None  # X-Hub-Signature-256, as sent
    traceparent: str | None = None  # a client's W3C trace context: at most a link, never a parent
    keep_alive: bool = False  # the connection stays open after its answer
    body: bytes = b""


@dataclass(slots=True, eq=True)
class Refusal:
    """Answer ``error`` (it carries the status) and close: the rest of the stream cannot be
    trusted to be where the parser stopped."""

    error: Rejected
    started: float
    method: bytes = b""  # empty when the refusal came before the head was complete


@dataclass(frozen=True, slots=True)
class Continue:
    """Send ``100 Continue`` now unless an earlier answer is still owed (it must not come
    before those, RFC 9112, 9.3.2; the client then sends the body after its own wait)."""


CONTINUE: Final = Continue()

Event = Request | Refusal | Continue


class _Stop(Exception):
    """Raised inside a parser callback to stop llhttp; what stopped it is in :attr:`Http1.state`."""


def split_target(raw_url: bytes) -> tuple[str, bytes | None]:
    """The decoded path and the raw query of a request target; raises BadRequest."""
    try:
        url = httptools.parse_url(raw_url)
    except httptools.HttpParserInvalidURLError:
        raise BadRequest("malformed request URL") from None
    return unquote(url.path.decode("latin-1")), url.query


def shortened(path: str) -> str:
    # Whoever asks chooses the path, and it reaches answers and the log.
    return path if len(path) <= _SHOWN_PATH else path[:_SHOWN_PATH] + "..."


def not_allowed(method: str) -> MethodNotAllowed:
    return MethodNotAllowed(f"method {method} is not allowed here; use GET or POST")


# The refusals both front doors make alike (this parser, and the aiohttp application of
# gateway.runtime.app), each written once.


def signature_twice() -> BadRequest:
    """A request with a second ``X-Hub-Signature-256``: which copy is Meta's? Neither."""
    return BadRequest("X-Hub-Signature-256 is sent more than once")


def content_coded(coding: str) -> UnsupportedMediaType | None:
    """The refusal of a body sent with the content coding ``coding`` (a ``Content-Encoding``
    value), or None for identity: the signature covers the bytes as sent (Meta: "Validating
    payloads"), and a body compressed on the way is not what Meta signed, nor decompressed."""
    if coding.strip().lower() in ("", "identity"):
        return None
    return UnsupportedMediaType("a Content-Encoding other than identity is not accepted")


def response(
    status: int, body: bytes, keep_alive: bool, date: bytes, extra: bytes = b"", head: bool = False
) -> bytes:
    """An answer's bytes: ``text/plain`` ``body`` (left out for HEAD, its length kept)."""
    return b"".join(
        (
            _STATUS_LINES[status],
            b"Date: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (date, _TEXT, len(body)),
            extra,
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
            b"" if head else body,
        )
    )


class Http1:
    """One connection's requests, from its bytes: ``feed`` each read, act on the events."""

    def __init__(self, limits: Limits, path: str) -> None:
        self.limits = limits
        self.path = path  # the one path served: decides Expect: 100-continue
        self.state = State.IDLE
        self.refuse_every_request: Rejected | None = None  # e.g. the client's CN is not Meta's
        self._parser = httptools.HttpRequestParser(self)
        # llhttp would refuse HTTP/1.2 or 3.0 as malformed (400); accepted here, they reach the
        # version check in on_headers_complete and get the 505 RFC 9110, 15.6.6 prescribes.
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self._events: list[Event] = []
        self._now = 0.0
        # The request being received, and what is counted while it arrives.
        self._request: Request | None = None
        self._chunks: list[bytes] = []
        self._size = 0  # body bytes so far
        self._content_length = -1
        self._expect_continue = False
        self._other_coding = False  # a transfer coding other than chunked
        self._transfer_coded = False  # a Transfer-Encoding header, chunked or not
        self._hosts = 0  # the Host header lines of its head
        # The refusal of a content coding other than identity, once the head is complete.
        self._content_coding: UnsupportedMediaType | None = None
        self._head_bytes = 0  # its header lines, as parsed
        self._head_read = 0  # its reads that began and ended inside its head (or trailers)
        # After a chunk's size line, until its first data byte or the chunk's end: for the
        # last chunk (size 0), the trailer section, whose lines httptools keeps in memory.
        self._in_trailers = False

    @property
    def receiving_since(self) -> float | None:
        """When the request being received began, or None between requests."""
        return self._request.started if self._request is not None else None

    def feed(self, data: bytes, now: float) -> list[Event]:
        """The events the bytes of one read complete, in stream order; ``now`` is their time."""
        if self.state is State.DONE:
            return []
        self._now = now
        events: list[Event] = []
        self._events = events
        head = self._request if self.state is State.HEAD else None  # the head this read continues
        trailers = self._request if self._in_trailers else None  # or the trailer section
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self._done():  # not one of ours: a bug, not the peer's doing
                raise
            return events
        except httptools.HttpParserUpgrade:
            # llhttp completes a request that asks for another protocol without reading its
            # body (the bytes after its head belong to that protocol), then stops. The gateway
            # speaks none but HTTP/1.1, so that request gets one answer, this refusal, rather
            # than an answer to a bodiless copy of it followed by a second one (RFC 9112, 9.3:
            # one response per request, in order). Requests before it in the read stand.
            refusal = BadRequest("protocol upgrades are not supported")
            upgraded = events[-1] if events else None
            if isinstance(upgraded, Request):
                events[-1] = Refusal(refusal, upgraded.started, upgraded.method)
                self._request = None
                self.state = State.DONE
            else:
                self._refuse(refusal)
            return events
        except httptools.HttpParserError:
            # Also what llhttp says of bytes after a request that closes: ignored once DONE.
            self._refuse(BadRequest("malformed HTTP request"))
            return events
        # A header line that never ends reaches no parser callback, so reads are counted too;
        # but only a read that began and ended inside one and the same head is all head bytes.
        # One that also carries a body, or the end of one request and the start of the next,
        # must not be mistaken for a large head (the first read of a head is left out: it is
        # bounded by the read size, and its complete lines are counted in on_header).
        # A trailer line that never ends is the same: httptools grows its bytes with each read
        # (copying them all each time) until the request times out, so a read that began and
        # ended in the trailer section counts too, against the head's limit as its complete
        # lines do (on_header).
        if (head is not None and head is self._request and self._in_head()) or (
            trailers is not None and trailers is self._request and self._trailing()
        ):
            self._head_read += len(data)
            if self._head_read > self.limits.max_head_bytes:
                self._refuse(
                    HeadTooLarge(f"request head exceeds {self.limits.max_head_bytes} bytes")
                )
        return events

    # The parser's callbacks move the state during feed_data: asked afresh, not narrowed.
    def _done(self) -> bool:
        return self.state is State.DONE

    def _in_head(self) -> bool:
        return self.state is State.HEAD

    def _trailing(self) -> bool:
        return self._in_trailers

    def refuse(self, error: Rejected, now: float) -> Refusal | None:
        """Refuse the request being received (or the next) with ``error``, e.g. for taking too
        long; nothing more is read. None if the stream was over already."""
        self._now = now
        events: list[Event] = []
        self._events = events
        self._refuse(error)
        return next((event for event in events if isinstance(event, Refusal)), None)

    def _refuse(self, error: Rejected) -> None:
        if self.state is State.DONE:
            return
        request = self._request
        if request is None:
            self._events.append(Refusal(error, self._now))
        else:
            self._events.append(Refusal(error, request.started, request.method))
        self._request = None
        self.state = State.DONE

    def _stop(self, error: Rejected) -> _Stop:
        self._refuse(error)
        return _Stop()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is State.DONE:
            raise _Stop()
        self._request = Request(self._now)
        self.state = State.HEAD
        self._chunks = []
        self._size = self._head_bytes = self._head_read = 0
        self._content_length = -1
        self._expect_continue = self._other_coding = self._transfer_coded = False
        self._in_trailers = False
        self._content_coding = None
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        request = self._current()
        request.url += url
        if len(request.url) > self.limits.max_url_bytes:
            raise self._stop(URLTooLong(f"request URL exceeds {self.limits.max_url_bytes} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._current()
        # Counted here for a head that arrives in one read, and in feed for one that keeps
        # arriving without ever completing a header line.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_head_bytes:
            raise self._stop(
                HeadTooLarge(f"request head exceeds {self.limits.max_head_bytes} bytes")
            )
        if self.state is not State.HEAD:
            # A trailer, after a chunked body (httptools hands those over here too): counted
            # against the head's limit, never taken for a header of the head. A signature in a
            # trailer would otherwise replace the one the request was sent with.
            return
        name = name.lower()
        if name == b"x-hub-signature-256":
            if request.signature is not None:
                raise self._stop(signature_twice())
            request.signature = value.decode("latin-1")
        elif name == b"content-encoding":
            # Refused once the head is complete, as a transfer coding is (see below).
            self._content_coding = self._content_coding or content_coded(value.decode("latin-1"))
        elif name == b"traceparent":
            request.traceparent = value.decode("latin-1")
        elif name == b"content-length":
            self._content_length = int(value)  # the parser has checked it is digits
        elif name == b"host":
            self._hosts += 1
        elif name == b"expect":
            self._expect_continue = value.lower() == b"100-continue"
        elif name == b"transfer-encoding":
            self._transfer_coded = True  # even chunked: HTTP/1.0 has none (on_headers_complete)
            if value.strip().lower() != b"chunked":
                # llhttp frames "gzip, chunked" by its final chunked and would hand over the
                # still compressed bytes; no coding but chunked is understood here (RFC 9112,
                # 6.1: 501). Refused once the head is complete, not here: httptools hands a
                # header over when the next one starts, and where the read ends decides whether
                # that happens before a malformed line is seen (a 400 in one read and a 501 in
                # two otherwise).
                self._other_coding = True

    def on_headers_complete(self) -> None:
        request = self._current()
        self.state = State.BODY
        if self._other_coding:
            raise self._stop(
                TransferCodingNotImplemented("only the chunked transfer coding is supported")
            )
        if self._content_coding is not None:
            raise self._stop(self._content_coding)
        version = self._parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 and 2.0 parse too; neither is spoken here (RFC 9110, 15.6.6).
            raise self._stop(VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1"))
        request.method = self._parser.get_method()
        # RFC 9112, 3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header
        # and to any request with more than one; two hops that each take a different one of
        # two Host lines would disagree about where the request was going.
        if self._hosts > 1:
            raise self._stop(BadRequest("more than one Host header"))
        if self._hosts == 0 and version == "1.1":
            raise self._stop(BadRequest("HTTP/1.1 request without a Host header"))
        # An HTTP/1.0 message with Transfer-Encoding is framed faultily: it is read, answered
        # and the connection closed (RFC 9112, 6.1), whatever its Connection header asks;
        # llhttp would keep it open, and an HTTP/1.0 hop in front reads the rest differently.
        request.keep_alive = self._parser.should_keep_alive() and not (
            self._transfer_coded and version == "1.0"
        )
        limit = self.limits.max_body_bytes
        if self._content_length > limit:
            raise self._stop(
                PayloadTooLarge(f"body of {self._content_length} bytes exceeds {limit}")
            )
        if self._expect_continue and version == "1.1":
            # An HTTP/1.0 client's expectation is ignored: it cannot know 100 (RFC 9110, 10.1.1).
            self._expect(request)

    def on_chunk_header(self) -> None:
        self._in_trailers = True  # until a data byte comes (on_body): only the last has none

    def on_chunk_complete(self) -> None:
        self._in_trailers = False

    def on_body(self, chunk: bytes) -> None:
        self._in_trailers = False
        self._size += len(chunk)
        limit = self.limits.max_body_bytes
        if self._size > limit:  # a chunked body announces no length
            raise self._stop(PayloadTooLarge(f"body exceeds {limit} bytes"))
        self._chunks.append(chunk)

    def on_message_complete(self) -> None:
        request = self._current()
        self._request = None
        chunks = self._chunks
        request.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._events.append(request)
        self.state = State.IDLE if request.keep_alive else State.DONE

    # -- decisions -------------------------------------------------------------------------

    def _current(self) -> Request:
        assert self._request is not None, "parser callback outside a message"
        return self._request

    def _expect(self, request: Request) -> None:
        """``Expect: 100-continue``: the client waits for 100 before it sends the body.

        100 promises the body will be read (RFC 9110, 10.1.1), so it is sent only once every
        refusal that needs no body is ruled out; a request that will be refused gets that final
        answer now instead, and the connection closes, since the body may follow it or not."""
        if self.refuse_every_request is not None:
            raise self._stop(self.refuse_every_request)
        try:
            path, _ = split_target(request.url)
        except Rejected as exc:
            raise self._stop(exc) from None
        if path != self.path:
            raise self._stop(NotFound(f"no such path: {shortened(path)!r}"))
        if request.method != b"POST":
            if request.method not in (b"GET", b"HEAD"):
                raise self._stop(not_allowed(request.method.decode("latin-1")))
            return  # a handshake carries no body to wait for
        self._events.append(CONTINUE)
