"""Attacks on the admin listener: no token, a wrong token, injected queries, unknown ids; and
as SECURITY.md's threat model has them: a page in the operator's browser (DNS rebinding,
cross-site requests), a crafted link (the sign-in form's redirect), a neighbour on the network
(guessing the token). The same attacks in a real browser: test_attacks_admin_browser.py."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    admin_get,
    admin_post,
    gateway_config,
    message_body,
    metric,
    post,
    sink_target,
    wait_for_state,
)
from pki import Pki
from sink import Reply, Sink

from adversarial.attack import attack_gateway, still_serves
from gateway.admin.throttle import MAX_WAIT_S
from gateway.errors import GatewayError
from gateway.runtime.gateway import Gateway

TOKEN = "admin-token-for-attacks-0123456789abcdef"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        pytest.param("GET", "/admin/deliveries", {}, 401, id="list without a token"),
        pytest.param(
            "GET", "/admin/deliveries", {"Authorization": "Bearer wrong"}, 401, id="a wrong token"
        ),
        pytest.param(
            "GET",
            "/admin/deliveries",
            {"Authorization": f"Bearer {TOKEN}x"},
            401,
            id="the token with a byte more",
        ),
        pytest.param("GET", "/metrics", {"Authorization": f"bearer {TOKEN}"}, 401, id="lowercase"),
        pytest.param("POST", "/admin/deliveries/x-1/replay", {}, 401, id="replay without token"),
        pytest.param(
            "GET",
            "/admin/deliveries?state=dead'--",
            {"Authorization": f"Bearer {TOKEN}"},
            400,
            id="a state that is SQL",
        ),
        pytest.param(
            "GET",
            "/admin/deliveries?limit=99999999999",
            {"Authorization": f"Bearer {TOKEN}"},
            400,
            id="a huge limit",
        ),
        pytest.param(
            "POST",
            "/admin/deliveries/..%2F..%2Fetc%2Fpasswd/replay",
            {"Authorization": f"Bearer {TOKEN}"},
            404,
            id="a path in place of an id",
        ),
    ],
)
async def test_admin_requests_without_the_token_or_with_bad_input_are_refused(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    """Each is refused with its status; the callback keeps serving and nothing is forwarded."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        call = admin_get if method == "GET" else admin_post
        assert (await call(gateway, path, headers=headers)).status == status
        await still_serves(gateway, pki, sink)


