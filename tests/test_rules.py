"""The rules of SPEC 3-5, one behaviour per test, each run on every store (embedded and Redis)."""

from __future__ import annotations

import orjson

from attribution.engine import BatchResult, Settings
from attribution.model import LedgerEntry, Node
from tests.conftest import BASE_CAMPAIGN, MINUTE, T0, Run, campaigns_of, ev

DAY = 24 * 60  # in minutes, the unit of `ev`
NO_LINEAGE = (None, None, None)


# -- helpers ---------------------------------------------------------------------------


def rewards(**changes) -> dict:
    """The base campaign's `rewards` section with some keys replaced."""
    return {**BASE_CAMPAIGN["rewards"], **changes}


def credits(*results: BatchResult) -> list[tuple]:
    """(beneficiary, amount, kind, level, source_event_id) of the batches' entries, sorted."""
    return sorted((e.beneficiary, e.amount, e.kind, e.level, e.source_event_id) for r in results for e in r.entries)


def entries(run: Run) -> list[LedgerEntry]:
    return [e for r in run.results for e in r.entries]


def verdict(run: Run, event_id: str) -> tuple[str, str | None]:
    found = run.outcome(event_id)
    return found["outcome"], found["reason"]


def lineage(run: Run, event_id: str) -> tuple:
    found = run.outcome(event_id)
    return found["parent"], found["root"], found["depth"]


def reported(run: Run) -> list[str]:
    """Event ids that have an outcome so far, in order."""
    return [o.event_id for r in run.results for o in r.outcomes]


def dead(run: Run) -> list[tuple[bytes, str]]:
    return [(d.raw, d.reason) for r in run.results for d in r.dead_letters]


def node(run: Run, user: str, campaign: str = "c") -> Node | None:
    found = [n for r in run.results for n in r.nodes if (n.campaign, n.user_id) == (campaign, user)]
    return found[-1] if found else None


def nonzero(balances: dict[str, int]) -> dict[str, int]:
    return {user: amount for user, amount in balances.items() if amount}


def tick(run: Run, now: int | None, partition: int = 0) -> BatchResult:
    result = run.engine.tick(partition, now=now)
    run.results.append(result)
    return result


def chain(*users: str, start: int = 1, campaign: str = "c") -> list[dict]:
    """users[0] shares `x-<user>`; each next user scans the previous one's share, then shares its own."""
    events = [ev(f"share-{users[0]}", "share", users[0], start, campaign, share_id=f"x-{users[0]}")]
    for i, user in enumerate(users[1:], start=1):
        minute = start + 2 * i - 1
        events.append(ev(f"scan-{user}", "scan", user, minute, campaign, share_id=f"x-{users[i - 1]}"))
        events.append(ev(f"share-{user}", "share", user, minute + 1, campaign, share_id=f"x-{user}"))
    return events


def bound_at(users: tuple[str, ...], user: str, start: int = 1) -> int:
    """Event time at which `chain(*users)` binds `user`."""
    return T0 + (start + 2 * users.index(user) - 1) * MINUTE


# -- 4.1 share -------------------------------------------------------------------------


def test_share_by_unknown_user_makes_a_seed(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X", channel="wechat"))
    assert verdict(run, "k1") == ("shared", None)
    assert lineage(run, "k1") == (None, "kol", 0)
    seed = node(run, "kol")
    assert (seed.state, seed.parent, seed.root, seed.depth, seed.entered_at) == ("seed", None, "kol", 0, T0 + MINUTE)
    assert run.ledger() == []


def test_seed_sharing_again_stays_the_same_seed(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("k2", "share", "kol", 5, share_id="Y"),
             ev("a1", "scan", "amy", 6, share_id="Y"))
    assert verdict(run, "k2") == ("shared", None)
    assert node(run, "kol").entered_at == T0 + MINUTE
    assert lineage(run, "a1") == ("kol", "kol", 1)


def test_share_of_existing_share_id_is_rejected_duplicate_share_id(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    run.feed(ev("a1", "share", "amy", 2, share_id="X"), ev("k2", "share", "kol", 3, share_id="X"))
    assert verdict(run, "a1") == ("rejected", "duplicate_share_id")
    assert verdict(run, "k2") == ("rejected", "duplicate_share_id")
    assert lineage(run, "a1") == NO_LINEAGE  # the rejection left amy unknown ...
    assert node(run, "amy") is None
    run.feed(ev("a2", "scan", "amy", 4, share_id="X"))  # ... so she can still be referred, by X's owner
    assert (verdict(run, "a2"), lineage(run, "a2")) == (("bound", None), ("kol", "kol", 1))
    assert {reason for _, reason in dead(run)} == {"duplicate_share_id"}


def test_share_id_is_unique_across_campaigns(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "share", "amy", 2, "other", share_id="X"))
    assert verdict(run, "a1") == ("rejected", "duplicate_share_id")
    assert lineage(run, "a1") == NO_LINEAGE
    assert node(run, "amy", "other") is None


# -- 4.2 scan --------------------------------------------------------------------------


def test_scan_binds_unknown_user_with_two_sided_reward(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    result = run.feed(ev("a1", "scan", "amy", 2, share_id="X", device_id="d1", ip="10.0.0.1"))
    assert verdict(run, "a1") == ("bound", None)
    assert lineage(run, "a1") == ("kol", "kol", 1)
    assert credits(result) == [("amy", 100, "bind_scanner", 0, "a1"), ("kol", 20, "bind_sharer", 0, "a1")]
    assert {(e.campaign, e.source_user, e.ts) for e in result.entries} == {("c", "amy", T0 + 2 * MINUTE)}
    assert run.balances() == {"amy": 100, "kol": 20}
    amy = node(run, "amy")
    assert (amy.state, amy.parent, amy.root, amy.depth, amy.entered_at) == ("bound", "kol", "kol", 1, T0 + 2 * MINUTE)


def test_zero_bind_reward_makes_no_ledger_entry(run_factory) -> None:
    run = run_factory(campaigns_of({"rewards": rewards(bind={"scanner": 0, "sharer": 20})}))
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "scan", "amy", 2, share_id="X"),
             # campaign `other` pays the scanner 10 and the sharer 0
             ev("k2", "share", "kol", 1, "other", share_id="Y"), ev("a2", "scan", "amy", 2, "other", share_id="Y"))
    assert (verdict(run, "a1"), verdict(run, "a2")) == (("bound", None), ("bound", None))
    assert sorted(run.ledger()) == [("amy", 10, "bind_scanner", 0, "a2"), ("kol", 20, "bind_sharer", 0, "a1")]
    assert run.balances() == {"kol": 20}
    assert run.store.balances()["other"] == {"amy": 10}


def test_scan_before_its_share_waits_then_binds(run_factory) -> None:
    run = run_factory()
    early = run.feed(ev("a1", "scan", "amy", 2, share_id="X"))
    assert (early.outcomes, early.entries, early.dead_letters) == ([], [], [])
    assert run.engine.waiting(0) == 1
    late = run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    assert [(o.event_id, o.outcome) for o in late.outcomes] == [("k1", "shared"), ("a1", "bound")]
    assert lineage(run, "a1") == ("kol", "kol", 1)
    assert credits(late) == [("amy", 100, "bind_scanner", 0, "a1"), ("kol", 20, "bind_sharer", 0, "a1")]
    assert run.engine.waiting(0) == 0


