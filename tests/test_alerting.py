"""Alerting: the Prometheus rules, the Alertmanager routing, and a stalled cascade notified end to end.

- The rule files pass `promtool check rules`, prometheus/alertmanager.yml passes `amtool check-config` and
  routes each alert to the receiver its audience reads, and the Prometheus config `scripts/services` renders
  from prometheus/prometheus.test.yml.in passes `promtool check config`.
- Every rule of prometheus/rules/fission.yml is unit-tested with `promtool test rules` (series in, alerts out,
  summaries rendered).
- End to end, on the real servers: a campaign in which one cascade stops growing is produced to Kafka and run
  through the cascade agent (`run_cascades` in a subprocess, metrics on a free port). The agent is registered
  as a scrape target of the `scripts/services` Prometheus (file_sd), which loads the rules of this checkout
  and sends alerts to an Alertmanager this test starts with prometheus/alertmanager.yml (webhooks pointed at
  a local receiver, group_wait and group_interval 1 s). StalledCascade reaches the webhook as firing, then,
  after the cascade grows again, as resolved. Event time: the agent's clock is the campaign's watermark, so
  time is moved on by producing binds with later `ts` in another cascade; nothing sleeps for minutes.
- Every Prometheus query of the Grafana dashboards runs on that Prometheus without an error.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Producer

from stream.settings import Settings
from stream.topics import Topics, ensure_topics
from tests.alert_webhook import WebhookReceiver
from tests.test_cascades import bound, shared

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULES = PROMETHEUS_DIR / "rules" / "fission.yml"
ALERTMANAGER_CONFIG = PROMETHEUS_DIR / "alertmanager.yml"
TEMPLATE = PROMETHEUS_DIR / "prometheus.test.yml.in"
DASHBOARDS = REPO / "grafana" / "dashboards"
FIRING_TIMEOUT_S = 90  # agent start (Faust, topic creation) + scrape + evaluation + Alertmanager group_wait
RESOLVED_TIMEOUT_S = 60

# The cascade agent until SIGTERM: checks every 0.5 s, metrics on the given port, no ClickHouse.
LAUNCHER = """
import sys
from stream.cascades import CascadeOptions, run_cascades
from stream.logs import configure_logging
from stream.settings import load_settings

bootstrap, prefix, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
configure_logging("info")
settings = load_settings(None, kafka_bootstrap=bootstrap, topic_prefix=prefix, app_id=prefix, partitions=1)
run_cascades(settings, metrics_port=port, options=CascadeOptions(check_interval_s=0.5, clickhouse=False),
             loglevel="warning")
"""


def tool(*names: str) -> str:
    """The first of `names` on PATH (Debian: prometheus ships promtool, prometheus-alertmanager amtool)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"{names[0]} is missing: apt-get install prometheus prometheus-alertmanager "
                "(or run scripts/services up, which installs them)", pytrace=False)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_atomically(path: Path, data: Any) -> None:
    """file_sd readers must never see half a file: write aside, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def http_json(url: str, data: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any]:
    """(status, body) of a GET, or of a form POST when `data` is given: the body parsed if it is JSON, else
    its text. HTTP errors are returned, not raised."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(url, data=body, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


