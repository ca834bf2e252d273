"""A neighbour on the network, and what the operator's own tools give away: weak admin tokens
beyond loopback, the deployment examples' admin port, a target URL's password in `check`'s
error, the verify token on the command line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from callbacks import VERIFY_TOKEN, gateway_config, running_gateway
from config_files import write_config
from pki import Pki

from gateway.cli import main
from gateway.config import MIN_ADMIN_TOKEN_CHARS, load_config
from gateway.errors import ConfigError

DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy"
SHORT = "a" * (MIN_ADMIN_TOKEN_CHARS - 1)
LONG = "0123456789abcdef" * 2


def _config(pki: Pki, tmp_path: Path, admin: str) -> Path:
    path = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/sink")
    path.write_text(path.read_text().replace("[admin]\nenabled = false", f"[admin]\n{admin}"))
    return path


@pytest.fixture(autouse=True)
def _app_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_APP_SECRET", "exposure-test-secret")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
@pytest.mark.parametrize("token", ["a", SHORT])
def test_a_short_token_beyond_loopback_is_refused_by_serve_check_and_doctor(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, token: str
) -> None:
    """`token = "a"` with `admin.host = "0.0.0.0"` no longer passes: one error line naming
    admin.token and the rule, never the token, from every command that loads the file."""
    config = _config(pki, tmp_path, f'host = "{host}"\ntoken = "{token}"')
    refusal = f"{config}: admin.token = <hidden>: expected at least 32 characters"
    for command in ("check", "serve"):
        assert main([command, "--config", str(config)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"error: {refusal}")
        assert "openssl rand -hex 32" in err
        assert f'"{token}"' not in err
        assert len(err.strip().splitlines()) == 1
    assert main(["doctor", "--config", str(config)]) == 1  # a report: the finding is a FAIL
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"FAIL {refusal}")
    assert f'"{token}"' not in line


def test_a_long_token_beyond_loopback_loads(pki: Pki, tmp_path: Path) -> None:
    """The rule is the length, nothing else: 32 characters beyond loopback are taken."""
    config = load_config(_config(pki, tmp_path, f'host = "0.0.0.0"\ntoken = "{LONG}"'))
    assert config.admin.token == LONG


def test_a_short_token_on_loopback_is_warned_about_by_check_and_doctor(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On loopback a short token is allowed (a page in the browser is on loopback too), and
    both reports say it is weak and how to make a strong one; a long one gets no warning."""
    config = _config(pki, tmp_path, f'host = "127.0.0.1"\ntoken = "{SHORT}"')
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: admin.token is shorter than 32 characters" in out
    main(["doctor", "--config", str(config)])
    out = capsys.readouterr().out
    assert "WARN admin.token is shorter than 32 characters" in out
    assert SHORT not in out
    config.write_text(config.read_text().replace(SHORT, LONG))
    assert main(["check", "--config", str(config)]) == 0
    assert "admin.token" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "url",
    [
        "ftp://operator:hunter2-password@internal.example/hook",
        "http://operator:hunter2-password@internal.example:port/hook",
        "http://operator:hunter2-password@/hook",
    ],
)
def test_check_does_not_echo_a_target_urls_password(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """An invalid target URL is named in the error with its password masked."""
    config = write_config(pki, tmp_path, target_url=url)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: targets[0].url = ")
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "hosts", ['["http://ops.example"]', '["ops.example:8081"]', '[""]', '["a b"]', '"ops"']
)
def test_allowed_hosts_are_host_names_only(pki: Pki, tmp_path: Path, hosts: str) -> None:
    """admin.allowed_hosts takes names or addresses, as Host names them without the port."""
    config = _config(pki, tmp_path, f"allowed_hosts = {hosts}")
    with pytest.raises(ConfigError, match=r"admin\.allowed_hosts"):
        load_config(config)


def test_allowed_hosts_take_names_and_addresses(pki: Pki, tmp_path: Path) -> None:
    """A private DNS name, an IPv4 and an IPv6 address are all Host names."""
    hosts = ("ops.internal", "gateway-admin.corp.example.", "10.0.0.5", "fd00::5")
    config = _config(pki, tmp_path, "allowed_hosts = [" + ", ".join(f'"{h}"' for h in hosts) + "]")
    assert load_config(config).admin.allowed_hosts == hosts


async def test_verify_callback_takes_the_verify_token_from_the_environment(
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WABA_VERIFY_TOKEN keeps the token off the command line (shell history, `ps`); without
    it and without --verify-token, one error line says how to give it."""
    argv = ["--ca-file", str(pki.server_ca_file)]
    argv += ["--cert", str(pki.client_chain_file), "--key", str(pki.client_key_file)]
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        monkeypatch.delenv("WABA_VERIFY_TOKEN", raising=False)
        assert await asyncio.to_thread(main, ["verify-callback", url, *argv]) == 2
        assert (
            capsys.readouterr().err
            == "error: no verify token: set WABA_VERIFY_TOKEN (or pass --verify-token)\n"
        )
        monkeypatch.setenv("WABA_VERIFY_TOKEN", VERIFY_TOKEN)
        assert await asyncio.to_thread(main, ["verify-callback", url, *argv]) == 0
        out = capsys.readouterr().out
    assert out.startswith("verified: HTTP 200")
    assert VERIFY_TOKEN not in out


def _kubernetes() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes/waba-gateway.yaml").read_text()):
        found.setdefault(doc["kind"], []).append(doc)
    return found


def test_kubernetes_keeps_the_admin_port_off_the_public_service() -> None:
    """Only the callback is on the LoadBalancer; a NetworkPolicy lets the admin port take
    connections from the monitoring namespace only; the manifest says how to reach it."""
    manifests = _kubernetes()
    exposed = [s for s in manifests["Service"] if s["spec"]["type"] in ("LoadBalancer", "NodePort")]
    assert [port["targetPort"] for s in exposed for port in s["spec"]["ports"]] == ["https"]
    (policy,) = manifests["NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {port["port"]: rule for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert rules.keys() == {"https", "admin"}
    assert "from" not in rules["https"]  # Meta's addresses are not fixed
    assert [peer.keys() for peer in rules["admin"]["from"]] == [{"namespaceSelector"}]
    text = (DEPLOY / "kubernetes/waba-gateway.yaml").read_text()
    assert "kubectl port-forward pod/waba-gateway-0 8081:8081" in text
    assert "openssl rand -hex 32" in text


def test_docker_keeps_the_admin_listener_in_the_container() -> None:
    """The image's configuration binds the admin listener to loopback, the Dockerfile exposes
    only the callback, and the files say how to reach the admin listener without publishing
    it to every interface."""
    config = (DEPLOY / "docker/gateway.toml").read_text()
    assert '[admin]\nhost = "127.0.0.1"' in config
    assert "-p 127.0.0.1:8081:8081" in config
    assert "docker exec" in (DEPLOY / "docker/Dockerfile").read_text()
    exposed = [
        line.split()[1:]
        for line in (DEPLOY / "docker/Dockerfile").read_text().splitlines()
        if line.startswith("EXPOSE")
    ]
    assert exposed == [["8443"]]
