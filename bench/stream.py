"""Streaming throughput and event → credit latency of `fission worker` on the real servers,
as ratios against plain Kafka (produce → consume of the same events) measured in the same run.

    eval "$(scripts/services up)"; python -m bench.stream --events 40000 --rate 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import redis
from confluent_kafka import Consumer

from stream.produce import produce
from stream.simulate import SimulationParams, campaign_config, simulate
from stream.topics import Topics, ensure_topics

ROOT = Path(__file__).parent.parent
PARTITIONS = 4


def now_ms() -> int:
    return int(time.time() * 1000)


def restamped(events: list[bytes]) -> Iterator[bytes]:
    """Events whose ts is the moment they are produced, so latency is measured from event time."""
    for raw in events:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield raw
            continue
        if isinstance(event, dict) and "ts" in event:
            event["ts"] = now_ms()
        yield orjson.dumps(event)


def collect(bootstrap: str, topic: str, expected: int, timeout: float, field: str = "ts",
            arrivals: list[float] | None = None) -> list[float]:
    """Latency in seconds (arrival - ts) of every message, until `expected` arrived."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    while len(latencies) < expected and time.monotonic() < deadline:
        for message in consumer.consume(1000, timeout=0.2):
            if message.error():
                continue
            arrived = now_ms()
            if arrivals is not None:
                arrivals.append(time.monotonic())
            try:
                latencies.append((arrived - orjson.loads(message.value())[field]) / 1000)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                latencies.append(0.0)
    consumer.close()
    return latencies


def start_worker(name: str, campaigns: Path, bootstrap: str, redis_url: str, until_idle: float) -> subprocess.Popen:
    """`fission worker` with its own topics, key prefix and consumer group, all named `name`."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "worker", "--campaigns", str(campaigns), "--bootstrap", bootstrap,
         "--redis-url", redis_url, "--redis-prefix", name, "--topic-prefix", name, "--app-id", name,
         "--partitions", str(PARTITIONS), "--until-idle", str(until_idle), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=100)
    return q[49], q[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--rate", type=float, default=2000, help="events/s for the latency run")
    args = parser.parse_args()
    bootstrap = os.environ.get("FISSION_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    redis_url = os.environ.get("FISSION_REDIS_URL", "redis://127.0.0.1:16379/0")
    name = f"bench{now_ms()}"
    params = SimulationParams(max_events=args.events, seed=3, device_reuse_rate=0.0)
    doc = campaign_config(params)
    for campaign in doc["campaigns"]:
        campaign.pop("starts_at", None)
        campaign.pop("ends_at", None)
    campaigns = Path(f"/tmp/{name}.json")
    campaigns.write_bytes(orjson.dumps(doc))
    events = list(simulate(params))
    topics = Topics.with_prefix(name)
    ensure_topics(bootstrap, topics, PARTITIONS, 1)
    baseline_topic = Topics.with_prefix(name + "b")
    ensure_topics(bootstrap, baseline_topic, PARTITIONS, 1)

    # Baseline: plain Kafka, the same events at the same rate, produce -> consume.
    got: list[float] = []
    reader = threading.Thread(target=lambda: got.extend(collect(bootstrap, baseline_topic.events, len(events), 120)))
    reader.start()
    produce(bootstrap, baseline_topic.events, restamped(events), rate=args.rate)
    reader.join()
    kafka_p50, kafka_p99 = percentiles(got)

    worker = start_worker(name, campaigns, bootstrap, redis_url, until_idle=8)
    time.sleep(6)  # join the group and get partitions
    rewards: list[float] = []
    reader = threading.Thread(target=lambda: rewards.extend(collect(bootstrap, topics.outcomes, len(events), 300)))
    reader.start()
    started = time.monotonic()
    produce(bootstrap, topics.events, restamped(events), rate=args.rate)
    reader.join()
    latency_run = time.monotonic() - started
    p50, p99 = percentiles(rewards)
    worker.wait(timeout=300)

    # Throughput: a second worker over a backlog produced up front, timed from start to idle.
    name2 = name + "t"
    topics2 = Topics.with_prefix(name2)
    ensure_topics(bootstrap, topics2, PARTITIONS, 1)
    produce(bootstrap, topics2.events, events)
    started = time.monotonic()
    arrivals: list[float] = []
    reader = threading.Thread(target=lambda: collect(bootstrap, topics2.outcomes, len(events), 300, arrivals=arrivals))
    reader.start()
    backlog = start_worker(name2, campaigns, bootstrap, redis_url, until_idle=3)
    reader.join()
    elapsed = time.monotonic() - started
    steady = len(arrivals) / max(arrivals[-1] - arrivals[0], 1e-9)
    backlog.wait(timeout=300)
    plain_started = time.monotonic()
    collect(bootstrap, topics2.events, len(events), 120)
    plain = len(events) / (time.monotonic() - plain_started)

    client = redis.Redis.from_url(redis_url)
    for prefix in (name, name2):
        while keys := list(client.scan_iter(match=f"{prefix}:*", count=5000))[:5000]:
            client.delete(*keys)
    print(f"{len(events):,} events, {PARTITIONS} partitions, one worker process")
    print(f"latency run at {args.rate:,.0f} events/s ({latency_run:.1f}s): event -> outcome published "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; plain Kafka p50 {kafka_p50 * 1000:.1f} ms, "
          f"p99 {kafka_p99 * 1000:.1f} ms; ratio p50 {p50 / kafka_p50:.1f}x, p99 {p99 / kafka_p99:.1f}x")
    print(f"throughput over a backlog: {steady:,.0f} events/s first to last outcome "
          f"({len(events) / elapsed:,.0f} events/s including start-up and group join); "
          f"plain consumer {plain:,.0f} events/s; ratio {steady / plain:.2f}x")


if __name__ == "__main__":
    main()
