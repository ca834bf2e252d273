"""The benchmark's profile buckets name code that exists, so its breakdown stays true."""

from __future__ import annotations

import importlib.util
import re
import ssl
import threading
from pathlib import Path
from types import ModuleType

import aiohttp
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
    """Every key names something that exists: a function of ours (in the file named with it),
    a file or folder of ours, a thread we name, or the library code it stands for. A renamed
    function would silently move its samples to "other"; a key of a kind not listed here fails,
    so that none goes unchecked."""
    function = re.fullmatch(r"(\w+) \((gateway/[\w/]+\.py)", key)
    ours = re.fullmatch(r"(\w+) \(", key)
    if function is not None:
        name, path = function.groups()
        assert re.search(rf"\bdef {name}\(", (ROOT / path).read_text()), (part, key)
    elif ours is not None:
        assert re.search(rf"\bdef {ours.group(1)}\(", SOURCE), (part, key)
    elif key.startswith("gateway/"):
        assert (ROOT / key).exists(), (part, key)
    elif key == "outbox-writer":  # the SQLite writer thread's name
        assert f'name="{key}"' in SOURCE, (part, key)
    elif key == "aiohttp/web_":  # aiohttp's server modules
        assert list(Path(aiohttp.__file__).parent.glob("web_*.py")), (part, key)
    elif key == "SSLObject.do_handshake":
        assert callable(getattr(ssl.SSLObject, "do_handshake", None)), (part, key)
    elif key == "MainThread;":  # py-spy's name for the event loop's thread
        assert threading.main_thread().name == "MainThread", (part, key)
    else:
        pytest.fail(f"{key!r} ({part}): a kind of key this test does not check")


def test_dispatch_stacks_are_selected_by_an_existing_folder() -> None:
    """The dispatcher's own profile selects stacks by a folder of the package that exists."""
    for key in BENCH.DISPATCH:
        assert (ROOT / key).is_dir(), key
