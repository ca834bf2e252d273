"""Options that several commands share: which configuration file to load.

Rule: this is the only code that turns ``--config`` (or ``$WABA_GATEWAY_CONFIG``) into a loaded
:class:`~gateway.config.Config`; every command that reads the configuration goes through it, so
they all find the same file and fail with the same message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.config import Config, default_config_path, load_config
from gateway.errors import ConfigError

__all__ = ["add_config_argument", "config_from_args"]


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file (default: $WABA_GATEWAY_CONFIG, else config/gateway.toml)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    path: Path = args.config or default_config_path()
    if not path.exists():
        raise ConfigError(
            f"{path}: no such file (copy config/gateway.example.toml, or try "
            "'waba-gateway serve --dev')"
        )
    return load_config(path)