def test_scan_and_its_later_share_in_one_batch_binds(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "scan", "amy", 2, share_id="X"), ev("k1", "share", "kol", 1, share_id="X"))
    assert (verdict(run, "a1"), lineage(run, "a1")) == (("bound", None), ("kol", "kol", 1))
    assert run.engine.waiting(0) == 0


def test_share_recorded_on_another_partition_releases_the_wait(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "scan", "amy", 2, share_id="X"), partition=0)
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), partition=1)
    assert "a1" not in reported(run)
    tick(run, now=None)  # a partition looks for awaited shares other partitions recorded
    assert (verdict(run, "a1"), lineage(run, "a1")) == (("bound", None), ("kol", "kol", 1))


def test_events_behind_a_waiting_scan_keep_the_users_order(run_factory) -> None:
    run = run_factory()
    first = run.feed(
        ev("a1", "scan", "amy", 2, share_id="X"),
        ev("a2", "purchase", "amy", 3, order_id="o1", amount=2000),  # would be organic if run before the bind
        ev("b1", "share", "bob", 3, share_id="B"),  # another user is not held up
    )
    assert [o.event_id for o in first.outcomes] == ["b1"]
    second = run.feed(ev("a3", "share", "amy", 4, share_id="A"))  # a later batch still queues behind
    assert second.outcomes == []
    assert run.engine.waiting(0) == 3
    released = run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    assert [(o.event_id, o.outcome) for o in released.outcomes if o.user_id == "amy"] == [
        ("a1", "bound"), ("a2", "purchase_attributed"), ("a3", "shared")]
    assert credits(released) == [("amy", 100, "bind_scanner", 0, "a1"), ("kol", 20, "bind_sharer", 0, "a1"),
                                 ("kol", 200, "commission", 1, "a2"), ("kol", 500, "first_purchase", 0, "a2")]
    assert lineage(run, "a3") == ("kol", "kol", 1)
    run.feed(ev("c1", "scan", "cat", 5, share_id="A"))
    assert lineage(run, "c1") == ("amy", "kol", 2)
    assert run.engine.waiting(0) == 0


def test_scan_of_never_recorded_share_is_rejected_unknown_share_at_drain(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "scan", "amy", 2, share_id="ghost"), ev("a2", "purchase", "amy", 3, order_id="o1", amount=50))
    assert reported(run) == []
    drained = run.drain()
    assert verdict(run, "a1") == ("rejected", "unknown_share")
    assert lineage(run, "a1") == NO_LINEAGE
    assert verdict(run, "a2") == ("purchase_unattributed", None)  # released behind it
    assert [d.reason for d in drained.dead_letters] == ["unknown_share"]
    assert orjson.loads(drained.dead_letters[0].raw)["event_id"] == "a1"
    assert node(run, "amy").state == "organic"
    assert run.engine.waiting(0) == 0


def test_dead_letter_of_a_waited_event_carries_its_raw_bytes(run_factory) -> None:
    run = run_factory()
    raw = (b'{ "event_id": "a1", "type": "scan", "campaign": "c", "user_id": "amy", "ts": %d, "share_id": "ghost",'
           b' "utm": "poster-7" }') % (T0 + MINUTE)
    run.feed(raw)
    drained = run.drain()
    assert [(d.raw, d.reason) for d in drained.dead_letters] == [(raw, "unknown_share")]


def test_drain_ends_hopeless_waits_first_so_a_share_stuck_behind_one_still_binds(run_factory) -> None:
    run = run_factory()
    run.feed(
        ev("a1", "scan", "amy", 1, share_id="ghost"),  # never recorded
        ev("a2", "share", "amy", 2, share_id="A"),  # stuck behind a1
        ev("b1", "scan", "bob", 3, share_id="A"),  # waits for a2
    )
    assert run.engine.waiting(0) == 3
    run.drain()
    assert verdict(run, "a1") == ("rejected", "unknown_share")
    assert (verdict(run, "a2"), lineage(run, "a2")) == (("shared", None), (None, "amy", 0))
    assert (verdict(run, "b1"), lineage(run, "b1")) == (("bound", None), ("amy", "amy", 1))


def test_campaign_mismatch(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "scan", "amy", 2, "other", share_id="X"))
    assert verdict(run, "a1") == ("rejected", "campaign_mismatch")
    assert lineage(run, "a1") == NO_LINEAGE
    assert node(run, "amy", "other") is None
    assert run.ledger() == []
    assert [reason for _, reason in dead(run)] == ["campaign_mismatch"]


def test_share_expired_before_share_ts(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 100, share_id="X"), ev("a1", "scan", "amy", 99, share_id="X"),
             ev("b1", "scan", "bob", 100, share_id="X"))
    assert verdict(run, "a1") == ("rejected", "share_expired")
    assert node(run, "amy") is None
    assert verdict(run, "b1") == ("bound", None)  # the share's own ts is fine
    assert sorted(run.balances()) == ["bob", "kol"]


def test_share_expired_after_ttl(run_factory) -> None:
    run = run_factory()
    share_ts = T0 + MINUTE
    run.feed(ev("k1", "share", "kol", 1, share_id="X"),
             ev("a1", "scan", "amy", 0, share_id="X", ts=share_ts + 3 * DAY * MINUTE + 1))
    assert verdict(run, "a1") == ("rejected", "share_expired")
    assert lineage(run, "a1") == NO_LINEAGE
    assert run.ledger() == []


def test_scan_exactly_at_ttl_still_binds(run_factory) -> None:
    run = run_factory()
    share_ts = T0 + MINUTE
    run.feed(ev("k1", "share", "kol", 1, share_id="X"),
             ev("a1", "scan", "amy", 0, share_id="X", ts=share_ts + 3 * DAY * MINUTE))
    assert verdict(run, "a1") == ("bound", None)
    assert node(run, "amy").entered_at == share_ts + 3 * DAY * MINUTE


def test_self_referral(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("k2", "scan", "kol", 2, share_id="X", device_id="d1"))
    assert verdict(run, "k2") == ("rejected", "self_referral")
    assert lineage(run, "k2") == (None, "kol", 0)
    assert node(run, "kol").state == "seed"
    assert run.ledger() == []
    assert [reason for _, reason in dead(run)] == ["self_referral"]


def test_repeat_scan_changes_nothing(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("b1", "share", "bob", 1, share_id="Y"),
             ev("a1", "scan", "amy", 2, share_id="X"))
    before = run.ledger()
    run.feed(ev("a2", "scan", "amy", 3, share_id="Y"),  # bound: never re-bound
             ev("a3", "scan", "amy", 4, share_id="X"),  # same code again
             ev("k2", "scan", "kol", 5, share_id="Y"))  # a seed does not become bound
    assert [verdict(run, e) for e in ("a2", "a3", "k2")] == [("repeat_scan", None)] * 3
    assert lineage(run, "a2") == ("kol", "kol", 1)
    assert lineage(run, "k2") == (None, "kol", 0)
    assert run.ledger() == before
    assert dead(run) == []  # a repeat scan is counted, not rejected


