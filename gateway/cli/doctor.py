"""``waba-gateway doctor``: one readiness report for Meta's webhooks, one line per finding.

A configuration that does not load is a FAIL line (exit 1), not a usage error: finding it is
doctor's job (:mod:`gateway.onboarding.doctor` gathers the findings).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
from pathlib import Path

from gateway.cli.args import add_config_argument, config_from_args
from gateway.cli.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from gateway.errors import ConfigError, GatewayError
from gateway.onboarding.doctor import diagnose
from gateway.onboarding.meta_client import client_context
from gateway.onboarding.readiness import Finding
from gateway.onboarding.verify_callback import callback_url

__all__ = ["register"]

EPILOG = f"""\
exit codes:
  {EXIT_OK}  no FAIL (WARN lines may remain)
  {EXIT_FAILURE}  at least one FAIL
  {EXIT_USAGE}  usage error: a bad --public-url or --ca-file
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="report readiness: certificates, Meta's CA, targets, outbox, handshake",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(parser, dev=True)
    parser.add_argument(
        "--public-url",
        help="the callback URL Meta calls (https://your.host/webhook): check that the certificate "
        "covers its host and send Meta's GET handshake through it",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="trust this CA bundle instead of the system store, for the server chain and the "
        "handshake (private or test deployments; Meta itself trusts public CAs only)",
    )
    parser.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    public_url: str | None = args.public_url
    # Meta calls https:// callbacks only (getting-started, "mTLS for Webhooks").
    if public_url is not None and callback_url(public_url).scheme != "https":
        raise GatewayError(f"--public-url {public_url!r}: expected an https:// URL")
    ca_file: Path | None = args.ca_file
    if ca_file is not None:
        client_context(ca_file, None, None)  # a CA file OpenSSL refuses is a usage error
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        findings = [Finding("FAIL", str(exc), "fix the configuration, then run doctor again")]
    else:
        now = datetime.datetime.now(datetime.UTC)
        findings = asyncio.run(diagnose(config, now, public_url=public_url, ca_file=ca_file))
    for finding in findings:
        print(finding.line())
    return EXIT_FAILURE if any(finding.level == "FAIL" for finding in findings) else EXIT_OK
