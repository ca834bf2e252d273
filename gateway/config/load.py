"""The way in: a TOML file read, its ``${NAME}`` references expanded, validated and frozen.

Rule: nothing outside this package reads TOML or the environment for settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.model import DEFAULT_CONFIG_PATH, AdminConfig, Config
from gateway.config.reader import Reader
from gateway.config.sections import ConfigReader
from gateway.errors import ConfigError

__all__ = ["MAX_NESTING", "default_config_path", "load_admin_config", "load_config"]

# How deep arrays and tables may nest in a configuration file. TOML sets no limit, but tomllib
# parses an array or inline table by recursive descent, two or three Python frames a level, and
# a file nested a few hundred levels deep ends it in RecursionError; tables written as dotted
# keys or headers it builds without recursion, however deep, and repr() of such a value (an error
# message shows one) recurses in turn. The schema goes three levels down (targets[0].fields: an
# array of tables, a table, an array); 32 is room for any mistake, and far from the recursion
# limit wherever a load starts (a reload runs inside a request handler).
MAX_NESTING = 32
_TOO_DEEP = f"arrays and tables nested more than {MAX_NESTING} levels deep"


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

    Raises :class:`~gateway.errors.ConfigError` for an unreadable file, invalid TOML, arrays or
    tables nested deeper than :data:`MAX_NESTING` levels, an unknown table or key, a wrong type,
    a value out of range or an unset environment variable. It does not open the certificate,
    key, CA or CRL files; building the TLS context does that.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
        raise ConfigError(f"{path}: invalid TOML: {_toml_problem(exc)}") from exc
    except RecursionError:  # see MAX_NESTING; its traceback, the parser's frames, tells nothing
        raise ConfigError(f"{path}: {_TOO_DEEP}") from None
    _check_nesting(path, data)
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
    except (ValueError, RecursionError):  # TOMLDecodeError, int()'s, nesting (MAX_NESTING)
        # Invalid elsewhere, perhaps: read the [admin] table's own lines alone.
        try:
            data = tomllib.loads(_admin_lines(text))
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid TOML in [admin]: {_toml_problem(exc)}") from exc
        except RecursionError:
            raise ConfigError(f"{path}: {_TOO_DEEP} in [admin]") from None
    admin = data.get("admin", {})
    _check_nesting(path, {"admin": admin})  # only [admin]: the rest may be what the gateway refuses
    return Reader(path, env).section("admin", "admin", admin, AdminConfig)


def _check_nesting(path: Path, data: dict[str, Any]) -> None:
    """Refuse arrays and tables nested deeper than :data:`MAX_NESTING` levels (the document's
    own tables are level 1), naming the key as other messages name one: a table's name, an index
    into an array of tables, a key (``listen.host``, ``targets[0].fields``). The walk keeps its
    own stack, not Python's."""
    # (value, its level, its key as a message names it, how much of that key is written: 0
    # nothing, 1 a table's name, 2 that and an index, 3 all of it)
    pending: list[tuple[dict[str, Any] | list[Any], int, str, int]] = [(data, 0, "", 0)]
    while pending:
        value, level, key, written = pending.pop()
        if level > MAX_NESTING:
            raise ConfigError(f"{path}: {key}: {_TOO_DEEP}")
        steps = value.items() if isinstance(value, dict) else enumerate(value)
        for step, item in steps:
            if not isinstance(item, dict | list):
                continue
            if written == 0:
                pending.append((item, level + 1, str(step), 1))
            elif written == 1 and isinstance(step, int):
                pending.append((item, level + 1, f"{key}[{step}]", 2))
            elif written < 3 and isinstance(step, str):
                pending.append((item, level + 1, f"{key}.{step}", 3))
            else:
                pending.append((item, level + 1, key, 3))


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
