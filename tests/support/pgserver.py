"""A throw-away PostgreSQL server for the tests and the benchmarks: a real server, not a mock.

PostgreSQL refuses to run as root, and CI runs as root: the cluster then belongs to an
unprivileged system user (made once with ``useradd``), in a temporary folder that user owns. It
listens on a Unix socket in that folder and on a free loopback port. ``.ci/run`` installs the
server package where it is missing; without it the tests fail, saying so (never skip silently).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loopback_ports import free_port

__all__ = ["PASSWORD", "USER", "PgServer", "pg_bin", "running_counted_server", "running_server"]

USER = "waba"
PASSWORD = "throw-away-pg-password"
_OS_USER = "waba-pg"


def pg_bin() -> Path:
    """The folder of the newest installed server's binaries (Debian puts them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(
            "no PostgreSQL server binaries (initdb): install postgresql-15"
            " (.ci/run does: apt-get install -y postgresql-15)"
        )
    return Path(initdb).parent


def _as_owner() -> list[str]:
    """The command prefix that runs the server's programs as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _OS_USER],
            check=True,
        )
    return ["runuser", "-u", _OS_USER, "--"]


@dataclass
class PgServer:
    """A running cluster: ``folder`` holds the data and the socket."""

    folder: Path
    port: int
    bin: Path
    prefix: list[str]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder

    def tcp_url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True)

    def start(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"), "start", "-w", "-s", "-D", str(self.data),
            "-l", str(self.folder / "server.log"),
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "stop", "-w", "-s", "-m", mode, "-D", str(self.data))

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the socket; its unaligned output."""
        done = subprocess.run(
            [
                str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", USER, "-d", database,
                "-c", sql,
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return done.stdout.strip()


def init_server(settings: str = "") -> PgServer:
    """Make and start a new cluster in a new temporary folder; ``settings``: more lines of
    postgresql.conf."""
    prefix = _as_owner()
    folder = Path(tempfile.mkdtemp(prefix="waba-pg-"))
    if prefix:
        os.chown(folder, pwd.getpwnam(_OS_USER).pw_uid, -1)
    folder.chmod(0o700)
    server = PgServer(folder=folder, port=free_port(), bin=pg_bin(), prefix=prefix)
    password_file = folder / "pw"
    password_file.write_text(PASSWORD)
    if prefix:
        os.chown(password_file, pwd.getpwnam(_OS_USER).pw_uid, -1)
    server._run(
        str(server.bin / "initdb"), "-D", str(server.data), "-U", USER, "-A", "trust",
        "--auth-host=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8",
        "--no-instructions",
    )  # fmt: skip
    password_file.unlink()
    with (server.data / "postgresql.conf").open("a") as conf:
        # Durable like production (fsync and synchronous_commit stay on); only the listening
        # places and a size fit for a shared machine are set here.
        conf.write(
            f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
            f"unix_socket_directories = '{folder}'\nmax_connections = 200\n"
            "shared_buffers = 64MB\n"
        )
        conf.write(settings)
    server.start()
    return server


@contextlib.contextmanager
def running_server(settings: str = "") -> Iterator[PgServer]:
    """A new cluster, stopped and removed at the end."""
    server = init_server(settings)
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(server.folder, ignore_errors=True)


@contextlib.contextmanager
def running_counted_server() -> Iterator[PgServer]:
    """A new cluster, as :func:`running_server`, that counts the statements it runs
    (pg_stat_statements): the extension is made in its database ``counted``, where the counts
    are read and reset."""
    with running_server("shared_preload_libraries = 'pg_stat_statements'\n") as server:
        server.psql("CREATE DATABASE counted")
        server.psql("CREATE EXTENSION pg_stat_statements", "counted")
        yield server
