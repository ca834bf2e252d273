from __future__ import annotations

import ssl

import aiohttp
import cryptography
import pytest
from pki import Pki, make_pki


def pytest_report_header(config: pytest.Config) -> list[str]:
    # A TLS failure in CI is often a library difference: print the versions that decide it.
    return [
        f"{ssl.OPENSSL_VERSION}, aiohttp {aiohttp.__version__}, "
        f"cryptography {cryptography.__version__}"
    ]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Meta-like, impostor, wrong-CN, expired and server certificates, new for each run."""
    return make_pki(tmp_path_factory.mktemp("pki"))