def test_organic_user_scan_is_repeat_scan(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "purchase", "amy", 1, order_id="o1", amount=2000), ev("k1", "share", "kol", 2, share_id="X"),
             ev("a2", "scan", "amy", 3, share_id="X"), ev("a3", "purchase", "amy", 4, order_id="o2", amount=2000))
    assert verdict(run, "a2") == ("repeat_scan", None)
    assert lineage(run, "a2") == NO_LINEAGE
    assert verdict(run, "a3") == ("purchase_unattributed", None)
    assert run.ledger() == []


def test_device_limit(run_factory) -> None:
    run = run_factory()  # max_binds_per_device: 2
    run.feed(
        ev("k1", "share", "kol", 1, share_id="X"),
        ev("a1", "scan", "amy", 2, share_id="X", device_id="d1"),
        ev("b1", "scan", "bob", 3, share_id="X", device_id="d1"),
        ev("c1", "scan", "cat", 4, share_id="X", device_id="d1"),
        ev("d1", "scan", "dan", 5, share_id="X"),  # no device, no limit
    )
    assert [verdict(run, e)[0] for e in ("a1", "b1", "d1")] == ["bound"] * 3
    assert verdict(run, "c1") == ("rejected", "device_limit")
    assert lineage(run, "c1") == NO_LINEAGE
    assert "cat" not in run.balances()
    assert [reason for _, reason in dead(run)] == ["device_limit"]
    run.feed(ev("c2", "scan", "cat", 6, share_id="X", device_id="d2"))  # the rejection bound nothing
    assert lineage(run, "c2") == ("kol", "kol", 1)


def test_device_limit_counts_users_not_scans(run_factory) -> None:
    run = run_factory()  # max_binds_per_device: 2
    run.feed(
        ev("k1", "share", "kol", 10, share_id="X"),
        ev("k2", "scan", "kol", 11, share_id="X", device_id="d1"),  # self_referral: binds nobody
        ev("a1", "scan", "amy", 5, share_id="X", device_id="d1"),  # share_expired: binds nobody
        ev("a2", "scan", "amy", 12, share_id="X", device_id="d1"),  # first user bound on d1
        ev("a3", "scan", "amy", 13, share_id="X", device_id="d1"),  # repeat_scan: same user
        ev("b1", "scan", "bob", 14, share_id="X", device_id="d1"),  # second user
        ev("c1", "scan", "cat", 15, share_id="X", device_id="d1"),  # third user: over the limit
    )
    assert [verdict(run, e)[0] for e in ("k2", "a1", "a2", "a3", "b1")] == [
        "rejected", "rejected", "bound", "repeat_scan", "bound"]
    assert verdict(run, "c1") == ("rejected", "device_limit")


def test_device_limit_is_per_campaign(run_factory) -> None:
    run = run_factory(campaigns_of({}, {"id": "c2"}))
    run.feed(
        ev("k1", "share", "kol", 1, share_id="X"),
        ev("a1", "scan", "amy", 2, share_id="X", device_id="d1"),
        ev("b1", "scan", "bob", 3, share_id="X", device_id="d1"),
        ev("k2", "share", "kol", 4, "c2", share_id="Y"),
        ev("c1", "scan", "cat", 5, "c2", share_id="Y", device_id="d1"),
    )
    assert verdict(run, "c1") == ("bound", None)


# -- lineage ---------------------------------------------------------------------------


def test_lineage_snapshot_taken_at_share_time(run_factory) -> None:
    run = run_factory()
    run.feed(
        ev("n1", "share", "ann", 1, share_id="A"),
        ev("s1", "scan", "sam", 2, share_id="A"),
        ev("s2", "share", "sam", 3, share_id="S"),  # a bound user's share carries [sam, ann]
        ev("t1", "share", "tom", 4, share_id="T"),  # tom shares as a seed ...
        ev("t2", "scan", "tom", 5, share_id="A"),  # ... so a later scan does not move him under ann
        ev("b1", "scan", "bob", 6, share_id="S"),
        ev("c1", "scan", "cat", 7, share_id="T"),
        ev("b2", "purchase", "bob", 8, order_id="o1", amount=2000),
    )
    assert lineage(run, "s2") == ("ann", "ann", 1)
    assert node(run, "sam").state == "bound"
    assert lineage(run, "b1") == ("sam", "ann", 2)
    assert verdict(run, "t2") == ("repeat_scan", None)
    assert lineage(run, "c1") == ("tom", "tom", 1)
    # bob's commission follows the snapshot [sam, ann]
    assert sorted(c for c in run.ledger() if c[4] == "b2") == [
        ("ann", 60, "commission", 2, "b2"), ("sam", 200, "commission", 1, "b2"),
        ("sam", 500, "first_purchase", 0, "b2")]


def test_ancestors_cut_to_levels(run_factory) -> None:
    run = run_factory()  # commission_bps has 2 levels, so L = 2
    users = ("ann", "bob", "cat", "dan")
    run.feed(*chain(*users))
    result = run.feed(ev("p1", "purchase", "dan", 60, order_id="o1", amount=2000))
    assert lineage(run, "p1") == ("cat", "ann", 3)
    assert credits(result) == [("bob", 60, "commission", 2, "p1"), ("cat", 200, "commission", 1, "p1"),
                               ("cat", 500, "first_purchase", 0, "p1")]


def test_commission_only_to_ancestors_that_exist(run_factory) -> None:
    run = run_factory(campaigns_of({"rewards": rewards(commission_bps=[1000, 300, 100])}))
    run.feed(*chain("ann", "bob"))
    result = run.feed(ev("p1", "purchase", "bob", 60, order_id="o1", amount=2000))
    assert credits(result) == [("ann", 200, "commission", 1, "p1"), ("ann", 500, "first_purchase", 0, "p1")]


def test_one_level_kept_when_no_commission_is_configured(run_factory) -> None:
    run = run_factory(campaigns_of({"rewards": rewards(commission_bps=[])}))  # L = max(1, 0) = 1
    run.feed(*chain("ann", "bob", "cat"))
    result = run.feed(ev("p1", "purchase", "cat", 60, order_id="o1", amount=2000))
    assert verdict(run, "p1") == ("purchase_attributed", None)
    assert lineage(run, "p1") == ("bob", "ann", 2)
    assert credits(result) == [("bob", 500, "first_purchase", 0, "p1")]


def test_outcome_lineage_after_event(run_factory) -> None:
    run = run_factory()
    run.feed(
        ev("k1", "share", "kol", 1, share_id="X"),
        ev("a1", "scan", "amy", 2, share_id="X"),
        ev("a2", "purchase", "amy", 3, order_id="o1", amount=100),
        ev("a3", "purchase", "amy", 4, order_id="o1", amount=100),  # rejected: the actor's lineage anyway
        ev("b1", "purchase", "bob", 5, order_id="o2", amount=100),
        ev("b2", "share", "bob", 6, share_id="B"),
        {"event_id": "a4", "type": "scan", "campaign": "c", "user_id": "amy", "ts": "soon", "share_id": "X"},
        ev("a5", "share", "amy", 7, "nope", share_id="N"),
        ev("a6", "purchase", "amy", 8, "other", order_id="o3", amount=100),  # lineage is per campaign
    )
    assert lineage(run, "k1") == (None, "kol", 0)
    assert lineage(run, "a1") == ("kol", "kol", 1)
    assert lineage(run, "a2") == ("kol", "kol", 1)
    assert (verdict(run, "a3"), lineage(run, "a3")) == (("rejected", "duplicate_order"), ("kol", "kol", 1))
    assert lineage(run, "b1") == NO_LINEAGE  # organic: not in a cascade
    assert lineage(run, "b2") == (None, "bob", 0)
    assert (verdict(run, "a4"), lineage(run, "a4")) == (("rejected", "invalid_event"), NO_LINEAGE)
    assert (verdict(run, "a5"), lineage(run, "a5")) == (("rejected", "unknown_campaign"), NO_LINEAGE)
    assert lineage(run, "a6") == NO_LINEAGE


