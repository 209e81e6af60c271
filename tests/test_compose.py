"""docker-compose.yml: the full stack is wired together (no Docker engine here, so this reads the file).

Checks services, images and builds, commands (every fission command parses with the real CLI), ports,
named volumes, health checks, start order (depends_on conditions), that every path mounted from the repository
exists and is mounted where Grafana and Prometheus look for it, that Prometheus scrapes the ports the fission
processes serve metrics on, and that the Grafana data sources point at services of the stack. When Debian's
`docker-compose` is installed, its own validation (`docker-compose config`) runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVERS = {"kafka", "redis", "clickhouse", "prometheus", "grafana"}
FISSION = {"worker-1", "worker-2", "sink", "cascades", "migrate", "simulator"}
LONG_RUNNING_FISSION = {"worker-1", "worker-2", "sink", "cascades"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<: *anchor` merges


def services() -> dict[str, dict]:
    return compose()["services"]


def conditions(service: dict) -> dict[str, str]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of the mounts from the repository (not named volumes)."""
    found = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            found.append((source, target))
    return found


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def metrics_port(service: dict) -> int | None:
    """The port a fission process serves /metrics on: --metrics-port, else FISSION_METRICS_PORT."""
    cmd = command(service)
    if "--metrics-port" in cmd:
        return int(cmd[cmd.index("--metrics-port") + 1])
    port = service.get("environment", {}).get("FISSION_METRICS_PORT")
    return int(port) if port is not None else None


def test_all_services_are_there() -> None:
    assert set(services()) == SERVERS | FISSION


def test_images_are_pinned_and_fission_is_built_from_the_dockerfile() -> None:
    for name, service in services().items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version ({image})"
        if name in FISSION:
            assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}
            assert image == "fission:local"  # one image, built once, for every fission service
    assert services()["kafka"]["image"].startswith("apache/kafka:4.")  # KRaft only


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert 'ENTRYPOINT ["fission"]' in text
    assert re.search(r"^USER \w+", text, re.M), "run as a non-root user"
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text()
    for source in ("pyproject.toml", "README.md", "attribution/", "stream/", "sinks/", "config/"):
        assert f"!{source}" in ignore, f"the build context filter drops {source}"


def cli_parser() -> argparse.ArgumentParser:
    from stream.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("name", sorted(FISSION))
def test_fission_commands_parse(name: str) -> None:
    """Each fission service's command is one the real CLI accepts (argparse, nothing is run)."""
    cmd = command(services()[name])
    parser = cli_parser()
    known = parser._subparsers._group_actions[0].choices  # the subcommand names
    if cmd[0] not in known:
        pytest.skip(f"`fission {cmd[0]}` does not exist yet (stream/cli.py); its service waits for it")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(cmd)
        except SystemExit as exc:
            pytest.fail(f"{name}: `fission {' '.join(cmd)}` is rejected by the CLI: {err.getvalue()} ({exc})")


def test_fission_environment_names_real_settings() -> None:
    from stream.settings import Settings

    known = {f"FISSION_{f.name.upper()}" for f in fields(Settings)}
    for name in FISSION:
        env = services()[name].get("environment", {})
        unknown = sorted(k for k in env if k.startswith("FISSION_") and k not in known)
        assert not unknown, f"{name}: no such setting: {unknown}"
        assert env["FISSION_KAFKA_BOOTSTRAP"] == "kafka:19092"  # the broker's INTERNAL advertised listener
        assert env["FISSION_CLICKHOUSE_URL"].endswith("@clickhouse:9000/default")


def test_health_checks() -> None:
    for name in SERVERS | LONG_RUNNING_FISSION:
        check = services()[name].get("healthcheck")
        assert check and check["test"] and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
    for name in LONG_RUNNING_FISSION:  # the metrics server's /health, on the port the process serves
        test = " ".join(services()[name]["healthcheck"]["test"])
        assert f":{metrics_port(services()[name])}/health" in test


def test_start_order() -> None:
    found = services()
    for name, service in found.items():
        for dependency in conditions(service):
            assert dependency in found, f"{name} depends on a missing service {dependency}"
    assert conditions(found["migrate"]) == {"clickhouse": "service_healthy"}
    for name in ("worker-1", "worker-2"):
        assert conditions(found[name]) == {"kafka": "service_healthy", "redis": "service_healthy"}
    for name in ("sink", "cascades"):
        assert conditions(found[name]) == {"kafka": "service_healthy", "migrate": "service_completed_successfully"}
    assert conditions(found["grafana"])["clickhouse"] == "service_healthy"
    assert conditions(found["grafana"])["prometheus"] == "service_healthy"
    assert conditions(found["simulator"])["kafka"] == "service_healthy"
    assert found["migrate"]["restart"] == "no" and found["simulator"]["restart"] == "no"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        for dependency in conditions(found[name]):
            visit(dependency, (*path, name))

    for name in found:
        visit(name, ())


