"""``waba-gateway backup DEST``: a consistent copy of the SQLite outbox, taken while serving."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from gateway.cli.args import add_config_argument, config_from_args
from gateway.outbox import backup_outbox

__all__ = ["register"]


def _backup(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(asyncio.run(backup_outbox(config.outbox, args.destination)))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "backup", help="copy the SQLite outbox to a new file, consistent while serving"
    )
    parser.add_argument("destination", type=Path, metavar="DEST", help="a file that does not exist")
    add_config_argument(parser, dev=True)
    parser.set_defaults(func=_backup)
