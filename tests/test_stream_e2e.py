"""End to end on the real servers: simulated traffic through Kafka, `fission worker` processes,
Redis balances and the output topics compared with `fission replay` of the same events."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from attribution.campaigns import parse_campaigns
from attribution.engine import Engine
from attribution.redis_store import RedisStore
from attribution.store import EmbeddedStore
from stream.produce import produce
from stream.replay import replay
from stream.simulate import SimulationParams, campaign_config, simulate
from stream.topics import Topics, ensure_topics
from tests.compare import nonzero

ROOT = Path(__file__).parent.parent
PARTITIONS = 4


def read_topic(bootstrap: str, topic: str, group: str, messages: list | None = None) -> list[bytes]:
    """Every message's value of a topic, from the beginning to the current end (the messages too, if asked)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    ends = {}
    for p in metadata.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > low:
            ends[p] = high
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while ends and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        values.append(message.value())
        if messages is not None:
            messages.append(message)
        if message.offset() + 1 >= ends.get(message.partition(), 0):
            ends.pop(message.partition(), None)
    consumer.close()
    assert not ends, f"could not read {topic} to its end"
    return values


class Stack:
    """Topics, key prefix and worker processes of one test, all under one unique name."""

    def __init__(self, name: str, bootstrap: str, redis_url: str, tmp: Path, events: int, seed: int) -> None:
        self.name, self.bootstrap, self.redis_url, self.tmp = name, bootstrap, redis_url, tmp
        self.topics = Topics.with_prefix(name)
        # No device farms: which of a farm's scans bind depends on processing order (SPEC 4.8).
        params = SimulationParams(seed=seed, max_events=events, bad_rate=0.02, duplicate_rate=0.02,
                                  device_reuse_rate=0.0)
        self.events = list(simulate(params))
        self.campaigns_file = tmp / "campaigns.json"
        self.campaigns_file.write_bytes(orjson.dumps(campaign_config(params)))
        self.campaigns = parse_campaigns(campaign_config(params))
        ensure_topics(bootstrap, self.topics, PARTITIONS, 1)

    def produce(self) -> None:
        assert produce(self.bootstrap, self.topics.events, self.events) == len(self.events)

    def worker(self, until_idle: float, metrics_port: int | None = None) -> subprocess.Popen:
        env = {**os.environ, "FISSION_TICK_INTERVAL_MS": "500"}
        command = [sys.executable, "-m", "stream.cli", "worker", "--campaigns", str(self.campaigns_file),
                   "--bootstrap", self.bootstrap, "--redis-url", self.redis_url, "--redis-prefix", self.name,
                   "--topic-prefix", self.name, "--app-id", self.name, "--partitions", str(PARTITIONS),
                   "--until-idle", str(until_idle), "--log-level", "warning"]
        if metrics_port:
            command += ["--metrics-port", str(metrics_port)]
        log = (self.tmp / "worker.log").open("ab")
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def run_until_idle(self, until_idle: float = 6, timeout: float = 240) -> None:
        process = self.worker(until_idle)
        assert process.wait(timeout=timeout) == 0, (self.tmp / "worker.log").read_text()[-3000:]

    def expected(self) -> Path:
        source = self.tmp / "events.jsonl"
        source.write_bytes(b"".join(e + b"\n" for e in self.events))
        out = self.tmp / "replay"
        replay(Engine(self.campaigns, EmbeddedStore()), source, out)
        return out

    def cleanup(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.name}:*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])


@pytest.fixture
def stack(kafka_bootstrap: str, redis_url: str, unique_prefix: str, tmp_path: Path, kafka_topic_factory):
    made = Stack(unique_prefix, kafka_bootstrap, redis_url, tmp_path, events=30_000, seed=5)
    yield made
    made.cleanup()


