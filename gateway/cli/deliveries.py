"""``waba-gateway deliveries list|show|replay|purge``: the outbox's deliveries, gateway running or
not. Every command that changes deliveries prints how many it changed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from gateway.cli.args import add_config_argument, config_from_args
from gateway.delivery.answers import shown_answer, shown_summary
from gateway.errors import GatewayError, NotFound
from gateway.outbox import STATES, AttemptRecord, Delivery, Outbox, open_outbox
from gateway.outbox.query import parse_query
from gateway.units import parse_age, parse_since

__all__ = ["register"]

T = TypeVar("T")


async def _open(args: argparse.Namespace) -> Outbox:
    # An outbox the gateway has not made yet is an error here: listing must not create one.
    # Not dispatching: a replay is announced to the gateways sharing a database.
    return await open_outbox(config_from_args(args).outbox, create=False, dispatching=False)


def _given(name: str, value: str) -> str:
    """``value``, the command line's argument ``name``, if it is UTF-8 text; otherwise the
    usage error that names it.

    argv is bytes, and Python decodes bytes that are not UTF-8 into lone surrogates (PEP 383).
    No outbox holds a name spelled so, and neither driver can even send one: handed on, such a
    value fails inside the outbox, with a message that blames the outbox for a mistyped
    argument. So every argument that is free text is checked here, before the outbox is opened;
    a path (``--config``) may be any bytes, and is not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # The bytes as given, the undecodable ones escaped (\xff): printable on any terminal.
        shown = os.fsencode(value).decode("utf-8", "backslashreplace")
        raise GatewayError(f"{name}: '{shown}' is not UTF-8 text") from None
    return value


def _with_outbox(args: argparse.Namespace, work: Callable[[Outbox], Awaitable[T]]) -> T:
    async def run() -> T:
        outbox = await _open(args)
        try:
            return await work(outbox)
        finally:
            await outbox.close()

    return asyncio.run(run())


def _row(d: Delivery) -> str:
    status = "-" if d.last_status is None else str(d.last_status)
    reason = (d.last_error or "").replace("\n", " ")[:60]
    # Padded to the ID column: ids are "<prefix>-<row id>", of varying length.
    return f"{d.id:<32}  {d.state:<9} {d.target:<16} {d.attempts:>3}  {status:>4}  {reason}"


