"""What ``waba-gateway doctor`` finds: one readiness report for Meta's webhooks.

Rule: the decisions live in :mod:`gateway.onboarding.readiness` (pure, table-tested); this module
only gathers their inputs (the configuration, the certificate files, the trust store, a TCP connect
to each target, the outbox, one GET through the real listener) and returns the findings. It changes
nothing, except that it creates the outbox file when there is none yet, as ``serve`` would.

The command and its exit codes are :mod:`gateway.cli.doctor`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from OpenSSL import crypto

from gateway.config import Config, OutboxConfig, TargetConfig, TlsConfig, redact_url
from gateway.delivery.sending import sender_for
from gateway.delivery.target_tls import build_target_context
from gateway.edge.tls import build_server_context, stale_crls
from gateway.errors import (
    CertificateError,
    GatewayError,
    OutboxError,
    TargetError,
    TargetUnreachable,
)
from gateway.onboarding.check import admin_token_warning
from gateway.onboarding.meta_client import client_context
from gateway.onboarding.readiness import (
    Finding,
    judge_ca_bundle,
    judge_handshake,
    judge_server_chain,
    judge_tls_settings,
    judge_trust,
    known_cas,
)
from gateway.onboarding.verify_callback import callback_url, verify
from gateway.outbox import open_outbox
from gateway.units import SECONDS

__all__ = ["diagnose", "verify_chain"]

CONNECT_TIMEOUT_S = 3 * SECONDS
HANDSHAKE_TIMEOUT_S = 10 * SECONDS


async def diagnose(
    config: Config,
    now: datetime.datetime,
    *,
    public_url: str | None = None,
    ca_file: Path | None = None,
) -> list[Finding]:
    """Every finding about ``config``, in the order the report prints them."""
    findings = [Finding("OK", f"configuration {config.source or '(built in)'} is valid")]
    findings.append(_tls_files(config.tls))
    certs = _certificates(config.tls.cert_file)
    if certs is not None:
        hostname = _public_host(public_url) if public_url else None
        findings.extend(judge_server_chain(certs, hostname, now))
        anchor = str(ca_file) if ca_file is not None else None
        findings.append(judge_trust(verify_chain(certs, ca_file, now), anchor))
    findings.extend(_client_cas(config.tls, now))
    if config.tls.crl_file is not None:
        findings.extend(
            Finding("WARN", stale, "revocations since then are unknown to the gateway")
            for stale in stale_crls(config.tls.crl_file, now)
        )
    findings.extend(judge_tls_settings(config.tls))
    weak = admin_token_warning(config.admin)
    if weak is not None:
        findings.append(Finding("WARN", weak, "replace it, then reload"))
    findings.extend(await _targets(config.targets))
    findings.append(await _outbox(config.outbox))
    if public_url is None:
        findings.append(
            Finding(
                "WARN",
                "hostname and handshake not checked",
                "run doctor with --public-url https://your.host/webhook",
            )
        )
    else:
        if urlsplit(public_url).path != config.listen.path:
            findings.append(
                Finding(
                    "WARN",
                    f"the path of {public_url} is not listen.path {config.listen.path!r}",
                    "give Meta a URL whose path is listen.path",
                )
            )
        findings.append(await _handshake(public_url, config, ca_file))
    return findings


def _public_host(public_url: str) -> str | None:
    """The host of ``public_url`` as the handshake looks it up and as certificates name it: an
    internationalised name by its A-label (``xn--``, RFC 5280 section 7.2), lower case. ``None``
    when no request can be made to it (the handshake finding says why)."""
    try:
        return callback_url(public_url).raw_host
    except GatewayError:
        return None


def verify_chain(
    certs: Sequence[x509.Certificate], ca_file: Path | None, now: datetime.datetime
) -> str | None:
    """``None`` when ``certs`` (leaf first) verify against ``ca_file``, or the system trust store
    when that is ``None``; otherwise OpenSSL's reason. The hostname is not checked here."""
    store = crypto.X509Store()
    try:
        if ca_file is not None:
            store.load_locations(ca_file)
        else:
            paths = ssl.get_default_verify_paths()
            if paths.cafile is None and paths.capath is None:
                return "no system trust store found"
            store.load_locations(paths.cafile, paths.capath)
    except crypto.Error as exc:
        return f"cannot load the trust store: {exc}"
    store.set_time(now)
    leaf, *chain = (crypto.X509.from_cryptography(cert) for cert in certs)
    try:
        crypto.X509StoreContext(store, leaf, chain).verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc)
    return None


