"""ClickHouse sink: one schema on the 18.16 server and on chDB, columnar inserts, exact aggregates, no double
counting after a crash, and buffering with backpressure while ClickHouse is down."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from sinks import clickhouse
from sinks.clickhouse import (
    Backend,
    ChdbBackend,
    ClickHouseSink,
    ServerBackend,
    SinkBackpressure,
    migrate,
    migrations,
)

EXPECTED = Path(__file__).resolve().parent.parent / "examples" / "expected"
T0 = 1767225600000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
DOWN_URL = "clickhouse://127.0.0.1:1/default"  # nothing listens on port 1


def load(name: str, limit: int | None = None) -> list[dict]:
    with (EXPECTED / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f][:limit]


class Target:
    """An empty database on one backend; ``open()`` gives a backend on it, as a freshly started process would."""

    def __init__(self, database: str, factory: Callable[[], Backend]) -> None:
        self.database = database
        self.factory = factory
        self.opened: list[Backend] = []

    def open(self) -> Backend:
        backend = self.factory()
        self.opened.append(backend)
        return backend

    def crash(self, backend: Backend) -> Backend:
        """Drop a backend without flushing anything more, and open a new one (a process restart)."""
        backend.close()
        self.opened.remove(backend)
        return self.open()

    def close(self) -> None:
        for backend in self.opened:
            backend.close()


@pytest.fixture(params=["server", "chdb"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The 18.16 server (a database dropped afterwards) or chDB in ``tmp_path``."""
    if request.param == "server":
        url = request.getfixturevalue("clickhouse_url")
        found = Target(request.getfixturevalue("clickhouse_database"), lambda: ServerBackend(url))
    else:
        found = Target("fission", lambda: ChdbBackend(tmp_path / "chdb"))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def migrated(target: Target) -> tuple[Backend, str]:
    backend = target.open()
    migrate(backend, target.database)
    return backend, target.database


