"""Options that several commands share: which configuration file to load.

Rule: this is the only code that turns ``--config`` (or ``$WABA_GATEWAY_CONFIG``) into a loaded
:class:`~gateway.config.Config`; every command that reads the configuration goes through it, so
they all find the same file and fail with the same message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.config import Config, default_config_path, load_config
from gateway.devfiles import DEV_DIR, config_path
from gateway.errors import ConfigError

__all__ = ["add_config_argument", "config_file_from_args", "config_from_args"]


def add_config_argument(parser: argparse.ArgumentParser, *, dev: bool = False) -> None:
    """``--config``; with ``dev``, also ``--dev``: the configuration ``serve --dev`` wrote."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file (default: $WABA_GATEWAY_CONFIG, else config/gateway.toml)",
    )
    if dev:
        parser.add_argument(
            "--dev",
            action="store_true",
            help=f"the dev gateway's configuration, {config_path(Path(DEV_DIR))}, as "
            "'serve --dev' wrote it",
        )
        parser.add_argument("--dev-dir", default=DEV_DIR, help=argparse.SUPPRESS)


def config_file_from_args(args: argparse.Namespace) -> Path:
    """The configuration file ``--config``, ``--dev`` or the environment names; it exists."""
    if getattr(args, "dev", False) and args.config is None:
        path = config_path(Path(args.dev_dir))
        if not path.exists():
            raise ConfigError(
                f"{path}: no dev configuration yet; start 'waba-gateway serve --dev' first"
            )
        return path
    path = args.config or default_config_path()
    if not path.exists():
        raise ConfigError(
            f"{path}: no such file (copy config/gateway.example.toml, or try "
            "'waba-gateway serve --dev')"
        )
    return Path(path)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(config_file_from_args(args))
