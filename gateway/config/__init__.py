"""Configuration: frozen, typed, validated once.

Rule: nothing outside this package reads TOML or the environment for settings. :func:`load_config`
is the one way in; every error it raises names the file, the key path, the value and what was
expected, e.g. ``config/gateway.toml: targets[0].url = 'ftp://x': expected an http:// or https://
URL``. Units live in key names (``timeout_s``, ``max_body_bytes``).

The values are in :mod:`.model`, what each key's value must be in :mod:`.rules`, reading a table
in :mod:`.reader`, the tables and the rules between their keys in :mod:`.sections`, and the way
in, from a file, in :mod:`.load`. Import from here: ``from gateway.config import Config``.
"""

from gateway.config.load import default_config_path, load_admin_config, load_config
from gateway.config.model import (
    DEFAULT_CONFIG_PATH,
    META_CLIENT_CN,
    MIN_ADMIN_TOKEN_CHARS,
    AdminConfig,
    ClientAuth,
    Config,
    DispatcherConfig,
    EventLoop,
    ListenConfig,
    LogFormat,
    MetaConfig,
    Order,
    OutboxConfig,
    Signature,
    Split,
    TargetConfig,
    TargetKind,
    TlsConfig,
    TracingConfig,
    nats_servers,
    redact_servers,
    redact_url,
    without_user_info,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "META_CLIENT_CN",
    "MIN_ADMIN_TOKEN_CHARS",
    "AdminConfig",
    "ClientAuth",
    "Config",
    "DispatcherConfig",
    "EventLoop",
    "ListenConfig",
    "LogFormat",
    "MetaConfig",
    "Order",
    "OutboxConfig",
    "Signature",
    "Split",
    "TargetConfig",
    "TargetKind",
    "TlsConfig",
    "TracingConfig",
    "default_config_path",
    "load_admin_config",
    "load_config",
    "nats_servers",
    "redact_servers",
    "redact_url",
    "without_user_info",
]
