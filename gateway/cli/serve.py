"""``waba-gateway serve``: run the gateway from a configuration file, or in dev mode."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.args import add_config_argument, config_from_args
from gateway.edge.tls import build_server_context
from gateway.runtime import dev
from gateway.runtime.gateway import event_loop_runner, serve_process
from gateway.runtime.logs import setup_logging
from gateway.runtime.workers import supervise

__all__ = ["register"]


def _say(line: str) -> None:
    print(line, flush=True)


def _serve(args: argparse.Namespace) -> int:
    if args.dev:
        with event_loop_runner() as runner:
            runner.run(dev.serve_dev(Path(args.dev_dir), _say, port=args.port))
        return 0
    config = config_from_args(args)
    # Refuse bad certificate files before anything starts.
    build_server_context(config.tls, source=config.source)
    setup_logging(config.log_level, config.log_format)
    if config.listen.workers > 1:
        return supervise(config)
    serve_process(config, primary=True, reuse_port=False)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="run the gateway")
    add_config_argument(parser)
    parser.add_argument(
        "--dev",
        action="store_true",
        help="no set-up: dev certificates, secrets and a printing target under var/dev/",
    )
    parser.add_argument("--dev-dir", default="var/dev", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help="with --dev: listen port")
    parser.set_defaults(func=_serve)
