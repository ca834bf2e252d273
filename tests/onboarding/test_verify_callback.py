"""``waba-gateway verify-callback``: the verdicts as pure tables, then the command over real TLS
against the real gateway and against servers that get one thing wrong."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from callbacks import (
    CA_ISSUERS_URL,
    VERIFY_TOKEN,
    gateway_config,
    leaf_with_ca_issuers,
    refused_url,
    running_gateway,
    server_context,
    serving,
)
from ci import unavailable
from cryptography import x509
from pki import Pki
from yarl import URL

from gateway.cli import main
from gateway.onboarding.meta_client import (
    classify_tls_error,
    describe_failure,
    explain_unknown_issuer,
)
from gateway.onboarding.verify_callback import judge, verify

CHALLENGE = "1158201444"
UNKNOWN_ISSUER = "untrusted server certificate or incomplete chain:"


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("status", "body", "kind", "words"),
    [
        (200, b"1158201444", "verified", "Meta would accept it"),
        (200, b"1158201444\n", "wrong_body", "the challenge with a trailing newline"),
        (200, b" 1158201444", "wrong_body", "leading whitespace ' '"),
        (200, b"1158201444\r\n", "wrong_body", "trailing '\\r\\n'"),
        (200, b'"1158201444"', "wrong_body", "the challenge in quotes"),
        (200, b'{"hub.challenge": "1158201444"}', "wrong_body", "a JSON object"),
        (200, b"[1158201444]", "wrong_body", "a JSON array"),
        (200, b"", "wrong_body", "the body is empty"),
        (200, b"challenge=1158201444", "wrong_body", "holds the challenge among other text"),
        (200, b"ok", "wrong_body", "'ok' is not the challenge '1158201444'"),
        # Nested deeper than Python's JSON parser goes: a body like any other, not a traceback.
        (200, b"[" * 65_537, "wrong_body", "'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["),
        (403, b"hub.verify_token does not match", "token_refused", "verify token refused"),
        (400, b"", "token_refused", "HTTP 400"),
        (401, b"", "token_refused", "HTTP 401"),
        (404, b"", "wrong_status", "check its path"),
        (500, b"1158201444", "wrong_status", "HTTP 500"),
        (301, b"", "wrong_status", "HTTP 301"),
        (204, b"", "wrong_status", "HTTP 204"),
    ],
)
def test_judges_answers_as_meta_does(status: int, body: bytes, kind: str, words: str) -> None:
    """Only 200 with the challenge byte for byte verifies; every miss says what was wrong."""
    verdict = judge(status, body, CHALLENGE)
    assert verdict.kind == kind
    assert verdict.accepted == (kind == "verified")
    assert words in verdict.message


def test_shortens_long_whitespace_around_the_challenge() -> None:
    """Up to 64 KiB of whitespace around the challenge is named, not printed in full."""
    verdict = judge(200, b" " * 1000 + CHALLENGE.encode() + b" " * 65_000, CHALLENGE)
    assert verdict.kind == "wrong_body"
    assert "leading whitespace '     " in verdict.message
    assert "trailing '     " in verdict.message
    assert len(verdict.message) < 400


@pytest.mark.parametrize(
    ("code", "message", "label"),
    [
        (10, "certificate has expired", "expired server certificate:"),
        (9, "certificate is not yet valid", "server certificate not yet valid:"),
        (18, "self-signed certificate", "untrusted server certificate: it is self-signed"),
        (19, "self-signed certificate in certificate chain", "untrusted server certificate:"),
        (20, "unable to get local issuer certificate", UNKNOWN_ISSUER),
        (21, "unable to verify the first certificate", UNKNOWN_ISSUER),
        (62, "Hostname mismatch, certificate is not valid for 'x.test'.", "hostname mismatch:"),
        (64, "IP address mismatch, certificate is not valid for '::1'.", "hostname mismatch:"),
        (23, "certificate revoked", "revoked server certificate:"),
        (26, "unsupported certificate purpose", "server certificate refused:"),
    ],
)
def test_names_certificate_failures_by_verify_code(code: int, message: str, label: str) -> None:
    """Each OpenSSL verify code gets its own plain-words label."""
    assert classify_tls_error(verify_error(code, message)).startswith(label)


def test_classifies_verification_error_wrapped_by_another() -> None:
    """The ssl error is found behind the exception that wraps it."""
    wrapper = OSError("cannot connect")
    wrapper.__cause__ = verify_error(10, "certificate has expired")
    assert classify_tls_error(wrapper).startswith("expired server certificate:")


def test_names_a_missing_client_certificate() -> None:
    """A server's 'certificate required' alert asks for --cert and --key."""
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert "pass --cert and --key" in classify_tls_error(alert)


