"""Property-based tests of the pure decisions: the signature check and the config loader.

Hypothesis draws the inputs; each property holds for every one of them, not for a few chosen
by hand. The HTTP listener and the router have their own property tests beside their modules'.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.errors import ConfigError, SignatureRejected
from gateway.signing import sign, verify_signature

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml"
ENV = {
    "WABA_VERIFY_TOKEN": "verify",
    "WABA_APP_SECRET": "secret",
    "ANALYTICS_WEBHOOK_SECRET": "analytics",
    "WABA_ADMIN_TOKEN": "admin-token",
}

secrets_ = st.text(min_size=1, max_size=64)
bodies = st.binary(max_size=4096)


@given(secret=secrets_, body=bodies)
def test_a_signature_made_by_meta_is_accepted(secret: str, body: bytes) -> None:
    """Whatever the secret and the bytes, Meta's own signature of them verifies."""
    verify_signature([secret], body, sign(secret, body))
    verify_signature(
        ["another", secret], body, sign(secret, body).upper().replace("SHA256=", "sha256=")
    )


@given(secret=secrets_, body=bodies, flip=st.integers(min_value=0))
def test_changing_any_byte_of_the_body_is_refused(secret: str, body: bytes, flip: int) -> None:
    """One changed bit anywhere in the body makes the signature fail."""
    assume(body)
    at = flip % len(body)
    changed = body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :]
    with pytest.raises(SignatureRejected):
        verify_signature([secret], changed, sign(secret, body))


@given(secret=secrets_, other=secrets_, body=bodies)
def test_a_signature_under_another_secret_is_refused(secret: str, other: str, body: bytes) -> None:
    """A signature made with any other secret never verifies."""
    assume(
        hmac.new(secret.encode(), b"", hashlib.sha256).digest()
        != hmac.new(other.encode(), b"", hashlib.sha256).digest()
    )
    with pytest.raises(SignatureRejected):
        verify_signature([secret], body, sign(other, body))


@given(header=st.text(max_size=100), body=bodies)
def test_any_header_is_either_the_signature_or_refused(header: str, body: bytes) -> None:
    """An arbitrary header value is refused with SignatureRejected, never another error,
    unless it happens to be the right signature."""
    try:
        verify_signature(["secret"], body, header)
    except SignatureRejected:
        return
    assert header.strip().lower() == sign("secret", body)


# -- the config loader: any edit of a valid file is a Config or a ConfigError naming the file ---

_VALUE = re.compile(r"^(\s*[\w.]+\s*=\s*)(.*?)(\s*#.*)?$")
toml_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["true", "false", "[]", '["x"]', "[1, 2]", "{}", '""', "nan", "-0"]),
    st.text(max_size=12),  # not TOML at all
)


def _keys(lines: list[str]) -> dict[int, tuple[str, ...]]:
    """Line number -> the key path of the assignment on it: ("listen", "port") or
    ("targets", "1", "attempts")."""
    keys: dict[int, tuple[str, ...]] = {}
    table: tuple[str, ...] = ()
    seen: dict[str, int] = {}
    for at, line in enumerate(lines):
        if header := re.match(r"^\[\[(\w+)\]\]", line):
            name = header.group(1)
            seen[name] = seen.get(name, -1) + 1
            table = (name, str(seen[name]))
        elif header := re.match(r"^\[(\w+)\]", line):
            table = (header.group(1),)
        elif assignment := _VALUE.match(line):
            keys[at] = (*table, assignment.group(1).split("=")[0].strip())
    return keys


def _lookup(found: object, key: tuple[str, ...]) -> object:
    """``key`` in a TOML document (dicts and lists) or a Config (attributes and tuples);
    None where the path leads nowhere (an edit that changed the file's shape)."""
    for part in key:
        if isinstance(found, dict):
            found = found.get(part)
        elif isinstance(found, list | tuple):
            found = found[int(part)] if int(part) < len(found) else None
        else:
            found = getattr(found, part, None)
    return found


_KEYS = _keys(EXAMPLE.read_text().splitlines())
# The key paths in the order of the example's assignments (an edit's index picks one).
_ASSIGNED = [_KEYS[at] for at in sorted(_KEYS)]


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(edits=[(_ASSIGNED.index(("listen", "port")), "9443")], drop=[])
@example(edits=[(_ASSIGNED.index(("targets", "1", "attempts")), "3")], drop=[])
@example(edits=[(_ASSIGNED.index(("tls", "watch_files")), "true")], drop=[])
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0), toml_values), min_size=1, max_size=4),
    drop=st.lists(st.integers(min_value=0), max_size=3),
)
def test_any_edit_of_a_valid_config_loads_or_names_the_file(
    tmp_path: Path, edits: list[tuple[int, str]], drop: list[int]
) -> None:
    """Replacing values and dropping lines of the example config gives either a Config or a
    ConfigError whose message names the file: never another exception, and never a silent
    default for a value the file got wrong (a number or boolean written, and loaded, is the
    value the Config holds)."""
    original = EXAMPLE.read_text().splitlines()
    lines = list(original)
    assignments = [i for i, line in enumerate(lines) if _VALUE.match(line)]
    for index, value in edits:
        at = assignments[index % len(assignments)]
        # The key as the example writes it: an earlier edit of the same line may have written
        # a value (a string with a line break) after which the line no longer parses as one.
        match = _VALUE.match(original[at])
        assert match is not None
        lines[at] = match.group(1) + value
    for index in drop:
        lines[assignments[index % len(assignments)]] = ""
    path = tmp_path / "edited.toml"
    path.write_text("\n".join(lines) + "\n")
    dropped = {assignments[index % len(assignments)] for index in drop}
    edited = {assignments[index % len(assignments)] for index, _ in edits} - dropped
    refused: ConfigError | None = None
    try:
        config = load_config(path, ENV)
    except ConfigError as exc:
        refused = exc
    if refused is not None:
        assert str(path) in str(refused)
        return
    # Loaded: each number or boolean an edit wrote is the value the configuration holds.
    document = tomllib.loads(path.read_text())
    for at in sorted(edited):
        key = _KEYS[at]
        written = _lookup(document, key)
        if isinstance(written, bool | int | float):
            held = _lookup(config, key)
            assert type(held) is bool if isinstance(written, bool) else not isinstance(held, bool)
            assert held == written or (held != held and written != written), (key, held)
