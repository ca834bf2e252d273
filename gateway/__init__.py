"""waba-gateway: an mTLS-terminating gateway for WhatsApp Business Account webhooks.

The public surface is the ``waba-gateway`` CLI, the TOML configuration, the admin HTTP API,
:func:`create_app` (the callback inside an aiohttp application) and
:class:`gateway.runtime.gateway.Gateway` for embedding and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.version import __version__

if TYPE_CHECKING:
    from gateway.runtime.app import create_app

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Loaded on first use (PEP 562), so `import gateway` and the command line stay cheap.
    if name == "create_app":
        from gateway.runtime.app import create_app

        return create_app
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
