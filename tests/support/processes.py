"""`waba-gateway serve` as a child process, for the tests that need real signals and output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from config_files import listen_port
from helpers import APP_SECRET, meta_signature
from pki import Pki
from sink import DEADLINE_S

__all__ = [
    "OutputLines",
    "kill_group",
    "post_to",
    "serving",
    "serving_all",
    "stop",
    "until_listening",
]


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the gateway and every process of its session (its workers, too: a worker left
    behind would keep the output pipe open and a read of it would never end)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def serving(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The gateway serving ``config``, its standard output and error in one pipe; killed at
    the end (with its workers) if still running. When the test fails, what the gateway logged
    is shown: the test's own message rarely says why."""
    env = os.environ | {"TEST_APP_SECRET": APP_SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that kill_group reaches the workers too
    )
    try:
        yield process
    except BaseException:
        kill_group(process)
        assert process.stdout is not None
        sys.stderr.write(process.stdout.read().decode(errors="replace")[-5000:])
        raise
    finally:
        kill_group(process)
        assert process.stdout is not None
        process.stdout.close()


def stop(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM, wait for the exit, and return what the gateway wrote."""
    process.send_signal(signal.SIGTERM)
    process.wait(DEADLINE_S)
    assert process.stdout is not None
    return process.stdout.read().decode(errors="replace")


async def until_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    """Return once something accepts connections on ``port``; fail if ``process`` exits first."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert process.poll() is None, f"the gateway exited with {process.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline, "the gateway did not start listening"
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def serving_all(
    stack: contextlib.ExitStack, configs: Sequence[Path]
) -> list[subprocess.Popen[bytes]]:
    """A gateway serving each of ``configs`` (killed when ``stack`` closes), returned once
    every one of them listens."""
    gateways = [stack.enter_context(serving(config)) for config in configs]
    for config, process in zip(configs, gateways, strict=True):
        await until_listening(listen_port(config), process)
    return gateways


async def post_to(
    port: int,
    pki: Pki,
    body: bytes,
    *,
    fresh: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> int:
    """POST ``body`` to the callback on ``port``, signed like Meta, over mTLS; its status.
    ``fresh`` asks for a connection of its own; ``session`` reuses the caller's connections."""
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(body)}
    if fresh:
        headers["Connection"] = "close"
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.post(
            f"https://localhost:{port}/webhook",
            data=body,
            headers=headers,
            ssl=pki.client_context("meta"),
        ) as response:
            await response.read()
            return response.status


class OutputLines:
    """What a gateway process writes, read line by line as it comes (a thread of its own)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in iter(self._stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def holding(self, *secrets: str) -> list[str]:
        """The lines written so far that hold any of ``secrets``."""
        return [line for line in list(self.lines) if any(s in line for s in secrets)]

    def join(self) -> str:
        """All of it, once the process has exited."""
        self._thread.join(DEADLINE_S)
        return "".join(self.lines)
