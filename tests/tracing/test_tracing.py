"""OpenTelemetry traces end to end: a gateway on loopback exports over OTLP/HTTP to a real
receiver (tests/support/otlp.py) that decodes the spans with OpenTelemetry's protobuf definitions.

The exporter sends spans in batches; closing the gateway flushes them, so every check on spans runs
after the gateway has stopped, never against a timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path

import aiohttp
import pytest
from destinations import Destination, wait_for
from helpers import (
    eventually,
    gateway_config,
    locked_by_another_process,
    message_body,
    meta_signature,
    post,
    sink_target,
)
from otlp import CLIENT, INTERNAL, SERVER, Receiver
from pki import Pki
from pytest_aiohttp import AiohttpServer
from sink import Reply, Sink

from gateway import create_app
from gateway.config import META_CLIENT_CN, Config, TracingConfig
from gateway.edge.tls import build_server_context
from gateway.runtime.gateway import Gateway
from gateway.tracing.attributes import (
    client_attributes,
    not_after_iso,
    status_attributes,
)
from gateway.tracing.context import Parent, parse_stored
from gateway.tracing.export import THREAD_NAME

# A traceparent someone other than Meta might send: never the parent of the SERVER span.
FOREIGN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FOREIGN = f"00-{FOREIGN_TRACE}-00f067aa0ba902b7-01"


def traced(config: Config, receiver: Receiver) -> Config:
    tracing = TracingConfig(enabled=True, endpoint=receiver.url, service_name="gw-under-test")
    return dataclasses.replace(config, tracing=tracing)


def _exporter_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == THREAD_NAME]


async def test_post_gives_a_root_server_span_a_commit_child_and_a_client_span_in_its_trace(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """One POST: a SERVER span (root, a foreign traceparent only linked) with the status and
    the client certificate's CN and expiry, the commit as its child, and the attempt's CLIENT
    span in the same trace; the target gets that span's traceparent, the body and Meta's
    signature unchanged."""
    body = message_body("hello")
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[sink_target(sink)]), receiver)
        async with Gateway(config) as gateway:
            assert _exporter_threads()  # the check below (tracing off) can fail
            answer = await post(gateway, pki, body, headers={"traceparent": FOREIGN})
            assert answer.status == 200
            (request,) = await sink.wait_for(1)
            await eventually(lambda: _delivered(gateway), "the delivery's outcome to be recorded")
    (server,) = receiver.of_kind(SERVER)
    (commit,) = receiver.of_kind(INTERNAL)
    (client,) = receiver.of_kind(CLIENT)
    assert server.name == "POST /webhook"
    assert server.parent_id == ""
    assert server.trace_id != FOREIGN_TRACE
    assert server.links == [FOREIGN_TRACE]
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/webhook"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["tls.client.subject"] == f"CN={META_CLIENT_CN}"
    assert server.attributes["tls.client.not_after"].endswith("Z")
    # Meta's server, the TCP peer itself here (no PROXY header): its address and port.
    assert server.attributes["client.address"] == "127.0.0.1"
    assert server.attributes["network.peer.address"] == "127.0.0.1"
    assert server.attributes["client.port"] == server.attributes["network.peer.port"] > 0
    assert server.service == "gw-under-test"
    assert (commit.name, commit.trace_id, commit.parent_id) == (
        "outbox commit",
        server.trace_id,
        server.span_id,
    )
    assert commit.attributes["gateway.deliveries"] == 1
    assert (client.name, client.trace_id, client.parent_id) == (
        "POST",
        server.trace_id,
        server.span_id,
    )
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["gateway.target.name"] == "sink"
    assert client.attributes["gateway.delivery.id"] == request.headers["X-Gateway-Delivery-Id"]
    assert client.attributes["gateway.delivery.outcome"] == "delivered"
    assert "http.request.resend_count" not in client.attributes
    version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", client.trace_id, client.span_id)
    assert int(flags, 16) & 1  # sampled
    assert request.body == body
    assert request.headers["X-Hub-Signature-256"] == meta_signature(body)


async def test_embedded_callback_makes_the_same_server_spans(
    pki: Pki, tmp_path: Path, sink: Sink, aiohttp_server: AiohttpServer
) -> None:
    """create_app in an aiohttp application traces as the listener does: a SERVER span per
    POST with the status it answered (401 for a bad signature), the commit and the attempt."""
    body = message_body("embedded")
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[sink_target(sink)]), receiver)
        server = await aiohttp_server(create_app(config), ssl=build_server_context(config.tls))
        url = f"https://localhost:{server.port}{config.listen.path}"
        async with aiohttp.ClientSession() as session:
            for signature in (meta_signature(body), "sha256=" + "0" * 64):
                async with session.post(
                    url,
                    data=body,
                    headers={"X-Hub-Signature-256": signature},
                    ssl=pki.client_context("meta"),
                ):
                    pass
        await sink.wait_for(1)
        await server.close()  # stops the core: its exporter sends what it holds
    statuses = sorted(s.attributes["http.response.status_code"] for s in receiver.of_kind(SERVER))
    assert statuses == [200, 401]
    (commit,) = receiver.of_kind(INTERNAL)
    (client,) = receiver.of_kind(CLIENT)
    assert client.trace_id == commit.trace_id
    assert all(
        s.attributes["tls.client.subject"] == f"CN={META_CLIENT_CN}"
        and s.attributes["client.address"] == s.attributes["network.peer.address"] == "127.0.0.1"
        for s in receiver.of_kind(SERVER)
    )


async def test_embedded_callback_records_a_request_cancelled_mid_commit_as_the_listener_does(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    aiohttp_server: AiohttpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A POST whose handler is cancelled while the outbox holds its write (another process
    holds the SQLite lock; the client gives up and closes its connection, and aiohttp cancels
    the handler) ends its SERVER span as the gateway's own listener ends a cancelled one: 503
    with an error status, not 500; the commit, its child, failed with CancelledError."""
    # Each span is exported as it ends: the SERVER span reaches the receiver while the lock
    # is still held, so it was ended by the cancellation and not by the commit's outcome.
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    body = message_body("cancelled")
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[sink_target(sink)]), receiver)
        # Longer than the test: the commit waits for the lock, it never gives up on its own.
        outbox = dataclasses.replace(config.outbox, busy_timeout_s=120)
        config = dataclasses.replace(config, outbox=outbox)
        server = await aiohttp_server(create_app(config), ssl=build_server_context(config.tls))
        url = f"https://localhost:{server.port}{config.listen.path}"
        with locked_by_another_process(config.outbox.path):
            async with aiohttp.ClientSession() as session:
                # Ample for the handshake and the request to reach the outbox; the commit
                # cannot end meanwhile, so the client gives up with no answer.
                with pytest.raises(TimeoutError):
                    async with (
                        asyncio.timeout(2),
                        session.post(
                            url,
                            data=body,
                            headers={"X-Hub-Signature-256": meta_signature(body)},
                            ssl=pki.client_context("meta"),
                        ),
                    ):
                        pass

            async def server_span_exported() -> bool:
                return bool(receiver.of_kind(SERVER))

            await eventually(server_span_exported, "the cancelled request's SERVER span")
        await server.close()  # stops the core: its exporter sends the commit's span
    (server_span,) = receiver.of_kind(SERVER)
    assert server_span.attributes["http.response.status_code"] == 503
    assert server_span.attributes["error.type"] == "503"
    assert server_span.status == 2  # ERROR, as from 500 on
    (commit,) = receiver.of_kind(INTERNAL)
    assert (commit.trace_id, commit.parent_id) == (server_span.trace_id, server_span.span_id)
    assert commit.attributes["error.type"] == "CancelledError"
    assert commit.status == 2


