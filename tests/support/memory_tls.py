"""A blocking TLS client whose records are made in memory (``ssl.MemoryBIO``), so that a test
decides how its bytes are cut into the socket's writes: what goes before the ClientHello in the
same write (a PROXY protocol header), a record split in two, two records in one write."""

from __future__ import annotations

import socket
import ssl

__all__ = ["feed", "handshake"]


def handshake(
    sock: socket.socket, context: ssl.SSLContext, *, first: bytes = b""
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Complete a client handshake with localhost over the connected ``sock``, ``first`` sent
    in the same write as the ClientHello; the TLS object and its incoming and outgoing buffers,
    with everything the handshake wrote sent. Raises ssl.SSLError (an OSError) when the server
    refuses the handshake or closes the connection during it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(first + outgoing.read())
            first = b""
            feed(sock, incoming)
    sock.sendall(outgoing.read())  # the client's Finished (TLS 1.3)
    return tls, incoming, outgoing


def feed(sock: socket.socket, incoming: ssl.MemoryBIO) -> bool:
    """One read of ``sock`` into ``incoming``; False at the end of stream (then marked there,
    so the TLS object raises rather than waits for more)."""
    data = sock.recv(65536)
    if not data:
        incoming.write_eof()
        return False
    incoming.write(data)
    return True
