"""`waba-gateway serve` refusing to start: one line and exit status 2, with one worker or several.

With several workers some of these are found by the supervisor and some only by a worker (the
outbox database is opened in each worker); either way the operator reads the same line a lone
gateway gives, and no worker's traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from config_files import free_port, write_config
from helpers import APP_SECRET
from pki import Pki
from sink import DEADLINE_S


@contextmanager
def _unwritable(path: Path) -> Iterator[None]:
    """No write reaches ``path`` (a file or a folder) until the end: immutable for root, whom
    permissions do not stop; read-only for anyone else."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield
        finally:
            path.chmod(mode)


def _missing_certificate(folder: Path, stack: ExitStack) -> dict[str, str]:
    return {"cert_file": str(folder / "missing.pem")}


def _unreachable_database(folder: Path, stack: ExitStack) -> dict[str, str]:
    # A port nothing listens on: the connection is refused at once.
    return {"outbox": f'url = "postgresql://gateway@127.0.0.1:{free_port()}/outbox"'}


def _busy_port(folder: Path, stack: ExitStack) -> dict[str, str]:
    holder = stack.enter_context(socket.socket())
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return {"port": str(holder.getsockname()[1])}


def _unwritable_outbox_folder(folder: Path, stack: ExitStack) -> dict[str, str]:
    outbox = folder / "outbox"
    outbox.mkdir()
    stack.enter_context(_unwritable(outbox))
    return {"outbox": f'path = "{outbox / "outbox.sqlite3"}"'}


def _unwritable_outbox_file(folder: Path, stack: ExitStack) -> dict[str, str]:
    # The folder is writable (the supervisor claims the outbox there), the database is not:
    # only a worker opening it finds out.
    outbox = folder / "outbox.sqlite3"
    outbox.write_bytes(b"")
    stack.enter_context(_unwritable(outbox))
    return {}


Failure = Callable[[Path, ExitStack], dict[str, str]]
FAILURES: dict[str, tuple[Failure, str]] = {
    "missing-certificate": (_missing_certificate, "tls.cert_file = "),
    "unreachable-database": (_unreachable_database, "outbox.url = "),
    "busy-port": (_busy_port, "is in use by another process"),
    "unwritable-outbox-folder": (_unwritable_outbox_folder, "outbox.path = "),
    "unwritable-outbox-file": (_unwritable_outbox_file, "attempt to write a readonly database"),
}


def _refusal(pki: Pki, folder: Path, failure: Failure, workers: int) -> tuple[int, str]:
    """The exit status and everything ``serve`` wrote, with ``folder`` shown as ``<folder>``
    and port numbers as ``<port>``."""
    folder.mkdir()
    with ExitStack() as stack:
        changes = failure(folder, stack)
        config = write_config(
            pki,
            folder,
            target_url="http://127.0.0.1:9/x",
            workers=workers,
            outbox=changes.get("outbox", 'path = "outbox.sqlite3"'),
        )
        text = config.read_text()
        if "cert_file" in changes:
            text = text.replace(str(pki.server_chain_file), changes["cert_file"])
        if "port" in changes:
            port = tomllib.loads(text)["listen"]["port"]
            text = text.replace(f"port = {port}\n", f"port = {changes['port']}\n", 1)
        config.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            env=os.environ | {"TEST_APP_SECRET": APP_SECRET},
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            check=False,
        )
    output = (result.stdout + result.stderr).replace(str(folder), "<folder>")
    return result.returncode, re.sub(r"\b\d{4,5}\b", "<port>", output)  # each run has its own


@pytest.mark.parametrize("name", list(FAILURES))
def test_start_up_failure_is_the_same_one_line_error_with_one_worker_or_several(
    pki: Pki, tmp_path: Path, name: str
) -> None:
    """Missing certificate, unreachable database, busy port, unwritable outbox: with one
    worker and with two, exit status 2 and the same single `error:` line, no traceback."""
    failure, expected = FAILURES[name]
    lone = _refusal(pki, tmp_path / "lone", failure, workers=1)
    several = _refusal(pki, tmp_path / "several", failure, workers=2)
    for status, output in (lone, several):
        assert status == 2, output
        assert "Traceback" not in output
        # Housekeeping lines may come first (a supervisor removes what gateways killed before
        # it left behind); the refusal is the one error line.
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, output
        assert expected in errors[0], output
    assert _error(several[1]) == _error(lone[1])


def _error(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("error: "))
