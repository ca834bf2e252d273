"""The admin web console over real HTTP: guard, sessions, CSRF, headers, replay, and what the
pages never show (gateway.admin.console)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from config_files import free_port
from conversations import Conversations, conversation_body, ordered_bot
from helpers import gateway_config, message_body, post, sink_target, wait_for_state
from pki import Pki
from sink import Reply, Sink

from gateway.admin.console.session import SESSION_COOKIE
from gateway.config import TargetConfig, load_config
from gateway.runtime.gateway import Gateway

TOKEN = "console-test-token"
# In message_body: the sender's phone number, the display number, and the text itself.
PRIVATE = ("16505551234", "15550783881", "a very private message")


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no CSRF token"
    return found.group(1)


def _browser(cookies: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A client that keeps cookies of 127.0.0.1 as a browser does (aiohttp's jar refuses
    cookies of IP addresses unless told otherwise)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), cookies=cookies)


def _base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.admin_port}"


async def _sign_in(session: aiohttp.ClientSession, base: str, token: str) -> aiohttp.ClientResponse:
    async with session.get(f"{base}/console/sign-in") as form:
        csrf = _csrf(await form.text())
    return await session.post(
        f"{base}/console/sign-in",
        data={"csrf": csrf, "token": token, "next": "/"},
        allow_redirects=False,
    )


async def test_console_pages_carry_security_headers_and_no_script(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Every page forbids scripts, framing and caching, and holds no <script> of its own."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    async with Gateway(config) as gateway, _browser() as session:
        for path in ("/", "/console/deliveries", "/console/certificates"):
            async with session.get(_base(gateway) + path) as page:
                assert page.status == 200, path
                csp = page.headers["Content-Security-Policy"]
                assert "script-src 'none'" in csp
                assert "frame-ancestors 'none'" in csp
                assert page.headers["X-Frame-Options"] == "DENY"
                assert page.headers["Cache-Control"] == "no-store"
                assert "<script" not in await page.text()
        async with session.get(_base(gateway) + "/console/static/console.css") as css:
            assert css.content_type == "text/css"


async def test_with_a_token_a_page_without_session_is_refused_with_the_sign_in_form(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """No session: 401 and the sign-in form; a wrong token: 401 again and no cookie; the
    right token: a HttpOnly, SameSite=Strict session cookie that opens the pages."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    async with Gateway(config) as gateway, _browser() as session:
        base = _base(gateway)
        async with session.get(f"{base}/console/deliveries") as refused:
            assert refused.status == 401
            assert 'name="token"' in await refused.text()
        wrong = await _sign_in(session, base, "not-the-token")
        assert wrong.status == 401
        assert SESSION_COOKIE not in wrong.cookies
        right = await _sign_in(session, base, TOKEN)
        assert right.status == 303
        cookie = right.cookies[SESSION_COOKIE]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        async with session.get(f"{base}/console/deliveries") as page:
            assert page.status == 200
        # The bearer-token JSON API is unchanged, and a session does not open it.
        async with session.get(f"{base}/admin/deliveries") as api:
            assert api.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{base}/admin/deliveries", headers=headers) as api:
            assert api.status == 200


