"""Forwarding end to end: from a 200 to Meta, through the outbox, to real HTTP targets.

Each test runs a :class:`~gateway.runtime.gateway.Gateway` on loopback whose targets are paths on
the sink, posts notifications as Meta would (mTLS, signed), and watches what the sink receives and
what the outbox records. Retries are quick because the targets' waits are tens of milliseconds;
waiting polls with a generous deadline and never asserts that anything is fast.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from consumer import Consumer
from helpers import (
    DATA,
    admin_get,
    admin_post,
    deliveries,
    eventually,
    gateway_config,
    message_body,
    meta_signature,
    metric,
    post,
    sink_target,
    wait_for_state,
)
from pki import Pki
from sink import Hang, Received, Reply, Sink

from gateway.config import META_CLIENT_CN, Signature, Split
from gateway.runtime.gateway import Gateway

PAYLOADS = DATA / "payloads"
SAMPLES = sorted(PAYLOADS.glob("*.json"))
# Every notification sample Meta publishes, byte for byte as Meta publishes them (examples/).
META_SAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
TARGET_SECRET = "target-secret"

# One POST as Meta batches them, escaped as Meta escapes them (\u00e9, \/, surrogate pairs):
# a waba with two `messages` changes for two phone numbers and no entry time, a template
# update from another waba with a time, and a partner account_update whose entry id is a
# business portfolio and whose waba is in value.waba_info.waba_id.
WABA = "102290129340398"
PHONE = "106540352242922"
OTHER_PHONE = "1122334455667"
TEMPLATE_WABA = "5467539754836534"
PORTFOLIO = "2729063490586005"
PARTNER_WABA = "495709166956424"
BATCH = (
    rb'{"object":"whatsapp_business_account","entry":['
    rb'{"id":"102290129340398","changes":['
    rb'{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881",'
    rb'"phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Ren\u00e9e"},'
    rb'"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDUA",'
    rb'"timestamp":"1749416383","type":"text","text":{"body":"\u00bfCaf\u00e9? '
    rb'https:\/\/example.com\/menu \ud83d\ude2e"}}]},"field":"messages"},'
    rb'{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"972123456789",'
    rb'"phone_number_id":"1122334455667"},"statuses":[{"id":"wamid.xyzxyz","status":"delivered",'
    rb'"timestamp":"1689380458","recipient_id":"972987654321"}]},"field":"messages"}]},'
    rb'{"id":"5467539754836534","time":1751247548,"changes":[{"value":{"event":"APPROVED",'
    rb'"message_template_id":1689556908129832,"message_template_name":"order_confirmation",'
    rb'"message_template_language":"en-US","reason":"NONE"},'
    rb'"field":"message_template_status_update"}]},'
    rb'{"id":"2729063490586005","time":1739321024,"changes":[{"value":{"event":"PARTNER_ADDED",'
    rb'"waba_info":{"waba_id":"495709166956424","owner_business_id":"2729063490586005"}},'
    rb'"field":"account_update"}]}]}'
)


def envelope(entry_index: int, change_index: int) -> dict[str, Any]:
    """The minimal envelope ``split = "change"`` should send for one change of :data:`BATCH`."""
    payload = json.loads(BATCH)
    entry = payload["entry"][entry_index]
    minimal: dict[str, Any] = {"id": entry["id"]}
    if "time" in entry:
        minimal["time"] = entry["time"]
    minimal["changes"] = [entry["changes"][change_index]]
    return {"object": payload["object"], "entry": [minimal]}


def gateway_signature(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def attempts_seen(received: list[Received]) -> list[str]:
    return [request.headers["X-Gateway-Attempt"] for request in received]


# -- what each target receives ----------------------------------------------------------------


async def test_forwards_published_samples_byte_identical_with_meta_signature(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``split = "none"`` forwards the exact bytes Meta sent, with Meta's own signature."""
    assert len(SAMPLES) >= 5
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        bodies = [sample.read_bytes() for sample in SAMPLES]
        for body in bodies:
            assert (await post(gateway, pki, body)).status == 200
        received = await sink.wait_for(len(bodies))
    assert sorted(request.body for request in received) == sorted(bodies)
    for request in received:
        assert request.headers["X-Hub-Signature-256"] == meta_signature(request.body)
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Content-Length"] == str(len(request.body))


