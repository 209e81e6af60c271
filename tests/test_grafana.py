"""Grafana provisioning: dashboards, data sources and alert rules are well formed, and every query in them works.

Grafana cannot run here, so what it would do is done by hand:
- every dashboard JSON is checked structurally (uids, panel ids, grid positions, data source uids that the
  provisioning defines, the campaign and seed variables, the node-graph panel) and must equal the output
  of grafana/build_dashboards.py;
- every ClickHouse query (panels, template variables, alert rules) has its Grafana macros and variables
  expanded the way Grafana and the ClickHouse plugin do, and is run on the real ClickHouse 18.16 server and
  on chDB (a current ClickHouse), over realistic data: a simulated campaign run through the engine, written
  by the ClickHouse sink, plus the alerts and cascade snapshots the cascade analytics derive from it. Each
  query must return the columns its panel needs (EXPECTED_COLUMNS), rows where the data has some, and the
  same rows on both engines;
- every PromQL expression must parse (promtool), and every fission metric it names must be one the
  processes export; the Prometheus config and rule files pass promtool, with unit tests of the rules.

chDB allows one data path per process, and other tests open chDB too, so the chDB side runs in a
subprocess: this module run as ``python -m tests.test_grafana chdb PATH`` loads the same data into PATH,
runs the queries it reads as JSON on stdin and prints the results as JSON.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
PROVISIONING = GRAFANA / "provisioning"
PROMETHEUS = REPO / "prometheus"
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
ALL = "$__all"  # Grafana's value of an "All" selection
CHDB_TIMEOUT_S = 300
# Grafana's core panel plugin ids that the dashboards may use.
PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "barchart", "piechart", "nodeGraph", "text", "row"}

# What each ClickHouse query must return, by dashboard uid and panel title ("title#refId" for panels with
# several queries; "$var" for a template variable). Columns in this order, exactly.
EXPECTED_COLUMNS: dict[str, dict[str, list[str]]] = {
    "fission-campaign": {
        "Binds · sharers · K-factor": ["binds", "sharers", "k_factor"],
        "Attributed revenue · rewards · return": ["revenue_attributed", "rewards_net", "return_on_rewards"],
        "Budget used": ["budget_used"],
        "Credits cut by the budget": ["cut_amount"],
        "Events per second by type": ["time", "event_type", "events_per_s"],
        "Shares, binds and attributed purchases": ["time", "shares", "binds", "attributed_purchases"],
        "K-factor over the last ${kwindow:text}": ["time", "k_factor"],
        "Rewards vs budget (cumulative)": ["time", "rewards_net", "budget"],
        "Attributed revenue vs rewards (${seed})": ["time", "revenue_attributed", "rewards_net"],
        "Return on rewards, cumulative (${seed})": ["time", "return_on_rewards"],
        "Rewards by kind": ["time", "kind", "rewards"],
        "Outcomes in range": ["event_type", "outcome", "reason", "events_count", "actors", "amount_total"],
    },
    "fission-cascades": {
        "Cascades": ["cascades", "largest", "deepest", "mean_size"],
        "Depth distribution (${seed})": ["generation", "nodes_at_depth"],
        "Generation ratios R_d (${seed})": ["generation", "ratio"],
        "Seed leaderboard": ["seed", "size", "max_depth", "binds_in_range", "attributed_purchases",
                             "revenue_attributed", "rewards_net", "return_on_rewards", "last_activity"],
        "Cascade tree (${seed}; the largest cascade when All)#nodes": [
            "id", "title", "subTitle", "mainStat", "secondaryStat", "arc__seed", "arc__bound"],
        "Cascade tree (${seed}; the largest cascade when All)#edges": ["id", "source", "target"],
        "Stalled cascades (firing now)": ["seed", "kind", "firing_since", "detail"],
        "Cascade alerts": ["time", "transition", "transitions"],
        "Binds by generation": ["time", "generation", "binds"],
        "Cascade snapshots: structural virality": ["seed", "cascade_size", "deepest", "structural_virality",
                                                   "revenue_attributed", "rewards_paid", "fraud_rate", "last_bind"],
        "Structural virality over time (${seed}; the largest when All)": [
            "time", "structural_virality", "cascade_size"],
    },
    "fission-operations": {
        "Event → aggregate visible (ClickHouse)": ["time", "p50", "p99"],
        "ClickHouse tables": ["table", "table_rows", "disk_bytes", "active_parts", "last_change"],
    },
    "fission-fraud": {
        "Fraud in range": ["fraud_rejections", "scans", "fraud_share_of_scans"],
        "Fraud by reason": ["self_referrals", "device_limit", "offenders"],
        "Rejections by reason": ["time", "reason", "rejections"],
        "Rejections by reason (range)": ["reason", "rejections"],
        "Device-limit rejections": ["time", "device_limit_rejections", "accounts"],
        "Self-referrals": ["sharer", "seed", "attempts", "first_seen", "last_seen"],
        "Top offenders": ["offender", "self_referrals", "device_limit", "total", "last_seen", "seed"],
        "Fraud by cascade": ["seed", "fraud_rejections", "offenders", "self_referrals"],
    },
    "alerting": {
        "fission-stalled-cascade": ["campaign", "root", "stalled"],
        "fission-k-below-one": ["campaign", "below_one"],
        "fission-budget-exhausted": ["campaign", "cut_amount"],
        "fission-budget-nearly-spent": ["campaign", "budget_used"],
        "fission-fraud-share": ["campaign", "fraud_share"],
    },
}
for _uid in ("fission-campaign", "fission-cascades", "fission-operations", "fission-fraud"):
    EXPECTED_COLUMNS[_uid].update({"$campaign": ["campaign"], "$seed": ["root"]})

# Queries that may legitimately return no rows on the test data, and why.
MAY_BE_EMPTY: dict[str, str] = {
    # the K < 1 episode of the simulated campaign has resolved by the end of the data
    "alerting/fission-k-below-one": "no campaign is below K = 1 at the end of the simulated data",
}
# Queries whose values depend on the engine or the moment the data was loaded, not on the data.
ENGINE_DEPENDENT = {
    "fission-operations/ClickHouse tables",  # parts, sizes and merge times of each engine
    "fission-operations/Event → aggregate visible (ClickHouse)",  # inserted_at = when this test loaded it
}
# Metrics of processes other than the attribution worker and the sink (the cascade agent): present only
# once that process's module exists.
OPTIONAL_METRIC_MODULES = {"fission_k_factor": "stream.cascades", "fission_stalled_cascades": "stream.cascades",
                           "fission_cascade_alerts_total": "stream.cascades"}


# -- reading the provisioning -----------------------------------------------------------------------------


def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def all_panels(doc: dict) -> Iterator[dict]:
    for found in doc.get("panels", []):
        yield found
        yield from found.get("panels", [])  # panels inside a collapsed row


def provisioned_datasources() -> dict[str, dict]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((PROVISIONING / "datasources").glob("*.y*ml"))]
    return {ds["uid"]: ds for doc in docs for ds in doc.get("datasources", [])}


def alert_rules() -> list[dict]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((PROVISIONING / "alerting").glob("*.y*ml"))]
    return [rule for doc in docs for group in doc.get("groups", []) for rule in group["rules"]]


def is_clickhouse(datasource: Any) -> bool:
    return isinstance(datasource, dict) and datasource.get("type") == CLICKHOUSE_TYPE


@dataclass(frozen=True)
class Query:
    """One ClickHouse query of the provisioning, with what is needed to expand it."""

    key: str  # "<dashboard uid>/<panel title>[#refId]", "<uid>/$<variable>" or "alerting/<rule uid>"
    raw: str
    variables: tuple  # the dashboard's template variables (as JSON strings, to stay hashable)
    range_s: int | None = None  # an alert rule's relativeTimeRange.from: its time range ends at the data's end

    @property
    def expected(self) -> list[str]:
        group, _, name = self.key.partition("/")
        return EXPECTED_COLUMNS[group][name]


def clickhouse_queries() -> list[Query]:
    found = []
    for doc in load_dashboards().values():
        uid = doc["uid"]
        variables = tuple(json.dumps(v) for v in doc["templating"]["list"])
        for var in doc["templating"]["list"]:
            if var.get("type") == "query" and is_clickhouse(var.get("datasource")):
                raw = var["query"] if isinstance(var["query"], str) else var["query"]["rawSql"]
                found.append(Query(f"{uid}/${var['name']}", raw, variables))
        for p in all_panels(doc):
            targets = [t for t in p.get("targets", []) if is_clickhouse(t.get("datasource", p.get("datasource")))]
            for target in targets:
                name = p["title"] if len(p.get("targets", [])) == 1 else f"{p['title']}#{target['refId']}"
                found.append(Query(f"{uid}/{name}", target["rawSql"], variables))
    for rule in alert_rules():
        for step in rule["data"]:
            if step["datasourceUid"] != "__expr__" and is_clickhouse(step["model"].get("datasource")):
                found.append(Query(f"alerting/{rule['uid']}", step["model"]["rawSql"], (),
                                   step["relativeTimeRange"]["from"]))
    return found


def prometheus_expressions() -> list[tuple[str, str, tuple]]:
    found = []
    for doc in load_dashboards().values():
        variables = tuple(json.dumps(v) for v in doc["templating"]["list"])
        for p in all_panels(doc):
            for target in p.get("targets", []):
                if target.get("datasource", {}).get("type") == "prometheus":
                    found.append((f"{doc['uid']}/{p['title']}#{target['refId']}", target["expr"], variables))
    return found


# -- Grafana's macro and variable expansion ----------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    start: int  # epoch seconds
    end: int
    interval_s: int


VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


def percent_encode(value: str) -> str:
    """Grafana's `percentencode` format: encodeURIComponent, with !'()* encoded too."""
    return urllib.parse.quote(value, safe="-_.~")


def expand_variables(text: str, variables: tuple, values: dict[str, str]) -> str:
    """Replace ${name}, ${name:format} and $name as Grafana does for the formats the provisioning uses."""
    defs = {v["name"]: v for v in map(json.loads, variables)}

    def replace(match: re.Match) -> str:
        name, fmt = match[1] or match[3], match[2]
        if name not in defs:
            if name.startswith("__"):
                return match[0]  # a macro, expanded elsewhere
            raise AssertionError(f"unknown variable ${name} in {text!r}")
        var = defs[name]
        value = values.get(name, var.get("current", {}).get("value"))
        if value == ALL:
            if not var.get("allValue"):
                raise AssertionError(f"${name}: All without an allValue is not expected here")
            if fmt != "percentencode":  # Grafana inserts a custom All value verbatim, except for these formats
                return var["allValue"] if fmt != "text" else "All"
            value = var["allValue"]
        if fmt == "text":
            options = {o["value"]: o["text"] for o in var.get("options", [])}
            return options.get(value, value)
        if fmt == "percentencode":
            return percent_encode(value)
        if fmt is None:
            return value
        raise AssertionError(f"variable format {fmt!r} of ${name} is not handled by this test")

    return VARIABLE.sub(replace, text)


def expand_sql(raw: str, time_range: TimeRange, variables: tuple = (), values: dict | None = None) -> str:
    """The ClickHouse plugin's macros (as documented for v4), then the dashboard variables."""
    start, end = time_range.start, time_range.end
    text = re.sub(r"\$__timeFilter\(\s*([^()]+?)\s*\)",
                  lambda m: f"{m[1]} >= toDateTime({start}) AND {m[1]} <= toDateTime({end})", raw)
    text = re.sub(r"\$__fromTime\b", f"toDateTime({start})", text)
    text = re.sub(r"\$__toTime\b", f"toDateTime({end})", text)
    text = re.sub(r"\$__interval_s\b", str(time_range.interval_s), text)
    leftover = re.findall(r"\$__\w+", text)
    assert not leftover, f"macros this test does not expand (add them): {leftover}"
    return expand_variables(text, variables, values or {})


