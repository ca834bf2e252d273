"""The server's certificate chain: what ``tls.cert_file`` holds, never one built per handshake.

Rule: a TLS context of the listener sends its certificate and the certificates that follow it in
``tls.cert_file``, and OpenSSL is told not to build a chain of its own at every handshake.

Why: when the certificate file holds the leaf alone, OpenSSL builds the server's chain at every
handshake (``ssl_add_cert_chain``, unless ``SSL_MODE_NO_AUTO_CHAIN`` is set): a whole
``X509_verify_cert`` of the gateway's own certificate against the context's trust store, which
here is the *client* CA bundle. That is about 0.95 million instructions a new connection (9 % of
one with its request, ``bench/README.md``) when the server certificate's issuer is in that bundle,
and a chain that mixes the client trust store into what the server presents. A public CA's
leaf is never issued by a root, and Meta's bundle holds roots only, so the built chain never adds
an intermediate a deployment needs; the certificates after the leaf in ``tls.cert_file`` are sent
as before. nginx sets the same mode on every context it makes (``ngx_ssl_create``).

Python's :mod:`ssl` has no ``SSL_CTX_set_mode``: it is called through :mod:`ctypes`, on the
``SSL_CTX`` that CPython's ``SSLContext`` object holds first after its object header, resolved
in the very library :mod:`_ssl` is linked to. Before the mode is set, the pointer is checked
against the context's options as Python reads them; where anything differs (another Python,
OpenSSL linked statically), nothing is changed and the chain is built as before. The mode only
decides which certificates the server sends: no check of the client depends on it.

The same door serves :func:`set_session_id_context`, which Python's :mod:`ssl` lacks as well
(``SSL_CTX_set_session_id_context``): :class:`gateway.edge.tls.SwappableContext` gives each
reload's trust an identity of its own, so that no session made under the trust a reload replaced
is resumed under the new one.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
import sys

__all__ = ["SESSION_ID_CONTEXT_BYTES", "send_only_configured_chain", "set_session_id_context"]

_SSL_CTRL_MODE = 33  # ssl.h: SSL_CTX_set_mode(ctx, m) is SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, m, NULL)
_SSL_MODE_NO_AUTO_CHAIN = 0x8
SESSION_ID_CONTEXT_BYTES = 32  # ssl.h: SSL_MAX_SID_CTX_LENGTH


class _LibSSL:
    __slots__ = ("ctrl", "get_options", "set_session_id_context")

    def __init__(self, library: ctypes.CDLL) -> None:
        self.ctrl = library.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = library.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.set_session_id_context = library.SSL_CTX_set_session_id_context
        self.set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        self.set_session_id_context.restype = ctypes.c_int


@functools.cache
def _libssl() -> _LibSSL | None:
    if sys.implementation.name != "cpython":
        return None  # the object layout read below is CPython's
    try:
        # dlsym() on _ssl's own handle searches _ssl and then the libraries it was linked to:
        # the libssl whose SSL_CTX this is, whichever other copies the process has loaded.
        return _LibSSL(ctypes.CDLL(_ssl.__file__))
    except (OSError, AttributeError):  # no shared module, or no exported OpenSSL symbols
        return None


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    # CPython's PySSLContext: PyObject_HEAD, then SSL_CTX *ctx (Modules/_ssl.c).
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    return pointer or None


def _checked_ssl_ctx(context: ssl.SSLContext) -> tuple[_LibSSL, int] | None:
    """The library and ``context``'s ``SSL_CTX``, once the pointer is known to be that
    context's (its options read through it are the ones Python reads); else ``None``."""
    library = _libssl()
    if library is None:
        return None
    ctx = _ssl_ctx(context)
    if ctx is None or library.get_options(ctx) != int(context.options):
        return None
    return library, ctx


def send_only_configured_chain(context: ssl.SSLContext) -> bool:
    """Set ``SSL_MODE_NO_AUTO_CHAIN`` on ``context``; whether it is set (see the module's
    docstring for when it cannot be, and why that weakens nothing)."""
    found = _checked_ssl_ctx(context)
    if found is None:
        return False
    library, ctx = found
    mode = library.ctrl(ctx, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    return bool(mode & _SSL_MODE_NO_AUTO_CHAIN)


def set_session_id_context(context: ssl.SSLContext, sid_ctx: bytes) -> bool:
    """Make ``sid_ctx`` the session ID context of ``context``: what OpenSSL copies into each
    connection made from it, stores in each session the connection makes, and compares before
    it resumes one (a session made under another context is a cache miss, and the handshake a
    full one). Whether it was set: not when the ``SSL_CTX`` cannot be reached (see the module's
    docstring), nor for more than :data:`SESSION_ID_CONTEXT_BYTES` bytes."""
    if not 0 < len(sid_ctx) <= SESSION_ID_CONTEXT_BYTES:
        return False
    found = _checked_ssl_ctx(context)
    if found is None:
        return False
    library, ctx = found
    done: int = library.set_session_id_context(ctx, sid_ctx, len(sid_ctx))
    return done == 1
