"""HTTPS targets behind a private CA, and targets that want a client certificate
(gateway.delivery.target_tls, through the forwarder and a running gateway).

A real HTTPS server on loopback with a certificate from a throw-away internal CA (trustme): the
forwarder reaches it only when the target's ``ca_file`` names that CA, never through the system's
trust store; a target that requires a client certificate is served only with ``cert_file`` and
``key_file``. Every success is paired with the refusal that proves it.
"""

from __future__ import annotations

import ssl
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from brokers import pending_delivery
from config_files import free_port
from helpers import VERIFY_TOKEN, deliveries, eventually, message_body, meta_signature
from pki import Pki

from gateway.config import TargetConfig, load_config
from gateway.delivery.forwarder import Forwarder
from gateway.delivery.outcome import AttemptResult
from gateway.delivery.target_tls import build_target_context, target_contexts
from gateway.errors import CertificateError
from gateway.onboarding.check import report
from gateway.outbox import Delivery
from gateway.runtime.gateway import Gateway


@dataclass(frozen=True, slots=True)
class Internal:
    """The internal PKI: the CA that signs the target's certificate, another CA the target
    does not use, the target's certificate, and the client certificate it asks the gateway
    for (with a key that does not match it)."""

    ca_file: Path
    other_ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    other_key_file: Path


@pytest.fixture(scope="module")
def internal(tmp_path_factory: pytest.TempPathFactory) -> Internal:
    folder = tmp_path_factory.mktemp("internal-pki")
    ca, other, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert(
        "gateway.internal.example", common_name="gateway.internal.example"
    )
    stranger = client_ca.issue_cert("stranger.internal.example")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "other-ca.pem": other.cert_pem.bytes(),
        "server.pem": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client-ca.pem": client_ca.cert_pem.bytes(),
        "client.pem": b"".join(blob.bytes() for blob in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
        "other.key": stranger.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Internal(
        ca_file=folder / "ca.pem",
        other_ca_file=folder / "other-ca.pem",
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server.key",
        client_ca_file=folder / "client-ca.pem",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        other_key_file=folder / "other.key",
    )


@dataclass
class HttpsTarget:
    url: str
    seen: list[tuple[bytes, str | None]]  # body, and the client certificate's CN if any


async def _serve(internal: Internal, *, client_cert: bool) -> AsyncIterator[HttpsTarget]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(internal.server_cert_file, internal.server_key_file)
    if client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=internal.client_ca_file)
    target = HttpsTarget("", [])

    async def handle(request: web.Request) -> web.Response:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peer = ssl_object.getpeercert() if ssl_object is not None else None
        cn = dict(item[0] for item in peer["subject"])["commonName"] if peer else None
        target.seen.append((await request.read(), cn))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    target.url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield target
    finally:
        await runner.cleanup()


@pytest.fixture
async def https_target(internal: Internal) -> AsyncIterator[HttpsTarget]:
    """Served with the internal CA's certificate; asks for no client certificate."""
    async for target in _serve(internal, client_cert=False):
        yield target


@pytest.fixture
async def mtls_target(internal: Internal) -> AsyncIterator[HttpsTarget]:
    """As ``https_target``, and requires a client certificate from the internal client CA."""
    async for target in _serve(internal, client_cert=True):
        yield target


DELIVERY = pending_delivery(
    1, b'{"object":"whatsapp_business_account"}', prefix="d", target="internal"
)


async def _send(target: TargetConfig) -> AttemptResult:
    """One attempt through a forwarder built as the dispatcher builds it."""
    forwarder = Forwarder(target, build_target_context(target, "targets[0]"))
    try:
        (result,) = await forwarder.send_many([DELIVERY], [1])
    finally:
        await forwarder.close()
    return result


