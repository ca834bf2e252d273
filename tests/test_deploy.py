"""The files under deploy/ agree with the gateway: the configuration they ship loads, the commands
they run parse, the ports and paths they name are the configured ones, the systemd unit
verifies, and every metric the alert rules and the dashboard use is one the gateway exposes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from ci import unavailable

from gateway.admin.stats import Snapshot, Stats
from gateway.cli import build_parser
from gateway.config import Config, load_config
from gateway.outbox import Backlog

DEPLOY = Path(__file__).parent.parent / "deploy"
# The admin token as long as a listener beyond loopback requires (Kubernetes binds 0.0.0.0).
ENV = {"WABA_VERIFY_TOKEN": "x", "WABA_APP_SECRET": "x", "WABA_ADMIN_TOKEN": "x" * 32}
# Prometheus' own series that the rules may use besides the gateway's.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {
    "by",
    "count",
    "histogram_quantile",
    "increase",
    "le",
    "max",
    "min",
    "rate",
    "sum",
    "time",
}


def _config(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path, ENV)


def _parses_as_a_command(argv: list[str]) -> None:
    """The arguments name a real `waba-gateway` command with options it takes."""
    assert argv[0].endswith("waba-gateway"), argv
    build_parser().parse_args(argv[1:])


def _config_argument(argv: list[str]) -> PurePosixPath:
    return PurePosixPath(argv[argv.index("--config") + 1])


# -- metrics --------------------------------------------------------------------------------------


def _exposed() -> set[str]:
    """Every sample name /metrics can hold: each metric exercised once."""
    stats = Stats()
    stats.accepted()
    stats.duplicate()
    stats.rejected("signature")
    stats.saw_client("cn")
    stats.committed(1)
    stats.answered(200, 0.01)
    stats.attempted("t", "delivered", 0.1)
    stats.tls_handshake_failed("timeout")
    stats.proxy_header_refused("missing")
    stats.reloaded(True)
    stats.auth_failed("bearer", 0.05)
    snapshot = Snapshot(
        now=10.0,
        backlog=[Backlog("t", 1, 1.0, 1)],
        circuits={"t": "open"},
        server_certificate_expiry=1.0,
        client_ca_expiries=[("CN=ca", 1.0)],
        last_reload_success=1.0,
    )
    text = stats.render(snapshot).decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line[:1] != "#"}


def _expressions() -> Iterator[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]
    dashboard = json.loads((DEPLOY / "grafana/waba-gateway.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target["expr"]


def test_every_metric_the_alerts_and_dashboard_use_is_one_the_gateway_exposes() -> None:
    """A renamed metric would leave an alert that never fires: each series is checked."""
    exposed = _exposed()
    checked = 0
    for where, expr in _expressions():
        without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
        without_groups = re.sub(r"\bby\s*\([^)]*\)", " ", without_labels)
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groups)) - PROMQL_WORDS
        unknown = {n for n in names if n not in exposed and n not in PROMETHEUS_SERIES}
        assert not unknown, f"{where}: {sorted(unknown)} not exposed"
        checked += len(names)
    assert checked > 20


def test_the_rules_alert_on_stuck_deliveries_certificates_and_reloads() -> None:
    """The questions of an on-call engineer each have an alert."""
    used = " ".join(expr for where, expr in _expressions() if where.startswith("alert"))
    for metric in (
        "waba_gateway_target_oldest_pending_age_seconds",
        "waba_gateway_target_circuit_state",
        "waba_gateway_server_certificate_expiry_timestamp_seconds",
        "waba_gateway_client_ca_expiry_timestamp_seconds",
        "waba_gateway_reloads_total",
        'waba_gateway_delivery_attempts_total{outcome="dead"}',
    ):
        assert metric in used
    assert "30 * 86400" in used  # an alert 30 days before a certificate expires


# -- the shipped configuration --------------------------------------------------------------------


def test_the_shipped_configurations_load(tmp_path: Path) -> None:
    """deploy/gateway.toml (systemd) and deploy/docker/gateway.toml load as they are."""
    for path in (DEPLOY / "gateway.toml", DEPLOY / "docker/gateway.toml"):
        config = _config(path.read_text(), tmp_path)
        assert config.tls.watch_files
        assert config.log_format == "json"


# -- systemd --------------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_unit_runs_confined_as_its_own_user(tmp_path: Path) -> None:
    """Its own user, read-only system, write access to the outbox folder only, port 443 by
    capability, SIGHUP to reload, restarted on failure; the command parses."""
    unit = _unit(DEPLOY / "systemd/waba-gateway.service")
    config = _config((DEPLOY / "gateway.toml").read_text(), tmp_path)
    outbox_folder = str(config.outbox.path.parent)
    assert unit["User"] == ["waba-gateway"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["ReadWritePaths"] == [outbox_folder]
    assert f"/var/lib/{unit['StateDirectory'][0]}" == outbox_folder
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert config.listen.port == 443
    argv = shlex.split(unit["ExecStart"][0])
    _parses_as_a_command(argv)
    assert _config_argument(argv) == PurePosixPath("/etc/waba-gateway/gateway.toml")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (its ExecStart pointed at this Python, since
    the installed path does not exist here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable(
            "systemd-analyze is not installed: apt-get install systemd (.ci/run installs it)"
        )
    text = (DEPLOY / "systemd/waba-gateway.service").read_text()
    text = text.replace("/opt/waba-gateway/bin/waba-gateway", f"{sys.executable} -m gateway")
    unit = tmp_path / "waba-gateway.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "waba-gateway.service" not in result.stderr, result.stderr


def _install_steps() -> list[list[str]]:
    """The commands in the unit's header (lines "#   cmd"), each ``&&`` chain split."""
    commands: list[list[str]] = []
    for line in (DEPLOY / "systemd/waba-gateway.service").read_text().splitlines():
        if not line.startswith("#   ") or line.startswith("#    "):
            continue
        for command in line[4:].split("&&"):
            commands.append(shlex.split(command))
    return commands


