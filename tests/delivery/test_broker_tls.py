"""Redis and NATS targets behind a private CA, and brokers that want a client certificate: a
broker target's own ``ca_file``, ``cert_file`` and ``key_file`` (gateway.delivery.target_tls),
through its sender, a running gateway and the configuration.

Real ``redis-server`` and ``nats-server`` speaking TLS only, on loopback, with certificates from
a throw-away internal CA (trustme), mocking nothing: a sender reaches such a broker only when
the target's ``ca_file`` names that CA and the certificate names the host of the URL, and a
broker that requires a client certificate serves the gateway only with ``cert_file`` and
``key_file``. Every success is paired with the refusal that proves it.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nats
import nats.aio.client
import nats.js.errors
import pytest
import redis.asyncio as aioredis
import trustme
from brokers import BrokerServer, ServerTls, nats_server, pending_delivery, redis_server
from config_files import write_config
from destinations import entry_received
from helpers import APP_SECRET, TargetOptions, eventually, message_body, meta_signature
from pki import Pki
from sink import DEADLINE_S

from gateway.config import TargetConfig, TargetKind, load_config
from gateway.delivery.redis_stream import RedisStreamSender
from gateway.delivery.sending import sender_for
from gateway.delivery.target_tls import build_target_context
from gateway.errors import ConfigError, TargetUnreachable
from gateway.onboarding.check import targets_report
from gateway.onboarding.doctor import diagnose
from gateway.outbox.model import AttemptResult
from gateway.runtime.gateway import Gateway

BROKERS: tuple[TargetKind, ...] = ("redis", "nats")
# The JetStream stream of these tests' NATS servers: it captures every subject under "waba.".
STREAM = "WABA"
# A failed handshake leaves nats-py's connect waiting until the sender's deadline gives it up:
# the refusals are tested with a short one.
REFUSED_TIMEOUT_S = 1.0
ENV = {"TEST_APP_SECRET": APP_SECRET}

# What each broker is made to be: its certificate from the internal CA naming 127.0.0.1
# ("private-ca"), the same asking every client for a certificate from the internal client CA
# ("client-cert"), or from the internal CA naming another host only ("other-host").
Shape = Literal["private-ca", "client-cert", "other-host"]


@dataclass(frozen=True, slots=True)
class Internal:
    """The internal PKI: the CA that signs the brokers' certificates, another CA they do not
    use, and the client certificate the brokers that ask for one accept."""

    ca_file: Path
    other_ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    servers: dict[Shape, ServerTls]

    def client_context(self) -> ssl.SSLContext:
        """The tests' own client: trusts the internal CA, presents the client certificate."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.load_cert_chain(self.client_cert_file, self.client_key_file)
        return context


