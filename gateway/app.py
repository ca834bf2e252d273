"""The callback's HTTP application: Meta's handshake (GET) and notifications (POST).

Rule: handlers only adapt. Every decision (identity, handshake, signature, routing) is a pure
function elsewhere; the handlers read the request, call them in order, and return what they say.
:func:`create_app` is the public way to embed the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.config import Config
from gateway.dispatcher import Dispatcher
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.handshake import answer_challenge
from gateway.identity import check_client_identity
from gateway.outbox import Outbox
from gateway.responses import error_middleware, text
from gateway.routing import route
from gateway.signature import verify_signature
from gateway.stats import Stats

__all__ = ["CONFIG", "DISPATCHER", "OUTBOX", "STATS", "create_app"]

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
OUTBOX = web.AppKey("outbox", Outbox)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
STATS = web.AppKey("stats", Stats)
_IDENTITIES: web.AppKey[weakref.WeakKeyDictionary[Any, str | None]] = web.AppKey("identities")


def _identity(request: web.Request) -> str | None:
    """The accepted client CN of this request's connection, checked once per connection: the
    certificate cannot change within a TLS connection (renegotiation is disabled)."""
    transport = request.transport
    # Keyed by the connection's SSLObject: uvloop's transports cannot be weakly referenced.
    key = transport.get_extra_info("ssl_object") if transport is not None else None
    cache = request.app[_IDENTITIES]
    if key is not None and key in cache:
        cached: str | None = cache[key]
        return cached
    config = request.app[CONFIG]
    peercert = key.getpeercert() if key is not None else None
    try:
        cn = check_client_identity(peercert, config.tls.client_cn, config.tls.client_auth)
    except Exception:
        request.app[STATS].rejected("identity")
        raise
    request.app[STATS].saw_client(cn)
    if key is not None:
        cache[key] = cn
    return cn


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it would exceed ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
    # aiohttp's read() stops at client_max_size (limit + 1, set in create_app) as it reads,
    # which also covers chunked bodies that announce no length.
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"body exceeds {limit} bytes") from None


async def handshake(request: web.Request) -> web.Response:
    """Echo ``hub.challenge`` when the verify token matches (Meta's GET verification)."""
    _identity(request)
    challenge = answer_challenge(request.query, request.app[CONFIG].meta.verify_tokens)
    return web.Response(text=challenge, content_type="text/plain")


async def notification(request: web.Request) -> web.Response:
    """Answer 200 only once the verified notification is durably in the outbox."""
    app = request.app
    config = app[CONFIG]
    stats = app[STATS]
    _identity(request)
    body = await _read_body(request, config.listen.max_body_bytes)
    header = request.headers.get("X-Hub-Signature-256")
    try:
        verify_signature(config.meta.app_secrets, body, header)
    except Exception:
        stats.rejected("signature")
        raise
    try:
        payload = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise BadRequest("body is not valid JSON") from exc
    routes = route(payload, config.targets)
    assert header is not None  # verify_signature refuses a missing header
    stored = await app[OUTBOX].accept(body, header, routes, time.time())
    if stored is None:
        stats.duplicate()
        return text(200, "ok (duplicate)")
    stats.accepted()
    if DISPATCHER in app:
        app[DISPATCHER].offer(stored)
        # One turn of the loop lets the forwards just offered write their requests before this
        # answer is written: targets see the notification sooner, and nothing here waits for
        # them (the answer does not depend on the forward's outcome).
        await asyncio.sleep(0)
    return text(200, "ok")


def _resources(
    config: Config, dispatch: bool, clock: Callable[[], float]
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        outbox = Outbox(config.outbox.path, dedup_window_s=config.outbox.dedup_window_s)
        app[OUTBOX] = outbox
        dispatcher: Dispatcher | None = None
        if dispatch:
            dispatcher = Dispatcher(
                outbox,
                config.targets,
                config.dispatcher,
                retention_s=config.outbox.retention_s,
                clock=clock,
            )
            app[DISPATCHER] = dispatcher
            dispatcher.start()
        yield
        # Runs after the listener stopped and requests in flight finished (AppRunner.cleanup).
        if dispatcher is not None:
            await dispatcher.stop()
        await outbox.close()

    return ctx


def create_app(
    config: Config, *, dispatch: bool = True, clock: Callable[[], float] = time.time
) -> web.Application:
    """The callback application. Its startup opens the outbox and, with ``dispatch``, starts
    the dispatcher; its cleanup stops them. TLS is the listener's job (:mod:`gateway.serve`)."""
    app = web.Application(
        middlewares=[error_middleware],
        # read() refuses a body of this size or more: listen.max_body_bytes itself is allowed.
        client_max_size=config.listen.max_body_bytes + 1,
    )
    app[CONFIG] = config
    app[STATS] = Stats()
    app[_IDENTITIES] = weakref.WeakKeyDictionary()
    app.cleanup_ctx.append(_resources(config, dispatch, clock))
    app.router.add_get(config.listen.path, handshake)
    app.router.add_post(config.listen.path, notification)
    return app