def expand_promql(expr: str, variables: tuple, values: dict | None = None) -> str:
    text = re.sub(r"\$__rate_interval\b|\$__interval\b", "1m", expr)
    text = re.sub(r"\$__range\b", "1h", text)
    return expand_variables(text, variables, values or {})


# -- realistic data ---------------------------------------------------------------------------------------

# 5,000 simulated events of one campaign; a budget small enough to run out, so budget cuts appear.
SIM_EVENTS = 5000
SIM_BUDGET = 1_000_000
CHECK_EVERY = 100  # cascade checks (the agent's timer) every this many output rows


@functools.cache
def simulated() -> dict[str, Any]:
    """Engine outputs of a simulated campaign, plus the cascade alerts and snapshots derived from them."""
    from attribution.campaigns import parse_campaigns
    from attribution.engine import Engine, Message
    from attribution.store import EmbeddedStore
    from stream.simulate import SimulationParams, campaign_config, simulate

    params = SimulationParams(max_events=SIM_EVENTS, budget=SIM_BUDGET)
    engine = Engine(parse_campaigns(campaign_config(params)), EmbeddedStore())
    messages = [Message(raw, offset) for offset, raw in enumerate(simulate(params))]
    results = [engine.process(0, messages[i:i + 500]) for i in range(0, len(messages), 500)]
    results.append(engine.drain(0))
    outcomes = [o.to_dict() for r in results for o in r.outcomes]
    entries = [e.to_dict() for r in results for e in r.entries]
    nodes = [n.to_dict() for r in results for n in r.nodes]
    alerts, snapshots = cascade_analytics(outcomes, entries)
    return {"campaign": params.campaign, "outcomes": outcomes, "entries": entries, "nodes": nodes,
            "alerts": alerts, "snapshots": snapshots}


