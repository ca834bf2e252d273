"""gateway.edge.tls over real sockets: a real asyncio TLS server, real certificates from ``pki``.

With TLS 1.3 the client finishes its handshake before the server has judged the client
certificate, so a refusal may only show on the client's first read. :func:`exchange` therefore
connects, writes *and* reads, and the handshake tests run under TLS 1.2 and 1.3 alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from ci import unavailable
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pki import ClientKind, Pki

from gateway.config import META_CLIENT_CN, ClientAuth, TlsConfig
from gateway.edge.identity import check_client_identity
from gateway.edge.tls import build_server_context, client_ca_subjects, handshake_failure
from gateway.errors import CertificateError, IdentityRejected

TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Seen:
    """What the server saw of one accepted connection."""

    peercert: Mapping[str, Any] | None
    alpn: str | None


@dataclass(frozen=True, slots=True)
class Server:
    """A running test server and what it made of each connection."""

    port: int
    seen: list[Seen]
    # The server's own reason for each failed handshake: the client rarely learns it.
    refusals: list[OSError]
    finished: asyncio.Semaphore

    async def settled(self) -> None:
        """Wait until the server is done with one more connection."""
        async with asyncio.timeout(TIMEOUT_S):
            await self.finished.acquire()


@dataclass(frozen=True, slots=True)
class Outcome:
    """The client's view: the server's reply, or the error that ended the connection."""

    reply: bytes
    error: BaseException | None

    @property
    def accepted(self) -> bool:
        return self.reply == b"ok"


@asynccontextmanager
async def serving(context: ssl.SSLContext) -> AsyncIterator[Server]:
    """A TLS server on 127.0.0.1 that reads one line, replies ``ok`` and closes.

    TLS starts inside the handler (``start_tls``, the same asyncio TLS machinery as
    ``start_server(ssl=...)``) so that the server's reason for a failed handshake is recorded:
    asyncio drops the connection without sending the alert, so the client sees only a reset or
    an empty read.
    """
    server = Server(port=0, seen=[], refusals=[], finished=asyncio.Semaphore(0))

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(context)
            ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
            server.seen.append(Seen(ssl_object.getpeercert(), ssl_object.selected_alpn_protocol()))
            # Read before replying: closing with unread data would send a TCP reset, which the
            # client could not tell from a refusal.
            await reader.readline()
            writer.write(b"ok")
            await writer.drain()
        except OSError as exc:  # ssl.SSLError included
            server.refusals.append(exc)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
            server.finished.release()

    listener = await asyncio.start_server(reply, "127.0.0.1", 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        yield dataclasses.replace(server, port=port)


async def exchange(server: Server, context: ssl.SSLContext) -> Outcome:
    """Connect, write, read to the end; a TLS error, a reset or an empty read means refused."""
    writer: asyncio.StreamWriter | None = None
    try:
        # A hang is a bug, not a refusal: TimeoutError is left to fail the test.
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
            )
            writer.write(b"ping\n")
            await writer.drain()
            return Outcome(await reader.read(), None)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return Outcome(b"", exc)
    finally:
        if writer is not None:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


async def connect(tls: TlsConfig, client: ssl.SSLContext) -> tuple[Outcome, Server]:
    """One exchange with a fresh server built from ``tls``, once the server is done with it."""
    async with serving(build_server_context(tls)) as server:
        outcome = await exchange(server, client)
        await server.settled()
        return outcome, server


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def version(request: pytest.FixtureRequest) -> ssl.TLSVersion:
    """The client's only TLS version: a 1.2 client learns of a refusal in the handshake, a 1.3
    client only when it reads."""
    value: ssl.TLSVersion = request.param
    return value


Client = Callable[[ClientKind], ssl.SSLContext]


@pytest.fixture
def client(pki: Pki, version: ssl.TLSVersion) -> Client:
    """Makes client contexts of any kind, held to the test's TLS version."""

    def make(kind: ClientKind) -> ssl.SSLContext:
        context = pki.client_context(kind)
        context.minimum_version = context.maximum_version = version
        return context

    return make


def assert_refused(outcome: Outcome, server: Server, reason: str) -> None:
    """The client was refused, the handler never ran, and the server says ``reason``."""
    assert not outcome.accepted, outcome
    assert server.seen == []
    assert [reason in str(exc) for exc in server.refusals] == [True], server.refusals


