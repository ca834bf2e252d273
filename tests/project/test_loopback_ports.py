"""The ports given to servers the tests start in other processes (support/loopback_ports.py):
never from the kernel's own range, never twice, never one another test process holds."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import loopback_ports
import pytest
from loopback_ports import free_port
from sink import DEADLINE_S

SUPPORT = Path(__file__).resolve().parents[1] / "support"

# Another test process: the same four ports to choose from, below ``top``.
_CHILD = """
import sys
import loopback_ports
loopback_ports._SPAN = 4
loopback_ports._kernel_range_start = lambda: int(sys.argv[1])
print(loopback_ports.free_port())
"""


def test_ports_come_from_below_the_kernels_range_and_never_twice() -> None:
    """Every port is below net.ipv4.ip_local_port_range (the kernel hands those to any
    connect()), free to bind, and given once."""
    start = loopback_ports._kernel_range_start()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all(loopback_ports._FLOOR <= port < start for port in ports)
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def _unclaimed(port: int) -> bool:
    """No test process holds ``port``'s lock in the shared folder (this one included: a lock
    is per open file, so one this process took earlier refuses this open too)."""
    lock = loopback_ports._lock(loopback_ports._lock_folder(), port)
    if lock is None:
        return False
    os.close(lock)  # closing releases the lock taken
    return True


def _four_free_ports_below() -> int:
    """The top of a window of four loopback ports that nothing holds now: a window with a port
    a test run gave a server (its lock is held until that run ends, the server may be between a
    stop and a start) or one in TIME_WAIT would leave the other process nothing to find,
    whatever the code under test did."""
    while True:
        top = random.randrange(loopback_ports._FLOOR + 1_000, loopback_ports._DEFAULT_RANGE_START)
        window = range(top - 4, top)
        if all(_unclaimed(port) and loopback_ports._bindable(port) for port in window):
            return top


def test_another_test_process_skips_the_ports_this_one_holds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Of four ports, this process holds three: another process, asking at the same time,
    gets the fourth, whatever its random draws."""
    top = _four_free_ports_below()  # read in the shared folder: before the change below
    # Both processes keep their locks in a folder of this test's own, so the ports the rest of
    # this run holds in the shared folder cannot fill the window.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(loopback_ports, "_SPAN", 4)
    monkeypatch.setattr(loopback_ports, "_kernel_range_start", lambda: top)
    held = {free_port() for _ in range(3)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(top)],
        capture_output=True,
        text=True,
        check=True,
        cwd=SUPPORT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        timeout=DEADLINE_S,
    )
    assert {*held, int(child.stdout)} == set(range(top - 4, top))