@pytest.fixture(scope="module")
def internal(tmp_path_factory: pytest.TempPathFactory) -> Internal:
    folder = tmp_path_factory.mktemp("broker-pki")
    ca, other, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    leaves = {
        "server": ca.issue_cert("127.0.0.1", "localhost"),
        "elsewhere": ca.issue_cert("broker.internal.example"),
        "client": client_ca.issue_cert(
            "gateway.internal.example", common_name="gateway.internal.example"
        ),
    }
    for name, leaf in leaves.items():
        (folder / f"{name}.pem").write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        (folder / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    for name, authority in {"ca": ca, "other-ca": other, "client-ca": client_ca}.items():
        (folder / f"{name}.pem").write_bytes(authority.cert_pem.bytes())
    server = ServerTls(folder / "server.pem", folder / "server.key")
    return Internal(
        ca_file=folder / "ca.pem",
        other_ca_file=folder / "other-ca.pem",
        client_cert_file=folder / "client.pem",
        client_key_file=folder / "client.key",
        servers={
            "private-ca": server,
            "client-cert": ServerTls(
                server.cert_file, server.key_file, client_ca_file=folder / "client-ca.pem"
            ),
            "other-host": ServerTls(folder / "elsewhere.pem", folder / "elsewhere.key"),
        },
    )


class TlsBrokers:
    """The TLS brokers of this module, each started at its first use and kept until its end."""

    def __init__(self, internal: Internal, stack: contextlib.ExitStack) -> None:
        self.internal = internal
        self._stack = stack
        self._started: dict[tuple[TargetKind, Shape], BrokerServer] = {}

    async def get(self, kind: TargetKind, shape: Shape) -> BrokerServer:
        server = self._started.get((kind, shape))
        if server is None:
            start = redis_server if kind == "redis" else nats_server
            server = self._stack.enter_context(start(tls=self.internal.servers[shape]))
            self._started[kind, shape] = server
            if kind == "nats" and shape != "other-host":
                async with self._nats(server) as client:
                    await client.jetstream().add_stream(name=STREAM, subjects=["waba.>"])
        return server

    @contextlib.asynccontextmanager
    async def _nats(self, server: BrokerServer) -> AsyncIterator[nats.aio.client.Client]:
        client = await nats.connect(
            server.url, tls=self.internal.client_context(), connect_timeout=int(DEADLINE_S)
        )
        try:
            yield client
        finally:
            await client.close()

    async def stored(self, server: BrokerServer, target: TargetConfig) -> list[bytes]:
        """The bodies ``target``'s stream (Redis) or subject (NATS) holds, oldest first, read
        by the tests' own client."""
        if target.kind == "redis":
            reader = aioredis.Redis.from_url(
                server.url,
                ssl_ca_certs=str(self.internal.ca_file),
                ssl_certfile=str(self.internal.client_cert_file),
                ssl_keyfile=str(self.internal.client_key_file),
            )
            try:
                entries = await reader.xrange(str(target.stream))
            finally:
                await reader.aclose()
            return [entry_received(target.name, fields).body for _, fields in entries or []]
        async with self._nats(server) as client:
            js = client.jetstream(timeout=DEADLINE_S)
            info = await js.stream_info(STREAM)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    message = await js.get_msg(STREAM, seq)
                    if message.subject == target.subject:
                        found.append(message.data or b"")
            return found


@pytest.fixture(scope="module")
def brokers(internal: Internal) -> Iterator[TlsBrokers]:
    with contextlib.ExitStack() as stack:
        yield TlsBrokers(internal, stack)


def _target(url: str, kind: TargetKind, name: str, options: TargetOptions) -> TargetConfig:
    """A target at ``url`` named ``name``, its own stream or subject; ``options``: its
    ``ca_file``, ``cert_file`` and ``key_file`` as given, and a short ``timeout_s`` where it
    is to be refused."""
    settings = TargetOptions(kind=kind, url=url)
    if kind == "redis":
        settings["stream"] = f"stream:{name}"
    else:
        settings["subject"] = f"waba.{name}"
    settings.update(options)
    return TargetConfig(name=name, **settings)


DELIVERY = pending_delivery(1, b'{"object":"whatsapp_business_account"}', prefix="d")


async def _send(target: TargetConfig) -> AttemptResult:
    """One attempt through a sender built as the dispatcher builds it: with the context of the
    target's own files, if it has any."""
    sender = sender_for(target, build_target_context(target, "targets[0]"))
    try:
        (result,) = await sender.send_many([DELIVERY], [1])
    finally:
        await sender.close()
    return result


async def _probe(target: TargetConfig) -> str | None:
    sender = sender_for(target, build_target_context(target, "targets[0]"))
    try:
        return await sender.probe()
    finally:
        await sender.close()


@pytest.mark.parametrize("kind", BROKERS)
async def test_broker_behind_a_private_ca_is_reached_with_its_ca_file(
    brokers: TlsBrokers, internal: Internal, kind: TargetKind
) -> None:
    """With ca_file naming the internal CA, the broker's certificate verifies: stored, and
    ``check``'s probe finds it."""
    server = await brokers.get(kind, "private-ca")
    target = _target(server.url, kind, f"reached-{kind}", TargetOptions(ca_file=internal.ca_file))
    result = await _send(target)
    assert result.accepted, result
    assert await brokers.stored(server, target) == [DELIVERY.body]
    assert "reachable" in (await _probe(target) or "")


@pytest.mark.parametrize("kind", BROKERS)
@pytest.mark.parametrize("ca", ["system-store", "other-ca"])
async def test_broker_behind_a_private_ca_is_refused_without_its_ca(
    brokers: TlsBrokers, internal: Internal, kind: TargetKind, ca: str
) -> None:
    """The system's trust store (a target with a client certificate and no ca_file), or a CA
    that did not sign the broker's certificate: the handshake fails on verification, the
    attempt is an error to retry, saying so, nothing is stored, and the probe finds the broker
    unreachable."""
    server = await brokers.get(kind, "private-ca")
    files = TargetOptions(cert_file=internal.client_cert_file, key_file=internal.client_key_file)
    if ca == "other-ca":
        files = TargetOptions(ca_file=internal.other_ca_file)
    files["timeout_s"] = REFUSED_TIMEOUT_S
    target = _target(server.url, kind, f"untrusted-{kind}-{ca}", files)
    result = await _send(target)
    assert not result.accepted
    assert not result.permanent
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or ""), result
    assert await brokers.stored(server, target) == []
    with pytest.raises(TargetUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        await _probe(target)


@pytest.mark.parametrize("kind", BROKERS)
async def test_broker_certificate_naming_another_host_is_refused(
    brokers: TlsBrokers, internal: Internal, kind: TargetKind
) -> None:
    """The right CA, but a certificate for another host than the URL's: the host name is
    still verified, so the handshake fails."""
    server = await brokers.get(kind, "other-host")
    target = _target(
        server.url,
        kind,
        f"elsewhere-{kind}",
        TargetOptions(ca_file=internal.ca_file, timeout_s=REFUSED_TIMEOUT_S),
    )
    result = await _send(target)
    assert not result.accepted
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or ""), result
    assert "mismatch" in (result.error or ""), result