def accepted_cn(outcome: Outcome, server: Server, client_auth: ClientAuth) -> str | None:
    """The CN of the one accepted connection, as the application's identity check reads it."""
    assert outcome.accepted, outcome
    assert server.refusals == []
    [connection] = server.seen
    return check_client_identity(connection.peercert, (META_CLIENT_CN,), client_auth)


# client_auth = "required" ------------------------------------------------------------------------


async def test_accepts_meta_client_with_intermediate(pki: Pki, client: Client) -> None:
    """Leaf + intermediate against the root alone: accepted, and the server sees Meta's CN."""
    outcome, server = await connect(pki.tls_config(), client("meta"))
    assert accepted_cn(outcome, server, "required") == META_CLIENT_CN


async def test_rejects_client_without_intermediate(pki: Pki, client: Client) -> None:
    """The bundle holds the root only, so a leaf sent without its intermediate cannot chain."""
    outcome, server = await connect(pki.tls_config(), client("leaf_only"))
    assert_refused(outcome, server, "unable to get local issuer certificate")


async def test_rejects_client_from_impostor_ca(pki: Pki, client: Client) -> None:
    """The right CN under a root that is not in the bundle is refused."""
    outcome, server = await connect(pki.tls_config(), client("impostor"))
    assert_refused(outcome, server, "unable to get local issuer certificate")


async def test_rejects_expired_client_certificate(pki: Pki, client: Client) -> None:
    """Meta's chain and CN, but past not_after: refused."""
    outcome, server = await connect(pki.tls_config(), client("expired"))
    assert_refused(outcome, server, "certificate has expired")


