"""The way in: a TOML file read, its ``${NAME}`` references expanded, validated and frozen.

Rule: nothing outside this package reads TOML or the environment for settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gateway.config.model import DEFAULT_CONFIG_PATH, AdminConfig, Config
from gateway.config.reader import Reader
from gateway.config.sections import ConfigReader
from gateway.errors import ConfigError

__all__ = ["default_config_path", "load_admin_config", "load_config"]


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$WABA_GATEWAY_CONFIG``, else ``config/gateway.toml``."""
    value = env.get("WABA_GATEWAY_CONFIG")
    return Path(value) if value else DEFAULT_CONFIG_PATH


def _toml_problem(exc: ValueError) -> str:
    """What is wrong with a file tomllib refused: its own words, or, for the ValueError it lets
    through from int() for an integer of more than 4,300 digits, what that means in TOML."""
    if isinstance(exc, tomllib.TOMLDecodeError | UnicodeDecodeError):
        return str(exc)
    return "an integer of more than 4300 digits (TOML's integers are 64-bit)"


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read, expand ``${ENV}``, validate and freeze the TOML file at ``path``.

    Raises :class:`~gateway.errors.ConfigError` for an unreadable file, invalid TOML, an unknown
    table or key, a wrong type, a value out of range or an unset environment variable. It does not
    open the certificate, key, CA or CRL files; building the TLS context does that.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
        raise ConfigError(f"{path}: invalid TOML: {_toml_problem(exc)}") from exc
    return ConfigReader(path, env).config(data)


def load_admin_config(path: Path, env: Mapping[str, str] = os.environ) -> AdminConfig:
    """Only the ``[admin]`` table of the file at ``path``, validated as :func:`load_config` does.

    This is how ``waba-gateway reload`` finds the running gateway's admin listener when the rest
    of the file would not load (a misspelt key, invalid TOML in another table): the gateway
    itself then reads the whole file, and reports, logs and counts the failed reload. Raises
    :class:`~gateway.errors.ConfigError` when the file cannot be read or ``[admin]`` itself is
    invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except ValueError:  # TOMLDecodeError, or int()'s for an integer of over 4300 digits
        # Invalid elsewhere, perhaps: read the [admin] table's own lines alone.
        try:
            data = tomllib.loads(_admin_lines(text))
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid TOML in [admin]: {_toml_problem(exc)}") from exc
    return Reader(path, env).section("admin", "admin", data.get("admin", {}), AdminConfig)


_TABLE_HEADER = re.compile(r"^\s*\[")
_ADMIN_HEADER = re.compile(r"^\s*\[\s*admin\s*\]\s*(#.*)?$")


def _admin_lines(text: str) -> str:
    """The ``[admin]`` header and the lines up to the next table's header ('' if none)."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if _TABLE_HEADER.match(line):
            inside = bool(_ADMIN_HEADER.match(line))
        if inside:
            lines.append(line)
    return "\n".join(lines)
