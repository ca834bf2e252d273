"""The two front doors answer alike: the gateway's own listener and ``create_app`` in aiohttp.

Each behavioural case runs against the gateway's TLS listener, against ``create_app(config)``
served by aiohttp over TLS with the gateway's own server context, and against the same app
mounted under a prefix with ``add_subapp``. All three share one outbox fixture shape: the 200
means the notification is in the outbox, and the target receives it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    VERIFY_TOKEN,
    bodies_in_file,
    gateway_config,
    message_body,
    meta_signature,
    sink_target,
)
from multidict import CIMultiDict
from pki import ClientKind, Pki
from pytest_aiohttp import AiohttpClient, AiohttpServer
from sink import Sink

from gateway import create_app
from gateway.config import Config
from gateway.edge.tls import build_server_context
from gateway.outbox import Outbox
from gateway.runtime.app import CORE
from gateway.runtime.gateway import Gateway

MAX_BODY_BYTES = 64 * 1024
DOORS = ("listener", "aiohttp", "aiohttp-subapp")


@dataclass(frozen=True, slots=True)
class Door:
    """A running front door: where its callback is, and the outbox behind it (and its file)."""

    url: str
    outbox: Outbox
    outbox_path: Path


@pytest.fixture(params=DOORS)
async def door(
    request: pytest.FixtureRequest,
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[Door]:
    """One front door on loopback over mTLS, one target on the sink."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin=False)
    config = dataclasses.replace(
        config, listen=dataclasses.replace(config.listen, max_body_bytes=MAX_BODY_BYTES)
    )
    path = config.listen.path
    outbox_path = config.outbox.path
    assert outbox_path is not None
    if request.param == "listener":
        async with Gateway(config) as gateway:
            yield Door(f"https://localhost:{gateway.port}{path}", gateway.outbox, outbox_path)
        return
    embedded = create_app(config)
    app, prefix = embedded, ""
    if request.param == "aiohttp-subapp":
        app, prefix = web.Application(), "/whatsapp"
        app.add_subapp(prefix, embedded)
    server = await aiohttp_server(app, ssl=build_server_context(config.tls))
    url = f"https://localhost:{server.port}{prefix}{path}"
    yield Door(url, embedded[CORE].outbox, outbox_path)


async def _call(
    door: Door,
    pki: Pki,
    method: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    kind: ClientKind = "meta",
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            door.url,
            data=None if body is None else io.BytesIO(body),
            headers=headers,
            params=params,
            ssl=pki.client_context(kind),
        ) as response,
    ):
        return response.status, await response.text()


async def _post(
    door: Door, pki: Pki, body: bytes, *, signature: str | None = None, kind: ClientKind = "meta"
) -> tuple[int, str]:
    """POST ``body`` signed as Meta signs it, or with ``signature``; sent as ``kind``."""
    signed = meta_signature(body) if signature is None else signature
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signed}
    return await _call(door, pki, "POST", body=body, headers=headers, kind=kind)


async def _stored(door: Door) -> int:
    """Notifications in the outbox file, read on a connection of the test's own (not through
    the outbox's write queue), without yielding to the event loop."""
    return len(bodies_in_file(door.outbox_path))


async def test_stores_signed_notification_before_200_and_forwards_it(
    door: Door, pki: Pki, sink: Sink
) -> None:
    """A signed notification is in the outbox when the 200 arrives, then reaches the target."""
    body = message_body("front door")
    assert await _post(door, pki, body) == (200, "ok\n")
    assert await _stored(door) == 1
    (received,) = await sink.wait_for(1)
    assert received.body == body


async def test_acknowledges_a_duplicate_without_storing_it_again(door: Door, pki: Pki) -> None:
    """The same body twice: two 200s, one notification kept."""
    body = message_body("twice")
    assert await _post(door, pki, body) == (200, "ok\n")
    assert await _post(door, pki, body) == (200, "ok (duplicate)\n")
    assert await _stored(door) == 1


async def test_rejects_a_wrong_signature_with_401(door: Door, pki: Pki, sink: Sink) -> None:
    """A signature made with another secret is 401 and nothing is kept or forwarded."""
    body = message_body("forged")
    status, _ = await _post(door, pki, body, signature=meta_signature(body, "not-the-secret"))
    assert status == 401
    assert await _stored(door) == 0
    assert sink.at("/sink") == []


