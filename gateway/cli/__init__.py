"""The ``waba-gateway`` command line: a thin boundary.

Rule: each command lives in the module of its concern and registers itself here through a
``register(subparsers)`` function that sets ``func`` (``argparse.Namespace -> int``). :func:`main`
is the one place that turns a :class:`~gateway.errors.GatewayError` into ``error: ...`` and exit 2
(or the error's own exit code, for Graph API failures).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gateway import __version__
from gateway.errors import GatewayError, GraphError

__all__ = ["main"]

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    # One line per command module, in the order `--help` lists them. Imported here, not at the
    # top, so that importing this module stays cheap.
    from gateway.onboarding import check, doctor, send, subscriptions, verify_callback
    from gateway.runtime import admin
    from gateway.runtime import gateway as serve

    return [
        serve.register,
        check.register,
        doctor.register,
        admin.register,
        subscriptions.register,
        verify_callback.register,
        send.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waba-gateway",
        description="mTLS-terminating gateway for WhatsApp Business Account webhooks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except GraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
