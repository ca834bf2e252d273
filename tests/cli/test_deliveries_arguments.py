"""`deliveries` given arguments that are not UTF-8: one `error:` line and exit 2, before the
outbox is touched.

On Linux argv is bytes; Python decodes bytes that are not UTF-8 into lone surrogates (PEP 383),
which no outbox can store or compare. Each free-text argument of the command is run here as raw
bytes, as a shell would pass them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from config_files import write_config
from pki import Pki

from gateway.config import load_config
from gateway.delivery.outcome import AttemptResult, DeadLetter
from gateway.edge.routing import Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64


@pytest.fixture
def config(pki: Pki, tmp_path: Path) -> Path:
    return write_config(pki, tmp_path, target_url="http://127.0.0.1:9/sink")


def _seed_dead_letter(config: Path) -> str:
    """One dead letter in the configured outbox; its id."""
    path = load_config(config, {"TEST_APP_SECRET": "x"}).outbox.path

    async def seed() -> str:
        box = SqliteOutbox(path, dedup_window_s=3600)
        try:
            (delivery,) = await box.accept(b'{"n":1}', SIG, [Route("sink", None)], 1.0) or []
            await box.record(delivery.id, DeadLetter("HTTP 400"), AttemptResult(status=400), 2.0)
            return delivery.id
        finally:
            await box.close()

    return asyncio.run(seed())


def _run(config: Path, *words: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "deliveries", *words, b"--config", bytes(config)],
        capture_output=True,
        env={**os.environ, "TEST_APP_SECRET": "x"},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("words", "named"),
    [
        pytest.param((b"list", b"--target", b"\xff"), b"--target", id="list --target"),
        pytest.param((b"list", b"--target", b"caf\xc3\xa9\xff"), b"--target", id="partly UTF-8"),
        pytest.param((b"show", b"\xff"), b"ID", id="show ID"),
        pytest.param((b"replay", b"\xff"), b"ID", id="replay ID"),
        pytest.param(
            (b"replay", b"--state", b"dead", b"--target", b"\xff"),
            b"--target",
            id="replay --target",
        ),
        pytest.param(
            (b"replay", b"--state", b"dead", b"--since", b"\xff"), b"--since", id="replay --since"
        ),
        pytest.param(
            (b"purge", b"--older-than", b"\xff"), b"--older-than", id="purge --older-than"
        ),
    ],
)
def test_an_argument_that_is_not_utf8_is_one_error_line_and_changes_nothing(
    config: Path, words: tuple[bytes, ...], named: bytes
) -> None:
    """The argument is named, its bytes shown as given (escaped), in one `error:` line on
    stderr, exit 2; no traceback, no blame on the outbox, nothing printed on stdout, and the
    dead letter is still dead (nothing replayed or purged)."""
    dead_id = _seed_dead_letter(config)
    result = _run(config, *words)
    assert result.returncode == 2, result.stderr
    assert result.stdout == b""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(b"error: " + named + b": "), result.stderr
    assert b"\\xff" in lines[0]
    assert b"is not UTF-8" in lines[0]
    assert b"outbox" not in lines[0]
    listed = _run(config, b"list", b"--state", b"dead")
    assert listed.returncode == 0, listed.stderr
    assert dead_id.encode() in listed.stdout


def test_a_valid_utf8_target_still_lists_its_deliveries(config: Path) -> None:
    """The check refuses only what is not UTF-8: a target name with non-ASCII letters is
    looked up as usual (no delivery of it here: just the heading)."""
    _seed_dead_letter(config)
    result = _run(config, b"list", b"--target", "café".encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(b"ID")
    assert len(result.stdout.splitlines()) == 1