async def test_rejects_a_missing_signature_with_401(door: Door, pki: Pki) -> None:
    """No X-Hub-Signature-256 at all is 401."""
    status, _ = await _call(door, pki, "POST", body=message_body("unsigned"))
    assert status == 401
    assert await _stored(door) == 0


async def test_refuses_a_signature_sent_twice_with_400(door: Door, pki: Pki) -> None:
    """Two X-Hub-Signature-256 headers, a wrong one and then the right one: neither is taken
    (the listener used to take the last, the aiohttp app the first); nothing is kept."""
    body = message_body("twice signed")
    headers = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("X-Hub-Signature-256", meta_signature(body, "not-the-secret")),
            ("X-Hub-Signature-256", meta_signature(body)),
        ]
    )
    status, _ = await _call(door, pki, "POST", body=body, headers=headers)
    assert status == 400
    assert await _stored(door) == 0


async def test_refuses_a_compressed_body_with_415(door: Door, pki: Pki) -> None:
    """A gzip body signed over its uncompressed bytes: Meta signs the bytes it sends, so a body
    with a Content-Encoding is refused, never decompressed and then checked (as aiohttp's
    app used to)."""
    body = message_body("compressed")
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "X-Hub-Signature-256": meta_signature(body),
    }
    status, _ = await _call(door, pki, "POST", body=gzip.compress(body), headers=headers)
    assert status == 415
    assert await _stored(door) == 0


async def test_rejects_signed_invalid_json_with_400(door: Door, pki: Pki) -> None:
    """A correctly signed body that is not JSON is 400, not stored."""
    assert await _post(door, pki, b"{not json") == (400, "body is not valid JSON\n")
    assert await _stored(door) == 0


async def test_rejects_a_client_certificate_with_another_cn_with_403(door: Door, pki: Pki) -> None:
    """A certificate from Meta's CA but with another CN is 403, whatever it sends."""
    status, _ = await _post(door, pki, message_body("wrong cn"), kind="wrong_cn")
    assert status == 403
    status, _ = await _call(door, pki, "GET", kind="wrong_cn", params=_challenge(VERIFY_TOKEN))
    assert status == 403
    assert await _stored(door) == 0


async def test_refuses_a_body_over_max_body_bytes_with_413(door: Door, pki: Pki) -> None:
    """A body over listen.max_body_bytes is 413 and the door keeps serving."""
    big = b'{"pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    status, _ = await _post(door, pki, big)
    assert status == 413
    assert await _post(door, pki, message_body("after")) == (200, "ok\n")


async def test_answers_the_handshake_with_the_challenge(door: Door, pki: Pki) -> None:
    """Meta's GET with the right verify token gets the challenge back, byte for byte."""
    assert await _call(door, pki, "GET", params=_challenge(VERIFY_TOKEN)) == (200, "1158201444")


async def test_refuses_the_handshake_with_a_wrong_verify_token(door: Door, pki: Pki) -> None:
    """A wrong verify token is 403."""
    status, _ = await _call(door, pki, "GET", params=_challenge("wrong-token"))
    assert status == 403


async def test_refuses_other_methods_with_405(door: Door, pki: Pki) -> None:
    """Only GET and POST are served on the callback path, and the 405 says so (Allow)."""
    async with (
        aiohttp.ClientSession() as session,
        session.put(door.url, data=b"{}", ssl=pki.client_context("meta")) as response,
    ):
        assert response.status == 405
        assert response.headers["Allow"] == "GET, POST"


def _challenge(token: str) -> dict[str, str]:
    return {"hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": token}


async def test_embedded_app_without_tls_refuses_with_403(
    pki: Pki, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """Served without the gateway's TLS context there is no client certificate: every request
    is refused, never accepted, while client_auth is required."""
    config: Config = gateway_config(pki, tmp_path, admin=False)
    client = await aiohttp_client(create_app(config))
    body = message_body("plain http")
    response = await client.post(
        config.listen.path, data=body, headers={"X-Hub-Signature-256": meta_signature(body)}
    )
    assert response.status == 403
    assert "client certificate" in await response.text()
