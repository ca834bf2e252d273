"""Reload as an operator asks for it: SIGHUP to the serve process, `waba-gateway reload`, and
every worker of a multi-worker gateway reloading."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from pathlib import Path

import pytest
from config_files import free_port, listen_port, write_config
from cryptography import x509
from helpers import APP_SECRET
from load import Load
from pki import Pki
from processes import OutputLines, serving, stop, until_listening
from settling import pending_in_metrics, until_settled
from sink import DEADLINE_S, Sink
from two_workers import post_over_both_workers

from gateway.cli import main


async def served_serial(port: int, pki: Pki) -> int | None:
    """The serial number of the certificate a new connection is served; None: not listening."""
    context = pki.client_context("meta")
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the renewed certificate is checked by its serial
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
    except OSError:
        return None
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    # Closed before the test moves on: a TLS close left pending when the test's loop ends
    # leaves its socket to the garbage collector, and a warning to a later test.
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), DEADLINE_S)
    return int(x509.load_der_x509_certificate(der).serial_number)


async def _admin_up(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + DEADLINE_S
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def own_certificates(pki: Pki, folder: Path, config: Path) -> tuple[Path, Path]:
    """Copies of the server certificate and key that the test may overwrite."""
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(pki.server_chain_file.read_bytes())
    key.write_bytes(pki.server_key_file.read_bytes())
    text = config.read_text()
    text = text.replace(str(pki.server_chain_file), str(cert))
    config.write_text(text.replace(str(pki.server_key_file), str(key)))
    return cert, key


def renew(pki: Pki, cert: Path, key: Path) -> int:
    leaf = pki.server_ca.issue_cert("localhost", "127.0.0.1")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return int(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number)


async def test_sighup_reloads_the_serve_process(pki: Pki, tmp_path: Path) -> None:
    """SIGHUP: new connections get the renewed certificate; the process keeps running."""
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x")
    cert, key = own_certificates(pki, tmp_path, config)
    port = listen_port(config)
    with serving(config) as process:
        await until(lambda: served_serial(port, pki), "the gateway to listen")
        serial = renew(pki, cert, key)
        process.send_signal(signal.SIGHUP)

        async def renewed() -> bool:
            return await served_serial(port, pki) == serial

        await until(renewed, "the renewed certificate")
        assert process.poll() is None
        log = stop(process)
    assert process.returncode == 0
    assert f"reloaded {config}" in log


async def test_reload_command_reloads_every_worker_and_reports_a_failure(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`waba-gateway reload` with two workers: both reload; a broken key is exit 1 with the
    one line the gateway logged, and the gateway keeps serving the old certificate."""
    monkeypatch.setenv("TEST_APP_SECRET", APP_SECRET)
    admin_port = free_port()
    config = write_config(
        pki, tmp_path, target_url="http://127.0.0.1:9/x", workers=2, admin_port=admin_port
    )
    cert, key = own_certificates(pki, tmp_path, config)
    port = listen_port(config)
    with serving(config) as process:
        output = OutputLines(process)
        await until(lambda: served_serial(port, pki), "the gateway to listen")
        # Both workers up (a worker still starting would read the key broken below, and exit),
        # and worker 0's admin listener with them.
        await post_over_both_workers(port, pki, process.pid, "started", 4)
        await until(lambda: _admin_up(admin_port), "the admin listener of worker 0 too")
        serial = renew(pki, cert, key)

        assert await asyncio.to_thread(main, ["reload", "--config", str(config)]) == 0
        assert capsys.readouterr().out == f"reloaded {config}\n"

        # The command answers once worker 1 too has taken the files worker 0 took (it hears of
        # them through the supervisor, a signal); its line is read here by another thread.
        async def both_reloaded() -> bool:
            return output.count(f"reloaded {config}") >= 2

        await until(both_reloaded, "worker 1's line")
        for _ in range(8):  # new connections spread over both workers: all see the renewal
            assert await served_serial(port, pki) == serial
        key.write_bytes(pki.client_key_file.read_bytes())
        assert await asyncio.to_thread(main, ["reload", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: reload failed, nothing changed: {config}: tls.key_file")
        assert len(err.splitlines()) == 1
        assert await served_serial(port, pki) == serial
        failed = err.removeprefix("error: ").strip()
        process.send_signal(signal.SIGHUP)

        async def refused_again() -> bool:
            return output.count(failed) >= 2

        await until(refused_again, "worker 0 to refuse the SIGHUP's reload")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, DEADLINE_S) == 0
        log = output.join()
    # Worker 0 through the admin API, worker 1 through the supervisor.
    assert log.count(f"reloaded {config}") == 2
    # The failed reload, then SIGHUP to the supervisor: worker 0 alone reads the files of its
    # own accord, and said why again; worker 1 follows only what worker 0 took, so it kept the
    # configuration they share.
    assert log.count(failed) == 2


async def test_sighup_with_requests_in_flight_on_two_workers_drops_nothing(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """workers = 2: three SIGHUPs to the supervisor while eight keep-alive clients post without
    a pause (the next one once both workers reloaded): every request is answered 200, and
    every notification is delivered once. (New TLS material under load:
    tests/runtime/test_reload.py.)"""
    admin_port = free_port()
    config = write_config(
        pki, tmp_path, target_url=sink.url("/sink"), workers=2, admin_port=admin_port
    )
    port = listen_port(config)
    reloaded = f"reloaded {config}"
    with serving(config) as process:
        output = OutputLines(process)
        await until_listening(port, process)
        # Both workers serving first: a worker still starting ignores SIGHUP.
        started = await post_over_both_workers(port, pki, process.pid, "started", 4)
        load = Load(port, pki, "reload load")
        load.start()
        try:
            for _ in range(3):
                await load.until(len(load.acked) + 10, in_flight=2)
                before = output.count(reloaded)
                process.send_signal(signal.SIGHUP)

                # Worker 0 reloads, then asks the supervisor to reload the others: worker 1
                # hears of it twice, and two signals close together may make one reload.
                # Two lines or more: worker 0 and worker 1 both reloaded.
                async def both(before: int = before) -> bool:
                    return output.count(reloaded) >= before + 2

                await until(both, "both workers to reload")
            await load.until(len(load.acked) + 10, in_flight=0)
        finally:
            await load.stop()
        assert load.refused == []
        assert load.acked == load.sent
        sent = sorted([*started, *load.sent])
        await sink.wait_for(len(sent), "/sink")
        await until_settled(pending_in_metrics(admin_port), lambda: len(sink.at("/sink")))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, DEADLINE_S) == 0
        log = output.join()
    assert sorted(r.body for r in sink.at("/sink")) == sent
    assert "reload failed" not in log
