"""Forged log lines: what a client chooses (a path, a method, a header value) is written into the
text log escaped, on the callback (any TLS client, before authentication, under
``client_auth = "optional"``) and on the admin listener. JSON logs escape by being JSON."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from config_files import free_port, listen_port, write_config
from helpers import eventually
from pki import Pki
from processes import serving, stop
from sink import Sink

FORGED = "2026-01-01 00:00:00,000 CRITICAL gateway: FORGED"


async def _exchange(port: int, request: bytes, context: ssl.SSLContext | None) -> bytes:
    """Send ``request`` on a new connection and read until the gateway closes it."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost" if context else None
    )
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


def _get(path: str, host: str = "localhost") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


async def test_client_chosen_text_cannot_forge_a_text_log_line(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Newlines, carriage returns, terminal escapes and Unicode line separators in paths and
    in a Host header reach the text log as escapes: every line is one the gateway wrote, and a
    request the parser refuses is one line, not a traceback."""
    admin_port = free_port()
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), admin_port=admin_port)
    config.write_text(config.read_text().replace("[tls]\n", '[tls]\nclient_auth = "optional"\n'))
    port = listen_port(config)
    no_certificate = pki.client_context("none")
    with serving(config) as process:

        async def up() -> bool | None:
            try:
                return bool(await _exchange(admin_port, _get("/healthz"), None)) or None
            except OSError:
                return None

        await eventually(up, "the admin listener")
        for encoded in ("%0a", "%0d%0a", "%1b[2J%0d", "%E2%80%A8"):
            forged = encoded + FORGED.replace(" ", "%20")
            answer = await _exchange(port, _get(f"/webhook{forged}"), no_certificate)
            assert answer.startswith(b"HTTP/1.1 404 "), answer
            for admin_path in ("/console/deliveries/x", "/admin/deliveries/x"):
                answer = await _exchange(admin_port, _get(admin_path + forged), None)
                assert answer.startswith(b"HTTP/1.1 404 "), answer
        # A line separator in a header value (control characters the parser refuses itself).
        rebound = _get("/admin/deliveries", host=f"rebound.example\u2028{FORGED}")
        refused = await _exchange(admin_port, rebound, None)
        # A control character the parser refuses: a 400, and one line rather than a traceback.
        malformed = _get("/admin/deliveries", host=f"x\x1b[2J{FORGED}")
        assert (await _exchange(admin_port, malformed, None)).split(b" ", 2)[1] == b"400"
        output = stop(process)
    lines = output.splitlines()
    assert not [line for line in lines if "FORGED" in line and not line[:4].isdigit()]
    assert not [line for line in lines if line.startswith(FORGED)]
    assert "\x1b" not in output
    assert "\u2028" not in output
    # The attempts were logged, escaped, by both listeners.
    assert f"/webhook\\n{FORGED}" in output
    assert f"/console/deliveries/x\\r\\n{FORGED}" in output
    assert f"/admin/deliveries/x\\u2028{FORGED}" in output
    assert f"rebound.example\\u2028{FORGED}" in output
    assert refused.startswith(b"HTTP/1.1 421 ")
    assert "Traceback" not in output
    assert "malformed request from 127.0.0.1 refused: " in output