def test_organic_user_who_shares_becomes_seed_and_keeps_entered_at(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "purchase", "amy", 5, order_id="o1", amount=2000))
    organic = node(run, "amy")
    assert (organic.state, organic.parent, organic.root, organic.depth, organic.entered_at) == (
        "organic", None, None, None, T0 + 5 * MINUTE)
    run.feed(ev("a2", "share", "amy", 10, share_id="A"), ev("b1", "scan", "bob", 11, share_id="A"))
    seed = node(run, "amy")
    assert (seed.state, seed.parent, seed.root, seed.depth) == ("seed", None, "amy", 0)
    assert seed.entered_at == T0 + 5 * MINUTE
    assert lineage(run, "b1") == ("amy", "amy", 1)
    run.feed(ev("a3", "refund", "amy", 12, order_id="o1"))  # her organic purchase is still hers
    assert verdict(run, "a3") == ("refunded", None)


# -- 4.3 purchase ----------------------------------------------------------------------


def test_purchase_by_unknown_user_makes_organic(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "purchase", "amy", 3, order_id="o1", amount=5000))
    assert verdict(run, "a1") == ("purchase_unattributed", None)
    assert lineage(run, "a1") == NO_LINEAGE
    amy = node(run, "amy")
    assert (amy.state, amy.parent, amy.root, amy.depth) == ("organic", None, None, None)
    assert amy.entered_at == T0 + 3 * MINUTE
    assert run.ledger() == []


def test_purchase_by_seed_is_unattributed(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("k2", "purchase", "kol", 2, order_id="o1", amount=5000))
    assert verdict(run, "k2") == ("purchase_unattributed", None)
    assert lineage(run, "k2") == (None, "kol", 0)
    assert run.ledger() == []


def test_purchase_outside_attribution_window_unattributed(run_factory) -> None:
    run = run_factory()  # attribution_window: 2d
    run.feed(*chain("kol", "amy"))
    end = bound_at(("kol", "amy"), "amy") + 2 * DAY * MINUTE
    result = run.feed(ev("a1", "purchase", "amy", 0, order_id="o1", amount=2000, ts=end + 1))
    assert verdict(run, "a1") == ("purchase_unattributed", None)
    assert lineage(run, "a1") == ("kol", "kol", 1)  # still bound
    assert result.entries == []


def test_purchase_at_end_of_attribution_window_is_attributed(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    end = bound_at(("kol", "amy"), "amy") + 2 * DAY * MINUTE
    run.feed(ev("a1", "purchase", "amy", 0, order_id="o1", amount=2000, ts=end + 1))
    result = run.feed(ev("a2", "purchase", "amy", 0, order_id="o2", amount=2000, ts=end))  # ts need not increase
    assert verdict(run, "a2") == ("purchase_attributed", None)
    # the unattributed purchase did not use up the first-purchase reward
    assert credits(result) == [("kol", 200, "commission", 1, "a2"), ("kol", 500, "first_purchase", 0, "a2")]
    assert {e.ts for e in result.entries} == {end}


def test_purchase_before_bind_ts_unattributed(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "scan", "amy", 100, share_id="X"),
             ev("a2", "purchase", "amy", 50, order_id="o1", amount=2000))
    assert verdict(run, "a2") == ("purchase_unattributed", None)
    assert lineage(run, "a2") == ("kol", "kol", 1)
    assert [kind for _, _, kind, _, _ in run.ledger()] == ["bind_scanner", "bind_sharer"]


def test_commission_per_level_floor_and_cap(run_factory) -> None:
    run = run_factory()  # commission_bps [1000, 300], cap 800
    run.feed(*chain("ann", "bob", "cat"))
    amounts = {"p1": 9, "p2": 10, "p3": 1999, "p4": 9000}
    got = {e: credits(run.feed(ev(e, "purchase", "cat", 30 + i, order_id=e, amount=a)))
           for i, (e, a) in enumerate(amounts.items())}
    assert verdict(run, "p1") == ("purchase_attributed", None)
    assert got == {
        "p1": [],  # 0.9 and 0.27 floor to zero: no entries
        "p2": [("bob", 1, "commission", 1, "p2")],  # level 2: 0.3 → 0
        "p3": [("ann", 59, "commission", 2, "p3"), ("bob", 199, "commission", 1, "p3"),
               ("bob", 500, "first_purchase", 0, "p3")],
        "p4": [("ann", 270, "commission", 2, "p4"), ("bob", 800, "commission", 1, "p4")],  # 900 capped
    }


def test_commission_without_cap_is_exact_for_the_largest_amount(run_factory) -> None:
    run = run_factory()  # campaign `other`: commission_bps [500], no cap
    run.feed(*chain("kol", "amy", campaign="other"))
    result = run.feed(ev("a1", "purchase", "amy", 30, "other", order_id="o1", amount=10**11))
    assert credits(result) == [("kol", 5_000_000_000, "commission", 1, "a1")]
    assert run.store.balances()["other"] == {"amy": 10, "kol": 5_000_000_000}


def test_first_purchase_needs_min_amount(run_factory) -> None:
    run = run_factory()  # first_purchase: sharer 500, min_amount 1000
    run.feed(*chain("kol", "amy"))
    small = run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=999))
    exact = run.feed(ev("a2", "purchase", "amy", 11, order_id="o2", amount=1000))
    again = run.feed(ev("a3", "purchase", "amy", 12, order_id="o3", amount=5000))
    assert credits(small) == [("kol", 99, "commission", 1, "a1")]
    assert credits(exact) == [("kol", 100, "commission", 1, "a2"), ("kol", 500, "first_purchase", 0, "a2")]
    assert credits(again) == [("kol", 500, "commission", 1, "a3")]


def test_first_purchase_once_per_user_not_rearmed_by_refund(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=2000), ev("a2", "refund", "amy", 11, order_id="o1"))
    result = run.feed(ev("a3", "purchase", "amy", 12, order_id="o2", amount=2000))
    assert credits(result) == [("kol", 200, "commission", 1, "a3")]
    assert run.balances()["kol"] == 20 + 200 + 500 - 200 - 500 + 200


def test_duplicate_order(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=2000))
    before = run.ledger()
    run.feed(ev("a2", "purchase", "amy", 11, order_id="o1", amount=3000),
             ev("b1", "purchase", "bob", 12, order_id="o1", amount=3000))  # another user reusing the id
    assert verdict(run, "a2") == ("rejected", "duplicate_order")
    assert verdict(run, "b1") == ("rejected", "duplicate_order")
    assert lineage(run, "b1") == NO_LINEAGE
    assert node(run, "bob") is None  # the rejection left bob unknown
    assert run.ledger() == before
    run.feed(ev("b2", "scan", "bob", 13, share_id="x-kol"))
    assert verdict(run, "b2") == ("bound", None)