def wait_until(check: Callable[[], Any], timeout: float, what: str, diagnose: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (OSError, ValueError):
            found = None
        if found:
            return found
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s\n{diagnose()}", pytrace=False)
        time.sleep(0.25)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- static checks ---------------------------------------------------------------------------------------


def test_rule_files_pass_promtool() -> None:
    files = sorted(str(p.relative_to(REPO)) for p in RULES_DIR.glob("*.yml"))
    assert "prometheus/rules/fission.yml" in files
    proc = run(tool("promtool"), "check", "rules", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_names_and_labels() -> None:
    rules = {r["alert"]: r for g in load_yaml(RULES)["groups"] for r in g["rules"]}
    assert set(rules) == {"StalledCascade", "KFactorBelowOne", "DeadLetterRate", "ConsumerLag",
                          "EventToCreditLatencyP99"}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    for name in ("StalledCascade", "KFactorBelowOne"):
        assert "{{ $labels.campaign }}" in rules[name]["annotations"]["summary"], name


def test_alertmanager_config_passes_amtool() -> None:
    proc = run(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    ({"alertname": "StalledCascade", "campaign": "spring", "severity": "warning"}, "fission-growth"),
    ({"alertname": "KFactorBelowOne", "campaign": "spring", "severity": "warning"}, "fission-growth"),
    ({"alertname": "ConsumerLag", "partition": "3", "severity": "warning"}, "fission-ops"),
    ({"alertname": "DeadLetterRate", "reason": "invalid_event", "severity": "warning"}, "fission-ops"),
    ({"alertname": "EventToCreditLatencyP99", "severity": "warning"}, "fission-ops"),
    ({"alertname": "FissionStoreErrors", "severity": "critical"}, "fission-ops-critical"),
])
def test_alertmanager_routes(labels: dict[str, str], receiver: str) -> None:
    args = [f"{k}={v}" for k, v in labels.items()]
    proc = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [receiver]


def render_template(sd_dir: Path, alertmanager: str, prometheus: str) -> str:
    """What `scripts/services up` does to prometheus/prometheus.test.yml.in (its sed line, in Python)."""
    text = TEMPLATE.read_text()
    for name, value in {"SD_DIR": str(sd_dir), "RULES_DIR": str(RULES_DIR), "ALERTMANAGER": alertmanager,
                        "PROMETHEUS": prometheus}.items():
        text = text.replace(f"@{name}@", value)
    return text


def test_services_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(render_template(tmp_path / "sd", "127.0.0.1:19094", "127.0.0.1:19090"))
    assert not re.search(r"^[^#]*@[A-Z_]+@", config.read_text(), flags=re.M)  # every placeholder replaced
    proc = run(tool("promtool"), "check", "config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fission.yml" in proc.stdout  # the rule files were found and checked too


# -- unit tests of the rules (promtool test rules) --------------------------------------------------------

# Series in, alerts out, one scenario per rule. The rules are tested as written except for their
# `description` and `dashboard` annotations (prose, checked by promtool's template parsing); summaries are
# rendered and compared.
RULE_TESTS: list[dict[str, Any]] = [
    {  # two agent processes each own one stalled cascade of campaign c; campaign d has none
        "interval": "1m",
        "input_series": [
            {"series": 'fission_stalled_cascades{campaign="c", instance="a:9100", job="fission-cascades"}',
             "values": "0 0 1 1 1 1 0 0"},
            {"series": 'fission_stalled_cascades{campaign="c", instance="b:9100", job="fission-cascades"}',
             "values": "0 0 0 1 1 0 0 0"},
            {"series": 'fission_stalled_cascades{campaign="d", instance="b:9100", job="fission-cascades"}',
             "values": "0x7"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "StalledCascade", "exp_alerts": []},
            {"eval_time": "2m", "alertname": "StalledCascade", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "c"},
                 "exp_annotations": {"summary": "Campaign c: 1 cascade(s) stalled"}}]},
            {"eval_time": "4m", "alertname": "StalledCascade", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "c"},
                 "exp_annotations": {"summary": "Campaign c: 2 cascade(s) stalled"}}]},
            {"eval_time": "6m", "alertname": "StalledCascade", "exp_alerts": []},
        ],
    },
    {  # K over time: "viral" stays above 1, "fading" drops below 1 at 61m, "young" starts below 1
        "interval": "1m",
        "input_series": [
            {"series": 'fission_k_factor{campaign="viral", instance="a:9100"}', "values": "1.5x300"},
            {"series": 'fission_k_factor{campaign="fading", instance="a:9100"}', "values": "1.5x60 0.5x240"},
            {"series": 'fission_k_factor{campaign="young", instance="a:9100"}', "values": "0x300"},
        ],
        "alert_rule_test": [
            {"eval_time": "2h", "alertname": "KFactorBelowOne", "exp_alerts": []},
            # "young" has been measured for 3 h only now (offset 3h); pending for 5 minutes
            {"eval_time": "3h4m", "alertname": "KFactorBelowOne", "exp_alerts": []},
            {"eval_time": "3h10m", "alertname": "KFactorBelowOne", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "young"},
                 "exp_annotations": {"summary": "Campaign young: K-factor below 1 for 3 h (at most 0.00)"}}]},
            # "fading": the last K of 1.5 (at 60m) leaves the 3 h window after 4h; then 5 minutes pending
            {"eval_time": "4h5m", "alertname": "KFactorBelowOne", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "young"},
                 "exp_annotations": {"summary": "Campaign young: K-factor below 1 for 3 h (at most 0.00)"}}]},
            {"eval_time": "4h10m", "alertname": "KFactorBelowOne", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "fading"},
                 "exp_annotations": {"summary": "Campaign fading: K-factor below 1 for 3 h (at most 0.50)"}},
                {"exp_labels": {"severity": "warning", "team": "growth", "campaign": "young"},
                 "exp_annotations": {"summary": "Campaign young: K-factor below 1 for 3 h (at most 0.00)"}}]},
        ],
    },
    {  # 100 events/s; 10 % dead-lettered as invalid_event (alert), 1 % as self_referral (no alert)
        "interval": "1m",
        "input_series": [
            {"series": 'fission_events_total{type="scan", outcome="bound", reason=""}', "values": "0+6000x30"},
            {"series": 'fission_dead_letters_total{reason="invalid_event"}', "values": "0+600x30"},
            {"series": 'fission_dead_letters_total{reason="self_referral"}', "values": "0+60x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "DeadLetterRate", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "DeadLetterRate", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ops", "reason": "invalid_event"},
                 "exp_annotations": {"summary": "10% of events are dead-lettered with reason invalid_event"}}]},
        ],
    },
    {  # no traffic at all: no division by zero turning into an alert
        "interval": "1m",
        "input_series": [
            {"series": 'fission_events_total{type="scan", outcome="bound", reason=""}', "values": "0x30"},
            {"series": 'fission_dead_letters_total{reason="invalid_event"}', "values": "0x30"},
        ],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "DeadLetterRate", "exp_alerts": []}],
    },
    {  # partition 0 falls behind, 1 is behind but catching up, 2 is stuck
        "interval": "1m",
        "input_series": [
            {"series": 'fission_consumer_lag{partition="0", instance="w1:9100"}', "values": "0+1000x40"},
            {"series": 'fission_consumer_lag{partition="1", instance="w1:9100"}', "values": "50000-1000x40"},
            {"series": 'fission_consumer_lag{partition="2", instance="w2:9100"}', "values": "20000x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "ConsumerLag", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "ConsumerLag", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ops", "partition": "0"},
                 "exp_annotations": {"summary": "Input partition 0 is 20000 messages behind and not catching up"}},
                {"exp_labels": {"severity": "warning", "team": "ops", "partition": "2"},
                 "exp_annotations": {"summary": "Input partition 2 is 20000 messages behind and not catching up"}},
            ]},
        ],
    },
    {  # every credit between 2.5 s and 5 s after its event: p99 4.975 s
        "interval": "1m",
        "input_series": [
            {"series": 'fission_event_to_credit_seconds_bucket{le="1"}', "values": "0x30"},
            {"series": 'fission_event_to_credit_seconds_bucket{le="2.5"}', "values": "0x30"},
            {"series": 'fission_event_to_credit_seconds_bucket{le="5"}', "values": "0+60x30"},
            {"series": 'fission_event_to_credit_seconds_bucket{le="+Inf"}', "values": "0+60x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "EventToCreditLatencyP99", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "EventToCreditLatencyP99", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "team": "ops"},
                 "exp_annotations": {"summary": "p99 event-to-credit latency is 4.975s"}}]},
        ],
    },
    {  # every credit within a second: no alert
        "interval": "1m",
        "input_series": [
            {"series": 'fission_event_to_credit_seconds_bucket{le="1"}', "values": "0+60x30"},
            {"series": 'fission_event_to_credit_seconds_bucket{le="2.5"}', "values": "0+60x30"},
            {"series": 'fission_event_to_credit_seconds_bucket{le="+Inf"}', "values": "0+60x30"},
        ],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "EventToCreditLatencyP99", "exp_alerts": []}],
    },
]