def _list(args: argparse.Namespace) -> int:
    if args.target is not None:
        _given("--target", args.target)
    state, target, limit = parse_query(
        {k: v for k, v in (("state", args.state), ("target", args.target)) if v}
        | {"limit": str(args.limit)}
    )
    found = _with_outbox(args, lambda o: o.query(state=state, target=target, limit=limit))
    if args.json:
        print(json.dumps([shown_summary(d.summary()) for d in found], indent=2))
        return 0
    print(f"{'ID':<32}  {'STATE':<9} {'TARGET':<16} {'ATT':>3}  {'HTTP':>4}  REASON")
    for delivery in found:
        print(_row(delivery))
    return 0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _show(args: argparse.Namespace) -> int:
    _given("ID", args.id)

    async def read(outbox: Outbox) -> tuple[Delivery | None, list[AttemptRecord]]:
        return await outbox.get(args.id), await outbox.attempts(args.id)

    found, attempts = _with_outbox(args, read)
    if found is None:
        raise NotFound(f"no delivery {args.id}")
    if args.json:
        history = [shown_summary(attempt.summary()) for attempt in attempts]
        shown = shown_summary(found.summary()) | {"attempt_history": history}
        print(json.dumps(shown, indent=2))
        return 0
    next_label = "next attempt" if found.state == "pending" else "last change"
    lines = [
        ("id", found.id),
        ("target", found.target),
        ("state", found.state),
        ("received", _when(found.received_at)),
        ("queued", _when(found.created_at)),
        ("attempts", str(found.attempts)),
        (next_label, _when(found.next_attempt_at)),
        ("last status", "-" if found.last_status is None else str(found.last_status)),
        ("last error", found.last_error or "-"),
        ("last response", (shown_answer(found.last_response) or "-").replace("\n", " ")),
        ("bytes", str(len(found.body))),
    ]
    for name, value in lines:
        print(f"{name + ':':<15}{value}")
    # Every attempt the outbox kept, oldest first (numbers start again at 1 after a replay).
    print(f"{'#':>3}  {'AT':<20} {'OUTCOME':<9} {'HTTP':>4}  REASON / RESPONSE")
    for attempt in attempts:
        status = "-" if attempt.status is None else str(attempt.status)
        outcome = attempt.outcome
        why = (attempt.error or shown_answer(attempt.response) or "").replace("\n", " ")[:80]
        print(f"{attempt.number:>3}  {_when(attempt.at):<20} {outcome:<9} {status:>4}  {why}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    # All of them before any delivery is replayed: a bad one later in the list must not leave
    # the command half done.
    for delivery_id in args.ids:
        _given("ID", delivery_id)
    for name, value in (("--target", args.target), ("--since", args.since)):
        if value is not None:
            _given(name, value)
    if args.ids and args.state:
        raise GatewayError("give delivery ids or --state, not both")
    if not args.ids and not args.state:
        raise GatewayError("give delivery ids, or --state dead to replay every dead letter")
    if args.ids and (args.target or args.since):
        raise GatewayError("--target and --since go with --state")
    if args.state:
        now = time.time()
        try:
            since = None if args.since is None else parse_since(args.since, now)
        except ValueError as exc:
            raise GatewayError(f"--since: {exc}") from None
        count = _with_outbox(
            args,
            lambda o: o.replay_many(state=args.state, target=args.target, since=since, now=now),
        )
        print(f"replayed {count} deliveries")
        return 0

    async def replay(outbox: Outbox) -> list[str]:
        missing = []
        for delivery_id in args.ids:
            if await outbox.replay(delivery_id, time.time()):
                print(f"replayed {delivery_id}")
            else:
                missing.append(delivery_id)
        return missing

    missing = _with_outbox(args, replay)
    print(f"replayed {len(args.ids) - len(missing)} deliveries")
    if missing:
        raise NotFound(f"no delivery {', '.join(missing)}")
    return 0


def _purge(args: argparse.Namespace) -> int:
    try:
        age = parse_age(_given("--older-than", args.older_than))
    except ValueError as exc:
        raise GatewayError(f"--older-than: {exc}") from None
    count = _with_outbox(args, lambda o: o.purge_dead(time.time() - age))
    print(f"purged {count} dead letters")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "deliveries", help="list, show, replay or purge deliveries in the outbox"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list deliveries (newest first)")
    add_config_argument(listing, dev=True)
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--target", help="only this target's deliveries")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_list)
    showing = actions.add_parser(
        "show", help="one delivery and its last attempt, then every attempt on one line each"
    )
    add_config_argument(showing, dev=True)
    showing.add_argument("id", metavar="ID")
    showing.add_argument("--json", action="store_true", help="machine-readable output")
    showing.set_defaults(func=_show)
    replaying = actions.add_parser(
        "replay", help="make deliveries pending again, due now: by id, or all in a state"
    )
    add_config_argument(replaying, dev=True)
    replaying.add_argument("ids", nargs="*", metavar="ID")
    replaying.add_argument("--state", choices=STATES, help="every delivery in this state")
    replaying.add_argument("--target", help="with --state: only this target's")
    replaying.add_argument(
        "--since", help="with --state: changed since an age (24h) or a time (2026-11-30T06:00Z)"
    )
    replaying.set_defaults(func=_replay)
    purging = actions.add_parser("purge", help="remove dead letters older than an age")
    add_config_argument(purging, dev=True)
    purging.add_argument(
        "--older-than", required=True, help="an age: 30d, 12h, 15m or 90s", metavar="AGE"
    )
    purging.set_defaults(func=_purge)
