"""``waba-gateway serve``: run the gateway from a configuration file, or in dev mode."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.args import add_config_argument, config_from_args
from gateway.config import default_config_path
from gateway.devfiles import DEV_ADMIN_PORT, DEV_DIR, DEV_PORT
from gateway.edge.tls import build_server_context
from gateway.errors import GatewayError, PortInUse
from gateway.runtime import dev
from gateway.runtime.logs import setup_logging
from gateway.runtime.ports import check_ports_free
from gateway.runtime.process import event_loop_runner, serve_process
from gateway.runtime.workers import supervise

__all__ = ["register"]


def _say(line: str) -> None:
    print(line, flush=True)


# In dev mode a busy port is changed with an option, otherwise with a key of the file.
_DEV_OPTIONS = {"listen.port": "--port", "admin.port": "--admin-port"}


def _serve_dev(args: argparse.Namespace) -> int:
    for option in ("port", "admin_port"):
        value = getattr(args, option)
        if value is not None and not 0 <= value <= 65535:
            raise GatewayError(f"--{option.replace('_', '-')} {value}: expected 0 to 65535")
    try:
        with event_loop_runner() as runner:
            runner.run(
                dev.serve_dev(Path(args.dev_dir), _say, port=args.port, admin_port=args.admin_port)
            )
    except PortInUse as exc:
        raise GatewayError(
            f"port {exc.port} is in use; choose another with {_DEV_OPTIONS[exc.key]}"
        ) from exc
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.dev:
        return _serve_dev(args)
    if args.port is not None or args.admin_port is not None:
        raise GatewayError(
            "--port and --admin-port go with --dev; otherwise set listen.port"
            " and admin.port in the configuration file"
        )
    config = config_from_args(args)
    # Refuse bad certificate files before anything starts.
    build_server_context(config.tls, source=config.source)
    setup_logging(config.log_level, config.log_format)
    try:
        if config.listen.workers > 1:
            check_ports_free(config)
            return supervise(config)
        serve_process(config)
    except PortInUse as exc:
        source = config.source or args.config or default_config_path()
        # The wording of gateway.runtime.ports.listen_error, which the supervisor's own bind
        # gives: one message for a busy port however the gateway runs.
        raise GatewayError(
            f"{exc.key} {exc.port} in {source} is in use by another process (another gateway?);"
            " stop it or choose another port"
        ) from exc
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="run the gateway")
    add_config_argument(parser)
    parser.add_argument(
        "--dev",
        action="store_true",
        help="no set-up: dev certificates, secrets and a printing target under var/dev/",
    )
    parser.add_argument("--dev-dir", default=DEV_DIR, help=argparse.SUPPRESS)
    parser.add_argument(
        "--port", type=int, default=None, help=f"with --dev: listen port (default {DEV_PORT})"
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help=f"with --dev: admin listener and console port (default {DEV_ADMIN_PORT})",
    )
    parser.set_defaults(func=_serve)
