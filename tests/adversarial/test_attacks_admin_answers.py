"""Message bodies in the console: a target that echoes the notification in its answer must not
put names, numbers or text on the delivery page or in the API's ``last_response``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import post, wait_for_state
from pki import Pki
from sink import Reply, Sink

from adversarial.attack import attack_gateway, still_serves
from gateway.cli import main
from gateway.delivery.answers import EXCERPT_CHARS

NAME = "Zebulon Markerfield"
PHONE = "16505559876"
TEXT = "the parcel code is 4471, do not tell anyone"
ACCENTED = "Grüße aus Köln"
MARKERS = (NAME, PHONE, TEXT, ACCENTED, "Gr\\u00fc\\u00dfe")


def _notification() -> bytes:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "contacts": [{"profile": {"name": NAME}, "wa_id": PHONE}],
        "messages": [
            {"from": PHONE, "id": "wamid.echo1", "timestamp": "1749416383", "type": "text",
             "text": {"body": TEXT}},
            {"from": PHONE, "id": "wamid.echo2", "timestamp": "1749416384", "type": "text",
             "text": {"body": ACCENTED}},
        ],
    }  # fmt: skip
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}],
    }
    # As Meta sends it: non-ASCII escaped (\u00fc), so an echo of the raw bytes has it escaped.
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


async def _shown(base: str, delivery_id: str) -> tuple[dict[str, Any], str]:
    """The API's view of a delivery and the console's page of it."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/admin/deliveries/{delivery_id}") as api:
            found = await api.json()
        async with session.get(f"{base}/console/deliveries/{delivery_id}") as console:
            assert console.status == 200
            return found, await console.text()


@pytest.mark.parametrize(
    ("content_type", "echo"),
    [
        pytest.param("text/html", "<html><pre>{body}</pre></html>", id="the whole body, raw"),
        pytest.param(
            "application/json",
            '{{"error": "bad request", "request": {parsed}}}',
            id="the body parsed and serialised again",
        ),
        pytest.param("text/plain", "no such recipient " + PHONE, id="one phone number"),
        pytest.param("text/plain", "cannot store: " + TEXT[:20], id="the start of the text"),
    ],
)
async def test_an_answer_that_echoes_the_notification_is_kept_as_status_and_type_only(
    pki: Pki, tmp_path: Path, sink: Sink, content_type: str, echo: str
) -> None:
    """The delivery page, the API's last_response and every attempt's response hold no name,
    number or text of the notification: only the status and the content type."""
    body = _notification()
    parsed = json.dumps(json.loads(body), ensure_ascii=False)
    answer = echo.format(body=body.decode(), parsed=parsed)
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        sink.default = Reply(400, headers={"Content-Type": content_type}, body=answer)
        assert (await post(gateway, pki, body)).status == 200
        (dead,) = await wait_for_state(gateway, "dead", 1)
        found, page = await _shown(f"http://127.0.0.1:{gateway.admin_port}", dead.id)
        withheld = f"({content_type}; not kept: it repeats the notification)"
        assert found["last_status"] == 400
        assert found["last_response"] == withheld
        assert [a["response"] for a in found["attempt_history"]] == [withheld]
        for marker in MARKERS:
            assert marker not in json.dumps(found, ensure_ascii=False)
            assert marker not in page
        sink.default = Reply(200)
        await still_serves(gateway, pki, sink, forwarded_before=1)


async def test_an_answer_of_its_own_is_kept_as_a_short_masked_excerpt(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """An error the target wrote itself stays readable, shortened, with what looks like a
    phone number, an e-mail address or a personal field masked."""
    own = json.dumps(
        {
            "error": "unknown account",
            "code": "E_ACCOUNT",
            "support": "+1 650 555 0000",
            "contact": "ops@example.com",
            "name": "someone",
            "detail": "x" * 1000,
        }
    )
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        sink.default = Reply(422, headers={"Content-Type": "application/json"}, body=own)
        assert (await post(gateway, pki, _notification())).status == 200
        (dead,) = await wait_for_state(gateway, "dead", 1)
        found, page = await _shown(f"http://127.0.0.1:{gateway.admin_port}", dead.id)
        kept = found["last_response"]
        assert kept.startswith('{"error": "unknown account", "code": "E_ACCOUNT"')
        assert len(kept) <= EXCERPT_CHARS + 3
        for private in ("650 555 0000", "ops@example.com", "someone"):
            assert private not in kept
            assert private not in page
        assert "unknown account" in page
        sink.default = Reply(200)
        await still_serves(gateway, pki, sink, forwarded_before=1)


async def test_an_answer_stored_whole_before_is_shown_masked(
    pki: Pki, tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row an older version stored with the whole answer is shown masked and bounded by the
    API, the console and `deliveries show`."""
    whole = json.dumps({"error": "bad", "name": NAME, "wa_id": PHONE, "mail": "z@example.com"})
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        sink.default = Reply(422, body="unknown account")
        assert (await post(gateway, pki, _notification())).status == 200
        (dead,) = await wait_for_state(gateway, "dead", 1)
        with sqlite3.connect(gateway.config.outbox.path) as db:
            db.execute("UPDATE deliveries SET last_response = ?", (whole + "x" * 1000,))
            db.execute("UPDATE attempts SET response = ?", (whole,))
        found, page = await _shown(f"http://127.0.0.1:{gateway.admin_port}", dead.id)
        source = gateway.config
    assert found["last_response"].startswith('{"error": "bad", "name": "***", "wa_id": "***"')
    assert len(found["last_response"]) == EXCERPT_CHARS + 3
    assert found["attempt_history"][0]["response"] == (
        '{"error": "bad", "name": "***", "wa_id": "***", "mail": "***"}'
    )
    config = tmp_path / "gateway.toml"
    config.write_text(f'[tls]\ncert_file = "{source.tls.cert_file}"\n'
                      f'key_file = "{source.tls.key_file}"\nclient_auth = "off"\n'
                      '[meta]\nverify_tokens = ["v"]\napp_secrets = ["s"]\n'
                      f'[outbox]\npath = "{source.outbox.path}"\n')  # fmt: skip
    argv = ["deliveries", "show", "--config", str(config), dead.id]
    assert await asyncio.to_thread(main, argv) == 0
    shown = capsys.readouterr().out
    for private in (NAME, PHONE, "z@example.com"):
        assert private not in page
        assert private not in shown
