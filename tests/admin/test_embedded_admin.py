"""``create_app(config, admin=True)``: metrics, the admin API and the console when the gateway
runs inside someone else's aiohttp application (gateway.runtime.app).

The application is served over real mTLS as the README shows (the callback mounted under a
prefix); the admin listener comes up on its own loopback port, never on the public one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import gateway_config, message_body, meta_signature, metric, sink_target
from pki import Pki
from pytest_aiohttp import AiohttpServer
from sink import Sink

from gateway import create_app
from gateway.config import Config, ListenConfig, OutboxConfig
from gateway.edge.tls import build_server_context
from gateway.errors import ConfigError, PortInUse
from gateway.runtime.app import ADMIN_PORT
from gateway.runtime.gateway import Gateway

TOKEN = "embedded-admin-token"


@dataclass(frozen=True, slots=True)
class Embedded:
    callback_url: str
    admin_url: str


@pytest.fixture
async def embedded(pki: Pki, tmp_path: Path, sink: Sink, aiohttp_server: AiohttpServer) -> Embedded:
    """The README's embedding: the callback under a prefix, the admin listener beside it
    (aiohttp_server stops the application at the end of the test)."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    return await _embed(config, aiohttp_server)


async def _embed(config: Config, aiohttp_server: AiohttpServer) -> Embedded:
    """``config``'s gateway as the README embeds it, the callback mounted under a prefix."""
    gateway_app = create_app(config, admin=True)
    app = web.Application()
    app.add_subapp("/whatsapp", gateway_app)
    server = await aiohttp_server(app, ssl=build_server_context(config.tls))
    return Embedded(
        f"https://localhost:{server.port}/whatsapp{config.listen.path}",
        f"http://127.0.0.1:{gateway_app[ADMIN_PORT]}",
    )


async def _notify(embedded: Embedded, pki: Pki) -> int:
    body = message_body("embedded")
    headers = {"X-Hub-Signature-256": meta_signature(body), "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            embedded.callback_url,
            data=io.BytesIO(body),
            headers=headers,
            ssl=pki.client_context("meta"),
        ) as response,
    ):
        return response.status


async def _get(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, await response.text()


async def test_embedded_metrics_count_what_the_callback_did(embedded: Embedded, pki: Pki) -> None:
    """/metrics on the admin listener counts the embedded callback's notifications and client
    certificates, shows the certificates' expiry, and wants the admin token like serve's."""
    assert await _notify(embedded, pki) == 200
    status, text = await _get(f"{embedded.admin_url}/metrics")
    assert status == 200
    assert metric(text, "waba_gateway_notifications_accepted_total") == 1
    assert (
        metric(
            text, 'waba_gateway_client_connections_total{cn="client.webhooks.fbclientcerts.com"}'
        )
        == 1
    )
    # What is read at scrape time, from the embedded core and its files.
    assert metric(text, "waba_gateway_server_certificate_expiry_timestamp_seconds") > 0
    assert (await _get(f"{embedded.admin_url}/metrics", token=None))[0] == 401


def _series(text: str) -> set[str]:
    """The series of a /metrics text: each sample's name with its labels, without its value."""
    return {line.rpartition(" ")[0] for line in text.splitlines() if not line.startswith("#")}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_embedded_metrics_have_every_series_serve_has_before_any_notification(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    aiohttp_server: AiohttpServer,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """The README's promise: the embedded /metrics are serve's series. For one configuration,
    before any notification, serve shows each configured target's backlog gauges at 0, an
    ordered target's held-back conversations, a rate-limited target's gauge and the outbox's
    size as its backend measures it; the embedded admin listener shows every one of them."""
    targets = [
        sink_target(sink),
        sink_target(sink, "ordered", order="conversation"),
        sink_target(sink, "paced", rate_per_s=5.0),
    ]

    def config_in(folder: Path) -> Config:
        folder.mkdir()
        config = gateway_config(pki, folder, targets=targets, admin_token=TOKEN)
        if backend == "postgres":  # one database, used by one gateway after the other
            outbox = OutboxConfig(url=request.getfixturevalue("pg_url"))
            config = dataclasses.replace(config, outbox=outbox)
        return config

    async with Gateway(config_in(tmp_path / "serve")) as gateway:
        status, served = await _get(f"http://127.0.0.1:{gateway.admin_port}/metrics")
        assert status == 200
    embedded = await _embed(config_in(tmp_path / "embedded"), aiohttp_server)
    status, shown = await _get(f"{embedded.admin_url}/metrics")
    assert status == 200
    size = "outbox_rows" if backend == "postgres" else "outbox_size_bytes"
    wanted = {
        f"waba_gateway_{series}"
        for series in (
            'target_pending_deliveries{target="sink"}',
            'target_oldest_pending_age_seconds{target="paced"}',
            'target_dead_letters{target="ordered"}',
            'target_conversations_held_back{target="ordered"}',
            'target_rate_limited{target="paced"}',
            size,
        )
    }
    assert sorted(wanted - _series(served)) == []
    assert sorted(wanted - _series(shown)) == []
    assert sorted(_series(served) - _series(shown)) == []


async def test_embedded_console_and_api_show_the_embedded_outbox(
    embedded: Embedded, pki: Pki
) -> None:
    """Signed in with the admin token, the console's overview shows the embedded callback's
    client and where it came from; the deliveries API lists what it stored; a reload is
    refused in one line, nothing changed."""
    assert await _notify(embedded, pki) == 200
    base = embedded.admin_url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(f"{base}/console/sign-in") as form:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())
        assert csrf is not None
        async with session.post(
            f"{base}/console/sign-in",
            data={"csrf": csrf[1], "token": TOKEN, "next": "/"},
            allow_redirects=False,
        ) as signed_in:
            assert signed_in.status == 303
        async with session.get(f"{base}/") as overview:
            assert overview.status == 200
            page = await overview.text()
    assert "<code>client.webhooks.fbclientcerts.com</code> from 127.0.0.1 at" in page
    status, listing = await _get(f"{base}/admin/deliveries")
    assert status == 200
    assert [d["target"] for d in json.loads(listing)["deliveries"]] == ["sink"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response,
    ):
        assert response.status >= 400
        assert "restart the application" in await response.text()


async def test_embedded_admin_listener_on_a_taken_port_stops_the_start(
    pki: Pki, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    """The admin port in use: the application does not start, and the error names the key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = gateway_config(pki, tmp_path)
        admin = dataclasses.replace(config.admin, port=taken.getsockname()[1])
        app = create_app(dataclasses.replace(config, admin=admin), admin=True)
        with pytest.raises(PortInUse, match=r"admin\.port"):
            await aiohttp_server(app)


def test_embedded_app_refuses_proxy_protocol(pki: Pki, tmp_path: Path) -> None:
    """aiohttp's server cannot read a PROXY header before TLS: said at once, not as failed
    handshakes later."""
    config = gateway_config(pki, tmp_path)
    config = dataclasses.replace(config, listen=ListenConfig(proxy_protocol=True))
    with pytest.raises(ConfigError, match=r"listen\.proxy_protocol = true: expected false"):
        create_app(config)


async def test_embedded_app_without_admin_opens_no_admin_listener(
    pki: Pki, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    """By default create_app serves the callback alone, as before."""
    app = create_app(gateway_config(pki, tmp_path))
    await aiohttp_server(app, ssl=build_server_context(gateway_config(pki, tmp_path).tls))
    assert ADMIN_PORT not in app