def test_rules_unit(tmp_path: Path) -> None:
    doc = load_yaml(RULES)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    rules = tmp_path / "fission.yml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = tmp_path / "fission.test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": RULE_TESTS},
                                    sort_keys=False))
    tested = {t["alertname"] for case in RULE_TESTS for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for g in doc["groups"] for r in g["rules"]}
    proc = run(tool("promtool"), "test", "rules", tests.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the scripts/services Prometheus ------------------------------------------------------------------------

SERVICES_HINT = 'start it with: eval "$(scripts/services up)"   (state and logs: scripts/services status)'


@dataclass(frozen=True)
class Monitoring:
    prometheus: str  # base URL
    sd_dir: Path  # file_sd directory: targets/*.json, alertmanagers/*.json

    def query(self, expr: str) -> tuple[int, Any]:
        return http_json(f"{self.prometheus}/api/v1/query", {"query": expr})

    def value(self, expr: str) -> float | None:
        """The single value `expr` has now, None when it has no series."""
        status, body = self.query(expr)
        assert status == 200, body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="session")
def monitoring() -> Monitoring:
    """The Prometheus of `scripts/services` (started here when FISSION_PROMETHEUS_* are not set), with the
    rules of this checkout reloaded so that it evaluates what the files say now."""
    names = ("FISSION_PROMETHEUS_URL", "FISSION_PROMETHEUS_SD_DIR")
    if any(not os.environ.get(name) for name in names):
        from tests.servers import run_services_up

        for name, value in run_services_up().items():
            if not os.environ.get(name):
                os.environ[name] = value
    found = Monitoring(os.environ["FISSION_PROMETHEUS_URL"].rstrip("/"), Path(os.environ["FISSION_PROMETHEUS_SD_DIR"]))
    wait_until(lambda: http_json(f"{found.prometheus}/-/ready")[0] == 200 or None, 15,
               f"Prometheus at {found.prometheus} answering /-/ready; {SERVICES_HINT}")
    status, body = http_json(f"{found.prometheus}/api/v1/status/config")
    assert status == 200, body
    status, rules = http_json(f"{found.prometheus}/api/v1/rules")
    loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]} if status == 200 else set()
    ours = {r.get("alert") or r.get("record") for p in RULES_DIR.glob("*.yml") for g in load_yaml(p)["groups"]
            for r in g["rules"]}
    if loaded != ours:
        pytest.fail(f"Prometheus at {found.prometheus} serves the rules {sorted(loaded)}, not this checkout's "
                    f"{sorted(ours)}: run scripts/services up (it syncs and reloads them)", pytrace=False)
    status, body = http_json(f"{found.prometheus}/-/reload", {})
    assert status == 200, f"POST /-/reload: {status} {body}"
    return found