async def test_a_token_that_is_not_utf_8_is_a_wrong_token_not_a_crash(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """An Authorization header with bytes that are not UTF-8: a 401 with the scheme it wants,
    as for any wrong token (it used to be a 500 with a traceback, and skipped the throttle
    that slows repeated wrong tokens)."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.admin_port)
        writer.write(
            b"GET /admin/deliveries HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 401 ")
        assert b"WWW-Authenticate: Bearer" in head
        await still_serves(gateway, pki, sink)


@pytest.mark.parametrize(
    "host", ["192.0.2.1", "no-such-host.invalid"], ids=["an address not here", "no such name"]
)
async def test_an_admin_host_the_system_refuses_is_a_one_line_error(
    pki: Pki, tmp_path: Path, sink: Sink, host: str
) -> None:
    """An admin.host that is no address of this machine (TEST-NET-1), or a name that does not
    resolve: starting fails with the gateway's own error naming admin.host, which the command
    line prints as one line (it used to be a bare OSError, a traceback)."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], admin_token=TOKEN)
    config = dataclasses.replace(config, admin=dataclasses.replace(config.admin, host=host))
    with pytest.raises(GatewayError) as refused:
        async with Gateway(config):
            pass
    assert f"admin.host {host!r}" in str(refused.value)


async def test_probes_stay_open_but_show_nothing_private(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Liveness and readiness need no token (orchestrators call them) and say only ok/ready."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        assert (await admin_get(gateway, "/healthz")).text == "ok\n"
        assert (await admin_get(gateway, "/readyz")).text == "ready\n"
        await still_serves(gateway, pki, sink)


# -- a browser on the operator's machine: DNS rebinding and cross-site requests ------------------


async def _request(
    gateway: Gateway,
    method: str,
    path: str,
    headers: Mapping[str, str],
    data: Mapping[str, str] | None = None,
) -> tuple[int, str, Mapping[str, str]]:
    url = f"http://127.0.0.1:{gateway.admin_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, data=data, allow_redirects=False) as answer,
    ):
        return answer.status, await answer.text(), answer.headers


async def _dead_letter(gateway: Gateway, pki: Pki, sink: Sink) -> str:
    sink.default = Reply(422, body="unknown account")
    assert (await post(gateway, pki, message_body("to be dead-lettered"))).status == 200
    (dead,) = await wait_for_state(gateway, "dead", 1)
    sink.default = Reply(200)
    return dead.id


@pytest.mark.parametrize(
    ("host", "status"),
    [
        pytest.param("rebound.example:{port}", 421, id="a rebinding page's own name"),
        pytest.param("rebound.example", 421, id="its name without a port"),
        pytest.param(
            "127.0.0.1.rebound.example:{port}", 421, id="a name that starts like loopback"
        ),
        pytest.param("127.0.0.1:{port}", 200, id="loopback address"),
        pytest.param("localhost:{port}", 200, id="localhost"),
        pytest.param("LOCALHOST.:{port}", 200, id="localhost in capitals with the root dot"),
        pytest.param("[::1]:{port}", 200, id="IPv6 loopback"),
        pytest.param("ops.internal:{port}", 200, id="a name in admin.allowed_hosts"),
    ],
)
@pytest.mark.parametrize("path", ["/", "/console/deliveries", "/admin/deliveries", "/metrics"])
async def test_a_host_that_is_not_the_admin_listeners_reads_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, host: str, status: int, path: str
) -> None:
    """DNS rebinding: a page whose name now points at 127.0.0.1 calls the listener by that
    name; it is refused (421) before any page, CSRF token or delivery is read, without a token."""
    async with attack_gateway(
        pki, tmp_path, sink, admin_allowed_hosts=("ops.internal",)
    ) as gateway:
        answer, text, _ = await _request(
            gateway, "GET", path, {"Host": host.format(port=gateway.admin_port)}
        )
        assert answer == status
        if status == 421:
            assert "admin.allowed_hosts" in text
            assert "csrf" not in text
        await still_serves(gateway, pki, sink)


