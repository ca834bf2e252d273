"""The subscription commands end to end, against a fake Graph API on a real loopback socket.

The fake answers with Meta's published samples from ``tests/data/graph`` byte for byte; where Meta
publishes no sample (a list with an override, an 80008 error), the body is built from the shape
documented on whatsapp/webhooks/override and graph-api/overview/rate-limiting.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from loopback_ports import free_port
from pytest_aiohttp import AiohttpServer

from gateway.cli import main
from gateway.onboarding.graph import MAX_PAGES

DATA = Path(__file__).resolve().parents[1] / "data" / "graph"
REPO = Path(__file__).resolve().parents[2]
TOKEN = "EAAGtestTOKEN0do0not0print0c4f1e9"
WABA = "102290129340398"
TRACE = "AXsgnV2Cm3ZMGF3dF_cfYIn"
USAGE = "X-Business-Use-Case-Usage"
JSON_TYPE = "application/json; charset=UTF-8"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def usage_header(*, call_count: int = 1, minutes: int = 0) -> str:
    entry = {
        "type": "whatsapp_business_management",
        "call_count": call_count,
        "total_cputime": 1,
        "total_time": 1,
        "estimated_time_to_regain_access": minutes,
    }
    return json.dumps({WABA: [entry]})


@dataclass(frozen=True, slots=True, kw_only=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True, kw_only=True)
class FakeGraph:
    """Records every request and answers each with ``status``, ``body`` and ``headers``, or
    with the next of the answers queued by :meth:`then` while there are any."""

    url: str = ""
    status: int = 200
    body: bytes = field(default_factory=lambda: sample("graph-subscribed_apps-post-response.json"))
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON_TYPE})
    delay_s: float = 0
    requests: list[Recorded] = field(default_factory=list)
    queued: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=list)

    def answer(self, status: int, body: bytes, **headers: str) -> None:
        self.status, self.body = status, body
        self.headers = {"Content-Type": JSON_TYPE, **headers}

    def then(self, status: int, body: bytes, **headers: str) -> None:
        """Queue one answer: queued answers are given in turn, before the standing one."""
        self.queued.append((status, body, {"Content-Type": JSON_TYPE, **headers}))

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers=dict(request.headers),
                body=await request.read(),
            )
        )
        await asyncio.sleep(self.delay_s)
        if self.queued:
            status, body, headers = self.queued.pop(0)
            return web.Response(status=status, body=body, headers=headers)
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WABA_ACCESS_TOKEN", raising=False)


async def serve_fake_graph(aiohttp_server: AiohttpServer) -> FakeGraph:
    """A :class:`FakeGraph` answering every path on its own port; ``url`` is its base."""
    fake = FakeGraph()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("/")).rstrip("/")
    return fake


@pytest.fixture
async def fake_graph(aiohttp_server: AiohttpServer) -> FakeGraph:
    return await serve_fake_graph(aiohttp_server)


async def run(fake: FakeGraph, *argv: str, token: bool = True) -> int:
    """``waba-gateway ARGV`` in a thread: ``main`` runs its own event loop with asyncio.run."""
    options = ["--graph-url", fake.url, *(["--access-token", TOKEN] if token else [])]
    return await asyncio.to_thread(main, [*argv, *options])


def output(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """stdout and stderr, after checking that neither holds the token."""
    captured = capsys.readouterr()
    assert TOKEN not in captured.out
    assert TOKEN not in captured.err
    return captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "answer", "method", "printed"),
    [
        pytest.param(
            ["subscribe"],
            None,
            "POST",
            [f"subscribed to WABA {WABA}; webhooks go to the app's callback URL"],
            id="subscribe-posts",
        ),
        pytest.param(
            ["subscriptions"],
            "graph-subscribed_apps-get-multiple.json",
            "GET",
            [
                "APP ID            NAME                    LINK",
                "1234567890123456  Business Messaging App  https://www.facebook.com/games/?app_id=1234567890123456",
                "2345678901234567  Customer Support Bot    https://www.facebook.com/games/?app_id=2345678901234567",
            ],
            id="subscriptions-gets-and-prints-a-table",
        ),
        pytest.param(
            ["unsubscribe"],
            "graph-subscribed_apps-delete-response.json",
            "DELETE",
            [f"unsubscribed from WABA {WABA}; Meta stops delivering its webhooks"],
            id="unsubscribe-deletes",
        ),
        # A POST with no body is how Meta removes an override.
        pytest.param(
            ["clear-override"],
            None,
            "POST",
            [f"override removed for WABA {WABA}; webhooks go to the app's callback URL"],
            id="clear-override-posts",
        ),
    ],
)
async def test_each_command_sends_one_bodiless_request_with_the_bearer_token(
    fake_graph: FakeGraph,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    answer: str | None,
    method: str,
    printed: list[str],
) -> None:
    """Each command makes one request of its method to the WABA's subscribed_apps edge, with
    no body and the Bearer token, and prints what happened (subscriptions: id, name and link
    of each app, one row each)."""
    if answer is not None:
        fake_graph.answer(200, sample(answer))
    assert await run(fake_graph, *argv, WABA) == 0
    [request] = fake_graph.requests
    assert (request.method, request.path, request.body) == (
        method,
        f"/v21.0/{WABA}/subscribed_apps",
        b"",
    )
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Content-Type" not in request.headers
    out, err = output(capsys)
    assert out.splitlines() == printed
    assert err == ""


async def test_subscribe_with_override_posts_the_override_as_json(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """The override callback and verify token travel as the JSON body of Meta's sample."""
    override = json.loads(sample("graph-subscribed_apps-post-request-override.json"))
    argv = ["subscribe", WABA, "--api-version", "v20.0"]
    argv += ["--override-callback-uri", override["override_callback_uri"]]
    argv += ["--verify-token", override["verify_token"]]
    assert await run(fake_graph, *argv) == 0
    [request] = fake_graph.requests
    assert (request.method, request.path) == ("POST", f"/v20.0/{WABA}/subscribed_apps")
    assert request.headers["Content-Type"].startswith("application/json")
    assert json.loads(request.body) == override
    out, _ = output(capsys)
    assert override["override_callback_uri"] in out
    assert override["verify_token"] not in out


