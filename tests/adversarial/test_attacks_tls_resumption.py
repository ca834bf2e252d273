"""Session resumption across a reload of the client trust (``tls.client_ca_file``,
``tls.crl_file``).

A resumed handshake carries no client certificate: the server takes the one the session was
made with and verifies nothing again (RFC 5077 section 4 for TLS 1.2 tickets, RFC 5246
section 7.3 for session IDs, RFC 8446 section 2.2 for TLS 1.3). A session made before a reload
that takes a CA out of the bundle, or revokes Meta's certificate, must therefore not be resumed
after it: the client gets a full handshake, judged by the trust now configured.

The client is a blocking socket in a thread: asyncio's streams cannot offer a saved session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import APP_SECRET, VERIFY_TOKEN, message_body, meta_signature
from loopback_ports import free_port
from pki import Pki

from gateway.config import load_config
from gateway.runtime.gateway import Gateway

TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Reply:
    """One connection's outcome: the answer's status (0: refused), and its session."""

    status: int
    session: ssl.SSLSession | None
    resumed: bool


@dataclass(frozen=True, slots=True)
class Folder:
    """The configuration file and the trust files it names, which a test rewrites in place."""

    config: Path
    ca: Path
    crl: Path


def _post(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> Reply:
    body = message_body("resumed or not")
    request = (
        b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"X-Hub-Signature-256: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (meta_signature(body).encode(), len(body), body)
    )
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            resumed = tls.session_reused
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
            return Reply(status, tls.session, bool(resumed))
    except OSError:  # ssl.SSLError, a reset: refused
        return Reply(0, None, False)


async def post(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> Reply:
    return await asyncio.to_thread(_post, port, context, session)


def _write_config(folder: Folder, pki: Pki, session_tickets: int) -> None:
    folder.config.write_text(
        textwrap.dedent(f"""\
        [listen]
        host = "127.0.0.1"
        port = {free_port()}
        workers = 1
        [tls]
        cert_file = "{pki.server_chain_file}"
        key_file = "{pki.server_key_file}"
        client_ca_file = "{folder.ca}"
        crl_file = "{folder.crl}"
        session_tickets = {session_tickets}
        [meta]
        verify_tokens = ["{VERIFY_TOKEN}"]
        app_secrets = ["{APP_SECRET}"]
        [outbox]
        path = "outbox.sqlite3"
        [admin]
        enabled = false
        """)
    )


@asynccontextmanager
async def running(
    pki: Pki, tmp_path: Path, session_tickets: int
) -> AsyncIterator[tuple[Gateway, Folder]]:
    """A gateway trusting Meta's root, with a CRL that revokes nothing, read from files."""
    folder = Folder(tmp_path / "gateway.toml", tmp_path / "ca.pem", tmp_path / "crl.pem")
    folder.ca.write_bytes(pki.client_ca_file.read_bytes())
    folder.crl.write_bytes(pki.empty_crl_file.read_bytes())
    _write_config(folder, pki, session_tickets)
    async with Gateway(load_config(folder.config)) as gateway:
        yield gateway, folder


def _untrust_the_root(pki: Pki, folder: Folder) -> None:
    # A CA rotation's end: the bundle now holds another root only.
    folder.ca.write_bytes(pki.server_ca_file.read_bytes())


def _revoke_the_client(pki: Pki, folder: Folder) -> None:
    folder.crl.write_bytes(pki.client_revoked_crl_file.read_bytes())


# How a client resumes: a TLS 1.2 ticket (RFC 5077), a TLS 1.2 session ID (the server's cache;
# the client asks for no ticket), a TLS 1.3 ticket (tls.session_tickets = 1).
RESUMPTIONS = {
    "tls1.2-ticket": (ssl.TLSVersion.TLSv1_2, False, 0),
    "tls1.2-session-id": (ssl.TLSVersion.TLSv1_2, True, 0),
    "tls1.3-ticket": (ssl.TLSVersion.TLSv1_3, False, 1),
}


