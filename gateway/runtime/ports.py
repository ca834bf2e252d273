"""The gateway's ports: bound before workers start, reported by number, refused in one line.

Rule: a port the system refuses (in use above all) becomes one :class:`~gateway.errors.GatewayError`
naming the configuration key, never a traceback; a bound port is read through aiohttp's public
:attr:`~aiohttp.web.BaseRunner.addresses`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

from aiohttp import web

from gateway.config import Config
from gateway.errors import GatewayError, PortInUse

__all__ = ["binding", "bound_port", "check_ports_free", "listen_error"]


def listen_error(config: Config, exc: OSError) -> GatewayError:
    """The one-line error for a listening socket the system refused (a port in use above all,
    where Python would print a traceback)."""
    listen = config.listen
    where = f"listen.port {listen.port} in {config.source or 'the configuration'}"
    if exc.errno == errno.EADDRINUSE:
        return GatewayError(
            f"{where} is in use by another process (another gateway?); stop it or choose"
            " another port"
        )
    return GatewayError(f"{where}: cannot listen on {listen.host}: {exc.strerror or exc}")


def bound_port(runner: web.BaseRunner) -> int:
    """The port ``runner``'s first site listens on (useful after binding port 0)."""
    addresses = runner.addresses
    assert addresses, "no site of this runner is started"
    return int(addresses[0][1])


@contextlib.contextmanager
def binding(port: int, key: str) -> Iterator[None]:
    """Turn "address already in use" while binding ``port`` into :class:`PortInUse`."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortInUse(port, key) from exc


def check_ports_free(config: Config) -> None:
    """Raise :class:`PortInUse` now if a configured port is taken, before worker processes
    start (each would otherwise fail on its own). Port 0 is always free."""
    ports = [(config.listen.host, config.listen.port, "listen.port")]
    if config.admin.enabled:
        ports.append((config.admin.host, config.admin.port, "admin.port"))
    for host, port, key in ports:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe, binding(port, key):
            # As asyncio binds a listener: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
