"""Where ``serve --dev`` keeps its throw-away files, and on which ports it listens.

Rule: a leaf (it imports nothing of the gateway), so that the commands which only need to find
the dev gateway (``--dev`` on ``deliveries``, ``check``, ``doctor``, ``reload``, ``send``) do not
load the server to learn where it wrote its files. :mod:`gateway.runtime.dev` makes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEV_ADMIN_PORT", "DEV_DIR", "DEV_PORT", "DevFiles", "config_path"]

DEV_DIR = "var/dev"
DEV_PORT = 8443
DEV_ADMIN_PORT = 8081


@dataclass(frozen=True, slots=True)
class DevFiles:
    folder: Path
    meta_ca: Path
    client_chain: Path
    client_key: Path
    server_ca: Path
    server_chain: Path
    server_key: Path
    secrets: Path
    sample: Path

    @classmethod
    def under(cls, folder: Path) -> DevFiles:
        return cls(
            folder=folder,
            meta_ca=folder / "meta-ca.pem",
            client_chain=folder / "client.pem",
            client_key=folder / "client.key",
            server_ca=folder / "server-ca.pem",
            server_chain=folder / "server.pem",
            server_key=folder / "server.key",
            secrets=folder / "secrets.json",
            sample=folder / "sample-notification.json",
        )


def config_path(folder: Path) -> Path:
    """Where ``serve --dev`` writes the configuration it runs with."""
    return folder / "gateway.toml"
