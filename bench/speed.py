"""Engine throughput on one core, embedded and Redis, as ratios against baselines measured in
the same run: parsing alone (the floor of any engine), and a raw pipelined Redis write of the
same number of keys (the floor of any Redis-backed one).

    python -m bench.speed --users 100000   (Redis from FISSION_REDIS_URL)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import redis

from attribution.campaigns import parse_campaigns
from attribution.engine import Engine, Message
from attribution.events import parse_event
from attribution.redis_store import RedisStore
from attribution.store import EmbeddedStore, Store
from bench.workload import CAMPAIGNS, tree_events

BATCH = 2000


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def engine_run(store: Store, events: list[bytes]) -> dict:
    engine = Engine(parse_campaigns(CAMPAIGNS), store)
    latencies = []
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        t = time.perf_counter()
        engine.process(0, [Message(e) for e in events[start : start + BATCH]])
        latencies.append(time.perf_counter() - t)
    engine.drain(0)
    elapsed = time.perf_counter() - started
    return {"eps": len(events) / elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def parse_baseline(events: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in events:
        parse_event(raw)
    return len(events) / (time.perf_counter() - started)


def redis_baseline(client: redis.Redis, prefix: str, events: list[bytes]) -> float:
    """Raw pipelined HSETs, one per event, in batches: what Redis costs with no logic at all."""
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        pipe = client.pipeline(transaction=False)
        for i, raw in enumerate(events[start : start + BATCH]):
            pipe.hset(f"{prefix}:raw:{{{(start + i) % 16384}}}", str(start + i), raw[:40])
        pipe.execute()
    return len(events) / (time.perf_counter() - started)


def cleanup(client: redis.Redis, prefix: str) -> None:
    while keys := list(client.scan_iter(match=f"{prefix}:*", count=5000))[:5000]:
        client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--redis-url", default=os.environ.get("FISSION_REDIS_URL", "redis://127.0.0.1:16379/0"))
    args = parser.parse_args()
    events = list(tree_events(args.users))
    parse_eps = parse_baseline(events)
    embedded = engine_run(EmbeddedStore(), events)
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"speed{int(time.time())}"
    try:
        raw_eps = redis_baseline(client, prefix + "b", events)
        on_redis = engine_run(RedisStore(client, prefix=prefix), events)
    finally:
        cleanup(client, prefix)
        cleanup(client, prefix + "b")
    print(f"{len(events):,} events, batches of {BATCH}")
    print(f"baseline parse+validate     {parse_eps:12,.0f} events/s")
    print(f"baseline raw Redis pipeline {raw_eps:12,.0f} events/s")
    print(f"engine, embedded store      {embedded['eps']:12,.0f} events/s  = "
          f"{embedded['eps'] / parse_eps:.2f} x parse;"
          f"  batch p50 {embedded['p50'] * 1000:.1f} ms, p99 {embedded['p99'] * 1000:.1f} ms")
    print(f"engine, Redis store         {on_redis['eps']:12,.0f} events/s  = "
          f"{on_redis['eps'] / raw_eps:.2f} x raw Redis;"
          f"  batch p50 {on_redis['p50'] * 1000:.1f} ms, p99 {on_redis['p99'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
