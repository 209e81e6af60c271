"""What only the Redis store has to prove: crash safety, fencing, slots, compact records."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from attribution.campaigns import load_campaigns
from attribution.engine import Engine, Message
from attribution.model import BOUND, ORGANIC, SEED, Credit, Order, Share, User, entry_id
from attribution.redis_store import (
    RedisStore,
    pack_order,
    pack_share,
    pack_user,
    unpack_order,
    unpack_share,
    unpack_user,
)
from attribution.store import EmbeddedStore
from stream.replay import read_messages

CASE = Path(__file__).parent / "conformance" / "11-generated-medium"


class Crash(Exception):
    pass


class CrashingStore(RedisStore):
    """Dies during the commit of batch `crash_at`: after the cross-slot effects (before the
    partition commit), or after the partition commit (before its outbox is applied)."""

    def __init__(self, *args, crash_at: int, after_commit: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at
        self.after_commit = after_commit
        self.commits = 0

    def commit(self, commit) -> None:
        self.commits += 1
        if self.commits != self.crash_at:
            super().commit(commit)
            return
        pipe = self.r.pipeline(transaction=False)
        self._effects(pipe, commit)
        if self.after_commit:
            self._partition_commit(pipe, commit, self._outbox_payload(commit))
        pipe.execute()
        raise Crash


def messages() -> list[Message]:
    return [m for batch, _ in read_messages(CASE / "events.jsonl", 10_000) for m in batch]


def run_all(engine: Engine, batch: list[Message], size: int = 40) -> None:
    for start in range(0, len(batch), size):
        engine.process(0, batch[start : start + size])


@pytest.fixture
def client(redis_url: str, redis_key_prefix: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "before-outbox"])
@pytest.mark.parametrize("crash_at", [1, 3, 7, 15])
def test_a_crash_inside_a_commit_then_a_restart_credits_nothing_twice_and_loses_nothing(
    client: redis.Redis, redis_key_prefix: str, crash_at: int, after_commit: bool
) -> None:
    campaigns = load_campaigns(CASE / "campaigns.yaml")
    reference = EmbeddedStore()
    run_all(Engine(campaigns, reference), messages())
    Engine(campaigns, reference).drain(0)

    crashing = CrashingStore(client, prefix=redis_key_prefix, buckets=64, crash_at=crash_at, after_commit=after_commit)
    with pytest.raises(Crash):
        run_all(Engine(campaigns, crashing), messages())
    restarted = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    position = restarted.position(0) or 0
    engine = Engine(campaigns, restarted)
    run_all(engine, [m for m in messages() if m.offset >= position])
    engine.drain(0)
    assert restarted.balances() == reference.balances()


def test_partition_commit_stores_the_position_after_the_batch(client: redis.Redis, redis_key_prefix: str) -> None:
    store = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    Engine(load_campaigns(CASE / "campaigns.yaml"), store).process(0, messages()[:25])
    assert store.position(0) == messages()[24].offset + 1


def test_a_fenced_out_owner_cannot_commit(client: redis.Redis, redis_key_prefix: str) -> None:
    campaigns = load_campaigns(CASE / "campaigns.yaml")
    zombie = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    zombie.acquire(0)
    owner = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    owner.acquire(0)
    Engine(campaigns, owner).process(0, messages()[:10])
    with pytest.raises(redis.ResponseError, match="FENCED"):
        Engine(campaigns, zombie).process(0, messages()[10:20])
    assert owner.position(0) == messages()[9].offset + 1


def test_every_lua_script_touches_one_cluster_slot(client: redis.Redis, redis_key_prefix: str) -> None:
    store = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    seen: list[list[str]] = []
    for name, script in list(store._scripts.items()):
        def recording(keys, args, client, _script=script):
            seen.append(list(keys))
            return _script(keys=keys, args=args, client=client)
        store._scripts[name] = recording
    engine = Engine(load_campaigns(CASE / "campaigns.yaml"), store)
    run_all(engine, messages())
    engine.drain(0)
    assert len(seen) > 100
    assert all(len({key_slot(k.encode()) for k in keys}) == 1 for keys in seen)


@pytest.mark.parametrize(
    ("user_id", "user"),
    [
        ("u1", User(BOUND, 1767225720000, "kol", 3, ("a", "b", "c"), 1767225720000, True)),
        ("u2", User(BOUND, 5, "deep-root", 7, ("a", "b"), 5, False)),
        ("用户|{kol}", User(SEED, 5, "用户|{kol}", 0, ())),
        ("a\"b", User(SEED, 5, "root 🚀", 2, ("x:y", "{z}"))),
        ("o", User(ORGANIC, 1767225720000)),
    ],
)
def test_user_records_round_trip_through_the_binary_codec(user_id: str, user: User) -> None:
    assert unpack_user(user_id, pack_user(user_id, user)) == user


def test_a_bound_user_record_is_compact() -> None:
    user = User(BOUND, 1767225720000, "u000012", 3, ("u000123", "u000045", "u000012"), 1767225720000, False)
    assert len(pack_user("u000456", user)) <= 36


def test_one_balance_is_readable_in_one_call_by_other_services(
    client: redis.Redis, redis_key_prefix: str, redis_url: str
) -> None:
    store = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    engine = Engine(load_campaigns(CASE / "campaigns.yaml"), store)
    run_all(engine, messages())
    engine.drain(0)
    everything = store.balances()
    reader = RedisStore.from_url(redis_url, prefix=redis_key_prefix, buckets=64)  # another service
    assert everything
    for campaign, by_user in everything.items():
        for user, amount in by_user.items():
            assert reader.balance(campaign, user) == amount
    assert reader.balance("spring", "nobody-here") == 0


@pytest.mark.parametrize("share", [
    Share("s1", "c", "kol", "e1", 1767225660000, "kol", 0, ("kol",), True),
    Share("分享:1 🚀", "c|x", "a\"b", "e{2}", 5, "deep-root", 7, ("a\"b", "x", "y"), False),
    Share("s3", "c", "amy", "e3", 9, "kol", 2, ("amy", "bob", "kol"), False),
])
def test_share_records_round_trip_through_the_binary_codec(share: Share) -> None:
    assert unpack_share(share.share_id, pack_share(share)) == share


@pytest.mark.parametrize("refunded_by", [None, "refund:1 {x}"])
def test_order_records_round_trip_and_derive_their_entry_ids(refunded_by: str | None) -> None:
    credits = tuple(Credit(entry_id("c", "e9", kind, level, who), who, amount, kind, level)
                    for who, amount, kind, level in [("amy", 250, "commission", 1), ("用户", 75, "commission", 2),
                                                     ("amy", 500, "first_purchase", 0)])
    order = Order("c", "o|1", "bob", "e9", credits, refunded_by)
    assert unpack_order("c", "o|1", pack_order(order)) == order


def test_claim_scripts_read_the_owner_of_binary_records(client: redis.Redis, redis_key_prefix: str) -> None:
    store = RedisStore(client, prefix=redis_key_prefix, buckets=64)
    share = Share("X", "c", "kol", "ev 🚀", 1, "kol", 0, ("kol",), False)
    client.hset(store._global("s", "X"), "X", pack_share(share))
    assert store.fetch(0, [("claim_share", "X", "ev 🚀"), ("claim_share", "X", "other")]) == {
        ("claim_share", "X", "ev 🚀"): True, ("claim_share", "X", "other"): False}
