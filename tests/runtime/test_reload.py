"""Reload without a restart: new TLS material for new handshakes, nothing dropped, and a failed
reload that changes nothing (gateway.runtime.gateway, gateway.runtime.reload)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from config_files import free_port
from cryptography import x509
from helpers import (
    APP_SECRET,
    VERIFY_TOKEN,
    admin_get,
    admin_post,
    eventually,
    message_body,
    meta_signature,
    metric,
    read_message,
    wait_for_state,
)
from pki import Pki
from settling import pending_in_gateway, until_settled
from sink import Sink

from gateway.cli import main
from gateway.config import META_CLIENT_CN, Config, MetaConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime.gateway import Gateway
from gateway.runtime.reload import applicable, restart_only


@dataclass
class Files:
    """A configuration file and the TLS files it names, in a folder of the test's own."""

    folder: Path
    config: Path
    cert: Path
    key: Path
    ca: Path
    port: int
    admin_port: int = 0

    def write_config(
        self, extra_tls: str = "", targets: str = "", secret: str = APP_SECRET
    ) -> None:
        self.config.write_text(
            textwrap.dedent(f"""\
            [listen]
            host = "127.0.0.1"
            port = {self.port}
            workers = 1
            [tls]
            cert_file = "server.pem"
            key_file = "server.key"
            client_ca_file = "ca.pem"
            {extra_tls}
            [meta]
            verify_tokens = ["{VERIFY_TOKEN}"]
            app_secrets = ["{secret}"]
            [outbox]
            path = "outbox.sqlite3"
            [admin]
            host = "127.0.0.1"
            port = {self.admin_port}
            [dispatcher]
            poll_interval_s = 0.05
            """)
            + targets
        )

    def install_server(self, leaf: trustme.LeafCert) -> None:
        """Write a new certificate and key in place, as certbot and cert-manager do."""
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())


@pytest.fixture
def files(pki: Pki, tmp_path: Path) -> Files:
    made = Files(
        tmp_path,
        tmp_path / "gateway.toml",
        tmp_path / "server.pem",
        tmp_path / "server.key",
        tmp_path / "ca.pem",
        free_port(),
    )
    made.cert.write_bytes(pki.server_chain_file.read_bytes())
    made.key.write_bytes(pki.server_key_file.read_bytes())
    made.ca.write_bytes(pki.client_ca_file.read_bytes())
    made.write_config()
    return made


@pytest.fixture
async def gateway(files: Files) -> AsyncIterator[Gateway]:
    async with Gateway(load_config(files.config)) as running:
        yield running


def client_context(pki: Pki, server_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """Meta's client certificate; trusting the test server CA, or ``server_ca``."""
    context = pki.client_context("meta")
    if server_ca is not None:
        server_ca.configure_trust(context)
    return context


async def connect(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )


def served_certificate(writer: asyncio.StreamWriter) -> x509.Certificate:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, secret: str
) -> int:
    """One keep-alive POST on an open connection; the answer's status."""
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"X-Hub-Signature-256: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (meta_signature(body, secret).encode(), len(body), body)
    )
    head, _ = await read_message(reader)
    return int(head.split(b" ", 2)[1])


async def post_new(port: int, pki: Pki, body: bytes, secret: str = APP_SECRET) -> int:
    reader, writer = await connect(port, client_context(pki))
    try:
        return await exchange(reader, writer, body, secret)
    finally:
        writer.close()


def renewed(
    pki: Pki, not_before: datetime | None = None, not_after: datetime | None = None
) -> trustme.LeafCert:
    """A new server certificate from the same CA, as a renewal is."""
    return pki.server_ca.issue_cert(
        "localhost", "127.0.0.1", not_before=not_before, not_after=not_after
    )


