"""Reloading from files that are being changed: certificates renewed the ways renewal tools
write them (in place, a little at a time, through links swapped over), a watched file gone for a
moment, and a configuration file that changes while the gateway reads it
(gateway.runtime.gateway, gateway.runtime.reload)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from config_files import free_port
from cryptography import x509
from helpers import APP_SECRET, VERIFY_TOKEN, admin_get, eventually, metric
from pki import Pki
from sink import DEADLINE_S

from gateway.config import load_config
from gateway.runtime.gateway import Gateway


@dataclass
class Folder:
    """A configuration file and the server certificate and key it names, in a folder of the
    test's own; ``cert`` and ``key`` are the paths the file names (links, in some tests)."""

    path: Path
    config: Path
    cert: Path
    key: Path

    def write_config(self, interval_s: float, targets: str = "") -> str:
        text = textwrap.dedent(f"""\
            [listen]
            host = "127.0.0.1"
            port = {free_port()}
            workers = 1
            [tls]
            cert_file = "{self.cert}"
            key_file = "{self.key}"
            client_ca_file = "ca.pem"
            watch_files = true
            watch_interval_s = {interval_s}
            [meta]
            verify_tokens = ["{VERIFY_TOKEN}"]
            app_secrets = ["{APP_SECRET}"]
            [outbox]
            path = "outbox.sqlite3"
            [admin]
            host = "127.0.0.1"
            port = 0
            """)
        self.config.write_text(text + targets)
        return text + targets


def folder_for(pki: Pki, path: Path, cert: Path | None = None, key: Path | None = None) -> Folder:
    made = Folder(
        path, path / "gateway.toml", cert or path / "server.pem", key or path / "server.key"
    )
    (path / "ca.pem").write_bytes(pki.client_ca_file.read_bytes())
    return made


def chain_pem(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def serial(leaf: trustme.LeafCert) -> int:
    return int(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number)


async def served_serial(gateway: Gateway, pki: Pki) -> int:
    """The serial number of the certificate a new connection to ``gateway`` is served."""
    context = pki.client_context("meta")
    _, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.port, ssl=context, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    # Closed before the test moves on: a TLS close left pending when the test's loop ends
    # leaves its socket to the garbage collector, and a warning to a later test.
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), DEADLINE_S)
    return int(x509.load_der_x509_certificate(der).serial_number)


async def until_served(gateway: Gateway, pki: Pki, leaf: trustme.LeafCert) -> None:
    async def renewed() -> bool:
        return await served_serial(gateway, pki) == serial(leaf)

    await eventually(renewed, "the renewed certificate to be served")


async def failed_reloads(gateway: Gateway) -> float:
    text = (await admin_get(gateway, "/metrics")).text
    return metric(text, 'waba_gateway_reloads_total{outcome="failure"}')


@pytest.fixture
async def watching(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Folder]]:
    """A gateway that watches its own copies of the server certificate and key every 0.05 s."""
    folder = folder_for(pki, tmp_path)
    folder.cert.write_bytes(pki.server_chain_file.read_bytes())
    folder.key.write_bytes(pki.server_key_file.read_bytes())
    folder.write_config(0.05)
    async with Gateway(load_config(folder.config)) as gateway:
        yield gateway, folder


