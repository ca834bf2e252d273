"""deploy/prometheus/prometheus.yml scrapes the gateway as deployed: the job the alert rules
select, the shipped admin address, and the admin token sent from a file; real Prometheus
(Debian's `prometheus` package, which .ci/run installs) scrapes a running gateway with it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from config_files import free_port
from helpers import gateway_config
from pki import Pki

from gateway.config import load_config
from gateway.runtime.gateway import Gateway

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ENV = {name: "x" for name in ("WABA_VERIFY_TOKEN", "WABA_APP_SECRET", "WABA_ADMIN_TOKEN")}
TOKEN = "scrape-token-0123456789"
# Prometheus scrapes at a random offset within its interval: a few intervals and its start-up.
SCRAPED_WITHIN_S = 30.0


def _shipped() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    return loaded


def _tool(name: str) -> str:
    """The path of Debian's ``name``; outside CI a test without it is skipped, under CI it fails."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian's prometheus package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_the_scrape_job_sends_the_token_from_a_file_to_the_shipped_admin_address(
    tmp_path: Path,
) -> None:
    """One job, named as the alert rules select it, on deploy/gateway.toml's admin address and
    /metrics, with a bearer token read from a file (never written in the configuration)."""
    shipped = _shipped()
    (job,) = shipped["scrape_configs"]
    assert job["job_name"] == "waba-gateway"
    assert 'job="waba-gateway"' in (PROMETHEUS / "alerts.yml").read_text()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert Path(job["authorization"]["credentials_file"]).is_absolute()
    assert "credentials" not in job["authorization"]
    path = tmp_path / "gateway.toml"
    path.write_text((PROMETHEUS.parent / "gateway.toml").read_text())
    admin = load_config(path, ENV).admin
    assert admin.token is not None
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"{admin.host}:{admin.port}"]
    assert shipped["rule_files"] == ["alerts.yml"]


def _as_run_here(tmp_path: Path, admin_port: int, tokens: dict[str, str]) -> Path:
    """The shipped configuration with only what a host changes: the token file, the address,
    the rules' path, and a short interval. One job per entry of ``tokens`` (job name: token)."""
    config = _shipped()
    (job,) = config["scrape_configs"]
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    jobs = []
    for name, token in tokens.items():
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(token)
        jobs.append(
            job
            | {
                "job_name": name,
                "authorization": job["authorization"] | {"credentials_file": str(token_file)},
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
            }
        )
    config["scrape_configs"] = jobs
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_promtool_accepts_the_scrape_configuration_and_the_alert_rules(tmp_path: Path) -> None:
    """`promtool check config`: the scrape job and alerts.yml as Prometheus reads them."""
    promtool = _tool("promtool")
    config = _as_run_here(tmp_path, 8081, {"waba-gateway": TOKEN})
    result = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


async def _targets(port: int) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/targets"
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body = await response.json()
    except aiohttp.ClientError:
        return []
    found: list[dict[str, Any]] = body["data"]["activeTargets"]
    return found


async def test_prometheus_scrapes_the_gateway_with_the_admin_token(
    pki: Pki, tmp_path: Path
) -> None:
    """Real Prometheus with the shipped job: the gateway's /metrics is scraped (health up)
    with the right token, and refused with 401 (health down) with a wrong one."""
    prometheus = _tool("prometheus")
    port = free_port()
    config = gateway_config(pki, tmp_path, admin_token=TOKEN)
    log = tmp_path / "prometheus.log"
    async with Gateway(config) as gateway:
        scrape = _as_run_here(
            tmp_path, gateway.admin_port, {"waba-gateway": TOKEN, "wrong-token": "not-it"}
        )
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                prometheus,
                f"--config.file={scrape}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
            )
        try:
            health: dict[str, tuple[str, str]] = {}
            deadline = time.monotonic() + SCRAPED_WITHIN_S
            while len([h for h, _ in health.values() if h != "unknown"]) < 2:
                assert process.returncode is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, f"not scraped in time: {health}"
                await asyncio.sleep(0.2)
                health = {
                    target["labels"]["job"]: (target["health"], target["lastError"])
                    for target in await _targets(port)
                }
        finally:
            process.terminate()
            await process.wait()
    assert health["waba-gateway"] == ("up", "")
    state, error = health["wrong-token"]
    assert state == "down"
    assert "401" in error
