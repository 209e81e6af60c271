"""Cascade analytics, pure and fast: the incremental Wiener index against networkx, K windows, generation
ratios, stall and K alerts on a controlled event-time clock, idempotency, restore after a restart."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.cascades import (
    FIRING,
    K_BELOW_ONE,
    RESOLVED,
    STALLED,
    Alert,
    CampaignStats,
    CascadeConfig,
    CascadeMonitor,
    CascadeTracker,
    leaderboard,
)

T0 = 1767225600000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
HOUR = 60 * MINUTE


def at(minutes: float) -> int:
    return T0 + int(minutes * MINUTE)


def shared(user: str, root: str, depth: int, minute: float, campaign: str = "c") -> dict:
    return {"outcome_id": f"s-{user}-{minute}", "event_id": f"s-{user}-{minute}", "campaign": campaign,
            "type": "share", "user_id": user, "outcome": "shared", "reason": None, "parent": None, "root": root,
            "depth": depth, "ts": at(minute), "amount": None}


def bound(user: str, parent: str, root: str, depth: int, minute: float, campaign: str = "c") -> dict:
    return {"outcome_id": f"b-{user}", "event_id": f"b-{user}", "campaign": campaign, "type": "scan",
            "user_id": user, "outcome": "bound", "reason": None, "parent": parent, "root": root, "depth": depth,
            "ts": at(minute), "amount": None}


def purchase(event_id: str, user: str, root: str, amount: int, minute: float) -> dict:
    return {"outcome_id": event_id, "event_id": event_id, "campaign": "c", "type": "purchase", "user_id": user,
            "outcome": "purchase_attributed", "reason": None, "parent": root, "root": root, "depth": 1,
            "ts": at(minute), "amount": amount}


def rejected(event_id: str, user: str, root: str | None, reason: str, minute: float) -> dict:
    return {"outcome_id": event_id, "event_id": event_id, "campaign": "c", "type": "scan", "user_id": user,
            "outcome": "rejected", "reason": reason, "parent": None, "root": root, "depth": 0 if root else None,
            "ts": at(minute), "amount": None}


def entry(entry_id: str, root: str | None, amount: int, kind: str, minute: float) -> dict:
    return {"entry_id": entry_id, "campaign": "c", "beneficiary": "x", "amount": amount, "kind": kind, "level": 0,
            "source_event_id": "e", "source_user": "x", "ts": at(minute), "root": root}


def chain(monitor: CascadeMonitor, root: str, binds: int, start: float = 0, every: float = 1) -> None:
    """A seed and `binds` users bound one after another, each under the previous one."""
    monitor.apply_outcome(shared(root, root, 0, start))
    parent = root
    for i in range(1, binds + 1):
        user = f"{root}-{i}"
        monitor.apply_outcome(bound(user, parent, root, i, start + i * every))
        parent = user


# -- structural virality ------------------------------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """A random rooted tree (parent of node i is a node < i) and an arrival order of its non-root nodes."""
    n = draw(st.integers(min_value=1, max_value=60))
    parents = [-1] + [draw(st.integers(min_value=0, max_value=i - 1)) for i in range(1, n)]
    order = draw(st.permutations(list(range(1, n))))
    return parents, order


@settings(max_examples=300, deadline=None)
@given(trees())
def test_incremental_wiener_index_equals_networkx_whatever_the_arrival_order(tree: tuple[list[int], list[int]]) -> None:
    parents, order = tree
    tracker = CascadeTracker("c", "n0", CascadeConfig())
    for i in order:  # children may arrive before their parents: they wait and attach later
        assert tracker.add_bind(f"n{i}", f"n{parents[i]}", at(i))
    graph = nx.Graph()
    graph.add_node(0)
    graph.add_edges_from((i, p) for i, p in enumerate(parents) if p >= 0)
    n = len(parents)
    assert not tracker.pending and tracker.size == n
    assert tracker.wiener == nx.wiener_index(graph)
    expected = nx.average_shortest_path_length(graph) if n > 1 else 0.0
    assert tracker.virality == pytest.approx(expected)
    depths = nx.single_source_shortest_path_length(graph, 0)
    assert tracker.max_depth == max(depths.values())
    assert tracker.per_depth == [sum(1 for d in depths.values() if d == k) for k in range(tracker.max_depth + 1)]


def test_a_star_has_virality_near_two_and_a_chain_grows_with_its_length() -> None:
    star, line = CascadeTracker("c", "r", CascadeConfig()), CascadeTracker("c", "r", CascadeConfig())
    for i in range(1, 100):
        star.add_bind(f"u{i}", "r", at(i))
        line.add_bind(f"u{i}", f"u{i - 1}" if i > 1 else "r", at(i))
    assert star.virality == pytest.approx(2 * 99 * 99 / (100 * 99))  # 99 root pairs at 1, the rest at 2
    assert line.virality == pytest.approx(101 / 3)  # mean distance on a path of n nodes is (n + 1) / 3


# -- K-factor and generations -------------------------------------------------------------------------


def test_k_is_binds_over_distinct_sharers_in_a_half_open_window() -> None:
    stats = CampaignStats("c", CascadeConfig(k_window_ms=HOUR))
    assert stats.k_factor(at(0), at(60)) == 0.0  # no sharers
    stats.add_share("s1", 0, at(0))
    stats.add_share("s1", 0, at(5))  # the same sharer again counts once
    stats.add_share("s2", 0, at(10))
    for i, minute in enumerate((1, 2, 30, 59.9, 60)):
        stats.add_bind(f"b{i}", 1, at(minute))
    assert stats.k_factor(at(0), at(60)) == 4 / 2  # the bind at minute 60 is in the next window
    assert stats.k_factor(at(60), at(120)) == 0.0  # a bind but no sharer
    assert stats.sliding_k(at(60)) == 2.0
    assert stats.sliding_k(at(61)) == 5 / 2  # [1, 61): s1 (its second share) and s2; five binds
    assert stats.k_factor(at(6), at(66)) == 3 / 1  # s1 has no share left in [6, 66)


def test_generation_ratios_per_campaign_and_per_cascade() -> None:
    monitor = CascadeMonitor()
    monitor.apply_outcome(shared("a", "a", 0, 0))
    monitor.apply_outcome(shared("b", "b", 0, 0))
    for user in ("a1", "a2", "a3"):
        monitor.apply_outcome(bound(user, "a", "a", 1, 1))
    monitor.apply_outcome(bound("b1", "b", "b", 1, 1))
    monitor.apply_outcome(shared("a1", "a", 1, 2))  # a bound user's share is not a new node
    for user in ("a11", "a12"):
        monitor.apply_outcome(bound(user, "a1", "a", 2, 3))
    assert monitor.campaigns["c"].per_depth == [2, 4, 2]
    assert monitor.campaigns["c"].generation_ratios() == [2.0, 0.5]
    assert monitor.trackers[("c", "a")].generation_ratios() == [3.0, 2 / 3]
    assert monitor.trackers[("c", "b")].generation_ratios() == [1.0]


# -- stalled cascades ---------------------------------------------------------------------------------


def kinds(alerts: list[Alert]) -> list[tuple[str, str, str, int]]:
    return [(a.root, a.kind, a.state, a.ts) for a in alerts]


def stalls(alerts: list[Alert]) -> list[tuple[str, str, str, int]]:
    """Stall alerts only: the long clocks of these tests also close K windows, which other tests cover."""
    return kinds([a for a in alerts if a.kind == STALLED])


def test_a_stall_fires_once_per_episode_and_clears_when_the_cascade_grows() -> None:
    monitor = CascadeMonitor()
    chain(monitor, "r", binds=11)  # size 12, one bind a minute: threshold max(10 min, 5 x 1 min)
    last = at(11)
    assert monitor.check(last + 10 * MINUTE) == []  # not past the threshold yet
    fired = monitor.check(last + 10 * MINUTE + 1)
    assert kinds(fired) == [("r", STALLED, FIRING, last + 10 * MINUTE)]
    assert fired[0].detail["size"] == 12 and fired[0].detail["threshold_ms"] == 10 * MINUTE
    assert monitor.check(last + 60 * MINUTE) == []  # still the same episode
    assert monitor.stalled() == {"c": 1}

    monitor.apply_outcome(bound("late", "r", "r", 1, 75))
    monitor.apply_outcome(bound("later", "r", "r", 1, 76))
    assert kinds(monitor.check(at(76))) == [("r", STALLED, RESOLVED, at(75))]  # the bind that ended it
    assert monitor.stalled() == {}
    assert kinds(monitor.check(at(76) + 11 * MINUTE)) == [("r", STALLED, FIRING, at(76) + 10 * MINUTE)]


def test_small_cascades_never_stall() -> None:
    monitor = CascadeMonitor(CascadeConfig(min_size=10))
    chain(monitor, "r", binds=8)  # size 9
    assert stalls(monitor.check(at(10_000))) == []
    monitor.apply_outcome(bound("tenth", "r", "r", 1, 9))
    assert stalls(monitor.check(at(10_000))) == [("r", STALLED, FIRING, at(19))]


def test_the_threshold_is_stall_factor_times_the_median_of_the_last_twenty_gaps() -> None:
    tracker = CascadeTracker("c", "r", CascadeConfig())
    minute = 0.0
    for i in range(30):  # ten early binds an hour apart, then twenty binds every 4 minutes
        minute += 60 if i < 10 else 4
        tracker.add_bind(f"u{i}", "r", at(minute))
    assert tracker.median_gap() == 4 * MINUTE  # only the last 20 binds count
    assert tracker.stall_threshold() == 20 * MINUTE
    assert not tracker.stalled(at(minute + 20))
    assert tracker.stalled(at(minute + 20) + 1)
    fast = CascadeTracker("c", "r", CascadeConfig())
    for i in range(20):
        fast.add_bind(f"u{i}", "r", at(i / 60))  # one a second: the 10-minute floor applies
    assert fast.stall_threshold() == 10 * MINUTE


def test_a_check_only_uses_the_time_of_each_campaign_that_it_is_given() -> None:
    monitor = CascadeMonitor()
    chain(monitor, "r", binds=11)
    assert monitor.check({"other": at(500)}) == []
    assert monitor.watermark == {"c": at(11)}
    assert monitor.clock() == {"c": at(10)}  # a minute of lateness for events still in flight
    assert stalls(monitor.check({"c": at(500)})) == [("r", STALLED, FIRING, at(21))]


# -- K below one --------------------------------------------------------------------------------------


def test_k_below_one_fires_after_n_closed_windows_and_resolves_when_k_recovers() -> None:
    config = CascadeConfig(k_window_ms=HOUR, k_windows_below=3)
    stats = CampaignStats("c", config)

    def hour(h: int, sharers: int, binds: int) -> None:
        for i in range(sharers):
            stats.add_share(f"s{h}-{i}", 0, at(h * 60 + i))
        for i in range(binds):
            stats.add_bind(f"b{h}-{i}", 1, at(h * 60 + 30 + i))

    hour(0, 2, 4)  # K = 2
    for h in (1, 2, 3):
        hour(h, 4, 2)  # K = 0.5
    assert stats.check(at(4 * 60) - 1) == []  # the window of hour 3 is not closed yet
    fired = stats.check(at(4 * 60))
    assert kinds(fired) == [("", K_BELOW_ONE, FIRING, at(4 * 60))]
    assert fired[0].detail["k"] == 0.5 and fired[0].detail["windows_below"] == 3
    hour(4, 1, 1)  # K = 1: not below one
    assert stats.check(at(4 * 60 + 59)) == []
    assert kinds(stats.check(at(5 * 60))) == [("", K_BELOW_ONE, RESOLVED, at(5 * 60))]
    assert stats.check(at(7 * 60)) == []  # two empty windows: K = 0, but not three yet
    assert kinds(stats.check(at(8 * 60))) == [("", K_BELOW_ONE, FIRING, at(8 * 60))]


def test_old_shares_and_binds_are_pruned_once_judged() -> None:
    stats = CampaignStats("c", CascadeConfig(k_window_ms=HOUR))
    for h in range(10):
        stats.add_share(f"s{h}", 0, at(h * 60))
        stats.add_bind(f"b{h}", 1, at(h * 60 + 1))
    stats.check(at(9 * 60 + 30))  # judged up to the window ending at 9:00; the sliding K needs [8:30, 9:30)
    assert stats.shares == [(at(9 * 60), "s9")] and stats.bind_times == [at(9 * 60 + 1)]


# -- idempotency and restarts -------------------------------------------------------------------------


def feed(monitor: CascadeMonitor) -> None:
    chain(monitor, "r", binds=3)
    monitor.apply_outcome(purchase("p1", "r-1", "r", 10_000, 4))
    monitor.apply_outcome(rejected("f1", "r-2", "r", "self_referral", 5))
    monitor.apply_outcome(rejected("f2", "x", None, "device_limit", 5))  # in no cascade: counted nowhere
    monitor.apply_entry(entry("e1", "r", 100, "bind_scanner", 1))
    monitor.apply_entry(entry("e2", "r", 800, "commission", 4))
    monitor.apply_entry(entry("e3", "r", -800, "clawback", 6))


def test_redelivered_outcomes_and_entries_change_nothing() -> None:
    once, twice = CascadeMonitor(), CascadeMonitor()
    feed(once)
    feed(twice)
    assert twice.take_changed()
    chain(twice, "r", binds=3)
    assert not twice.apply_outcome(purchase("p1", "r-1", "r", 10_000, 4))
    assert not twice.apply_entry(entry("e2", "r", 800, "commission", 4))
    feed(twice)
    assert twice.take_changed() == []  # nothing changed, nothing to snapshot
    summary = twice.trackers[("c", "r")].summary()
    assert summary == once.trackers[("c", "r")].summary()
    assert (summary.size, summary.binds, summary.revenue) == (4, 3, 10_000)
    assert (summary.rewards, summary.clawbacks) == (900, 800)
    assert summary.fraud == 1 and summary.fraud_rate == 1 / 4
    assert summary.return_on_rewards == pytest.approx(10_000 / 900)
    assert twice.campaigns["c"].per_depth == once.campaigns["c"].per_depth == [1, 1, 1, 1]
    assert twice.campaigns["c"].bind_times == once.campaigns["c"].bind_times


def test_a_restored_monitor_does_not_fire_an_open_episode_again_and_resolves_it() -> None:
    first = CascadeMonitor()
    chain(first, "r", binds=11)
    published = first.check(at(30))
    assert kinds(published) == [("r", STALLED, FIRING, at(21))]

    restarted = CascadeMonitor()
    restarted.restore(Alert.from_dict(a.to_dict()) for a in published)
    chain(restarted, "r", binds=11)  # the state rebuilt from the repartitioned log
    assert restarted.check(at(30)) == []
    assert restarted.stalled() == {"c": 1}
    restarted.apply_outcome(bound("new", "r", "r", 1, 40))
    resolved = restarted.check(at(40))
    assert kinds(resolved) == [("r", STALLED, RESOLVED, at(40))]
    assert resolved[0].alert_id == Alert("c", "r", STALLED, RESOLVED, at(40), {}).alert_id


def test_a_restored_k_episode_continues_after_the_window_it_judged() -> None:
    config = CascadeConfig(k_window_ms=HOUR, k_windows_below=2)
    monitor = CascadeMonitor(config)
    monitor.restore([Alert("c", "", K_BELOW_ONE, FIRING, at(120), {})])
    monitor.apply_outcome(shared("s", "s", 0, 0))  # history before the restored alert is not judged again
    monitor.apply_outcome(shared("t", "t", 0, 130))
    monitor.apply_outcome(bound("u", "t", "t", 1, 131))
    assert kinds(monitor.check(at(180))) == [("", K_BELOW_ONE, RESOLVED, at(180))]


# -- leaderboard --------------------------------------------------------------------------------------


def test_leaderboard_orders_by_the_chosen_number() -> None:
    monitor = CascadeMonitor()
    chain(monitor, "deep", binds=5)
    monitor.apply_outcome(shared("wide", "wide", 0, 0))
    for i in range(7):
        monitor.apply_outcome(bound(f"w{i}", "wide", "wide", 1, i))
    monitor.apply_outcome(shared("rich", "rich", 0, 0))
    monitor.apply_outcome(bound("r1", "rich", "rich", 1, 1))
    monitor.apply_outcome(purchase("p", "r1", "rich", 50_000, 2))
    monitor.apply_entry(entry("e", "rich", 5_000, "commission", 2))
    summaries = [t.summary() for t in monitor.trackers.values()]
    assert [s.root for s in leaderboard(summaries, by="size")] == ["wide", "deep", "rich"]
    assert [s.root for s in leaderboard(summaries, by="max_depth", limit=1)] == ["deep"]
    assert [s.root for s in leaderboard(summaries, by="revenue", limit=1)] == ["rich"]
    assert [s.root for s in leaderboard(summaries, by="rewards", limit=1)] == ["rich"]
    with pytest.raises(ValueError):
        leaderboard(summaries, by="fraud")
