"""Reading an established TLS connection on asyncio's own loop without an exception per read.

Rule: the application gets exactly the bytes, the end of stream and the errors asyncio's TLS
protocol gives it; only the last, fruitless call into OpenSSL of each read is left out.

Why: asyncio's ``SSLProtocol`` hands each read's decrypted bytes over by calling
``SSLObject.read`` until it raises ``SSLWantReadError``. On a keep-alive connection each read
from the socket holds one request in one TLS record, so every request paid for building,
raising and catching that exception (the ``ssl`` module formats its message each time): about
12,600 instructions, against 2,400 for asking the two buffers whether anything is left
(bench/README.md, issue 20). When the memory buffer of received bytes is empty and OpenSSL
holds no decrypted bytes (``SSLObject.pending``), the next read could only say "want read": it
is not made. A record cut short by the end of a read (OpenSSL keeps the part it has) is read
again, as before, once the rest arrives.
"""

from __future__ import annotations

import ssl
from asyncio import sslproto

__all__ = ["TLSReads"]

_AGAIN = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # sslproto.SSLAgainErrors


class TLSReads(sslproto.SSLProtocol):
    """asyncio's TLS protocol whose reads stop once nothing is left to decrypt."""

    # Set by asyncio's __init__ and handshake; declared for the type checker, whose stubs
    # leave them out.
    _sslobj: ssl.SSLObject | None
    _incoming: ssl.MemoryBIO

    def _do_read__copied(self) -> None:
        # asyncio's own method (the same from Python 3.11 to 3.13) but for the early stop: the
        # application protocol here is a plain asyncio.Protocol, so this is the path taken.
        sslobj = self._sslobj
        assert sslobj is not None  # set before the handshake, which precedes any read here
        incoming = self._incoming
        chunk = b"1"
        chunks: list[bytes] = []
        try:
            while True:
                chunk = sslobj.read(self.max_size)
                if not chunk:
                    break  # close_notify
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except _AGAIN:
            pass
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._app_protocol.data_received(data)  # type: ignore[attr-defined]
        if not chunk:
            self._call_eof_received()  # type: ignore[attr-defined]
            self._start_shutdown()
