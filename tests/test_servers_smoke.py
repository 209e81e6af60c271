"""Smoke tests proving the real servers of ``scripts/services`` work with the clients fission uses.

Each test is one behaviour, against real Kafka / Redis / ClickHouse (fixtures from ``tests.servers``);
nothing is mocked. Run with: ``.venv/bin/python -m pytest -p tests.servers tests/test_servers_smoke.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chdb.session
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from clickhouse_driver import Client as ClickHouseClient
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- Kafka: plain clients ---------------------------------------------------------------------------


def _produce_all(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int | None]]) -> None:
    """Produce (key, value, partition) records with confluent-kafka and insist every one was acked."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    errors: list[Any] = []
    for key, value, partition in records:
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        producer.produce(topic, key=key, value=value, on_delivery=lambda e, _m: e and errors.append(e), **kwargs)
    assert producer.flush(20) == 0, "messages still unacknowledged after 20 s"
    assert errors == []


def test_confluent_kafka_producer_to_consumer_round_trip(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], unique_prefix: str
) -> None:
    topic = kafka_topic_factory("confluent", partitions=3)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(30)}
    _produce_all(kafka_bootstrap, topic, [(k, v, None) for k, v in sent.items()])

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"{unique_prefix}-confluent",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: dict[bytes, bytes] = {}
    partitions_seen: set[int] = set()
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received[msg.key()] = msg.value()
            partitions_seen.add(msg.partition())
    finally:
        consumer.close()
    assert received == sent
    assert partitions_seen == {0, 1, 2}  # keys hashed over all partitions, all read back


