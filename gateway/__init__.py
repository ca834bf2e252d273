"""waba-gateway: an mTLS-terminating gateway for WhatsApp Business Account webhooks.

The public surface is the ``waba-gateway`` CLI, the TOML configuration, the admin HTTP API and
:class:`gateway.runtime.gateway.Gateway` for embedding and tests.
"""

__version__ = "0.1.0"
