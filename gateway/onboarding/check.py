"""What ``waba-gateway check`` reports: a configuration and its certificate files, before serving.

Rule: ``check`` refuses exactly what ``serve`` would refuse (same loader, same TLS context
builder), and adds what an operator wants to see before a rollout: certificate expiry (a warning
under 30 days) and the subjects and fingerprints of the client CA bundle, so they can be compared
with the CA file Meta publishes. The outbox: with ``outbox.url``, whether the database is reachable
and holds the schema version this gateway uses; a SQLite file, read without changing it: its
layout, SQLite's structural check and its pending and dead deliveries. For each broker target
(Redis, NATS): whether the broker answers (a warning when it does not: ``serve`` starts anyway
and waits for it), and a NATS subject that no JetStream stream captures, which is an error (every
delivery would be a dead letter).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.certificates import days_left
from gateway.certificates import subject as leaf_subject
from gateway.config import MIN_ADMIN_TOKEN_CHARS, AdminConfig, Config
from gateway.delivery.sending import sender_for
from gateway.delivery.target_tls import target_contexts
from gateway.edge.tls import build_server_context, client_ca_subjects, stale_crls
from gateway.errors import CertificateError, TargetUnreachable
from gateway.outbox import describe_outbox

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "admin_token_warning",
    "outbox_report",
    "report",
    "targets_report",
]

EXPIRY_WARNING_DAYS = 30


def admin_token_warning(admin: AdminConfig) -> str | None:
    """Why ``admin.token`` is weak, if it is. The loader already refuses a short token beyond
    loopback; on loopback it is allowed, and still worth a warning (a page in the operator's
    browser is on loopback too)."""
    if not admin.enabled or admin.token is None or len(admin.token) >= MIN_ADMIN_TOKEN_CHARS:
        return None
    return (
        f"admin.token is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; make one with: "
        "openssl rand -hex 32"
    )


def _leaf(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        raise CertificateError(f"tls.cert_file = '{path}': {exc}") from exc


def report(config: Config, now: datetime.datetime) -> list[str]:
    """The lines ``check`` prints; raises on anything ``serve`` would refuse."""
    build_server_context(config.tls, source=config.source, now=now)
    lines = [f"ok: configuration {config.source or '(built in)'}"]
    leaf = _leaf(config.tls.cert_file)
    left = days_left(leaf, now)
    subject = leaf_subject(leaf)
    if left < 0:
        raise CertificateError(
            f"tls.cert_file = '{config.tls.cert_file}': certificate {subject} has expired"
        )
    status = "warning" if left < EXPIRY_WARNING_DAYS else "ok"
    lines.append(f"{status}: server certificate {subject} expires in {int(left)} days")
    lines.append("ok: server key matches the certificate")
    lines.append(
        f"ok: client_auth = {config.tls.client_auth}; accepted CN: "
        + ", ".join(config.tls.client_cn)
    )
    if config.listen.proxy_protocol:
        lines.append(
            "ok: listen.proxy_protocol = true: every connection must start with a PROXY protocol"
            " header (v1 or v2); open the listen port to the load balancer alone"
        )
    if config.tls.client_ca_file is not None:
        for ca_subject, fingerprint in client_ca_subjects(config.tls.client_ca_file):
            lines.append(f"ok: client CA {ca_subject} sha256 {fingerprint}")
    if config.tls.crl_file is not None:
        lines.extend(f"warning: {stale}" for stale in stale_crls(config.tls.crl_file, now))
    lines.append(
        f"ok: {len(config.targets)} target(s): " + ", ".join(t.name for t in config.targets)
    )
    # The same contexts serve builds for its targets: a file it would refuse is refused here.
    target_contexts(config.targets, source=config.source)
    for target in config.targets:
        if target.ca_file is not None:
            lines.append(f"ok: target {target.name} trusts only the CAs in {target.ca_file}")
        if target.cert_file is not None:
            # Readable and matching its key: target_contexts has just checked both.
            left = days_left(x509.load_pem_x509_certificates(target.cert_file.read_bytes())[0], now)
            status = "warning" if left < EXPIRY_WARNING_DAYS else "ok"
            when = f"expires in {int(left)} days" if left >= 0 else "HAS EXPIRED"
            lines.append(
                f"{status}: target {target.name} gets the client certificate {target.cert_file}"
                f" (key matches; {when})"
            )
    weak = admin_token_warning(config.admin)
    if weak is not None:
        lines.append(f"warning: {weak}")
    return lines


async def outbox_report(config: Config) -> list[str]:
    """The line about the outbox: a database reachable and at the schema version this gateway
    uses, or a SQLite file's layout, integrity and backlog. Raises OutboxError when ``serve``
    would refuse it."""
    return [f"ok: {await describe_outbox(config.outbox)}"]


async def targets_report(config: Config) -> list[str]:
    """A line per broker target, probed together. Raises TargetError when ``serve`` would
    dead-letter every delivery to one (a NATS subject no stream captures)."""
    # With the contexts serve builds: a broker behind a private CA is reached as serve reaches it.
    contexts = target_contexts(config.targets, source=config.source)
    senders = [sender_for(target, contexts.get(target.name)) for target in config.targets]
    try:
        found = await asyncio.gather(
            *(_probe(sender.probe()) for sender in senders), return_exceptions=True
        )
    finally:
        await asyncio.gather(*(sender.close() for sender in senders), return_exceptions=True)
    lines = []
    for result in found:
        if isinstance(result, BaseException):
            raise result
        if result is not None:
            lines.append(result)
    return lines


async def _probe(probing: Coroutine[Any, Any, str | None]) -> str | None:
    try:
        line = await probing
    except TargetUnreachable as exc:
        return f"warning: {exc}; serve starts anyway and delivers once it answers"
    return None if line is None else f"ok: {line}"