async def test_private_ca_target_is_reached_with_its_ca_file(
    https_target: HttpsTarget, internal: Internal
) -> None:
    """With ca_file naming the internal CA, the target's certificate verifies: delivered."""
    target = TargetConfig(name="internal", url=https_target.url, ca_file=internal.ca_file)
    result = await _send(target)
    assert result.status == 200, result
    assert https_target.seen == [(DELIVERY.body, None)]


@pytest.mark.parametrize("ca", ["system-store", "other-ca"])
async def test_private_ca_target_is_refused_without_its_ca(
    https_target: HttpsTarget, internal: Internal, ca: str
) -> None:
    """The system's trust store, or a CA that did not sign the target's certificate: the
    handshake fails on verification and nothing reaches the target."""
    ca_file = None if ca == "system-store" else internal.other_ca_file
    target = TargetConfig(name="internal", url=https_target.url, ca_file=ca_file)
    result = await _send(target)
    assert result.status is None
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or ""), result
    assert https_target.seen == []


async def test_target_requiring_a_client_certificate_gets_the_configured_one(
    mtls_target: HttpsTarget, internal: Internal
) -> None:
    """cert_file and key_file: the target sees the gateway's client certificate."""
    target = TargetConfig(
        name="internal",
        url=mtls_target.url,
        ca_file=internal.ca_file,
        cert_file=internal.client_cert_file,
        key_file=internal.client_key_file,
    )
    result = await _send(target)
    assert result.status == 200, result
    assert mtls_target.seen == [(DELIVERY.body, "gateway.internal.example")]


async def test_target_requiring_a_client_certificate_refuses_the_gateway_without_one(
    mtls_target: HttpsTarget, internal: Internal
) -> None:
    """Without cert_file the target refuses the connection: an error, not a delivery."""
    target = TargetConfig(name="internal", url=mtls_target.url, ca_file=internal.ca_file)
    result = await _send(target)
    assert result.status is None, result
    assert result.error
    assert mtls_target.seen == []


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(
            ("missing.pem", None, None),
            "targets[0].ca_file = '<dir>/missing.pem': cannot read: No such file or directory",
            id="ca-file-missing",
        ),
        pytest.param(
            ("client.key", None, None),
            "targets[0].ca_file = '<dir>/client.key': no PEM certificate found",
            id="ca-file-not-a-certificate",
        ),
        pytest.param(
            (None, "client.pem", "other.key"),
            "targets[0].key_file = '<dir>/other.key': does not match targets[0].cert_file",
            id="key-not-matching",
        ),
        pytest.param(
            (None, "client.pem", "missing.key"),
            "targets[0].key_file = '<dir>/missing.key': cannot read: No such file or directory",
            id="key-missing",
        ),
    ],
)
def test_unusable_tls_file_is_refused_naming_the_key(
    internal: Internal, names: tuple[str | None, str | None, str | None], expected: str
) -> None:
    """A missing or wrong file stops the build with the key and the file, before any delivery."""
    folder = internal.ca_file.parent
    ca_file, cert_file, key_file = (None if name is None else folder / name for name in names)
    target = TargetConfig(
        name="internal",
        url="https://127.0.0.1:1/hook",
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    with pytest.raises(CertificateError) as raised:
        target_contexts([target], source=Path("gateway.toml"))
    assert str(raised.value) == "gateway.toml: " + expected.replace("<dir>", str(folder))


def _write_config(folder: Path, pki: Pki, url: str, ca_file: Path, extra: str = "") -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        textwrap.dedent(f"""
            [listen]
            host = "127.0.0.1"
            port = {free_port()}
            workers = 1
            [tls]
            cert_file = "{pki.server_chain_file}"
            key_file = "{pki.server_key_file}"
            client_ca_file = "{pki.client_ca_file}"
            [meta]
            verify_tokens = ["{VERIFY_TOKEN}"]
            app_secrets = ["test-app-secret"]
            [outbox]
            path = "outbox.sqlite3"
            [admin]
            enabled = false
            [dispatcher]
            poll_interval_s = 0.05
            [[targets]]
            name = "internal"
            url = "{url}"
            ca_file = "{ca_file}"
            wait_initial_s = 0.05
            wait_max_s = 0.1
        """)
        + extra
    )
    return path


