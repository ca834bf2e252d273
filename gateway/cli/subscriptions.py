"""The WABA subscription commands: ``subscribe``, ``subscriptions``, ``unsubscribe`` and
``clear-override``, each one call to ``/{waba-id}/subscribed_apps`` (whatsapp/webhooks/override),
or for ``subscriptions`` one call per page of the list (graph-api/results).

Rule: a command checks all of its input before it makes its Graph API call, and never repeats
it: subscribed_apps calls count towards a rate limit of 200 an hour per app and WABA, and every
call made while limited extends the block (graph-api/overview/rate-limiting). Reading the next
page of a list is not a retry; it stops at a rate limit like any call
(:func:`gateway.onboarding.graph.call_every_page`).

Exit codes: :data:`gateway.cli.exit_codes.GRAPH_EXIT_CODES`.

The access token comes from ``--access-token`` or ``WABA_ACCESS_TOKEN`` and is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from gateway.cli.exit_codes import GRAPH_EPILOG
from gateway.errors import GraphError
from gateway.onboarding import graph

__all__ = ["format_subscriptions", "register"]

TOKEN_ENV = "WABA_ACCESS_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
DEFAULT_TIMEOUT_S = 30.0

EPILOG = (
    GRAPH_EPILOG
    + f"""
The access token is read from ${TOKEN_ENV} unless --access-token is given; prefer the variable,
since command-line arguments are visible to other users of the machine.
"""
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the four subscription commands to the ``waba-gateway`` parser."""
    common = _common_options()
    subscribe = _add(
        subparsers,
        common,
        "subscribe",
        _subscribe,
        "subscribe the token's app to a WABA's webhooks",
        "POST /{WABA_ID}/subscribed_apps. Without an override this also removes any override"
        " callback the WABA had. Template and account fields never follow overrides.",
    )
    subscribe.add_argument(
        "--override-callback-uri",
        metavar="URI",
        help="https:// callback for this WABA only (at most 200 characters); needs --verify-token",
    )
    subscribe.add_argument(
        "--verify-token",
        metavar="TOKEN",
        help="token Meta sends in the GET handshake to the override callback",
    )
    listing = _add(
        subparsers,
        common,
        "subscriptions",
        _subscriptions,
        "list the apps subscribed to a WABA and their override callbacks",
        "GET /{WABA_ID}/subscribed_apps, every page of it, printed as a table.",
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help="print Meta's JSON answer instead (the apps of every page in one data list)",
    )
    _add(
        subparsers,
        common,
        "unsubscribe",
        _unsubscribe,
        "unsubscribe the token's app from a WABA",
        "DELETE /{WABA_ID}/subscribed_apps. Meta stops delivering the WABA's webhooks at once.",
    )
    _add(
        subparsers,
        common,
        "clear-override",
        _clear_override,
        "remove a WABA's override callback",
        "POST /{WABA_ID}/subscribed_apps with no body: the app's own callback receives the WABA's"
        " webhooks again.",
    )


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("waba_id", metavar="WABA_ID", help="WhatsApp Business Account id (digits)")
    common.add_argument(
        "--access-token", metavar="TOKEN", help=f"Graph API access token (default: ${TOKEN_ENV})"
    )
    common.add_argument(
        "--graph-url", default=DEFAULT_GRAPH_URL, help="Graph API base URL (default: %(default)s)"
    )
    common.add_argument(
        "--api-version",
        default=DEFAULT_API_VERSION,
        help="Graph API version (default: %(default)s)",
    )
    common.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for Meta's answer (default: %(default)s)",
    )
    return common


