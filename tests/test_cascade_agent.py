"""The cascade agent on the real servers: outcomes and rewards through Kafka into `run_cascades` processes,
a stalled cascade alerted once on the alerts topic and in ClickHouse, snapshots written, and after a
restart (state rebuilt from the repartitioned log) the cascade grows again and the alert resolves.
Also, without servers: the ClickHouse writer on chDB and the gauges the checks set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from attribution.cascades import FIRING, OUTCOME, RESOLVED, STALLED, CascadeMonitor, routes
from sinks.clickhouse import Backend, ChdbBackend, migrate
from stream.cascades import CascadeRuntime, CascadeTopics, ClickHouseWriter, alert_row, read_log, snapshot_row
from stream.settings import Settings
from stream.topics import Topics, ensure_topics
from tests.test_cascades import at, bound, entry, purchase, shared

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 2
# The subprocess: `run_cascades` with short intervals, until idle (the CLI will wrap the same call).
LAUNCHER = """
import sys
from stream.cascades import CascadeOptions, run_cascades
from stream.logs import configure_logging
from stream.settings import load_settings

bootstrap, prefix, clickhouse_url, database = sys.argv[1:5]
configure_logging("info")
settings = load_settings(None, kafka_bootstrap=bootstrap, topic_prefix=prefix, app_id=prefix, partitions=2,
                         clickhouse_url=clickhouse_url, clickhouse_database=database)
run_cascades(settings, until_idle=3.0, options=CascadeOptions(check_interval_s=0.5, snapshot_interval_s=1.0),
             loglevel="warning")
