"""`waba-gateway serve` as a child process, for the tests that need real signals and output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import APP_SECRET
from sink import DEADLINE_S

__all__ = ["serving", "stop"]


@contextmanager
def serving(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The gateway serving ``config``, its standard output and error in one pipe; killed at
    the end if still running."""
    env = os.environ | {"TEST_APP_SECRET": APP_SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def stop(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM, wait for the exit, and return what the gateway wrote."""
    process.send_signal(signal.SIGTERM)
    process.wait(DEADLINE_S)
    assert process.stdout is not None
    return process.stdout.read().decode(errors="replace")