async def test_every_target_kind_carries_the_attempts_traceparent_beside_the_body(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """HTTP, a Redis stream entry and a NATS message each carry the traceparent of their
    attempt's CLIENT span (a header, an entry field, a message header); body and signature are
    the ones they get untraced."""
    body = message_body("any kind")
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[destination.target("t")]), receiver)
        async with Gateway(config) as gateway:
            assert (await post(gateway, pki, body)).status == 200
            (received,) = await wait_for(destination, 1, "t")
            await eventually(lambda: _delivered(gateway), "the delivery's outcome")
    (client,) = receiver.of_kind(CLIENT)
    _, trace_id, parent_id, _ = received.headers["traceparent"].split("-")
    assert (trace_id, parent_id) == (client.trace_id, client.span_id)
    assert client.attributes["gateway.delivery.outcome"] == "delivered"
    assert received.body == body
    assert received.headers["X-Hub-Signature-256"] == meta_signature(body)


async def _delivered(gateway: Gateway) -> bool | None:
    counts = await gateway.outbox.counts()
    return True if counts.get("delivered") else None


async def test_attempts_across_a_restart_are_three_client_spans_in_the_one_trace(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A delivery that fails twice, the gateway restarted after the first attempt, gives three
    CLIENT spans in the trace of its POST, resend_count 1 and 2 on the retries."""
    sink.script(Reply(500), Reply(500))
    target = sink_target(sink, retry_schedule_s=(0.3, 0.05))
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[target]), receiver)
        async with Gateway(config) as gateway:
            assert (await post(gateway, pki, message_body("again"))).status == 200
            await eventually(lambda: _attempted(gateway, 1), "the first attempt's outcome")
        async with Gateway(config) as gateway:
            await eventually(lambda: _delivered(gateway), "the delivery after the restart")
    assert len(sink.received) == 3
    (server,) = receiver.of_kind(SERVER)
    clients = sorted(
        receiver.of_kind(CLIENT), key=lambda span: span.attributes["gateway.delivery.attempt"]
    )
    assert [(span.trace_id, span.parent_id) for span in clients] == [
        (server.trace_id, server.span_id)
    ] * 3
    assert [span.attributes.get("http.request.resend_count") for span in clients] == [None, 1, 2]
    assert [span.attributes["gateway.delivery.outcome"] for span in clients] == [
        "retry",
        "retry",
        "delivered",
    ]
    assert [request.headers["traceparent"].split("-")[1] for request in sink.received] == [
        server.trace_id
    ] * 3


async def _attempted(gateway: Gateway, count: int) -> bool | None:
    (delivery,) = await gateway.outbox.query()
    return True if delivery.attempts >= count else None


def _personal_body() -> tuple[bytes, list[str]]:
    """A notification with a marker in every personal field: phone numbers, wa_id, user ids,
    the profile name, the message text."""
    markers = {
        "from": "15550001111",
        "wa_id": "15550002222",
        "user_id": "US.MARKERUSERID",
        "from_user_id": "US.MARKERFROMUSER",
        "name": "MarkerProfileName",
        "text": "MarkerMessageText",
        "display_phone_number": "15550003333",
    }
    payload = json.loads(message_body(markers["text"]))
    value = payload["entry"][0]["changes"][0]["value"]
    value["metadata"]["display_phone_number"] = markers["display_phone_number"]
    value["contacts"] = [
        {
            "profile": {"name": markers["name"]},
            "wa_id": markers["wa_id"],
            "user_id": markers["user_id"],
        }
    ]
    value["messages"][0]["from"] = markers["from"]
    value["messages"][0]["from_user_id"] = markers["from_user_id"]
    return json.dumps(payload, separators=(",", ":")).encode(), list(markers.values())


async def test_personal_markers_and_secrets_appear_in_no_exported_span(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Markers in every personal field of a payload, the app secret and the target's secret
    are nowhere in what the receiver got, though the spans were exported."""
    body, markers = _personal_body()
    target = sink_target(sink, secret="MarkerTargetSecret")
    async with Receiver() as receiver:
        config = traced(gateway_config(pki, tmp_path, targets=[target]), receiver)
        async with Gateway(config) as gateway:
            assert (await post(gateway, pki, body)).status == 200
            await eventually(lambda: _delivered(gateway), "the delivery")
            secrets = [*gateway.config.meta.app_secrets, "MarkerTargetSecret"]
    assert {span.kind for span in receiver.spans} == {SERVER, INTERNAL, CLIENT}
    exported = b"".join(receiver.raw)
    for marker in [*markers, *secrets, meta_signature(body)]:
        assert marker.encode() not in exported, marker


async def test_tracing_off_starts_no_exporter_thread_and_opens_no_connection(
    pki: Pki, tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With [tracing] off (the default), even with OTEL_* variables pointing at a collector,
    the gateway builds no tracer, starts no exporter thread and connects to nothing; the
    target gets no traceparent."""
    async with Receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "should-not-appear")
        before = _exporter_threads()
        config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
        assert not config.tracing.enabled
        async with Gateway(config) as gateway:
            assert gateway.core.callback.tracing is None
            assert (await post(gateway, pki, message_body("quiet"))).status == 200
            (request,) = await sink.wait_for(1)
            assert _exporter_threads() == before
        assert receiver.connections == 0
    assert "traceparent" not in request.headers


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, {"http.response.status_code": 200}),
        (503, None, {"http.response.status_code": 503, "error.type": "503"}),
        (404, None, {"http.response.status_code": 404, "error.type": "404"}),
        (None, "timed out after 5s", {"error.type": "timeout"}),
        (None, None, {"error.type": "no"}),
    ],
)
def test_status_attributes_follow_the_http_conventions(
    status: int | None, error: str | None, expected: dict[str, object]
) -> None:
    """A response's status code, with error.type from 400 on, or the kind of error alone."""
    assert status_attributes(status, error) == expected


@pytest.mark.parametrize(
    ("kind", "url", "server"),
    [
        ("redis", "rediss://:pw@cache.internal:6380/2", ("cache.internal", 6380)),
        ("nats", "nats://u:pw1@a:4222,nats://u:pw2@b:4222", ("a", 4222)),
        ("nats", "nats://u:pw@a:port,nats://b", None),
    ],
)
def test_broker_attempts_name_their_first_server_and_never_a_password(
    kind: str, url: str, server: tuple[str, int] | None
) -> None:
    """A broker attempt names its system and first server; no password, whatever the URL."""
    found = client_attributes(url, "bus", "p-1", 2, kind)
    assert "pw" not in repr(found)
    assert found["http.request.resend_count"] == 1
    if server is None:
        assert "server.address" not in found
    else:
        assert (found["server.address"], found["server.port"]) == server
        assert found["messaging.system"] == kind


@pytest.mark.parametrize(
    ("url", "attempt", "full", "resend"),
    [
        ("http://127.0.0.1:9000/hook", 1, "http://127.0.0.1:9000/hook", None),
        ("https://user:pw@svc.internal/in?token=abc", 3, "https://svc.internal:443/in", 2),
        ("http://[::1]:9000/hook", 1, "http://[::1]:9000/hook", None),
        ("https://[fd00::7]/in", 1, "https://[fd00::7]:443/in", None),
    ],
)
def test_client_attributes_leave_credentials_and_query_out_and_count_resends(
    url: str, attempt: int, full: str, resend: int | None
) -> None:
    """url.full never carries a password or a query, and keeps an IPv6 host in brackets;
    resend_count only on retries."""
    found = client_attributes(url, "t", "p-1", attempt)
    assert found["url.full"] == full
    assert found.get("http.request.resend_count") == resend


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (None, None),
        ("", None),
        ("00-a-b-01", None),
        (FOREIGN, Parent(bytes.fromhex(FOREIGN_TRACE), bytes.fromhex("00f067aa0ba902b7"), 1)),
        (
            f"{FOREIGN}\nk=v",
            Parent(bytes.fromhex(FOREIGN_TRACE), bytes.fromhex("00f067aa0ba902b7"), 1, "k=v"),
        ),
    ],
)
def test_stored_trace_context_gives_its_parent_and_tracestate(
    stored: str | None, expected: Parent | None
) -> None:
    """The stored form gives back the traceparent's context, and tracestate when there was
    one; what is not a traceparent is no parent."""
    assert parse_stored(stored) == expected


def test_certificate_expiry_is_given_in_iso_8601() -> None:
    """notAfter as the ssl module spells it becomes ISO 8601 UTC; nonsense gives nothing."""
    assert not_after_iso("Jun  1 12:00:00 2027 GMT") == "2027-06-01T12:00:00Z"
    assert not_after_iso("soon") is None
