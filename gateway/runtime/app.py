"""The callback inside an aiohttp application: the gateway as a front door of the user's app.

Rule: this module only adapts aiohttp requests to the :class:`~gateway.edge.callback.Callback`
of a :class:`~gateway.runtime.core.Core`, exactly as the gateway's own listener does: the client
certificate's CN, Meta's handshake (GET), the signature over the raw body, the outbox commit
before the 200, and forwarding by the core's dispatcher. Refusals go through the one error
mapping (:func:`gateway.edge.responses.answer_for`), so both front doors answer alike.

The core is started and closed through the application's ``cleanup_ctx`` (so a sub-application
mounted with ``add_subapp`` starts and stops with its parent), and is kept under the typed key
:data:`CORE`. mTLS is the server's business: run the application with
``ssl_context=build_server_context(config.tls)`` (:func:`gateway.edge.tls.build_server_context`),
which asks for and verifies Meta's client certificate.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.config import Config
from gateway.edge.responses import error_middleware, text
from gateway.errors import IdentityRejected, MethodNotAllowed, PayloadTooLarge
from gateway.runtime.core import Core

__all__ = ["CORE", "create_app"]

CORE = web.AppKey("waba_gateway_core", Core)
# The identity decided for each open connection: a TLS connection cannot change its client
# certificate (the server context refuses renegotiation), so it is checked and counted once per
# connection, as the gateway's own listener does. Weak keys: a closed connection drops out.
_Verdicts = weakref.WeakKeyDictionary[object, "str | IdentityRejected | None"]
_VERDICTS = web.AppKey("waba_gateway_identities", _Verdicts)
_UNSEEN = object()


def create_app(config: Config, *, primary: bool = True) -> web.Application:
    """An :class:`aiohttp.web.Application` serving Meta's callback at ``config.listen.path``.

    ``config`` is what :func:`gateway.config.load_config` returns. ``primary=False`` leaves
    forwarding to another process sharing the outbox (see :mod:`gateway.runtime.workers`).
    ``listen.max_body_bytes`` bounds the bodies read (413 beyond).
    """
    app = web.Application(
        middlewares=[error_middleware],
        # aiohttp's own bound, one byte over ours: our check answers first, with our reason.
        client_max_size=config.listen.max_body_bytes + 1,
    )
    app[_VERDICTS] = weakref.WeakKeyDictionary()
    app.cleanup_ctx.append(_core_context(config, primary))
    app.router.add_route("*", config.listen.path, _callback)
    return app


def _core_context(
    config: Config, primary: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run_core(app: web.Application) -> AsyncIterator[None]:
        # Requests still in flight when the application stops are answered before this resumes:
        # aiohttp waits for its handlers during shutdown, before the cleanup contexts run.
        async with Core(config, primary=primary) as core:
            app[CORE] = core
            yield

    return run_core


async def _callback(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    callback = core.callback
    _identify(request, core)
    if request.method == "POST":
        limit = core.config.listen.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body exceeds {limit} bytes") from None
        reason = await callback.notify(body, request.headers.get("X-Hub-Signature-256"))
        return text(200, reason)
    if request.method in ("GET", "HEAD"):
        # The first of repeated names, as the gateway's own listener takes them.
        params = {name: request.query.getone(name) for name in request.query}
        # The challenge alone, byte for byte: Meta compares the whole body with it.
        challenge = callback.handshake(params)
        return web.Response(body=challenge.encode(), content_type="text/plain", charset="utf-8")
    raise MethodNotAllowed(f"method {request.method} is not allowed here; use GET or POST")


def _identify(request: web.Request, core: Core) -> None:
    connection = request.protocol  # aiohttp's handler of this one connection
    verdicts = request.app[_VERDICTS]
    try:
        verdict = verdicts.get(connection, _UNSEEN)
    except TypeError:  # a protocol that cannot be weakly referenced: decide for each request
        verdict = _UNSEEN
    if verdict is _UNSEEN:
        transport = request.transport
        ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        try:
            verdict = core.callback.identify(peercert, request.remote)
        except IdentityRejected as exc:
            verdict = exc
        with contextlib.suppress(TypeError):
            verdicts[connection] = verdict
    if isinstance(verdict, IdentityRejected):
        raise verdict
