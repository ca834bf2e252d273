"""The admin listener: plain HTTP, loopback by default.

Rule: the admin surface shows delivery metadata (ids, targets, states, statuses, reasons) and
never a notification body, which holds message text and phone numbers. With ``admin.token`` set,
everything but the liveness and readiness probes needs ``Authorization: Bearer <token>`` (the
token in force: a reload may rotate it).

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``GET /admin/deliveries?state=pending|delivered|dead&target=NAME&limit=N``,
``GET /admin/deliveries/{id}``, ``POST /admin/deliveries/{id}/replay``,
``POST /admin/deliveries/replay?state=dead&target=NAME&since=24h`` (bulk),
``POST /admin/deliveries/purge?older_than=30d`` (dead letters), ``POST /admin/reload``; and the web
console at ``GET /`` and under ``/console/`` (:mod:`gateway.admin.console`), which guards itself
with a session made from the same token.

In front of all of it but the probes, for a browser on the operator's machine: a ``Host`` that
is not the listener's is refused (421), and so is a state-changing request another site sent
(403), token or not, and a form's body sent to the JSON API (415)
(:mod:`gateway.admin.origin`). A wrong token is answered only after a
wait that grows per client address (:mod:`gateway.admin.throttle`), and every 401 carries
``WWW-Authenticate``.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.admin.console import Console, is_console_path
from gateway.admin.console.session import same_text
from gateway.admin.operations import Operations, outbox_text
from gateway.admin.origin import cross_site_refusal, form_refusal, host_refusal
from gateway.admin.stats import Stats
from gateway.admin.throttle import AuthThrottle
from gateway.config import AdminConfig
from gateway.delivery.answers import shown_summary
from gateway.edge.responses import Handler, error_middleware, text
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MisdirectedRequest,
    NotFound,
    OutboxError,
    PortInUse,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.outbox.query import parse_query, parse_state
from gateway.units import parse_age, parse_since

__all__ = ["READY_WAIT_S", "create_admin_app", "start_admin"]

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_CHALLENGE = 'Bearer realm="waba-gateway admin"'
_WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})
# The longest /readyz waits for the outbox: a file locked by another process holds a write for
# the busy timeout, and a probe that hangs that long says less than a prompt 503.
READY_WAIT_S = 2.0


def _own_address(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[0] if isinstance(sockname, tuple) and sockname else None


def _allowed_hosts(admin: AdminConfig) -> frozenset[str]:
    """``admin.allowed_hosts``, and ``admin.host`` unless it is a wildcard: the CLI calls the
    listener by the name it is configured to listen on."""
    names = [*admin.allowed_hosts, *([] if admin.host in _WILDCARDS else [admin.host])]
    # As origin.host_name spells a Host: lower case, no root dot, an IPv6 address unbracketed.
    return frozenset(n.lower().rstrip(".").removeprefix("[").removesuffix("]") for n in names)


def _origin_middleware(ops: Operations) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The probes show nothing and are called by orchestrators under names of their own.
        if request.path not in _OPEN_PATHS:
            allowed = _allowed_hosts(ops.config.admin)
            host = request.headers.get("Host")
            refusal = host_refusal(host, _own_address(request), allowed)
            if refusal is not None:
                raise MisdirectedRequest(refusal)
            refusal = cross_site_refusal(
                request.method,
                host,
                request.headers.get("Origin"),
                request.headers.get("Sec-Fetch-Site"),
            )
            if refusal is not None:
                raise Forbidden(refusal)
            if not is_console_path(request.path):  # the console's forms are forms
                refusal = form_refusal(request.method, request.headers.get("Content-Type"))
                if refusal is not None:
                    raise UnsupportedMediaType(refusal)
        return await handler(request)

    return check


async def _refuse_slowly(
    stats: Stats, throttle: AuthThrottle, request: web.Request, where: str
) -> None:
    """Hold a failed authentication from ``request``'s address as :mod:`.throttle` says, and
    count it."""
    delay = throttle.failed(request.remote or "-", time.monotonic())
    stats.auth_failed(where, delay)
    await asyncio.sleep(delay)


def _token_middleware(ops: Operations, throttle: AuthThrottle) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = ops.config.admin.token
        # The console's own guard checks its paths (a session, or loopback without a token).
        if (
            token is not None
            and request.path not in _OPEN_PATHS
            and not is_console_path(request.path)
        ):
            # A header that is not UTF-8 is a wrong token, refused and throttled as one.
            presented = request.headers.get("Authorization", "")
            if not same_text(presented, f"Bearer {token}"):
                await _refuse_slowly(ops.stats, throttle, request, "bearer")
                raise Unauthorized("admin token missing or wrong")
            throttle.succeeded(request.remote or "-")
        return await handler(request)

    return check


async def _challenge(_: web.Request, response: web.StreamResponse) -> None:
    # RFC 9110 11.6.1: a 401 names the scheme that would be accepted.
    if response.status == 401:
        response.headers["WWW-Authenticate"] = _CHALLENGE


def _since(query: Mapping[str, str], now: float) -> float | None:
    raw = query.get("since")
    if raw is None:
        return None
    try:
        return parse_since(raw, now)
    except ValueError as exc:
        raise BadRequest(f"since: {exc}") from None


def create_admin_app(ops: Operations) -> web.Application:
    throttle = AuthThrottle()
    middlewares = [error_middleware, _origin_middleware(ops), _token_middleware(ops, throttle)]
    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(_challenge)
    outbox = ops.outbox

    async def healthz(_: web.Request) -> web.Response:
        return text(200, "ok")

    async def readyz(_: web.Request) -> web.Response:
        # Ready means the outbox takes a write: the one thing a 200 to Meta depends on.
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await outbox.ping()
        except OutboxError:
            return text(503, "outbox unavailable")
        except TimeoutError:
            return text(503, f"outbox unavailable: no write within {READY_WAIT_S:g}s")
        return text(200, "ready")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=ops.stats.render(await ops.snapshot()), content_type="text/plain")

    async def deliveries(request: web.Request) -> web.Response:
        state, target, limit = parse_query(request.query)
        target = outbox_text("target", target)
        found = await outbox.query(state=state, target=target, limit=limit)
        counts = await outbox.counts()
        listed = [shown_summary(d.summary()) for d in found]
        return web.json_response({"counts": counts, "deliveries": listed})

    async def show(request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        found = await outbox.get(delivery_id)
        if found is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        attempts = [shown_summary(a.summary()) for a in await outbox.attempts(delivery_id)]
        return web.json_response(shown_summary(found.summary()) | {"attempt_history": attempts})

    async def replay(request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        if not await outbox.replay(delivery_id, time.time()):
            raise NotFound(f"no delivery {delivery_id!r}")
        ops.replayed(delivery_id)
        return web.json_response({"replayed": delivery_id})

    async def replay_many(request: web.Request) -> web.Response:
        now = time.time()
        state = parse_state(request.query.get("state"))
        if state is None:
            raise BadRequest("state is required (dead, to replay every dead letter)")
        target = outbox_text("target", request.query.get("target"))
        since = _since(request.query, now)
        count = await outbox.replay_many(state=state, target=target, since=since, now=now)
        if state == "pending":  # some may wait in memory, in a conversation's run
            ops.replayed(None)
        else:
            ops.wake()
        return web.json_response({"replayed": count})

    async def purge(request: web.Request) -> web.Response:
        try:
            age = parse_age(request.query.get("older_than", ""))
        except ValueError as exc:
            raise BadRequest(f"older_than: {exc}") from None
        return web.json_response({"purged": await outbox.purge_dead(time.time() - age)})

    async def reload(_: web.Request) -> web.Response:
        # Awaited: with several workers, the answer waits for theirs, and the event loop, which
        # also serves the callback, goes on meanwhile.
        result = await ops.reload_confirmed()
        body = {"ok": result.ok, "message": result.message}
        # 422: the gateway works, but the files it was asked to take cannot be used (the
        # message says why: nothing changed, or which workers did not take them).
        return web.json_response(body, status=200 if result.ok else 422)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/deliveries", deliveries)
    app.router.add_post("/admin/deliveries/replay", replay_many)
    app.router.add_post("/admin/deliveries/purge", purge)
    app.router.add_get("/admin/deliveries/{id}", show)
    app.router.add_post("/admin/deliveries/{id}/replay", replay)
    Console(
        lambda: ops.config,
        outbox,
        ops.stats,
        breakers=ops.breakers,
        wake=ops.wake,
        replayed=ops.replayed,
        refuse=lambda request: _refuse_slowly(ops.stats, throttle, request, "sign-in"),
        accepted=lambda request: throttle.succeeded(request.remote or "-"),
    ).mount(app)
    app.router.add_post("/admin/reload", reload)
    return app


async def start_admin(ops: Operations) -> tuple[web.AppRunner, int]:
    """Serve the admin app of ``ops`` on ``[admin] host:port``: its runner (to clean up) and the
    port it listens on. A port in use is :class:`~gateway.errors.PortInUse` naming
    ``admin.port``; nothing is left running when it fails."""
    settings = ops.config.admin
    runner = web.AppRunner(create_admin_app(ops), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(settings.port, "admin.port") from exc
        # An address this host does not have, or a name that does not resolve: one line
        # naming the key, as for the webhook listener (runtime.ports.listen_error).
        where = f"admin.host {settings.host!r} in {ops.config.source or 'the configuration'}"
        raise GatewayError(f"{where}: cannot listen there: {exc.strerror or exc}") from exc
    return runner, int(runner.addresses[0][1])
