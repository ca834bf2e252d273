"""The TLS handshake of each new callback connection: the protocol a listening socket starts with.

Rule: every accepted connection gets the event loop's own TLS protocol (uvloop's, or asyncio's)
wrapping the HTTP protocol, exactly as ``create_server(ssl=...)`` would, but with a waiter of our
own, so that a failed handshake is told (one log line and a count, by the listener) instead of
dropped without a word, which is what ``create_server(ssl=...)`` does with it.

Why not a plain protocol that calls ``loop.start_tls`` once connected (the previous way): uvloop
starts reading a new connection right after ``connection_made`` returns, whatever that did, so a
ClientHello that arrived before the task running ``start_tls`` got its turn went to the plain
protocol and was lost; the client then waited out the handshake timeout (30 s). On a busy machine
that was most new connections. It also cost a task and a protocol switch per connection. Here the
TLS protocol is the connection's first protocol: it starts the handshake in ``connection_made``
and reads every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

__all__ = ["Handshakes"]

# Told of each failed handshake: the peer's address ("-" when unknown) and the exception.
FailureHook = Callable[[str, BaseException], None]


def _tls_protocol_base(loop: asyncio.AbstractEventLoop) -> type[Any]:
    """The TLS protocol class the running loop uses for ``create_server(ssl=...)``."""
    uvloop = sys.modules.get("uvloop.loop")
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        # uvloop's own (Cython): its transport takes a fast path for it, found by isinstance.
        return type("_UvloopTlsProtocol", (_Tracked, uvloop.SSLProtocol), {})
    return type("_AsyncioTlsProtocol", (_Tracked, sslproto.SSLProtocol), {})


class _Tracked:
    """Mixed into the loop's TLS protocol: keeps the raw transport and the peer's address, for
    the failure's log line and for :meth:`Handshakes.abort_all`."""

    raw: asyncio.BaseTransport | None = None
    remote = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote = str(peer[0])
        super().connection_made(transport)  # type: ignore[misc]  # the loop's TLS protocol


class Handshakes:
    """A protocol factory for ``loop.create_server``: TLS with ``context``, then ``application()``.

    ``on_failure`` is called once for each connection whose handshake does not complete (an
    error, the timeout, the peer leaving, or :meth:`abort_all`)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        application: Callable[[], asyncio.Protocol],
        on_failure: FailureHook,
        *,
        timeout_s: float,
    ) -> None:
        self._context = context
        self._application = application
        self._on_failure = on_failure
        self._timeout_s = timeout_s
        self._pending: set[Any] = set()  # TLS protocols whose handshake is not over
        self._loop: asyncio.AbstractEventLoop | None = None
        self._base: type[Any] | None = None

    def __call__(self) -> asyncio.BaseProtocol:
        if self._base is None:
            self._loop = asyncio.get_running_loop()
            self._base = _tls_protocol_base(self._loop)
        assert self._loop is not None
        waiter = self._loop.create_future()
        application = self._application()
        tls = self._base(
            self._loop,
            application,
            self._context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self._timeout_s,
        )
        self._pending.add(tls)
        waiter.add_done_callback(lambda done: self._settled(tls, application, done))
        return tls  # type: ignore[no-any-return]

    def _settled(self, tls: Any, application: Any, done: asyncio.Future[None]) -> None:
        self._pending.discard(tls)
        if done.cancelled():
            error: BaseException = ConnectionAbortedError("handshake cancelled")
        elif (raised := done.exception()) is not None:
            error = raised
        elif getattr(application, "secured", False):
            return  # the TLS protocol has handed the connection to the application
        else:
            # The waiter of a connection lost mid-handshake gets no exception.
            error = ConnectionResetError("connection closed during the TLS handshake")
        self._on_failure(tls.remote, error)

    def abort_all(self) -> None:
        """Abort every connection still in its handshake (at shutdown)."""
        for tls in list(self._pending):
            if tls.raw is not None:
                with contextlib.suppress(Exception):
                    tls.raw.abort()