def test_same_order_id_in_another_campaign_is_fine(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "purchase", "amy", 1, order_id="o1", amount=100),
             ev("a2", "purchase", "amy", 2, "other", order_id="o1", amount=100),
             ev("a3", "refund", "amy", 3, "other", order_id="o1"),
             ev("a4", "refund", "amy", 4, order_id="o1"))
    assert [verdict(run, e) for e in ("a1", "a2", "a3", "a4")] == [
        ("purchase_unattributed", None), ("purchase_unattributed", None), ("refunded", None), ("refunded", None)]


# -- 4.4 refund ------------------------------------------------------------------------


def test_refund_claws_back_commission_and_first_purchase(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy", "bob"))
    bought = run.feed(ev("b1", "purchase", "bob", 20, order_id="o1", amount=2000))
    assert credits(bought) == [("amy", 200, "commission", 1, "b1"), ("amy", 500, "first_purchase", 0, "b1"),
                               ("kol", 60, "commission", 2, "b1")]
    refunded = run.feed(ev("b2", "refund", "bob", 30, order_id="o1"))
    assert (verdict(run, "b2"), lineage(run, "b2")) == (("refunded", None), ("amy", "kol", 2))
    # kind clawback, same beneficiary and level, negated amount, the refund's id and ts
    assert credits(refunded) == [("amy", -500, "clawback", 0, "b2"), ("amy", -200, "clawback", 1, "b2"),
                                 ("kol", -60, "clawback", 2, "b2")]
    assert {(e.ts, e.campaign) for e in refunded.entries} == {(T0 + 30 * MINUTE, "c")}
    assert nonzero(run.balances()) == {"kol": 20, "amy": 120, "bob": 100}  # bind credits stay


def test_refund_of_unattributed_purchase_makes_no_entries(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "purchase", "amy", 1, order_id="o1", amount=2000))
    result = run.feed(ev("a2", "refund", "amy", 2, order_id="o1"))
    assert verdict(run, "a2") == ("refunded", None)
    assert result.entries == []


def test_refund_by_other_user_is_unknown_order(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=2000))
    before = run.ledger()
    run.feed(ev("b1", "refund", "bob", 11, order_id="o1"),  # not bob's order
             ev("a2", "refund", "amy", 12, order_id="nope"),  # no such order
             ev("a3", "refund", "amy", 13, "other", order_id="o1"))  # amy's o1 is in campaign c
    assert [verdict(run, e) for e in ("b1", "a2", "a3")] == [("rejected", "unknown_order")] * 3
    assert run.ledger() == before
    run.feed(ev("a4", "refund", "amy", 14, order_id="o1"))  # the rejections changed nothing
    assert verdict(run, "a4") == ("refunded", None)


def test_duplicate_refund(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=2000), ev("a2", "refund", "amy", 11, order_id="o1"))
    balances = run.balances()
    again = run.feed(ev("a3", "refund", "amy", 12, order_id="o1"))
    assert verdict(run, "a3") == ("rejected", "duplicate_refund")
    assert again.entries == []
    assert run.balances() == balances


# -- 4.5 group buy ---------------------------------------------------------------------


def group_share(minute: int = 1, share_id: str = "G", user: str = "kol", event_id: str = "g1") -> dict:
    return ev(event_id, "share", user, minute, share_id=share_id, group=True)


def joins(*spec: tuple[str, str, int], group_id: str = "G", campaign: str = "c") -> list[dict]:
    """Purchases joining a group: (event_id, user, minute) each, order id = event id."""
    return [ev(e, "purchase", user, minute, campaign, order_id=e, amount=100, group_id=group_id)
            for e, user, minute in spec]


def group_rewards(run: Run) -> list[tuple]:
    return [(e.beneficiary, e.amount, e.kind, e.level, e.source_event_id, e.ts)
            for e in entries(run) if e.kind == "group_initiator"]


def test_group_initiator_reward_once_when_group_completes(run_factory) -> None:
    run = run_factory()  # group_buy: size 3, window 1d, initiator_reward 300
    run.feed(group_share(), *joins(("p1", "u1", 2), ("p2", "u1", 3), ("p3", "u2", 4)))
    assert group_rewards(run) == []  # two distinct buyers, not three
    run.feed(*joins(("p4", "u3", 5)))
    assert group_rewards(run) == [("kol", 300, "group_initiator", 0, "g1", T0 + 5 * MINUTE)]
    run.feed(*joins(("p5", "u4", 6), ("p6", "u5", 7)))  # joins after completion change nothing
    assert len(group_rewards(run)) == 1
    assert run.balances() == {"kol": 300}
    assert {verdict(run, e) for e in ("p1", "p4", "p6")} == {("purchase_unattributed", None)}


def test_group_join_outside_window_does_not_count(run_factory) -> None:
    run = run_factory()
    run.feed(group_share(minute=10),
             *joins(("p1", "u1", 9), ("p2", "u2", 10 + DAY + 1), ("p3", "u3", 11), ("p4", "u4", 12)))
    assert group_rewards(run) == []  # only u3 and u4 joined inside [opened, opened + 1d]
    run.feed(*joins(("p5", "u5", 10 + DAY)))
    assert group_rewards(run) == [("kol", 300, "group_initiator", 0, "g1", T0 + (10 + DAY) * MINUTE)]


def test_initiator_buying_counts_toward_group(run_factory) -> None:
    run = run_factory()
    run.feed(group_share(), *joins(("p1", "kol", 2), ("p2", "u1", 3), ("p3", "u2", 4)))
    assert group_rewards(run) == [("kol", 300, "group_initiator", 0, "g1", T0 + 4 * MINUTE)]


def test_group_id_naming_no_group_is_ignored(run_factory) -> None:
    run = run_factory(campaigns_of({}, {"id": "c2"}))
    run.feed(
        ev("k1", "share", "kol", 1, share_id="PLAIN"),  # not a group share
        ev("k2", "share", "kol", 1, "c2", share_id="G2", group=True),  # a group of another campaign
        ev("k3", "share", "kol", 1, "other", share_id="G3", group=True),  # campaign without group_buy
    )
    for group_id in ("PLAIN", "G2", "G3"):
        run.feed(*joins(*((f"{group_id}-{u}", u, 2) for u in ("u1", "u2", "u3")), group_id=group_id))
    assert group_rewards(run) == []
    assert {verdict(run, f"{g}-u3") for g in ("PLAIN", "G2", "G3")} == {("purchase_unattributed", None)}
    assert run.engine.waiting(0) == 0


def test_group_purchase_waits_for_its_share(run_factory) -> None:
    run = run_factory()
    early = run.feed(*joins(("p1", "u1", 2), ("p2", "u2", 3), ("p3", "u3", 4)))
    assert early.outcomes == []
    assert run.engine.waiting(0) == 3
    late = run.feed(group_share())
    assert sorted((o.event_id, o.outcome) for o in late.outcomes) == [
        ("g1", "shared"), ("p1", "purchase_unattributed"), ("p2", "purchase_unattributed"),
        ("p3", "purchase_unattributed")]
    assert group_rewards(run) == [("kol", 300, "group_initiator", 0, "g1", T0 + 4 * MINUTE)]


