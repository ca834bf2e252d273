"""Under CI a skip fails the run; elsewhere it stays a skip with its reason (support/ci.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sink import DEADLINE_S

# Where ci.py is: the subprocess imports it by name, as conftest.py does.
SUPPORT = Path(__file__).resolve().parents[1] / "support"

SKIPPING = """
import pytest
from ci import unavailable

def test_tool() -> None:
    unavailable("no frobnicator: apt-get install frobnicator")

@pytest.mark.skipif(True, reason="marked away")
def test_marked() -> None:
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure() -> None:
    raise AssertionError

def test_runs() -> None:
    pass
"""

MODULE_SKIP = """
import pytest
pytest.importorskip("no_such_module_anywhere")

def test_never() -> None:
    pass
"""


def _pytest(folder: Path, source: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (folder / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(SUPPORT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci", "-q", "-rA", "-p", "no:cacheprovider",
         "--rootdir", str(folder), str(folder / "test_sample.py")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=DEADLINE_S * 4, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("ci", [None, ""])
def test_outside_ci_a_missing_tool_skips_with_its_reason(tmp_path: Path, ci: str | None) -> None:
    """Without CI (unset or empty) the skips stay skips and say why; the run passes."""
    result = _pytest(tmp_path, SKIPPING, ci)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout
    assert "no frobnicator: apt-get install frobnicator" in result.stdout
    assert "marked away" in result.stdout


def test_under_ci_every_skip_fails_and_says_why(tmp_path: Path) -> None:
    """With CI set, unavailable() and a skipif marker each fail the run, naming the reason;
    an expected failure stays expected."""
    result = _pytest(tmp_path, SKIPPING, "true")
    assert result.returncode == 1, result.stdout
    # The marker skips in setup, so pytest counts that failure as an error.
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in result.stdout
    assert "required under CI: no frobnicator: apt-get install frobnicator" in result.stdout
    assert "test_marked skipped under CI, where every test must run: " in result.stdout
    assert "marked away" in result.stdout


def test_under_ci_a_module_skipped_as_a_whole_fails(tmp_path: Path) -> None:
    """With CI set, a module-level skip (importorskip) is an error, not a quiet skip."""
    result = _pytest(tmp_path, MODULE_SKIP, "1")
    assert result.returncode not in (0, pytest.ExitCode.NO_TESTS_COLLECTED), result.stdout
    assert "skipped under CI, where every test must run" in result.stdout
    assert "no_such_module_anywhere" in result.stdout
    outside = _pytest(tmp_path, MODULE_SKIP, None)
    # Nothing else in the module: pytest's "no tests ran", not a failure.
    assert outside.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, outside.stdout
    assert "1 skipped" in outside.stdout