async def test_sign_out_ends_the_session_even_if_its_cookie_comes_back(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """After signing out, the old cookie value is refused."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    async with Gateway(config) as gateway, _browser() as session:
        base = _base(gateway)
        value = (await _sign_in(session, base, TOKEN)).cookies[SESSION_COOKIE].value
        async with session.get(f"{base}/") as page:
            csrf = _csrf(await page.text())
        out = await session.post(
            f"{base}/console/sign-out", data={"csrf": csrf}, allow_redirects=False
        )
        assert out.status == 303
        async with _browser({SESSION_COOKIE: value}) as replayed, replayed.get(f"{base}/") as page:
            assert page.status == 401


async def test_replay_needs_the_csrf_token_and_then_delivers_the_dead_letter(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A POST without the session's CSRF token is refused (403) and changes nothing; with it,
    the dead letter is replayed and delivered, and its page lists both attempts."""
    sink.default = Reply(400, body="no such route")
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    async with Gateway(config) as gateway, _browser() as session:
        assert (await post(gateway, pki, message_body("a very private message"))).status == 200
        [dead] = await wait_for_state(gateway, "dead")
        base = _base(gateway)
        await _sign_in(session, base, TOKEN)
        replay = f"{base}/console/deliveries/{dead.id}/replay"
        forged = await session.post(replay, data={"csrf": "guess"}, allow_redirects=False)
        assert forged.status == 403
        still = await gateway.outbox.get(dead.id)
        assert still is not None
        assert still.state == "dead"
        async with session.get(f"{base}/console/deliveries/{dead.id}") as page:
            text = await page.text()
            assert "no such route" in text  # the target's answer excerpt
        sink.default = Reply(200)
        done = await session.post(replay, data={"csrf": _csrf(text)}, allow_redirects=False)
        assert done.status == 303
        await wait_for_state(gateway, "delivered")
        async with session.get(f"{base}/console/deliveries/{dead.id}") as page:
            text = await page.text()
        assert text.count("<tr><td>1</td>") == 2  # attempt 1 before and after the replay


async def test_replay_all_dead_letters_of_a_target_asks_first(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """The overview links to a confirmation page (a GET changes nothing); its form replays
    every dead letter of that target."""
    sink.default = Reply(400)
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    async with Gateway(config) as gateway, _browser() as session:
        for n in range(3):
            assert (await post(gateway, pki, message_body(f"m{n}"))).status == 200
        await wait_for_state(gateway, "dead", 3)
        base = _base(gateway)
        async with session.get(f"{base}/console/targets/sink/replay-dead") as page:
            text = await page.text()
        assert "Replay all <strong>3</strong> dead letters" in text
        assert len(await gateway.outbox.query(state="dead")) == 3
        sink.default = Reply(200)
        done = await session.post(
            f"{base}/console/targets/sink/replay-dead",
            data={"csrf": _csrf(text)},
            allow_redirects=False,
        )
        assert done.status == 303
        await wait_for_state(gateway, "delivered", 3)


async def test_pages_show_ids_fields_and_sizes_never_text_names_or_numbers(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """The overview, the list and the delivery page show the WABA id, the field and the size,
    and none of the phone numbers or the message text in the body."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    body = message_body("a very private message")
    async with Gateway(config) as gateway, _browser() as session:
        assert (await post(gateway, pki, body)).status == 200
        [done] = await wait_for_state(gateway, "delivered")
        base = _base(gateway)
        seen = ""
        for path in ("/", "/console/deliveries", f"/console/deliveries/{done.id}"):
            async with session.get(base + path) as page:
                seen += await page.text()
        assert "102290129340398" in seen  # the WABA id
        assert "messages" in seen  # the field
        assert f"{len(body)} bytes" in seen
        for private in PRIVATE:
            assert private not in seen


@pytest.mark.parametrize("path", ["/", "/console/deliveries", "/console/deliveries/x-1"])
async def test_console_refuses_a_csrf_less_post_and_unknown_ids(
    pki: Pki, tmp_path: Path, sink: Sink, path: str
) -> None:
    """Without a token the console opens on loopback, but a POST without the CSRF token is
    still refused, and an unknown delivery is a 404."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    async with Gateway(config) as gateway, _browser() as session:
        base = _base(gateway)
        async with session.post(f"{base}/console/deliveries/x-1/replay") as forged:
            assert forged.status == 403
        async with session.get(base + path) as page:
            assert page.status == (404 if path.endswith("x-1") else 200)


async def test_a_session_does_not_leak_to_the_next_request_on_the_same_connection(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """On one keep-alive connection, a request without the cookie after a signed-in one gets
    the sign-in form, with no navigation and no CSRF token of the other session."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    async with Gateway(config) as gateway, _browser() as session:
        base = _base(gateway)
        await _sign_in(session, base, TOKEN)
        async with session.get(f"{base}/") as page:
            assert page.status == 200
        session.cookie_jar.clear()
        async with session.get(f"{base}/") as page:
            text = await page.text()
            assert page.status == 401
        assert "Sign out" not in text
        assert "/console/deliveries" not in text


async def test_a_reload_that_rotates_the_token_ends_old_sessions(pki: Pki, tmp_path: Path) -> None:
    """After a reload with a new admin.token, a session made with the old one is refused and
    only the new token signs in (the console reads the configuration in force)."""

    port = free_port()

    def write(token: str) -> Path:
        path = tmp_path / "gateway.toml"
        path.write_text(
            f"""
[listen]
host = "127.0.0.1"
port = {port}
workers = 1
[tls]
cert_file = "{pki.server_chain_file}"
key_file = "{pki.server_key_file}"
client_ca_file = "{pki.client_ca_file}"
[meta]
verify_tokens = ["v"]
app_secrets = ["s"]
[outbox]
path = "outbox.sqlite3"
[admin]
host = "127.0.0.1"
port = 0
token = "{token}"
"""
        )
        return path

    config = load_config(write("first-token"))
    async with Gateway(config) as gateway, _browser() as session:
        base = _base(gateway)
        assert (await _sign_in(session, base, "first-token")).status == 303
        async with session.get(f"{base}/console/deliveries") as page:
            assert page.status == 200
        write("second-token")
        assert gateway.reload().ok
        async with session.get(f"{base}/console/deliveries") as page:
            assert page.status == 401
        assert (await _sign_in(session, base, "first-token")).status == 401
        assert (await _sign_in(session, base, "second-token")).status == 303
        async with session.get(f"{base}/console/deliveries") as page:
            assert page.status == 200


async def test_overview_shows_order_rate_limit_and_held_back_count_never_user_ids(
    pki: Pki, tmp_path: Path
) -> None:
    """An ordered, rate-limited target whose conversation a is stuck: the overview shows its
    order mode, its rate limit and one conversation held back, and no page shows the
    business-scoped user ids of the messages."""
    target = Conversations()
    await target.start()
    try:
        bot = ordered_bot(target, rate_per_s=50, burst=5)
        plain = TargetConfig(name="plain", url=target.url(), fields=("none",))
        config = gateway_config(pki, tmp_path, targets=[bot, plain])
        target.held.add(("stuckuser", 0))
        async with Gateway(config) as gateway, _browser() as session:
            for n in range(2):
                body = conversation_body("stuckuser", n)
                assert (await post(gateway, pki, body)).status == 200
            await target.wait_refused("stuckuser", 0, 1)
            base = _base(gateway)
            async with session.get(f"{base}/") as page:
                overview = await page.text()
            assert "conversations held back" in overview
            assert "<td>conversation</td><td>50/s, burst 5</td><td>1</td>" in overview
            assert "<td>none</td><td>none</td><td></td>" in overview
            seen = overview
            listed = await gateway.outbox.query()
            for path in ("/console/deliveries", *(f"/console/deliveries/{d.id}" for d in listed)):
                async with session.get(base + path) as page:
                    seen += await page.text()
            assert "stuckuser" not in seen
            assert "US." not in seen
    finally:
        await target.stop()