async def test_the_name_admin_host_is_configured_with_is_its_own(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """`waba-gateway reload` calls the listener by admin.host: a name there is not refused."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    admin = dataclasses.replace(config.admin, host="localhost")
    async with Gateway(dataclasses.replace(config, admin=admin)) as gateway:
        assert (await _request(gateway, "GET", "/", {"Host": "LocalHost:1"}))[0] == 200
    allowed = ("ops.internal", "[fd00::5]")
    admin = dataclasses.replace(config.admin, host="127.0.0.1", allowed_hosts=allowed)
    async with Gateway(dataclasses.replace(config, admin=admin)) as gateway:
        assert (await _request(gateway, "GET", "/", {"Host": "Ops.Internal."}))[0] == 200
        assert (await _request(gateway, "GET", "/", {"Host": "[FD00::5]:8081"}))[0] == 200
        assert (await _request(gateway, "GET", "/", {"Host": "0.0.0.0"}))[0] == 421


async def test_the_probes_answer_any_host(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """/healthz and /readyz show nothing and are probed by names of the orchestrator's."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        for path in ("/healthz", "/readyz"):
            assert (await _request(gateway, "GET", path, {"Host": "pod.example"}))[0] == 200


CROSS_SITE = [
    pytest.param({"Origin": "http://attacker.example"}, id="another origin"),
    pytest.param({"Origin": "null"}, id="an opaque origin"),
    pytest.param({"Origin": "http://127.0.0.1:1"}, id="another port of loopback"),
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site"}, id="same-site (another port, a subdomain)"),
    pytest.param(
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
        id="cross-site by fetch metadata, whatever Origin says",
    ),
]


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "with a token"])
@pytest.mark.parametrize("headers", CROSS_SITE)
async def test_a_state_changing_request_from_another_site_changes_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, token: str | None, headers: dict[str, str]
) -> None:
    """Purge, replay and reload sent by a page of another site are refused with 403, with or
    without the token (a browser may hold it), and the dead letter stays as it was."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=token) as gateway:
        dead_id = await _dead_letter(gateway, pki, sink)
        sent = {name: value.format(port=gateway.admin_port) for name, value in headers.items()}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        for path in (
            "/admin/deliveries/purge?older_than=0s",
            "/admin/deliveries/replay?state=dead",
            f"/admin/deliveries/{dead_id}/replay",
            "/admin/reload",
        ):
            status, text, _ = await _request(gateway, "POST", path, sent)
            assert (status, "may not change anything here" in text) == (403, True), path
        assert [d.id for d in await wait_for_state(gateway, "dead", 1)] == [dead_id]
        await still_serves(gateway, pki, sink, forwarded_before=1)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_form_sent_to_the_json_api_changes_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, content_type: str
) -> None:
    """A browser too old to say where a request comes from still sends a form's content type,
    which the JSON API never takes: 415, and the dead letter stays."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        dead_id = await _dead_letter(gateway, pki, sink)
        for path in ("/admin/deliveries/purge?older_than=0s", "/admin/reload"):
            status, text, _ = await _request(
                gateway, "POST", path, {"Content-Type": content_type}, data={"x": "1"}
            )
            assert (status, "curl -X POST URL" in text) == (415, True), path
        assert [d.id for d in await wait_for_state(gateway, "dead", 1)] == [dead_id]
        await still_serves(gateway, pki, sink, forwarded_before=1)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no browser headers (curl, the CLI)"),
        pytest.param({"Sec-Fetch-Site": "same-origin"}, id="same-origin"),
        pytest.param(
            {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
            id="the console's own form (no-referrer: Chromium sends Origin null)",
        ),
        pytest.param({"Sec-Fetch-Site": "none"}, id="typed by the user"),
        pytest.param({"Origin": "http://127.0.0.1:{port}"}, id="its own origin"),
    ],
)
async def test_a_state_changing_request_from_the_listener_itself_is_taken(
    pki: Pki, tmp_path: Path, sink: Sink, headers: dict[str, str]
) -> None:
    """The refusal above is not a refusal of everything: the same purge from the listener's
    own pages, or from a client that is no browser, is done."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        await _dead_letter(gateway, pki, sink)
        sent = {name: value.format(port=gateway.admin_port) for name, value in headers.items()}
        status, text, _ = await _request(
            gateway, "POST", "/admin/deliveries/purge?older_than=0s", sent
        )
        assert (status, text) == (200, '{"purged": 1}')


async def test_a_401_names_the_scheme_it_wants(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """RFC 9110: every 401 carries WWW-Authenticate, the API's and the console's sign-in."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        for path in ("/admin/deliveries", "/metrics", "/console/deliveries"):
            status, _, headers = await _request(gateway, "GET", path, {})
            assert status == 401, path
            assert headers["WWW-Authenticate"] == 'Bearer realm="waba-gateway admin"', path