def _client(pki: Pki, resumption: str) -> tuple[ssl.SSLContext, int]:
    version, no_ticket, session_tickets = RESUMPTIONS[resumption]
    context = pki.client_context("meta")
    context.minimum_version = context.maximum_version = version
    if no_ticket:
        context.options |= ssl.OP_NO_TICKET
    return context, session_tickets


@pytest.mark.parametrize("resumption", list(RESUMPTIONS))
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_untrust_the_root, id="root-taken-out-of-the-client-ca-bundle"),
        pytest.param(_revoke_the_client, id="client-certificate-revoked-by-the-crl"),
    ],
)
async def test_a_session_made_before_the_trust_changed_is_not_resumed_after_it(
    pki: Pki, tmp_path: Path, resumption: str, change: Callable[[Pki, Folder], None]
) -> None:
    """Before the reload the session resumes (so the case is real); after it, a full
    handshake refuses the certificate, and offering the old session changes nothing."""
    context, session_tickets = _client(pki, resumption)
    async with running(pki, tmp_path, session_tickets) as (gateway, folder):
        first = await post(gateway.port, context, None)
        assert first.status == 200
        again = await post(gateway.port, context, first.session)
        assert (again.status, again.resumed) == (200, True)
        change(pki, folder)

        assert gateway.reload().ok

        assert (await post(gateway.port, context, None)).status == 0
        after = await post(gateway.port, context, again.session or first.session)
        assert (after.status, after.resumed) == (0, False)


@pytest.mark.parametrize("resumption", list(RESUMPTIONS))
async def test_sessions_made_after_a_reload_resume_as_before(
    pki: Pki, tmp_path: Path, resumption: str
) -> None:
    """A reload costs each client one full handshake, no more: the sessions made after it
    resume."""
    context, session_tickets = _client(pki, resumption)
    async with running(pki, tmp_path, session_tickets) as (gateway, _):
        assert (await post(gateway.port, context, None)).status == 200
        assert gateway.reload().ok
        first = await post(gateway.port, context, None)
        assert (first.status, first.resumed) == (200, False)
        again = await post(gateway.port, context, first.session)
        assert (again.status, again.resumed) == (200, True)
        third = await post(gateway.port, context, again.session)
        assert (third.status, third.resumed) == (200, True)


async def _keep_alive_post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str
) -> bytes:
    """One request on a kept-alive connection; its answer's head."""
    body = message_body(text)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"X-Hub-Signature-256: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (meta_signature(body).encode(), len(body), body)
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT_S)
    return head


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        pytest.param(_untrust_the_root, False, id="root-taken-out-of-the-client-ca-bundle"),
        pytest.param(_revoke_the_client, False, id="client-certificate-revoked-by-the-crl"),
        pytest.param(lambda pki, folder: None, True, id="trust-unchanged"),
    ],
)
async def test_a_keep_alive_connection_accepted_under_the_trust_a_reload_replaced_is_closed(
    pki: Pki, tmp_path: Path, change: Callable[[Pki, Folder], None], kept: bool
) -> None:
    """A connection whose certificate was checked under a trust a reload takes back (a root
    taken out, a revocation) ends at the reload: a keep-alive client must not go on posting on
    it for as long as it likes. A reload that leaves the trust as it was keeps it open."""
    async with running(pki, tmp_path, 0) as (gateway, folder):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.port, ssl=pki.client_context("meta"), server_hostname="localhost"
        )
        try:
            assert (await _keep_alive_post(reader, writer, "before")).startswith(b"HTTP/1.1 200")
            change(pki, folder)
            assert gateway.reload().ok
            if kept:
                head = await _keep_alive_post(reader, writer, "after")
                assert head.startswith(b"HTTP/1.1 200")
                assert b"Connection: keep-alive" in head
            else:
                assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
                assert (await post(gateway.port, pki.client_context("meta"), None)).status == 0
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