async def test_reload_reads_the_target_ca_file_again(
    https_target: HttpsTarget, internal: Internal, pki: Pki, tmp_path: Path
) -> None:
    """A renewed CA file at the same path takes effect at the next reload: deliveries that
    failed verification against the old one go through, and ``check`` reports the file."""
    ca_file = tmp_path / "target-ca.pem"
    ca_file.write_bytes(internal.other_ca_file.read_bytes())  # not the CA the target uses
    config = load_config(_write_config(tmp_path, pki, https_target.url, ca_file))
    async with Gateway(config) as gateway:
        body = message_body("to the internal service")
        await gateway.core.callback.notify(body, meta_signature(body))

        async def failed_attempt() -> Delivery | None:
            found = await deliveries(gateway)
            return found[0] if found and found[0].last_error else None

        failing = await eventually(failed_attempt, "an attempt refused by verification")
        assert "CERTIFICATE_VERIFY_FAILED" in (failing.last_error or "")
        ca_file.write_bytes(internal.ca_file.read_bytes())
        assert gateway.reload().ok

        async def delivered() -> list[tuple[bytes, str | None]]:
            return list(https_target.seen)

        assert await eventually(delivered, "the delivery after the reload") == [(body, None)]
    lines = report(config, datetime.now(UTC))
    assert f"ok: target internal trusts only the CAs in {ca_file}" in lines


async def test_reload_with_an_unreadable_target_ca_file_changes_nothing(
    https_target: HttpsTarget, internal: Internal, pki: Pki, tmp_path: Path
) -> None:
    """The reload fails with the key at fault; the running targets keep their contexts."""
    ca_file = tmp_path / "target-ca.pem"
    ca_file.write_bytes(internal.ca_file.read_bytes())
    path = _write_config(tmp_path, pki, https_target.url, ca_file)
    async with Gateway(load_config(path)) as gateway:
        ca_file.write_bytes(b"not a certificate")
        result = gateway.reload()
        assert not result.ok
        assert result.message == (
            f"reload failed, nothing changed: {path}: targets[0].ca_file = '{ca_file}':"
            " no PEM certificate found"
        )
        body = message_body("still delivered")
        await gateway.core.callback.notify(body, meta_signature(body))

        async def delivered() -> list[tuple[bytes, str | None]]:
            return list(https_target.seen)

        assert await eventually(delivered, "the delivery") == [(body, None)]


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        pytest.param(
            365,
            "ok: target internal gets the client certificate {cert} (key matches;"
            " expires in 364 days)",
            id="a-year",
        ),
        pytest.param(
            10,
            "warning: target internal gets the client certificate {cert} (key"
            " matches; expires in 9 days)",
            id="ten-days",
        ),
        pytest.param(
            -1,
            "warning: target internal gets the client certificate {cert} (key"
            " matches; HAS EXPIRED)",
            id="expired",
        ),
    ],
)
def test_check_reports_when_a_target_client_certificate_expires(
    internal: Internal, pki: Pki, tmp_path: Path, days: int, expected: str
) -> None:
    """check says how long the certificate a target asks for has left, and warns under 30
    days: an expired one fails every delivery to that target."""
    client_ca = trustme.CA()
    now = datetime.now(UTC)
    leaf = client_ca.issue_cert(
        "gateway.internal.example",
        not_before=now - timedelta(days=400),
        not_after=now + timedelta(days=days, hours=-1),
    )
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    extra = f'cert_file = "{cert}"\nkey_file = "{key}"\n'
    path = _write_config(tmp_path, pki, "https://127.0.0.1:1/hook", internal.ca_file, extra)
    assert expected.format(cert=cert) in report(load_config(path), now)
