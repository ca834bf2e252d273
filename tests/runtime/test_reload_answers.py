"""What a failed reload says when the new file also changes a key that takes a restart
(gateway.runtime.gateway, gateway.runtime.reload)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from config_files import free_port
from helpers import APP_SECRET, VERIFY_TOKEN, admin_post
from pki import Pki

from gateway.config import load_config
from gateway.runtime.gateway import Gateway


def _config(pki: Pki, ports: tuple[int, int], tls: str) -> str:
    port, admin_port = ports
    return textwrap.dedent(f"""\
        [listen]
        host = "127.0.0.1"
        port = {port}
        workers = 1
        [tls]
        cert_file = "{pki.server_chain_file}"
        key_file = "{pki.server_key_file}"
        {tls}
        [meta]
        verify_tokens = ["{VERIFY_TOKEN}"]
        app_secrets = ["{APP_SECRET}"]
        [outbox]
        path = "outbox.sqlite3"
        [admin]
        host = "127.0.0.1"
        port = {admin_port}
        """)


async def test_a_failure_that_follows_from_a_key_kept_until_a_restart_names_that_key(
    pki: Pki, tmp_path: Path
) -> None:
    """The file turns client certificates off and drops the client CA. tls.client_auth takes
    a restart, so the reload keeps "required", for which the CA is needed: the reload fails
    and the answer (422) names tls.client_auth as kept, not only the CA a file that says
    "off" seems not to need. (It said "needed when tls.client_auth = 'required'" alone.) Once
    the file keeps its CA, the next reload works."""
    config = tmp_path / "gateway.toml"
    ca = f'client_ca_file = "{pki.client_ca_file}"'
    ports = free_port(), free_port()
    config.write_text(_config(pki, ports, ca))
    async with Gateway(load_config(config)) as gateway:
        config.write_text(_config(pki, ports, 'client_auth = "off"'))
        answer = await admin_post(gateway, "/admin/reload")
        assert answer.status == 422
        message = json.loads(answer.text)["message"]
        assert message.startswith(f"reload failed, nothing changed: {config}: tls.client_ca_file")
        assert message.endswith("(unchanged until a restart, so as before: tls.client_auth)")
        assert gateway.config.tls.client_ca_file == pki.client_ca_file

        config.write_text(_config(pki, ports, f'client_auth = "off"\n{ca}'))
        answer = await admin_post(gateway, "/admin/reload")
        assert answer.status == 200
        assert json.loads(answer.text)["message"] == (
            f"reloaded {config}; unchanged until a restart: tls.client_auth"
        )
