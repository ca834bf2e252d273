"""``waba-gateway deliveries list|replay``: the outbox's deliveries, gateway running or not."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time

from gateway.cli.args import add_config_argument, config_from_args
from gateway.config import Config
from gateway.errors import NotFound, OutboxError
from gateway.outbox.sqlite import layout, store
from gateway.outbox.sqlite.outbox import STATES, Delivery
from gateway.runtime.admin import parse_query

__all__ = ["register"]


def _open(args: argparse.Namespace) -> tuple[Config, sqlite3.Connection]:
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
