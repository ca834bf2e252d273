"""The README's table of the code's layout matches the folders: it is the map newcomers read."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# cli/ is described as "one module per command": its commands are not listed one by one.
_BY_RULE = {"gateway/__main__.py"}


def _layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## How the code is laid out")
    return text[start : text.index("\n## ", start + 1)]


def _named() -> set[str]:
    """Every ``name.py`` the section names, with the folder of the row that names it."""
    named: set[str] = set()
    folder = ""
    for line in _layout_section().splitlines():
        if not line.startswith("| "):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("`") and cells[0].endswith("/`"):
            folder = cells[0].strip("`")
        elif cells[0]:
            folder = ""
        for name in re.findall(r"`([a-z_0-9]+\.py)`", cells[1] if len(cells) > 1 else ""):
            named.add(f"gateway/{folder}{name}")
    # The paragraphs below the table name the top-level modules.
    named |= {
        f"gateway/{name}"
        for name in re.findall(r"`([a-z_0-9]+\.py)`", _layout_section())
        if (ROOT / "gateway" / name).exists()
    }
    return named


def _modules() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "gateway").rglob("*.py")
        if path.name != "__init__.py"
        and not path.relative_to(ROOT).as_posix().startswith("gateway/cli/")
    } - _BY_RULE


def test_every_module_is_in_the_readme_layout_table() -> None:
    """Each module outside cli/ is named in the table (or, for top-level ones, beside it)."""
    assert sorted(_modules() - _named()) == []


def test_the_layout_table_names_no_module_that_does_not_exist() -> None:
    """A module named in the table is a file in the folder its row names."""
    assert sorted(name for name in _named() if not (ROOT / name).exists()) == []


def _rows() -> set[str]:
    """The folders the table has a row of their own for (``admin/console/``)."""
    return {
        cells[0].strip("`")
        for line in _layout_section().splitlines()
        if line.startswith("| ")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
        if cells[0].startswith("`") and cells[0].endswith("/`")
    }


def test_every_package_has_its_own_row_in_the_readme_layout_table() -> None:
    """Each folder of the package (one with an ``__init__.py``) is a row of the table, so a
    package split off another one is described where newcomers look."""
    gateway = ROOT / "gateway"
    packages = {
        f"{init.parent.relative_to(gateway).as_posix()}/"
        for init in gateway.rglob("__init__.py")
        if init.parent != gateway
    }
    assert sorted(packages - _rows()) == []
