"""A target name the outbox cannot hold, given to the admin API or the console, is bad input:
a 400 that says why, on SQLite and PostgreSQL alike, never an outbox outage (503, logged at
ERROR) because PostgreSQL's driver refuses a NUL character in text
(gateway.admin.operations.outbox_text)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import aiohttp
import pytest
from helpers import gateway_config, sink_target
from pki import Pki
from sink import Sink
from yarl import URL

from gateway.admin.operations import outbox_text
from gateway.config import Config, OutboxConfig
from gateway.errors import BadRequest
from gateway.runtime.gateway import Gateway

TOKEN = "bad-query-admin-token-0123456789abcdef"
NUL_REASON = "target must not contain a NUL character"
CSRF = r'name="csrf" value="([^"]+)"'


def _config(
    pki: Pki, tmp_path: Path, sink: Sink, backend: str, request: pytest.FixtureRequest
) -> Config:
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    if backend == "postgres":
        outbox = OutboxConfig(url=request.getfixturevalue("pg_url"))
        config = dataclasses.replace(config, outbox=outbox)
    return config


async def _signed_in(session: aiohttp.ClientSession, base: str) -> str:
    """Sign ``session`` in to the console as a browser does; the session's CSRF token."""
    async with session.get(f"{base}/console/sign-in") as form:
        found = re.search(CSRF, await form.text())
    assert found, "the sign-in form has no CSRF token"
    fields = {"csrf": found[1], "token": TOKEN, "next": "/"}
    async with session.post(f"{base}/console/sign-in", data=fields) as overview:
        # Every page of a signed-in session carries its token, in the sign-out form.
        found = re.search(CSRF, await overview.text())
    assert found, "the overview has no CSRF token"
    return found[1]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/deliveries?target=%00"),
        ("GET", "/admin/deliveries?state=dead&target=sink%00"),
        ("POST", "/admin/deliveries/replay?state=dead&target=%00"),
        ("GET", "/console/deliveries?target=%00"),
        ("GET", "/console/targets/%00/replay-dead"),
        ("POST", "/console/targets/sink%00/replay-dead"),
    ],
)
async def test_a_nul_in_a_target_is_a_400_with_its_reason_on_either_backend(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    backend: str,
    method: str,
    path: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API's filters and the console's (its query and its target pages): 400 naming the
    NUL, nothing logged at ERROR, and the outbox still ready, whichever backend holds it."""
    async with (
        Gateway(_config(pki, tmp_path, sink, backend, request)) as gateway,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        base = f"http://127.0.0.1:{gateway.admin_port}"
        form, headers = None, {"Authorization": f"Bearer {TOKEN}"}
        if path.startswith("/console/"):
            form, headers = {"csrf": await _signed_in(session, base)}, {}
        # encoded: the %00 reaches the server as sent, not escaped a second time.
        url = URL(base + path, encoded=True)
        async with session.request(
            method, url, data=form, headers=headers, allow_redirects=False
        ) as answer:
            status, reason = answer.status, await answer.text()
        async with session.get(f"{base}/readyz") as ready:
            assert ready.status == 200
    assert status == 400, reason
    assert NUL_REASON in reason
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("\x00", NUL_REASON),
        ("sink\x00", NUL_REASON),
        # Not something a URL decodes to (invalid UTF-8 becomes U+FFFD), but no backend could
        # encode it either.
        ("sink\ud800", "target must be text that UTF-8 can encode"),
    ],
)
def test_outbox_text_refuses_a_value_no_outbox_can_hold(value: str, reason: str) -> None:
    """What PostgreSQL's text cannot hold, or neither driver can encode, is BadRequest (400)
    with the parameter's name."""
    with pytest.raises(BadRequest, match=re.escape(reason)):
        outbox_text("target", value)


@pytest.mark.parametrize("value", [None, "", "sink", "café-☕", "a b/c?d", "\ufffd"])
def test_outbox_text_keeps_every_other_value_as_given(value: str | None) -> None:
    """Any other name, absent, empty or not ASCII, is handed to the outbox unchanged."""
    assert outbox_text("target", value) == value
