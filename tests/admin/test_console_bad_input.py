"""Bad input to the console before anyone signs in: a clear 4xx, never a 500 with a traceback
logged at ERROR. A form body aiohttp cannot read (multipart without its boundary, a charset
Python does not know), and a CSRF field or session cookie with a character outside ASCII (which
``hmac.compare_digest`` refuses to compare as str)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from helpers import gateway_config
from pki import Pki

from gateway.runtime.gateway import Gateway

TOKEN = "console-bad-input-token-0123456789abcdef"


async def _raw(port: int, request: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


async def _presession(port: int) -> tuple[str, str]:
    """The sign-in form's cookie and its CSRF token, as a browser gets them."""
    _, head, body = await _raw(
        port, b"GET /console/sign-in HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    cookie = re.search(rb"Set-Cookie: (waba_console_sign_in=[^;]+)", head)
    csrf = re.search(rb'name="csrf" value="([^"]+)"', body)
    assert cookie is not None
    assert csrf is not None
    return cookie.group(1).decode(), csrf.group(1).decode()


def _post(path: str, content_type: str, body: bytes, cookie: str = "") -> bytes:
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


CASES = {
    "multipart without a boundary": ("multipart/form-data", b"token=x"),
    "multipart with a boundary it never finds": ("multipart/form-data; boundary=xyz", b"junk"),
    "an unknown charset": (
        "application/x-www-form-urlencoded; charset=no-such-charset",
        b"csrf=a&token=b",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_sign_in_body_that_does_not_parse_is_a_400(
    pki: Pki, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sign-in form's body that cannot be read is a 400, nothing logged at ERROR, and the
    admin listener goes on serving."""
    content_type, body = CASES[case]
    config = gateway_config(pki, tmp_path, admin_token=TOKEN)
    async with Gateway(config) as gateway:
        status, _, text = await _raw(
            gateway.admin_port, _post("/console/sign-in", content_type, body)
        )
        assert (
            await _raw(
                gateway.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
        )[0] == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 400, f"{case}: {status} {text!r}; logged: {errors}"
    assert b"the form could not be read" in text
    assert errors == []


async def test_a_non_ascii_csrf_token_at_sign_in_is_refused_not_a_500(
    pki: Pki, tmp_path: Path
) -> None:
    """A sign-in form whose CSRF field is not ASCII is an expired form (403)."""
    config = gateway_config(pki, tmp_path, admin_token=TOKEN)
    async with Gateway(config) as gateway:
        cookie, _ = await _presession(gateway.admin_port)
        body = b"csrf=%C3%A9&token=guess&next=/"
        status, _, text = await _raw(
            gateway.admin_port,
            _post("/console/sign-in", "application/x-www-form-urlencoded", body, cookie),
        )
    assert status == 403, f"{status} {text[:80]!r}"


async def test_a_non_ascii_csrf_token_on_a_console_post_is_refused_not_a_500(
    pki: Pki, tmp_path: Path
) -> None:
    """Without a token (loopback), the guard's CSRF check of any console POST refuses a field
    that is not ASCII (403)."""
    config = gateway_config(pki, tmp_path)
    async with Gateway(config) as gateway:
        body = b"csrf=%C3%A9"
        status, _, text = await _raw(
            gateway.admin_port,
            _post("/console/sign-out", "application/x-www-form-urlencoded", body),
        )
    assert status == 403, f"{status} {text[:80]!r}"


async def test_a_session_cookie_with_a_non_ascii_mac_is_no_session_not_a_500(
    pki: Pki, tmp_path: Path
) -> None:
    """A session cookie whose MAC is not ASCII is no session: the sign-in page (401)."""
    config = gateway_config(pki, tmp_path, admin_token=TOKEN)
    async with Gateway(config) as gateway:
        request = (
            "GET /console/deliveries HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Cookie: waba_console=abc.1.\u00e9\r\nConnection: close\r\n\r\n"
        ).encode("utf-8")
        status, _, text = await _raw(gateway.admin_port, request)
    assert status == 401, f"{status} {text[:80]!r}"