@pytest.mark.parametrize(
    ("error", "sent_certificate", "kind", "start"),
    [
        (TimeoutError(), True, "timeout", "timeout: no answer within 2 s"),
        (verify_error(10, "certificate has expired"), True, "tls", "expired server certificate:"),
        (aiohttp.ServerDisconnectedError(), True, "closed", "the server closed"),
        (
            aiohttp.ClientOSError(errno.ECONNRESET, "reset"),
            False,
            "closed",
            "the server closed",
        ),
        (aiohttp.InvalidURL("https://x/?hub.verify_token=secret"), True, "connection", "request"),
    ],
)
def test_describes_requests_without_an_answer(
    error: BaseException, sent_certificate: bool, kind: str, start: str
) -> None:
    """Timeouts, TLS failures and hang-ups each get a kind; a URL's text is never repeated."""
    described = describe_failure(error, 2.0, sent_certificate=sent_certificate)
    assert described[0] == kind
    assert described[1].startswith(start)
    assert ("pass --cert and --key" in described[1]) == (not sent_certificate)
    assert "secret" not in described[1]


def certificates(*blobs: bytes) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(blob) for blob in blobs]


def test_explains_a_lone_certificate_with_a_published_issuer_as_incomplete_chain() -> None:
    """A leaf sent alone that names where its issuer is published lacks its intermediate."""
    leaf, _ = leaf_with_ca_issuers(trustme.CA().create_child_ca())
    explanation = explain_unknown_issuer(certificates(leaf))
    assert explanation is not None
    assert explanation.startswith("incomplete chain: the server sends only its own certificate")
    assert CA_ISSUERS_URL in explanation


def test_explains_a_chain_to_an_unknown_root_as_untrusted() -> None:
    """A chain whose last certificate names no published issuer leads to an untrusted CA."""
    root = trustme.CA(organization_name="Private Root")
    chain = root.create_child_ca().issue_cert("localhost").cert_chain_pems
    explanation = explain_unknown_issuer(certificates(*(blob.bytes() for blob in chain)))
    assert explanation is not None
    assert explanation.startswith("untrusted server certificate: issued by ")
    assert "Private Root" in explanation


def test_explains_nothing_without_a_chain() -> None:
    """No certificates seen: no refinement of the verify code's reason."""
    assert explain_unknown_issuer([]) is None


# -- the command against the real gateway -------------------------------------------------------


def meta_client(pki: Pki) -> list[str]:
    return ["--cert", str(pki.client_chain_file), "--key", str(pki.client_key_file)]


async def verify_callback(*argv: str) -> int:
    return await asyncio.to_thread(main, ["verify-callback", *argv])


async def test_verifies_the_gateway_with_meta_client_certificate(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Right token, server CA trusted, Meta's chain presented: verified, exit 0."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await verify_callback(
            url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file),
            *meta_client(pki),
        )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("verified: HTTP 200")


async def test_reports_refused_verify_token(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gateway's 403 for a wrong token reads as a refused verify token, exit 1."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await verify_callback(
            url, "--verify-token", "not-the-token", "--ca-file", str(pki.server_ca_file),
            *meta_client(pki),
        )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("verify token refused: HTTP 403")
    assert "not-the-token" not in out


async def test_reports_a_missing_client_certificate_when_mtls_is_required(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --cert/--key the gateway refuses the handshake; the report says what to pass."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await verify_callback(
            url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file)
        )
    out = capsys.readouterr().out
    assert code == 1
    assert "pass --cert and --key" in out
    assert VERIFY_TOKEN not in out


async def test_verifies_without_client_certificate_when_mtls_is_optional(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """During the roll-out window (client_auth optional) the bare GET verifies."""
    config = gateway_config(pki, tmp_path, client_auth="optional")
    async with running_gateway(config) as (_, url):
        code = await verify_callback(
            url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file)
        )
    assert code == 0
    assert capsys.readouterr().out.startswith("verified:")


