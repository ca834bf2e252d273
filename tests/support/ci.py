"""Under CI every test runs or fails: a skip there is a guarantee nobody checked.

Rule: ``CI`` set in the environment (``.ci/run`` sets it) turns every skip into a failure that
keeps the skip's reason; outside CI a test whose tool is missing still skips, saying why. Tests
that need a tool call :func:`unavailable` rather than :func:`pytest.skip`, so the intent reads
where the tool is looked for; the hook below catches every other skip (``skipif`` markers too).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import NoReturn

import pytest

__all__ = [
    "pytest_make_collect_report",
    "pytest_runtest_makereport",
    "unavailable",
    "under_ci",
]


def under_ci() -> bool:
    """True when ``CI`` is set to anything but the empty string (as CI services set it)."""
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere: ``reason`` says what is missing and how to get it."""
    if under_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, a skipped test is reported failed, with where and why it was skipped."""
    report = yield
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} skipped under CI, where every test must run: " + (
            _skip_reason(report)
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Under CI, a module skipped as a whole (``pytest.importorskip``, a module-level skip)
    is reported failed too."""
    report = yield
    if under_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI, where every test must run: " + (
            _skip_reason(report)
        )
    return report
