"""Reading a TOML table into a dataclass of :mod:`.model`: its keys, their types, the rules of
:mod:`.rules`, and ``${NAME}`` references to the environment.

Rule: every error is a :class:`~gateway.errors.ConfigError` that names the file, the key path,
the value and what was expected, e.g. ``config/gateway.toml: targets[0].url = 'ftp://x':
expected an http:// or https:// URL``; a secret's value shows only as its ``${NAME}`` text or
``<hidden>``, and so does a misspelt key's whose name looks like a secret's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeGuard, TypeVar, get_args, get_origin, get_type_hints

from gateway.config.model import nats_servers, redact_servers, redact_url, without_user_info
from gateway.config.rules import DATABASE_URLS, DEFAULT_RULES, RULES, SECRETS, URLS
from gateway.errors import ConfigError

__all__ = ["REFERENCE", "Reader", "as_written"]

_T = TypeVar("_T")

# A ${NAME} reference to an environment variable, as a value of the file may hold.
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCALARS: dict[object, tuple[type | UnionType, str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: (int | float, "a finite number"),
}
# TOML's integers are 64-bit ("an error must be thrown" beyond, toml.io); tomllib reads any, and
# a bigger one would overflow float() here, or be refused by Redis (a target's maxlen) at run time.
_INT64 = range(-(2**63), 2**63)
_BEYOND_INT64 = "an integer from -2**63 to 2**63 - 1, as TOML's integers are"


def _beyond_int64(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer TOML's 64 bits cannot hold (a bool is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and value not in _INT64


def _shown(value: object, secret: bool) -> str:
    """The value as a message shows it, spelt as in TOML where Python spells it otherwise
    (``true``, not ``True``); a secret only as its unexpanded ``${NAME}`` text, and only when it
    is nothing else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if _beyond_int64(value):
        # Its digits could fill a screen, or exceed what int-to-text converts (4300 digits).
        return f"<an integer of {value.bit_length()} bits>"
    # A secret written as references alone names where it comes from and holds nothing of
    # it; one that mixes literal text with them ("abcd${SUFFIX}") holds that text.
    if not secret or value in ("", []) or (isinstance(value, str) and _names_only(value)):
        return repr(value)
    return "<hidden>"


def _names_only(text: str) -> bool:
    """Whether ``text`` is nothing but ${NAME} references (and the ":" between them)."""
    return _REFERENCES_ONLY.fullmatch(text) is not None


# A misspelt key whose name has one of these in it, or is close to a secret key's name, may
# hold a secret: its value is hidden. Any other misspelt key's value is shown, to find it by.
_SECRET_WORDS = ("secret", "token", "pass", "key", "auth", "credential", "url")
_SECRET_NAMES = sorted({name.rpartition(".")[2] for name in SECRETS})


def _may_be_secret(key: str, value: object) -> bool:
    """Whether the value of the unknown key ``key`` may be a secret (a table may hold one)."""
    lowered = key.lower()
    return (
        isinstance(value, dict)
        or any(word in lowered for word in _SECRET_WORDS)
        or bool(difflib.get_close_matches(lowered, _SECRET_NAMES))
    )


# User info that names its secrets without holding them: references, and the ":" between.
_REFERENCES_ONLY = re.compile(rf"(?:{REFERENCE.pattern}|:)+")


def as_written(url: str) -> str:
    """A URL (a NATS target's servers) as the file writes it, for a message: each user info
    shown only when it is nothing but ${NAME} references, which name a secret without holding
    it."""
    shown = []
    for server in nats_servers(url):
        redacted = redact_servers(server)
        info = without_user_info(server)[1]
        if info is not None and _names_only(info):
            redacted = redacted.replace("***@", f"{info}@", 1)
        shown.append(redacted)
    return ",".join(shown)


def _written(name: str, text: str) -> str:
    """The text of key ``name`` as the file writes it, as a message may show it: a URL's user
    info, a database URL's password, is literal text there when not a ${NAME} reference."""
    if name in URLS:
        return as_written(text)
    if name in DATABASE_URLS:
        shown = redact_url(text)  # the user name stays, as everywhere a database is shown
        user, colon, password = (without_user_info(text)[1] or "").partition(":")
        if colon and _names_only(password):
            shown = shown.replace(f"{user}:***@", f"{user}:{password}@", 1)
        return shown
    return text


def _hides(name: str, shown: object, secret: bool) -> bool:
    """Whether a message about key ``name`` hides ``shown`` as a secret: a secret URL written
    with ${NAME} references is shown as :func:`_written` makes it (the references say where
    it comes from, its literal user info is out); any other secret only as references alone
    (:func:`_shown`)."""
    url = name in URLS or name in DATABASE_URLS
    return secret and not (url and isinstance(shown, str) and "${" in shown)