async def test_reports_untrusted_certificate_from_the_system_store(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test server's CA is not public: without --ca-file Meta would not trust it."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await verify_callback(url, "--verify-token", VERIFY_TOKEN, *meta_client(pki))
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("untrusted server certificate: issued by ")
    assert "publicly trusted" in out


async def test_reports_hostname_mismatch(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server certificate names localhost and 127.0.0.1, not 127.0.0.2."""
    config = gateway_config(pki, tmp_path, host="127.0.0.2")
    try:
        gateway = running_gateway(config)
        started = await gateway.__aenter__()
    except OSError as exc:  # loopback addresses beyond 127.0.0.1 are missing on some systems
        unavailable(f"cannot listen on 127.0.0.2: {exc}")
    try:
        code = await verify_callback(
            started[1], "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file),
            *meta_client(pki),
        )  # fmt: skip
    finally:
        await gateway.__aexit__(None, None, None)
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("hostname mismatch: ")
    assert "127.0.0.2" in out


# -- the command against servers that get one thing wrong ---------------------------------------


async def test_reports_wrong_bodies_exactly(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON instead of the bare challenge, or the challenge plus a newline: each named, exit 1."""
    leaf = pki.server_ca.issue_cert("127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    context = server_context(tmp_path, chain, leaf.private_key_pem.bytes())
    answers = {
        "json": lambda challenge: web.json_response({"hub.challenge": challenge}),
        "newline": lambda challenge: web.Response(text=challenge + "\n"),
    }
    expected = {"json": "a JSON object", "newline": "the challenge with a trailing newline"}
    for name, make in answers.items():

        async def answer(request: web.Request, make: object = make) -> web.Response:
            assert callable(make)
            response: web.Response = make(request.query["hub.challenge"])
            return response

        async with serving(answer, context) as url:
            code = await verify_callback(
                url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file)
            )
        out = capsys.readouterr().out
        assert code == 1, name
        assert out.startswith("wrong body: HTTP 200"), name
        assert expected[name] in out, name


async def test_never_prints_the_verify_token_a_callback_echoes(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A callback echoing its whole query string shows up with the token hidden."""
    leaf = pki.server_ca.issue_cert("127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    context = server_context(tmp_path, chain, leaf.private_key_pem.bytes())

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.query_string)

    async with serving(echo, context) as url:
        code = await verify_callback(
            url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file)
        )
    out = capsys.readouterr().out
    assert code == 1
    assert VERIFY_TOKEN not in out
    assert "<verify token>" in out


@pytest.mark.parametrize(
    ("writes", "code", "words"),
    [
        pytest.param(
            ["{challenge}", "\n"], 1, "the challenge with a trailing newline", id="newline"
        ),
        pytest.param(["{challenge}", " ", "ok"], 1, "the challenge among other text", id="text"),
        pytest.param(["{head}", "{tail}"], 0, "verified:", id="split"),
    ],
)
async def test_judges_the_whole_body_however_it_is_written(
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    writes: list[str],
    code: int,
    words: str,
) -> None:
    """Meta compares the whole body with the challenge: what a callback writes after a pause
    counts (the challenge, then a newline, is refused), and a challenge written in two parts is
    still the challenge."""
    leaf = pki.server_ca.issue_cert("127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    context = server_context(tmp_path, chain, leaf.private_key_pem.bytes())

    async def answer(request: web.Request) -> web.StreamResponse:
        challenge = request.query["hub.challenge"]
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for part in writes:
            text = part.format(challenge=challenge, head=challenge[:4], tail=challenge[4:])
            await response.write(text.encode())
            await asyncio.sleep(0.2)  # each write arrives on its own
        await response.write_eof()
        return response

    async with serving(answer, context) as url:
        exit_code = await verify_callback(
            url, "--verify-token", VERIFY_TOKEN, "--ca-file", str(pki.server_ca_file)
        )
    out = capsys.readouterr().out
    assert exit_code == code, out
    assert words in out


def _raw_token(request: web.Request) -> str:
    """hub.verify_token as it came over the wire, percent-encoded by the sender."""
    query = request.raw_path.partition("?")[2]
    pairs = (pair.partition("=") for pair in query.split("&"))
    return next(value for name, _, value in pairs if name == "hub.verify_token")


ECHOES: dict[str, Callable[[web.Request], str]] = {
    "raw-query": lambda request: request.raw_path.partition("?")[2],
    "raw-value": _raw_token,
    "decoded-value": lambda request: request.query["hub.verify_token"],
    "json": lambda request: json.dumps({"token": request.query["hub.verify_token"]}),
}


@pytest.mark.parametrize("echo", ECHOES)
@pytest.mark.parametrize(
    "token",
    [
        pytest.param("Zm9v/YmFy+c2VjcmV0==", id="base64"),
        pytest.param("s3cr3t pass&word=42", id="space-ampersand"),
        pytest.param("pässwörd/ümlaut", id="non-ascii"),
    ],
)
async def test_never_prints_any_form_of_a_verify_token_a_callback_echoes(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], token: str, echo: str
) -> None:
    """A callback echoing the token raw (as the request sent it: '/' as is, '+' and '=' as
    %2B and %3D), decoded or in JSON shows up with the token masked, and no part of it is
    printed."""
    leaf = pki.server_ca.issue_cert("127.0.0.1")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    context = server_context(tmp_path, chain, leaf.private_key_pem.bytes())

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=ECHOES[echo](request))

    async with serving(answer, context) as url:
        code = await verify_callback(
            url, "--verify-token", token, "--ca-file", str(pki.server_ca_file)
        )
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert code == 1
    assert "<verify token>" in printed
    pieces = {*re.findall(r"\w{4,}", token), *re.findall(r"[A-Za-z0-9]{4,}", token)}
    assert [piece for piece in pieces if piece in printed] == [], printed


async def test_reports_incomplete_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server sending its leaf without the intermediate fails; with it, it verifies."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf, key = leaf_with_ca_issuers(intermediate)
    root_file = tmp_path / "root.pem"
    root.cert_pem.write_to_path(str(root_file))

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=request.query["hub.challenge"])

    outcomes = {}
    for name, chain in (("leaf", leaf), ("full", leaf + intermediate.cert_pem.bytes())):
        context = server_context(tmp_path, chain, key)
        async with serving(answer, context) as url:
            code = await verify_callback(url, "--verify-token", "t", "--ca-file", str(root_file))
        outcomes[name] = (code, capsys.readouterr().out)
    assert outcomes["full"] == (0, outcomes["full"][1])
    assert outcomes["full"][1].startswith("verified:")
    code, out = outcomes["leaf"]
    assert code == 1
    assert out.startswith("incomplete chain: the server sends only its own certificate")


async def test_reports_expired_server_certificate(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server certificate past its not_after is named as expired."""
    now = datetime.now(UTC)
    leaf = pki.server_ca.issue_cert(
        "127.0.0.1", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    context = server_context(tmp_path, chain, leaf.private_key_pem.bytes())

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=request.query["hub.challenge"])

    async with serving(answer, context) as url:
        code = await verify_callback(
            url, "--verify-token", "t", "--ca-file", str(pki.server_ca_file)
        )
    assert code == 1
    assert capsys.readouterr().out.startswith("expired server certificate:")


async def test_reports_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: connection refused, exit 1."""
    code = await verify_callback(refused_url(), "--verify-token", "t")
    assert code == 1
    assert capsys.readouterr().out.startswith("connection refused: nothing listens on 127.0.0.1:")


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[int]:
    """A server on loopback that accepts connections and never answers: its port."""
    silent: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_reports_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that accepts and never answers: a timeout, exit 1."""
    async with _silent_server() as port:
        code = await verify_callback(
            f"https://127.0.0.1:{port}/webhook", "--verify-token", "t", "--timeout-s", "0.2"
        )
    assert code == 1
    assert capsys.readouterr().out.startswith("timeout: no answer within 0.2 s")


def test_refuses_plain_http_as_meta_does(capsys: pytest.CaptureFixture[str]) -> None:
    """Meta only calls https:// callbacks: an http:// URL is not verified, exit 1."""
    assert main(["verify-callback", "http://127.0.0.1:9/webhook", "--verify-token", "t"]) == 1
    assert capsys.readouterr().out.startswith("not https: Meta only calls https:// callbacks")


@pytest.mark.parametrize(
    "argv",
    [
        ["ftp://example.com/webhook", "--verify-token", "t"],
        ["https://example.com:http/webhook", "--verify-token", "t"],
        ["webhook", "--verify-token", "t"],
        ["https://example.com/webhook", "--verify-token", ""],
        ["https://example.com/webhook", "--verify-token", "t", "--cert", "client.pem"],
        ["https://example.com/webhook", "--verify-token", "t", "--ca-file", "/nonexistent.pem"],
        ["https://example.com/webhook", "--verify-token", "t", "--timeout-s", "0"],
        # "No limit" is not a timeout aiohttp can set: it failed with a traceback.
        ["https://example.com/webhook", "--verify-token", "t", "--timeout-s", "inf"],
        ["https://example.com/webhook", "--verify-token", "t", "--timeout-s", "nan"],
        ["https://gw..example.com/webhook", "--verify-token", "t"],
        ["https://" + "a" * 64 + ".example.com/webhook", "--verify-token", "t"],
    ],
)
def test_refuses_bad_input_with_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed URL (a host name with an empty label or one over 63 characters among them),
    empty token, half a client certificate or unreadable CA file: one line, exit 2."""
    assert main(["verify-callback", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1


async def test_a_host_the_resolver_cannot_encode_is_a_verdict_not_an_exception() -> None:
    """Should such a URL reach verify() without callback_url, the answer is still a verdict."""
    verdict = await verify(
        URL("https://gw..example.com/webhook"),
        "t",
        context=ssl.create_default_context(),
        timeout_s=5,
    )
    assert verdict.kind == "connection"
    assert verdict.message.startswith("cannot resolve the host name: ")


async def test_tells_nothing_listening_from_no_answer() -> None:
    """A refused connection and a server that never answers are kinds of their own, so that
    doctor can tell them from a listener that hangs up on a client without a certificate."""
    refused = await verify(
        URL(refused_url()), "t", context=ssl.create_default_context(), timeout_s=5
    )
    async with _silent_server() as port:
        timed_out = await verify(
            URL(f"https://127.0.0.1:{port}/webhook"),
            "t",
            context=ssl.create_default_context(),
            timeout_s=0.2,
        )
    assert (refused.kind, timed_out.kind) == ("refused", "timeout")