@pytest.mark.parametrize("kind", BROKERS)
async def test_broker_requiring_a_client_certificate_gets_the_configured_one(
    brokers: TlsBrokers, internal: Internal, kind: TargetKind
) -> None:
    """cert_file and key_file: the broker accepts the gateway's client certificate."""
    server = await brokers.get(kind, "client-cert")
    files = TargetOptions(
        ca_file=internal.ca_file,
        cert_file=internal.client_cert_file,
        key_file=internal.client_key_file,
    )
    target = _target(server.url, kind, f"mtls-{kind}", files)
    result = await _send(target)
    assert result.accepted, result
    assert await brokers.stored(server, target) == [DELIVERY.body]


@pytest.mark.parametrize("kind", BROKERS)
async def test_broker_requiring_a_client_certificate_refuses_the_gateway_without_one(
    brokers: TlsBrokers, internal: Internal, kind: TargetKind
) -> None:
    """Without cert_file the broker refuses the connection: an error to retry, not a
    delivery, and not a crash."""
    server = await brokers.get(kind, "client-cert")
    target = _target(
        server.url,
        kind,
        f"no-cert-{kind}",
        TargetOptions(ca_file=internal.ca_file, timeout_s=REFUSED_TIMEOUT_S),
    )
    result = await _send(target)
    assert not result.accepted
    assert not result.permanent
    assert result.error, result
    assert await brokers.stored(server, target) == []


