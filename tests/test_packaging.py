"""The wheel a user installs holds every subpackage, and each imports from the wheel alone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _subpackages() -> list[str]:
    """Every package of the source tree, as a dotted name (``gateway``, ``gateway.edge``...)."""
    return sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gateway").rglob("__init__.py")
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, as `pip install .` would build it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("waba_gateway-*.whl")
    return built


def test_the_source_tree_has_the_documented_subpackages() -> None:
    """The parts the README names are packages (so this test checks something real)."""
    assert {
        "gateway.cli",
        "gateway.delivery",
        "gateway.edge",
        "gateway.onboarding",
        "gateway.outbox",
        "gateway.outbox.sqlite",
        "gateway.runtime",
    } <= set(_subpackages())


def test_wheel_contains_every_subpackage_and_the_type_marker(wheel: Path) -> None:
    """Each package's __init__.py, py.typed and the console's stylesheet are in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _subpackages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "gateway/py.typed" in names
    assert "gateway/admin/console/static/console.css" in names


def test_each_subpackage_imports_from_the_wheel(wheel: Path) -> None:
    """Imported with the wheel first on the path, every package comes from the wheel."""
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(wheel)!r})\n"
        f"for name in {_subpackages()!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(wheel)!r}), (name, module.__file__)\n"
        "from gateway.cli import main\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd="/", capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


def test_the_embedded_install_never_imports_the_postgres_driver() -> None:
    """The command line and the SQLite outbox run without the `postgres` extra's driver."""
    done = _run(
        "import sys, gateway.cli, gateway.runtime.gateway, gateway.outbox;"
        " print('asyncpg' in sys.modules)"
    )
    assert done.stdout.strip() == "False", done.stderr


def test_outbox_url_without_the_driver_says_which_extra_to_install() -> None:
    """outbox.url without asyncpg: an OutboxError naming the extra to install."""
    done = _run(
        "import sys, asyncio; sys.modules['asyncpg'] = None\n"
        "from gateway.config import OutboxConfig\n"
        "from gateway.outbox import open_outbox\n"
        "from gateway.errors import OutboxError\n"
        "try:\n"
        "    asyncio.run(open_outbox(OutboxConfig(url='postgresql://h/db')))\n"
        "except OutboxError as exc:\n"
        "    print(exc)\n"
    )
    assert "pip install 'waba-gateway[postgres]'" in done.stdout, done.stderr