def test_group_purchase_whose_share_never_comes_is_processed_without_group(run_factory) -> None:
    run = run_factory()
    run.feed(*chain("kol", "amy"))
    run.feed(*joins(("p1", "amy", 10), group_id="ghost"))
    assert "p1" not in reported(run)
    drained = run.drain()
    assert verdict(run, "p1") == ("purchase_attributed", None)
    assert credits(drained) == [("kol", 10, "commission", 1, "p1")]
    assert dead(run) == []


def test_group_id_in_campaign_without_group_buy_does_not_wait(run_factory) -> None:
    run = run_factory()
    run.feed(*joins(("p1", "amy", 1), group_id="ghost", campaign="other"))
    assert verdict(run, "p1") == ("purchase_unattributed", None)
    assert run.engine.waiting(0) == 0


def test_group_reward_not_clawed_back_by_refund(run_factory) -> None:
    run = run_factory()
    run.feed(group_share(), *joins(("p1", "u1", 2), ("p2", "u2", 3), ("p3", "u3", 4)))
    result = run.feed(ev("r1", "refund", "u3", 5, order_id="p3"), ev("r2", "refund", "u1", 6, order_id="p1"))
    assert (verdict(run, "r1"), verdict(run, "r2")) == (("refunded", None), ("refunded", None))
    assert result.entries == []
    assert run.balances() == {"kol": 300}


def test_group_completion_does_not_depend_on_processing_order(run_factory) -> None:
    events = [group_share(minute=10), *joins(("p1", "u1", 5), ("p2", "u2", 11), ("p3", "u3", 12), ("p4", "u4", 13))]
    rewarded = []
    for order in (events, events[::-1]):
        run = run_factory()
        run.feed(*order)
        run.drain()
        rewarded.append([(b, a, k, s) for b, a, k, _, s, _ in group_rewards(run)])
    assert rewarded == [[("kol", 300, "group_initiator", "g1")]] * 2


# -- 4.6 budget ------------------------------------------------------------------------


def budget(amount: int) -> dict:
    return {"limits": {"budget": amount, "max_binds_per_device": 2}}


def test_budget_cuts_credit_that_does_not_fit_and_outcome_says_budget_exhausted(run_factory) -> None:
    run = run_factory(campaigns_of(budget(150)))
    run.feed(ev("k1", "share", "kol", 1, share_id="X"),
             ev("a1", "scan", "amy", 2, share_id="X"),  # 100 + 20 = 120 spent
             ev("b1", "scan", "bob", 3, share_id="X"),  # 100 does not fit, 20 does: 140
             ev("c1", "scan", "cat", 4, share_id="X"))  # neither fits
    assert run.outcome("a1")["budget_exhausted"] == []
    assert (verdict(run, "b1"), lineage(run, "b1")) == (("bound", None), ("kol", "kol", 1))
    assert run.outcome("b1")["budget_exhausted"] == [
        {"beneficiary": "bob", "amount": 100, "kind": "bind_scanner", "level": 0}]
    assert sorted(run.outcome("c1")["budget_exhausted"], key=lambda c: c["kind"]) == [
        {"beneficiary": "cat", "amount": 100, "kind": "bind_scanner", "level": 0},
        {"beneficiary": "kol", "amount": 20, "kind": "bind_sharer", "level": 0}]
    assert verdict(run, "c1") == ("bound", None)
    assert run.balances() == {"amy": 100, "kol": 40}


def test_clawback_returns_amount_to_budget(run_factory) -> None:
    run = run_factory(campaigns_of(budget(820)))
    run.feed(*chain("kol", "amy"))  # 120
    run.feed(ev("a1", "purchase", "amy", 10, order_id="o1", amount=2000))  # 200 + 500: 820, all of it
    cut = run.feed(ev("a2", "purchase", "amy", 11, order_id="o2", amount=2000))
    assert cut.entries == []
    assert run.outcome("a2")["budget_exhausted"] == [
        {"beneficiary": "kol", "amount": 200, "kind": "commission", "level": 1}]
    nothing = run.feed(ev("a3", "refund", "amy", 12, order_id="o2"))  # a credit never made is not clawed back
    assert (verdict(run, "a3"), nothing.entries) == (("refunded", None), [])
    run.feed(ev("a4", "refund", "amy", 13, order_id="o1"))  # gives 700 back
    after = run.feed(ev("a5", "purchase", "amy", 14, order_id="o3", amount=2000),
                     ev("b1", "scan", "bob", 15, share_id="x-kol"))
    assert credits(after) == [("bob", 100, "bind_scanner", 0, "b1"), ("kol", 20, "bind_sharer", 0, "b1"),
                              ("kol", 200, "commission", 1, "a5")]
    assert run.outcome("a5")["budget_exhausted"] == []
    assert sum(e.amount for e in entries(run)) == 440


def test_budget_invariant_positive_minus_clawbacks_never_exceeds_budget(run_factory) -> None:
    limit = 3000
    run = run_factory(campaigns_of(budget(limit)))
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    for i in range(8):
        run.feed(ev(f"s{i}", "scan", f"u{i}", 2 + i, share_id="X"),
                 ev(f"p{i}", "purchase", f"u{i}", 20 + i, order_id=f"o{i}", amount=3000 + 1000 * i))
        if i % 2:
            run.feed(ev(f"r{i}", "refund", f"u{i}", 40 + i, order_id=f"o{i}"))
        assert sum(e.amount for e in entries(run)) <= limit
    assert any(o.budget_exhausted for r in run.results for o in r.outcomes)  # the budget did run out
    assert any(e.kind == "clawback" for e in entries(run))
    assert sum(run.balances().values()) == sum(e.amount for e in entries(run))


# -- checks before the rules -----------------------------------------------------------


def test_outside_campaign_rejected_and_id_counts_as_processed(run_factory) -> None:
    run = run_factory()  # [2026-01-01, 2026-02-01)
    ends = T0 + 31 * DAY * MINUTE
    early = ev("k1", "share", "kol", 0, share_id="X", ts=T0 - 1)
    late = ev("k2", "share", "kol", 0, share_id="Y", ts=ends)
    run.feed(early, late)
    assert verdict(run, "k1") == ("rejected", "outside_campaign")
    assert verdict(run, "k2") == ("rejected", "outside_campaign")  # ends_at itself is outside
    assert lineage(run, "k1") == NO_LINEAGE
    assert node(run, "kol") is None
    assert dead(run) == [(orjson.dumps(early), "outside_campaign"), (orjson.dumps(late), "outside_campaign")]
    run.feed(early)
    assert verdict(run, "k1") == ("duplicate", None)  # its id counts as processed
    run.feed(ev("k3", "share", "kol", 0, share_id="X", ts=T0))  # X was left free; starts_at is inside
    assert verdict(run, "k3") == ("shared", None)


