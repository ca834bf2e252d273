"""One kept HTTP/1.1 connection to the OTLP collector: a POST written in one system call, the
answer's status read with as few reads as it arrives in.

Rule: only what an export needs. The request's head and body go out together (``sendmsg`` of
both, no copy of a body of a few hundred kilobytes; ``sendall`` of the two joined over TLS), and
the answer is read into one buffer: its status line and the two headers that say how it ends
(``Content-Length``, ``Connection``). An answer whose length is not given (chunked, or read to
the close) ends the connection after its status instead of being parsed: OTLP's answers are
small and the next export opens another. http.client did the same work with a buffered reader,
a write per part and the email package's header parser, each step taking the interpreter's lock
back from the event loop (bench/README.md, "Issue 24: tracing under load").
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

__all__ = ["Connection", "WireError"]

_HEAD_LIMIT: Final = 64 * 1024
_READ: Final = 16 * 1024


class WireError(OSError):
    """The collector's answer could not be read as HTTP/1.1."""


def _content_length(value: bytes) -> int:
    length = int(value)
    if length < 0:
        raise ValueError(value)
    return length


class Connection:
    """A connection to ``host:port`` (TLS with ``context``), opened at the first post."""

    def __init__(
        self, host: str, port: int, timeout_s: float, context: ssl.SSLContext | None
    ) -> None:
        self._host, self._port, self._timeout = host, port, timeout_s
        self._context = context
        self._sock: socket.socket | None = None
        self._buffer = bytearray(_READ)

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def post(self, head: bytes, body: bytes) -> int:
        """Send ``head`` (the request line and headers, ending with the blank line) and
        ``body``; the answer's status. Raises OSError (the connection is then closed)."""
        sock = self._sock or self._open()
        try:
            self._send(sock, head, body)
            status, keep = self._answer(sock)
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        return status

    @staticmethod
    def _send(sock: socket.socket, head: bytes, body: bytes) -> None:
        if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS
            sock.sendall(head + body)
            return
        sent = sock.sendmsg([head, body])
        if sent < len(head):
            sock.sendall(head[sent:])
            sent = len(head)
        if sent < len(head) + len(body):
            with memoryview(body) as rest:
                sock.sendall(rest[sent - len(head) :])

    def _answer(self, sock: socket.socket) -> tuple[int, bool]:
        """The status, and whether the connection may carry the next request."""
        buffer = self._buffer
        got = bytearray()
        while (end := got.find(b"\r\n\r\n")) < 0:
            if len(got) > _HEAD_LIMIT:
                raise WireError("the collector's answer has no end of headers")
            count = sock.recv_into(buffer)
            if not count:
                raise WireError("the collector closed the connection before answering")
            got += memoryview(buffer)[:count]
        lines = bytes(got[:end]).split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise WireError("the collector's answer has no status") from None
        if not version.startswith(b"HTTP/1."):
            raise WireError("the collector's answer is not HTTP/1.x")
        length: int | None = None
        keep = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = _content_length(value)
                except ValueError:
                    raise WireError("the collector's Content-Length is not a number") from None
            elif name == b"connection":
                keep = value.strip().lower() == b"keep-alive" or (
                    keep and value.strip().lower() != b"close"
                )
            elif name == b"transfer-encoding":
                length = None
                keep = False  # chunked: not parsed, the connection ends here
                break
        if status in (204, 304):  # no body, whatever the headers say
            length = 0
        if length is None or status < 200:  # read to the close, or an interim answer
            return status, False
        left = length - (len(got) - end - 4)
        while left > 0:  # the answer's body, read and dropped
            count = sock.recv_into(buffer, min(left, len(buffer)))
            if not count:
                return status, False
            left -= count
        return status, keep and left == 0
