"""Throw-away Redis and NATS servers for the tests and the benchmarks: real servers, on loopback.

Rule: each is Debian's own binary (``redis-server``, ``nats-server -js``), started as a child
process on a free port in a temporary folder, stopped with the test. :meth:`down` and :meth:`up`
stop it and start it again on the same port (both keep their data in their folder), so a
broker that goes away and comes back looks exactly like that to the gateway. Given a
:class:`ServerTls`, each speaks TLS only (``rediss://``, ``tls://``), with a certificate from a
test's own CA, and with a client CA asks every client for a certificate it signed. ``.ci/run``
installs both packages where missing; without them the tests fail saying so, never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loopback_ports import free_port

from gateway.outbox import Delivery

__all__ = ["BrokerServer", "ServerTls", "nats_server", "pending_delivery", "redis_server"]

_START_S = 10.0


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise RuntimeError(
            f"no {name}: install Debian's {package} package"
            f" (.ci/run does: apt-get install -y {package})"
        )
    return found


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A broker's TLS: its certificate chain (leaf first) and key, and the CA a client's
    certificate must come from (None: it asks clients for none)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class BrokerServer:
    """A broker child process on 127.0.0.1:``port``."""

    def __init__(self, command: list[str], port: int, scheme: str) -> None:
        self.command = command
        self.port = port
        self.scheme = scheme
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Stopped (SIGSTOP) inside the block, every thread of it: connections stay open and
        nothing is answered; running again (SIGCONT) after it."""
        assert self._process is not None, "the broker is down"
        pid = self._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            # The signal stops each thread as it next runs: wait until all of them have.
            deadline = time.monotonic() + _START_S
            while not all(_stopped(task) for task in Path(f"/proc/{pid}/task").iterdir()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.command[0]} did not stop")
                time.sleep(0.005)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def up(self) -> None:
        """Start it and wait until it accepts connections."""
        assert self._process is None, "the broker is already up"
        self._process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_S
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(self.command)} did not start")
            time.sleep(0.02)

    def down(self) -> None:
        """Stop it: connections are refused until :meth:`up`."""
        if self._process is None:
            return
        process, self._process = self._process, None
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stopped(task: Path) -> bool:
    """A thread (``/proc/PID/task/TID``) is stopped, or gone."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


@contextlib.contextmanager
def redis_server(*options: str, tls: ServerTls | None = None) -> Iterator[BrokerServer]:
    """A Redis server keeping its data across a restart (append-only file, as a Redis that
    holds deliveries should); ``options`` as redis-server takes them. With ``tls``, its one
    port speaks TLS only: no plain port beside it that a client could fall back to."""
    binary = _binary("redis-server", "redis-server")
    with tempfile.TemporaryDirectory(prefix="waba-redis-") as folder:
        port = free_port()
        if tls is None:
            command, scheme = [binary, "--port", str(port)], "redis"
        else:
            command, scheme = [binary, "--port", "0", "--tls-port", str(port)], "rediss"
            command += ["--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file)]
            if tls.client_ca_file is None:
                command += ["--tls-auth-clients", "no"]
            else:
                command += ["--tls-ca-cert-file", str(tls.client_ca_file)]
                command += ["--tls-auth-clients", "yes"]
        command += ["--bind", "127.0.0.1", "--dir", folder]
        command += ["--save", "", "--appendonly", "yes", "--protected-mode", "no", *options]
        server = BrokerServer(command, port, scheme)
        server.up()
        try:
            yield server
        finally:
            server.down()


@contextlib.contextmanager
def nats_server(*options: str, tls: ServerTls | None = None) -> Iterator[BrokerServer]:
    """A NATS server with JetStream, its streams kept in a temporary folder across restarts;
    ``options`` as nats-server takes them. With ``tls``, it requires TLS of every client (its
    INFO says ``tls_required``)."""
    binary = _binary("nats-server", "nats-server")
    with tempfile.TemporaryDirectory(prefix="waba-nats-") as folder:
        port = free_port()
        store = Path(folder) / "jetstream"
        command = [binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)]
        scheme = "nats"
        if tls is not None:
            command += ["--tls", "--tlscert", str(tls.cert_file), "--tlskey", str(tls.key_file)]
            if tls.client_ca_file is not None:
                command += ["--tlsverify", "--tlscacert", str(tls.client_ca_file)]
            scheme = "tls"
        command += options
        server = BrokerServer(command, port, scheme)
        server.up()
        try:
            yield server
        finally:
            server.down()


def pending_delivery(
    number: int, body: bytes = b'{"n":1}', prefix: str = "t", target: str = "t"
) -> Delivery:
    """A pending first attempt of ``target``, id ``{prefix}-{number}``, for a sender alone (the
    tests' and bench/drain.py's plain forwarder)."""
    return Delivery(
        id=f"{prefix}-{number}",
        notification_id=number,
        target=target,
        body=body,
        signature="sha256=00",
        split=False,
        state="pending",
        attempts=0,
        created_at=0.0,
        next_attempt_at=0.0,
        received_at=0.0,
    )
