"""The console in a real browser: headless Chromium driven by Playwright. Sign in, find a dead
letter, replay it and see it delivered, replay a target's dead letters after confirming, and be
refused without a session. Each page is photographed; with ``WABA_CONSOLE_SHOTS=1`` the
pictures go to docs/console/ for the README.

Chromium is Debian's package (``.ci/run`` installs it where missing); Playwright is told where it
is rather than downloading a browser of its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ci import unavailable
from helpers import gateway_config, message_body, post, sink_target, wait_for_state
from pki import Pki
from playwright.async_api import Browser, Page, async_playwright, expect
from sink import Reply, Sink

from gateway.config import TargetConfig
from gateway.runtime.gateway import Gateway

# The README's pictures are rewritten only when asked, so that a test run leaves the
# repository's files as it found them.
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
WRITE_SHOTS = os.environ.get("WABA_CONSOLE_SHOTS") == "1"
TOKEN = "browser-test-token"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium. Missing, the test fails in CI and says how to get it elsewhere."""
    if shutil.which(CHROMIUM) is None:
        unavailable(f"no Chromium at {CHROMIUM}: run .ci/run, or apt-get install chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        await launched.close()


async def _shot(page: Page, name: str) -> None:
    if not WRITE_SHOTS:
        await page.screenshot(full_page=True)  # rendered all the same, kept nowhere
        return
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_sign_in_replay_a_dead_letter_and_see_it_delivered(
    pki: Pki, tmp_path: Path, sink: Sink, browser: Browser
) -> None:
    """Signed in with the token, an operator finds the dead letters, replays one and then the
    rest of the target's, and sees them delivered; the pages are photographed on the way."""
    sink.default = Reply(422, body='{"error":"unknown account","code":"E_ACCOUNT"}')
    down = TargetConfig(
        name="analytics", url="http://127.0.0.1:9/", wait_initial_s=60, wait_max_s=120
    )
    config = gateway_config(
        pki, tmp_path, targets=[sink_target(sink, "crm"), down], admin_token=TOKEN
    )
    async with Gateway(config) as gateway:
        for n in range(3):
            assert (await post(gateway, pki, message_body(f"order {n} shipped"))).status == 200
        assert (await post(gateway, pki, message_body("forged"), secret="wrong")).status == 401
        dead = await wait_for_state(gateway, "dead", 3, target="crm")
        base = f"http://127.0.0.1:{gateway.admin_port}"
        context = await browser.new_context(viewport={"width": 1280, "height": 760})
        page = await context.new_page()

        refused = await page.goto(f"{base}/")
        assert refused is not None
        assert refused.status == 401
        await _shot(page, "sign-in")
        await page.fill("input[name=token]", TOKEN)
        await page.click("form.sign-in button")
        await expect(page.locator("h1")).to_have_text("Overview")
        await expect(page.get_by_text("client.webhooks.fbclientcerts.com").first).to_be_visible()
        await _shot(page, "overview")

        await page.goto(f"{base}/console/deliveries?state=dead")
        await expect(page.locator("tbody tr")).to_have_count(3)
        await _shot(page, "deliveries")

        await page.click(f"text={dead[0].id}")
        await expect(page.locator("h1")).to_have_text(f"Delivery {dead[0].id}")
        await expect(page.locator("td code").last).to_contain_text("unknown account")
        sink.default = Reply(200, body='{"ok":true}')
        delivery_url = page.url
        # The replay is a form POST answered with a redirect: let that navigation finish before
        # the page is loaded again (a reload racing it finds no page to reload).
        async with page.expect_navigation():
            await page.click("text=Replay now")
        await wait_for_state(gateway, "delivered", 1, target="crm")
        await page.goto(delivery_url)
        await expect(page.locator("table.facts .state")).to_have_text("delivered")
        await expect(page.locator("table.attempts tbody tr")).to_have_count(2)  # dead, delivered
        await _shot(page, "delivery")

        await page.goto(f"{base}/")
        await page.click("text=Replay all")
        await expect(page.locator("p.warning")).to_contain_text("Replay all 2 dead letters")
        await _shot(page, "replay-dead")
        async with page.expect_navigation():
            await page.click("form.confirm button")
        await wait_for_state(gateway, "delivered", 3, target="crm")
        await page.goto(f"{base}/console/deliveries?target=crm")
        await expect(page.locator("tbody .state.delivered")).to_have_count(3)

        await page.goto(f"{base}/console/certificates")
        await expect(page.locator("tbody tr")).to_have_count(2)  # server and the client CA
        await _shot(page, "certificates")

        stranger = await browser.new_context()
        other = await stranger.new_page()
        answer = await other.goto(f"{base}/console/deliveries")
        assert answer is not None
        assert answer.status == 401
        await expect(other.locator("input[name=token]")).to_be_visible()
        await stranger.close()
        await context.close()
