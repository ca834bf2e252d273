"""`check` leaves beside the outbox file only what it found there (gateway.cli.check)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from config_files import write_config
from pki import Pki

from gateway.cli import main
from gateway.config import load_config
from gateway.edge.routing import Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64


@pytest.fixture
def config(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_APP_SECRET", "cli-test-secret")
    return write_config(pki, tmp_path, target_url="http://127.0.0.1:9/sink")


def test_check_leaves_no_wal_or_shm_beside_an_outbox_no_gateway_has_open(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stopped gateway's outbox is the file alone; after `check` it still is (a -wal or -shm
    made by whoever ran `check` would be theirs, and could keep the gateway from opening it)."""
    path = load_config(config, {"TEST_APP_SECRET": "x"}).outbox.path

    async def seed() -> None:
        box = SqliteOutbox(path, dedup_window_s=3600)
        try:
            await box.accept(b'{"n":1}', SIG, [Route("sink", None)], 1.0)
        finally:
            await box.close()

    asyncio.run(seed())
    beside = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))
    assert main(["check", "--config", str(config)]) == 0
    assert "layout 8, intact (quick_check), 1 pending, 0 dead" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == beside