async def test_rejects_client_without_certificate_when_required(pki: Pki, client: Client) -> None:
    """No certificate under client_auth = "required" fails the handshake."""
    outcome, server = await connect(pki.tls_config(), client("none"))
    assert_refused(outcome, server, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


async def test_wrong_cn_passes_tls_and_fails_identity_check(pki: Pki, client: Client) -> None:
    """A valid chain with CN evil.example.com passes TLS; the CN check is what refuses it."""
    outcome, server = await connect(pki.tls_config(), client("wrong_cn"))
    with pytest.raises(IdentityRejected, match=re.escape("'evil.example.com' is not accepted")):
        accepted_cn(outcome, server, "required")


# client_auth = "optional" and "off" --------------------------------------------------------------


async def test_optional_accepts_client_without_certificate(pki: Pki, client: Client) -> None:
    """Under "optional" a client without a certificate gets through, with no CN."""
    outcome, server = await connect(pki.tls_config("optional"), client("none"))
    assert accepted_cn(outcome, server, "optional") is None


async def test_optional_accepts_meta_client(pki: Pki, client: Client) -> None:
    """Under "optional" Meta's chain is accepted and its CN is seen."""
    outcome, server = await connect(pki.tls_config("optional"), client("meta"))
    assert accepted_cn(outcome, server, "optional") == META_CLIENT_CN


async def test_optional_rejects_impostor(pki: Pki, client: Client) -> None:
    """Under "optional" a presented certificate is still verified: the impostor is refused."""
    outcome, server = await connect(pki.tls_config("optional"), client("impostor"))
    assert_refused(outcome, server, "unable to get local issuer certificate")


async def test_off_does_not_request_client_certificate(pki: Pki, client: Client) -> None:
    """Under "off" the server asks for no certificate, so even Meta's is not seen."""
    outcome, server = await connect(pki.tls_config("off"), client("meta"))
    assert accepted_cn(outcome, server, "off") is None
    assert not server.seen[0].peercert


# Revocation --------------------------------------------------------------------------------------


async def test_rejects_client_revoked_by_crl(pki: Pki, client: Client) -> None:
    """A client leaf listed in the intermediate's CRL is refused."""
    tls = pki.tls_config(crl_file=pki.client_revoked_crl_file)
    outcome, server = await connect(tls, client("meta"))
    assert_refused(outcome, server, "certificate revoked")


async def test_accepts_client_absent_from_crl(pki: Pki, client: Client) -> None:
    """With a CRL that revokes nothing, Meta's chain is accepted."""
    outcome, server = await connect(pki.tls_config(crl_file=pki.empty_crl_file), client("meta"))
    assert accepted_cn(outcome, server, "required") == META_CLIENT_CN


# Protocol ----------------------------------------------------------------------------------------


def lower_to_tls_1_1(context: ssl.SSLContext, *, maximum: bool) -> None:
    # Python deprecates the TLSv1_1 constant itself; the warning is expected, not a failure.
    with pytest.warns(DeprecationWarning, match="TLSv1_1"):
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    if maximum:
        with pytest.warns(DeprecationWarning, match="TLSv1_1"):
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 will not speak TLS 1.1 at its default security level: level 0 lets it try.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")


async def test_refuses_tls_1_1_client(pki: Pki) -> None:
    """A client limited to TLS 1.1 is refused by the server's minimum version."""
    probe = pki.client_context("meta")
    lower_to_tls_1_1(probe, maximum=True)
    outcome, server = await connect(pki.tls_config(), probe)
    assert_refused(outcome, server, "UNSUPPORTED_PROTOCOL")


async def test_tls_1_1_probe_connects_when_server_minimum_lowered(pki: Pki) -> None:
    """The TLS 1.1 probe itself works: only the server's minimum version refuses it."""
    probe = pki.client_context("meta")
    lower_to_tls_1_1(probe, maximum=True)
    server_context = build_server_context(pki.tls_config())
    lower_to_tls_1_1(server_context, maximum=False)
    async with serving(server_context) as server:
        outcome = await exchange(server, probe)
        await server.settled()
    assert accepted_cn(outcome, server, "required") == META_CLIENT_CN


async def test_selects_http_1_1_by_alpn(pki: Pki) -> None:
    """A client offering h2 and http/1.1 is told http/1.1."""
    offering_h2 = pki.client_context("meta")
    offering_h2.set_alpn_protocols(["h2", "http/1.1"])
    outcome, server = await connect(pki.tls_config(), offering_h2)
    assert outcome.accepted, outcome
    assert [connection.alpn for connection in server.seen] == ["http/1.1"]


@pytest.mark.parametrize(
    ("client_auth", "verify_mode"),
    [("required", ssl.CERT_REQUIRED), ("optional", ssl.CERT_OPTIONAL), ("off", ssl.CERT_NONE)],
)
def test_builds_hardened_context(
    pki: Pki, client_auth: ClientAuth, verify_mode: ssl.VerifyMode
) -> None:
    """TLS 1.2 minimum, no compression or renegotiation, tickets kept, the bundle's root only."""
    context = build_server_context(pki.tls_config(client_auth))
    assert context.verify_mode == verify_mode
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_NO_TICKET
    # No system store: the only trust anchor is the configured root.
    serials = [int(str(ca["serialNumber"]), 16) for ca in context.get_ca_certs()]
    assert serials == [root_serial(pki)]


def root_serial(pki: Pki) -> int:
    return x509.load_pem_x509_certificate(pki.meta_root_ca.cert_pem.bytes()).serial_number


# File problems -----------------------------------------------------------------------------------

BadConfig = Callable[[Pki, Path], tuple[TlsConfig, str]]


def missing_cert(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = tmp / "missing.pem"
    return replace(pki, cert_file=path), f"tls.cert_file = {str(path)!r}: cannot read: No such"


def missing_key(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = tmp / "missing.key"
    return replace(pki, key_file=path), f"tls.key_file = {str(path)!r}: cannot read: No such"


def mismatched_key(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = pki.impostor_key_file
    message = f"tls.key_file = {str(path)!r}: does not match tls.cert_file"
    return replace(pki, key_file=path), message


def certificate_as_key(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = pki.server_chain_file
    return replace(pki, key_file=path), f"tls.key_file = {str(path)!r}: no usable PEM private key"


def encrypted_key(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    key = serialization.load_pem_private_key(pki.server_key_file.read_bytes(), password=None)
    path = write(
        tmp / "encrypted.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        ),
    )
    return replace(pki, key_file=path), f"tls.key_file = {str(path)!r}: the key is encrypted"


def garbage_cert(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = write(tmp / "garbage.pem", b"not a certificate\n")
    return replace(pki, cert_file=path), f"tls.cert_file = {str(path)!r}: no PEM certificate found"


def empty_ca_bundle(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = write(tmp / "empty-ca.pem", b"")
    return (
        replace(pki, client_ca_file=path),
        f"tls.client_ca_file = {str(path)!r}: no PEM certificate found",
    )


def missing_ca_bundle(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = tmp / "missing-ca.pem"
    return replace(pki, client_ca_file=path), f"tls.client_ca_file = {str(path)!r}: cannot read"


def unset_ca_bundle(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    return replace(pki, client_ca_file=None), "tls.client_ca_file is not set"


def certificates_as_crl(pki: Pki, tmp: Path) -> tuple[TlsConfig, str]:
    path = pki.server_ca_file
    return (
        replace(pki, crl_file=path),
        f"tls.crl_file = {str(path)!r}: holds CERTIFICATE; only X509 CRL is allowed",
    )


def replace(pki: Pki, **changes: Any) -> TlsConfig:
    return dataclasses.replace(pki.tls_config(), **changes)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "bad_config",
    [
        missing_cert,
        missing_key,
        mismatched_key,
        certificate_as_key,
        encrypted_key,
        garbage_cert,
        empty_ca_bundle,
        missing_ca_bundle,
        unset_ca_bundle,
        certificates_as_crl,
    ],
)
def test_names_key_and_file_of_bad_certificate_files(
    pki: Pki, tmp_path: Path, bad_config: BadConfig
) -> None:
    """Each file problem is a CertificateError naming the config key and the file."""
    tls, message = bad_config(pki, tmp_path)
    with pytest.raises(CertificateError, match=f"^{re.escape(message)}"):
        build_server_context(tls)


# client_ca_subjects ------------------------------------------------------------------------------


def test_lists_subject_and_fingerprint_of_client_ca(pki: Pki) -> None:
    """The bundle's one root, with the fingerprint openssl would print."""
    pem = pki.meta_root_ca.cert_pem.bytes().decode()
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    [(subject, listed)] = client_ca_subjects(pki.client_ca_file)
    assert subject.startswith("OU=Testing CA #")
    assert listed == fingerprint


def test_lists_every_root_of_a_rotation_bundle(pki: Pki, tmp_path: Path) -> None:
    """A bundle of two roots (a CA rotation's overlap) lists both, in file order."""
    bundle = write(
        tmp_path / "bundle.pem", pki.client_ca_file.read_bytes() + pki.server_ca_file.read_bytes()
    )
    listed = client_ca_subjects(bundle)
    assert [entry[1] for entry in listed] == [
        client_ca_subjects(pki.client_ca_file)[0][1],
        client_ca_subjects(pki.server_ca_file)[0][1],
    ]


def test_refuses_empty_ca_bundle(tmp_path: Path) -> None:
    """An empty bundle is an error, not an empty list."""
    path = write(tmp_path / "empty.pem", b"")
    with pytest.raises(CertificateError, match="no PEM certificate found"):
        client_ca_subjects(path)


# Session resumption ------------------------------------------------------------------------------


def blocking_exchange(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    # asyncio's open_connection() cannot offer a saved session; a blocking socket can.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"ping\n")
        reply = b""
        while chunk := tls.recv(1024):
            reply += chunk
        return reply, tls.session, bool(tls.session_reused)


async def offer_session_again(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> tuple[tuple[bytes, bytes, bool], ssl.SSLSession | None, Server]:
    """Two connections, the second offering the session the first one got: both replies and
    whether the second resumed, that session, and the server that saw both."""
    async with serving(server_context) as server:
        first, session, _ = await asyncio.to_thread(
            blocking_exchange, server.port, client_context, None
        )
        await server.settled()
        second, _, reused = await asyncio.to_thread(
            blocking_exchange, server.port, client_context, session
        )
        await server.settled()
    return (first, second, reused), session, server


async def test_resumed_session_still_shows_client_cn(pki: Pki, version: ssl.TLSVersion) -> None:
    """With tickets on, a resumed handshake still hands the application Meta's certificate."""
    context = pki.client_context("meta")
    context.minimum_version = context.maximum_version = version
    tls = dataclasses.replace(pki.tls_config(), session_tickets=1)
    outcome, _, server = await offer_session_again(build_server_context(tls), context)
    assert outcome == (b"ok", b"ok", True)
    assert server.refusals == []
    cns = [
        check_client_identity(seen.peercert, (META_CLIENT_CN,), "required") for seen in server.seen
    ]
    assert cns == [META_CLIENT_CN, META_CLIENT_CN]


async def test_tls13_handshake_issues_no_session_ticket_by_default(pki: Pki) -> None:
    """No ticket unless tls.session_tickets asks: the next connection is a full handshake."""
    context = pki.client_context("meta")
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    outcome, session, _ = await offer_session_again(build_server_context(pki.tls_config()), context)
    assert outcome == (b"ok", b"ok", False)
    assert session is None or not session.has_ticket


@pytest.mark.parametrize(("configured", "tickets"), [(None, 0), (0, 0), (1, 1), (8, 8)])
def test_server_context_issues_the_configured_session_tickets(
    pki: Pki, configured: int | None, tickets: int
) -> None:
    tls = pki.tls_config()
    if configured is not None:
        tls = dataclasses.replace(tls, session_tickets=configured)
    assert build_server_context(tls).num_tickets == tickets


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionAbortedError("SSL handshake is taking longer than 30.0 seconds"), "timeout"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "closed"),
        (BrokenPipeError(), "closed"),
    ],
)
def test_handshake_failures_without_an_openssl_reason_are_timeout_or_closed(
    exc: OSError, reason: str
) -> None:
    """asyncio's handshake timeout and a peer gone mid-handshake get reasons of their own."""
    assert handshake_failure(exc) == (reason, type(exc).__name__)


# The server's certificate chain ------------------------------------------------------------------


async def certificates_sent(tls: TlsConfig, pki: Pki) -> int:
    """How many certificates the server sends in its handshake, as ``openssl s_client`` shows
    them (Python's ssl before 3.13 shows the client the leaf alone)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl's command line tool is not installed (Debian: openssl)")
    async with serving(build_server_context(tls)) as server:
        client = await asyncio.create_subprocess_exec(
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.port}",
            "-showcerts",
            "-cert",
            str(pki.client_chain_file),
            "-cert_chain",  # -cert sends the leaf alone
            str(pki.client_chain_file),
            "-key",
            str(pki.client_key_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(TIMEOUT_S):
            shown, _ = await client.communicate()
        await server.settled()
    assert server.refusals == []
    return shown.count(b"-----BEGIN CERTIFICATE-----")


def issued_by(issuer: trustme.CA, directory: Path, *, with_issuer: bool) -> tuple[Path, Path]:
    """A server certificate for localhost from ``issuer``: its file (the leaf
    alone, or the leaf and ``issuer``'s own certificate) and its key."""
    leaf = issuer.issue_cert("localhost", "127.0.0.1")
    pems = [blob.bytes() for blob in leaf.cert_chain_pems]
    cert = write(directory / "server.pem", b"".join(pems if with_issuer else pems[:1]))
    return cert, write(directory / "server.key", leaf.private_key_pem.bytes())


async def test_sends_the_leaf_alone_when_the_client_ca_could_chain_it(
    pki: Pki, tmp_path: Path
) -> None:
    """A leaf-only tls.cert_file is sent alone, even when its issuer is in the client CA bundle."""
    # The root the client CA bundle holds issued the server certificate too: OpenSSL would
    # otherwise build [leaf, root] from that bundle at every handshake.
    cert, key = issued_by(pki.meta_root_ca, tmp_path, with_issuer=False)
    tls = dataclasses.replace(pki.tls_config(), cert_file=cert, key_file=key)
    assert await certificates_sent(tls, pki) == 1


async def test_sends_the_chain_the_certificate_file_holds(pki: Pki, tmp_path: Path) -> None:
    """The intermediates after the leaf in tls.cert_file are still sent, in full."""
    cert, key = issued_by(pki.meta_intermediate, tmp_path, with_issuer=True)
    tls = dataclasses.replace(pki.tls_config(), cert_file=cert, key_file=key)
    assert await certificates_sent(tls, pki) == 2