def cascade_analytics(outcomes: list[dict], entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """Alerts and snapshot rows as the cascade agent derives them: the outputs in stream order, a check on
    every CHECK_EVERY rows at each campaign's event-time watermark, snapshots of the cascades that changed.
    Nothing while attribution.cascades does not exist (the panels reading them are then skipped)."""
    try:
        from attribution.cascades import CascadeMonitor
    except ImportError:
        return [], []

    monitor = CascadeMonitor()
    alerts: list[dict] = []
    snapshots: list[dict] = []
    stream = [(True, row) for row in outcomes] + [(False, row) for row in entries]
    stream.sort(key=lambda item: item[1].get("ts") or 0)  # the agent sees both topics interleaved by time
    for number, (is_outcome, row) in enumerate(stream, start=1):
        (monitor.apply_outcome if is_outcome else monitor.apply_entry)(row)
        if number % CHECK_EVERY == 0 or number == len(stream):
            watermark = dict(monitor.watermark)
            alerts.extend(a.to_dict() for a in monitor.check(watermark))
            for summary in monitor.take_changed():
                snapshot = {f: getattr(summary, f) for f in summary.__dataclass_fields__}
                snapshot["snapshot_ts"] = watermark[summary.campaign]
                snapshot["written_at"] = len(snapshots)  # processing order, as the agent's clock would give
                snapshots.append(snapshot)
    return alerts, snapshots


def load_data(backend: Any, database: str) -> dict[str, bool]:
    """Migrate `database` and fill it as the sink and the cascade agent would; says what could be loaded."""
    from sinks.clickhouse import ClickHouseSink, migrate

    data = simulated()
    migrate(backend, database)
    sink = ClickHouseSink(backend, database)
    sink.add(outcomes=data["outcomes"], entries=data["entries"], nodes=data["nodes"])
    assert sink.flush(), sink.last_error
    columns = table_columns(backend, database, "alerts")
    rows = [{**a, "detail": json.dumps(a["detail"], sort_keys=True)} for a in data["alerts"]]
    insert_rows(backend, f"{database}.alerts", columns, rows)
    snapshot_columns = table_columns(backend, database, "cascade_snapshots")
    if snapshot_columns:
        insert_rows(backend, f"{database}.cascade_snapshots", snapshot_columns, data["snapshots"])
    return {"snapshots_table": bool(snapshot_columns), "cascade_analytics": bool(data["alerts"])}


def table_columns(backend: Any, database: str, table: str) -> dict[str, str]:
    """Name -> type of a table's columns that an INSERT may set (not MATERIALIZED or ALIAS); {} if no table."""
    rows = backend.query(
        f"SELECT name, type, default_kind FROM system.columns WHERE database = '{database}' AND table = '{table}'"
    )
    return {name: kind for name, kind, default in rows if default not in ("MATERIALIZED", "ALIAS")}


def insert_rows(backend: Any, table: str, columns: dict[str, str], rows: list[dict]) -> None:
    """Insert the fields of `rows` that the table has; epoch-ms fields go into DateTime columns as seconds."""
    names = [name for name in columns if rows and name in rows[0]]
    if not rows or not names:
        return
    values: dict[str, list] = {name: [] for name in names}
    for row in rows:
        for name in names:
            value = row[name]
            if columns[name].startswith("DateTime"):
                value = (value or 0) // 1000
            elif value is None:
                value = 0 if not columns[name].startswith("String") else ""
            values[name].append(value)
    backend.insert(table, values)


def data_range() -> TimeRange:
    """The time range a user would pick to see the simulated campaign: its first to its last event."""
    stamps = [o["ts"] for o in simulated()["outcomes"] if o.get("ts")]
    return TimeRange(min(stamps) // 1000, max(stamps) // 1000 + 60, 900)


def largest_cascade_with_fraud() -> str:
    """The seed whose cascade is the largest among those with a self-referral (so seed panels have data)."""
    data = simulated()
    sizes: dict[str, int] = {}
    for node in data["nodes"]:
        if node["root"]:
            sizes[node["root"]] = sizes.get(node["root"], 0) + 1
    with_fraud = {o["root"] for o in data["outcomes"] if o.get("reason") == "self_referral" and o.get("root")}
    return max(with_fraud, key=lambda root: (sizes.get(root, 0), root))


VARIANTS = ("all", "seed", "quoted")
# Ids may hold any character (SPEC 1): these must stay literals (no error, no injection) and match nothing.
ODD_CAMPAIGN = "x' OR 1 = 1 OR campaign != '\\"
ODD_SEED = "o'brien\\"


def variants() -> dict[str, dict[str, str]]:
    """Variable selections every query runs with: seed All, one seed, and ids with quotes and backslashes."""
    base = {"campaign": simulated()["campaign"], "budget": str(SIM_BUDGET)}
    return {"all": {**base, "seed": ALL}, "seed": {**base, "seed": largest_cascade_with_fraud()},
            "quoted": {**base, "campaign": ODD_CAMPAIGN, "seed": ODD_SEED}}


def expanded_queries() -> dict[str, str]:
    """Every query in every variant, expanded: "<variant>|<query key>" -> SQL."""
    full = data_range()
    found = {}
    for name, values in variants().items():
        for query in clickhouse_queries():
            time_range = full if query.range_s is None else TimeRange(full.end - query.range_s, full.end, 60)
            found[f"{name}|{query.key}"] = expand_sql(query.raw, time_range, query.variables, values)
    return found


# -- running the queries ----------------------------------------------------------------------------------


def normalize(value: Any) -> Any:
    """Comparable values across engines: DateTime as text, floats rounded to 9 significant digits."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    return value


def run_all_chdb(path: Path) -> dict[str, dict]:
    """The chDB side (called in a subprocess): load the data into chDB at `path`, run every query."""
    from sinks.clickhouse import ChdbBackend

    backend = ChdbBackend(path)
    try:
        results: dict[str, dict] = {META: load_data(backend, "fission")}
        backend.execute("USE fission")
        backend.execute("SET session_timezone = 'UTC'")
        for key, text in json.loads(sys.stdin.read()).items():
            try:
                raw = backend.session.query(text, "JSONCompact").bytes()
                doc = json.loads(raw) if raw else {"meta": [], "data": []}
                results[key] = {"columns": [[m["name"], m["type"]] for m in doc["meta"]],
                                "rows": normalize(doc["data"])}
            except Exception as exc:  # reported per query by the test
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        return results
    finally:
        backend.close()


@pytest.fixture(scope="module")
def chdb_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    path = tmp_path_factory.mktemp("grafana-chdb") / "chdb"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_grafana", "chdb", str(path)], cwd=REPO,
        input=json.dumps(expanded_queries()), capture_output=True, text=True, timeout=CHDB_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, f"chDB run failed:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def server_results(clickhouse_url: str) -> Iterator[dict[str, dict]]:
    """Load the data into a fresh database on the ClickHouse 18.16 server and run every query there."""
    from clickhouse_driver import Client

    from sinks.clickhouse import ServerBackend

    database = f"grafana{uuid.uuid4().hex[:8]}"
    backend = ServerBackend(clickhouse_url)
    # connects on its first query, after load_data created the database it names
    client = Client.from_url(urlunsplit(urlsplit(clickhouse_url)._replace(path=f"/{database}")))
    try:
        results: dict[str, dict] = {META: load_data(backend, database)}
        for key, text in expanded_queries().items():
            try:
                rows, columns = client.execute(text, with_column_types=True)
                results[key] = {"columns": [list(c) for c in columns], "rows": normalize([list(r) for r in rows])}
            except Exception as exc:  # reported per query by the test
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        yield results
    finally:
        client.disconnect()
        backend.execute(f"DROP DATABASE IF EXISTS {database}")
        backend.close()


def result_keys() -> list[str]:
    """Known without running anything, so collecting the tests stays cheap."""
    return sorted(f"{variant}|{query.key}" for variant in VARIANTS for query in clickhouse_queries())


META = "__loaded__"


def skip_unless_loaded(query: Query, loaded: dict[str, bool]) -> None:
    """Skip (saying why) a query of data that another part of the project does not produce yet."""
    if "cascade_snapshots" in query.raw and not loaded["snapshots_table"]:
        pytest.skip("table cascade_snapshots is absent: sinks/sql/003_cascades.sql is not there yet")
    if re.search(r"\bFROM alerts\b", query.raw) and not loaded["cascade_analytics"]:
        pytest.skip("attribution.cascades is absent: no stall or K alerts to put in the alerts table")


def check_result(key: str, results: dict[str, dict], engine: str) -> None:
    variant, _, query_key = key.partition("|")
    query = next(q for q in clickhouse_queries() if q.key == query_key)
    skip_unless_loaded(query, results[META])
    result = results[key]
    assert "error" not in result, f"{engine}: {query_key} ({variant}) failed: {result.get('error', '')[:3000]}"
    names = [name for name, _ in result["columns"]]
    assert names == query.expected, f"{engine}: {query_key} returns {names}, the panel expects {query.expected}"
    types = dict(result["columns"])
    if "time" in types:  # a time series: Grafana needs a DateTime first column named time
        assert names[0] == "time" and types["time"].startswith("DateTime"), f"{query_key}: time column {types}"
        assert all(not t.startswith("DateTime") for n, t in types.items() if n != "time"), types
    if variant == "quoted":  # a campaign and a seed that do not exist: nothing, or one row of zeros
        if "{campaign" in query.raw:
            assert all(not v or v == "1970-01-01 00:00:00" for row in result["rows"] for v in row), (
                f"{engine}: {query_key} returns data for a campaign that does not exist: {result['rows'][:3]}")
    elif query_key not in MAY_BE_EMPTY:
        assert result["rows"], f"{engine}: {query_key} ({variant}) returned no rows on the simulated data"


@pytest.mark.parametrize("key", result_keys())
def test_query_runs_on_clickhouse_18(key: str, server_results: dict[str, dict]) -> None:
    check_result(key, server_results, "ClickHouse 18.16")


@pytest.mark.parametrize("key", result_keys())
def test_query_runs_on_chdb(key: str, chdb_results: dict[str, dict]) -> None:
    check_result(key, chdb_results, "chDB")


@pytest.mark.parametrize("key", [k for k in result_keys() if k.partition("|")[2] not in ENGINE_DEPENDENT])
def test_engines_agree(key: str, server_results: dict[str, dict], chdb_results: dict[str, dict]) -> None:
    """Same data, same rows: an expression that means different things on 18.16 and on a current server
    (alias resolution, integer division, type promotion) shows here."""
    server, embedded = server_results[key], chdb_results[key]
    if "error" in server or "error" in embedded:
        pytest.skip("a query error is reported by the per-engine tests")

    def rows(result: dict) -> list:
        return sorted(result["rows"], key=json.dumps)

    assert rows(server) == rows(embedded), f"{key}: ClickHouse 18.16 and chDB disagree"


def test_the_seed_panels_filter(server_results: dict[str, dict]) -> None:
    """Selecting a seed narrows the cascade panels to that cascade."""
    key = "fission-cascades/Depth distribution (${seed})"
    everything = sum(row[1] for row in server_results[f"all|{key}"]["rows"])
    one = sum(row[1] for row in server_results[f"seed|{key}"]["rows"])
    assert 0 < one < everything
    tree = server_results["seed|fission-cascades/Cascade tree (${seed}; the largest cascade when All)#nodes"]
    assert tree["rows"][0][0] == largest_cascade_with_fraud()  # the seed is the first node (depth 0)
    edges = server_results["seed|fission-cascades/Cascade tree (${seed}; the largest cascade when All)#edges"]
    ids = {row[0] for row in tree["rows"]}
    assert all(source in ids and target in ids for _, source, target in edges["rows"])
    assert len(edges["rows"]) == len(tree["rows"]) - 1  # a tree


def test_the_numbers_match_the_engine(server_results: dict[str, dict]) -> None:
    """Spot checks against the engine's own outputs: binds, sharers and K; rewards net of clawbacks."""
    data = simulated()
    binds = sum(o["outcome"] == "bound" for o in data["outcomes"])
    sharers = len({o["user_id"] for o in data["outcomes"] if o["outcome"] == "shared"})
    row = server_results["all|fission-campaign/Binds · sharers · K-factor"]["rows"][0]
    assert row[0] == binds
    assert abs(row[1] - sharers) <= sharers * 0.02  # uniq is approximate
    rewards = sum(e["amount"] for e in data["entries"])
    cumulative = server_results["all|fission-campaign/Rewards vs budget (cumulative)"]["rows"]
    assert cumulative[-1][1] == rewards and cumulative[-1][2] == SIM_BUDGET
    assert sum(o.get("budget_exhausted") != [] for o in data["outcomes"]) > 0  # the budget did run out
    cut = server_results["all|fission-campaign/Credits cut by the budget"]["rows"][0][0]
    assert cut > 0


# -- structure ------------------------------------------------------------------------------------------------


def test_dashboards_are_the_generator_output() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    expected = {name: build_dashboards.render(doc) for name, doc in build_dashboards.dashboards().items()}
    actual = {path.name: path.read_text(encoding="utf-8") for path in DASHBOARD_DIR.glob("*.json")}
    assert actual == expected, "grafana/dashboards is stale: run .venv/bin/python grafana/build_dashboards.py"


def test_four_dashboards_with_distinct_uids_and_titles() -> None:
    docs = load_dashboards()
    uids = [d["uid"] for d in docs.values()]
    assert sorted(uids) == ["fission-campaign", "fission-cascades", "fission-fraud", "fission-operations"]
    assert len({d["title"] for d in docs.values()}) == len(docs)


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_dashboard_structure(name: str) -> None:
    doc = load_dashboards()[name]
    datasources = provisioned_datasources()
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", doc["uid"]) and doc["title"]
    panels = list(all_panels(doc))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), f"duplicate panel titles in {name}"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in PANEL_TYPES, f"{p['title']!r}: {p['type']} is no Grafana core panel id"
        pos = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(pos) and pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for target in p["targets"]:
            ds = target.get("datasource", p.get("datasource"))
            assert ds["uid"] in datasources, f"{p['title']!r}: data source uid {ds['uid']} is not provisioned"
            assert ds["type"] == datasources[ds["uid"]]["type"]
            if is_clickhouse(ds):
                assert target["editorType"] == "sql" and target["rawSql"].strip()
                assert target["format"] in (0, 1)
                assert target["queryType"] == ("timeSeries" if target["format"] == 0 else "table")
            else:
                assert target["expr"].strip()
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
    for var in doc["templating"]["list"]:
        if "datasource" in var:
            assert var["datasource"]["uid"] in datasources


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_campaign_and_seed_variables_on_every_dashboard(name: str) -> None:
    variables = {v["name"]: v for v in load_dashboards()[name]["templating"]["list"]}
    for var_name, column in (("campaign", "campaign"), ("seed", "root")):
        var = variables[var_name]
        assert var["type"] == "query" and is_clickhouse(var["datasource"])
        assert column in var["query"]
    assert variables["seed"]["includeAll"] and variables["seed"]["allValue"] == "__all"
    assert "${campaign:percentencode}" in variables["seed"]["query"]  # seeds of the selected campaign


def test_every_clickhouse_query_has_expected_columns() -> None:
    keys = {q.key for q in clickhouse_queries()}
    declared = {f"{group}/{name}" for group, names in EXPECTED_COLUMNS.items() for name in names}
    assert keys == declared, f"undeclared: {sorted(keys - declared)}; stale: {sorted(declared - keys)}"


def test_node_graph_panel() -> None:
    doc = load_dashboards()["cascades.json"]
    graphs = [p for p in all_panels(doc) if p["type"] == "nodeGraph"]
    assert len(graphs) == 1
    refs = {t["refId"] for t in graphs[0]["targets"]}
    assert refs == {"nodes", "edges"}
    nodes = EXPECTED_COLUMNS["fission-cascades"][f"{graphs[0]['title']}#nodes"]
    edges = EXPECTED_COLUMNS["fission-cascades"][f"{graphs[0]['title']}#edges"]
    assert {"id", "title", "mainStat"} <= set(nodes) and {"id", "source", "target"} <= set(edges)
    arcs = [a["field"] for a in graphs[0]["options"]["nodes"]["arcs"]]
    assert set(arcs) == {c for c in nodes if c.startswith("arc__")}


def test_expected_panels_exist() -> None:
    """The panels the dashboards promise, by a word of their title."""
    titles = {d["uid"]: " | ".join(p["title"] for p in all_panels(d)) for d in load_dashboards().values()}
    wanted = {
        "fission-campaign": ["Events per second", "binds", "K-factor", "budget", "Return on rewards"],
        "fission-cascades": ["Depth distribution", "Generation ratios", "Seed leaderboard", "Structural virality",
                             "Cascade tree", "Stalled cascades"],
        "fission-operations": ["Throughput", "Consumer lag", "latency", "Dead letters", "Waiting events",
                               "ClickHouse sink: buffer"],
        "fission-fraud": ["Rejections by reason", "Device", "Self-referrals", "Top offenders"],
    }
    for uid, words in wanted.items():
        for word in words:
            assert word.lower() in titles[uid].lower(), f"{uid}: no panel about {word!r}"


def test_datasource_provisioning() -> None:
    datasources = provisioned_datasources()
    clickhouse = datasources["fission-clickhouse"]
    assert clickhouse["type"] == CLICKHOUSE_TYPE
    assert clickhouse["jsonData"] == {**clickhouse["jsonData"], "host": "clickhouse", "port": 9000,
                                      "protocol": "native", "defaultDatabase": "fission", "username": "default"}
    assert datasources["fission-prometheus"]["type"] == "prometheus"
    assert datasources["fission-prometheus"]["url"] == "http://prometheus:9090"


def test_dashboard_provider() -> None:
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_alert_rules_structure() -> None:
    datasources = provisioned_datasources()
    rules = alert_rules()
    assert len({r["uid"] for r in rules}) == len(rules)
    for rule in rules:
        refs = {step["refId"] for step in rule["data"]}
        assert rule["condition"] in refs, rule["uid"]
        assert rule["noDataState"] in ("OK", "NoData", "Alerting")
        assert rule["execErrState"] in ("Error", "Alerting", "OK")
        for step in rule["data"]:
            if step["datasourceUid"] == "__expr__":
                model = step["model"]
                assert model["type"] in ("threshold", "reduce", "math", "classic_conditions")
                assert model["expression"] in refs
            else:
                assert step["datasourceUid"] in datasources
                assert step["relativeTimeRange"]["from"] > step["relativeTimeRange"]["to"]
                assert step["model"]["format"] == 1  # table rows: one alert instance per row
        assert rule["annotations"]["summary"]


def test_budget_map_of_the_alert_matches_the_campaigns_file() -> None:
    """ClickHouse holds no budgets, so the 'nearly spent' rule carries them: they must be the config's."""
    config = yaml.safe_load((REPO / "config" / "campaigns.yaml").read_text())
    budgets = {c["id"]: c["limits"]["budget"] for c in config["campaigns"] if c.get("limits", {}).get("budget")}
    rule = next(r for r in alert_rules() if r["uid"] == "fission-budget-nearly-spent")
    match = re.search(r"transform\(campaign, \[(.*?)\], \[(.*?)\], 0\)", rule["data"][0]["model"]["rawSql"])
    assert match, "the budget map is not where this test looks for it"
    ids = [s.strip().strip("'") for s in match[1].split(",")]
    amounts = [int(s) for s in match[2].split(",")]
    assert dict(zip(ids, amounts, strict=True)) == budgets
    budget_var = next(v for v in load_dashboards()["campaign.json"]["templating"]["list"] if v["name"] == "budget")
    assert int(budget_var["query"]) == budgets["spring-red-packet"]


# -- Prometheus -----------------------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: apt-get install prometheus (Debian's package ships it)", pytrace=False)
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_prometheus_config_and_rules() -> None:
    proc = run_promtool("check", "config", "prometheus/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_promtool("test", "rules", "prometheus/tests/processes.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_panel_promql_parses(tmp_path: Path) -> None:
    """Each expression becomes a recording rule in its own group; promtool parses (and type-checks) them all."""
    groups = [{"name": f"q{n}", "rules": [{"record": f"fission:panel{n}", "expr": expand_promql(expr, variables)}]}
              for n, (_, expr, variables) in enumerate(prometheus_expressions())]
    assert groups
    rules = tmp_path / "panels.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    proc = run_promtool("check", "rules", str(rules))
    names = {f"q{n}": key for n, (key, _, _) in enumerate(prometheus_expressions())}
    output = re.sub(r"\bq\d+\b", lambda m: names.get(m[0], m[0]), proc.stdout + proc.stderr)
    assert proc.returncode == 0, output


def exported_metric_names() -> set[str]:
    """Series names the processes' registries expose (stream.metrics, the sink, the cascade agent), as
    Prometheus stores them: counters as NAME_total, histograms as NAME_bucket/_sum/_count, gauges as NAME.
    From the metric families, so labelled metrics that have no sample yet count too."""
    import importlib

    from prometheus_client import REGISTRY

    for module in ("stream.metrics", "sinks.clickhouse", *set(OPTIONAL_METRIC_MODULES.values())):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    names = set()
    for metric in REGISTRY.collect():
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
        elif metric.type == "histogram":
            names.update(f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(metric.name)
    return names


@pytest.mark.parametrize("key", [key for key, _, _ in prometheus_expressions()])
def test_panel_metrics_are_exported(key: str) -> None:
    expr = next(e for k, e, _ in prometheus_expressions() if k == key)
    exported = exported_metric_names()
    for name in sorted(set(re.findall(r"\b(fission_[a-z0-9_]+)\b", expr))):
        module = OPTIONAL_METRIC_MODULES.get(name)
        if name not in exported and module:
            try:
                __import__(module)
            except ImportError:
                pytest.skip(f"{name} comes from {module}, which does not exist yet")
        assert name in exported, f"{key}: no process exports {name}"


def test_rule_metrics_are_exported() -> None:
    """Every fission metric an alert rule of prometheus/rules/ reads is one a process exports."""
    exported = exported_metric_names()
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        exprs = [r.get("expr", "") for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
        missing = sorted({m for e in exprs for m in re.findall(r"\b(fission_[a-z0-9_]+)\b", str(e))} - exported)
        assert not missing, f"{path.name}: rules read metrics no process exports: {missing}"


# A metrics endpoint fed by the real metric objects: a worker's batches (the engine over simulated events, one
# batch every 0.3 s so counters move between scrapes), the sink's and the cascade agent's metrics with a sample
# in every label set the panels group by. Runs in a subprocess so this test changes no metric of the test process.
METRICS_SERVER = """
import sys, time
from attribution.campaigns import parse_campaigns
from attribution.engine import Engine, Message
from attribution.store import EmbeddedStore
from sinks import clickhouse as sink
from stream import cascades, metrics
from stream.simulate import SimulationParams, campaign_config, simulate

params = SimulationParams(max_events=4000)
engine = Engine(parse_campaigns(campaign_config(params)), EmbeddedStore())
messages = [Message(raw, n) for n, raw in enumerate(simulate(params))]
for partition in ("0", "1"):
    metrics.LAG.labels(partition).set(12)
    metrics.WAITING.labels(partition).set(3)
metrics.ASSIGNED.set(2)
metrics.STORE_ERRORS.labels("redis").inc(0)
metrics.BUDGET_CUT.labels(params.campaign).inc(0)
for table in ("outcomes", "ledger", "nodes"):
    sink.ROWS_INSERTED.labels(table=table).inc(100)
    sink.DUPLICATES_SKIPPED.labels(table=table).inc(1)
    sink.INSERT_FAILURES.labels(table=table).inc(0)
    sink.INSERT_SECONDS.labels(table=table).observe(0.02)
sink.BACKPRESSURE.inc(0)
sink.BUFFERED_ROWS.labels(database="fission").set(5)
sink.HEALTHY.labels(database="fission").set(1)
cascades.STALLED_GAUGE.labels(params.campaign).set(2)
cascades.K_FACTOR.labels(params.campaign).set(1.3)
metrics.serve(int(sys.argv[1]), ready=lambda: True)
print("serving", flush=True)
while True:
    for start in range(0, len(messages), 200):
        started = time.perf_counter()
        result = engine.process(0, messages[start:start + 200])
        metrics.observe(result, started, max((e.ts for e in result.entries), default=0) + 1500)
        time.sleep(0.3)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 400 = the expression does not parse
        return json.loads(exc.read())


def test_panel_promql_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    """A throwaway Prometheus (Debian's, on free loopback ports) scrapes a process with the real metrics every
    second; every panel expression must evaluate without error and return series."""
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("prometheus is missing: apt-get install prometheus", pytrace=False)
    metrics_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "fission-workers",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    exporter = subprocess.Popen([sys.executable, "-c", METRICS_SERVER, str(metrics_port)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{web_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{web_port}"
    try:
        assert exporter.stdout.readline().strip() == "serving", exporter.stderr.read()
        deadline = time.monotonic() + 60
        while True:  # until three scrapes are in: every rate() over 1m then has samples
            try:
                found = prometheus_query(base, "count_over_time(up[1m])")["data"]["result"]
                if found and float(found[0]["value"][1]) >= 3:
                    break
            except (OSError, KeyError):
                pass
            assert time.monotonic() < deadline, f"Prometheus did not scrape in time: {server.stderr}"
            assert server.poll() is None and exporter.poll() is None, "Prometheus or the exporter died"
            time.sleep(0.5)
        failures = []
        for key, expr, variables in prometheus_expressions():
            text = expand_promql(expr, variables, {"campaign": "spring-red-packet"})
            answer = prometheus_query(base, text)
            if answer.get("status") != "success":
                failures.append(f"{key}: {answer.get('error')}\n    {text}")
            elif not answer["data"]["result"]:
                failures.append(f"{key}: no series\n    {text}")
        assert not failures, "\n".join(failures)
    finally:
        for process in (server, exporter):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the chDB subprocess --------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "chdb":
        print("usage: python -m tests.test_grafana chdb PATH  (queries as JSON on stdin)", file=sys.stderr)
        return 2
    print(json.dumps(run_all_chdb(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
