"""``waba-gateway verify-callback``: run Meta's verification handshake against a callback URL.

The verify token comes from ``$WABA_VERIFY_TOKEN`` (the variable the shipped configurations
read it from), or from ``--verify-token``. Exit codes: 0 Meta would verify the callback; 1 it
would not (including an http:// URL: Meta only calls https:// callbacks); 2 bad input (a
malformed URL, unreadable certificate files, no verify token).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from pathlib import Path

from gateway.cli.exit_codes import EXIT_FAILURE, EXIT_OK
from gateway.errors import GatewayError
from gateway.onboarding.meta_client import client_context
from gateway.onboarding.verify_callback import DEFAULT_TIMEOUT_S, callback_url, verify

__all__ = ["TOKEN_ENV", "register"]

TOKEN_ENV = "WABA_VERIFY_TOKEN"  # noqa: S105 (the variable's name, not a token)


def _verify_callback(args: argparse.Namespace) -> int:
    url = callback_url(args.url)
    # From the environment by default: a token on the command line is in the shell's history
    # and in every process listing.
    token = args.verify_token if args.verify_token is not None else os.environ.get(TOKEN_ENV)
    if token is None:
        raise GatewayError(f"no verify token: set {TOKEN_ENV} (or pass --verify-token)")
    if not token:
        where = "--verify-token" if args.verify_token is not None else TOKEN_ENV
        raise GatewayError(f"{where} must not be empty")
    # inf (meant as "no limit") is no timeout aiohttp can set: it fails inside the request.
    if not args.timeout_s > 0 or not math.isfinite(args.timeout_s):
        raise GatewayError(f"--timeout-s {args.timeout_s:g}: expected a positive number")
    context = client_context(args.ca_file, args.cert, args.key)
    verdict = asyncio.run(
        verify(
            url,
            token,
            context=context,
            timeout_s=args.timeout_s,
            sent_certificate=args.cert is not None,
        )
    )
    print(verdict.message)
    return EXIT_OK if verdict.accepted else EXIT_FAILURE


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify-callback",
        help="run Meta's GET verification handshake against a callback URL",
        description="Send the GET Meta sends when a callback URL is saved, and say whether Meta "
        "would verify it. Exit 0: verified; 1: not verified; 2: bad input.",
    )
    parser.add_argument("url", metavar="URL", help="the callback, e.g. https://host/webhook")
    parser.add_argument(
        "--verify-token",
        metavar="TOKEN",
        help=f"the token to send (never printed); default: ${TOKEN_ENV}, which keeps it out of "
        "the shell's history and the process list",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="trust only these CA certificates instead of the system store (Meta uses public CAs)",
    )
    parser.add_argument("--cert", type=Path, help="client certificate chain to present, as Meta")
    parser.add_argument("--key", type=Path, help="the client certificate's private key")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for the answer (default: %(default)s)",
    )
    parser.set_defaults(func=_verify_callback)
