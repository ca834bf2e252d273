"""``waba-gateway backup DEST``: a consistent copy of the SQLite outbox while the gateway serves
(gateway.outbox.sqlite.backup, gateway.cli.backup).

The gateway runs in-process on a real file and keeps taking notifications while the command
copies it; the copy is then read from a connection of its own, and served by a second gateway,
as a restore would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest
from config_files import write_config
from helpers import APP_SECRET, deliveries, message_body, post
from pki import Pki
from sink import Sink

from gateway.cli import main
from gateway.config import load_config
from gateway.outbox.sqlite.backup import ID_GAP
from gateway.runtime.gateway import Gateway


@pytest.fixture
def config_file(pki: Pki, tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_APP_SECRET", APP_SECRET)
    return write_config(pki, tmp_path, target_url=sink.url("/sink"))


def _bodies(path: Path) -> set[bytes]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        return {row[0] for row in conn.execute("SELECT body FROM notifications")}


async def test_backup_while_serving_holds_everything_acknowledged_before_it(
    config_file: Path, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Notifications keep arriving during the backup; the copy holds every one acknowledged
    before it began, passes SQLite's check, and a gateway serves from it as from the original."""
    config = load_config(config_file)
    destination = tmp_path / "backups" / "outbox.sqlite3"
    destination.parent.mkdir()
    async with Gateway(config) as gateway:
        before = [message_body(f"before {n}") for n in range(20)]
        for body in before:
            assert (await post(gateway, pki, body)).status == 200
        during: list[bytes] = []
        stop = asyncio.Event()

        async def keep_posting() -> None:
            while not stop.is_set():
                body = message_body(f"during {len(during)}")
                assert (await post(gateway, pki, body)).status == 200
                during.append(body)

        writer = asyncio.create_task(keep_posting())
        await asyncio.sleep(0.1)  # let some arrive while the copy is taken
        argv = ["backup", "--config", str(config_file), str(destination)]
        code = await asyncio.to_thread(main, argv)
        stop.set()
        await writer
    assert code == 0
    assert during  # the gateway was taking notifications while the copy was made
    copied = _bodies(destination)
    assert set(before) <= copied
    assert copied <= set(before) | set(during)
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        f"backed up {config.outbox.path} to {destination}: {len(copied)} notifications,"
        f" {len(copied)} deliveries, layout 8, check ok"
    )
    assert not list(destination.parent.glob(".*partial"))  # nothing left half written
    assert destination.stat().st_mode & 0o777 == 0o600  # message bodies: the owner's alone
    restored = dataclasses.replace(config.outbox, path=destination)
    async with Gateway(dataclasses.replace(config, outbox=restored)) as gateway:
        kept = await deliveries(gateway)
        assert len(kept) == len(copied)
        # A restored outbox never hands out an id the original issued after the backup.
        assert (await post(gateway, pki, message_body("after the restore"))).status == 200
        issued = max(int(d.id.rsplit("-", 1)[1]) for d in kept)
        known = {d.id for d in kept}
        (newest,) = [d for d in await deliveries(gateway) if d.id not in known]
        assert int(newest.id.rsplit("-", 1)[1]) > issued + ID_GAP


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param(
            "destination-exists", "{dest} exists; a backup goes to a new file", id="exists"
        ),
        pytest.param(
            "no-outbox", "outbox.path = '{outbox}': no outbox file there", id="no-outbox-yet"
        ),
        pytest.param(
            "partial-left",
            "'{partial}' exists: another backup to {dest} is being written, or one that was"
            " interrupted left it; remove it if none is running",
            id="interrupted-backup-left-its-partial-file",
        ),
        pytest.param(
            "postgres",
            "outbox.url: a PostgreSQL outbox is backed up with the database's own tools"
            " (pg_dump --schema=waba_gateway), not by the gateway",
            id="postgres-outbox",
        ),
    ],
)
def test_backup_that_cannot_be_made_is_one_error_line(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    expected: str,
) -> None:
    """An existing destination (left untouched), no outbox file, the file of a backup under
    way or interrupted, or a PostgreSQL outbox: one ``error:`` line and exit 2."""
    destination = tmp_path / "backup.sqlite3"
    outbox = tmp_path / "outbox.sqlite3"
    partial = tmp_path / ".backup.sqlite3.partial"
    if case == "destination-exists":
        outbox.write_bytes(b"")
        destination.write_bytes(b"an older backup")
    if case == "partial-left":
        outbox.write_bytes(b"")
        partial.write_bytes(b"")
    if case == "postgres":
        text = config_file.read_text().replace(
            'path = "outbox.sqlite3"', 'url = "postgresql://waba@127.0.0.1:1/waba"'
        )
        config_file.write_text(text)
    code = main(["backup", "--config", str(config_file), str(destination)])
    assert code == 2
    message = expected.format(dest=destination, outbox=outbox, partial=partial)
    assert capsys.readouterr().err == f"error: {message}\n"
    if case == "destination-exists":
        assert destination.read_bytes() == b"an older backup"
