"""The /metrics counters: group commits counted as they happen, and the workers' shared folder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import metric

from gateway.admin.stats import MULTIPROCESS_ENV, Stats


def test_committed_counts_commits_and_the_jobs_they_held() -> None:
    stats = Stats()
    stats.committed(3)
    stats.committed(5)
    text = stats.render().decode()
    assert metric(text, "waba_gateway_outbox_commits_total") == 2
    assert metric(text, "waba_gateway_outbox_jobs_total") == 8


def test_a_lone_process_counts_acceptances_and_commits_without_the_counters_until_read() -> None:
    """Per request and per group only plain numbers move (no counter's lock on the ack path);
    a scrape and the console's totals each see every count, and later ones add to them."""
    stats = Stats()
    for _ in range(3):
        stats.accepted()
    stats.committed(2)
    registry = stats.registry
    assert registry.get_sample_value("waba_gateway_notifications_accepted_total") == 0
    assert registry.get_sample_value("waba_gateway_outbox_commits_total") == 0
    assert stats.totals().accepted == 3
    stats.accepted()
    stats.committed(4)
    text = stats.render().decode()
    assert metric(text, "waba_gateway_notifications_accepted_total") == 4
    assert metric(text, "waba_gateway_outbox_commits_total") == 2
    assert metric(text, "waba_gateway_outbox_jobs_total") == 6


def test_commits_counted_on_the_writer_thread_while_flushed_on_another_are_all_kept() -> None:
    """The writer thread counts while the event loop's flushes run: none is lost or doubled."""
    stats = Stats()

    def writer() -> None:
        for _ in range(20_000):
            stats.committed(3)

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        stats.flush()
    thread.join()
    text = stats.render().decode()
    assert metric(text, "waba_gateway_outbox_commits_total") == 20_000
    assert metric(text, "waba_gateway_outbox_jobs_total") == 60_000


def test_tls_handshake_failures_are_counted_by_reason() -> None:
    stats = Stats()
    stats.tls_handshake_failed("expired")
    stats.tls_handshake_failed("expired")
    stats.tls_handshake_failed("no_certificate")
    text = stats.render().decode()
    sample = "waba_gateway_tls_handshake_failures_total"
    assert metric(text, f'{sample}{{reason="expired"}}') == 2
    assert metric(text, f'{sample}{{reason="no_certificate"}}') == 1


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


def test_a_scrape_while_a_worker_makes_its_counter_file_leaves_that_file_out(
    tmp_path: Path,
) -> None:
    """prometheus_client creates a worker's file empty and then sizes it: a scrape of worker 0
    in between sums the other workers' counts, where it used to fail on the empty file. In a
    process of its own: the folder is read by prometheus_client when it is imported."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.admin.stats import Stats\n"
        "folder = Path(sys.argv[1])\n"
        "stats = Stats(folder)\n"
        "stats.accepted()\n"
        "(folder / 'counter_4194305.db').touch()\n"
        "sys.stdout.write(stats.render().decode())\n"
    )
    env = dict(os.environ, **{MULTIPROCESS_ENV: os.fspath(tmp_path)})
    done = subprocess.run(
        [sys.executable, "-c", code, os.fspath(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert metric(done.stdout, "waba_gateway_notifications_accepted_total") == 1
