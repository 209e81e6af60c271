"""SPEC 4.8: for any interleaving of the users' event sequences, the results are identical.

Event logs are generated as one causal script (timestamps increase along it, a scan names
only a share made earlier in the script or one that never exists), so no cyclic waits
arise; each user's events keep their script order, and the users are interleaved at random.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attribution.campaigns import Campaign
from attribution.engine import Engine, Message
from attribution.store import EmbeddedStore, Store
from tests.conftest import MINUTE, T0, campaigns_of

USERS = ["ann", "bo", "cy", "dee", "eve", "f|{x}", "g:1", "h 🚀"]
NO_LIMITS: dict = {"limits": {}}


@st.composite
def scripts(draw: st.DrawFn) -> list[dict]:
    """A causal script of events over a few users, with some redeliveries and bad lines."""
    users = draw(st.lists(st.sampled_from(USERS), min_size=2, max_size=6, unique=True))
    steps = draw(st.integers(min_value=4, max_value=40))
    shares: list[str] = []
    orders: dict[str, list[str]] = {u: [] for u in users}
    events: list[dict] = []
    ts = T0
    for step in range(steps):
        ts += draw(st.sampled_from([1, 5, 60, 3 * 24 * 60])) * MINUTE
        user = draw(st.sampled_from(users))
        kind = draw(st.sampled_from(["share", "share", "scan", "scan", "scan", "purchase", "purchase", "refund"]))
        event = {"event_id": f"e{step}", "type": kind, "campaign": "c", "user_id": user, "ts": ts}
        if kind == "share":
            event["share_id"] = f"s{step}"
            event["group"] = draw(st.booleans())
            shares.append(event["share_id"])
        elif kind == "scan":
            event["share_id"] = draw(st.sampled_from(shares + ["never"])) if shares else "never"
        elif kind == "purchase":
            event["order_id"] = f"o{step}"
            event["amount"] = draw(st.sampled_from([500, 1000, 4000, 12000]))
            if shares and draw(st.booleans()):
                event["group_id"] = draw(st.sampled_from(shares + ["never"]))
            orders[user].append(event["order_id"])
        else:
            event["order_id"] = draw(st.sampled_from(orders[user] + ["nope"]))
        events.append(event)
        if draw(st.integers(0, 9)) == 0:
            events.append(dict(event))
    return events


def interleave(events: list[dict], seed: int) -> list[dict]:
    """A random merge of the users' sequences, each kept in its own order."""
    by_user: dict[str, list[dict]] = {}
    for event in events:
        by_user.setdefault(event["user_id"], []).append(event)
    rng = random.Random(seed)
    cursors = {u: 0 for u in by_user}
    merged: list[dict] = []
    while cursors:
        user = rng.choice(sorted(cursors))
        merged.append(by_user[user][cursors[user]])
        cursors[user] += 1
        if cursors[user] == len(by_user[user]):
            del cursors[user]
    return merged


def run(campaigns: dict[str, Campaign], store: Store, events: list[dict], batch: int) -> dict[str, Counter]:
    engine = Engine(campaigns, store)
    results = []
    for start in range(0, len(events), batch):
        results.append(engine.process(0, [Message(orjson.dumps(e)) for e in events[start : start + batch]]))
    results.append(engine.drain(0))
    outcomes = Counter(
        json.dumps([o.event_id, o.outcome, o.reason, o.parent, o.root, o.depth]) for r in results for o in r.outcomes
    )
    ledger = Counter(
        json.dumps([e.campaign, e.beneficiary, e.amount, e.kind, e.level, e.source_event_id])
        for r in results
        for e in r.entries
    )
    nodes = {(n.campaign, n.user_id): n for r in results for n in r.nodes}
    return {
        "outcomes": outcomes,
        "ledger": ledger,
        "nodes": Counter(json.dumps(n.to_dict(), sort_keys=True) for n in nodes.values()),
        "balances": Counter({json.dumps(k): v for k, v in store.balances().get("c", {}).items() if v}),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts(), seeds=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
       batches=st.tuples(st.integers(1, 7), st.integers(1, 50)))
def test_any_interleaving_gives_identical_outcomes_nodes_ledger_and_balances(
    store_factory: Callable[[], Store], script: list[dict], seeds: tuple[int, int], batches: tuple[int, int]
) -> None:
    campaigns = campaigns_of(NO_LIMITS)
    reference = run(campaigns, EmbeddedStore(), interleave(script, seeds[0]), batches[0])
    other = run(campaigns, store_factory(), interleave(script, seeds[1]), batches[1])
    assert other == reference


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts(), seed=st.integers(0, 10**6), budget=st.integers(0, 3000))
def test_order_dependent_limits_keep_their_invariants(
    store_factory: Callable[[], Store], script: list[dict], seed: int, budget: int
) -> None:
    campaigns = campaigns_of({"limits": {"budget": budget, "max_binds_per_device": 1}})
    for event in script:
        if event["type"] == "scan":
            event["device_id"] = "shared-phone"
    store = store_factory()
    engine = Engine(campaigns, store)
    events = interleave(script, seed)
    results = [engine.process(0, [Message(orjson.dumps(e)) for e in events]), engine.drain(0)]
    entries = [e for r in results for e in r.entries]
    positive = sum(e.amount for e in entries if e.amount > 0)
    clawed = -sum(e.amount for e in entries if e.amount < 0)
    assert positive - clawed <= budget
    bound = [o for r in results for o in r.outcomes if o.outcome == "bound"]
    assert len({o.user_id for o in bound}) <= 1