@pytest.mark.parametrize(
    "override",
    [
        ["--override-callback-uri", "https://example.com/hook"],
        ["--verify-token", "t"],
        ["--override-callback-uri", "http://example.com/hook", "--verify-token", "t"],
    ],
)
async def test_subscribe_rejects_incomplete_or_insecure_override_without_calling(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], override: list[str]
) -> None:
    """An override without its partner or without https is exit 2, and nothing is sent."""
    assert await run(fake_graph, "subscribe", WABA, *override) == 2
    assert fake_graph.requests == []
    _, err = output(capsys)
    assert err.startswith("error: --override-callback-uri")
    assert err.count("\n") == 1


async def test_subscriptions_shows_the_override_callback(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app with an override_callback_uri gets an override column; the others show '-'."""
    listing = json.loads(sample("graph-subscribed_apps-get-multiple.json"))
    listing["data"][0]["override_callback_uri"] = "https://my-waba-alternate-callback.com/webhook"
    fake_graph.answer(200, json.dumps(listing).encode())
    assert await run(fake_graph, "subscriptions", WABA) == 0
    out, _ = output(capsys)
    header, first, second = out.splitlines()
    assert header.endswith("OVERRIDE CALLBACK URI")
    assert first.endswith("https://my-waba-alternate-callback.com/webhook")
    assert second.endswith(" -")


async def test_subscriptions_says_when_no_app_is_subscribed(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Meta's empty list prints one sentence instead of an empty table."""
    fake_graph.answer(200, sample("graph-subscribed_apps-get-empty.json"))
    assert await run(fake_graph, "subscriptions", WABA) == 0
    out, _ = output(capsys)
    assert out == f"no app is subscribed to WABA {WABA}\n"


async def test_subscriptions_json_prints_meta_answer(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints the answer as JSON, equal to what Meta sent."""
    fake_graph.answer(200, sample("graph-subscribed_apps-get-multiple.json"))
    assert await run(fake_graph, "subscriptions", WABA, "--json") == 0
    out, _ = output(capsys)
    assert json.loads(out) == json.loads(sample("graph-subscribed_apps-get-multiple.json"))


async def test_rate_limit_exits_4_shows_the_wait_and_calls_once(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Error 80008 stops the command after its one request and says how many minutes to wait."""
    body = {
        "error": {
            "message": "(#80008) There have been too many calls to this WhatsApp Business account.",
            "type": "OAuthException",
            "code": 80008,
            "error_subcode": 2494055,
            "fbtrace_id": TRACE,
        }
    }
    fake_graph.answer(
        400, json.dumps(body).encode(), **{USAGE: usage_header(call_count=100, minutes=12)}
    )
    assert await run(fake_graph, "subscriptions", WABA) == 4
    assert len(fake_graph.requests) == 1
    out, err = output(capsys)
    assert out == ""
    warning, error = err.splitlines()
    assert warning == (
        f"warning: Graph API usage for business {WABA} at 100% (call_count); throttled at 100%"
    )
    assert error.startswith(
        f"error: rate limit hit (code 80008, subcode 2494055, HTTP 400, fbtrace_id {TRACE})"
    )
    assert error.endswith(
        "Meta says access returns in about 12 minutes;"
        " every further call extends the block, so wait"
    )


@pytest.mark.parametrize(
    ("command", "status", "body", "content_type", "code", "said"),
    [
        pytest.param(
            "unsubscribe",
            200,
            b'{"success": false}',
            JSON_TYPE,
            1,
            ['error: Graph API did not confirm success: {"success": false}\n'],
            id="success-false-is-a-failure",
        ),
        pytest.param(
            "subscribe",
            401,
            sample("graph-error-401-invalid-token.json"),
            JSON_TYPE,
            3,
            [
                "error: access token rejected (code 190, subcode 463, HTTP 401, fbtrace_id"
                f" {TRACE}): Invalid OAuth access token\n"
            ],
            id="invalid-token-with-code-subcode-and-trace-id",
        ),
        pytest.param(
            "subscribe",
            403,
            sample("graph-error-403-permission.json"),
            JSON_TYPE,
            3,
            ["error: permission denied (code 200, subcode 1349174, HTTP 403"],
            id="missing-permission-is-an-auth-failure-too",
        ),
        # Even if an answer quotes the token, the printed error does not.
        pytest.param(
            "unsubscribe",
            400,
            json.dumps(
                {"error": {"message": f"Malformed access token {TOKEN}", "code": 190}}
            ).encode(),
            JSON_TYPE,
            3,
            ["Malformed access token [redacted]"],
            id="token-echoed-by-the-server-is-redacted",
        ),
        # Meta's code 4 sample: no wait estimate when no usage header came.
        pytest.param(
            "clear-override",
            429,
            sample("graph-error-429-rate-limit.json"),
            JSON_TYPE,
            4,
            ["rate limit hit (code 4", "Meta gives no estimate of when access returns"],
            id="app-rate-limit-sample",
        ),
        # fbtrace_id, for Meta support.
        pytest.param(
            "unsubscribe",
            500,
            sample("graph-error-500-transient.json"),
            JSON_TYPE,
            1,
            [f"(code 2, HTTP 500, fbtrace_id {TRACE})", "transient"],
            id="transient-server-error",
        ),
        # An HTML error page from a proxy is reported by its status, not as a crash.
        pytest.param(
            "subscribe",
            502,
            b"<html><body>\n<h1>Bad Gateway</h1>\n</body></html>",
            "text/html",
            1,
            ["error: Graph API answered HTTP 502 Bad Gateway with a non-JSON body\n"],
            id="non-json-error-body",
        ),
    ],
)
async def test_a_failed_answer_exits_with_its_code_in_one_line_after_one_request(
    fake_graph: FakeGraph,
    capsys: pytest.CaptureFixture[str],
    command: str,
    status: int,
    body: bytes,
    content_type: str,
    code: int,
    said: list[str],
) -> None:
    """Meta's errors map to exit codes (1 failed, 3 token or permission, 4 rate limited), each
    said in one error line naming what Meta said; the command never retries by itself."""
    fake_graph.answer(status, body, **{"Content-Type": content_type})
    assert await run(fake_graph, command, WABA) == code
    assert len(fake_graph.requests) == 1
    out, err = output(capsys)
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    for text in said:
        assert text in err


async def test_warns_when_usage_is_over_80_percent(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A successful call whose usage header shows 85% still succeeds, with a warning on stderr."""
    fake_graph.answer(
        200,
        sample("graph-subscribed_apps-post-response.json"),
        **{USAGE: usage_header(call_count=85)},
    )
    assert await run(fake_graph, "subscribe", WABA) == 0
    out, err = output(capsys)
    assert out.startswith("subscribed")
    assert err == (
        f"warning: Graph API usage for business {WABA} at 85% (call_count); throttled at 100%\n"
    )


async def test_meta_sample_usage_header_is_quiet(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Meta's sample header (1% on every figure) produces no warning."""
    header = json.dumps(json.loads(sample("graph-header-x-business-use-case-usage.json")))
    fake_graph.answer(200, sample("graph-subscribed_apps-get-empty.json"), **{USAGE: header})
    assert await run(fake_graph, "subscriptions", WABA) == 0
    _, err = output(capsys)
    assert err == ""


async def test_malformed_usage_header_is_ignored_with_a_warning(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A usage header that is not JSON warns once and the command still succeeds."""
    fake_graph.answer(200, sample("graph-subscribed_apps-post-response.json"), **{USAGE: "{oops"})
    assert await run(fake_graph, "subscribe", WABA) == 0
    _, err = output(capsys)
    assert err == "warning: ignoring malformed X-Business-Use-Case-Usage header: not JSON\n"


@pytest.mark.parametrize("command", ["subscribe", "subscriptions", "unsubscribe", "clear-override"])
@pytest.mark.parametrize("waba_id", ["abc", "12 34", "1" * 33, "123/../456"])
async def test_bad_waba_id_exits_2_without_a_request(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], command: str, waba_id: str
) -> None:
    """A WABA id that is not 1 to 32 digits is named in one line, and nothing is sent."""
    assert await run(fake_graph, command, waba_id) == 2
    assert fake_graph.requests == []
    _, err = output(capsys)
    assert err == f"error: WABA id {waba_id!r}: expected 1 to 32 digits\n"


@pytest.mark.parametrize("command", ["subscribe", "subscriptions", "unsubscribe", "clear-override"])
async def test_missing_token_exits_2_without_a_request(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Without --access-token or WABA_ACCESS_TOKEN the command says so in one line."""
    assert await run(fake_graph, command, WABA, token=False) == 2
    assert fake_graph.requests == []
    _, err = output(capsys)
    assert err == "error: no access token: pass --access-token or set WABA_ACCESS_TOKEN\n"


async def test_token_comes_from_the_environment(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WABA_ACCESS_TOKEN is used when --access-token is absent."""
    monkeypatch.setenv("WABA_ACCESS_TOKEN", TOKEN)
    assert await run(fake_graph, "unsubscribe", WABA, token=False) == 0
    [request] = fake_graph.requests
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    output(capsys)


async def test_token_with_a_newline_is_refused_without_echoing_it(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that would break the Authorization header is exit 2, named by source only."""
    monkeypatch.setenv("WABA_ACCESS_TOKEN", f"{TOKEN[:8]}\n{TOKEN[8:]}")
    assert await run(fake_graph, "unsubscribe", WABA, token=False) == 2
    assert fake_graph.requests == []
    _, err = output(capsys)
    assert (
        err == "error: the access token in WABA_ACCESS_TOKEN contains whitespace or control"
        " characters\n"
    )
    assert TOKEN[8:] not in err


async def test_timeout_exits_1_naming_the_host(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Graph API that does not answer in --timeout-s is one line naming the host."""
    fake_graph.delay_s = 0.5
    assert await run(fake_graph, "subscribe", WABA, "--timeout-s", "0.05") == 1
    _, err = output(capsys)
    assert err == "error: no answer from 127.0.0.1 within 0.05 s\n"


async def test_connection_failure_exits_1_naming_the_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing listening on the Graph URL is one line naming the host."""
    closed = FakeGraph(url=f"http://127.0.0.1:{free_port()}")
    assert await run(closed, "subscriptions", WABA) == 1
    _, err = output(capsys)
    assert err.startswith("error: cannot reach 127.0.0.1: ")
    assert err.count("\n") == 1


async def test_plain_http_graph_url_to_another_host_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The token is never sent over plain http beyond this machine."""
    remote = FakeGraph(url="http://graph.facebook.com")
    assert await run(remote, "subscriptions", WABA) == 2
    _, err = output(capsys)
    assert err.startswith("error: --graph-url 'http://graph.facebook.com'")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        pytest.param(["--graph-url", "https://[::1"], "--graph-url", id="graph-url-unclosed-ipv6"),
        pytest.param(
            ["--graph-url", "https://graph.facebook.com:99999"],
            "--graph-url",
            id="graph-url-port-out-of-range",
        ),
        pytest.param(
            ["--graph-url", "https://graph..facebook.com"],
            "--graph-url",
            id="graph-url-empty-label",
        ),
        pytest.param(
            ["--override-callback-uri", "https://[gw", "--verify-token", "t"],
            "--override-callback-uri",
            id="override-unclosed-ipv6",
        ),
        pytest.param(
            ["--override-callback-uri", "https://gw..example.com/hook", "--verify-token", "t"],
            "--override-callback-uri",
            id="override-empty-label",
        ),
    ],
)
async def test_malformed_url_option_exits_2_in_one_line_without_a_request(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], options: list[str], named: str
) -> None:
    """A URL no request can be made to (unclosed IPv6 bracket, port out of range, a host name
    with an empty label) is a bad option value: one line naming the option, exit 2, no call."""
    argv = ["subscribe", WABA, "--access-token", TOKEN, "--graph-url", fake_graph.url, *options]
    assert await asyncio.to_thread(main, argv) == 2
    assert fake_graph.requests == []
    out, err = output(capsys)
    assert out == ""
    assert err.startswith(f"error: {named} ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["subscribe", "subscriptions", "unsubscribe", "clear-override"])
def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """Every command's --help ends with the exit codes a script can rely on."""
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    out, _ = output(capsys)
    assert "exit codes:" in out
    for line in ("0  success", "2  usage", "3  access token rejected", "4  rate limited"):
        assert line in out


async def test_installed_command_exits_with_the_graph_exit_code(fake_graph: FakeGraph) -> None:
    """Run as ``python -m gateway``, a rejected token is exit status 3 with one line on stderr."""
    fake_graph.answer(401, sample("graph-error-401-invalid-token.json"))
    env = {**os.environ, "WABA_ACCESS_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "subscribe",
        WABA,
        "--graph-url",
        fake_graph.url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 3
    assert out == b""
    assert err.decode().startswith("error: access token rejected (code 190")
    assert TOKEN.encode() not in out + err


# Paging (graph-api/results): a list edge answers one page at a time; ``paging.next`` is the
# absolute URL of the next page and is absent on the last one. Meta's pages come from the
# Graph API host, so the stand-in's links point at the stand-in.
APPS = json.loads(sample("graph-subscribed_apps-get-multiple.json"))["data"]
CURSOR = "MTAxNTExOTQ1MjAwNzI5NDE="  # graph-api/results' example cursor


def page(apps: list[dict[str, object]], next_url: str | None = None) -> bytes:
    """A subscribed_apps page: ``data`` and, unless it is the last, ``paging`` with ``next``."""
    document: dict[str, object] = {"data": apps}
    if next_url is not None:
        document["paging"] = {"cursors": {"before": "QVFIUmx1", "after": CURSOR}, "next": next_url}
    return json.dumps(document).encode()


def next_link(base: str, cursor: str = CURSOR) -> str:
    return f"{base}/v21.0/{WABA}/subscribed_apps?limit=1&after={cursor}"


@pytest.fixture
async def other_host(aiohttp_server: AiohttpServer) -> FakeGraph:
    """A second stand-in, on another port: a host a paging link must not send the token to."""
    return await serve_fake_graph(aiohttp_server)


async def test_subscriptions_reads_the_next_page_and_lists_the_app_on_it(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app on page 2 is listed: the command follows ``paging.next`` with the same token,
    to the very URL Meta gave, until a page has no ``next``."""
    fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url)))
    fake_graph.answer(200, page(APPS[1:]))
    assert await run(fake_graph, "subscriptions", WABA) == 0
    first, second = fake_graph.requests
    assert (first.method, first.path, first.query) == ("GET", f"/v21.0/{WABA}/subscribed_apps", "")
    assert (second.method, second.path, second.query) == (
        "GET",
        f"/v21.0/{WABA}/subscribed_apps",
        f"limit=1&after={CURSOR}",
    )
    assert second.headers["Authorization"] == f"Bearer {TOKEN}"
    out, err = output(capsys)
    assert out.splitlines() == [
        "APP ID            NAME                    LINK",
        "1234567890123456  Business Messaging App  https://www.facebook.com/games/?app_id=1234567890123456",
        "2345678901234567  Customer Support Bot    https://www.facebook.com/games/?app_id=2345678901234567",
    ]
    assert err == ""


async def test_subscriptions_json_prints_every_page_as_one_list(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one ``data`` list holding the apps of all pages, and no paging links (a
    cursor is only valid for a while, graph-api/results)."""
    fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url)))
    fake_graph.answer(200, page(APPS[1:]))
    assert await run(fake_graph, "subscriptions", WABA, "--json") == 0
    out, _ = output(capsys)
    assert json.loads(out) == {"data": APPS}


async def test_an_empty_page_with_a_next_link_is_not_the_end(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """graph-api/results: a page may be empty and still have a ``next`` link; only a page
    without one ends the list."""
    fake_graph.then(200, page([], next_link(fake_graph.url)))
    fake_graph.answer(200, page(APPS))
    assert await run(fake_graph, "subscriptions", WABA) == 0
    assert len(fake_graph.requests) == 2
    out, _ = output(capsys)
    assert len(out.splitlines()) == 1 + len(APPS)


@pytest.mark.parametrize(
    "link",
    [
        pytest.param("{other}", id="another-port"),
        pytest.param("http://localhost:{port}", id="another-host-name"),
        pytest.param("https://127.0.0.1:{port}", id="another-scheme"),
        pytest.param("http://user@127.0.0.1:{port}", id="credentials-in-the-link"),
        pytest.param("https://graph.facebook.com", id="meta-host-but-not-the-graph-url"),
    ],
)
async def test_a_next_link_off_the_graph_url_is_refused_and_gets_no_token(
    fake_graph: FakeGraph,
    other_host: FakeGraph,
    capsys: pytest.CaptureFixture[str],
    link: str,
) -> None:
    """A ``next`` link whose scheme, host or port is not the Graph URL's is not followed: the
    token goes to the Graph API only. Exit 1, in one line that does not repeat the link."""
    port = fake_graph.url.rsplit(":", 1)[1]
    base = link.format(other=other_host.url, port=port)
    fake_graph.answer(200, page(APPS, next_link(base)))
    assert await run(fake_graph, "subscriptions", WABA) == 1
    assert len(fake_graph.requests) == 1
    assert other_host.requests == []
    out, err = output(capsys)
    assert out == ""
    assert err.startswith("error: ")
    assert "paging.next" in err
    assert CURSOR not in err
    assert err.count("\n") == 1


async def test_paging_stops_at_the_page_limit(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list that never ends is read for at most MAX_PAGES calls (each counts against the
    200 calls an hour per app and WABA), then exit 1 rather than a partial list."""
    for number in range(MAX_PAGES + 5):
        fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url, f"cursor{number}")))
    assert await run(fake_graph, "subscriptions", WABA) == 1
    assert len(fake_graph.requests) == MAX_PAGES
    out, err = output(capsys)
    assert out == ""
    assert err == (
        f"error: Graph API still had more pages after {MAX_PAGES}: stopped, the list is"
        " incomplete\n"
    )


async def test_a_next_link_to_a_page_already_read_is_refused(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``next`` that leads back to a page already read would loop: one failure line, and no
    call beyond the pages read."""
    fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url)))
    fake_graph.answer(200, page(APPS[1:], next_link(fake_graph.url)))
    assert await run(fake_graph, "subscriptions", WABA) == 1
    assert len(fake_graph.requests) == 2
    _, err = output(capsys)
    assert err == "error: Graph API paging.next on page 2 leads back to a page already read\n"


async def test_a_rate_limit_on_a_later_page_exits_4_without_another_call(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """80008 on page 2 ends the command as it would on page 1: exit 4, no further call."""
    body = {"error": {"message": "Too many calls", "type": "OAuthException", "code": 80008}}
    fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url)))
    fake_graph.answer(
        400, json.dumps(body).encode(), **{USAGE: usage_header(call_count=100, minutes=7)}
    )
    assert await run(fake_graph, "subscriptions", WABA) == 4
    assert len(fake_graph.requests) == 2
    out, err = output(capsys)
    assert out == ""
    assert err.splitlines()[-1].startswith("error: rate limit hit (code 80008, HTTP 400)")
    assert "about 7 minutes" in err


async def test_usage_at_the_limit_stops_paging_before_the_next_call(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A page whose usage header says 100% (Meta throttles at 100) is the last call: Meta says
    every call made while limited extends the block (graph-api/overview/rate-limiting). Exit 4
    with the wait, after the one warning."""
    fake_graph.answer(
        200,
        page(APPS[:1], next_link(fake_graph.url)),
        **{USAGE: usage_header(call_count=100, minutes=3)},
    )
    assert await run(fake_graph, "subscriptions", WABA) == 4
    assert len(fake_graph.requests) == 1
    out, err = output(capsys)
    assert out == ""
    warning, error = err.splitlines()
    assert warning.startswith(f"warning: Graph API usage for business {WABA} at 100%")
    assert error == (
        "error: rate limit reached after page 1 of the list: stopped, the list is incomplete;"
        " Meta says access returns in about 3 minutes; every further call extends the block,"
        " so wait"
    )


async def test_a_usage_warning_repeated_on_every_page_is_shown_once(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage over 80% on both pages warns once; the list is still printed."""
    fake_graph.then(
        200,
        page(APPS[:1], next_link(fake_graph.url)),
        **{USAGE: usage_header(call_count=85)},
    )
    fake_graph.answer(200, page(APPS[1:]), **{USAGE: usage_header(call_count=85)})
    assert await run(fake_graph, "subscriptions", WABA) == 0
    out, err = output(capsys)
    assert len(out.splitlines()) == 1 + len(APPS)
    assert err == (
        f"warning: Graph API usage for business {WABA} at 85% (call_count); throttled at 100%\n"
    )


async def test_a_later_page_without_a_data_list_is_a_failure(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Page 2 of another shape is not silently skipped: exit 1 naming the page."""
    fake_graph.then(200, page(APPS[:1], next_link(fake_graph.url)))
    fake_graph.answer(200, b'{"paging": {}}')
    assert await run(fake_graph, "subscriptions", WABA) == 1
    _, err = output(capsys)
    assert err == "error: Graph API answered page 2 of the list without a 'data' list\n"


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
async def test_a_timeout_that_is_not_a_positive_number_exits_2_without_a_request(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--timeout-s inf (an operator's "no limit") cannot be set on a request: one line, exit 2,
    and nothing sent, like 0 or a negative number."""
    assert await run(fake_graph, "subscriptions", WABA, "--timeout-s", value) == 2
    assert fake_graph.requests == []
    out, err = output(capsys)
    assert out == ""
    assert err == f"error: --timeout-s {value}: expected a positive number of seconds\n"


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        pytest.param(200, NESTED, "HTTP 200 OK with a non-JSON body", id="success"),
        pytest.param(
            500, b'{"error": ' + NESTED + b"}", "HTTP 500 Internal Server Error", id="error"
        ),
    ],
)
async def test_json_nested_too_deep_to_read_is_a_non_json_answer(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str], status: int, body: bytes, said: str
) -> None:
    """An answer nested deeper than Python's parser goes (a broken proxy's, say) is reported
    like any unreadable answer, in one line with exit 1, not as a traceback."""
    fake_graph.answer(status, body)
    assert await run(fake_graph, "subscriptions", WABA) == 1
    out, err = output(capsys)
    assert out == ""
    assert err.startswith("error: Graph API answered ")
    assert said in err
    assert err.count("\n") == 1


async def test_a_usage_header_nested_too_deep_is_ignored_with_a_warning(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage reporting is never why a command fails: such a header is malformed, like any."""
    fake_graph.answer(
        200, sample("graph-subscribed_apps-post-response.json"), **{USAGE: "[" * 5000}
    )
    assert await run(fake_graph, "subscribe", WABA) == 0
    out, err = output(capsys)
    assert out.startswith("subscribed")
    assert err == "warning: ignoring malformed X-Business-Use-Case-Usage header: not JSON\n"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("command", ["subscriptions", "subscribe", "unsubscribe"])
async def test_a_redirect_is_reported_not_followed(
    fake_graph: FakeGraph,
    other_host: FakeGraph,
    capsys: pytest.CaptureFixture[str],
    status: int,
    command: str,
) -> None:
    """The Graph API does not redirect its calls: a redirect (a proxy, a wrong --graph-url) is
    one failure line naming where it leads, and the other server is not asked. Followed, its
    answer (here an empty list, got without the token) was taken for Meta's, and a POST
    became a GET."""
    other_host.answer(200, sample("graph-subscribed_apps-get-empty.json"))
    location = f"{other_host.url}/v21.0/{WABA}/subscribed_apps?cursor=abc"
    fake_graph.answer(status, b"", Location=location)
    assert await run(fake_graph, command, WABA) == 1
    assert len(fake_graph.requests) == 1
    assert other_host.requests == []
    out, err = output(capsys)
    assert out == ""
    port = other_host.url.rsplit(":", 1)[1]
    assert err.startswith(f"error: Graph API answered HTTP {status} ")
    assert f"a redirect to http://127.0.0.1:{port}, not followed: check --graph-url" in err
    assert "cursor=abc" not in err
    assert err.count("\n") == 1


async def test_an_unconfirmed_answer_that_echoes_the_token_is_redacted(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """The "did not confirm success" line quotes Meta's answer: without the token in it."""
    fake_graph.answer(200, json.dumps({"success": False, "debug": f"token {TOKEN}"}).encode())
    assert await run(fake_graph, "unsubscribe", WABA) == 1
    _, err = output(capsys)
    assert err == (
        'error: Graph API did not confirm success: {"success": false, "debug": "token'
        ' [redacted]"}\n'
    )


async def test_a_redirect_on_the_same_host_is_reported_too(
    fake_graph: FakeGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative Location is named by the host it stays on; still not followed."""
    fake_graph.answer(302, b"", Location=f"/v21.0/{WABA}/subscribed_apps/")
    assert await run(fake_graph, "subscriptions", WABA) == 1
    assert len(fake_graph.requests) == 1
    _, err = output(capsys)
    assert err == (
        "error: Graph API answered HTTP 302 Found, a redirect to another path on 127.0.0.1,"
        " not followed: check --graph-url\n"
    )
