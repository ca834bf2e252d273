"""The admin listener: plain HTTP, loopback by default.

Rule: the admin surface shows delivery metadata (ids, targets, states, statuses, reasons) and
never a notification body, which holds message text and phone numbers. With ``admin.token`` set,
everything but the liveness and readiness probes needs ``Authorization: Bearer <token>``.

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``GET /admin/deliveries?state=pending|delivered|dead&target=NAME&limit=N``,
``POST /admin/deliveries/{id}/replay``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.config import Config
from gateway.edge.responses import Handler, error_middleware, text
from gateway.errors import BadRequest, NotFound, OutboxError, Unauthorized
from gateway.outbox import STATES, Outbox, State
from gateway.runtime.stats import Stats

__all__ = ["READY_WAIT_S", "create_admin_app", "parse_query"]

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_MAX_LIMIT = 1000
# The longest /readyz waits for the outbox: a file locked by another process holds a write for
# the busy timeout, and a probe that hangs that long says less than a prompt 503.
READY_WAIT_S = 2.0


def _token_middleware(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in _OPEN_PATHS:
            presented = request.headers.get("Authorization", "")
            if not hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
                raise Unauthorized("admin token missing or wrong")
        return await handler(request)

    return check


def parse_query(query: Mapping[str, str]) -> tuple[State | None, str | None, int]:
    """``state``, ``target`` and ``limit`` from a deliveries query, validated."""
    raw_state = query.get("state")
    state: State | None = None
    if raw_state is not None:
        state = next((known for known in STATES if known == raw_state), None)
        if state is None:
            raise BadRequest(f"state must be one of {', '.join(STATES)}")
    raw_limit = query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {_MAX_LIMIT}")
    return state, query.get("target"), int(raw_limit)


def create_admin_app(
    config: Config,
    outbox: Outbox,
    stats: Stats,
    *,
    wake: Callable[[], None] = lambda: None,
) -> web.Application:
    app = web.Application(middlewares=[error_middleware, _token_middleware(config.admin.token)])

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
        return web.Response(body=stats.render(), content_type="text/plain")

    async def deliveries(request: web.Request) -> web.Response:
        state, target, limit = parse_query(request.query)
        found = await outbox.query(state=state, target=target, limit=limit)
        counts = await outbox.counts()
        return web.json_response({"counts": counts, "deliveries": [d.summary() for d in found]})

    async def replay(request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        if not await outbox.replay(delivery_id, time.time()):
            raise NotFound(f"no delivery {delivery_id!r}")
        wake()
        return web.json_response({"replayed": delivery_id})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/deliveries", deliveries)
    app.router.add_post("/admin/deliveries/{id}/replay", replay)
    return app
