"""``waba-gateway send``: POST a notification to a callback exactly as Meta would.

Rule: the payload file's bytes are sent as they are, never parsed and re-serialised (Meta signs
its escaped bytes, and so does this command); the app secret and the client certificate are
Meta's. A payload that is not JSON is still sent, with a warning. The app secret comes from
``--app-secret``, the dev secrets (``--dev``) or ``WABA_APP_SECRET``, and is never printed.

With ``--count``/``--concurrency`` it is a load generator (:mod:`gateway.onboarding.loadgen`). The
gateway acknowledges a body it already stored without storing it again, so ``--unique`` makes each
body distinct: it inserts a per-run marker and the request's number right after the first ``wamid.``
of the payload (the id of its first message or status). ``--dev`` with its own sample does so
always, so that every try is delivered; the port is the one ``serve --dev`` wrote in its
configuration file.

Exit codes: 0 every request got a 2xx answer; 1 otherwise; 2 bad input (unreadable payload,
missing secret, bad option value).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import ssl
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.config import ListenConfig
from gateway.devfiles import DEV_PORT, DevFiles, config_path
from gateway.errors import GatewayError
from gateway.onboarding.loadgen import make_unique, post, run_load
from gateway.onboarding.meta_client import client_context, diagnose
from gateway.onboarding.verify_callback import callback_url

__all__ = ["SECRET_ENV", "register"]

SECRET_ENV = "WABA_APP_SECRET"  # noqa: S105 - the variable's name, not a secret
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Request:
    url: str
    payload: Path
    app_secret: str
    ca_file: Path | None
    cert: Path | None
    key: Path | None
    unique: bool = False


def _dev_url(folder: Path) -> str:
    """The callback of the dev gateway, from the configuration ``serve --dev`` last wrote."""
    listen = ListenConfig()
    port, path = DEV_PORT, listen.path
    try:
        written = tomllib.loads(config_path(folder).read_text()).get("listen", {})
        port, path = int(written.get("port", port)), str(written.get("path", path))
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        # Not written yet, unreadable, or not as serve --dev writes it (nested past tomllib's
        # recursion, or [listen] not a table): the default port, as if there were none.
        pass
    return f"https://localhost:{port}{path}"


def _resolve(args: argparse.Namespace) -> _Request:
    """The URL, payload, secret and certificates from the options and, with ``--dev``, the dev
    files of ``serve --dev``; options given explicitly win."""
    url, payload = args.url, args.payload
    if args.dev and url is not None and payload is None and "://" not in url:
        url, payload = None, url  # `send --dev PAYLOAD`
    ca_file, cert, key, secret = args.ca_file, args.cert, args.key, args.app_secret
    unique = bool(args.unique)
    if args.dev:
        files = DevFiles.under(Path(args.dev_dir))
        try:
            dev_secret = str(json.loads(files.secrets.read_text())["app_secret"])
        except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: not an object
            raise GatewayError(
                f"{files.secrets}: no dev secrets ({exc.__class__.__name__}); run "
                "'waba-gateway serve --dev' once first"
            ) from exc
        url = url or _dev_url(files.folder)
        if payload is None:
            # The sample is one notification: sent again as it is, the gateway would
            # acknowledge it as a duplicate and deliver nothing.
            payload, unique = files.sample, True
        ca_file, cert = ca_file or files.server_ca, cert or files.client_chain
        key, secret = key or files.client_key, secret or dev_secret
    if url is None or payload is None:
        raise GatewayError("URL and PAYLOAD are required (or use --dev)")
    secret = secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise GatewayError(f"no app secret: pass --app-secret or set {SECRET_ENV}")
    return _Request(
        url=str(callback_url(url)),
        payload=Path(payload),
        app_secret=secret,
        ca_file=ca_file,
        cert=cert,
        key=key,
        unique=unique,
    )


def _read_payload(path: Path) -> bytes:
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise GatewayError(f"{path}: cannot read the payload: {exc.strerror or exc}") from exc
    try:
        json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        print(f"warning: {path} is not valid JSON ({exc}); sending it as it is", file=sys.stderr)
    return body


async def _send_once(
    request: _Request, body: bytes, context: ssl.SSLContext, timeout_s: float
) -> int:
    """One POST; prints the status and the first line of the answer, or why there is none."""
    connector = aiohttp.TCPConnector(ssl=context)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        answer = await post(session, request.url, body, request.app_secret, timeout_s=timeout_s)
    if answer.error is not None:
        url = callback_url(request.url)
        _, message = await diagnose(
            answer.error,
            url.host or "",
            url.port or 443,
            timeout_s,
            sent_certificate=request.cert is not None,
        )
        print(message)
        return 1
    line = f"HTTP {answer.status} {answer.reason}".rstrip()
    print(f"{line}: {answer.first_line}" if answer.first_line else line)
    return 0 if answer.ok else 1


def _send_command(args: argparse.Namespace) -> int:
    for option in ("count", "concurrency"):
        if getattr(args, option) < 1:
            raise GatewayError(f"--{option} {getattr(args, option)}: expected an integer >= 1")
    if not args.timeout_s > 0:
        raise GatewayError(f"--timeout-s {args.timeout_s:g}: expected a positive number")
    request = _resolve(args)
    body = _read_payload(request.payload)
    context = client_context(request.ca_file, request.cert, request.key)
    run_id = secrets.token_hex(4)

    def body_for(index: int) -> bytes:
        return make_unique(body, run_id, index) if request.unique else body

    body_for(0)  # --unique: refuse a payload without a wamid before sending anything
    if args.count == 1 and not args.json:
        return asyncio.run(_send_once(request, body_for(0), context, args.timeout_s))
    report = asyncio.run(
        run_load(
            request.url,
            body_for,
            request.app_secret,
            count=args.count,
            concurrency=args.concurrency,
            context=context,
            new_connections=args.new_connections,
            timeout_s=args.timeout_s,
        )
    )
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok == report.requests else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "send",
        help="POST a signed notification to a callback as Meta would (or a load of them)",
        description="POST PAYLOAD's bytes as Meta would: Content-Type application/json, "
        "X-Hub-Signature-256 under the app secret, and a client certificate. "
        "Exit 0: every request got a 2xx answer; 1: not; 2: bad input.",
        epilog=f"The app secret is read from ${SECRET_ENV} unless --app-secret is given; prefer "
        "the variable, since command-line arguments are visible to other users of the machine.",
    )
    parser.add_argument("url", metavar="URL", nargs="?", help="the callback (optional with --dev)")
    parser.add_argument(
        "payload", metavar="PAYLOAD", nargs="?", type=Path, help="JSON file, sent byte for byte"
    )
    parser.add_argument("--app-secret", metavar="SECRET", help=f"default: ${SECRET_ENV}")
    parser.add_argument("--cert", type=Path, help="client certificate: leaf + intermediate")
    parser.add_argument("--key", type=Path, help="the client certificate's private key")
    parser.add_argument("--ca-file", type=Path, help="trust these CAs instead of the system store")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="per request")
    load = parser.add_argument_group("load generator")
    load.add_argument("--count", type=int, default=1, help="requests to send (default: 1)")
    load.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    load.add_argument(
        "--new-connections",
        action="store_true",
        help="a new TLS connection for each request instead of keep-alive",
    )
    load.add_argument(
        "--unique",
        action="store_true",
        help="make each body distinct: insert a marker after the first 'wamid.'",
    )
    load.add_argument("--json", action="store_true", help="print the load report as JSON")
    dev = parser.add_argument_group("dev mode")
    dev.add_argument(
        "--dev",
        action="store_true",
        help="the certificates, secret and sample of 'serve --dev' (each sample sent made "
        "unique); URL defaults to the dev gateway's, https://localhost:8443/webhook unless "
        "serve --dev --port said otherwise",
    )
    dev.add_argument("--dev-dir", default="var/dev", help="dev files (default: %(default)s)")
    parser.set_defaults(func=_send_command)