class FakeClock:
    """Time that moves only when told to, so backoff is tested without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Switchable:
    """A backend that fails every call while ``down`` (or for the next ``fail_times`` calls)."""

    def __init__(self, real: Backend, down: bool = False, fail_times: int = 0) -> None:
        self.real = real
        self.down = down
        self.fail_times = fail_times
        self.calls = 0
        self.insert_sizes: list[int] = []

    def _gate(self) -> None:
        self.calls += 1
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("simulated outage")
        if self.down:
            raise ConnectionError("simulated outage")

    def execute(self, sql: str) -> None:
        self._gate()
        self.real.execute(sql)

    def query(self, sql: str) -> list[tuple]:
        self._gate()
        return self.real.query(sql)

    def insert(self, table: str, columns: dict[str, Sequence[Any]]) -> None:
        self._gate()
        self.insert_sizes.append(len(next(iter(columns.values()))))
        self.real.insert(table, columns)

    def version(self) -> str:
        return self.real.version()

    def close(self) -> None:
        self.real.close()


class LandsThenFails(Switchable):
    """The first insert reaches ClickHouse but the client sees an error (a timeout after the write)."""

    def insert(self, table: str, columns: dict[str, Sequence[Any]]) -> None:
        self.real.insert(table, columns)
        if not self.insert_sizes:
            self.insert_sizes.append(0)
            raise TimeoutError("simulated timeout after the insert landed")


def scalar(backend: Backend, sql: str) -> Any:
    return backend.query(sql)[0][0]


def counts(backend: Backend, db: str) -> dict[str, int]:
    """Row counts without FINAL, and the rows the views counted: aggregate states never collapse, so a
    duplicate insert shows there even after a background merge (which chDB may run at once) removed it
    from a ReplacingMergeTree."""
    found = {t: scalar(backend, f"SELECT count() FROM {db}.{t}") for t in ("outcomes", "ledger", "nodes", "fraud")}
    found["viewed"] = scalar(backend, f"SELECT countMerge(events) FROM {db}.campaign_minute") + scalar(
        backend, f"SELECT countMerge(entries) FROM {db}.ledger_minute")
    return found


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


ONCE = {"outcomes": 12, "ledger": 9, "nodes": 5, "fraud": 1, "viewed": 21}  # known_rows(), each inserted once


# -- a known set of rows --------------------------------------------------------------------------------


def outcome(oid: str, kind: str, user: str, result: str, minute: int, campaign: str = "c", **more: Any) -> dict:
    row = {"outcome_id": oid, "event_id": f"ev-{oid}", "campaign": campaign, "type": kind, "user_id": user,
           "outcome": result, "reason": None, "parent": None, "root": None, "depth": None, "ts": T0 + minute * MINUTE,
           "detail": None, "budget_exhausted": [], "partition": 0, "offset": int(oid[1:])}
    row.update(more)
    return row


def entry(eid: str, beneficiary: str, amount: int, kind: str, minute: int, root: str = "s1", level: int = 0) -> dict:
    return {"entry_id": eid, "campaign": "c", "beneficiary": beneficiary, "amount": amount, "kind": kind,
            "level": level, "source_event_id": f"ev-{eid}", "source_user": beneficiary, "ts": T0 + minute * MINUTE,
            "root": root}


def known_rows() -> tuple[list[dict], list[dict], list[dict]]:
    """Cascade s1 (s1 -> b1, b2; b1 -> b3; b3 buys 10000) in campaign c, an organic buyer, a fraud rejection,
    and cascade s9 in campaign c2."""
    lineage = {"s1": (None, "s1", 0), "b1": ("s1", "s1", 1), "b2": ("s1", "s1", 1), "b3": ("b1", "s1", 2)}

    def of(user: str) -> dict:
        parent, root, depth = lineage[user]
        return {"parent": parent, "root": root, "depth": depth}

    outcomes = [
        outcome("o1", "share", "s1", "shared", 0, **of("s1")),
        outcome("o2", "share", "s1", "shared", 0, **of("s1")),
        outcome("o3", "scan", "b1", "bound", 0, **of("b1")),
        outcome("o4", "scan", "b2", "bound", 1, **of("b2")),
        outcome("o5", "share", "b1", "shared", 1, **of("b1")),
        outcome("o6", "scan", "b3", "bound", 1, **of("b3")),
        outcome("o7", "purchase", "b3", "purchase_attributed", 2, amount=10000, **of("b3"),
                budget_exhausted=[{"beneficiary": "s1", "amount": 30, "kind": "commission", "level": 2}]),
        outcome("o8", "purchase", "z1", "purchase_unattributed", 2, amount=500),
        outcome("o9", "scan", "s1", "rejected", 2, reason="self_referral", **of("s1")),
        outcome("o10", "scan", "b1", "duplicate", 2, **of("b1")),
        outcome("o11", "share", "s9", "shared", 0, campaign="c2", root="s9", depth=0),
        outcome("o12", "scan", "b9", "bound", 0, campaign="c2", parent="s9", root="s9", depth=1),
    ]
    entries = [
        entry("e1", "b1", 100, "bind_scanner", 0),
        entry("e2", "s1", 20, "bind_sharer", 0),
        entry("e3", "b2", 100, "bind_scanner", 1),
        entry("e4", "s1", 20, "bind_sharer", 1),
        entry("e5", "b3", 100, "bind_scanner", 1),
        entry("e6", "b1", 20, "bind_sharer", 1),
        entry("e7", "b1", 800, "commission", 2, level=1),
        entry("e8", "b1", 500, "first_purchase", 2),
        entry("e9", "b1", -800, "clawback", 3, level=1),
    ]
    nodes = [
        {"campaign": "c", "user_id": u, "state": "seed" if u == "s1" else "bound", **of(u), "entered_at": T0}
        for u in lineage
    ] + [{"campaign": "c", "user_id": "z1", "state": "organic", "parent": None, "root": None, "depth": None,
          "entered_at": T0 + 2 * MINUTE}]
    return outcomes, entries, nodes


def aggregates(backend: Backend, db: str) -> dict[str, list[tuple]]:
    """What the dashboards read from the per-minute views, merged with the -Merge functions."""
    return {
        "campaign": backend.query(
            f"SELECT campaign, toUInt32(minute), type, outcome, reason, countMerge(events), uniqMerge(users), "
            f"sumMerge(amount_sum), sumMerge(budget_cut_sum) FROM {db}.campaign_minute "
            "GROUP BY campaign, minute, type, outcome, reason ORDER BY campaign, minute, type, outcome, reason"),
        "sharers": backend.query(
            f"SELECT campaign, uniqMerge(users) FROM {db}.campaign_minute WHERE outcome = 'shared' "
            "GROUP BY campaign ORDER BY campaign"),
        "rewards": backend.query(
            f"SELECT campaign, kind, countMerge(entries), sumMerge(paid), sumMerge(clawed_back) "
            f"FROM {db}.ledger_minute GROUP BY campaign, kind ORDER BY campaign, kind"),
        "cascade": backend.query(
            f"SELECT campaign, root, sumMerge(binds), maxMerge(max_depth), sumMerge(purchases), sumMerge(revenue) "
            f"FROM {db}.cascade_minute GROUP BY campaign, root ORDER BY campaign, root"),
        "cascade_rewards": backend.query(
            f"SELECT campaign, root, sumMerge(paid), sumMerge(clawed_back) FROM {db}.cascade_rewards_minute "
            "GROUP BY campaign, root ORDER BY campaign, root"),
        "depth": backend.query(
            f"SELECT campaign, depth, outcome, countMerge(events), uniqMerge(users) FROM {db}.depth_minute "
            "GROUP BY campaign, depth, outcome ORDER BY campaign, depth, outcome"),
    }


# -- schema -------------------------------------------------------------------------------------------


def test_migrations_apply_once_and_rerun_changes_nothing(target: Target) -> None:
    backend = target.open()
    db = target.database
    assert migrate(backend, db) == [version for version, _, _ in migrations()]
    tables = backend.query(f"SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name")
    assert migrate(backend, db) == []
    backend = target.crash(backend)
    assert migrate(backend, db) == []
    assert backend.query(f"SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name") == tables
    assert backend.query(f"SELECT version, name FROM {db}.schema_migrations ORDER BY version") == [
        (version, name) for version, name, _ in migrations()]
    assert {"outcomes", "ledger", "nodes", "alerts", "fraud", "campaign_minute", "cascade_minute",
            "depth_minute"} <= {name for (name,) in tables}


def test_same_ddl_gives_the_same_tables_on_the_server_and_on_chdb(
    clickhouse_url: str, clickhouse_database: str, tmp_path: Path
) -> None:
    server, embedded = ServerBackend(clickhouse_url), ChdbBackend(tmp_path / "chdb")
    try:
        migrate(server, clickhouse_database)
        migrate(embedded, clickhouse_database)
        tables = (f"SELECT name, engine, sorting_key, partition_key FROM system.tables "
                  f"WHERE database = '{clickhouse_database}' ORDER BY name")
        # views' own columns are left out: 18.16 types toStartOfMinute() as DateTime('Etc/UTC')
        columns = (f"SELECT table, name, type, default_kind, default_expression FROM system.columns "
                   f"WHERE database = '{clickhouse_database}' AND NOT endsWith(table, '_mv') ORDER BY table, name")
        assert all(v[:1].isdigit() for v in (server.version(), embedded.version()))
        assert server.query(tables) == embedded.query(tables)
        assert server.query(columns) == embedded.query(columns)
    finally:
        server.close()
        embedded.close()


def test_migrate_refuses_a_database_name_that_is_not_an_identifier(target: Target) -> None:
    with pytest.raises(ValueError, match="identifier"):
        migrate(target.open(), "x; DROP DATABASE default")


# -- rows ---------------------------------------------------------------------------------------------


def test_rows_round_trip_with_nulls_as_empty_and_minus_one(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    outcomes = load("outcomes", 300) + [outcome("o99", "purchase", "ü \"q\" 🎉\n|:{}", "purchase_attributed", 5,
                                                amount=1234, root="r", depth=3, parent="p", budget_exhausted=[
                                                    {"amount": 7}, {"amount": 5}])]
    entries, nodes = load("ledger", 300), load("nodes", 300)
    sink = ClickHouseSink(backend, db)
    sink.add(outcomes, entries, nodes)
    assert sink.flush()

    got = backend.query(
        f"SELECT outcome_id, event_id, campaign, type, user_id, outcome, reason, parent, root, depth, ts, "
        f"toUInt32(event_time), partition, offset, amount, budget_cut, detail FROM {db}.outcomes ORDER BY outcome_id")
    assert got == sorted(
        (o["outcome_id"], o["event_id"] or "", o["campaign"] or "", o["type"] or "", o["user_id"] or "",
         o["outcome"], o["reason"] or "", o["parent"] or "", o["root"] or "",
         -1 if o["depth"] is None else o["depth"], o["ts"] or 0, (o["ts"] or 0) // 1000, o["partition"],
         o["offset"], o.get("amount") or 0, sum(c["amount"] for c in o["budget_exhausted"]), o["detail"] or "")
        for o in outcomes)
    got = backend.query(f"SELECT entry_id, campaign, beneficiary, amount, kind, level, source_event_id, source_user, "
                        f"root, ts FROM {db}.ledger ORDER BY entry_id")
    assert got == sorted(tuple(e[k] for k in ("entry_id", "campaign", "beneficiary", "amount", "kind", "level",
                                              "source_event_id", "source_user", "root", "ts")) for e in entries)
    got = backend.query(f"SELECT campaign, user_id, state, parent, root, depth, entered_at FROM {db}.nodes "
                        "ORDER BY campaign, user_id")
    assert got == sorted((n["campaign"], n["user_id"], n["state"], n["parent"] or "", n["root"] or "",
                          -1 if n["depth"] is None else n["depth"], n["entered_at"]) for n in nodes)


def test_ten_thousand_rows_go_in_as_two_columnar_inserts(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    spy = Switchable(backend)
    rows = [dict(o, outcome_id=f"big-{i}") for i, o in enumerate(load("outcomes") * 2)]
    sink = ClickHouseSink(spy, db, batch_rows=5000)
    sink.add(rows)
    assert sink.flush()
    assert spy.insert_sizes == [5000, 5000]
    assert sink.inserted_rows["outcomes"] == 10_000
    assert scalar(backend, f"SELECT count() FROM {db}.outcomes") == 10_000


def test_node_keeps_its_latest_state(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    organic = {"campaign": "c", "user_id": "u", "state": "organic", "parent": None, "root": None, "depth": None,
               "entered_at": T0}
    seed = dict(organic, state="seed", root="u", depth=0)
    sink = ClickHouseSink(backend, db)
    sink.add(nodes=[organic])
    assert sink.flush()
    sink.add(nodes=[seed, organic])  # the organic row again (a later touch) is the same version: filtered
    assert sink.flush()
    assert sink.inserted_rows["nodes"] == 2
    assert backend.query(f"SELECT state, root, depth FROM {db}.nodes FINAL") == [("seed", "u", 0)]


# -- aggregates ---------------------------------------------------------------------------------------


def test_aggregates_per_campaign_root_and_depth_are_exact(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    sink = ClickHouseSink(backend, db)
    sink.add(*known_rows())
    assert sink.flush()
    agg = aggregates(backend, db)
    minute = T0 // 1000
    binds = [row for row in agg["campaign"] if row[0] == "c" and row[3] == "bound"]
    assert [(m - minute, n) for _, m, _, _, _, n, _, _, _ in binds] == [(0, 1), (60, 2)]
    by_outcome: dict[tuple[str, str], list[int]] = {}
    for campaign, _, _, result, _, events, _, amount, cut in agg["campaign"]:
        total = by_outcome.setdefault((campaign, result), [0, 0, 0])
        total[0] += events
        total[1] += amount
        total[2] += cut
    assert by_outcome[("c", "shared")][0] == 3
    assert by_outcome[("c", "purchase_attributed")] == [1, 10000, 30]
    assert by_outcome[("c", "purchase_unattributed")] == [1, 500, 0]
    assert agg["sharers"] == [("c", 2), ("c2", 1)]
    assert agg["rewards"] == [("c", "bind_scanner", 3, 300, 0), ("c", "bind_sharer", 3, 60, 0),
                              ("c", "clawback", 1, 0, 800), ("c", "commission", 1, 800, 0),
                              ("c", "first_purchase", 1, 500, 0)]
    assert agg["cascade"] == [("c", "s1", 3, 2, 1, 10000), ("c2", "s9", 1, 1, 0, 0)]
    assert agg["cascade_rewards"] == [("c", "s1", 1660, 800)]
    assert agg["depth"] == [("c", 0, "shared", 2, 1), ("c", 1, "bound", 2, 2), ("c", 1, "shared", 1, 1),
                            ("c", 2, "bound", 1, 1), ("c2", 0, "shared", 1, 1), ("c2", 1, "bound", 1, 1)]
    assert backend.query(f"SELECT outcome_id, user_id, reason, root FROM {db}.fraud") == [
        ("o9", "s1", "self_referral", "s1")]


# -- idempotency --------------------------------------------------------------------------------------


def test_redelivery_after_a_crash_inserts_nothing_twice(target: Target) -> None:
    backend = target.open()
    db = target.database
    migrate(backend, db)
    outcomes, entries, nodes = known_rows()
    first = ClickHouseSink(backend, db)
    first.add(outcomes, entries, nodes)
    assert first.flush()
    before, aggregated = counts(backend, db), aggregates(backend, db)

    backend = target.crash(backend)  # the process dies after the insert, before committing its input
    restarted = ClickHouseSink(backend, db)
    extra = outcome("o13", "share", "s3", "shared", 3, campaign="c3", root="s3", depth=0)
    restarted.add(outcomes + [extra], entries, nodes)  # the uncommitted batch runs again, plus a new event
    assert restarted.flush()

    assert restarted.inserted_rows == {"outcomes": 1, "ledger": 0, "nodes": 0}
    assert restarted.skipped_duplicates == {"outcomes": 12, "ledger": 9, "nodes": 5}
    assert counts(backend, db) == dict(before, outcomes=before["outcomes"] + 1, viewed=before["viewed"] + 1)
    after = aggregates(backend, db)
    assert after["cascade"] == aggregated["cascade"] + [("c3", "s3", 0, 0, 0, 0)]
    assert {k: [row for row in rows if row[0] != "c3"] for k, rows in after.items()} == aggregated


def test_repeats_inside_and_across_unflushed_batches_are_inserted_once(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    outcomes, entries, nodes = known_rows()
    sink = ClickHouseSink(backend, db)
    sink.add(outcomes + outcomes, entries, nodes)
    sink.add(outcomes, entries + entries, nodes)
    assert sink.buffered_rows == len(outcomes) + len(entries) + len(nodes)
    assert sink.flush()
    assert counts(backend, db) == ONCE


def test_insert_that_landed_despite_an_error_is_not_repeated(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    clock = FakeClock()
    sink = ClickHouseSink(LandsThenFails(backend), db, clock=clock)
    sink.add(*known_rows())
    assert not sink.flush()
    assert sink.last_error is not None and "TimeoutError" in sink.last_error
    clock.sleep(60)
    assert sink.flush()
    assert sink.skipped_duplicates["outcomes"] == 12
    assert counts(backend, db) == ONCE
    assert aggregates(backend, db)["cascade"][0] == ("c", "s1", 3, 2, 1, 10000)


def test_new_owner_of_partitions_skips_what_the_old_owner_wrote_after_resync(
    migrated: tuple[Backend, str],
) -> None:
    backend, db = migrated
    outcomes, entries, nodes = known_rows()
    new_owner = ClickHouseSink(backend, db)
    new_owner.add(outcomes[:1])
    assert new_owner.flush()  # has loaded the recent ids already
    old_owner = ClickHouseSink(backend, db)
    old_owner.add(outcomes, entries, nodes)
    assert old_owner.flush()
    new_owner.resync()  # partitions were reassigned: the old owner's uncommitted rows come again
    new_owner.add(outcomes, entries, nodes)
    assert new_owner.flush()
    assert counts(backend, db) == ONCE


# -- ClickHouse down ----------------------------------------------------------------------------------


def test_clickhouse_down_buffers_rows_and_reports_unhealthy(clickhouse_url: str, clickhouse_database: str) -> None:
    clock = FakeClock()
    failures = metric("fission_sink_insert_failures_total", {"table": "load_ids"})
    sink = ClickHouseSink(ServerBackend(DOWN_URL, connect_timeout_s=0.5), clickhouse_database, clock=clock)
    outcomes, entries, nodes = known_rows()
    sink.add(outcomes, entries, nodes)
    assert not sink.flush()
    assert not sink.healthy and sink.last_error
    assert sink.buffered_rows == 26
    assert metric("fission_sink_buffered_rows", {"database": clickhouse_database}) == 26
    assert metric("fission_sink_healthy", {"database": clickhouse_database}) == 0
    assert metric("fission_sink_insert_failures_total", {"table": "load_ids"}) == failures + 1

    real = ServerBackend(clickhouse_url)
    try:
        migrate(real, clickhouse_database)
        sink.backend = real  # ClickHouse is back
        assert not sink.flush()  # still inside the backoff: no attempt
        clock.sleep(sink.retry_at - clock())
        assert sink.flush()
        assert sink.healthy and sink.buffered_rows == 0
        assert metric("fission_sink_buffered_rows", {"database": clickhouse_database}) == 0
        assert counts(real, clickhouse_database) == ONCE
    finally:
        real.close()


def test_retries_back_off_exponentially_up_to_the_cap(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    clock = FakeClock()
    flaky = Switchable(backend, down=True)
    sink = ClickHouseSink(flaky, db, clock=clock, backoff_initial_s=0.5, backoff_max_s=4.0)
    sink.add(*known_rows())
    delays = []
    for _ in range(6):
        calls = flaky.calls
        assert not sink.flush()
        assert flaky.calls == calls + 1
        delays.append(sink.retry_at - clock())
        assert not sink.flush() and flaky.calls == calls + 1  # no attempt before the next allowed time
        clock.sleep(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    flaky.down = False
    assert sink.flush() and sink.failures == 0


def test_drain_sleeps_out_the_backoff_until_rows_are_in(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    clock = FakeClock()
    sink = ClickHouseSink(Switchable(backend, fail_times=3), db, clock=clock, sleep=clock.sleep)
    sink.add(*known_rows())
    assert sink.drain(timeout_s=60)
    assert clock.now == 1000.0 + 0.5 + 1.0 + 2.0
    assert counts(backend, db)["outcomes"] == 12


def test_drain_gives_up_at_its_timeout_and_keeps_the_rows(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    clock = FakeClock()
    sink = ClickHouseSink(Switchable(backend, down=True), db, clock=clock, sleep=clock.sleep)
    sink.add(*known_rows())
    assert not sink.drain(timeout_s=5)
    assert clock.now <= 1005.0 and sink.buffered_rows == 26


def test_full_buffer_refuses_a_batch_whole_and_drops_nothing(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    clock = FakeClock()
    flaky = Switchable(backend, down=True)
    sink = ClickHouseSink(flaky, db, buffer_limit=15, clock=clock)
    outcomes, entries, nodes = known_rows()
    sink.add(outcomes)
    assert not sink.flush()
    refused = metric("fission_sink_backpressure_total")
    with pytest.raises(SinkBackpressure) as caught:
        sink.add(entries=entries)
    assert caught.value.retry_after_s == pytest.approx(0.5)
    assert sink.buffered_rows == 12 and sink.refused_adds == 1
    assert metric("fission_sink_backpressure_total") == refused + 1

    flaky.down = False
    clock.sleep(1)
    assert sink.flush()
    sink.add(entries=entries)  # the caller offers the refused batch again
    sink.add(nodes=nodes)
    assert sink.flush()
    assert counts(backend, db) == ONCE


def test_empty_buffer_takes_a_batch_larger_than_the_limit(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    sink = ClickHouseSink(backend, db, buffer_limit=5)
    sink.add(*known_rows())
    assert sink.buffered_rows == 26
    assert sink.flush()


# -- metrics ------------------------------------------------------------------------------------------


def test_importing_the_module_twice_reuses_its_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("sinks_clickhouse_again", clickhouse.__file__)
    assert spec is not None and spec.loader is not None
    again = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, again)
    spec.loader.exec_module(again)
    assert again.ROWS_INSERTED is clickhouse.ROWS_INSERTED
    assert again.INSERT_SECONDS is clickhouse.INSERT_SECONDS


def test_inserted_rows_and_latency_are_counted_by_table(migrated: tuple[Backend, str]) -> None:
    backend, db = migrated
    before = metric("fission_sink_rows_inserted_total", {"table": "ledger"})
    latencies = metric("fission_sink_insert_seconds_count", {"table": "ledger"})
    sink = ClickHouseSink(backend, db)
    sink.add(*known_rows())
    assert sink.flush()
    assert metric("fission_sink_rows_inserted_total", {"table": "ledger"}) == before + 9
    assert metric("fission_sink_insert_seconds_count", {"table": "ledger"}) == latencies + 1