@pytest.mark.parametrize("files", ["ca-file", "no-file"])
async def test_a_tls_nats_server_that_does_not_ask_for_tls_is_refused(
    nats: BrokerServer, internal: Internal, files: str
) -> None:
    """nats-py uses TLS only when the server asks for it, whatever the URL says: a tls://
    server that does not (a plain one, or one that also takes plain clients) is refused
    rather than sent the credentials and notifications in the clear."""
    plain = nats.url.replace("nats://", "tls://", 1)
    options = TargetOptions(timeout_s=REFUSED_TIMEOUT_S)
    if files == "ca-file":
        options["ca_file"] = internal.ca_file
    target = _target(plain, "nats", f"clear-{files}", options)
    result = await _send(target)
    assert not result.accepted
    assert not result.permanent
    assert "does not require TLS" in (result.error or ""), result
    with pytest.raises(TargetUnreachable, match="does not require TLS"):
        await _probe(target)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param(
            "redis://127.0.0.1:1", "ca_file and cert_file are for rediss:// URLs", id="redis-url"
        ),
        pytest.param(
            "rediss://127.0.0.1:1?ssl_cert_reqs=none",
            "'ssl_cert_reqs' in the URL beside the target's ca_file or cert_file",
            id="ssl-option-in-the-url",
        ),
    ],
)
async def test_redis_sender_given_tls_files_it_cannot_use_fails_each_delivery_for_good(
    internal: Internal, url: str, reason: str
) -> None:
    """A context for a plain redis:// URL, or beside the URL's own TLS options (which it would
    silently replace): refused with the reason, for good, never sent otherwise than asked."""
    target = TargetConfig(
        name="r", kind="redis", url=url, stream="s", ca_file=internal.ca_file, timeout_s=1
    )
    context = build_target_context(target, "targets[0]")
    assert context is not None
    sender = RedisStreamSender(target, context)
    try:
        (result,) = await sender.send_many([DELIVERY], [1])
    finally:
        await sender.close()
    assert result.permanent
    assert reason in (result.error or ""), result


@pytest.mark.parametrize("kind", BROKERS)
async def test_gateway_delivers_to_a_broker_requiring_its_client_certificate(
    brokers: TlsBrokers, internal: Internal, pki: Pki, tmp_path: Path, kind: TargetKind
) -> None:
    """The whole path: a configuration file naming the broker target's own CA and client
    certificate loads, and the running gateway delivers through them."""
    server = await brokers.get(kind, "client-cert")
    where = 'stream = "stream:e2e"' if kind == "redis" else f'subject = "waba.e2e-{kind}"'
    extra = (
        f'kind = "{kind}"\n{where}\nca_file = "{internal.ca_file}"\n'
        f'cert_file = "{internal.client_cert_file}"\nkey_file = "{internal.client_key_file}"\n'
    )
    config = load_config(write_config(pki, tmp_path, target_url=server.url, extra=extra), ENV)
    (target,) = config.targets
    body = message_body(f"to the {kind} behind the internal CA")
    async with Gateway(config) as gateway:
        await gateway.core.callback.notify(body, meta_signature(body))

        async def stored() -> list[bytes]:
            return await brokers.stored(server, target)

        assert await eventually(stored, "the delivery") == [body]


@pytest.mark.parametrize(
    ("tls_url", "plain_url", "extra"),
    [
        pytest.param(
            "rediss://127.0.0.1:6380/0",
            "redis://127.0.0.1:6379/0",
            'kind = "redis"\nstream = "whatsapp"\n',
            id="redis",
        ),
        pytest.param(
            "tls://127.0.0.1:4222,tls://127.0.0.2:4222",
            "nats://127.0.0.1:4222",
            'kind = "nats"\nsubject = "waba.in"\n',
            id="nats",
        ),
    ],
)
def test_broker_tls_files_are_taken_with_a_tls_url_only(
    internal: Internal, pki: Pki, tmp_path: Path, tls_url: str, plain_url: str, extra: str
) -> None:
    """ca_file, cert_file and key_file load with a rediss:// URL and with tls:// servers;
    with a plain redis:// or nats:// URL, where no TLS would be spoken, they are refused as a
    file that would never be used."""
    files = (
        f'ca_file = "{internal.ca_file}"\ncert_file = "{internal.client_cert_file}"\n'
        f'key_file = "{internal.client_key_file}"\n'
    )
    path = write_config(pki, tmp_path, target_url=tls_url, extra=extra + files)
    (target,) = load_config(path, ENV).targets
    assert (target.ca_file, target.cert_file) == (internal.ca_file, internal.client_cert_file)
    assert target.key_file == internal.client_key_file
    path = write_config(pki, tmp_path, target_url=plain_url, extra=extra + files)
    with pytest.raises(ConfigError) as refused:
        load_config(path, ENV)
    scheme = plain_url.partition("://")[0]
    assert str(refused.value) == (
        f"{path}: targets[0].ca_file = '{internal.ca_file}': expected no TLS file for a"
        f" {scheme}:// target (targets[0].url = '{plain_url}')"
    )