def _link(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` at once (a new link renamed over the old one)."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.replace(link)


async def test_a_watched_file_gone_for_a_moment_is_waited_for_not_a_failed_reload(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """certbot renews by pointing its live/ links at new files in archive/, one link after the
    other, each removed and made again: a watcher that looks meanwhile finds no file. The
    gateway waits for it (one warning naming it) instead of failing a reload, which counts
    in the alerted failures and logs an error, and then takes the renewal once it is whole.
    (It failed the reload.)"""
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    (archive / "fullchain1.pem").write_bytes(pki.server_chain_file.read_bytes())
    (archive / "privkey1.pem").write_bytes(pki.server_key_file.read_bytes())
    folder = folder_for(pki, tmp_path, live / "fullchain.pem", live / "privkey.pem")
    folder.cert.symlink_to("../archive/fullchain1.pem")
    folder.key.symlink_to("../archive/privkey1.pem")
    folder.write_config(0.05)
    async with Gateway(load_config(folder.config)) as gateway:
        leaf = pki.server_ca.issue_cert("localhost", "127.0.0.1")
        (archive / "fullchain2.pem").write_bytes(chain_pem(leaf))
        (archive / "privkey2.pem").write_bytes(leaf.private_key_pem.bytes())
        folder.cert.unlink()
        await asyncio.sleep(0.5)  # ten looks of the watcher without the file
        folder.cert.symlink_to("../archive/fullchain2.pem")
        folder.key.unlink()
        await asyncio.sleep(0.5)
        folder.key.symlink_to("../archive/privkey2.pem")

        await until_served(gateway, pki, leaf)
        assert await failed_reloads(gateway) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "tls.cert_file" in warnings[0]
    assert str(folder.cert) in warnings[0]
    assert "tls.key_file" in warnings[1]


async def test_a_certificate_written_in_place_a_little_at_a_time_is_reloaded_once_whole(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal that writes the certificate over the old one, then the key, a piece at a
    time (a copy over a slow or network file system, a script writing line by line): the
    gateway reloads once the files have stayed the same for a whole interval, not from the
    half-written certificate or a certificate without its key. (It failed a reload on the
    first half it saw.)"""
    folder = folder_for(pki, tmp_path)
    folder.cert.write_bytes(pki.server_chain_file.read_bytes())
    folder.key.write_bytes(pki.server_key_file.read_bytes())
    folder.write_config(0.2)
    async with Gateway(load_config(folder.config)) as gateway:
        leaf = pki.server_ca.issue_cert("localhost", "127.0.0.1")
        for path, data in (
            (folder.cert, chain_pem(leaf)),
            (folder.key, leaf.private_key_pem.bytes()),
        ):
            with path.open("wb", buffering=0) as file:  # in place: same file, truncated
                for start in range(0, len(data), 32):
                    file.write(data[start : start + 32])
                    await asyncio.sleep(0.01)

        await until_served(gateway, pki, leaf)
        assert await failed_reloads(gateway) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_watch_files_follows_a_kubernetes_secret_update(pki: Pki, tmp_path: Path) -> None:
    """A mounted Secret: tls.crt and tls.key are links through ..data, a link to a folder of
    the current files; an update writes a new folder and renames a new ..data over the old."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_01_01_00_00_00.1"
    first.mkdir()
    (first / "tls.crt").write_bytes(pki.server_chain_file.read_bytes())
    (first / "tls.key").write_bytes(pki.server_key_file.read_bytes())
    (mount / "..data").symlink_to(first.name)
    folder = folder_for(pki, tmp_path, mount / "tls.crt", mount / "tls.key")
    folder.cert.symlink_to("..data/tls.crt")
    folder.key.symlink_to("..data/tls.key")
    folder.write_config(0.05)
    async with Gateway(load_config(folder.config)) as gateway:
        leaf = pki.server_ca.issue_cert("localhost", "127.0.0.1")
        second = mount / "..2026_02_01_00_00_00.2"
        second.mkdir()
        (second / "tls.crt").write_bytes(chain_pem(leaf))
        (second / "tls.key").write_bytes(leaf.private_key_pem.bytes())
        _link(second.name, mount / "..data")

        await until_served(gateway, pki, leaf)
        assert await failed_reloads(gateway) == 0


def _same_size_renewal(pki: Pki, size: int) -> trustme.LeafCert:
    """A renewed certificate whose chain file is ``size`` bytes, as the old one's (an ECDSA
    signature's length varies by a byte or two, so most renewals are)."""
    for _ in range(200):
        leaf = pki.server_ca.issue_cert("localhost", "127.0.0.1")
        if len(chain_pem(leaf)) == size:
            return leaf
    raise AssertionError("no renewal of the same size")


async def test_watch_files_notices_a_renewal_of_the_same_size_with_the_old_time(
    watching: tuple[Gateway, Folder], pki: Pki
) -> None:
    """A renewal written over the old files, of the same size and with the old modification
    time (a copy that keeps times, `cp -p`, `install -p`, an archive unpacked; or two writes
    within one tick of a coarse file system clock) is a change of content: it is reloaded.
    (The watcher compared inode, size and time, and never reloaded it.)"""
    gateway, folder = watching
    leaf = _same_size_renewal(pki, folder.cert.stat().st_size)
    for path, data in ((folder.cert, chain_pem(leaf)), (folder.key, leaf.private_key_pem.bytes())):
        before = path.stat()
        assert len(data) == before.st_size
        path.write_bytes(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    await until_served(gateway, pki, leaf)


@contextlib.contextmanager
def fed_through_a_pipe(path: Path, first: str, then: str) -> Iterator[list[str]]:
    """``path`` as a named pipe whose first reader reads ``first`` and every later one
    ``then``: a file whose content changes between two reads, at a moment the test chooses.
    Yields what each reader was given."""
    path.unlink()
    os.mkfifo(path)
    given: list[str] = []
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody reading yet
                    raise
                time.sleep(0.001)
                continue
            text = first if not given else then
            os.set_blocking(fd, True)
            with contextlib.suppress(BrokenPipeError):
                os.write(fd, text.encode())
            os.close(fd)
            given.append(text)
            # Let that reader see the end of its file before the next is fed.
            time.sleep(0.05)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield given
    finally:
        stop.set()
        feeder.join(5)


async def test_a_configuration_file_that_changes_while_it_is_read_is_not_applied(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An editor or a script saving the file in place empties it and writes it again; a
    reload that reads meanwhile may find the first part alone, a file that loads: here one
    whose [[targets]] are not written yet. That reload fails naming the file, and changes
    nothing (the target stays); the next, once the file is whole, applies it. (The reload
    applied the half file: every target gone, their deliveries left pending.)"""
    folder = folder_for(pki, tmp_path)
    folder.cert.write_bytes(pki.server_chain_file.read_bytes())
    folder.key.write_bytes(pki.server_key_file.read_bytes())
    target = '[[targets]]\nname = "t"\nurl = "http://127.0.0.1:9/x"\n'
    whole = folder.write_config(10.0, targets=target)
    half = whole.removesuffix(target)
    async with Gateway(load_config(folder.config)) as gateway:
        with fed_through_a_pipe(folder.config, half, whole) as given:
            result = gateway.reload()
        assert given[:1] == [half]
        assert not result.ok
        assert result.message.startswith(f"reload failed, nothing changed: {folder.config}: ")
        assert "changed while it was read" in result.message
        assert [t.name for t in gateway.config.targets] == ["t"]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [result.message]

        folder.config.unlink()
        folder.config.write_text(whole.replace('"t"', '"u"'))
        again = gateway.reload()
        assert again.ok, again.message
        assert [t.name for t in gateway.config.targets] == ["u"]
