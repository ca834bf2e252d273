"""``waba-gateway check``: validate a configuration and its certificate files before serving."""

from __future__ import annotations

import argparse
import asyncio
import datetime

from gateway.cli.args import add_config_argument, config_from_args
from gateway.onboarding.check import outbox_report, report, targets_report

__all__ = ["register"]


def _check(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    for line in report(config, datetime.datetime.now(datetime.UTC)):
        print(line)
    for line in asyncio.run(outbox_report(config)):
        print(line)
    for line in asyncio.run(targets_report(config)):
        print(line)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("check", help="validate the configuration and certificates")
    add_config_argument(parser, dev=True)
    parser.set_defaults(func=_check)