@pytest.mark.parametrize(
    ("url", "extra", "expected"),
    [
        pytest.param(
            "tls://127.0.0.1:4222,nats://127.0.0.2:4222",
            'kind = "nats"\nsubject = "waba.in"\n',
            "targets[0].ca_file = '{ca}': expected no TLS file for a nats:// server"
            " (targets[0].url = 'tls://127.0.0.1:4222,nats://127.0.0.2:4222')",
            id="nats-server-list-not-all-tls",
        ),
        pytest.param(
            "rediss://:${REDIS_PASSWORD}@127.0.0.1:6380/0?ssl_cert_reqs=none",
            'kind = "redis"\nstream = "whatsapp"\n',
            "targets[0].url = 'rediss://***@127.0.0.1:6380/0?ssl_cert_reqs=none': expected no"
            " ssl_cert_reqs option with targets[0].ca_file set: a target's ca_file, cert_file"
            " and key_file make its TLS, and the URL's option would be ignored",
            id="redis-url-tls-option-beside-the-file",
        ),
    ],
)
def test_broker_tls_files_beside_a_url_that_would_not_use_them_are_refused(
    internal: Internal, pki: Pki, tmp_path: Path, url: str, extra: str, expected: str
) -> None:
    """A server of the list that is not tls:// (nats-py would not be held to TLS with it), or
    a rediss:// URL setting TLS itself: one line naming the key, never the password."""
    files = f'ca_file = "{internal.ca_file}"\n'
    path = write_config(pki, tmp_path, target_url=url, extra=extra + files)
    with pytest.raises(ConfigError) as refused:
        load_config(path, {**ENV, "REDIS_PASSWORD": "hunter2"})
    assert str(refused.value) == f"{path}: " + expected.format(ca=internal.ca_file)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("kind", BROKERS)
async def test_check_and_doctor_reach_a_broker_behind_a_private_ca_as_serve_does(
    brokers: TlsBrokers, internal: Internal, pki: Pki, tmp_path: Path, kind: TargetKind
) -> None:
    """`check` and `doctor` probe a broker target with its own CA and client certificate, as
    the running gateway sends to it: reachable, not a warning that serve would contradict."""
    server = await brokers.get(kind, "client-cert")
    where = 'stream = "stream:probed"' if kind == "redis" else f'subject = "waba.probed-{kind}"'
    extra = (
        f'kind = "{kind}"\n{where}\nca_file = "{internal.ca_file}"\n'
        f'cert_file = "{internal.client_cert_file}"\nkey_file = "{internal.client_key_file}"\n'
    )
    config = load_config(write_config(pki, tmp_path, target_url=server.url, extra=extra), ENV)
    (line,) = await targets_report(config)
    assert "reachable" in line
    (target_name,) = (target.name for target in config.targets)
    findings = await diagnose(config, datetime.datetime.now(datetime.UTC))
    (finding,) = [found for found in findings if found.what.startswith(f"target {target_name!r}")]
    assert finding.level == "OK", finding