def _join(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


class Reader:
    """Reads the tables of the file ``source``, expanding references from ``env``."""

    def __init__(self, source: Path, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env

    def error(self, key: str, value: object, expected: str, *, secret: bool = False) -> ConfigError:
        return ConfigError(f"{self.source}: {key} = {_shown(value, secret)}: expected {expected}")

    def section(self, key: str, name: str, value: object, cls: type[_T]) -> _T:
        """Table ``key`` (``name`` without its index) as a ``cls``."""
        required = [
            each.name
            # _T is always one of the dataclasses above; mypy cannot know that.
            for each in dataclasses.fields(cls)  # type: ignore[arg-type]
            if each.default is dataclasses.MISSING and each.default_factory is dataclasses.MISSING
        ]
        return cls(**self.table(key, name, value, get_type_hints(cls), required))

    def table(
        self,
        key: str,
        name: str,
        value: object,
        hints: Mapping[str, Any],
        required: Iterable[str],
    ) -> dict[str, Any]:
        """The converted values of the keys present in table ``key``."""
        table = self.check_keys(key, value, hints)
        for each in required:
            if each not in table:
                raise ConfigError(f"{self.source}: {_join(key, each)}: required key is missing")
        return {
            each: self.convert(_join(key, each), f"{name}.{each}", hints[each], item)
            for each, item in table.items()
        }

    def check_keys(self, key: str, value: object, known: Iterable[str]) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.error(key, value, "a table", secret=True)
        for each, item in value.items():
            if each not in known:
                expected = "one of the keys " + ", ".join(sorted(known))
                raise self.error(
                    _join(key, each), item, expected, secret=_may_be_secret(each, item)
                )
        return value

    def convert(self, key: str, name: str, hint: Any, value: object) -> Any:
        """``value`` as type ``hint``, checked against the rule for ``name``."""
        secret = name in SECRETS
        if get_origin(hint) is UnionType:  # `X | None`: None is only ever the default
            hint = get_args(hint)[0]
        result: Any
        if hint in _SCALARS:
            kind, expected = _SCALARS[hint]
            if _beyond_int64(value):
                raise self.error(key, value, _BEYOND_INT64, secret=secret)
            # TOML's true is not 1, although Python's bool is an int; an integer is a fine float.
            if (
                not isinstance(value, int | float)
                or not isinstance(value, kind)
                or isinstance(value, bool) != (hint is bool)
                or not math.isfinite(value)
            ):
                raise self.error(key, value, expected, secret=secret)
            result = float(value) if hint is float else value
        elif hint == tuple[float, ...]:
            for i, item in enumerate(value if isinstance(value, list) else []):
                if _beyond_int64(item):
                    raise self.error(f"{key}[{i}]", item, _BEYOND_INT64, secret=secret)
            if not isinstance(value, list) or not all(
                isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item)
                for item in value
            ):
                raise self.error(key, value, "a list of numbers", secret=secret)
            result = tuple(float(item) for item in value)
        elif get_origin(hint) is tuple:
            if not isinstance(value, list):
                raise self.error(key, value, "a list of strings", secret=secret)
            result = tuple(self.text(f"{key}[{i}]", item, secret) for i, item in enumerate(value))
        else:
            result = self.text(key, value, secret, name)
            if get_origin(hint) is Literal and result not in get_args(hint):
                raise self.error(key, result, "one of " + ", ".join(map(repr, get_args(hint))))
            if hint is Path:
                # Relative to the config file, so a config works whatever the working directory.
                result = self.source.parent / result
        valid, expected = RULES.get(name) or DEFAULT_RULES.get(hint, (lambda _: True, ""))
        if not valid(result):
            # The expanded text, or the number as written (`0`, not `0.0`); a URL without
            # its user info (a target's URL may carry a password or a token).
            shown = result if isinstance(result, str) and not secret else value
            if name in URLS and isinstance(shown, str):
                shown = redact_servers(shown)
            elif isinstance(shown, str):
                shown = _written(name, shown)
            raise self.error(key, shown, expected, secret=_hides(name, shown, secret))
        return result

    def text(self, key: str, value: object, secret: bool, name: str = "") -> str:
        """A non-empty string with its ``${NAME}`` references replaced from the environment;
        ``name`` is the key's without its index, for the way a message shows it."""
        if not isinstance(value, str):
            raise self.error(key, value, "a string", secret=secret)
        hidden = _hides(name, value, secret)
        if "${" in REFERENCE.sub("", value):
            # A malformed reference is a typo, not text to pass on verbatim.
            expected = "${NAME} references, NAME made of letters, digits and '_'"
            raise self.error(key, _written(name, value), expected, secret=hidden)
        for env_name in REFERENCE.findall(value):
            if env_name not in self.env:
                raise ConfigError(
                    f"{self.source}: {key} = {_shown(_written(name, value), hidden)}: "
                    f"environment variable {env_name} is not set"
                )
        # One pass: text that comes from the environment is never expanded again.
        text = REFERENCE.sub(lambda match: self.env[match[1]], value)
        if not text.strip():
            # White space alone is no value either: an app secret or admin token of spaces
            # would look set and protect nothing (or lock the operator out).
            raise self.error(key, value, "a non-empty string", secret=secret)
        return text