def _tls_files(tls: TlsConfig) -> Finding:
    # The very checks `serve` makes before it starts: files readable, key matching the leaf,
    # CA bundle and CRL accepted by OpenSSL.
    try:
        build_server_context(tls)
    except CertificateError as exc:
        return Finding("FAIL", str(exc), "serve refuses to start until this is fixed")
    return Finding("OK", "TLS files load and tls.key_file matches tls.cert_file")


def _certificates(path: Path) -> list[x509.Certificate] | None:
    # An unreadable file has already been reported by _tls_files, which names it.
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None


def _client_cas(tls: TlsConfig, now: datetime.datetime) -> list[Finding]:
    if tls.client_ca_file is None:
        return [
            Finding(
                "WARN",
                "no client CA bundle (tls.client_ca_file is not set)",
                "client certificates cannot be checked: install Meta's CA into certs/ and set it",
            )
        ]
    certs = _certificates(tls.client_ca_file)
    return [] if certs is None else judge_ca_bundle(certs, now, known_cas(tls.meta_ca_sha256))


async def _targets(targets: Sequence[TargetConfig]) -> list[Finding]:
    if not targets:
        return [Finding("WARN", "no [[targets]]", "notifications are stored, never forwarded")]
    return list(
        await asyncio.gather(*(_reach(target, index) for index, target in enumerate(targets)))
    )


async def _reach(target: TargetConfig, index: int) -> Finding:
    if target.kind != "http":
        return await _reach_broker(target, f"targets[{index}]")
    parts = urlsplit(target.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # A host name the resolver cannot encode never gets here: the configuration refuses it.
    where = f"target {target.name!r} at {host}:{port}"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError, ValueError) as exc:
        # ValueError (UnicodeError is one): the resolver refused the name after all.
        reason = str(exc) or f"no answer within {CONNECT_TIMEOUT_S:g} s"
        return Finding(
            "WARN",
            f"{where}: cannot connect ({reason})",
            "the outbox keeps its notifications until the target answers",
        )
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Finding("OK", f"{where} accepts connections")


async def _reach_broker(target: TargetConfig, key: str) -> Finding:
    """A broker target: connected to as ``check`` does (and, for NATS, its stream found), with
    its own CA and client certificate as ``serve`` uses them (``key``: where it is configured)."""
    try:
        context = build_target_context(target, key)
    except CertificateError as exc:
        return Finding("FAIL", str(exc), "serve refuses to start with it")
    sender = sender_for(target, context)
    try:
        found = await sender.probe()
    except TargetUnreachable as exc:
        return Finding("WARN", str(exc), "the outbox keeps its notifications until it answers")
    except TargetError as exc:
        return Finding("FAIL", str(exc), "every delivery to it would be a dead letter")
    finally:
        await sender.close()
    return Finding("OK", found or f"target {target.name!r}")


async def _outbox(config: OutboxConfig) -> Finding:
    if config.url is not None:
        where, key = f"outbox database {redact_url(config.url)}", "outbox.url"
        advice = "check outbox.url, that the database is up, and the role's rights"
        existed = True
    else:
        where, key = f"outbox {config.path}", f"outbox.path = '{config.path}'"
        advice = "make outbox.path writable by the gateway's user"
        existed = config.path.exists()
    try:
        outbox = await open_outbox(config, dispatching=False)
    except OutboxError as exc:
        return Finding("FAIL", str(exc), advice)
    try:
        # Takes the write lock a notification's commit takes, and lets go without writing.
        await outbox.ping()
    except OutboxError as exc:
        return Finding("FAIL", f"{key}: cannot write: {exc}", advice)
    finally:
        await outbox.close()
    return Finding("OK", f"{where} takes writes" + ("" if existed else " (created)"))


async def _handshake(url: str, config: Config, ca_file: Path | None) -> Finding:
    # verify-callback's GET and judgment, so both commands agree on what Meta would conclude.
    token = config.meta.verify_tokens[0]
    context = client_context(ca_file, None, None)
    try:
        checked = callback_url(url)
    except GatewayError as exc:  # the command refuses such a --public-url before diagnosing
        return Finding(
            "FAIL", f"handshake not sent: {exc}", "give Meta an https:// URL it can reach"
        )
    verdict = await verify(checked, token, context=context, timeout_s=HANDSHAKE_TIMEOUT_S)
    # verify() already masks the token in an echoed body, so it never reaches the terminal.
    return judge_handshake(url, verdict, config.tls.client_auth)
