"""``waba-gateway serve --dev``: the whole gateway with no set-up, for trying it out.

Rule: everything dev mode makes is throw-away and lives under one folder (``var/dev/`` by
default): a stand-in "Meta" root CA with an intermediate and a client certificate carrying Meta's
CN, a server certificate for localhost, random secrets, and an outbox. Nothing here is ever used
by a production configuration, and none of it is trusted outside that folder.

Once listening, dev mode writes the configuration it runs with to ``gateway.toml`` in that
folder (:func:`config_path`), so every command that takes ``--config`` (or ``--dev``) talks to
the dev gateway. The sample notification gets a new message id at each start: the gateway
acknowledges a body it already stored as a duplicate, without delivering it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import trustme
from aiohttp import web

from gateway.config import (
    META_CLIENT_CN,
    AdminConfig,
    Config,
    ListenConfig,
    MetaConfig,
    OutboxConfig,
    TargetConfig,
    TlsConfig,
    load_config,
)
from gateway.devfiles import DEV_ADMIN_PORT, DEV_PORT, DevFiles, config_path
from gateway.runtime.gateway import Gateway
from gateway.runtime.logs import setup_logging
from gateway.runtime.ports import bound_port
from gateway.runtime.process import run
from gateway.signing import sign

__all__ = [
    "dev_toml",
    "ensure_dev_files",
    "serve_dev",
    "write_sample",
]

log = logging.getLogger(__name__)


# A Meta-style notification: ASCII escapes for non-ASCII text and "\/" for slashes, exactly the
# bytes a re-serialising receiver would get wrong.
SAMPLE = (
    b'{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":'
    b'{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881",'
    b'"phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Ren\\u00e9e"},'
    b'"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.DEV'
    b'SAMPLE","timestamp":"1749416383","type":"text","text":{"body":"Caf\\u00e9? '
    b'\\ud83d\\ude00 https:\\/\\/example.com"}}]},"field":"messages"}]}]}'
)


def write_sample(files: DevFiles) -> None:
    """The sample notification with a message id of its own: written at each start (once
    listening, so a start that fails leaves the running gateway's sample alone), so that after
    a restart the printed commands deliver it rather than being acknowledged as a duplicate."""
    marker = secrets.token_hex(6).upper().encode()
    files.sample.write_bytes(SAMPLE.replace(b"wamid.DEV", b"wamid.DEV" + marker, 1))


def _toml(value: object) -> str:
    # JSON's strings, numbers and lists are valid TOML values (its \u escapes included).
    return json.dumps(str(value) if isinstance(value, Path) else value)


def dev_toml(config: Config) -> str:
    """``config`` as a TOML file ``load_config`` reads back (the keys dev mode sets)."""
    lines = [
        "# Written by `waba-gateway serve --dev` at each start: throw-away certificates and",
        "# secrets for trying the gateway out. Use it with --dev or --config in any command.",
        "[listen]",
        f"host = {_toml(config.listen.host)}",
        f"port = {config.listen.port}",
        f"workers = {config.listen.workers}",
        "",
        "[tls]",
        f"cert_file = {_toml(config.tls.cert_file.resolve())}",
        f"key_file = {_toml(config.tls.key_file.resolve())}",
    ]
    if config.tls.client_ca_file is not None:
        lines.append(f"client_ca_file = {_toml(config.tls.client_ca_file.resolve())}")
    lines += [
        f"client_auth = {_toml(config.tls.client_auth)}",
        "",
        "[meta]",
        f"verify_tokens = {_toml(list(config.meta.verify_tokens))}",
        f"app_secrets = {_toml(list(config.meta.app_secrets))}",
        "",
        "[outbox]",
        f"path = {_toml(config.outbox.path.resolve())}",
        "",
        "[admin]",
        f"host = {_toml(config.admin.host)}",
        f"port = {config.admin.port}",
    ]
    for target in config.targets:
        lines += [
            "",
            "[[targets]]",
            f"name = {_toml(target.name)}",
            f"url = {_toml(target.url)}",
            f"attempts = {target.attempts}",
            f"wait_initial_s = {target.wait_initial_s}",
            f"wait_max_s = {target.wait_max_s}",
        ]
    return "\n".join(lines) + "\n"


def ensure_dev_files(folder: Path) -> tuple[DevFiles, dict[str, str]]:
    """Make the dev certificates, secrets and sample once; reuse them on later runs so the
    printed test command keeps working."""
    files = DevFiles.under(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not files.server_key.exists():
        meta_root = trustme.CA(organization_name="waba-gateway dev stand-in for Meta")
        intermediate = meta_root.create_child_ca()
        client = intermediate.issue_cert(META_CLIENT_CN, common_name=META_CLIENT_CN)
        meta_root.cert_pem.write_to_path(str(files.meta_ca))
        # Meta presents its leaf plus the signing intermediate; the gateway trusts the root.
        client.private_key_pem.write_to_path(str(files.client_key))
        files.client_chain.write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
        server_ca = trustme.CA(organization_name="waba-gateway dev server CA")
        server = server_ca.issue_cert("localhost", "127.0.0.1", "::1")
        server_ca.cert_pem.write_to_path(str(files.server_ca))
        server.private_key_pem.write_to_path(str(files.server_key))
        files.server_chain.write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
        for key in (files.client_key, files.server_key):
            key.chmod(0o600)
    if not files.secrets.exists():
        files.secrets.write_text(
            json.dumps(
                {"app_secret": secrets.token_hex(16), "verify_token": secrets.token_urlsafe(16)}
            )
        )
        files.secrets.chmod(0o600)
    if not files.sample.exists():
        write_sample(files)
    values = json.loads(files.secrets.read_text())
    return files, {key: str(values[key]) for key in ("app_secret", "verify_token")}


def dev_config(
    files: DevFiles,
    dev_secrets: dict[str, str],
    *,
    port: int,
    sink_url: str,
    admin_port: int | None = None,
) -> Config:
    """The dev gateway's configuration; the admin listener on ``admin_port`` (default: 8081,
    or any free port when ``port`` is 0)."""
    if admin_port is None:
        admin_port = DEV_ADMIN_PORT if port else 0
    return Config(
        listen=ListenConfig(host="127.0.0.1", port=port, workers=1),
        tls=TlsConfig(
            cert_file=files.server_chain,
            key_file=files.server_key,
            client_ca_file=files.meta_ca,
            client_auth="required",
        ),
        meta=MetaConfig(
            verify_tokens=(dev_secrets["verify_token"],),
            app_secrets=(dev_secrets["app_secret"],),
        ),
        outbox=OutboxConfig(path=files.folder.parent / "dev-outbox.sqlite3"),
        targets=(
            TargetConfig(
                name="printer", url=sink_url, wait_initial_s=0.5, wait_max_s=5.0, attempts=5
            ),
        ),
        admin=AdminConfig(host="127.0.0.1", port=admin_port),
    )


async def _printing_target(say: Callable[[str], None]) -> tuple[web.AppRunner, str]:
    """The built-in target: shows each delivered notification through ``say``."""

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        delivery = request.headers.get("X-Gateway-Delivery-Id", "?")
        say(f"delivered {delivery}: {body.decode('utf-8', 'replace')}")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{bound_port(runner)}/"


def instructions(
    files: DevFiles,
    dev_secrets: dict[str, str],
    port: int,
    path: str,
    *,
    admin_port: int = DEV_ADMIN_PORT,
) -> str:
    """What ``serve --dev`` prints once listening; the last line is the console's URL."""
    url = f"https://localhost:{port}{path}"
    sample = files.sample.read_bytes() if files.sample.exists() else SAMPLE
    signature = sign(dev_secrets["app_secret"], sample)
    dev_dir = "" if files.folder == Path("var/dev") else f" --dev-dir {files.folder}"
    # `send --dev` finds the port in the configuration file written below.
    send = f"waba-gateway send --dev{dev_dir}"
    return "\n".join(
        [
            f"waba-gateway dev mode: {url} (mTLS required; certificates in {files.folder}/)",
            "Send a signed test notification with the stand-in Meta client certificate:",
            f"  {send}",
            "or with curl:",
            f"  curl --cacert {files.server_ca} --cert {files.client_chain} "
            f"--key {files.client_key} -H 'Content-Type: application/json' "
            f"-H 'X-Hub-Signature-256: {signature}' --data-binary @{files.sample} {url}",
            "Meta's verification handshake:",
            f"  curl --cacert {files.server_ca} --cert {files.client_chain} "
            f"--key {files.client_key} "
            f"'{url}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token="
            f"{dev_secrets['verify_token']}'",
            f"Configuration: {config_path(files.folder)} (every command takes --dev, or --config"
            " with that path), for example:",
            f"  waba-gateway deliveries list --dev{dev_dir}",
            f"Console: http://127.0.0.1:{admin_port}/",
        ]
    )


