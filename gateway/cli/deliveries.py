"""``waba-gateway deliveries list|replay``: the outbox's deliveries, gateway running or not."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from gateway.cli.args import add_config_argument, config_from_args
from gateway.errors import NotFound
from gateway.outbox import STATES, Delivery, Outbox, open_outbox
from gateway.runtime.admin import parse_query

__all__ = ["register"]


async def _open(args: argparse.Namespace) -> Outbox:
    # An outbox the gateway has not made yet is an error here: listing must not create one.
    # Not dispatching: a replay is announced to the gateways sharing a database.
    return await open_outbox(config_from_args(args).outbox, create=False, dispatching=False)


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

    async def listing() -> list[Delivery]:
        outbox = await _open(args)
        try:
            return await outbox.query(state=state, target=target, limit=limit)
        finally:
            await outbox.close()

    found = asyncio.run(listing())
    if args.json:
        print(json.dumps([d.summary() for d in found], indent=2))
        return 0
    print(f"{'ID':<32}  {'STATE':<9} {'TARGET':<16} {'ATT':>3}  {'HTTP':>4}  REASON")
    for delivery in found:
        print(_row(delivery))
    return 0


def _replay(args: argparse.Namespace) -> int:
    async def replay() -> list[str]:
        outbox = await _open(args)
        missing = []
        try:
            for delivery_id in args.ids:
                if await outbox.replay(delivery_id, time.time()):
                    print(f"replayed {delivery_id}")
                else:
                    missing.append(delivery_id)
        finally:
            await outbox.close()
        return missing

    missing = asyncio.run(replay())
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
