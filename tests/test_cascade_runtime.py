"""The cascade agent's runtime: gauges belong to the process that holds the campaign's partitions."""

from __future__ import annotations

from prometheus_client import REGISTRY

from attribution.cascades import OUTCOME, CascadeMonitor, routes
from stream.cascades import CascadeRuntime
from tests.test_cascades import bound, chain, shared


def gauge(name: str, campaign: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"campaign": campaign})


def test_gauges_of_a_campaign_whose_partitions_moved_away_are_removed() -> None:
    monitor = CascadeMonitor()
    for row in (shared("kol", "kol", 0, 0, campaign="moving"), bound("amy", "kol", "kol", 1, 1, campaign="moving")):
        for key, record in routes(OUTCOME, row):
            monitor.apply(key, record)
    runtime = CascadeRuntime(rebuild=lambda partition: CascadeMonitor())
    runtime.monitors[0] = monitor
    runtime.check()
    assert gauge("fission_k_factor", "moving") is not None
    assert gauge("fission_stalled_cascades", "moving") == 0
    runtime.monitors.clear()  # the partition went to another process
    runtime.check()
    assert gauge("fission_k_factor", "moving") is None
    assert gauge("fission_stalled_cascades", "moving") is None


def test_a_stalled_cascade_shows_in_the_gauge() -> None:
    monitor = CascadeMonitor()
    chain(monitor, "seed", binds=12, every=1)
    for key, record in routes(OUTCOME, bound("late", "x", "other", 1, 24 * 60)):
        monitor.apply(key, record)
    runtime = CascadeRuntime(rebuild=lambda partition: CascadeMonitor())
    runtime.monitors[0] = monitor
    runtime.check()
    assert gauge("fission_stalled_cascades", "c") == 1