@pytest.mark.parametrize(
    "path",
    [
        "/admin/deliveries?limit=%C2%B2",  # ²: str.isdigit() says yes, int() says no
        "/admin/deliveries?limit=%D9%A3",  # Arabic-Indic three
        "/console/deliveries?page=%C2%B2",
        "/console/deliveries?page=%EF%BC%91",  # fullwidth one
    ],
)
async def test_digits_that_are_not_ascii_are_a_400_not_a_500(
    pki: Pki, tmp_path: Path, sink: Sink, path: str
) -> None:
    """A limit or page written in other digits is refused with its reason, no traceback."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        status, text, _ = await _request(gateway, "GET", path, {})
        assert status == 400
        assert "must be an integer" in text
        await still_serves(gateway, pki, sink)


# -- a crafted link: the sign-in form ------------------------------------------------------------


def _sign_in_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _sign_in_form(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/console/sign-in") as form:
        found = re.search(r'name="csrf" value="([^"]+)"', await form.text())
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "with a token"])
@pytest.mark.parametrize(
    ("next_path", "location"),
    [
        pytest.param("/\t/evil.example/", "/", id="a tab the browser drops"),
        pytest.param("/\n/evil.example/", "/", id="a newline the browser drops"),
        pytest.param(
            "/console/deliveries\r\nSet-Cookie: a=b",
            "/console/deliveriesSet-Cookie:%20a=b",
            id="a header injected by a newline",
        ),
        pytest.param("/\\evil.example/", "/", id="a backslash read as a slash"),
        pytest.param("/console/deliveries?state=dead", "/console/deliveries?state=dead", id="ok"),
    ],
)
async def test_signing_in_sends_the_browser_only_to_a_console_path(
    pki: Pki, tmp_path: Path, sink: Sink, token: str | None, next_path: str, location: str
) -> None:
    """A crafted link's `next` is parsed: after signing in the browser goes to a console page
    on this listener, never to another host, and a newline is no traceback."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=token) as gateway:
        base = f"http://127.0.0.1:{gateway.admin_port}"
        async with _sign_in_client() as session:
            csrf = await _sign_in_form(session, base)
            form = {"csrf": csrf, "token": token or "", "next": next_path}
            async with session.post(
                f"{base}/console/sign-in", data=form, allow_redirects=False
            ) as answer:
                assert (answer.status, answer.headers["Location"]) == (303, location)
        await still_serves(gateway, pki, sink)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "with a token"])
async def test_signing_in_without_the_forms_token_is_refused(
    pki: Pki, tmp_path: Path, sink: Sink, token: str | None
) -> None:
    """Sign-in is a form like the others: without its CSRF token it is refused (403), with a
    token configured or not, and it redirects nowhere."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=token) as gateway:
        base = f"http://127.0.0.1:{gateway.admin_port}"
        async with (
            _sign_in_client() as session,
            session.post(
                f"{base}/console/sign-in",
                data={"token": token or "", "next": "/console/deliveries"},
                allow_redirects=False,
            ) as answer,
        ):
            assert answer.status == 403
            assert "Location" not in answer.headers


# -- a neighbour on the network: guessing the token ----------------------------------------------


async def test_failed_authentication_is_slowed_per_address_and_counted(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Each wrong token from one address waits longer than the one before (bounded), bearer
    and sign-in alike, and is counted; the right token is answered at once and resets it."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        wrong = {"Authorization": "Bearer guess"}
        started = time.monotonic()
        for _ in range(4):
            assert (await _request(gateway, "GET", "/admin/deliveries", wrong))[0] == 401
        # 0.05 + 0.1 + 0.2 + 0.4 s at least, however fast the machine.
        assert time.monotonic() - started >= 0.75
        # Four at once from the same address queue behind each other: no faster in parallel.
        started = time.monotonic()
        answers = await asyncio.gather(
            *(_request(gateway, "GET", "/admin/deliveries", wrong) for _ in range(4))
        )
        assert {status for status, _, _ in answers} == {401}
        assert time.monotonic() - started >= MAX_WAIT_S
        base = f"http://127.0.0.1:{gateway.admin_port}"
        async with _sign_in_client() as session:
            csrf = await _sign_in_form(session, base)
            form = {"csrf": csrf, "token": "guess", "next": "/"}
            async with session.post(f"{base}/console/sign-in", data=form) as answer:
                assert answer.status == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        started = time.monotonic()
        status, metrics, _ = await _request(gateway, "GET", "/metrics", right)
        assert status == 200
        assert time.monotonic() - started < MAX_WAIT_S
        assert metric(metrics, 'waba_gateway_admin_auth_failures_total{where="bearer"}') == 8
        assert metric(metrics, 'waba_gateway_admin_auth_failures_total{where="sign-in"}') == 1
        assert metric(metrics, "waba_gateway_admin_auth_delay_seconds_total") >= 0.75 + MAX_WAIT_S
        await still_serves(gateway, pki, sink)
