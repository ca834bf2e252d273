"""Logs a pipeline can read, and that never hold personal data or secrets (gateway.runtime.logs).

The personal-data test feeds notifications with a known marker in every personal field (message
text, phone numbers, wa_id, profile name, business-scoped user ids, username), has targets
answer with the markers, sends refused and malformed requests carrying them, fails a reload over
a file holding a secret, and searches every line logged at DEBUG, in both formats, and the
metrics, for any of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from config_files import free_port, listen_port, write_config
from helpers import (
    APP_SECRET,
    admin_get,
    admin_post,
    eventually,
    gateway_config,
    handshake,
    meta_signature,
    post,
    sink_target,
    wait_for_state,
)
from pki import Pki
from processes import serving, stop
from sink import Reply, Sink

from gateway.runtime.gateway import Gateway
from gateway.runtime.logs import json_formatter

TEXT_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

NAME = "Zebulon Markerfield"
TEXT = "marker-text-7f3a secret plans"
PHONE = "15550009876"  # the user's number and wa_id
BUSINESS_PHONE = "15550004321"  # display_phone_number
SECRETS = ["marker-app-secret-91c2", "marker-verify-token-5d1e", "marker-admin-token-b7a0"]
# Business-scoped user ids and a username: personal data like the phone number.
USER_ID, PARENT_USER_ID, USERNAME = "US.7311markeruser", "US.ENT.7312markerparent", "@markeruser"
MARKERS = [
    NAME,
    "Markerfield",
    TEXT,
    "marker-text-7f3a",
    PHONE,
    BUSINESS_PHONE,
    USER_ID,
    "7311markeruser",
    PARENT_USER_ID,
    USERNAME,
    *SECRETS,
]


def personal_payload(text: str = TEXT) -> bytes:
    """A Meta messages notification with the markers in every personal field."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": BUSINESS_PHONE, "phone_number_id": "106540352242922"},
        "contacts": [
            {
                "profile": {"name": NAME, "username": USERNAME},
                "wa_id": PHONE,
                "user_id": USER_ID,
                "parent_user_id": PARENT_USER_ID,
            }
        ],
        "messages": [
            {
                "from": PHONE,
                "from_user_id": USER_ID,
                "id": "wamid.marker" + str(len(text)),
                "timestamp": "1749416383",
                "type": "text",
                "text": {"body": text},
            }
        ],
    }
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(payload).encode()


def test_json_lines_carry_timestamp_level_logger_event_and_fields() -> None:
    """One JSON object per line; the fields that matter are fields, not words in a sentence."""
    record = logging.LogRecord(
        "gateway.delivery.dispatcher", logging.WARNING, __file__, 1, "dead %s", ("d-1",), None
    )
    for key, value in {
        "delivery_id": "d-1",
        "target": "inbox",
        "attempt": 3,
        "status": 400,
    }.items():
        setattr(record, key, value)
    line = json_formatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "WARNING"
    assert parsed["logger"] == "gateway.delivery.dispatcher"
    assert parsed["event"] == "dead d-1"
    assert parsed["timestamp"].endswith("+00:00")
    assert (parsed["delivery_id"], parsed["target"], parsed["attempt"], parsed["status"]) == (
        "d-1",
        "inbox",
        3,
        400,
    )


