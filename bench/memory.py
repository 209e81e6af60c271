"""Redis bytes per bound user: bind N users through the engine into a fresh key prefix and
read Redis's own accounting (INFO used_memory before/after, MEMORY USAGE per key family).

    python -m bench.memory --users 1000000   (needs FISSION_REDIS_URL, e.g. from scripts/services up)
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import redis

from attribution.campaigns import parse_campaigns
from attribution.engine import Engine, Message
from attribution.redis_store import RedisStore
from bench.workload import CAMPAIGNS, tree_events

BATCH = 5000


def family(key: bytes, prefix: str) -> str:
    """`fx:{p0}:u:17` → `{p}:u`, `fx:bal:{3}` → `bal`: the key kinds of the layout."""
    rest = key.decode()[len(prefix) + 1 :]
    parts = rest.split(":")
    return f"{{p}}:{parts[1]}" if parts[0].startswith("{p") else parts[0]


def measure(url: str, users: int, buckets: int) -> dict:
    client = redis.Redis.from_url(url)
    prefix = f"bench{int(time.time())}"
    store = RedisStore(client, prefix=prefix, buckets=buckets)
    engine = Engine(parse_campaigns(CAMPAIGNS), store)
    before = client.info("memory")["used_memory"]
    started = time.perf_counter()
    batch: list[Message] = []
    events = bound = 0
    for raw in tree_events(users):
        batch.append(Message(raw))
        if len(batch) == BATCH:
            result = engine.process(0, batch)
            bound += sum(o.outcome == "bound" for o in result.outcomes)
            events += len(batch)
            batch = []
    result = engine.process(0, batch)
    bound += sum(o.outcome == "bound" for o in result.outcomes)
    events += len(batch)
    elapsed = time.perf_counter() - started
    after = client.info("memory")["used_memory"]
    by_family: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        usage = client.memory_usage(key, samples=0) or 0
        entry = by_family[family(key, prefix)]
        entry[0] += 1
        entry[1] += usage
    encodings = {client.object("encoding", k) for k in client.scan_iter(match=f"{prefix}:{{p0}}:u:*", count=5000)}
    for keys in iter(lambda: list(client.scan_iter(match=f"{prefix}:*", count=5000))[:5000], []):
        client.delete(*keys)
    return {
        "users": users,
        "bound": bound,
        "events": events,
        "seconds": elapsed,
        "bytes_per_bound_user": (after - before) / max(bound, 1),
        "by_family": {name: (count, total / max(bound, 1)) for name, (count, total) in sorted(by_family.items())},
        "user_hash_encodings": sorted(e.decode() if isinstance(e, bytes) else str(e) for e in encodings),
    }


def report(result: dict) -> str:
    lines = [
        f"bound users: {result['bound']:,} of {result['users']:,} ({result['events']:,} events in "
        f"{result['seconds']:.1f}s, {result['events'] / result['seconds']:,.0f} events/s)",
        f"Redis used_memory per bound user: {result['bytes_per_bound_user']:.1f} bytes",
        f"user hashes encoded as: {', '.join(result['user_hash_encodings'])}",
        "per key family (keys, MEMORY USAGE bytes per bound user):",
    ]
    for name, (count, per_user) in result["by_family"].items():
        lines.append(f"  {name:<10} {count:>8,} keys {per_user:8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=16384)
    parser.add_argument("--redis-url", default=os.environ.get("FISSION_REDIS_URL", "redis://127.0.0.1:16379/0"))
    args = parser.parse_args()
    print(report(measure(args.redis_url, args.users, args.buckets)))


if __name__ == "__main__":
    main()