def _add(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    func: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        parents=[common],
        help=summary,
        description=textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {description}", 78),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def _subscribe(args: argparse.Namespace) -> int:
    request = graph.build_request(
        "subscribe",
        args.waba_id,
        api_version=args.api_version,
        override_callback_uri=args.override_callback_uri,
        verify_token=args.verify_token,
    )
    _require_success(args, _call(args, request))
    if request.body is None:
        print(f"subscribed to WABA {args.waba_id}; webhooks go to the app's callback URL")
    else:
        print(f"subscribed to WABA {args.waba_id}; webhooks go to {args.override_callback_uri}")
    return 0


def _subscriptions(args: argparse.Namespace) -> int:
    request = graph.build_request("list", args.waba_id, api_version=args.api_version)
    # An app on page 2 is subscribed all the same: a list is read to its last page.
    answer = _call(args, request, every_page=True)
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    else:
        print(format_subscriptions(args.waba_id, answer))
    return 0


def _unsubscribe(args: argparse.Namespace) -> int:
    request = graph.build_request("unsubscribe", args.waba_id, api_version=args.api_version)
    _require_success(args, _call(args, request))
    print(f"unsubscribed from WABA {args.waba_id}; Meta stops delivering its webhooks")
    return 0


def _clear_override(args: argparse.Namespace) -> int:
    request = graph.build_request("clear-override", args.waba_id, api_version=args.api_version)
    _require_success(args, _call(args, request))
    print(f"override removed for WABA {args.waba_id}; webhooks go to the app's callback URL")
    return 0


def _call(
    args: argparse.Namespace, request: graph.GraphRequest, *, every_page: bool = False
) -> dict[str, Any]:
    """Check the remaining options, then make the one call (``every_page``: one per page of the
    list); warnings go to stderr at once."""
    token = _access_token(args.access_token)
    graph_url = graph.validate_graph_url(args.graph_url)
    # inf (meant as "no limit") is no timeout aiohttp can set: it fails inside the request.
    if not args.timeout_s > 0 or not math.isfinite(args.timeout_s):
        raise GraphError(
            f"--timeout-s {args.timeout_s:g}: expected a positive number of seconds",
            reason="usage",
        )
    calling = graph.call_every_page if every_page else graph.call
    return asyncio.run(
        calling(
            request,
            graph_url=graph_url,
            access_token=token,
            timeout_s=args.timeout_s,
            warn=lambda line: print(line, file=sys.stderr),
        )
    )


def _access_token(option: str | None) -> str:
    """The token from the option or the environment; messages name its source, never its value."""
    source = "--access-token" if option is not None else TOKEN_ENV
    token = (option if option is not None else os.environ.get(TOKEN_ENV, "")).strip()
    if not token:
        raise GraphError(f"no access token: pass --access-token or set {TOKEN_ENV}", reason="usage")
    # A token with a space or newline would make an invalid Authorization header.
    if any(char.isspace() or not char.isprintable() for char in token):
        raise GraphError(
            f"the access token in {source} contains whitespace or control characters",
            reason="usage",
        )
    return token


def _require_success(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if answer.get("success") is not True:
        # Meta's answer is quoted: without the token, should it echo it (as graph.call does).
        quoted = graph.redact(json.dumps(answer), _access_token(args.access_token))
        summary = graph.one_line(quoted)[:200]
        raise GraphError(f"Graph API did not confirm success: {summary}")


def format_subscriptions(waba_id: str, answer: dict[str, Any]) -> str:
    """A plain-text table of the apps in a ``GET subscribed_apps`` answer.

    Shape (whatsapp/webhooks/override): ``{"data": [{"whatsapp_business_api_data": {"id",
    "link", "name"}, "override_callback_uri"?}]}``. The override column appears only when some
    app has an override. Values are folded to one printable line, since they come from the wire.
    """
    entries = answer.get("data")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise GraphError("Graph API answered subscribed_apps without a 'data' list of apps")
    if not entries:
        return f"no app is subscribed to WABA {waba_id}"
    header = ["APP ID", "NAME", "LINK"]
    with_override = any("override_callback_uri" in entry for entry in entries)
    if with_override:
        header.append("OVERRIDE CALLBACK URI")
    rows = [header]
    for entry in entries:
        app = entry.get("whatsapp_business_api_data")
        app = app if isinstance(app, dict) else {}
        row = [_cell(app.get("id")), _cell(app.get("name")), _cell(app.get("link"))]
        if with_override:
            row.append(_cell(entry.get("override_callback_uri")))
        rows.append(row)
    return _table(rows)


def _cell(value: object) -> str:
    return "-" if value is None else graph.one_line(str(value)) or "-"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = (
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )
    return "\n".join(line.rstrip() for line in lines)
