"""``waba-gateway reload``: ask the running gateway to reload its configuration and files.

It reads the admin listener's address and token from the configuration file's ``[admin]`` table
alone and POSTs ``/admin/reload``, as SIGHUP would: the gateway reads the whole file, so a file
that does not load (a misspelt key, invalid TOML) is one failed reload, logged and counted by the
gateway, whichever way it was asked. Exit codes: 0 reloaded (by every worker, when there are
several); 1 the reload failed (the gateway keeps its previous configuration), not every worker
took it (the line names those that did not), or the gateway could not be reached; 2 the
``[admin]`` table itself cannot be used to find the gateway. The line printed is the one the
gateway logged.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys

import aiohttp

from gateway.cli.args import add_config_argument, config_file_from_args
from gateway.cli.exit_codes import EXIT_FAILURE, EXIT_OK
from gateway.config import AdminConfig, load_admin_config
from gateway.errors import ConfigError
from gateway.onboarding.graph import one_line

__all__ = ["admin_url", "register"]

_TIMEOUT_S = 30.0


def admin_url(admin: AdminConfig, path: str) -> str:
    """The admin listener's URL for ``path``: an "any address" host is reached on loopback."""
    host = admin.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            host = "127.0.0.1" if address.version == 4 else "::1"
        if address.version == 6:
            host = f"[{host}]"
    return f"http://{host}:{admin.port}{path}"


async def _ask(url: str, token: str | None) -> tuple[bool, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, headers=headers) as response,
        ):
            status = response.status
            is_json = response.content_type == "application/json"
            # Decoded leniently: what answers on the admin port may not be the gateway at all.
            text = (await response.read()).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return False, (
            f"cannot reach the gateway's admin listener at {url}: {exc or type(exc)} ({_MOVED})"
        )
    shown = one_line(text)[:200]
    if status == 401:
        # The file's token is the one sent, and the file may hold a new one: the gateway keeps
        # the token it holds until a reload applies the new one.
        return False, f"the gateway answered 401: {shown} ({_ROTATED})"
    if not is_json:
        return False, f"the gateway answered {status}: {shown}"
    try:
        body: object = json.loads(text)
    except ValueError:
        # A proxy's or another service's error page labelled JSON: not the gateway's answer.
        return False, f"the gateway answered {status} with invalid JSON: {shown}"
    if not isinstance(body, dict):
        return False, f"the gateway answered {status} with JSON that is not an object: {shown}"
    return bool(body.get("ok")), one_line(str(body.get("message", "")))


# What the command cannot do through the admin listener, and the way that remains: it reads the
# address and token from the file, which may already hold new ones.
_MOVED = (
    "if admin.host or admin.port changed in the file, the gateway listens where it did until a"
    " restart: reload it with SIGHUP meanwhile"
)
_ROTATED = (
    "if admin.token changed in the file, the gateway still holds the old one: apply the new one"
    " with SIGHUP (systemctl reload) instead"
)


def _reload(args: argparse.Namespace) -> int:
    path = config_file_from_args(args)
    admin = load_admin_config(path)
    if not admin.enabled:
        raise ConfigError(
            f"{path}: admin.enabled = false: the reload goes through the admin"
            " listener; send SIGHUP to the serve process instead"
        )
    ok, message = asyncio.run(_ask(admin_url(admin, "/admin/reload"), admin.token))
    if ok:
        print(message)
        return EXIT_OK
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="have the running gateway reload its configuration, certificates and secrets",
    )
    add_config_argument(parser, dev=True)
    parser.set_defaults(func=_reload)
