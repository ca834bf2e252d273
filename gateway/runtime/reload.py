"""Reloading the configuration without a restart: what a reload may change.

Rule: a reload builds a whole new configuration and TLS context first and swaps them in only if
both succeed; a reload that fails changes nothing (the running gateway keeps serving with what it
had). The decisions here are pure: which changed keys take a restart (:func:`restart_only`), and
the configuration a reload applies (:func:`applicable`), which keeps those keys as they were.

Swapped at once: the server certificate and key, the client CA bundle and the CRL's contents
(new handshakes), ``tls.client_cn``, ``tls.watch_*``, verify tokens and app secrets (new requests),
targets and their settings (each target's CA and client certificate files are read again, even
under unchanged names), the dispatcher's settings, the admin token and ``admin.allowed_hosts``.
``listen.proxy_protocol`` is part of ``[listen]``: a restart. Bound when the process
started, so changed only by a restart: the listener (``[listen]``), the outbox, where the admin
listener listens, logging, and what OpenSSL copies into each connection from the listening
context (``tls.client_auth``, ``tls.session_tickets``, whether a CRL is checked at all).
"""

from __future__ import annotations

import dataclasses

from gateway.config import MIN_ADMIN_TOKEN_CHARS, Config
from gateway.config.rules import admin_exposure
from gateway.errors import ConfigError

__all__ = ["applicable", "restart_only"]


def _restart_only_values(config: Config) -> dict[str, object]:
    tls, admin = config.tls, config.admin
    return {
        "listen": config.listen,
        "outbox": config.outbox,
        "admin.enabled": admin.enabled,
        "admin.host": admin.host,
        "admin.port": admin.port,
        "log.level": config.log_level,
        "log.format": config.log_format,
        # The exporter and its provider are made once per process (gateway.tracing.export).
        "tracing": config.tracing,
        "tls.client_auth": tls.client_auth,
        "tls.session_tickets": tls.session_tickets,
        "tls.crl_file": tls.crl_file is not None,  # its contents reload; turning it on or off not
    }


def restart_only(old: Config, new: Config) -> list[str]:
    """The keys (or tables) that differ between ``old`` and ``new`` and take a restart."""
    before, after = _restart_only_values(old), _restart_only_values(new)
    return [key for key in before if before[key] != after[key]]


def applicable(old: Config, new: Config) -> Config:
    """``new`` with every restart-only value kept as in ``old``: the configuration in force
    after the reload, so that what the gateway reports is what it does. Raises ConfigError
    when that configuration would leave the admin listener on the network without a token
    strong enough for it (the rule a loaded file is held to)."""
    tls = dataclasses.replace(
        new.tls, client_auth=old.tls.client_auth, session_tickets=old.tls.session_tickets
    )
    if (old.tls.crl_file is None) != (new.tls.crl_file is None):
        tls = dataclasses.replace(tls, crl_file=old.tls.crl_file)
    admin = dataclasses.replace(
        new.admin, enabled=old.admin.enabled, host=old.admin.host, port=old.admin.port
    )
    # The new file's own [admin] passed its checks, but its listener stays where the old one
    # listens: a file that moves it to loopback and drops the token would otherwise leave
    # the API open on the network until a restart.
    exposed = admin_exposure(admin.enabled, admin.host, admin.token, MIN_ADMIN_TOKEN_CHARS)
    if exposed is not None:
        key, expected = exposed
        raise ConfigError(
            f"{new.source or 'the configuration'}: {key}: the admin listener stays on"
            f" {admin.host!r} until a restart, so it needs {expected}"
        )
    return dataclasses.replace(
        new,
        listen=old.listen,
        outbox=old.outbox,
        admin=admin,
        tls=tls,
        log_level=old.log_level,
        log_format=old.log_format,
        tracing=old.tracing,
    )
