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

``admin=True`` also serves the admin listener on ``[admin] host:port``, as ``waba-gateway serve``
does: the admin API, ``/metrics`` and the web console, on a site of its own (never on the
application's public port), started after the core and stopped before it. Its bound port is kept
under :data:`ADMIN_PORT`. A reload through it is refused: the application owns the server's TLS
context and the process, so a new configuration takes a restart of the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, cast

from aiohttp import web

from gateway.admin.api import start_admin
from gateway.admin.operations import ReloadResult
from gateway.admin.stats import Snapshot, Stats
from gateway.config import Config
from gateway.delivery.backoff import Breaker
from gateway.edge.http1 import content_coded, not_allowed, signature_twice
from gateway.edge.responses import error_middleware, text
from gateway.edge.tls import certificate_expiries
from gateway.errors import (
    ConfigError,
    IdentityRejected,
    OutboxError,
    PayloadTooLarge,
    Rejected,
)
from gateway.outbox import Outbox
from gateway.runtime.core import Core
from gateway.runtime.gateway import read_snapshot

if TYPE_CHECKING:
    # Only for the annotation: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Tracing

__all__ = ["ADMIN_PORT", "CORE", "create_app"]

CORE = web.AppKey("waba_gateway_core", Core)
ADMIN_PORT = web.AppKey("waba_gateway_admin_port", int)
# The identity decided for each open connection: a TLS connection cannot change its client
# certificate (the server context refuses renegotiation), so it is checked and counted once per
# connection, as the gateway's own listener does. Weak keys: a closed connection drops out.
_Verdicts = weakref.WeakKeyDictionary[object, "str | IdentityRejected | None"]
_VERDICTS = web.AppKey("waba_gateway_identities", _Verdicts)
_UNSEEN = object()


def create_app(config: Config, *, primary: bool = True, admin: bool = False) -> web.Application:
    """An :class:`aiohttp.web.Application` serving Meta's callback at ``config.listen.path``.

    ``config`` is what :func:`gateway.config.load_config` returns. ``primary=False`` leaves
    forwarding to another process sharing the outbox (see :mod:`gateway.runtime.workers`).
    ``listen.max_body_bytes`` bounds the bodies read (413 beyond). ``admin``: also serve the
    admin API, metrics and console on ``[admin] host:port`` (if ``admin.enabled``).
    Raises :class:`~gateway.errors.ConfigError` for ``listen.proxy_protocol = true``.
    """
    if config.listen.proxy_protocol:
        # aiohttp's server starts TLS on the first byte: a balancer's header would fail every
        # handshake. Said now, rather than as refused connections later.
        raise ConfigError(
            f"{config.source or 'the configuration'}: listen.proxy_protocol = true: expected"
            " false inside an application (create_app); only the gateway's own listener"
            " (waba-gateway serve) reads PROXY protocol headers"
        )
    app = web.Application(
        middlewares=[error_middleware],
        # aiohttp's own bound, one byte over ours: our check answers first, with our reason.
        client_max_size=config.listen.max_body_bytes + 1,
    )
    app[_VERDICTS] = weakref.WeakKeyDictionary()
    app.cleanup_ctx.append(_core_context(config, primary, admin and config.admin.enabled))
    app.router.add_route("*", config.listen.path, _callback)
    return app


def _core_context(
    config: Config, primary: bool, admin: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run_core(app: web.Application) -> AsyncIterator[None]:
        # Requests still in flight when the application stops are answered before this resumes:
        # aiohttp waits for its handlers during shutdown, before the cleanup contexts run.
        async with Core(config, primary=primary) as core:
            app[CORE] = core
            runner: web.AppRunner | None = None
            if admin:  # the admin listener of ``serve``, on the embedded core
                runner, app[ADMIN_PORT] = await start_admin(_Operations(core))
            try:
                yield
            finally:
                if runner is not None:
                    await runner.cleanup()

    return run_core


class _Operations:
    """What the admin API works on (:class:`gateway.admin.operations.Operations`), for a core
    inside someone else's application."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._started = time.time()
        self._expiries = certificate_expiries(core.config.tls)

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def outbox(self) -> Outbox:
        return self._core.outbox

    @property
    def stats(self) -> Stats:
        return self._core.stats

    def wake(self) -> None:
        self._core.wake()

    def replayed(self, delivery_id: str | None) -> None:
        self._core.replayed(delivery_id)

    def breakers(self) -> Mapping[str, Breaker]:
        return self._core.breakers()

    async def reload_confirmed(self) -> ReloadResult:
        # The application built the server's TLS context and owns the process: a reload here
        # could change the targets but not the certificates, which would be half a reload.
        return ReloadResult(
            False,
            "reload failed, nothing changed: the gateway is embedded in an application"
            " (create_app); restart the application to apply a new configuration",
        )

    async def snapshot(self) -> Snapshot:
        # Read as the gateway's own admin listener reads it: the same series, by construction.
        return await read_snapshot(self._core, self._expiries, self._started)


async def _callback(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    callback = core.callback
    cn = _identify(request, core)
    if request.method == "POST":
        # As the gateway's own listener: one signature, and the bytes as sent (aiohttp would
        # decompress a body with a Content-Encoding, and the signature covers what Meta sent).
        signatures = request.headers.getall("X-Hub-Signature-256", [])
        if len(signatures) > 1:
            raise signature_twice()
        for coding in request.headers.getall("Content-Encoding", []):
            if (refused := content_coded(coding)) is not None:
                raise refused
        limit = core.config.listen.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body exceeds {limit} bytes") from None
        signature = signatures[0] if signatures else None
        if callback.tracing is None:
            reason = await callback.notify(body, signature)
        else:
            reason = await _traced_notify(request, callback.tracing, core, cn, body, signature)
        return text(200, reason)
    if request.method in ("GET", "HEAD"):
        # The first of repeated names, as the gateway's own listener takes them.
        params = {name: request.query.getone(name) for name in request.query}
        # The challenge alone, byte for byte: Meta compares the whole body with it.
        challenge = callback.handshake(params)
        return web.Response(body=challenge.encode(), content_type="text/plain", charset="utf-8")
    raise not_allowed(request.method)


async def _traced_notify(
    request: web.Request,
    tracing: Tracing,
    core: Core,
    cn: str | None,
    body: bytes,
    signature: str | None,
) -> str:
    """``notify`` inside the request's SERVER span, ended with the status it is answered with
    (as :func:`gateway.edge.responses.answer_for` will choose it)."""
    transport = request.transport
    peercert = None if transport is None else transport.get_extra_info("peercert")
    not_after = str(peercert.get("notAfter") or "") or None if peercert else None
    peer = None if transport is None else transport.get_extra_info("peername")
    from gateway.tracing import server_attributes  # tracing is on: imported already

    attributes = server_attributes(request.path, cn, not_after, request.remote, peer)
    span = tracing.server_span(request.path, attributes, request.headers.get("traceparent"))
    status = 500
    try:
        reason = await core.callback.notify(body, signature, span)
        status = 200
        return reason
    except Rejected as exc:
        status = exc.status
        raise
    except OutboxError:
        status = 503
        raise
    except asyncio.CancelledError:
        # The client went away or the application is stopping before the commit was known to
        # be durable: recorded as the gateway's own listener records it (503, "shutting down;
        # retry later"), so both front doors give the same span for the same case.
        status = 503
        raise
    finally:
        tracing.end_server(span, status)


def _identify(request: web.Request, core: Core) -> str | None:
    """The connection's accepted client CN; raises IdentityRejected (403)."""
    connection = request.protocol  # aiohttp's handler of this one connection
    verdicts = request.app[_VERDICTS]
    try:
        verdict = verdicts.get(connection, _UNSEEN)
    except TypeError:  # a protocol that cannot be weakly referenced: decide for each request
        verdict = _UNSEEN
    if verdict is _UNSEEN:
        transport = request.transport
        # As the TLS protocol read it at the end of the handshake: not decoded a second time.
        peercert = None if transport is None else transport.get_extra_info("peercert")
        try:
            verdict = core.callback.identify(peercert, request.remote)
        except IdentityRejected as exc:
            verdict = exc
        with contextlib.suppress(TypeError):
            verdicts[connection] = verdict
    if isinstance(verdict, IdentityRejected):
        raise verdict
    return cast("str | None", verdict)
