"""The callback end to end: Meta's handshake and notifications over real mTLS, into a real outbox.

Each test runs a :class:`~gateway.runtime.gateway.Gateway` on loopback with the throw-away PKI, a
SQLite outbox under ``tmp_path`` and the sink as its target, and talks to it as Meta would. Every
acceptance is paired with the refusals that prove it, and a refusal is shown to keep nothing:
the outbox stays empty and the next good notification is the only one forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    APP_SECRET,
    REFUSED,
    VERIFY_TOKEN,
    admin_get,
    gateway_config,
    handshake,
    message_body,
    meta_signature,
    post,
    sink_target,
    stored_bodies,
)
from pki import ClientKind, Pki
from sink import Sink

from gateway.config import META_CLIENT_CN, ClientAuth
from gateway.errors import SignatureRejected
from gateway.runtime.gateway import Gateway
from gateway.units import MiB

CHALLENGE = "1158201444-Zq_x.9~"
HANDSHAKE = {"hub.mode": "subscribe", "hub.challenge": CHALLENGE, "hub.verify_token": VERIFY_TOKEN}


@pytest.fixture
async def gateway(pki: Pki, tmp_path: Path, sink: Sink) -> AsyncIterator[Gateway]:
    """The gateway with the defaults: client certificate required, one target on the sink."""
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as running:
        yield running


async def assert_nothing_kept(gateway: Gateway, pki: Pki, sink: Sink) -> None:
    """Nothing is in the outbox, and the next good notification is the only one forwarded."""
    assert await stored_bodies(gateway) == []
    marker = message_body("marker")
    assert (await post(gateway, pki, marker)).status == 200
    received = await sink.wait_for(1)
    assert [request.body for request in received] == [marker]


# -- the verification handshake (GET) ---------------------------------------------------------


async def test_answers_handshake_with_the_challenge_verbatim(gateway: Gateway, pki: Pki) -> None:
    """A subscribe GET with the right token is answered 200 with exactly the challenge."""
    answer = await handshake(gateway, pki, HANDSHAKE)
    assert answer.status == 200
    assert answer.text == CHALLENGE
    assert answer.content_type == "text/plain"


async def test_refuses_handshake_with_wrong_verify_token(gateway: Gateway, pki: Pki) -> None:
    """A wrong verify token gets 403 and never the challenge."""
    answer = await handshake(gateway, pki, HANDSHAKE | {"hub.verify_token": "guess"})
    assert answer.status == 403
    assert CHALLENGE not in answer.text


@pytest.mark.parametrize("missing", ["hub.mode", "hub.challenge", "hub.verify_token"])
async def test_refuses_handshake_missing_a_parameter(
    gateway: Gateway, pki: Pki, missing: str
) -> None:
    """A handshake without one of its three parameters gets 400."""
    params = {name: value for name, value in HANDSHAKE.items() if name != missing}
    answer = await handshake(gateway, pki, params)
    assert answer.status == 400
    assert missing in answer.text


async def test_refuses_handshake_with_mode_other_than_subscribe(gateway: Gateway, pki: Pki) -> None:
    """``hub.mode=unsubscribe`` gets 400, even with the right token."""
    answer = await handshake(gateway, pki, HANDSHAKE | {"hub.mode": "unsubscribe"})
    assert answer.status == 400
    assert CHALLENGE not in answer.text


# -- notifications (POST) and their signature -------------------------------------------------


async def test_stores_signed_notification_before_answering_200(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """Each correctly signed notification is in the outbox file, read on another connection,
    the moment its 200 arrives; also when another connection holds the write lock for a moment
    (the commit waits, so the 200 must wait too)."""
    bodies = [message_body(f"hello {n}") for n in range(5)]
    path = gateway.config.outbox.path
    assert path is not None
    for sent, body in enumerate(bodies, 1):
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as locker:
            if sent % 2 == 0:
                locker.execute("BEGIN IMMEDIATE")  # released 0.3 s later, well in busy_timeout_s
                asyncio.get_running_loop().call_later(0.3, locker.rollback)
            answer = await post(gateway, pki, body)
        assert answer.status == 200
        assert await stored_bodies(gateway) == bodies[:sent]
    received = await sink.wait_for(len(bodies))
    assert sorted(r.body for r in received) == sorted(bodies)


class _Answer:
    """The listener's side of notify_into: what the notification was settled with, and when
    against the loop's turns."""

    def __init__(self, log: list[object]) -> None:
        self.log = log
        self.settled = asyncio.Event()

    def done(self) -> bool:
        return self.settled.is_set()

    def set_result(self, reason: str, /) -> None:
        self.log.append(("answered", reason))
        self.settled.set()

    def set_exception(self, exception: BaseException, /) -> None:
        self.log.append(("failed", type(exception).__name__))
        self.settled.set()


