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

Nor does it decode the client's certificate at the end of each handshake: asyncio puts
``getpeercert()`` into the transport's extra information there, which the listener no longer
reads (it decides from the certificate's bytes, gateway.edge.identity.Verdicts); it is decoded
when first asked for.
"""

from __future__ import annotations

import ssl
from asyncio import sslproto
from typing import Any

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

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        # asyncio's own method (the same from Python 3.11 to 3.13) without getpeercert(),
        # whose dict _get_extra_info makes when asked; its debug timing is left out too.
        handle = self._handshake_timeout_handle  # type: ignore[has-type]
        if handle is not None:
            handle.cancel()
            self._handshake_timeout_handle = None
        sslobj = self._sslobj
        assert sslobj is not None
        try:
            if handshake_exc is not None:
                raise handshake_exc
            self._set_state(sslproto.SSLProtocolState.WRAPPED)  # type: ignore[attr-defined]
        except Exception as exc:
            self._set_state(sslproto.SSLProtocolState.UNWRAPPED)  # type: ignore[attr-defined]
            if isinstance(exc, ssl.CertificateError):
                msg = "SSL handshake failed on verifying the certificate"
            else:
                msg = "SSL handshake failed"
            self._fatal_error(exc, msg)
            self._wakeup_waiter(exc)
            return
        self._extra.update(
            cipher=sslobj.cipher(), compression=sslobj.compression(), ssl_object=sslobj
        )
        if self._app_state == sslproto.AppProtocolState.STATE_INIT:  # type: ignore[has-type]
            self._app_state = sslproto.AppProtocolState.STATE_CON_MADE
            self._app_protocol.connection_made(self._get_app_transport())  # type: ignore[attr-defined]
        self._wakeup_waiter()
        self._do_read()  # type: ignore[attr-defined]

    def _get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peercert" and "ssl_object" in self._extra:
            extra = self._extra
            if name not in extra:
                extra[name] = extra["ssl_object"].getpeercert()
        return super()._get_extra_info(name, default)
