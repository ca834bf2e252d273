"""The admin listener (plain HTTP, loopback by default) and the ``deliveries`` CLI.

Rule: the admin surface shows delivery metadata (ids, targets, states, statuses, reasons) and
never a notification body, which holds message text and phone numbers. With ``admin.token`` set,
everything but the liveness and readiness probes needs ``Authorization: Bearer <token>``.

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``GET /admin/deliveries?state=pending|delivered|dead&target=NAME&limit=N``,
``POST /admin/deliveries/{id}/replay``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.config import Config
from gateway.edge.responses import Handler, error_middleware, text
from gateway.errors import BadRequest, NotFound, OutboxError, Unauthorized
from gateway.outbox.sqlite import layout, store
from gateway.outbox.sqlite.outbox import STATES, Delivery, Outbox
from gateway.runtime.stats import Stats

__all__ = ["create_admin_app", "register"]

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_MAX_LIMIT = 1000


def _token_middleware(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in _OPEN_PATHS:
            presented = request.headers.get("Authorization", "")
            if not hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
                raise Unauthorized("admin token missing or wrong")
        return await handler(request)

    return check


def parse_query(query: Mapping[str, str]) -> tuple[str | None, str | None, int]:
    """``state``, ``target`` and ``limit`` from a deliveries query, validated."""
    state = query.get("state")
    if state is not None and state not in STATES:
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
            await outbox.run(lambda conn: conn.execute("SELECT 1").fetchone())
        except OutboxError:
            return text(503, "outbox unavailable")
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


# -- CLI: `waba-gateway deliveries list|replay`, straight on the outbox file -------------------


def _open(args: argparse.Namespace) -> tuple[Config, sqlite3.Connection]:
    from gateway.runtime.gateway import config_from_args

    config = config_from_args(args)
    if not config.outbox.path.exists():
        raise OutboxError(f"outbox.path = '{config.outbox.path}': no outbox file there yet")
    return config, layout.connect(config.outbox.path)


def _row(d: Delivery) -> str:
    status = "-" if d.last_status is None else str(d.last_status)
    reason = (d.last_error or "").replace("\n", " ")[:60]
    # Padded to the ID column: ids are "<prefix>-<row id>", of varying length.
    return f"{d.id:<32}  {d.state:<9} {d.target:<16} {d.attempts:>3}  {status:>4}  {reason}"


def _list(args: argparse.Namespace) -> int:
    state, target, limit = parse_query(
        {k: v for k, v in (("state", args.state), ("target", args.target)) if v}
        | {"limit": str(args.limit)}
    )
    _, conn = _open(args)
    with conn:
        found = store.list_deliveries(conn, state, target, limit)
    if args.json:
        print(json.dumps([d.summary() for d in found], indent=2))
        return 0
    print(f"{'ID':<32}  {'STATE':<9} {'TARGET':<16} {'ATT':>3}  {'HTTP':>4}  REASON")
    for delivery in found:
        print(_row(delivery))
    return 0


def _replay(args: argparse.Namespace) -> int:
    _, conn = _open(args)
    missing = []
    with conn:
        for delivery_id in args.ids:
            if store.replay_delivery(conn, delivery_id, time.time()):
                print(f"replayed {delivery_id}")
            else:
                missing.append(delivery_id)
    if missing:
        raise NotFound(f"no delivery {', '.join(missing)}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.runtime.gateway import add_config_argument

    parser = subparsers.add_parser("deliveries", help="list or replay deliveries in the outbox")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list deliveries (newest first)")
    add_config_argument(listing)
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--target", help="only this target's deliveries")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_list)
    replaying = actions.add_parser("replay", help="make deliveries pending again, due now")
    add_config_argument(replaying)
    replaying.add_argument("ids", nargs="+", metavar="ID")
    replaying.set_defaults(func=_replay)
