"""The admin listener's browser attacks in a real browser: headless Chromium (Debian's, as in
tests/admin/test_console_browser.py) on the operator's machine, with a page of another site open.

The other site is ``evil.test``, which Chromium resolves to 127.0.0.1 (``--host-resolver-rules``):
its page is served by a server of its own on loopback, and it can also name the admin listener's
port, as a DNS-rebinding page does once its name points at 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from helpers import admin_get, message_body, post, wait_for_state
from pki import Pki
from playwright.async_api import Browser, async_playwright
from sink import Reply, Sink

from adversarial.attack import attack_gateway, still_serves

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
EVIL = "evil.test"
TOKEN = "browser-attack-token-0123456789abcdef"
ATTACKER_PAGE = "<!doctype html><title>cat pictures</title><p>Nothing to see here."


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium resolving evil.test to loopback. Missing, the test fails in CI and
    says how to get it elsewhere."""
    if shutil.which(CHROMIUM) is None:
        message = f"no Chromium at {CHROMIUM}: run .ci/run, or apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=[f"--host-resolver-rules=MAP {EVIL} 127.0.0.1"]
        )
        yield launched
        await launched.close()


@asynccontextmanager
async def attacker_site() -> AsyncIterator[tuple[str, list[str]]]:
    """The other site's server: its base URL, and the paths browsers asked it for."""
    asked: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        return web.Response(text=ATTACKER_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{EVIL}:{port}", asked
    finally:
        await runner.cleanup()


async def test_a_page_of_another_site_cannot_purge_replay_or_reload(
    pki: Pki, tmp_path: Path, sink: Sink, browser: Browser
) -> None:
    """Without admin.token (loopback, `serve --dev`), a page open in the operator's browser
    POSTs to the JSON API; each POST is refused and the dead letter stays, unreplayed."""
    async with attack_gateway(pki, tmp_path, sink) as gateway, attacker_site() as (evil, _):
        sink.default = Reply(422, body="unknown account")
        assert (await post(gateway, pki, message_body("dead on arrival"))).status == 200
        (dead,) = await wait_for_state(gateway, "dead", 1)
        sink.default = Reply(200)
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{evil}/cats")
        for path in (
            "/admin/deliveries/purge?older_than=0s",
            "/admin/deliveries/replay?state=dead",
            f"/admin/deliveries/{dead.id}/replay",
            "/admin/reload",
        ):
            # What a hostile page can do without reading the answer: a "simple" request.
            sent = await page.evaluate(
                "url => fetch(url, {method: 'POST', mode: 'no-cors'}).then(() => 'sent')",
                admin + path,
            )
            assert sent == "sent"
        assert [d.id for d in await wait_for_state(gateway, "dead", 1)] == [dead.id]
        # No reload was tried, successful or not (both series are there from the start, at 0).
        metrics = (await admin_get(gateway, "/metrics")).text
        for outcome in ("success", "failure"):
            assert f'waba_gateway_reloads_total{{outcome="{outcome}"}} 0.0' in metrics
        await still_serves(gateway, pki, sink, forwarded_before=1)


async def test_a_rebinding_page_reads_no_console(
    pki: Pki, tmp_path: Path, sink: Sink, browser: Browser
) -> None:
    """A page whose name now resolves to 127.0.0.1 loads the console by that name: refused
    (421), no page, no CSRF token to read."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        page = await (await browser.new_context()).new_page()
        for path in ("/", "/console/deliveries", "/admin/deliveries"):
            answer = await page.goto(f"http://{EVIL}:{gateway.admin_port}{path}")
            assert answer is not None
            assert answer.status == 421, path
            assert "csrf" not in await page.content()
        await still_serves(gateway, pki, sink)


@pytest.mark.parametrize("trick", ["/\t/", "/\n/", "/\\"], ids=["tab", "newline", "backslash"])
async def test_a_crafted_sign_in_link_keeps_the_operator_on_the_console(
    pki: Pki, tmp_path: Path, sink: Sink, browser: Browser, trick: str
) -> None:
    """The operator follows a crafted sign-in link and types the token: the browser lands on
    the console, never on the other site the link's `next` names."""
    async with (
        attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway,
        attacker_site() as (evil, asked),
    ):
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        crafted = trick + evil.removeprefix("http://") + "/after-sign-in"
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{admin}/console/sign-in?next={quote(crafted)}")
        await page.fill("input[name=token]", TOKEN)
        async with page.expect_navigation():
            await page.click("form.sign-in button")
        assert page.url == f"{admin}/"
        assert await page.locator("h1").text_content() == "Overview"
        assert asked == []
        await still_serves(gateway, pki, sink)
