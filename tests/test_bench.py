"""The benchmark's profile buckets name code that exists, so its breakdown stays true."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "bench" / "bench.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()
SOURCE = "\n".join(path.read_text() for path in (ROOT / "gateway").rglob("*.py"))


@pytest.mark.parametrize(("part", "key"), [pytest.param(*rule, id=rule[1]) for rule in BENCH.PARTS])
def test_profile_bucket_key_names_existing_code(part: str, key: str) -> None:
    """A key naming a function of ours names one that is defined; a path names a file or folder
    that exists (a renamed function would silently move its samples to "other")."""
    function = re.match(r"(\w+) \((gateway/[\w/]+\.py)", key)
    if function is not None:
        name, path = function.groups()
        assert re.search(rf"\bdef {name}\(", (ROOT / path).read_text()), (part, key)
    elif key.startswith("gateway/"):
        assert (ROOT / key).exists(), (part, key)
    else:
        # Keys on library code or thread names: a function of ours is named with its path.
        name = key.removesuffix(" (")
        if re.fullmatch(r"\w+", name):
            assert re.search(rf"\bdef {name}\(", SOURCE), (part, key)


def test_dispatch_stacks_are_selected_by_an_existing_folder() -> None:
    """The dispatcher's own profile selects stacks by a folder of the package that exists."""
    for key in BENCH.DISPATCH:
        assert (ROOT / key).is_dir(), key