async def serve_dev(
    folder: Path,
    say: Callable[[str], None],
    *,
    port: int | None = None,
    admin_port: int | None = None,
) -> None:
    """Serve in dev mode until a signal; ``say`` shows the instructions and each delivery (the
    command line passes a printer to standard output). A port in use raises PortInUse."""
    setup_logging("info")
    files, dev_secrets = ensure_dev_files(folder)
    sink_runner, sink_url = await _printing_target(say)
    try:
        config = dev_config(
            files,
            dev_secrets,
            port=DEV_PORT if port is None else port,
            sink_url=sink_url,
            admin_port=admin_port,
        )

        def ready(gateway: Gateway) -> None:
            # The bound ports, so that port 0 (any free port) is written as the one in use.
            running = dataclasses.replace(
                config,
                listen=dataclasses.replace(config.listen, port=gateway.port),
                admin=dataclasses.replace(config.admin, port=gateway.admin_port),
            )
            write_sample(files)
            written = config_path(files.folder)
            written.touch(mode=0o600)
            written.chmod(0o600)  # before the secrets go in, whatever the file was
            written.write_text(dev_toml(running))
            # A reload (SIGHUP, `waba-gateway reload --dev`) reads the file just written and
            # compares it with this: the same values, as that file gives them.
            gateway.config = load_config(written)
            say(
                instructions(
                    files,
                    dev_secrets,
                    gateway.port,
                    config.listen.path,
                    admin_port=gateway.admin_port,
                )
            )

        await run(config, on_ready=ready)
    finally:
        await sink_runner.cleanup()
