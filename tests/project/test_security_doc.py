"""SECURITY.md's table of attacks names tests that exist, so the table cannot silently rot."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECURITY = (ROOT / "SECURITY.md").read_text()
# `tests/x.py`, `tests/x.py::test_name`, `x.py::test_name` (a file under tests/) or `::test_name`
# (in the file last named on the same line).
_REFERENCE = re.compile(
    r"`(?:((?:tests|bench|fuzz)/[\w/.]+|\w+\.py))?::(\w+)`|`((?:tests|bench|fuzz)/[\w/.]+)`"
)


def _file(name: str) -> Path:
    if "/" in name:
        return ROOT / name
    found = sorted((ROOT / "tests").rglob(name))
    assert found, f"SECURITY.md names {name}, which is nowhere under tests/"
    return found[0]


def test_every_test_the_security_table_names_exists() -> None:
    """Each file named in SECURITY.md exists, and each test named with it is defined there
    (a `::name` that follows on its own line belongs to the file named before it)."""
    checked = 0
    for line in SECURITY.splitlines():
        last: Path | None = None
        for match in re.finditer(
            r"`(?:((?:tests|bench|fuzz)/[\w/.]+|\w+\.py))?::(\w+)`|`((?:tests|bench|fuzz)/[\w/.]+)`",
            line,
        ):
            path_text = match.group(1) or match.group(3)
            if path_text is not None:
                last = _file(path_text)
                assert last.exists(), f"SECURITY.md names {path_text}, which does not exist"
            name = match.group(2)
            if name is not None:
                assert last is not None, f"::{name} follows no file in: {line}"
                assert re.search(rf"def {name}\(", last.read_text()), f"{name} not in {last}"
                checked += 1
    assert checked >= 15