async def test_reload_serves_the_new_certificate_to_new_handshakes_and_keeps_connections(
    gateway: Gateway, files: Files, pki: Pki
) -> None:
    """After a reload a new connection gets the renewed certificate; an open keep-alive
    connection made before it goes on answering."""
    reader, writer = await connect(gateway.port, client_context(pki))
    before = served_certificate(writer)
    assert await exchange(reader, writer, message_body("before"), APP_SECRET) == 200
    leaf = renewed(pki)
    files.install_server(leaf)

    result = gateway.reload()

    assert result.ok, result.message
    assert result.message == f"reloaded {files.config}"
    _, new_writer = await connect(gateway.port, client_context(pki))
    after = served_certificate(new_writer)
    new_writer.close()
    assert after.serial_number != before.serial_number
    assert after == x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    assert await exchange(reader, writer, message_body("after, same connection"), APP_SECRET) == 200
    writer.close()
    text = (await admin_get(gateway, "/metrics")).text
    assert metric(text, 'waba_gateway_reloads_total{outcome="success"}') == 1


def _break(files: Files, pki: Pki, how: str) -> str:
    """Make the files on disk unusable in one way; the fragment the error names."""
    if how == "unreadable certificate":
        files.cert.unlink()
        return "tls.cert_file"
    if how == "key not matching":
        files.key.write_bytes(pki.client_key_file.read_bytes())
        return "tls.key_file"
    if how == "expired certificate":
        now = datetime.now(UTC)
        files.install_server(
            renewed(pki, not_before=now - timedelta(days=90), not_after=now - timedelta(days=1))
        )
        return "expired on"
    if how == "bad TOML":
        files.config.write_text("[tls\n")
        return "invalid TOML"
    assert how == "unknown key"
    files.config.write_text(files.config.read_text() + "\n[listen2]\nx = 1\n")
    return "listen2"