def test_named_volumes_keep_server_state() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    used = set()
    for service in doc["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    state = {"kafka": "/var/lib/kafka/data", "redis": "/data", "clickhouse": "/var/lib/clickhouse",
             "prometheus": "/prometheus", "grafana": "/var/lib/grafana"}
    for name, path in state.items():
        targets = {v.split(":")[1]: v.split(":")[0] for v in doc["services"][name]["volumes"]}
        assert targets.get(path) in declared, f"{name}: {path} is not on a named volume"
    assert services()["kafka"]["environment"]["KAFKA_LOG_DIRS"] == state["kafka"]
    assert "--appendonly" in command(services()["redis"])


def test_ports() -> None:
    def published(name: str) -> set[int]:
        return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in services()[name].get("ports", [])}

    assert 3000 in published("grafana")
    assert 9090 in published("prometheus")
    assert {9000, 8123} <= published("clickhouse")
    assert 9092 in published("kafka")
    assert 6379 in published("redis")
    kafka = services()["kafka"]["environment"]
    assert "EXTERNAL://localhost:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]


def test_every_mounted_path_exists_in_the_repository() -> None:
    for name, service in services().items():
        for source, _ in bind_mounts(service):
            assert source.startswith("./"), f"{name}: mount {source} from the repository, relative to it"
            assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"


def test_grafana_sees_its_provisioning() -> None:
    grafana = services()["grafana"]
    mounts = dict((target, source) for source, target in bind_mounts(grafana))
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == "./grafana/dashboards"
    assert list((REPO / "grafana/dashboards").glob("*.json"))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path + "/") and (REPO / "grafana/dashboards" / Path(home).name).exists()
    for sub in ("datasources", "dashboards", "alerting"):
        assert list((REPO / "grafana/provisioning" / sub).glob("*.yaml")), f"nothing to provision in {sub}"


def test_grafana_installs_the_clickhouse_plugin_the_dashboards_are_written_for() -> None:
    plugin, version = services()["grafana"]["environment"]["GF_INSTALL_PLUGINS"].split()
    assert plugin == "grafana-clickhouse-datasource"
    dashboard = (REPO / "grafana/dashboards/campaign.json").read_text()
    assert f'"pluginVersion": "{version}"' in dashboard


def test_grafana_data_sources_point_at_the_stack() -> None:
    doc = yaml.safe_load((REPO / "grafana/provisioning/datasources/datasources.yaml").read_text())
    by_uid = {ds["uid"]: ds for ds in doc["datasources"]}
    clickhouse = by_uid["fission-clickhouse"]["jsonData"]
    assert clickhouse["host"] in services() and clickhouse["port"] == 9000
    password = by_uid["fission-clickhouse"]["secureJsonData"]["password"]
    variable = re.fullmatch(r"\$\{(\w+)\}", password)
    assert variable and variable[1] in services()["grafana"]["environment"]
    url = by_uid["fission-prometheus"]["url"]
    assert re.fullmatch(r"http://prometheus:9090", url) and "prometheus" in services()
    migrate_db = services()["migrate"]["environment"]["FISSION_CLICKHOUSE_DATABASE"]
    assert clickhouse["defaultDatabase"] == migrate_db


def test_prometheus_scrapes_every_fission_process() -> None:
    prometheus = services()["prometheus"]
    config_flag = next(a for a in command(prometheus) if a.startswith("--config.file="))
    config_path = PurePosixPath(config_flag.split("=", 1)[1])
    mounts = dict((target, source) for source, target in bind_mounts(prometheus))
    host_dir = REPO / mounts[str(config_path.parent)]
    config = yaml.safe_load((host_dir / config_path.name).read_text())
    for rule_file in config.get("rule_files", []):
        assert list(host_dir.glob(rule_file)), f"prometheus.yml loads {rule_file}, which matches no mounted file"
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{metrics_port(services()[name])}" for name in LONG_RUNNING_FISSION}
    assert expected <= targets, f"not scraped: {sorted(expected - targets)}"
    for target in targets - {"localhost:9090"}:
        assert target.split(":")[0] in services(), f"scrape target {target} is no service"


def test_docker_compose_validates_the_file() -> None:
    tool = shutil.which("docker-compose")
    if not tool:
        pytest.skip("Debian's docker-compose is not installed: the file's own validation is skipped "
                    "(apt-get install docker-compose; no Docker engine is needed)")
    proc = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