def loaded_rules(monitoring: Monitoring) -> dict[str, dict]:
    status, body = http_json(f"{monitoring.prometheus}/api/v1/rules?type=alert")
    assert status == 200, body
    mine = RULES.name  # scripts/services serves a copy of this checkout's rules from its state dir
    return {r["name"]: r for g in body["data"]["groups"] if Path(g["file"]).name == mine for r in g["rules"]}


@pytest.mark.servers
def test_services_prometheus_evaluates_the_rules(monitoring: Monitoring) -> None:
    expected = {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"]}

    def all_ok() -> bool:
        rules = loaded_rules(monitoring)
        return set(rules) == expected and all(r["health"] == "ok" for r in rules.values())

    wait_until(all_ok, 15, "every rule of fission.yml loaded and evaluated without error",
               lambda: json.dumps(loaded_rules(monitoring), indent=1)[:4000])


# -- Grafana's Prometheus queries --------------------------------------------------------------------------

# Grafana's built-in interval variables, as the test_grafana checks expand them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__interval_ms": "60000", "__range": "1h",
                    "__range_s": "3600", "__range_ms": "3600000"}
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def panels(container: dict) -> Iterator[dict]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)  # rows nest their panels


def expand_grafana(expr: str, variables: dict[str, Any]) -> str:
    """Template variables replaced by their current values (All: `.*`); unknown names are left alone, so
    Prometheus reports them."""

    def replace(match: re.Match) -> str:
        name = match[1] or match[2] or match[3]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name not in variables:
            return match[0]
        value = variables[name]
        if isinstance(value, list):
            value = "|".join(map(str, value))
        return ".*" if value in ("$__all", "All") else str(value)

    return VARIABLE.sub(replace, expr)