@pytest.mark.parametrize(
    "how",
    [
        "unreadable certificate",
        "key not matching",
        "expired certificate",
        "bad TOML",
        "unknown key",
    ],
)
async def test_a_failed_reload_changes_nothing_and_says_why_in_one_line(
    gateway: Gateway, files: Files, pki: Pki, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The old certificate keeps serving, the reason is one line naming the file, and the
    failure is counted."""
    _, writer = await connect(gateway.port, client_context(pki))
    serving = served_certificate(writer)
    writer.close()
    fragment = _break(files, pki, how)
    config_before = gateway.config

    result = gateway.reload()

    assert not result.ok
    assert result.message.startswith(f"reload failed, nothing changed: {files.config}")
    assert fragment in result.message
    assert "\n" not in result.message
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [result.message]
    assert gateway.config is config_before
    _, writer = await connect(gateway.port, client_context(pki))
    assert served_certificate(writer) == serving
    writer.close()
    assert await post_new(gateway.port, pki, message_body(how)) == 200
    text = (await admin_get(gateway, "/metrics")).text
    assert metric(text, 'waba_gateway_reloads_total{outcome="failure"}') == 1


async def test_a_client_without_sni_also_gets_the_new_certificate(
    gateway: Gateway, files: Files, pki: Pki
) -> None:
    """The context is chosen for every ClientHello, with or without a server name in it."""
    leaf = renewed(pki)
    files.install_server(leaf)
    assert gateway.reload().ok
    context = client_context(pki)
    context.check_hostname = False
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=context)
    served = served_certificate(writer)
    writer.close()
    assert served == x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


async def test_reload_rotates_the_client_ca(gateway: Gateway, files: Files, pki: Pki) -> None:
    """Meta's new CA replaces the old one: its client is accepted, the old one refused."""
    new_root = trustme.CA()
    new_client = new_root.create_child_ca().issue_cert(META_CLIENT_CN, common_name=META_CLIENT_CN)
    new_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.server_ca.configure_trust(new_context)
    new_client.configure_cert(new_context)
    files.ca.write_bytes(new_root.cert_pem.bytes())

    assert gateway.reload().ok

    reader, writer = await connect(gateway.port, new_context)
    assert await exchange(reader, writer, message_body("new CA"), APP_SECRET) == 200
    writer.close()
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await post_new(gateway.port, pki, message_body("old CA"))


async def test_reload_rotates_the_app_secret(gateway: Gateway, files: Files, pki: Pki) -> None:
    """A new app secret applies to the next request; the old one is refused (401)."""
    files.write_config(secret="rotated-secret")
    assert gateway.reload().ok
    assert await post_new(gateway.port, pki, message_body("new"), "rotated-secret") == 200
    assert await post_new(gateway.port, pki, message_body("old"), APP_SECRET) == 401


async def test_reload_changes_the_accepted_client_cn(
    gateway: Gateway, files: Files, pki: Pki
) -> None:
    """tls.client_cn applies to the next connection: Meta's CN, no longer listed, gets 403."""
    files.write_config(extra_tls='client_cn = ["someone.else.example"]')
    assert gateway.reload().ok
    assert await post_new(gateway.port, pki, message_body("cn")) == 403


async def test_reload_refuses_a_client_certificate_accepted_just_before_it(
    gateway: Gateway, files: Files, pki: Pki
) -> None:
    """A certificate whose verdict the gateway remembers (accepted a moment ago) is judged
    again under the reloaded tls.client_cn: 403 on the next connection."""
    assert await post_new(gateway.port, pki, message_body("before")) == 200
    files.write_config(extra_tls='client_cn = ["someone.else.example"]')
    assert gateway.reload().ok
    assert await post_new(gateway.port, pki, message_body("after")) == 403


async def test_removed_targets_deliveries_stay_pending_and_new_targets_get_new_ones(
    files: Files, pki: Pki, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A target the reload removes keeps its deliveries pending (listed, replayable); a target
    it adds has its metrics at 0 at once and receives what arrives next."""
    await sink.down()  # "old" cannot take anything yet
    old = f'[[targets]]\nname = "old"\nurl = "{sink.url("/old")}"\nwait_initial_s = 0.05\n'
    files.write_config(targets=old)
    async with Gateway(load_config(files.config)) as gateway:
        assert await post_new(gateway.port, pki, message_body("for old")) == 200
        await wait_for_state(gateway, "pending", target="old")
        await sink.up()
        files.write_config(targets=f'[[targets]]\nname = "new"\nurl = "{sink.url("/new")}"\n')

        assert gateway.reload().ok
        # The added target's alerted series exist from the reload on, before its first event.
        text = (await admin_get(gateway, "/metrics")).text
        dead = 'waba_gateway_delivery_attempts_total{outcome="dead",target="new"}'
        assert metric(text, dead) == 0
        assert metric(text, 'waba_gateway_target_dead_letters{target="new"}') == 0

        assert await post_new(gateway.port, pki, message_body("for new")) == 200
        await wait_for_state(gateway, "delivered", target="new")
        await asyncio.sleep(0.2)  # several dispatcher polls: nothing happens to "old"'s
        (kept,) = await gateway.outbox.query(target="old")
        assert kept.state == "pending"
        assert sink.at("/old") == []
        text = (await admin_get(gateway, "/metrics")).text
        assert metric(text, 'waba_gateway_target_pending_deliveries{target="old"}') == 1
    assert "1 deliveries pending for target old, which is not configured" in caplog.text


async def test_a_target_whose_url_changes_gets_the_next_deliveries_at_the_new_url(
    files: Files, pki: Pki, sink: Sink
) -> None:
    """A changed target is sent to with its new settings from the reload on."""
    target = '[[targets]]\nname = "t"\nurl = "{}"\n'
    files.write_config(targets=target.format(sink.url("/before")))
    async with Gateway(load_config(files.config)) as gateway:
        assert await post_new(gateway.port, pki, message_body("one")) == 200
        await sink.wait_for(1, "/before")
        files.write_config(targets=target.format(sink.url("/after")))
        assert gateway.reload().ok
        assert await post_new(gateway.port, pki, message_body("two")) == 200
        await sink.wait_for(1, "/after")
    assert len(sink.at("/before")) == 1


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("misspelt key", "meta.verify_token = "),
        ("invalid TOML in another table", "invalid TOML"),
    ],
)
async def test_reload_command_reports_a_file_that_does_not_load_as_a_failed_reload(
    files: Files, how: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`waba-gateway reload` asks the gateway even when the file does not load: exit 1 with
    the gateway's one line, counted as a failed reload, and the gateway keeps serving."""
    files.admin_port = free_port()
    files.write_config()
    async with Gateway(load_config(files.config)) as gateway:
        text = files.config.read_text()
        if how == "misspelt key":
            files.config.write_text(text.replace("verify_tokens", "verify_token"))
        else:
            files.config.write_text(text.replace("[tls]", "[tls"))
        code = await asyncio.to_thread(main, ["reload", "--config", str(files.config)])
        err = capsys.readouterr().err
        metrics = (await admin_get(gateway, "/metrics")).text
        assert (await admin_get(gateway, "/readyz")).status == 200
    assert code == 1
    assert err.startswith(f"error: reload failed, nothing changed: {files.config}: ")
    assert fragment in err
    assert len(err.splitlines()) == 1
    assert metric(metrics, 'waba_gateway_reloads_total{outcome="failure"}') == 1


async def test_admin_reload_answers_the_outcome_in_one_line(gateway: Gateway, files: Files) -> None:
    """POST /admin/reload: 200 and the message, or 422 and the reason of the failure."""
    answer = await admin_post(gateway, "/admin/reload")
    assert (answer.status, answer.text) == (
        200,
        f'{{"ok": true, "message": "reloaded {files.config}"}}',
    )
    files.config.write_text("[tls\n")
    answer = await admin_post(gateway, "/admin/reload")
    assert answer.status == 422
    assert "reload failed, nothing changed:" in answer.text


async def test_watch_files_reloads_when_the_certificate_is_renewed(files: Files, pki: Pki) -> None:
    """With tls.watch_files, a certificate written in place is served without being asked."""
    files.write_config(extra_tls="watch_files = true\nwatch_interval_s = 0.05")
    async with Gateway(load_config(files.config)) as gateway:
        leaf = renewed(pki)
        files.install_server(leaf)
        expected = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())

        async def renewed_served() -> bool:
            _, writer = await connect(gateway.port, client_context(pki))
            served = served_certificate(writer)
            writer.close()
            return served == expected

        await eventually(renewed_served, "the renewed certificate to be served")


# -- what a reload applies (pure) -----------------------------------------------------------


def _base(pki: Pki) -> Config:
    return Config(tls=pki.tls_config(), meta=MetaConfig(verify_tokens=("v",), app_secrets=("s",)))


@pytest.mark.parametrize(
    ("change", "needs_restart"),
    [
        (
            lambda c: dataclasses.replace(c, meta=dataclasses.replace(c.meta, app_secrets=("n",))),
            [],
        ),
        (lambda c: dataclasses.replace(c, targets=()), []),
        (
            lambda c: dataclasses.replace(c, listen=dataclasses.replace(c.listen, port=1)),
            ["listen"],
        ),
        (lambda c: dataclasses.replace(c, log_format="json"), ["log.format"]),
        (
            lambda c: dataclasses.replace(
                c, tls=dataclasses.replace(c.tls, client_auth="optional")
            ),
            ["tls.client_auth"],
        ),
        (
            lambda c: dataclasses.replace(c, tls=dataclasses.replace(c.tls, crl_file=Path("x"))),
            ["tls.crl_file"],
        ),
        (
            lambda c: dataclasses.replace(c, admin=dataclasses.replace(c.admin, token="t")),
            [],
        ),
    ],
)
def test_restart_only_names_the_changes_a_reload_cannot_apply(
    pki: Pki, change: object, needs_restart: list[str]
) -> None:
    """Secrets, targets and the admin token reload; what is bound at start-up is named."""
    old = _base(pki)
    assert callable(change)
    new: Config = change(old)
    assert restart_only(old, new) == needs_restart
    kept = applicable(old, new)
    assert restart_only(old, kept) == []
    assert kept.meta == new.meta
    assert kept.targets == new.targets
    assert kept.admin.token == new.admin.token


_TOKEN = "t" * 40


@pytest.mark.parametrize(
    ("old_admin", "new_admin", "refused_key"),
    [
        # (host, token) before and in the new file. The listener stays on the old host until
        # a restart: the token in force must still be one that host needs.
        (("0.0.0.0", _TOKEN), ("127.0.0.1", None), "admin.host"),
        (("0.0.0.0", _TOKEN), ("127.0.0.1", "x"), "admin.token"),
        (("0.0.0.0", _TOKEN), ("0.0.0.0", "u" * 40), None),  # a new strong token reloads
        (("127.0.0.1", None), ("127.0.0.1", None), None),
        (("127.0.0.1", _TOKEN), ("127.0.0.1", None), None),  # loopback needs none
    ],
)
def test_a_reload_that_would_leave_the_admin_api_open_on_the_network_is_refused(
    pki: Pki,
    old_admin: tuple[str, str | None],
    new_admin: tuple[str, str | None],
    refused_key: str | None,
) -> None:
    """A new file may move the admin listener to loopback and drop its token: on its own it is
    valid, but the listener stays where it is until a restart, so what the reload would put in
    force is checked as a loaded file is, and refused naming the file and the key. (The API
    used to answer on the network without a token after such a reload.)"""
    source = Path("/etc/waba-gateway/gateway.toml")

    def with_admin(host: str, token: str | None) -> Config:
        admin = dataclasses.replace(_base(pki).admin, host=host, token=token)
        return dataclasses.replace(_base(pki), admin=admin, source=source)

    old, new = with_admin(*old_admin), with_admin(*new_admin)
    if refused_key is None:
        assert applicable(old, new).admin.token == new.admin.token
        return
    with pytest.raises(ConfigError) as refused:
        applicable(old, new)
    assert str(refused.value).startswith(f"{source}: {refused_key}: ")
    assert "0.0.0.0" in str(refused.value)


async def test_reloads_while_requests_are_in_flight_drop_nothing(
    files: Files, pki: Pki, sink: Sink
) -> None:
    """Five reloads (each with a renewed certificate) while keep-alive clients post without a
    pause and one request is half sent: every request is answered 200, and every notification
    is delivered once."""
    files.write_config(targets=f'[[targets]]\nname = "t"\nurl = "{sink.url("/t")}"\n')
    sent: list[bytes] = []
    answers: list[int] = []
    in_flight = 0
    stopped = asyncio.Event()

    async def client(port: int, number: int) -> None:
        nonlocal in_flight
        reader, writer = await connect(port, client_context(pki))
        sequence = 0
        while not stopped.is_set():
            sequence += 1
            body = message_body(f"reload load {number}.{sequence}")
            sent.append(body)
            in_flight += 1
            try:
                answers.append(await exchange(reader, writer, body, APP_SECRET))
            finally:
                in_flight -= 1
        writer.close()

    async with Gateway(load_config(files.config)) as running:
        clients = asyncio.gather(*(client(running.port, number) for number in range(4)))
        try:
            # Half a request, head and part of the body, on its own connection: the reload
            # comes between its two halves.
            half = message_body("sent across the reloads")
            reader, writer = await connect(running.port, client_context(pki))
            head = (
                b"POST /webhook HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nX-Hub-Signature-256: %s\r\n"
                b"Content-Length: %d\r\n\r\n" % (meta_signature(half).encode(), len(half))
            )
            writer.write(head + half[:40])
            await writer.drain()
            for reload in range(5):
                before = len(answers)

                async def loaded(before: int = before) -> bool:
                    return len(answers) >= before + 5 and in_flight >= 2

                await eventually(loaded, f"answers and requests in flight before reload {reload}")
                files.install_server(renewed(pki))
                result = running.reload()
                assert result.ok, result.message
            writer.write(half[40:])
            status = int((await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1])
            writer.close()
            assert status == 200
            sent.append(half)
        finally:
            stopped.set()
            await clients
        assert answers == [200] * len(answers)
        assert len(answers) == len(sent) - 1  # all but the half request, answered above
        await sink.wait_for(len(sent), "/t")
        await until_settled(pending_in_gateway(running), lambda: len(sink.at("/t")))
        text = (await admin_get(running, "/metrics")).text
    assert sorted(r.body for r in sink.at("/t")) == sorted(sent)
    assert metric(text, 'waba_gateway_reloads_total{outcome="success"}') == 5
