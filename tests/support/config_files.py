"""TOML configuration files for tests that run the gateway as the CLI does."""

from __future__ import annotations

import tomllib
from pathlib import Path

from helpers import VERIFY_TOKEN
from loopback_ports import free_port
from pki import Pki

__all__ = ["free_port", "host_configs", "listen_port", "write_config"]


def write_config(
    pki: Pki,
    folder: Path,
    *,
    target_url: str,
    workers: int = 1,
    admin_port: int | None = None,
    extra: str = "",
    outbox: str = 'path = "outbox.sqlite3"',
) -> Path:
    """``folder/gateway.toml`` for the test PKI, the app secret from ``$TEST_APP_SECRET``,
    the outbox beside it (or the ``[outbox]`` keys ``outbox`` gives), one target at
    ``target_url``, the admin listener off unless ``admin_port`` is given (then on loopback at
    that port)."""
    admin = "enabled = false" if admin_port is None else f'host = "127.0.0.1"\nport = {admin_port}'
    path = folder / "gateway.toml"
    path.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {free_port()}
workers = {workers}

[tls]
cert_file = "{pki.server_chain_file}"
key_file = "{pki.server_key_file}"
client_ca_file = "{pki.client_ca_file}"

[meta]
verify_tokens = ["{VERIFY_TOKEN}"]
app_secrets = ["${{TEST_APP_SECRET}}"]

[outbox]
{outbox}

[admin]
{admin}

[dispatcher]
poll_interval_s = 0.05

[[targets]]
name = "sink"
url = "{target_url}"
wait_initial_s = 0.05
wait_max_s = 0.2
{extra}"""
    )
    return path


def listen_port(config: Path) -> int:
    return int(tomllib.loads(config.read_text())["listen"]["port"])


def host_configs(
    pki: Pki, folder: Path, count: int, *, target_url: str, outbox: str, extra: str = ""
) -> list[Path]:
    """``count`` gateways' configurations, each in a folder of its own under ``folder``
    (``host0``, ``host1``, ...), as on as many hosts sharing the outbox database ``outbox``
    names; the rest as :func:`write_config` writes it."""
    configs = []
    for n in range(count):
        host = folder / f"host{n}"
        host.mkdir()
        configs.append(write_config(pki, host, target_url=target_url, outbox=outbox, extra=extra))
    return configs