"""


def produce(bootstrap: str, topic: str, rows: list[dict], key: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for row in rows:
        producer.produce(topic, orjson.dumps(row), row[key].encode())
    assert producer.flush(30) == 0


def run_cascades(tmp: Path, bootstrap: str, prefix: str, clickhouse_url: str, database: str) -> None:
    log_path = tmp / "cascades.log"
    with log_path.open("ab") as log:
        process = subprocess.run(
            [sys.executable, "-c", LAUNCHER, bootstrap, prefix, clickhouse_url, database],
            cwd=tmp,  # Faust's data directory lands here
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60, check=False,
        )
    assert process.returncode == 0, log_path.read_text()[-4000:]


def cascade_a(binds: range, minute: float | None = None) -> list[dict]:
    """Seed a0 and a binary tree of binds (a_i under a_(i-1)//2), bind i at minute i unless given."""
    rows = [shared("a0", "a0", 0, 0)] if binds.start == 1 else []
    return rows + [bound(f"a{i}", f"a{(i - 1) // 2}", "a0", (i + 1).bit_length() - 1, i if minute is None else minute)
                   for i in binds]


def cascade_b(binds: range) -> list[dict]:
    """Seed b0 and binds under it every minute: it keeps growing, and advances event time."""
    rows = [shared("b0", "b0", 0, 0)] if binds.start == 1 else []
    return rows + [bound(f"b{i}", "b0", "b0", 1, i) for i in binds]


def alerts_on(bootstrap: str, topic: str) -> list[tuple[str, str, str, int]]:
    alerts = [orjson.loads(value) for _, value in read_log(bootstrap, topic)]
    return [(a["root"], a["kind"], a["state"], a["ts"]) for a in alerts]


def test_a_stalled_cascade_alerts_once_and_resolves_after_it_grows_again(
    kafka_bootstrap: str, kafka_topic_factory, unique_prefix: str, clickhouse_url: str, clickhouse_database: str,
    clickhouse_client, tmp_path: Path,
) -> None:
    prefix, db = unique_prefix, clickhouse_database  # every topic and group starts with the prefix: cleaned up
    topics = Topics.with_prefix(prefix)
    alerts_topic = CascadeTopics.of(Settings(topic_prefix=prefix)).alerts
    ensure_topics(kafka_bootstrap, topics, PARTITIONS, 1)
    outcomes = cascade_a(range(1, 12)) + cascade_b(range(1, 41)) + [purchase("p1", "a1", "a0", 10_000, 5)]
    produce(kafka_bootstrap, topics.outcomes, outcomes, "user_id")
    produce(kafka_bootstrap, topics.rewards, [entry("e1", "a0", 1_000, "commission", 5)], "beneficiary")

    run_cascades(tmp_path, kafka_bootstrap, prefix, clickhouse_url, db)
    # a0: 12 nodes, last bind at minute 11, gaps of 1 minute: stalled after max(10, 5 x 1) = 10 minutes,
    # which the clock (b0's binds, up to minute 40, less a minute of lateness) passed. b0 is still growing.
    firing = ("a0", STALLED, FIRING, at(21))
    assert alerts_on(kafka_bootstrap, alerts_topic) == [firing]
    assert clickhouse_client.execute(f"SELECT root, kind, state, ts FROM {db}.alerts") == [firing]
    latest = f"SELECT root, size, max_depth, binds, revenue, rewards, last_bind_ts FROM {db}.cascade_latest ORDER BY 1"
    assert clickhouse_client.execute(latest) == [("a0", 12, 3, 11, 10_000, 1_000, at(11)),
                                                 ("b0", 41, 1, 40, 0, 0, at(40))]
    assert clickhouse_client.execute(f"SELECT max(snapshot_ts) FROM {db}.cascade_latest") == [(at(40),)]

    produce(kafka_bootstrap, topics.outcomes, cascade_a(range(12, 13), minute=45) + cascade_b(range(41, 46)), "user_id")
    run_cascades(tmp_path, kafka_bootstrap, prefix, clickhouse_url, db)  # a restart: state rebuilt from the log
    resolved = ("a0", STALLED, RESOLVED, at(45))
    assert alerts_on(kafka_bootstrap, alerts_topic) == [firing, resolved]
    assert clickhouse_client.execute(f"SELECT root, kind, state, ts FROM {db}.alerts ORDER BY ts") == [firing, resolved]
    assert clickhouse_client.execute(latest) == [("a0", 13, 3, 12, 10_000, 1_000, at(45)),
                                                 ("b0", 46, 1, 45, 0, 0, at(45))]


# -- without servers ----------------------------------------------------------------------------------


class Failing:
    """A backend that refuses inserts while `down`."""

    def __init__(self, real: Backend) -> None:
        self.real, self.down = real, True

    def insert(self, table: str, columns: dict) -> None:
        if self.down:
            raise ConnectionError("simulated outage")
        self.real.insert(table, columns)


def test_writer_keeps_rows_while_clickhouse_is_down_and_the_leaderboard_is_one_query_on_chdb(tmp_path: Path) -> None:
    backend = ChdbBackend(tmp_path / "chdb")
    try:
        migrate(backend, "fission")
        monitor = CascadeMonitor()
        for row in cascade_a(range(1, 12)) + cascade_b(range(1, 4)):
            monitor.apply_outcome(row)
        alerts = monitor.check(at(60))
        flaky = Failing(backend)
        writer = ClickHouseWriter(flaky, "fission")  # type: ignore[arg-type]
        first = [snapshot_row(s, at(30), 1) for s in monitor.take_changed()]
        assert not writer.write("cascade_snapshots", first)
        assert not writer.write("alerts", [alert_row(a) for a in alerts])
        flaky.down = False
        monitor.apply_outcome(bound("b4", "b0", "b0", 1, 59))
        assert writer.write("cascade_snapshots", [snapshot_row(s, at(60), 2) for s in monitor.take_changed()])
        assert writer.write("alerts", [])
        assert backend.query("SELECT root, kind, state FROM fission.alerts") == [("a0", STALLED, FIRING)]
        assert backend.query("SELECT count() FROM fission.cascade_snapshots") == [(3,)]
        assert backend.query(
            "SELECT root, size, snapshot_ts FROM fission.cascade_latest WHERE campaign = 'c' ORDER BY size DESC"
        ) == [("a0", 12, at(30)), ("b0", 5, at(60))]
    finally:
        backend.close()


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_checks_merge_the_partitions_clocks_and_set_the_stalled_and_k_gauges() -> None:
    runtime = CascadeRuntime(lambda partition: CascadeMonitor())
    runtime.monitors = {0: CascadeMonitor(), 1: CascadeMonitor()}
    where = {("c", "a0"): 0, ("c", "b0"): 1, ("c",): 1}  # as the by-root topic would spread the keys
    for row in cascade_a(range(1, 12)) + cascade_b(range(1, 31)):
        for key, record in routes(OUTCOME, row):
            runtime.monitors[where[key]].apply(key, record)
    assert runtime.monitors[0].watermark == {"c": at(11)}
    assert runtime.watermarks() == {"c": at(30)} and runtime.clock() == {"c": at(29)}
    assert [(a.root, a.state, a.ts) for a in runtime.check()] == [("a0", FIRING, at(21))]
    assert sample("fission_stalled_cascades", {"campaign": "c"}) == 1
    assert sample("fission_k_factor", {"campaign": "c"}) == (11 + 28) / 2  # binds over sharers a0, b0 in [-31, 29)
    rows = runtime.snapshots()
    assert sorted((row[1], row[2], row[11]) for row in rows) == [("a0", 12, at(30)), ("b0", 31, at(30))]
    assert runtime.snapshots() == []  # nothing changed since