def test_unknown_campaign(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    raw = orjson.dumps(ev("k2", "share", "kol", 2, "nope", share_id="Y"))
    run.feed(raw, raw)
    found = [o.to_dict() for r in run.results for o in r.outcomes if o.event_id == "k2"]
    assert [(o["outcome"], o["reason"], o["parent"], o["root"], o["depth"]) for o in found] == [
        ("rejected", "unknown_campaign", None, None, None)] * 2  # checked before duplicates
    assert dead(run) == [(raw, "unknown_campaign")] * 2
    run.feed(ev("k3", "share", "kol", 3, share_id="Y"))  # the rejection did not claim Y
    assert verdict(run, "k3") == ("shared", None)


def test_duplicate_event_has_no_effect(run_factory) -> None:
    run = run_factory()
    scan = ev("a1", "scan", "amy", 2, share_id="X")
    buy = ev("a2", "purchase", "amy", 3, order_id="o1", amount=2000)
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), scan, scan, buy)
    ledger, balances = run.ledger(), run.balances()
    run.feed(scan, buy, ev("k1", "share", "kol", 1, share_id="X"))
    outcomes = [(o.event_id, o.outcome, o.reason) for r in run.results for o in r.outcomes]
    assert outcomes == [("k1", "shared", None), ("a1", "bound", None), ("a1", "duplicate", None),
                        ("a2", "purchase_attributed", None), ("a1", "duplicate", None),
                        ("a2", "duplicate", None), ("k1", "duplicate", None)]
    assert run.ledger() == ledger
    assert run.balances() == balances == {"amy": 100, "kol": 720}


def test_duplicate_of_a_rejected_event_is_duplicate(run_factory) -> None:
    run = run_factory()
    selfscan = ev("k2", "scan", "kol", 2, share_id="X")
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), selfscan)
    run.feed(selfscan)
    assert verdict(run, "k2") == ("duplicate", None)
    assert [reason for _, reason in dead(run)] == ["self_referral"]  # a duplicate is not dead-lettered again


def test_duplicate_check_comes_before_campaign_window(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    run.feed(ev("k1", "share", "kol", 0, share_id="X", ts=T0 - 1))
    assert verdict(run, "k1") == ("duplicate", None)


def test_duplicate_event_claims_no_share_id_or_order_id(run_factory) -> None:
    """A second event reusing an event_id has no effect, even if its content differs."""
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "purchase", "amy", 1, order_id="o1", amount=5))
    run.feed(ev("k1", "share", "kol", 2, share_id="Y"), ev("a1", "purchase", "amy", 2, order_id="o2", amount=5))
    assert (verdict(run, "k1"), verdict(run, "a1")) == (("duplicate", None), ("duplicate", None))
    run.feed(ev("k2", "share", "kol", 3, share_id="Y"), ev("a2", "purchase", "amy", 3, order_id="o2", amount=5))
    assert (verdict(run, "k2"), verdict(run, "a2")) == (("shared", None), ("purchase_unattributed", None))


def test_event_id_reused_on_another_partition_is_duplicate(run_factory) -> None:
    run = run_factory()
    run.feed(ev("e1", "purchase", "amy", 1, order_id="o1", amount=5), partition=0)
    run.feed(ev("e1", "purchase", "bob", 1, order_id="o2", amount=5), partition=1)
    assert verdict(run, "e1") == ("duplicate", None)


def test_redelivered_waiting_scan_is_duplicate_once_its_share_arrives(run_factory) -> None:
    run = run_factory()
    scan = ev("a1", "scan", "amy", 2, share_id="X")
    run.feed(scan)
    run.feed(scan)
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    assert [o.outcome for r in run.results for o in r.outcomes if o.event_id == "a1"] == ["bound", "duplicate"]
    assert run.balances() == {"amy": 100, "kol": 20}


# -- 4.8 waiting bounds and grace ------------------------------------------------------


def test_wait_overflow_per_user(run_factory) -> None:
    run = run_factory(settings=Settings(max_waiting_per_user=3))
    fourth = ev("a4", "purchase", "amy", 5, order_id="o4", amount=100)
    result = run.feed(ev("a1", "scan", "amy", 2, share_id="ghost"),
                      ev("a2", "purchase", "amy", 3, order_id="o2", amount=100),
                      ev("a3", "purchase", "amy", 4, order_id="o3", amount=100),
                      fourth,
                      ev("b1", "scan", "bob", 2, share_id="ghost"))  # other users still wait
    assert [(o.event_id, o.outcome, o.reason) for o in result.outcomes] == [("a4", "rejected", "wait_overflow")]
    assert [(d.raw, d.reason) for d in result.dead_letters] == [(orjson.dumps(fourth), "wait_overflow")]
    assert run.engine.waiting(0) == 4
    run.drain()
    assert [verdict(run, e) for e in ("a1", "a2", "a3", "b1")] == [
        ("rejected", "unknown_share"), ("purchase_unattributed", None), ("purchase_unattributed", None),
        ("rejected", "unknown_share")]


def test_wait_overflow_per_partition(run_factory) -> None:
    run = run_factory(settings=Settings(max_waiting_per_partition=2))
    run.feed(ev("a1", "scan", "amy", 2, share_id="ghost"), ev("b1", "scan", "bob", 2, share_id="ghost"))
    result = run.feed(ev("c1", "scan", "cat", 2, share_id="ghost"),  # a new wait: over the bound
                      ev("a2", "purchase", "amy", 3, order_id="o1", amount=100))  # behind a wait: over too
    assert sorted((o.event_id, o.reason) for o in result.outcomes) == [("a2", "wait_overflow"), ("c1", "wait_overflow")]
    assert run.engine.waiting(0) == 2
    other = run.feed(ev("d1", "scan", "dan", 2, share_id="ghost"), partition=1)  # the bound is per partition
    assert other.outcomes == []
    assert run.engine.waiting(1) == 1


def test_wait_overflow_event_id_counts_as_processed(run_factory) -> None:
    run = run_factory(settings=Settings(max_waiting_per_user=1))
    second = ev("a2", "purchase", "amy", 3, order_id="o1", amount=100)
    run.feed(ev("a1", "scan", "amy", 2, share_id="ghost"), second)
    assert verdict(run, "a2") == ("rejected", "wait_overflow")
    run.drain()
    run.feed(second)
    assert verdict(run, "a2") == ("duplicate", None)


def test_wait_overflow_leaves_share_id_and_order_id_free(run_factory) -> None:
    run = run_factory(settings=Settings(max_waiting_per_user=1))
    run.feed(ev("a1", "scan", "amy", 1, share_id="ghost"), ev("a2", "share", "amy", 2, share_id="A"),
             ev("a3", "purchase", "amy", 3, order_id="o1", amount=100))
    assert [verdict(run, e) for e in ("a2", "a3")] == [("rejected", "wait_overflow")] * 2
    run.drain()
    run.feed(ev("a4", "share", "amy", 4, share_id="A"), ev("a5", "purchase", "amy", 5, order_id="o1", amount=100))
    assert [verdict(run, e) for e in ("a4", "a5")] == [("shared", None), ("purchase_unattributed", None)]


def test_grace_period_ends_wait_as_unknown_share(run_factory) -> None:
    run = run_factory()
    grace = Settings().grace_ms
    now = 1_800_000_000_000
    run.feed(ev("a1", "scan", "amy", 2, share_id="ghost"), ev("a2", "share", "amy", 3, share_id="A"), now=now)
    assert tick(run, now + grace - 1).outcomes == []
    assert run.engine.waiting(0) == 2
    expired = tick(run, now + grace + 1)
    assert [(o.event_id, o.outcome, o.reason) for o in expired.outcomes] == [
        ("a1", "rejected", "unknown_share"), ("a2", "shared", None)]  # the queue is released in order
    assert [d.reason for d in expired.dead_letters] == ["unknown_share"]
    assert run.engine.waiting(0) == 0
    run.feed(ev("k1", "share", "kol", 1, share_id="ghost"), ev("a1", "scan", "amy", 2, share_id="ghost"), now=now)
    assert verdict(run, "a1") == ("duplicate", None)  # a late share does not revive the ended wait