async def test_notify_into_settles_the_answer_once_the_notification_is_stored(
    gateway: Gateway,
) -> None:
    """The listener's ack path: notify_into settles its answer with the reason once the
    notification is in the outbox (settled in the commit's own turn: tests/outbox/test_writer.py);
    a bad signature is raised at once and settles nothing."""
    callback = gateway.core.callback
    log: list[object] = []
    answer = _Answer(log)
    body = message_body("settled at once")
    callback.notify_into(body, meta_signature(body), answer)
    await asyncio.wait_for(answer.settled.wait(), 10)
    assert log == [("answered", "ok")]
    assert await stored_bodies(gateway) == [body]

    refused = _Answer(log)
    with pytest.raises(SignatureRejected):
        callback.notify_into(body, meta_signature(body, "another secret"), refused)
    assert not refused.done()
    assert log == [("answered", "ok")]


async def test_rejects_notification_without_signature(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """No ``X-Hub-Signature-256`` header: 401, nothing stored or forwarded."""
    answer = await post(gateway, pki, message_body("unsigned"), secret=None)
    assert answer.status == 401
    await assert_nothing_kept(gateway, pki, sink)


@pytest.mark.parametrize(
    "signature",
    [
        "sha1=" + hashlib.sha1(b"x").hexdigest(),  # noqa: S324 (a legacy header shape, not a hash use)
        "sha256=",
        "sha256=" + "z" * 64,
        "sha256=" + "0" * 63,
        meta_signature(message_body("malformed")).removeprefix("sha256="),
    ],
    ids=["sha1", "empty", "not-hex", "short", "no-prefix"],
)
async def test_rejects_malformed_signature(
    gateway: Gateway, pki: Pki, sink: Sink, signature: str
) -> None:
    """A signature header that is not ``sha256=<64 hex digits>``: 401, nothing kept."""
    answer = await post(gateway, pki, message_body("malformed"), signature=signature)
    assert answer.status == 401
    await assert_nothing_kept(gateway, pki, sink)


async def test_rejects_signature_for_other_body(gateway: Gateway, pki: Pki, sink: Sink) -> None:
    """A valid signature of another body: 401, nothing kept."""
    signature = meta_signature(message_body("the body that was signed"))
    answer = await post(gateway, pki, message_body("the body sent"), signature=signature)
    assert answer.status == 401
    await assert_nothing_kept(gateway, pki, sink)


async def test_rejects_signature_made_with_another_secret(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """The body signed with a secret the gateway does not hold: 401, nothing kept."""
    answer = await post(gateway, pki, message_body("forged"), secret="not-the-app-secret")
    assert answer.status == 401
    await assert_nothing_kept(gateway, pki, sink)


async def test_accepts_signature_from_any_configured_app_secret(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """During a rotation both secrets sign valid notifications; a third one still does not."""
    config = gateway_config(
        pki, tmp_path, targets=[sink_target(sink)], app_secrets=[APP_SECRET, "rotated-secret"]
    )
    async with Gateway(config) as gateway:
        old, new = message_body("old secret"), message_body("new secret")
        assert (await post(gateway, pki, old, secret=APP_SECRET)).status == 200
        assert (await post(gateway, pki, new, secret="rotated-secret")).status == 200
        third = await post(gateway, pki, message_body("third"), secret="another-secret")
        assert third.status == 401
        assert await stored_bodies(gateway) == [old, new]


async def test_rejects_invalid_json_with_valid_signature(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """A correctly signed body that is not JSON: 400, nothing kept."""
    answer = await post(gateway, pki, b'{"object": "whatsapp_business_account", ')
    assert answer.status == 400
    await assert_nothing_kept(gateway, pki, sink)


async def test_refuses_body_over_max_body_bytes_and_keeps_serving(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A body over ``listen.max_body_bytes`` gets 413; the next notification is served."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], max_body_bytes=2048)
    async with Gateway(config) as gateway:
        large = message_body("x" * 4096)
        assert (await post(gateway, pki, large)).status == 413
        await assert_nothing_kept(gateway, pki, sink)
        assert (await handshake(gateway, pki, HANDSHAKE)).status == 200


async def test_refuses_chunked_body_over_max_body_bytes(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A body sent without ``Content-Length`` is cut off at the limit too: 413; one under the
    limit, sent the same way, is accepted."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], max_body_bytes=2048)
    async with Gateway(config) as gateway:
        large = message_body("x" * 4096)
        assert (await post(gateway, pki, large, chunk_size=512)).status == 413
        assert await stored_bodies(gateway) == []
        small = message_body("small")
        assert (await post(gateway, pki, small, chunk_size=64)).status == 200
        assert await stored_bodies(gateway) == [small]


async def test_accepts_3_mb_notification_and_forwards_it_unchanged(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """Meta's largest payload (3 MB) fits the default limit and reaches the target intact."""
    # Each repetition is 26 bytes once escaped: 'caf\u00e9 / \ud83d\ude2e '.
    body = message_body("caf\u00e9 / \U0001f62e " * (3 * MiB // 24))
    assert 3 * MiB < len(body) < 4 * MiB
    assert (await post(gateway, pki, body)).status == 200
    received = await sink.wait_for(1)
    assert received[0].body == body
    assert received[0].headers["X-Hub-Signature-256"] == meta_signature(body)


async def test_acknowledges_duplicate_body_and_forwards_it_once(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """Meta's retry of an identical body is answered 200 and not forwarded a second time."""
    body = message_body("sent twice")
    first = await post(gateway, pki, body)
    again = await post(gateway, pki, body)
    assert (first.status, again.status) == (200, 200)
    assert "duplicate" in again.text
    # A later notification is forwarded after any copy of the first would have been.
    later = message_body("later")
    assert (await post(gateway, pki, later)).status == 200
    received = await sink.wait_for(2)
    assert [request.body for request in received] == [body, later]
    assert await stored_bodies(gateway) == [body, later]


async def test_forwards_body_that_differs_only_in_escaping(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    """Deduplication is by bytes: ``\\u00e9`` and ``é`` are two notifications, both forwarded."""
    escaped = message_body("caf\u00e9")
    raw = json.dumps(json.loads(escaped), ensure_ascii=False, separators=(",", ":")).encode()
    assert escaped != raw
    assert (await post(gateway, pki, escaped)).status == 200
    assert (await post(gateway, pki, raw)).status == 200
    received = await sink.wait_for(2)
    assert sorted(request.body for request in received) == sorted([escaped, raw])


async def test_answers_503_when_outbox_cannot_store_and_keeps_answering_handshake(
    gateway: Gateway, pki: Pki
) -> None:
    """No 200 for what is not on disk: a closed outbox means 503 (Meta retries), and the
    handshake, which needs no outbox, is still answered."""
    assert (await admin_get(gateway, "/readyz")).status == 200
    await gateway.outbox.close()
    answer = await post(gateway, pki, message_body("nowhere to go"))
    assert answer.status == 503
    assert (await handshake(gateway, pki, HANDSHAKE)).status == 200
    assert (await admin_get(gateway, "/readyz")).status == 503


# -- client certificates (mTLS) ---------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["required", "optional"])
async def test_accepts_meta_chain(
    pki: Pki, tmp_path: Path, sink: Sink, client_auth: ClientAuth
) -> None:
    """Meta's leaf plus intermediate, verified against the root alone, is let in."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], client_auth=client_auth)
    async with Gateway(config) as gateway:
        assert (await handshake(gateway, pki, HANDSHAKE)).status == 200
        body = message_body("from meta")
        assert (await post(gateway, pki, body)).status == 200
        assert await stored_bodies(gateway) == [body]


@pytest.mark.parametrize(
    ("client_auth", "kind"),
    [
        ("required", "impostor"),
        ("required", "leaf_only"),
        ("required", "expired"),
        ("required", "none"),
        ("optional", "impostor"),
        ("optional", "leaf_only"),
        ("optional", "expired"),
    ],
)
async def test_refuses_tls_handshake_without_valid_meta_chain(
    pki: Pki, tmp_path: Path, sink: Sink, client_auth: ClientAuth, kind: ClientKind
) -> None:
    """An untrusted CA, a missing intermediate or an expired leaf never gets past TLS, nor does
    a missing certificate when one is required."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], client_auth=client_auth)
    async with Gateway(config) as gateway:
        with pytest.raises(REFUSED):
            await post(gateway, pki, message_body("refused"), kind=kind)
        await assert_nothing_kept(gateway, pki, sink)


@pytest.mark.parametrize("client_auth", ["required", "optional"])
async def test_rejects_wrong_cn_with_403(
    pki: Pki, tmp_path: Path, sink: Sink, client_auth: ClientAuth
) -> None:
    """A certificate from Meta's own chain with another CN gets 403 and nothing is kept."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], client_auth=client_auth)
    async with Gateway(config) as gateway:
        answer = await post(gateway, pki, message_body("wrong cn"), kind="wrong_cn")
        assert answer.status == 403
        assert "evil.example.com" in answer.text
        assert (await handshake(gateway, pki, HANDSHAKE, kind="wrong_cn")).status == 403
        await assert_nothing_kept(gateway, pki, sink)


async def test_decodes_each_client_certificate_once_however_many_connections_present_it(
    pki: Pki, tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CN check decides from the certificate's bytes: the server decodes Meta's
    certificate once for three connections, and the refused one once; every connection is
    still checked and counted, accepted or refused."""
    reads: list[bool] = []
    getpeercert = ssl.SSLObject.getpeercert

    def counting(self: ssl.SSLObject, binary_form: bool = False) -> Any:
        if self.server_side and not binary_form:
            reads.append(True)
        return getpeercert(self, binary_form)

    monkeypatch.setattr(ssl.SSLObject, "getpeercert", counting)
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    async with Gateway(config) as gateway:
        for number in range(3):
            body = message_body(f"connection {number}")
            assert (await post(gateway, pki, body)).status == 200
        for number in range(2):
            body = message_body(f"refused {number}")
            assert (await post(gateway, pki, body, kind="wrong_cn")).status == 403
        totals = gateway.stats.totals()
    assert len(reads) == 2
    assert totals.clients == {META_CLIENT_CN: 3}
    assert totals.rejected == {"identity": 2}


async def test_accepts_no_certificate_when_optional(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """During the mTLS roll-out, the handshake and notifications without a certificate pass."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], client_auth="optional")
    async with Gateway(config) as gateway:
        assert (await handshake(gateway, pki, HANDSHAKE, kind="none")).status == 200
        body = message_body("no certificate yet")
        assert (await post(gateway, pki, body, kind="none")).status == 200
        received = await sink.wait_for(1)
        assert received[0].body == body


async def test_rejects_unsigned_notification_without_certificate_when_optional(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Optional mTLS does not weaken the signature check."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], client_auth="optional")
    async with Gateway(config) as gateway:
        answer = await post(gateway, pki, message_body("x"), kind="none", secret=None)
        assert answer.status == 401
        await assert_nothing_kept(gateway, pki, sink)
