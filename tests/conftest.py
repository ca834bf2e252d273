from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import cryptography
import pytest
from pki import Pki, make_pki
from sink import Sink


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


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A target server on 127.0.0.1 that records each request and answers as a test tells it."""
    async with Sink() as running:
        yield running
