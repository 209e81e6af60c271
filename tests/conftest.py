"""Shared fixtures: the same behaviour tests run on every store (parametrised), not two suites."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
import redis

from attribution.campaigns import Campaign, parse_campaigns
from attribution.engine import BatchResult, Engine, Message, Settings
from attribution.redis_store import RedisStore
from attribution.store import EmbeddedStore, Store

pytest_plugins = ["tests.servers"]

BASE_CAMPAIGN = {
    "id": "c",
    "starts_at": "2026-01-01T00:00:00Z",
    "ends_at": "2026-02-01T00:00:00Z",
    "share_ttl": "3d",
    "attribution_window": "2d",
    "rewards": {
        "bind": {"scanner": 100, "sharer": 20},
        "first_purchase": {"sharer": 500, "min_amount": 1000},
        "commission_bps": [1000, 300],
        "commission_cap": 800,
    },
    "limits": {"max_binds_per_device": 2},
    "group_buy": {"size": 3, "window": "1d", "initiator_reward": 300},
}
T0 = 1767225600000  # 2026-01-01T00:00:00Z
MINUTE = 60_000


def campaigns_of(*overrides: dict) -> dict[str, Campaign]:
    """Campaign `c` (as in the shared conformance cases) changed by each override, plus `other`."""
    docs = []
    for override in overrides or ({},):
        doc = orjson.loads(orjson.dumps(BASE_CAMPAIGN))
        for key, value in override.items():
            doc[key] = value
        docs.append(doc)
    docs.append({"id": "other", "rewards": {"bind": {"scanner": 10, "sharer": 0}, "commission_bps": [500]}})
    return parse_campaigns({"campaigns": docs})


def ev(event_id: str, kind: str, user: str, minute: int, campaign: str = "c", **fields) -> dict:
    """An event of campaign `c` at T0 + `minute` minutes."""
    return {"event_id": event_id, "type": kind, "campaign": campaign, "user_id": user,
            "ts": T0 + minute * MINUTE, **fields}


@pytest.fixture(params=["embedded", "redis"])
def store_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """Makes empty stores of one kind; Redis ones get a key prefix no other test uses."""
    if request.param == "embedded":
        yield EmbeddedStore
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("unique_prefix")
    client = redis.Redis.from_url(url)
    made: list[str] = []

    def make() -> Store:
        name = f"{prefix}{len(made)}"
        made.append(name)
        return RedisStore(client, prefix=name, buckets=64)

    yield make
    for name in made:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def store(store_factory: Callable[[], Store]) -> Store:
    return store_factory()


class Run:
    """The engine over one store, fed event dicts (or raw bytes) in batches, results gathered."""

    def __init__(self, campaigns: dict[str, Campaign], store: Store, settings: Settings | None = None) -> None:
        self.engine = Engine(campaigns, store, settings)
        self.store = store
        self.results: list[BatchResult] = []

    def feed(self, *events: dict | bytes, partition: int = 0, now: int | None = None) -> BatchResult:
        messages = [Message(e if isinstance(e, bytes) else orjson.dumps(e)) for e in events]
        result = self.engine.process(partition, messages, now=now)
        self.results.append(result)
        return result

    def drain(self, partition: int = 0) -> BatchResult:
        result = self.engine.drain(partition)
        self.results.append(result)
        return result

    def outcome(self, event_id: str) -> dict:
        found = [o.to_dict() for r in self.results for o in r.outcomes if o.event_id == event_id]
        assert found, f"no outcome for {event_id}"
        return found[-1]

    def ledger(self) -> list[tuple]:
        return [(e.beneficiary, e.amount, e.kind, e.level, e.source_event_id) for r in self.results for e in r.entries]

    def balances(self) -> dict[str, int]:
        return self.store.balances().get("c", {})


@pytest.fixture
def run_factory(store_factory: Callable[[], Store]) -> Callable[..., Run]:
    """`run_factory(campaigns=None, settings=None)` → a `Run` on a fresh store of the parametrised kind."""

    def make(campaigns: dict[str, Campaign] | None = None, settings: Settings | None = None) -> Run:
        return Run(campaigns or campaigns_of(), store_factory(), settings)

    return make
