"""The ``waba-gateway`` command line: a thin boundary.

Rule: this package is the only one that knows argv, standard output and exit codes. Each command
is a module here that registers itself through a ``register(subparsers)`` function setting
``func`` (``argparse.Namespace -> int``), and calls into the rest of the gateway for the work.
:func:`main` is the one place that turns a :class:`~gateway.errors.GatewayError` into
``error: ...`` and an exit code (:mod:`gateway.cli.exit_codes`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from gateway.cli.exit_codes import EXIT_USAGE, GRAPH_EXIT_CODES
from gateway.errors import GatewayError, GraphError
from gateway.version import __version__

__all__ = ["main"]

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    # One line per command module, in the order `--help` lists them. Imported here, not at the
    # top, so that importing this module stays cheap.
    from gateway.cli import (
        backup,
        check,
        deliveries,
        doctor,
        reload,
        send,
        serve,
        subscriptions,
        verify_callback,
    )

    return [
        serve.register,
        reload.register,
        check.register,
        doctor.register,
        deliveries.register,
        backup.register,
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
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["serve"] and threading.current_thread() is threading.main_thread():
        # A SIGHUP's default action ends the process, and `systemctl reload` right after
        # `systemctl start` (the unit is Type=exec) sends one while the command modules still
        # import, a third of a second: ignored from here until serving installs its own
        # handler (gateway.runtime.process, gateway.runtime.workers).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        # Ctrl-C while the commands' modules import (a second on a slow machine) is a stop
        # asked for, as it is later: exit 130 as a shell would, with no traceback.
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except GraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return GRAPH_EXIT_CODES[exc.reason]
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