async def test_forwards_meta_escaped_body_byte_identical(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``\\u00e9``, ``\\/`` and emoji surrogate pairs reach the target exactly as Meta sent them,
    so Meta's signature still verifies there."""
    sample = (PAYLOADS / "messages-text.json").read_bytes()
    escaped = sample.replace(b"Does it come in another color?", rb"Caf\u00e9 \/ \ud83d\ude2e")
    assert escaped != sample
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        assert (await post(gateway, pki, escaped)).status == 200
        (request,) = await sink.wait_for(1)
    assert request.body == escaped
    assert request.headers["X-Hub-Signature-256"] == meta_signature(escaped)
    text = json.loads(request.body)["entry"][0]["changes"][0]["value"]["messages"][0]["text"]
    assert text["body"] == "Caf\u00e9 / \U0001f62e"


async def test_routes_batch_to_targets_whose_filters_match_a_change(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Each target with a change matching all its filters gets the whole batch, once; targets
    matching no change get nothing."""
    targets = [
        sink_target(sink, "everything"),
        sink_target(sink, "one_number", fields=("messages",), phone_number_ids=(PHONE,)),
        sink_target(sink, "templates", fields=("message_template_status_update",)),
        sink_target(sink, "waba", waba_ids=(WABA,)),
        sink_target(sink, "partner", waba_ids=(PARTNER_WABA,)),
        sink_target(sink, "other_waba", waba_ids=("999999999999999",)),
        # Each filter matches some change, but no single change matches both.
        sink_target(sink, "crossed", fields=("messages",), waba_ids=(TEMPLATE_WABA,)),
        sink_target(sink, "other_number", phone_number_ids=("999999999999",)),
    ]
    receiving = ["everything", "one_number", "templates", "waba", "partner"]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        # Routing is decided when the notification is stored, before the 200.
        routed = sorted(delivery.target for delivery in await deliveries(gateway))
        assert routed == sorted(receiving)
        await wait_for_state(gateway, "delivered", len(receiving))
    for name in receiving:
        (request,) = sink.at(f"/{name}")
        assert request.body == BATCH
        assert request.headers["X-Hub-Signature-256"] == meta_signature(BATCH)


async def test_splits_batch_into_one_minimal_envelope_per_matching_change(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``split = "change"`` sends each matching change alone in ``{object, entry: [{id, time?,
    changes: [change]}]}``, keeping ``time`` only where Meta sent one."""
    targets = [
        sink_target(sink, "messages", fields=("messages",), split="change"),
        sink_target(sink, "templates", fields=("message_template_status_update",), split="change"),
        sink_target(sink, "partner", waba_ids=(PARTNER_WABA,), split="change"),
        sink_target(sink, "one_number", phone_number_ids=(OTHER_PHONE,), split="change"),
    ]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        await wait_for_state(gateway, "delivered", 5)

    def documents(name: str) -> list[dict[str, Any]]:
        found = [json.loads(request.body) for request in sink.at(f"/{name}")]
        return sorted(found, key=lambda document: json.dumps(document, sort_keys=True))

    def expected(*envelopes: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(envelopes, key=lambda document: json.dumps(document, sort_keys=True))

    assert documents("messages") == expected(envelope(0, 0), envelope(0, 1))
    assert all("time" not in document["entry"][0] for document in documents("messages"))
    assert documents("templates") == [envelope(1, 0)]
    assert documents("templates")[0]["entry"][0]["time"] == 1751247548
    assert documents("partner") == [envelope(2, 0)]
    assert documents("partner")[0]["entry"][0]["id"] == PORTFOLIO
    assert documents("one_number") == [envelope(0, 1)]
    for request in sink.received:
        # Not the bytes Meta signed, so Meta's signature is not passed on; escaped like Meta's.
        assert "X-Hub-Signature-256" not in request.headers
        assert request.body.isascii()
    (message,) = [r.body for r in sink.at("/messages") if PHONE.encode() in r.body]
    assert rb"Caf\u00e9" in message
    assert rb"\ud83d\ude2e" in message


async def test_signs_forwarded_body_with_target_secret(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """With a target secret, ``X-Gateway-Signature-256`` is HMAC(secret, timestamp "." body)."""
    targets = [
        sink_target(sink, "whole", secret=TARGET_SECRET),
        sink_target(sink, "split", fields=("messages",), split="change", secret=TARGET_SECRET),
    ]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        await sink.wait_for(1, "/whole")
        await sink.wait_for(2, "/split")
    for request in sink.received:
        timestamp = request.headers["X-Gateway-Timestamp"]
        assert timestamp.isdigit()
        expected = gateway_signature(TARGET_SECRET, timestamp, request.body)
        assert request.headers["X-Gateway-Signature-256"] == expected
        assert request.headers["X-Gateway-Signature-256"] != gateway_signature(
            "another-secret", timestamp, request.body
        )


@dataclass(frozen=True, slots=True)
class Signing:
    """What a target configured with ``split``, ``signature`` and ``secret`` must receive:
    ``hub``, whose ``X-Hub-Signature-256`` (Meta's own, the target secret's over the bytes
    sent, or none) and ``gateway``, whether ``X-Gateway-Timestamp`` and its signature come."""

    split: Split
    signature: Signature
    secret: str | None
    hub: Literal["meta", "target"] | None
    gateway: bool


@pytest.mark.parametrize(
    "signing",
    [
        pytest.param(Signing("none", "gateway", None, "meta", False), id="none-gateway"),
        pytest.param(Signing("none", "gateway", TARGET_SECRET, "meta", True), id="none-gw-secret"),
        pytest.param(Signing("change", "gateway", None, None, False), id="change-gateway"),
        pytest.param(
            Signing("change", "gateway", TARGET_SECRET, None, True), id="change-gw-secret"
        ),
        pytest.param(Signing("none", "meta", TARGET_SECRET, "target", False), id="none-meta"),
        pytest.param(Signing("change", "meta", TARGET_SECRET, "target", False), id="change-meta"),
    ],
)
async def test_signs_each_request_in_the_target_signature_style(
    pki: Pki, tmp_path: Path, sink: Sink, signing: Signing
) -> None:
    """Each target's requests carry the signature headers of its style, "meta" or "gateway"."""
    target = sink_target(
        sink, split=signing.split, signature=signing.signature, secret=signing.secret
    )
    async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        await wait_for_state(gateway, "delivered", 1 if signing.split == "none" else 4)
    for request in sink.received:
        hub = request.headers.get("X-Hub-Signature-256")
        if signing.hub == "meta":
            assert request.body == BATCH
            assert hub == meta_signature(BATCH)
        elif signing.hub == "target":
            assert signing.secret is not None
            assert hub == meta_signature(request.body, signing.secret)
            assert hub != meta_signature(request.body)  # never the app secret's
        else:
            assert hub is None
        timestamp = request.headers.get("X-Gateway-Timestamp")
        signature = request.headers.get("X-Gateway-Signature-256")
        if signing.gateway:
            assert signing.secret is not None
            assert timestamp is not None
            assert signature == gateway_signature(signing.secret, timestamp, request.body)
        else:
            assert (timestamp, signature) == (None, None)


def meta_batch(samples: Iterable[Path], *extra: dict[str, Any]) -> bytes:
    """One notification batching ``samples`` as Meta batches: the changes of samples with the
    same entry id and time gathered in one entry, in several entries otherwise, then ``extra``
    entries; compact and escaped as Meta sends it (``\\u00e9``, ``\\/``)."""
    entries: dict[tuple[Any, Any], dict[str, Any]] = {}
    for sample in samples:
        for entry in json.loads(sample.read_bytes())["entry"]:
            key = (entry["id"], entry.get("time"))
            if key not in entries:
                entries[key] = {**entry, "changes": []}
            entries[key]["changes"].extend(entry["changes"])
    document = {"object": "whatsapp_business_account", "entry": [*entries.values(), *extra]}
    text = json.dumps(document, ensure_ascii=True, separators=(",", ":"))
    # "/" only ever occurs inside strings, which Meta writes as "\/".
    return text.replace("/", "\\/").encode()


def all_changes(body: bytes) -> list[str]:
    """Every change of a notification, each as comparable text, in any order."""
    entries = json.loads(body)["entry"]
    return sorted(json.dumps(change) for entry in entries for change in entry["changes"])


# An entry no sample has: integers wider than 64 bits and Meta's escapes, which must reach the
# consumer as the exact values Meta sent.
WIDE_ENTRY: dict[str, Any] = {
    "id": 123456789012345678901234567890,
    "time": 2**65,
    "changes": [
        {
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": "1"},
                "messages": [
                    {
                        "from": "16505551234",
                        "id": "wamid.wide",
                        "timestamp": 36893488147419103232,
                        "n": -98765432109876543210987654321,
                        "type": "text",
                        "text": {"body": "caf\u00e9 \U0001f600 https://example.com/a"},
                    }
                ],
            },
        }
    ],
}


async def test_consumer_reading_only_the_first_change_receives_every_change_of_meta_batches(
    pki: Pki, tmp_path: Path
) -> None:
    """A pywa-style consumer verifies each request and gets every change of Meta's batches."""
    messages = [path for path in META_SAMPLES if path.name.startswith(("messages", "statuses"))]
    others = [path for path in META_SAMPLES if path not in messages]
    batches = [
        meta_batch(messages),
        meta_batch(others),
        meta_batch(META_SAMPLES, WIDE_ENTRY),
    ]
    expected = sorted(change for batch in batches for change in all_changes(batch))
    # Several entries, and entries holding several changes, in every batch.
    for batch in batches:
        entries = json.loads(batch)["entry"]
        assert len(entries) > 1
        assert max(len(entry["changes"]) for entry in entries) > 1
    async with (
        Consumer("consumer-secret") as consumer,
        Consumer("consumer-secret") as messages_only,
        Consumer("another-secret") as wrong,
    ):
        secret = "consumer-secret"
        targets = [
            sink_target(consumer, "all", split="change", signature="meta", secret=secret),
            sink_target(
                messages_only,
                "messages",
                split="change",
                signature="meta",
                secret=secret,
                fields=("messages",),
            ),
            sink_target(wrong, "wrong", split="change", signature="meta", secret=secret),
        ]
        async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
            for batch in batches:
                assert (await post(gateway, pki, batch)).status == 200
            await consumer.wait_for(len(expected))
            await wrong.wait_for(len(expected))
            messages_expected = [c for c in expected if json.loads(c)["field"] == "messages"]
            await messages_only.wait_for(len(messages_expected))
            await wait_for_state(gateway, "dead", len(expected), target="wrong")
    assert consumer.refused == []
    assert sorted(json.dumps(change) for change in consumer.changes) == expected
    assert messages_only.refused == []
    assert sorted(json.dumps(c) for c in messages_only.changes) == messages_expected
    assert len(wrong.refused) == len(wrong.received) == len(expected)
    assert wrong.changes == []
    (message,) = [
        message
        for change in consumer.changes
        for message in change["value"].get("messages", [])
        if message["id"] == "wamid.wide"
    ]
    assert message["timestamp"] == 36893488147419103232
    assert message["n"] == -98765432109876543210987654321
    assert message["text"]["body"] == "caf\u00e9 \U0001f600 https://example.com/a"
    (request,) = [r for r in consumer.received if b"wamid.wide" in r.body]
    assert json.loads(request.body)["entry"][0]["id"] == 123456789012345678901234567890
    assert json.loads(request.body)["entry"][0]["time"] == 2**65
    assert rb"\ud83d\ude00" in request.body
    assert rb"https:\/\/example.com\/a" in request.body


async def test_sends_no_gateway_signature_without_target_secret(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Without a target secret there is no timestamp or gateway signature to trust."""
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        assert (await post(gateway, pki, message_body("unsigned target"))).status == 200
        (request,) = await sink.wait_for(1)
    assert "X-Gateway-Timestamp" not in request.headers
    assert "X-Gateway-Signature-256" not in request.headers


async def test_never_passes_inbound_gateway_headers_to_target(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``X-Gateway-*`` headers on Meta's side of the gateway never reach a target."""
    forged = {
        "X-Gateway-Delivery-Id": "forged-delivery-id",
        "X-Gateway-Attempt": "99",
        "X-Gateway-Timestamp": "1",
        "X-Gateway-Signature-256": "sha256=" + "0" * 64,
    }
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        body = message_body("forged headers")
        assert (await post(gateway, pki, body, headers=forged)).status == 200
        (request,) = await sink.wait_for(1)
        (delivery,) = await deliveries(gateway)
    assert request.headers.getall("X-Gateway-Delivery-Id") == [delivery.id]
    assert request.headers.getall("X-Gateway-Attempt") == ["1"]
    assert "X-Gateway-Timestamp" not in request.headers
    assert "X-Gateway-Signature-256" not in request.headers


# -- retries and dead letters -----------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [Reply(500), Reply(503), Reply(408), Reply(429, {"Retry-After": "0"})],
    ids=["500", "503", "408", "429"],
)
async def test_retries_transient_status_with_same_delivery_id(
    pki: Pki, tmp_path: Path, sink: Sink, reply: Reply
) -> None:
    """A transient status is retried: same ``X-Gateway-Delivery-Id``, attempt 1 then 2."""
    sink.script(reply)
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        body = message_body(f"retried after {reply.status}")
        assert (await post(gateway, pki, body)).status == 200
        (delivered,) = await wait_for_state(gateway, "delivered")
    first, second = sink.received
    assert first.body == second.body == body
    assert first.headers["X-Gateway-Delivery-Id"] == second.headers["X-Gateway-Delivery-Id"]
    assert first.headers["X-Gateway-Delivery-Id"] == delivered.id
    assert attempts_seen(sink.received) == ["1", "2"]
    assert (delivered.attempts, delivered.last_status) == (2, 200)


async def test_waits_as_long_as_retry_after_asks(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """A 429 with ``Retry-After: 1`` is tried again no sooner than a second later, although the
    target's own backoff is at most 0.2 s."""
    sink.script(Reply(429, {"Retry-After": "1"}))
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        assert (await post(gateway, pki, message_body("rate limited"))).status == 200
        (delivered,) = await wait_for_state(gateway, "delivered")
    first, second = sink.received
    assert second.at - first.at >= 0.95
    assert delivered.attempts == 2


async def test_retries_target_slower_than_its_timeout(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """A target that does not answer within ``timeout_s`` is tried again."""
    sink.script(Hang(seconds=10))
    target = sink_target(sink, timeout_s=0.3)
    async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
        assert (await post(gateway, pki, message_body("slow target"))).status == 200
        (delivered,) = await wait_for_state(gateway, "delivered")
    assert attempts_seen(sink.received) == ["1", "2"]
    assert delivered.attempts == 2


async def test_retries_refused_connection_until_target_is_back(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A target that refuses connections is retried, with the error recorded, until it is up."""
    await sink.down()
    target = sink_target(sink, attempts=1000)
    async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
        body = message_body("target down")
        assert (await post(gateway, pki, body)).status == 200

        async def retried() -> bool:
            found = await deliveries(gateway, state="pending")
            return bool(found) and found[0].attempts >= 2

        await eventually(retried, "two refused attempts")
        (pending,) = await deliveries(gateway, state="pending")
        assert pending.last_status is None
        assert pending.last_error is not None
        assert "Connect" in pending.last_error
        await sink.up()
        (delivered,) = await wait_for_state(gateway, "delivered")
    assert [request.body for request in sink.received] == [body]
    assert delivered.attempts > 2


async def test_delivers_everything_after_target_comes_back(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Notifications acknowledged while the target is down all arrive once it is back."""
    await sink.down()
    target = sink_target(sink, attempts=1000)
    async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
        bodies = [message_body(f"while down {index}") for index in range(10)]
        for body in bodies:
            assert (await post(gateway, pki, body)).status == 200

        async def all_tried() -> bool:
            found = await deliveries(gateway, state="pending")
            return len(found) == len(bodies) and all(d.attempts >= 1 for d in found)

        await eventually(all_tried, "every delivery tried once")
        await sink.up()
        await wait_for_state(gateway, "delivered", len(bodies))
        assert await deliveries(gateway, state="pending") == []
        assert await deliveries(gateway, state="dead") == []
    assert sorted(request.body for request in sink.received) == sorted(bodies)


@pytest.mark.parametrize("status", [400, 403, 404, 301])
async def test_dead_letters_permanent_failure_at_once(
    pki: Pki, tmp_path: Path, sink: Sink, status: int
) -> None:
    """A status the target will never change its mind about is dead-lettered after one attempt,
    with the reason and an excerpt of the response kept for the operator."""
    sink.script(Reply(status, {"Location": "/elsewhere"}, "missing field 'entry.changes'"))
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        assert (await post(gateway, pki, message_body(f"refused {status}"))).status == 200
        (dead,) = await wait_for_state(gateway, "dead", target="sink")
    assert dead.attempts == 1
    assert dead.last_status == status
    assert dead.last_error == f"HTTP {status}: not retryable"
    assert dead.last_response is not None
    assert "missing field 'entry.changes'" in dead.last_response
    assert len(sink.received) == 1


async def test_dead_letters_after_attempts_are_exhausted(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A target failing every time gets exactly ``attempts`` tries, then a dead letter."""
    sink.default = Reply(500, body="still broken")
    target = sink_target(sink, attempts=3)
    async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
        assert (await post(gateway, pki, message_body("never accepted"))).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
    assert attempts_seen(sink.received) == ["1", "2", "3"]
    assert dead.attempts == 3
    assert dead.last_error == "HTTP 500: gave up after 3 attempt(s)"
    assert dead.last_response == "still broken"


# -- the admin API ----------------------------------------------------------------------------


async def test_admin_probes_answer_and_metrics_show_client_cn(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``/healthz`` and ``/readyz`` answer 200; ``/metrics`` counts by Meta's client CN."""
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        assert (await admin_get(gateway, "/healthz")).status == 200
        assert (await admin_get(gateway, "/readyz")).text.strip() == "ready"
        before = await admin_get(gateway, "/metrics")
        assert META_CLIENT_CN not in before.text
        assert (await post(gateway, pki, message_body("counted"))).status == 200
        after = await admin_get(gateway, "/metrics")
    assert after.status == 200
    assert f'waba_gateway_client_connections_total{{cn="{META_CLIENT_CN}"}} 1.0' in after.text
    assert "waba_gateway_notifications_accepted_total 1.0" in after.text
    # At least the dispatcher's start-up job and the stored notification were committed.
    commits = metric(after.text, "waba_gateway_outbox_commits_total")
    jobs = metric(after.text, "waba_gateway_outbox_jobs_total")
    assert 1 <= commits <= jobs
    assert jobs >= 2


async def test_lists_deliveries_by_state_and_target_without_bodies(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """``/admin/deliveries?state=dead&target=a`` lists a's dead letters, never a body."""
    sink.default = Reply(400)
    targets = [sink_target(sink, "a"), sink_target(sink, "b")]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        body = message_body("secret message text")
        assert (await post(gateway, pki, body)).status == 200
        await wait_for_state(gateway, "dead", 2)
        listed = await admin_get(gateway, "/admin/deliveries?state=dead&target=a")
        delivered = await admin_get(gateway, "/admin/deliveries?state=delivered")
    assert listed.status == 200
    document = json.loads(listed.text)
    assert [(d["target"], d["state"]) for d in document["deliveries"]] == [("a", "dead")]
    assert document["counts"] == {"pending": 0, "delivered": 0, "dead": 2}
    assert "secret message text" not in listed.text
    assert json.loads(delivered.text)["deliveries"] == []


@pytest.mark.parametrize("query", ["state=lost", "limit=0", "limit=many"])
async def test_refuses_deliveries_query_with_bad_parameter(
    pki: Pki, tmp_path: Path, query: str
) -> None:
    """An unknown state or a limit out of range gets 400."""
    async with Gateway(gateway_config(pki, tmp_path)) as gateway:
        answer = await admin_get(gateway, f"/admin/deliveries?{query}")
    assert answer.status == 400


async def test_replay_delivers_dead_letter_once_target_accepts(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Replaying a dead letter makes it pending with a fresh attempt count; it is delivered
    once the target answers 200."""
    sink.script(Reply(400))
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        body = message_body("replayed")
        assert (await post(gateway, pki, body)).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
        answer = await admin_post(gateway, f"/admin/deliveries/{dead.id}/replay")
        assert answer.status == 200
        assert json.loads(answer.text) == {"replayed": dead.id}
        (delivered,) = await wait_for_state(gateway, "delivered")
    assert delivered.id == dead.id
    assert delivered.attempts == 1
    assert [request.body for request in sink.received] == [body, body]
    assert [r.headers["X-Gateway-Delivery-Id"] for r in sink.received] == [dead.id, dead.id]


async def test_admin_bulk_replay_show_and_purge(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """GET /admin/deliveries/{id} shows one; POST .../replay?state=dead replays every dead
    letter and says how many; POST .../purge?older_than= removes old dead letters."""
    sink.script(Reply(400), Reply(400))
    async with Gateway(gateway_config(pki, tmp_path, targets=[sink_target(sink)])) as gateway:
        for text in ("one", "two"):
            assert (await post(gateway, pki, message_body(text))).status == 200
        dead = await wait_for_state(gateway, "dead", 2)
        shown = await admin_get(gateway, f"/admin/deliveries/{dead[0].id}")
        document = json.loads(shown.text)
        history = document.pop("attempt_history")
        assert document | {"received_at": 0} == dead[0].summary() | {"received_at": 0}
        assert [(a["number"], a["outcome"]) for a in history] == [(1, "dead")]
        assert (await admin_get(gateway, "/admin/deliveries/elsewhere-1")).status == 404
        bulk = "/admin/deliveries/replay?state=dead&target=sink&since=1h"
        assert json.loads((await admin_post(gateway, bulk)).text) == {"replayed": 2}
        await wait_for_state(gateway, "delivered", 2)
        purge = "/admin/deliveries/purge?older_than=0s"
        assert json.loads((await admin_post(gateway, purge)).text) == {"purged": 0}
        assert (await admin_post(gateway, "/admin/deliveries/replay")).status == 400
        assert (await admin_post(gateway, "/admin/deliveries/purge?older_than=x")).status == 400


async def test_replay_of_unknown_delivery_is_404(pki: Pki, tmp_path: Path) -> None:
    """Replaying an id the outbox does not hold gets 404."""
    async with Gateway(gateway_config(pki, tmp_path)) as gateway:
        answer = await admin_post(gateway, "/admin/deliveries/0123456789abcdef/replay")
    assert answer.status == 404


async def test_admin_token_guards_everything_but_the_probes(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """With ``admin.token``: no or a wrong bearer token gets 401, the right one passes, and the
    liveness and readiness probes stay open."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token="s3cret")
    async with Gateway(config) as gateway:
        paths = ["/metrics", "/admin/deliveries"]
        for path in paths:
            assert (await admin_get(gateway, path)).status == 401
            wrong = {"Authorization": "Bearer guess"}
            assert (await admin_get(gateway, path, headers=wrong)).status == 401
            right = {"Authorization": "Bearer s3cret"}
            assert (await admin_get(gateway, path, headers=right)).status == 200
        replay = "/admin/deliveries/0123456789abcdef/replay"
        assert (await admin_post(gateway, replay)).status == 401
        assert (await admin_get(gateway, "/healthz")).status == 200
        assert (await admin_get(gateway, "/readyz")).status == 200


# -- shutdown ---------------------------------------------------------------------------------


async def test_pending_deliveries_survive_restart(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """Deliveries still pending at shutdown stay in the outbox, and the next gateway on the same
    outbox delivers them."""
    await sink.down()
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink, attempts=1000)])
    bodies = [message_body(f"before restart {index}") for index in range(3)]
    async with Gateway(config) as gateway:
        for body in bodies:
            assert (await post(gateway, pki, body)).status == 200
    async with Gateway(config) as restarted:
        # The target is still down: nothing can have left the pending state.
        assert len(await deliveries(restarted, state="pending")) == len(bodies)
        await sink.up()
        await wait_for_state(restarted, "delivered", len(bodies))
    assert sorted(request.body for request in sink.received) == sorted(bodies)