def dashboard_promql() -> list[tuple[str, str]]:
    """(dashboard uid/panel title#refId, expanded expression) of every Prometheus target."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        doc = json.loads(path.read_text())
        templating = doc.get("templating", {}).get("list", [])
        variables = {v["name"]: (v.get("current") or {}).get("value") for v in templating}
        for panel in panels(doc):
            for target in panel.get("targets", []):
                source = target.get("datasource") or panel.get("datasource")
                if isinstance(source, dict) and source.get("type") == "prometheus" and target.get("expr"):
                    key = f"{doc.get('uid', path.stem)}/{panel.get('title')}#{target.get('refId')}"
                    found.append((key, expand_grafana(target["expr"], variables)))
    return found


@pytest.mark.servers
def test_dashboard_promql_runs_on_prometheus(monitoring: Monitoring) -> None:
    if not list(DASHBOARDS.glob("*.json")):
        pytest.skip("no Grafana dashboards yet")
    queries = dashboard_promql()
    if not queries:
        pytest.skip("the dashboards have no Prometheus queries")
    failures = []
    for key, expr in queries:
        status, body = monitoring.query(expr)
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            failures.append(f"{key}: HTTP {status}: {body.get('error') if isinstance(body, dict) else body}\n  {expr}")
    assert not failures, "\n".join(failures)


# -- end to end: a stalled cascade through Prometheus and Alertmanager to a webhook --------------------------


def alertmanager_test_config(webhook_url: str) -> dict:
    """prometheus/alertmanager.yml with every webhook sent to `webhook_url` (same paths) and 1 s groups."""
    config = copy.deepcopy(load_yaml(ALERTMANAGER_CONFIG))

    def shorten(route: dict) -> None:
        route.update(group_wait="1s", group_interval="1s")
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url + urllib.parse.urlsplit(hook["url"]).path
    return config


class Process:
    """A background process in its own session, output to a log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


def cascade_rows(campaign: str) -> list[dict]:
    """Cascade a0: the seed and 11 binds (a binary tree), bind i at minute i, then nothing. Cascade b0: a
    bind every minute up to minute 40, which moves the campaign's event-time clock to minute 39 (lateness 1).
    a0 has 12 members and a median gap of 1 minute, so it is stalled once the clock passes
    11 + max(10, 5 x 1) = minute 21."""
    a = [shared("a0", "a0", 0, 0, campaign)] + [
        bound(f"a{i}", f"a{(i - 1) // 2}", "a0", (i + 1).bit_length() - 1, i, campaign) for i in range(1, 12)]
    b = [shared("b0", "b0", 0, 0, campaign)] + [bound(f"b{i}", "b0", "b0", 1, i, campaign) for i in range(1, 41)]
    return a + b


def growth_rows(campaign: str) -> list[dict]:
    """a0 grows again at minute 45 (a12 under a5), and b0 keeps the clock going: the episode resolves."""
    return [bound("a12", "a5", "a0", 3, 45, campaign)] + [bound(f"b{i}", "b0", "b0", 1, i, campaign)
                                                          for i in range(41, 46)]