def test_aiokafka_producer_to_consumer_round_trip(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], unique_prefix: str
) -> None:
    topic = kafka_topic_factory("aiokafka", partitions=2)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}

    async def round_trip() -> dict[bytes, bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in sent.items():
                metadata = await producer.send_and_wait(topic, value=value, key=key)
                assert metadata.offset >= 0
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"{unique_prefix}-aiokafka",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received: dict[bytes, bytes] = {}
        try:
            async with asyncio.timeout(30):
                while len(received) < len(sent):
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        received.update((r.key, r.value) for r in records)
        finally:
            await consumer.stop()
        return received

    assert asyncio.run(round_trip()) == sent


# --- Kafka: Faust workers ---------------------------------------------------------------------------


ASSIGNED_LINE = re.compile(r"ASSIGNED (\S+) (\[[0-9, ]*\])")


@dataclass
class FaustWorker:
    """One ``faust worker`` subprocess running tests/faust_smoke_app.py, with its combined log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assignments(self) -> list[set[int]]:
        """Input partitions after each rebalance, oldest first (from the app's ASSIGNED lines)."""
        # Faust's worker routes stdout through its logger, so the marker sits inside a log line.
        return [
            set(json.loads(partitions)) for name, partitions in ASSIGNED_LINE.findall(self.log()) if name == self.name
        ]

    def latest_assignment(self) -> set[int] | None:
        history = self.assignments()
        return history[-1] if history else None


@dataclass
class FaustCluster:
    """Workers of one Faust app (one consumer group) plus the topics they use."""

    bootstrap: str
    app_id: str
    in_topic: str
    out_topic: str
    partitions: int
    tmp_path: Path
    workers: list[FaustWorker] = field(default_factory=list)

    def start_worker(self, name: str) -> FaustWorker:
        env = dict(os.environ)
        env.update(
            FISSION_KAFKA_BOOTSTRAP=self.bootstrap,
            FAUST_SMOKE_APP_ID=self.app_id,
            FAUST_SMOKE_IN_TOPIC=self.in_topic,
            FAUST_SMOKE_OUT_TOPIC=self.out_topic,
            FAUST_SMOKE_PARTITIONS=str(self.partitions),
            FAUST_SMOKE_WORKER=name,
            FAUST_SMOKE_DATADIR=str(self.tmp_path / f"{name}-data"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        log_path = self.tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "faust",
                    "-A",
                    "tests.faust_smoke_app",
                    "worker",
                    "-l",
                    "info",
                    "--without-web",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = FaustWorker(name, proc, log_path)
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"===== {w.name} log (tail) =====\n{w.log()[-4000:]}" for w in self.workers)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Poll ``condition``; fail with every worker's log if it stays false or a worker dies."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            for worker in self.workers:
                if worker.proc.poll() is not None:
                    pytest.fail(
                        f"faust worker {worker.name} exited ({worker.proc.returncode}) "
                        f"while waiting for {what}\n{self.logs()}"
                    )
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM every worker (they leave the group cleanly), SIGKILL any that hang."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=5)


class ReplyReader:
    """Reads the Faust agent's JSON replies from the output topic, from its beginning."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.replies: dict[str, dict[str, Any]] = {}

    def collect(self, values: set[str], cluster: FaustCluster, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Return the latest reply for each of ``values``; fail with worker logs if some never come."""
        deadline = time.monotonic() + timeout_s
        while not values <= self.replies.keys():
            if time.monotonic() >= deadline:
                missing = sorted(values - self.replies.keys())
                pytest.fail(
                    f"no reply within {timeout_s}s for {len(missing)} events, e.g. {missing[:5]}\n{cluster.logs()}"
                )
            msg = self.consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            reply = json.loads(msg.value())
            self.replies[reply["value"]] = reply
        return {v: self.replies[v] for v in values}

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def faust_cluster(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], unique_prefix: str, tmp_path: Path
) -> Iterator[FaustCluster]:
    """A Faust app id with a 4-partition input and a 1-partition reply topic; stops its workers after."""
    partitions = 4
    cluster = FaustCluster(
        bootstrap=kafka_bootstrap,
        app_id=f"{unique_prefix}-faust",
        in_topic=kafka_topic_factory("in", partitions=partitions),
        out_topic=kafka_topic_factory("out", partitions=1),
        partitions=partitions,
        tmp_path=tmp_path,
    )
    try:
        yield cluster
    finally:
        cluster.stop()  # before kafka_topic_factory deletes the topics and groups


@pytest.fixture
def reply_reader(faust_cluster: FaustCluster, unique_prefix: str) -> Iterator[ReplyReader]:
    reader = ReplyReader(faust_cluster.bootstrap, faust_cluster.out_topic, f"{unique_prefix}-replies")
    try:
        yield reader
    finally:
        reader.close()


def _events(prefix: str, count: int, partitions: int) -> list[tuple[bytes, bytes, int | None]]:
    """``count`` events spread round-robin over all input partitions."""
    return [(f"{prefix}{i}".encode(), f"{prefix}{i}".encode(), i % partitions) for i in range(count)]


def test_faust_agent_replies_to_events_from_real_broker(faust_cluster: FaustCluster, reply_reader: ReplyReader) -> None:
    faust_cluster.start_worker("w1")
    events = _events("solo-", 12, faust_cluster.partitions)
    _produce_all(faust_cluster.bootstrap, faust_cluster.in_topic, events)

    replies = reply_reader.collect({v.decode() for _, v, _ in events}, faust_cluster, timeout_s=30)

    for _, value, partition in events:
        reply = replies[value.decode()]
        assert reply["worker"] == "w1"
        assert reply["partition"] == partition


def test_faust_rebalance_splits_partitions_between_two_workers_and_keeps_answering(
    faust_cluster: FaustCluster, reply_reader: ReplyReader
) -> None:
    all_partitions = set(range(faust_cluster.partitions))
    w1 = faust_cluster.start_worker("w1")
    faust_cluster.wait_until(lambda: w1.latest_assignment() == all_partitions, "w1 to own all partitions", 15)

    before = _events("before-", 8, faust_cluster.partitions)
    _produce_all(faust_cluster.bootstrap, faust_cluster.in_topic, before)
    replies = reply_reader.collect({v.decode() for _, v, _ in before}, faust_cluster, timeout_s=10)
    assert {r["worker"] for r in replies.values()} == {"w1"}

    w2 = faust_cluster.start_worker("w2")

    def split() -> bool:
        a1, a2 = w1.latest_assignment(), w2.latest_assignment()
        return bool(a1 and a2 and not a1 & a2 and a1 | a2 == all_partitions)

    faust_cluster.wait_until(split, "the group to rebalance over w1 and w2", 15)
    owner = {p: w.name for w in (w1, w2) for p in w.latest_assignment() or ()}
    assert len(w1.assignments()) >= 2  # w1 really was reassigned, not just w2 added

    after = _events("after-", 16, faust_cluster.partitions)
    _produce_all(faust_cluster.bootstrap, faust_cluster.in_topic, after)
    replies = reply_reader.collect({v.decode() for _, v, _ in after}, faust_cluster, timeout_s=15)

    for _, value, partition in after:
        reply = replies[value.decode()]
        assert reply["partition"] == partition
        assert reply["worker"] == owner[partition], (value, reply, owner)
    assert {r["worker"] for r in replies.values()} == {"w1", "w2"}


# --- Redis ------------------------------------------------------------------------------------------

# Move ARGV[1] units from KEYS[1] to KEYS[2] if enough is left; return the new KEYS[2] total, or -1.
TRANSFER_LUA = """
local available = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if available < amount then
  return -1
end
redis.call('DECRBY', KEYS[1], amount)
return redis.call('INCRBY', KEYS[2], amount)
"""


def test_redis_lua_script_updates_two_keys_atomically(redis_client: redis.Redis, redis_key_prefix: str) -> None:
    budget, granted = f"{redis_key_prefix}budget", f"{redis_key_prefix}granted"
    redis_client.set(budget, 100)
    transfer = redis_client.register_script(TRANSFER_LUA)

    def grant_many(_: int) -> list[int]:
        return [int(transfer(keys=[budget, granted], args=[1])) for _ in range(40)]

    with ThreadPoolExecutor(max_workers=4) as pool:  # 160 concurrent attempts on a budget of 100
        results = [r for batch in pool.map(grant_many, range(4)) for r in batch]

    # Every successful call saw and produced a distinct consistent state: totals 1..100, no lost update.
    assert sorted(r for r in results if r != -1) == list(range(1, 101))
    assert results.count(-1) == 60
    assert int(redis_client.get(budget)) == 0
    assert int(redis_client.get(granted)) == 100


def test_redis_runs_with_append_only_file_enabled(redis_client: redis.Redis) -> None:
    config = {_text(k): _text(v) for k, v in redis_client.config_get("appendonly").items()}
    assert config == {"appendonly": "yes"}
    assert redis_client.info("persistence")["aof_enabled"] == 1


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- ClickHouse -------------------------------------------------------------------------------------


def test_clickhouse_same_ddl_works_on_server_and_chdb(
    clickhouse_client: ClickHouseClient, clickhouse_database: str, tmp_path: Path
) -> None:
    # One DDL for both engines: ClickHouse 18.16 (server) has no DateTime64, so time is DateTime.
    ddl = """
        CREATE TABLE {db}.referral_events (
            referral_id String,
            reward_delta Int64,
            scans UInt64,
            happened_at DateTime
        ) ENGINE = MergeTree() ORDER BY (referral_id, happened_at)
    """
    rows = [
        ("ref-a", -5, 10, dt.datetime(2024, 1, 1, 12, 0, 0)),
        ("ref-b", 7, 0, dt.datetime(2024, 2, 29, 23, 59, 59)),
        ("ref-c", 2**40, 2**64 - 1, dt.datetime(2030, 6, 15, 6, 30, 0)),  # UInt64 max: really unsigned
    ]
    select = (
        "SELECT referral_id, reward_delta, scans, toString(happened_at) FROM {db}.referral_events ORDER BY referral_id"
    )
    expected = [(r[0], r[1], r[2], r[3].strftime("%Y-%m-%d %H:%M:%S")) for r in rows]

    # Server, through clickhouse-driver with a columnar insert.
    clickhouse_client.execute(ddl.format(db=clickhouse_database))
    columns = [list(col) for col in zip(*rows, strict=True)]
    clickhouse_client.execute(
        f"INSERT INTO {clickhouse_database}.referral_events (referral_id, reward_delta, scans, happened_at) VALUES",
        columns,
        columnar=True,
    )
    assert clickhouse_client.execute(select.format(db=clickhouse_database)) == expected

    # Embedded chDB, same DDL and query.
    session = chdb.session.Session(str(tmp_path / "chdb"))
    try:
        session.query("CREATE DATABASE IF NOT EXISTS local_db")
        session.query(ddl.format(db="local_db"))
        values = ", ".join(f"('{r[0]}', {r[1]}, {r[2]}, '{r[3]:%Y-%m-%d %H:%M:%S}')" for r in rows)
        session.query(f"INSERT INTO local_db.referral_events VALUES {values}")
        result = json.loads(session.query(select.format(db="local_db"), "JSONCompact").bytes())
    finally:
        session.close()
    types = [column["type"] for column in result["meta"]]
    assert types == ["String", "Int64", "UInt64", "String"]
    # JSON output quotes 64-bit integers; convert back before comparing typed rows.
    chdb_rows = [(ref, int(delta), int(scans), at) for ref, delta, scans, at in result["data"]]
    assert chdb_rows == expected