async def test_no_personal_data_or_secret_reaches_the_logs(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """Bodies, names, numbers, wa_ids, secrets and tokens appear in no line of either format,
    whatever the request, the targets' answers or the errors."""
    caplog.set_level(logging.DEBUG)
    marker_answer = Reply(status=500, body=f"{NAME} {PHONE} {TEXT}")
    config = gateway_config(
        pki,
        tmp_path,
        targets=[
            sink_target(sink, "whole"),
            sink_target(sink, "split", split="change", secret=SECRETS[0]),
            # Ordered, paced and filtered by content: the paths that read the user ids.
            sink_target(
                sink, "ordered", order="conversation", rate_per_s=100.0, message_types=("text",)
            ),
        ],
        app_secrets=(APP_SECRET, SECRETS[0]),
        admin_token=SECRETS[2],
    )
    config = dataclasses.replace(
        config, meta=dataclasses.replace(config.meta, verify_tokens=(SECRETS[1],))
    )
    auth = {"Authorization": f"Bearer {SECRETS[2]}"}
    async with Gateway(config) as gateway:
        sink.script(marker_answer, Reply(status=400, body=f"bad {NAME} {PHONE}"))
        assert (await post(gateway, pki, personal_payload())).status == 200
        # One target is answered 500, then delivered; the other 400: a dead letter.
        await wait_for_state(gateway, "dead")
        await wait_for_state(gateway, "delivered")
        assert (await post(gateway, pki, personal_payload(), secret="wrong")).status == 401
        broken = personal_payload()[:-3] + b"}{"
        assert (await post(gateway, pki, broken)).status == 400
        assert (await post(gateway, pki, personal_payload(TEXT + " 2"), secret=SECRETS[0])).status
        params = {"hub.mode": "subscribe", "hub.challenge": "1", "hub.verify_token": SECRETS[0]}
        assert (await handshake(gateway, pki, params)).status == 403
        assert (await admin_get(gateway, "/admin/deliveries", headers=auth)).status == 200
        metrics = await admin_get(gateway, "/metrics", headers=auth)
        assert metrics.status == 200
        assert [marker for marker in MARKERS if marker in metrics.text] == []
        # A failed reload: a file whose misspelt key holds a secret.
        source = tmp_path / "gateway.toml"
        source.write_text(f'[meta]\napp_secrets = ["{SECRETS[0]}"]\nsecret = "{SECRETS[0]}"\n')
        gateway.config = dataclasses.replace(gateway.config, source=source)
        assert (await admin_post(gateway, "/admin/reload", headers=auth)).status == 422

    lines = []
    for record in caplog.records:
        lines.append(TEXT_FORMAT.format(record))
        lines.append(json_formatter().format(record))
    assert len(lines) > 20
    assert any("reload failed" in line for line in lines)
    leaks = [(marker, line) for line in lines for marker in MARKERS if marker in line]
    assert leaks == []


async def test_a_malformed_admin_request_is_logged_without_the_token_it_carried(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """aiohttp repeats the line it refused: an Authorization header whose token ends in a CR
    (read from a file with Windows line endings) or a control character is answered 400 and
    logged by `serve` as the parser's reason alone, the token nowhere in its output."""
    token = SECRETS[2] + "-of-at-least-32-characters"
    admin_port = free_port()
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), admin_port=admin_port)
    config.write_text(config.read_text().replace("[admin]\n", f'[admin]\ntoken = "{token}"\n'))
    with serving(config) as process:

        async def refused(ending: bytes) -> bytes | None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            except OSError:
                return None  # not listening yet
            writer.write(
                b"GET /admin/deliveries HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + token.encode() + ending + b"\r\n\r\n"
            )
            answer = await reader.read()
            writer.close()
            return answer

        for ending in (b"\r", b"\x01"):
            answer = await eventually(functools.partial(refused, ending), "the admin listener")
            assert answer.startswith(b"HTTP/1.0 400 "), answer
        output = stop(process)
    assert (
        "malformed request from 127.0.0.1 refused: Missing expected LF after header value\n"
        in output
    )
    assert "malformed request from 127.0.0.1 refused: Invalid header value char\n" in output
    assert token not in output


async def test_serve_with_json_format_writes_one_object_per_line(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A real `serve` process: every line it writes parses as JSON with the four keys; the
    access log line has its fields."""
    config = write_config(
        pki, tmp_path, target_url=sink.url("/sink"), extra='\n[log]\nformat = "json"\n'
    )
    port = listen_port(config)
    with serving(config) as process:

        async def answered() -> bool:
            body = personal_payload()
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(
                        f"https://localhost:{port}/webhook",
                        data=body,
                        headers={"X-Hub-Signature-256": meta_signature(body)},
                        ssl=pki.client_context("meta"),
                    ) as response,
                ):
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(answered, "an answered POST")
        await sink.wait_for(1, "/sink")
        output = stop(process)
    records = [json.loads(line) for line in output.splitlines()]
    assert all({"timestamp", "level", "logger", "event"} <= record.keys() for record in records)
    (access,) = [r for r in records if r["logger"] == "gateway.access" and r["status"] == 200]
    assert access["method"] == "POST"
    assert access["client_cn"] == "client.webhooks.fbclientcerts.com"
    assert access["remote"] == "127.0.0.1"
    assert isinstance(access["duration_ms"], float)
    assert not any(marker in output for marker in MARKERS)