def produce(bootstrap: str, topic: str, rows: list[dict]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for row in rows:
        producer.produce(topic, orjson.dumps(row), row["user_id"].encode())
    assert producer.flush(30) == 0


def test_stalled_cascade_fires_and_resolves_through_alertmanager(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], unique_prefix: str, monitoring: Monitoring,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    prefix = campaign = unique_prefix  # topics and groups named after it are deleted by kafka_topic_factory
    topics = Topics.with_prefix(prefix)
    ensure_topics(kafka_bootstrap, topics, 1, 1)
    produce(kafka_bootstrap, topics.outcomes, cascade_rows(campaign))
    assert Settings(topic_prefix=prefix).topics() == topics  # the agent reads what was just produced

    am_bin = tool("prometheus-alertmanager", "alertmanager")
    target_file = monitoring.sd_dir / "targets" / f"{prefix}.json"
    alertmanager_file = monitoring.sd_dir / "alertmanagers" / f"{prefix}.json"
    agent: Process | None = None
    alertmanager: Process | None = None
    hook = WebhookReceiver().start()
    try:
        # Alertmanager with the repository's routing, every receiver posting to the hook, registered with
        # Prometheus beside the services one (which notifies nobody the test can see).
        am_port = free_port()
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(yaml.safe_dump(alertmanager_test_config(hook.url), sort_keys=False))
        alertmanager = Process([am_bin, f"--config.file={am_config}", f"--storage.path={tmp_path / 'am-data'}",
                                f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
                                "--data.retention=1h"], tmp_path / "alertmanager.log", tmp_path)
        am_url = f"http://127.0.0.1:{am_port}"
        wait_until(lambda: http_json(f"{am_url}/-/ready")[0] == 200, 20, "test Alertmanager ready",
                   alertmanager.tail)
        write_atomically(alertmanager_file, [{"targets": [f"127.0.0.1:{am_port}"]}])

        def registered() -> bool:
            active = http_json(f"{monitoring.prometheus}/api/v1/alertmanagers")[1]["data"]["activeAlertmanagers"]
            return f"{am_url}/api/v2/alerts" in {a["url"] for a in active}

        wait_until(registered, 20, "Prometheus sending to the test Alertmanager (file_sd)")

        # The agent, then its metrics endpoint as a scrape target once it answers.
        metrics_port = free_port()
        agent = Process([sys.executable, "-c", LAUNCHER, kafka_bootstrap, prefix, str(metrics_port)],
                        tmp_path / "cascades.log", tmp_path, {**os.environ, "PYTHONPATH": str(REPO)})
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def answering() -> bool:
            assert agent is not None
            if not agent.alive():
                pytest.fail(f"the cascade agent exited ({agent.popen.returncode}):\n{agent.tail()}", pytrace=False)
            with urllib.request.urlopen(metrics_url, timeout=2) as response:
                return response.status == 200

        wait_until(answering, 30, "the cascade agent's /metrics")
        write_atomically(target_file, [{"targets": [f"127.0.0.1:{metrics_port}"],
                                        "labels": {"job": "fission-cascades", "test": prefix}}])

        def ours(state: str) -> Callable[[dict], bool]:
            return lambda a: (a["labels"].get("alertname") == "StalledCascade"
                              and a["labels"].get("campaign") == campaign and a["status"] == state)

        def diagnose() -> str:
            _, targets = http_json(f"{monitoring.prometheus}/api/v1/targets?state=active")
            target = [t for t in targets["data"]["activeTargets"] if t["labels"].get("test") == prefix]
            _, alerts = http_json(f"{monitoring.prometheus}/api/v1/alerts")
            pending = [a for a in alerts["data"]["alerts"] if a["labels"].get("campaign") == campaign]
            gauge = monitoring.value(f'fission_stalled_cascades{{campaign="{campaign}"}}')
            return (f"scrape target: {target}\nPrometheus alerts: {pending}\ngauge: {gauge}\n"
                    f"webhook: {hook.alerts()}\n--- agent log\n{agent.tail() if agent else ''}\n"
                    f"--- alertmanager log\n{alertmanager.tail() if alertmanager else ''}")

        firing = hook.wait_for(ours("firing"), FIRING_TIMEOUT_S)
        assert firing is not None, f"no firing StalledCascade at the webhook\n{diagnose()}"
        fired_after = time.monotonic() - started
        assert firing["receiver"] == "fission-growth" and firing["path"] == "/alerts/growth", firing
        assert firing["labels"]["severity"] == "warning" and firing["labels"]["team"] == "growth", firing
        assert firing["annotations"]["summary"] == f"Campaign {campaign}: 1 cascade(s) stalled", firing
        assert campaign in firing["annotations"]["description"], firing
        assert monitoring.value(f'sum(fission_stalled_cascades{{campaign="{campaign}"}})') == 1

        produce(kafka_bootstrap, topics.outcomes, growth_rows(campaign))
        resolved = hook.wait_for(ours("resolved"), RESOLVED_TIMEOUT_S)
        assert resolved is not None, f"no resolved StalledCascade at the webhook\n{diagnose()}"
        assert resolved["receiver"] == "fission-growth", resolved
        assert resolved["startsAt"] == firing["startsAt"], (firing, resolved)  # the same episode
        assert len([a for a in hook.alerts() if ours("firing")(a)]) == 1, hook.alerts()  # notified once
        assert monitoring.value(f'sum(fission_stalled_cascades{{campaign="{campaign}"}})') == 0
        print(f"StalledCascade firing after {fired_after:.1f}s, resolved after {time.monotonic() - started:.1f}s")
    finally:
        for path in (target_file, alertmanager_file):
            path.unlink(missing_ok=True)
        for process in (agent, alertmanager):
            if process is not None:
                process.stop()
        hook.stop()
