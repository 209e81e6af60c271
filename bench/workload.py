"""A synthetic referral tree for benchmarks: seeds share, every newcomer scans a recent share,
some newcomers share in turn, some buy. Deterministic for a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

T0 = 1769000000000  # inside the bench campaign


def tree_events(users: int, seed: int = 7, share_rate: float = 0.3, purchase_rate: float = 0.2) -> Iterator[bytes]:
    rng = random.Random(seed)
    shares: list[str] = []
    seeds = max(1, users // 100)
    n = 0
    ts = T0
    for s in range(seeds):
        n += 1
        shares.append(f"k{s}")
        yield orjson.dumps({"event_id": f"e{n}", "type": "share", "campaign": "bench", "user_id": f"kol{s}",
                            "ts": ts, "share_id": f"k{s}"})
    for u in range(users - seeds):
        ts += 1
        user = f"u{u:07d}"
        window = shares[-5000:]
        n += 1
        yield orjson.dumps({"event_id": f"e{n}", "type": "scan", "campaign": "bench", "user_id": user, "ts": ts,
                            "share_id": rng.choice(window), "device_id": f"d{u}"})
        if rng.random() < share_rate:
            n += 1
            shares.append(f"s{u}")
            yield orjson.dumps({"event_id": f"e{n}", "type": "share", "campaign": "bench", "user_id": user,
                                "ts": ts, "share_id": f"s{u}"})
        if rng.random() < purchase_rate:
            n += 1
            yield orjson.dumps({"event_id": f"e{n}", "type": "purchase", "campaign": "bench", "user_id": user,
                                "ts": ts, "order_id": f"o{u}", "amount": rng.choice([990, 4900, 12900])})


CAMPAIGNS = {
    "campaigns": [
        {
            "id": "bench",
            "share_ttl": "30d",
            "attribution_window": "7d",
            "rewards": {
                "bind": {"scanner": 100, "sharer": 50},
                "first_purchase": {"sharer": 500, "min_amount": 1000},
                "commission_bps": [1000, 300, 100],
                "commission_cap": 5000,
            },
            "limits": {"max_binds_per_device": 3},
        }
    ]
}
