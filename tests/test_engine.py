"""How the engine drives a batch: arrival order for order-dependent limits, few round trips."""

from __future__ import annotations

from attribution.campaigns import parse_campaigns
from tests.conftest import BASE_CAMPAIGN, ev

TWO_CAMPAIGNS = parse_campaigns({"campaigns": [
    {**BASE_CAMPAIGN, "limits": {"max_binds_per_device": 1}},
    {**BASE_CAMPAIGN, "id": "c2"},
]})


def test_device_slots_go_to_scans_in_arrival_order_within_a_batch(run_factory) -> None:
    run = run_factory(TWO_CAMPAIGNS)
    run.feed(
        ev("z0", "purchase", "zed", 0, campaign="c2", order_id="o0", amount=100),
        ev("k", "share", "kol", 1, share_id="k1"),
        ev("x1", "scan", "xia", 3, share_id="k1", device_id="phone"),
        ev("z1", "scan", "zed", 4, share_id="k1", device_id="phone"),
    )
    assert run.outcome("x1")["outcome"] == "bound"
    assert (run.outcome("z1")["outcome"], run.outcome("z1")["reason"]) == ("rejected", "device_limit")


def test_a_batch_of_simple_events_needs_at_most_three_fetch_rounds(run_factory) -> None:
    run = run_factory()
    shares = [ev(f"s{i}", "share", f"kol{i}", 1, share_id=f"k{i}") for i in range(300)]
    scans = [ev(f"b{i}", "scan", f"fan{i}", 2, share_id=f"k{i}") for i in range(300)]
    buys = [ev(f"p{i}", "purchase", f"fan{i}", 3, order_id=f"o{i}", amount=5000) for i in range(300)]
    result = run.feed(*shares, *scans, *buys)
    assert sum(o.outcome == "purchase_attributed" for o in result.outcomes) == 300
    assert result.fetch_rounds <= 3


def test_an_id_claimed_ahead_by_a_duplicate_event_is_given_back(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"))
    run.feed(ev("k1", "share", "kol", 2, share_id="Y"), ev("p1", "purchase", "kol", 2, order_id="o1", amount=10))
    run.feed(ev("p1", "purchase", "kol", 3, order_id="o2", amount=10))
    run.feed(ev("k2", "share", "kol", 4, share_id="Y"), ev("p2", "purchase", "amy", 4, order_id="o2", amount=10))
    assert run.outcome("k2")["outcome"] == "shared"
    assert run.outcome("p2")["outcome"] == "purchase_unattributed"