def ledger_rows(lines: list[bytes]) -> Counter:
    rows = {}
    for raw in lines:
        entry = json.loads(raw)
        rows[entry["entry_id"]] = (entry["campaign"], entry["beneficiary"], entry["amount"], entry["kind"],
                                   entry["level"], entry["source_event_id"])
    return Counter(rows.values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_worker_until_idle_matches_replay_and_dead_letters_every_bad_event(stack: Stack) -> None:
    stack.produce()
    port = free_port()
    process = stack.worker(until_idle=6, metrics_port=port)
    base = f"http://127.0.0.1:{port}"
    ready, metrics = set(), ""
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        ready.add(http_get(base + "/ready")[0])
        status, text = http_get(base + "/metrics")
        if status == 200 and metric_sum(text, "fission_events_total") >= len(stack.events):
            metrics = text
            break
        time.sleep(0.5)
    assert http_get(base + "/health")[0] == 200
    assert process.wait(timeout=120) == 0, (stack.tmp / "worker.log").read_text()[-3000:]
    assert 200 in ready
    assert metric_sum(metrics, "fission_events_total") == len(stack.events)
    assert metric_sum(metrics, "fission_event_to_credit_seconds_count") > 0
    expected = stack.expected()
    store = RedisStore(redis.Redis.from_url(stack.redis_url), prefix=stack.name)
    assert nonzero(store.balances()) == json.loads((expected / "balances.json").read_text())

    outcomes = {json.loads(raw)["outcome_id"]: json.loads(raw)
                for raw in read_topic(stack.bootstrap, stack.topics.outcomes, stack.name + "-o")}
    assert len(outcomes) == len(stack.events)
    replayed = [json.loads(line) for line in (expected / "outcomes.jsonl").read_text().splitlines()]
    assert Counter((o["event_id"], o["outcome"], o["reason"]) for o in outcomes.values()) == Counter(
        (o["event_id"], o["outcome"], o["reason"]) for o in replayed
    )
    rejected = Counter(o["reason"] for o in outcomes.values() if o["outcome"] == "rejected")
    letters: list = []
    read_topic(stack.bootstrap, stack.topics.dlq, stack.name + "-d", letters)
    dead = Counter(dict(letter.headers())["fission.reason"].decode() for letter in letters)
    assert {letter.value() for letter in letters} <= set(stack.events)  # the rejected bytes, untouched
    assert dead == rejected
    assert metric_sum(metrics, "fission_dead_letters_total") == sum(dead.values())
    assert dead["invalid_event"] > 0

    rewards = read_topic(stack.bootstrap, stack.topics.rewards, stack.name + "-r")
    replay_ledger = [orjson.dumps(json.loads(line)) for line in (expected / "ledger.jsonl").read_text().splitlines()]
    assert ledger_rows(rewards) == ledger_rows(replay_ledger)


def test_kill_minus_nine_at_random_points_then_restart_gives_the_same_balances_and_ledger(stack: Stack) -> None:
    stack.produce()
    rng = random.Random(11)
    for _ in range(3):
        process = stack.worker(until_idle=30)
        time.sleep(rng.uniform(2.0, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    stack.run_until_idle()
    expected = stack.expected()
    store = RedisStore(redis.Redis.from_url(stack.redis_url), prefix=stack.name)
    assert nonzero(store.balances()) == json.loads((expected / "balances.json").read_text())
    rewards = read_topic(stack.bootstrap, stack.topics.rewards, stack.name + "-r")
    replay_ledger = [orjson.dumps(json.loads(line)) for line in (expected / "ledger.jsonl").read_text().splitlines()]
    assert ledger_rows(rewards) == ledger_rows(replay_ledger)


def poll_metrics(base: str, seconds: float) -> dict[str, str]:
    """The last /ready status and /metrics text a process served within `seconds`."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, text = http_get(base + "/metrics")
        if status == 200:
            found["metrics"] = text
            found["ready"] = str(http_get(base + "/ready")[0])
        time.sleep(0.3)
    return found


def run_sink(stack: Stack, clickhouse_url: str, database: str, until_idle: float = 5, timeout: float = 120,
             kill_after: float | None = None, metrics_port: int | None = None) -> None:
    command = [sys.executable, "-m", "stream.cli", "sink", "--clickhouse-url", clickhouse_url, "--database", database,
               "--bootstrap", stack.bootstrap, "--topic-prefix", stack.name, "--app-id", stack.name,
               "--until-idle", str(until_idle), "--log-level", "warning"]
    if metrics_port:
        command += ["--metrics-port", str(metrics_port)]
    log = (stack.tmp / "sink.log").open("ab")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if kill_after is not None:
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return
    assert process.wait(timeout=timeout) == 0, (stack.tmp / "sink.log").read_text()[-3000:]


def test_sink_writes_every_outcome_once_even_after_clickhouse_was_down(
    stack: Stack, clickhouse_url: str, clickhouse_client, clickhouse_database: str
) -> None:
    stack.produce()
    stack.run_until_idle()
    down = "clickhouse://127.0.0.1:1/default"
    port = free_port()
    watcher = threading.Thread(target=lambda: seen.update(poll_metrics(f"http://127.0.0.1:{port}", 4)))
    seen: dict[str, str] = {}
    watcher.start()
    run_sink(stack, down, clickhouse_database, kill_after=4, metrics_port=port)  # buffers, retries, commits nothing
    watcher.join()
    assert seen.get("ready") == "503"  # alive, serving metrics, waiting for ClickHouse
    run_sink(stack, clickhouse_url, clickhouse_database, kill_after=3)  # killed mid-way: offsets behind rows
    run_sink(stack, clickhouse_url, clickhouse_database)
    db = clickhouse_database
    assert clickhouse_client.execute(f"SELECT count() FROM {db}.outcomes")[0][0] == len(stack.events)
    expected = stack.expected()
    entries = len((expected / "ledger.jsonl").read_text().splitlines())
    assert clickhouse_client.execute(f"SELECT count() FROM {db}.ledger")[0][0] == entries
    assert clickhouse_client.execute(f"SELECT countMerge(events) FROM {db}.campaign_minute")[0][0] == len(stack.events)
    binds = sum(1 for line in (expected / "outcomes.jsonl").read_text().splitlines() if '"outcome":"bound"' in line)
    assert clickhouse_client.execute(
        f"SELECT countMerge(events) FROM {db}.campaign_minute WHERE outcome = 'bound'")[0][0] == binds


def test_a_batch_that_fails_unexpectedly_stops_the_worker_unacknowledged_and_loses_nothing(
    kafka_bootstrap: str, redis_url: str, unique_prefix: str, tmp_path: Path, kafka_topic_factory
) -> None:
    stack = Stack(unique_prefix, kafka_bootstrap, redis_url, tmp_path, events=3000, seed=8)
    try:
        stack.produce()
        client = redis.Redis.from_url(redis_url)
        store = RedisStore(client, prefix=stack.name)
        broken = [store._part(p, "q") for p in range(PARTITIONS)]
        for key in broken:  # corrupt state: loading the waiting queues of any partition fails
            client.hset(key, "broken", b"not a queue")
        process = stack.worker(until_idle=30)
        assert process.wait(timeout=120) == 70, (stack.tmp / "worker.log").read_text()[-3000:]
        for key in broken:
            client.hdel(key, "broken")
        stack.run_until_idle()
        expected = stack.expected()
        assert nonzero(store.balances()) == json.loads((expected / "balances.json").read_text())
        outcomes = {json.loads(raw)["outcome_id"] for raw in read_topic(stack.bootstrap, stack.topics.outcomes,
                                                                           stack.name + "-o")}
        assert len(outcomes) == len(stack.events)
    finally:
        stack.cleanup()