def test_systemd_install_steps_install_from_the_checkout_onto_a_fresh_host(
    tmp_path: Path,
) -> None:
    """The header's steps, run as written (under a folder standing for /, without the group
    option: the test host has no waba-gateway group) on a host where nothing exists yet: every
    folder the configuration names is made before anything is put in it, the configuration
    installed loads, and the gateway is installed from this checkout, not from a registry."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)  # what a fresh host with systemd has
    repo = DEPLOY.parent
    steps = _install_steps()
    programs = [argv[0].rsplit("/", 1)[-1] for argv in steps]
    assert programs[:2] == ["useradd", "python3"]
    assert programs[-2:] == ["systemctl", "systemctl"]
    pip = next(argv for argv in steps if argv[0].endswith("/bin/pip"))
    assert pip[1] == "install"
    requirement = pip[2]
    assert requirement.startswith(".["), f"installs {requirement!r}, not this checkout"
    extras = requirement.removeprefix(".[").removesuffix("]").split(",")
    pyproject = (repo / "pyproject.toml").read_text()
    assert all(re.search(rf"(?m)^{extra} = \[", pyproject) for extra in extras)
    unit = _unit(DEPLOY / "systemd/waba-gateway.service")
    assert unit["User"][0] in steps[0]
    for argv in steps:
        if argv[0] != "install":
            continue
        rooted: list[str] = []
        skip = False
        for arg in argv:
            if skip:
                skip = False
            elif arg == "-g":
                skip = True
            elif arg.startswith("/") and arg != "/dev/null":
                rooted.append(str(root) + arg)
            else:
                rooted.append(arg)
        result = subprocess.run(rooted, cwd=repo, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"
    installed = root / "etc/waba-gateway/gateway.toml"
    config = load_config(installed, ENV)
    assert config.tls.client_ca_file is not None
    for named in (config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file):
        assert (root / str(named).lstrip("/")).parent.is_dir(), named
    assert (root / unit["EnvironmentFile"][0].lstrip("/")).stat().st_mode & 0o777 == 0o600
    assert (root / "etc/systemd/system/waba-gateway.service").is_file()


# -- Docker ---------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "docker/Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerfile_runs_as_non_root_with_the_outbox_on_a_volume(tmp_path: Path) -> None:
    """Slim base, non-root user, the outbox folder a volume, HEALTHCHECK on /healthz at the
    configured admin port, the configured listen port exposed, SIGHUP documented."""
    steps = _dockerfile()
    (base,) = [value for op, value in steps if op == "FROM"]
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    (user,) = [value for op, value in steps if op == "USER"]
    assert user not in ("root", "0")
    config = _config((DEPLOY / "docker/gateway.toml").read_text(), tmp_path)
    (volume,) = [json.loads(value) for op, value in steps if op == "VOLUME"]
    assert volume == [str(config.outbox.path.parent)]
    (health,) = [value for op, value in steps if op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{config.admin.port}/healthz" in health
    (exposed,) = [value for op, value in steps if op == "EXPOSE"]
    assert exposed == str(config.listen.port)
    (entry,) = [json.loads(value) for op, value in steps if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(value) for op, value in steps if op == "CMD"]
    _parses_as_a_command(entry + cmd)
    assert _config_argument(cmd) == PurePosixPath("/etc/waba-gateway/gateway.toml")
    assert "docker kill --signal=HUP" in (DEPLOY / "docker/Dockerfile").read_text()


# -- Kubernetes -----------------------------------------------------------------------------------


def _manifests() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes/waba-gateway.yaml").read_text()):
        found.setdefault(doc["kind"], []).append(doc)
    return found


def _mounted_under(path: Path, container: dict[str, Any], volume: str) -> bool:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return PurePosixPath(path).is_relative_to(mount["mountPath"])


def test_kubernetes_passes_tls_through_and_probes_the_admin_port(tmp_path: Path) -> None:
    """A LoadBalancer on TCP to the configured listen port and no Ingress; probes on the
    ConfigMap's admin port; certificates from a Secret; the outbox on a PersistentVolume; a
    PodDisruptionBudget over the pods; the command parses."""
    manifests = _manifests()
    assert "Ingress" not in manifests
    (config_map,) = manifests["ConfigMap"]
    config = _config(config_map["data"]["gateway.toml"], tmp_path)
    (stateful_set,) = manifests["StatefulSet"]
    pod = stateful_set["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": config.listen.port, "admin": config.admin.port}

    (public,) = [s for s in manifests["Service"] if s["spec"]["type"] == "LoadBalancer"]
    (https,) = public["spec"]["ports"]
    assert (https["protocol"], https["port"], ports[https["targetPort"]]) == (
        "TCP",
        443,
        config.listen.port,
    )

    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert {ports[probe["port"]] for probe in probes.values()} == {config.admin.port}
    assert config.admin.host == "0.0.0.0"  # the kubelet probes the pod's address

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "waba-gateway-tls"
    assert _mounted_under(config.tls.cert_file, container, "tls")
    assert _mounted_under(config.tls.key_file, container, "tls")
    assert config.tls.client_ca_file is not None
    assert _mounted_under(config.tls.client_ca_file, container, "meta-ca")
    assert config.tls.watch_files  # a renewed Secret reaches the files: reload by itself
    (claim,) = stateful_set["spec"]["volumeClaimTemplates"]
    assert _mounted_under(config.outbox.path, container, claim["metadata"]["name"])

    (budget,) = manifests["PodDisruptionBudget"]
    labels = stateful_set["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < stateful_set["spec"]["replicas"]

    argv = container["command"] + container["args"]
    _parses_as_a_command(argv)
    (config_mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert _config_argument(argv) == PurePosixPath(config_mount["mountPath"])
