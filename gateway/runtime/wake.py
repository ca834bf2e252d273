"""Worker 0 hears at once of notifications the other workers stored.

Rule: with ``workers > 1`` only worker 0 dispatches. The other workers commit to the same outbox,
then send worker 0 a one-byte datagram on a Unix socket in Linux's abstract namespace (no file to
clean up; the name carries the supervisor's pid, so two gateways on one host never mix). Worker 0
then claims at once instead of at its next poll. The datagram is only a hint: lost, refused or
never sent, the poll (``dispatcher.poll_interval_s``) still finds the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

__all__ = ["Bell", "Doorbell", "channel_name"]

_DRAIN = 4096


def channel_name(supervisor_pid: int) -> str:
    return f"\0waba-gateway-{supervisor_pid}-stored"


class Doorbell:
    """Worker 0's side: calls ``wake`` whenever datagrams arrive (at most once per read)."""

    def __init__(self, name: str, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(name)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._socket.fileno(), self._ring)

    def _ring(self) -> None:
        # Many workers may ring at once: read all that is queued, wake once.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._socket.recv(_DRAIN):
                pass
        self._wake()

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()


class Bell:
    """Another worker's side: :meth:`ring` after a commit; rings once per event-loop turn."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._pending = False

    def ring(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = False
        # Worker 0 not listening yet, or its queue full: the poll covers it.
        with contextlib.suppress(OSError):
            self._socket.sendto(b"!", self._name)

    def close(self) -> None:
        self._socket.close()