def test_waits_survive_a_new_engine_on_the_same_store(run_factory) -> None:
    run = run_factory()
    run.feed(ev("a1", "scan", "amy", 2, share_id="X"), ev("a2", "purchase", "amy", 3, order_id="o1", amount=2000))
    restarted = Run(run.engine.campaigns, run.store)
    result = restarted.feed(ev("k1", "share", "kol", 1, share_id="X"))
    assert [(o.event_id, o.outcome) for o in result.outcomes] == [
        ("k1", "shared"), ("a1", "bound"), ("a2", "purchase_attributed")]
    assert restarted.engine.waiting(0) == 0


# -- outputs ---------------------------------------------------------------------------


def test_ledger_entry_ids_are_deterministic_and_unique(run_factory) -> None:
    events = [*chain("kol", "amy", "bob"), ev("p1", "purchase", "bob", 20, order_id="o1", amount=2000),
              ev("r1", "refund", "bob", 21, order_id="o1"), ev("p2", "purchase", "bob", 22, order_id="o2", amount=9000)]
    ids = []
    for _ in range(2):
        run = run_factory()
        run.feed(*events)
        ids.append(sorted(e.entry_id for e in entries(run)))
    assert ids[0] == ids[1]
    assert len(set(ids[0])) == len(ids[0]) == 12


def test_nodes_output_one_per_user_who_left_unknown(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "scan", "amy", 2, share_id="X"),
             ev("b1", "purchase", "bob", 3, order_id="o1", amount=100),
             ev("c1", "scan", "cat", 4, share_id="X", ts=T0 - 1))  # rejected: cat stays unknown
    stored = {(c, u): (user.state, user.entered_at) for c, u, user in run.store.nodes()}
    assert stored == {("c", "kol"): ("seed", T0 + MINUTE), ("c", "amy"): ("bound", T0 + 2 * MINUTE),
                      ("c", "bob"): ("organic", T0 + 3 * MINUTE)}
    assert node(run, "cat") is None


# -- ids -------------------------------------------------------------------------------

KOL, AMY, BOB, CAT, DAN = "用户|{kol}", "a\"b 'c'", "c:d", "😀 e|f", "{dan}:1\t\n\x00"
ODD_CAMPAIGN = "c|{1}: 春 \"x\""


def test_ids_with_odd_characters_work_everywhere(run_factory) -> None:
    run = run_factory(campaigns_of({"id": ODD_CAMPAIGN}))
    s1, s2, ghost, device = "分享:1 🚀", "{x}|\"y\" :", "{ghost}|:", "dev|{1}: 📱"

    def e(n: int, kind: str, user: str, minute: int, **fields) -> dict:
        return ev(f"ε|{n}:\"{{}}\" 事件", kind, user, minute, ODD_CAMPAIGN, **fields)

    def eid(n: int) -> str:
        return f"ε|{n}:\"{{}}\" 事件"

    dup = e(8, "purchase", DAN, 9, order_id="订单|1:{a}", amount=2000, group_id=s1)
    run.feed(
        e(1, "share", KOL, 1, share_id=s1, group=True),
        e(2, "scan", AMY, 2, share_id=s1, device_id=device),
        e(3, "scan", BOB, 3, share_id=s1, device_id=device),
        e(4, "scan", CAT, 4, share_id=s1, device_id=device),
        e(5, "share", AMY, 5, share_id=s2),
        e(6, "scan", DAN, 6, share_id=s2),
        e(7, "scan", CAT, 7, share_id=ghost),
        dup,
        e(9, "purchase", AMY, 10, order_id="订单|2", amount=1000, group_id=s1),
        e(10, "purchase", BOB, 11, order_id="订单|3", amount=1000, group_id=s1),
        e(11, "refund", DAN, 12, order_id="订单|1:{a}"),
        dup,
    )
    run.drain()
    assert [verdict(run, eid(n))[0] for n in (1, 2, 3, 5, 6, 9, 10, 11)] == [
        "shared", "bound", "bound", "shared", "bound", "purchase_attributed", "purchase_attributed", "refunded"]
    assert verdict(run, eid(4)) == ("rejected", "device_limit")
    assert verdict(run, eid(7)) == ("rejected", "unknown_share")
    assert [o.outcome for r in run.results for o in r.outcomes if o.event_id == eid(8)] == [
        "purchase_attributed", "duplicate"]
    assert lineage(run, eid(6)) == (AMY, KOL, 2)
    assert nonzero(run.store.balances()[ODD_CAMPAIGN]) == {KOL: 1540, AMY: 120, BOB: 100, DAN: 100}
    assert [r[:5] for r in group_rewards(run)] == [(KOL, 300, "group_initiator", 0, eid(1))]
    states = {u: user.state for c, u, user in run.store.nodes() if c == ODD_CAMPAIGN}
    assert states == {KOL: "seed", AMY: "bound", BOB: "bound", DAN: "bound"}


def test_ids_that_collide_under_plain_concatenation_stay_apart(run_factory) -> None:
    run = run_factory(campaigns_of({}, {"id": "c:a"}))
    run.feed(
        ev("e1", "share", "x", 1, share_id="s0"),
        ev("e2", "scan", "a:b", 2, share_id="s0", device_id="a:d"),  # ("c", "a:b") vs ("c:a", "b")
        ev("e3", "scan", "y", 3, share_id="s0", device_id="a:d"),  # device ("c", "a:d") now full
        ev("e4", "share", "k", 1, "c:a", share_id="s2"),
        ev("e5", "scan", "b", 2, "c:a", share_id="s2", device_id="d"),
        ev("e6", "purchase", "a:b", 4, order_id="a:o1", amount=100),
        ev("e7", "purchase", "b", 4, "c:a", order_id="o1", amount=100),
    )
    assert [verdict(run, e) for e in ("e2", "e3", "e5")] == [("bound", None)] * 3
    assert (verdict(run, "e6"), verdict(run, "e7")) == (("purchase_attributed", None), ("purchase_attributed", None))
    assert nonzero(run.store.balances()["c"]) == {"a:b": 100, "y": 100, "x": 50}
    assert nonzero(run.store.balances()["c:a"]) == {"b": 100, "k": 30}


def test_longest_ids_work(run_factory) -> None:
    run = run_factory()
    kol, amy, share, order = "🚀" * 128, "中" * 128, "|" * 128, "{" * 128
    run.feed(ev("👍" * 128, "share", kol, 1, share_id=share), ev("e" * 128, "scan", amy, 2, share_id=share),
             ev("🎉" * 128, "purchase", amy, 3, order_id=order, amount=2000))
    assert lineage(run, "e" * 128) == (kol, kol, 1)
    assert verdict(run, "🎉" * 128) == ("purchase_attributed", None)
    assert run.balances() == {amy: 100, kol: 720}
