"""Configuration: frozen, typed, validated once.

Rule: nothing outside this module reads TOML or the environment for settings. :func:`load_config`
is the one way in; every error it raises names the file, the key path, the value and what was
expected, e.g. ``config/gateway.toml: targets[0].url = 'ftp://x': expected an http:// or https://
URL``. Units live in key names (``timeout_s``, ``max_body_bytes``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "META_CLIENT_CN",
    "AdminConfig",
    "Config",
    "DispatcherConfig",
    "ListenConfig",
    "MetaConfig",
    "OutboxConfig",
    "TargetConfig",
    "TlsConfig",
    "default_config_path",
    "load_config",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS
MiB = 1024 * 1024

# Meta's webhook client certificate subject CN (docs/graph-api/webhooks/getting-started, "mTLS").
META_CLIENT_CN = "client.webhooks.fbclientcerts.com"
DEFAULT_CONFIG_PATH = Path("config/gateway.toml")

ClientAuth = Literal["required", "optional", "off"]
Split = Literal["none", "change"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 8443
    path: str = "/webhook"
    # Meta sends up to 3 MB (whatsapp/webhooks/overview); aiohttp's own default is 1 MiB.
    max_body_bytes: int = 4 * MiB
    workers: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth: ClientAuth = "required"
    client_cn: tuple[str, ...] = (META_CLIENT_CN,)
    crl_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MetaConfig:
    verify_tokens: tuple[str, ...]
    app_secrets: tuple[str, ...]

    def __repr__(self) -> str:
        # Secrets never reach logs or tracebacks.
        return (
            f"MetaConfig(verify_tokens=<{len(self.verify_tokens)} hidden>, "
            f"app_secrets=<{len(self.app_secrets)} hidden>)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxConfig:
    path: Path = Path("var/outbox.sqlite3")
    # Meta retries for up to 7 days (whatsapp/webhooks/overview): a body seen again inside this
    # window is acknowledged and not forwarded again.
    dedup_window_s: float = 7 * DAYS
    # Delivered rows older than this are removed; dead letters stay until replayed.
    retention_s: float = 7 * DAYS


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    name: str
    url: str
    fields: tuple[str, ...] = ()
    waba_ids: tuple[str, ...] = ()
    phone_number_ids: tuple[str, ...] = ()
    timeout_s: float = 10 * SECONDS
    attempts: int = 12
    wait_initial_s: float = 1 * SECONDS
    wait_max_s: float = 5 * MINUTES
    wait_exp_base: float = 2.0
    max_age_s: float = 7 * DAYS
    split: Split = "none"
    secret: str | None = None
    concurrency: int = 32

    def __repr__(self) -> str:
        return f"TargetConfig(name={self.name!r}, url={self.url!r}, split={self.split!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None

    def __repr__(self) -> str:
        return f"AdminConfig(enabled={self.enabled}, host={self.host!r}, port={self.port})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatcherConfig:
    # How often the dispatcher looks for due deliveries when nothing wakes it (another process
    # may have written the outbox, a retry may have come due).
    poll_interval_s: float = 0.5 * SECONDS
    batch_size: int = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig
    meta: MetaConfig
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    targets: tuple[TargetConfig, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    log_level: str = "info"
    # The file this came from, for messages; None when built in code (``serve --dev``, tests).
    source: Path | None = None


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$WABA_GATEWAY_CONFIG``, else ``config/gateway.toml``."""
    value = env.get("WABA_GATEWAY_CONFIG")
    return Path(value) if value else DEFAULT_CONFIG_PATH


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read, expand ``${ENV}``, validate and freeze the TOML file at ``path``."""
    raise NotImplementedError
