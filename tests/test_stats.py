"""The /metrics counters: group commits counted as they happen, and the workers' shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import metric

from gateway.runtime.stats import MULTIPROCESS_ENV, Stats


def test_committed_counts_commits_and_the_jobs_they_held() -> None:
    stats = Stats()
    stats.committed(3)
    stats.committed(5)
    text = stats.render().decode()
    assert metric(text, "waba_gateway_outbox_commits_total") == 2
    assert metric(text, "waba_gateway_outbox_jobs_total") == 8


def test_a_shared_folder_the_environment_does_not_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counters would stay in the process and /metrics would sum nothing: fail at start-up."""
    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    with pytest.raises(RuntimeError, match=MULTIPROCESS_ENV):
        Stats(tmp_path)
    monkeypatch.setenv(MULTIPROCESS_ENV, os.fspath(tmp_path / "elsewhere"))
    with pytest.raises(RuntimeError, match=MULTIPROCESS_ENV):
        Stats(tmp_path)
