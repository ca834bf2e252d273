"""Loopback ports for servers a test starts in another process (a gateway, PostgreSQL, Redis,
NATS): the test names the port in the server's configuration, and the server binds it later.

Rule: a port given here is one no other process takes in between. The kernel hands out the ports
of ``net.ipv4.ip_local_port_range`` (32768-60999 by default) to every ``bind(port 0)`` and every
outgoing connection on the machine, so a port probed free there can be gone a moment later, taken
by any test or benchmark that runs at the same time. The ports here come from below that range,
where only a process that names a port takes it, and each is claimed with a lock file that this
process holds until it exits: other test runs that ask here skip it, and this process never gives
it out twice (a server stopped and started again on its port keeps it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

__all__ = ["free_port"]

# How many ports below the kernel's range the tests draw from: enough that random draws by a few
# concurrent test runs rarely meet (a lock file settles it when they do).
_SPAN = 12_000
# The lowest port drawn from, whatever the kernel's range: clear of the well-known services.
_FLOOR = 10_000
_DEFAULT_RANGE_START = 32768
_held: list[int] = []  # the lock files' descriptors: open for as long as the process lives


def _kernel_range_start() -> int:
    """The first port the kernel hands out on its own."""
    with contextlib.suppress(OSError, ValueError):
        low, _ = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    return _DEFAULT_RANGE_START


def _bindable(port: int) -> bool:
    """Nothing is bound to ``port`` on loopback now (nor connected from it)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _lock_folder() -> Path:
    """The folder of the ports' lock files, shared by every test run on the machine."""
    folder = Path(tempfile.gettempdir()) / "waba-gateway-test-ports"
    folder.mkdir(exist_ok=True)
    return folder


def _lock(folder: Path, port: int) -> int | None:
    """The descriptor of ``port``'s lock file in ``folder``, locked; ``None`` when another test
    run (or this one: a lock is per open file) holds it."""
    lock = os.open(folder / str(port), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    return lock


def free_port() -> int:
    """A loopback port below the kernel's own range, free now and claimed by this process."""
    top = max(_kernel_range_start(), _FLOOR + 1_000)
    bottom = max(_FLOOR, top - _SPAN)
    folder = _lock_folder()
    for _ in range(1_000):
        port = random.randrange(bottom, top)
        lock = _lock(folder, port)
        if lock is None:
            continue
        if not _bindable(port):  # something else on the machine named it
            os.close(lock)
            continue
        _held.append(lock)
        return port
    raise RuntimeError(f"no free loopback port between {bottom} and {top}")
