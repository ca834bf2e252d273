"""A sink script (the shared harness's ``sink.py``, or ``idsink.py``) run as a process of the
benchmark's own, on a loopback port, for as long as a ``with`` block lasts."""

# ruff: noqa: S603
# S603: the sink runs with an argument list built here (never a shell string).

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["running_sink"]


@contextmanager
def running_sink(script: str, cpus: str | None = None) -> Iterator[int]:
    """``script --port PORT`` (under ``taskset -c cpus`` when given), listening within 10 s:
    the port; stopped when the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    argv = [sys.executable, script, "--port", str(port)]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    sink = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        sink.terminate()
        sink.wait()
