"""`fission cascades`: the cascade agent. A thin Faust wrapper over `attribution.cascades.CascadeMonitor`.

Flow (its own Faust app and consumer group, `APP_ID-cascades`):

    PREFIX.outcomes ─┐ route  ┌► PREFIX.cascades-by-root ─► track: one CascadeMonitor per partition
    PREFIX.rewards  ─┘        │  key [campaign, root]: what changes one cascade (binds, revenue, rewards, fraud)
                              └  key [campaign]:       shares and binds for the campaign's K and generations
    timer (check interval):    check at each campaign's event-time watermark ─► PREFIX.alerts, ClickHouse
                               `alerts`, gauges fission_stalled_cascades / fission_k_factor
    timer (snapshot interval): changed cascades ─► ClickHouse `cascade_snapshots`

Why repartition: a cascade's outcomes come from every input partition (they are keyed by user); keyed by
root, one cascade lives in one partition, so its tree can be kept in one process, and partitions spread
cascades over workers. Campaign records are keyed by campaign so K is counted whole in one place.

State and restarts. Monitors live in memory. The repartitioned topic (kept forever) is their log: when a
partition is assigned, its monitor is rebuilt by reading that partition from the beginning to its current
end, and records of that partition wait until the rebuild is done. Records are idempotent (node ids,
outcome and entry ids), so Faust redelivering what the rebuild read changes nothing. Which alert episodes
are open is read back from PREFIX.alerts (also kept forever), so a restart neither fires an open episode
again nor misses its resolution. Alerts are published before ClickHouse gets them; a crash between a check
and the publish re-derives the same alerts (same ids) after the rebuild: at least once, deduplicable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import faust
import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from attribution.campaigns import parse_duration
from attribution.cascades import ENTRY, OUTCOME, Alert, CascadeConfig, CascadeMonitor, CascadeSummary, routes
from sinks.clickhouse import Backend, migrate, open_backend
from stream import metrics
from stream.faustapp import RAW, new_app, run, stop_when_idle
from stream.settings import Settings
from stream.topics import ensure_topics

log = logging.getLogger("fission.cascades")

STALLED_GAUGE = Gauge("fission_stalled_cascades", "Cascades in an open stall episode", ["campaign"])
ALERTS = PromCounter("fission_cascade_alerts", "Cascade alert transitions published", ["kind", "state"])
K_FACTOR = Gauge("fission_k_factor", "Binds per distinct sharer over the last K window (event time)", ["campaign"])
# Both internal topics are logs of record (the monitors are rebuilt from them), so nothing may expire.
KEEP_FOREVER = {"retention.ms": "-1"}
ALERT_COLUMNS = ("campaign", "root", "kind", "state", "ts", "detail")
SNAPSHOT_COLUMNS = ("campaign", "root", "size", "max_depth", "binds", "revenue", "rewards", "clawbacks", "fraud",
                    "virality", "last_bind_ts", "snapshot_ts", "written_at")


@dataclass(frozen=True, slots=True)
class CascadeOptions:
    """What the cascade app needs beyond `Settings` (candidates for settings: see the report)."""

    config: CascadeConfig = field(default_factory=CascadeConfig)
    check_interval_s: float = 5.0
    snapshot_interval_s: float = 60.0
    clickhouse: bool = True  # write alerts and snapshots to ClickHouse (Kafka and metrics only when False)


def cascade_options(settings: Settings, clickhouse: bool = True) -> CascadeOptions:
    """The cascade agent's thresholds and intervals from the settings (YAML / FISSION_* variables)."""
    config = CascadeConfig(
        min_size=settings.stall_min_size,
        stall_min_ms=parse_duration(settings.stall_min, "stall_min"),
        stall_factor=float(settings.stall_factor),
        k_window_ms=parse_duration(settings.k_window, "k_window"),
        k_windows_below=settings.k_windows_below,
        lateness_ms=parse_duration(settings.cascade_lateness, "cascade_lateness"),
    )
    return CascadeOptions(config, settings.cascade_check_interval_ms / 1000,
                          settings.cascade_snapshot_interval_ms / 1000, clickhouse)


@dataclass(frozen=True, slots=True)
class CascadeTopics:
    by_root: str
    alerts: str

    @classmethod
    def of(cls, settings: Settings) -> CascadeTopics:
        return cls(f"{settings.topic_prefix}.cascades-by-root", f"{settings.topic_prefix}.alerts")


# -- Kafka helpers ------------------------------------------------------------------------------------


def ensure_cascade_topics(bootstrap: str, topics: CascadeTopics, partitions: int, replication: int) -> None:
    """Create the internal topics with unlimited retention; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=30).topics)
    wanted = [NewTopic(name, num_partitions=partitions, replication_factor=replication, config=KEEP_FOREVER)
              for name in (topics.by_root, topics.alerts) if name not in existing]
    for name, future in (admin.create_topics(wanted, operation_timeout=30) if wanted else {}).items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a concurrent creator is fine, anything else is not
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {name}: {exc}") from exc


def read_log(bootstrap: str, topic: str, partitions: list[int] | None = None) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every message from the beginning to the end the partitions have now (no group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fission-cascades-rebuild",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        if partitions is None:
            partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        while ends:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            yield message.key(), message.value()
            if message.offset() + 1 >= ends.get(message.partition(), 0):
                ends.pop(message.partition(), None)
    finally:
        consumer.close()


def rebuild_monitor(bootstrap: str, topics: CascadeTopics, config: CascadeConfig, partition: int) -> CascadeMonitor:
    """A monitor holding what one by-root partition has recorded so far, and the alert episodes still open."""
    started = time.monotonic()
    monitor = CascadeMonitor(config)
    monitor.restore(Alert.from_dict(orjson.loads(value)) for _, value in read_log(bootstrap, topics.alerts))
    records = 0
    for key, value in read_log(bootstrap, topics.by_root, [partition]):
        monitor.apply(tuple(orjson.loads(key)), orjson.loads(value))
        records += 1
    log.info("rebuilt partition %s from %d records in %.2fs", partition, records, time.monotonic() - started)
    return monitor


# -- ClickHouse ---------------------------------------------------------------------------------------


def alert_row(alert: Alert) -> tuple:
    return (alert.campaign, alert.root, alert.kind, alert.state, alert.ts, orjson.dumps(alert.detail).decode())


def snapshot_row(summary: CascadeSummary, snapshot_ts: int, written_at: int) -> tuple:
    """`written_at` (processing time, ms) orders rows of one cascade: the latest written is the most complete."""
    s = summary
    return (s.campaign, s.root, s.size, s.max_depth, s.binds, s.revenue, s.rewards, s.clawbacks, s.fraud,
            s.virality, s.last_bind_ts or 0, snapshot_ts, written_at)


class ClickHouseWriter:
    """Alert and snapshot rows into ClickHouse, on one thread (the driver is not thread safe).

    A failed insert keeps its rows for the next write, so ClickHouse being down delays analytics but
    never stops the stream; at most `max_pending` rows per table are kept (the oldest go first: a newer
    snapshot supersedes them, and every alert is also on the alerts topic).
    """

    def __init__(self, backend: Backend, database: str, max_pending: int = 100_000) -> None:
        self.backend, self.database, self.max_pending = backend, database, max_pending
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self.pending: dict[str, tuple[tuple[str, ...], list[tuple]]] = {
            "alerts": (ALERT_COLUMNS, []), "cascade_snapshots": (SNAPSHOT_COLUMNS, [])}

    def write(self, table: str, rows: list[tuple]) -> bool:
        """Insert `rows` and whatever a failed insert left; False (rows kept) when ClickHouse failed."""
        columns, buffered = self.pending[table]
        buffered.extend(rows)
        del buffered[: -self.max_pending]
        if not buffered:
            return True
        try:
            self.backend.insert(f"{self.database}.{table}",
                                dict(zip(columns, zip(*buffered, strict=True), strict=True)))
        except Exception as exc:  # noqa: BLE001 - any failure: keep the rows, try again next time
            log.warning("ClickHouse insert into %s failed, %d rows kept: %s", table, len(buffered), exc)
            return False
        buffered.clear()
        return True

    async def write_async(self, table: str, rows: list[tuple]) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.write, table, rows)


# -- the runtime Faust drives -------------------------------------------------------------------------


class CascadeRuntime:
    """The monitors of the by-root partitions this process owns; Faust feeds records and ticks in.

    Everything here runs on the event loop except rebuilds, which fill a fresh monitor on a thread and
    hand it over only when done, so no monitor is ever touched by two threads.
    """

    def __init__(self, rebuild: Callable[[int], CascadeMonitor]) -> None:
        self.rebuild = rebuild
        self.monitors: dict[int, CascadeMonitor] = {}
        self.rebuilds: dict[int, asyncio.Future[CascadeMonitor]] = {}
        self.assigned: set[int] = set()
        self.assigned_once = False
        self.last_input = time.monotonic()
        self.exported_stalled: set[str] = set()  # campaigns whose gauges this process exports
        self.exported_k: set[str] = set()

    def assign(self, partitions: set[int]) -> None:
        """The new assignment: drop partitions gone, start rebuilding the new ones."""
        for partition in self.assigned - partitions:
            self.monitors.pop(partition, None)
            self.rebuilds.pop(partition, None)
        for partition in partitions - self.assigned:
            self._start_rebuild(partition)
        self.assigned = set(partitions)
        self.assigned_once = True
        self.touch()
        log.info("assigned by-root partitions %s", sorted(partitions))

    def _start_rebuild(self, partition: int) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, self.rebuild, partition)
        self.rebuilds[partition] = future
        future.add_done_callback(partial(self._rebuilt, partition))

    def _rebuilt(self, partition: int, future: asyncio.Future[CascadeMonitor]) -> None:
        """Install a finished rebuild (once; not if the partition was revoked or rebuilt again meanwhile)."""
        if self.rebuilds.get(partition) is not future:
            return
        del self.rebuilds[partition]
        if future.exception() is None:
            self.monitors[partition] = future.result()
        else:
            log.error("rebuilding partition %s failed: %r", partition, future.exception())

    async def monitor(self, partition: int) -> CascadeMonitor | None:
        """The partition's monitor once rebuilt (None if revoked meanwhile). A record may come before the
        assignment signal, so an unknown partition starts its rebuild here."""
        if partition not in self.monitors and partition not in self.rebuilds:
            self.assigned.add(partition)
            self._start_rebuild(partition)
        future = self.rebuilds.get(partition)
        if future is not None:
            await future  # raises if the rebuild failed: the agent crashes rather than count from nothing
            self._rebuilt(partition, future)  # its done callback may not have run yet
        return self.monitors.get(partition)

    def touch(self) -> None:
        self.last_input = time.monotonic()

    def idle_for(self) -> float:
        """Seconds without input since the first assignment, and with no rebuild running."""
        if not self.assigned_once or self.rebuilds:
            return 0.0
        return time.monotonic() - self.last_input

    def ready(self) -> bool:
        return self.assigned_once and not self.rebuilds

    def watermarks(self) -> dict[str, int]:
        """Each campaign's latest event ts seen in any partition of this process."""
        return self._merged([monitor.watermark for monitor in self.monitors.values()])

    def clock(self) -> dict[str, int]:
        """Each campaign's event-time clock (watermark less lateness), the `now` of every check."""
        return self._merged([monitor.clock() for monitor in self.monitors.values()])

    @staticmethod
    def _merged(clocks: list[dict[str, int]]) -> dict[str, int]:
        found: dict[str, int] = {}
        for clock in clocks:
            for campaign, ts in clock.items():
                found[campaign] = max(ts, found.get(campaign, ts))
        return found

    def check(self) -> list[Alert]:
        """Alerts due now, and the gauges updated."""
        clock = self.clock()
        alerts = [alert for monitor in self.monitors.values() for alert in monitor.check(clock)]
        stalled: Counter[str] = Counter()
        k_campaigns: set[str] = set()
        for monitor in self.monitors.values():
            stalled.update(monitor.stalled())
            for campaign, stats in monitor.campaigns.items():
                K_FACTOR.labels(campaign).set(stats.sliding_k(clock[campaign]))
                k_campaigns.add(campaign)
        for campaign in clock:
            STALLED_GAUGE.labels(campaign).set(stalled[campaign])
        self._unexport(STALLED_GAUGE, self.exported_stalled - set(clock))
        self._unexport(K_FACTOR, self.exported_k - k_campaigns)
        self.exported_stalled, self.exported_k = set(clock), k_campaigns
        return alerts

    @staticmethod
    def _unexport(gauge: Gauge, campaigns: set[str]) -> None:
        """Campaigns whose partitions moved to another process: their gauges are the new owner's now."""
        for campaign in campaigns:
            gauge.remove(campaign)

    def snapshots(self) -> list[tuple]:
        """Snapshot rows of the cascades changed since the last call, at their campaign's watermark."""
        watermarks, written_at = self.watermarks(), int(time.time() * 1000)
        return [snapshot_row(s, watermarks[s.campaign], written_at)
                for monitor in self.monitors.values() for s in monitor.take_changed()]


# -- the Faust app ------------------------------------------------------------------------------------


def build_cascade_app(settings: Settings, runtime: CascadeRuntime, writer: ClickHouseWriter | None = None,
                      options: CascadeOptions | None = None, until_idle: float | None = None) -> faust.App:
    """Two agents (route, track), a check timer, a snapshot timer, and the assignment hook."""
    options = options or CascadeOptions()
    topics, internal = settings.topics(), CascadeTopics.of(settings)
    app = new_app(settings, f"{settings.app_id}-cascades")
    outputs = app.topic(topics.outcomes, topics.rewards, **RAW)
    by_root = app.topic(internal.by_root, partitions=settings.partitions, **RAW)
    alerts_topic = app.topic(internal.alerts, **RAW)

    @app.agent(outputs)
    async def route(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            runtime.touch()
            for event in batch:
                source = ENTRY if event.message.topic == topics.rewards else OUTCOME
                for key, record in routes(source, orjson.loads(event.message.value)):
                    await by_root.send(key=orjson.dumps(key), value=orjson.dumps(record))

    @app.agent(by_root)
    async def track(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            runtime.touch()
            # Wait for rebuilds first, then apply the batch without yielding: a check never sees half of it.
            monitors = {p: await runtime.monitor(p) for p in {event.message.partition for event in batch}}
            for event in batch:
                monitor = monitors[event.message.partition]
                if monitor is not None:
                    monitor.apply(tuple(orjson.loads(event.message.key)), orjson.loads(event.message.value))

    async def publish_alerts() -> None:
        """Alerts to Kafka (acknowledged) before ClickHouse; a failed publish crashes the app (see above)."""
        alerts = runtime.check()
        if not alerts:
            return
        try:
            for alert in alerts:
                await alerts_topic.send(key=orjson.dumps([alert.campaign, alert.root]),
                                        value=orjson.dumps(alert.to_dict()))
            await app.producer.flush()
        except Exception as exc:  # noqa: BLE001 - the state moved on: only a rebuild re-derives these alerts
            log.error("publishing %d alerts failed: %r", len(alerts), exc)
            await app.crash(exc)
            return
        for alert in alerts:
            ALERTS.labels(alert.kind, alert.state).inc()
            log.info("alert %s %s %s/%s at %s", alert.kind, alert.state, alert.campaign, alert.root, alert.ts)
        if writer is not None:
            await writer.write_async("alerts", [alert_row(a) for a in alerts])

    async def write_snapshots() -> None:
        rows = runtime.snapshots()
        if writer is not None and rows:
            await writer.write_async("cascade_snapshots", rows)

    app.timer(interval=options.check_interval_s)(publish_alerts)
    app.timer(interval=options.snapshot_interval_s)(write_snapshots)

    @app.on_partitions_assigned.connect
    async def assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        runtime.assign({tp.partition for tp in assigned if tp.topic == internal.by_root})

    if until_idle is not None:

        async def last_check_and_snapshot() -> None:
            await publish_alerts()
            await write_snapshots()

        stop_when_idle(app, until_idle, runtime.idle_for, last_check_and_snapshot)

    return app


def run_cascades(settings: Settings, until_idle: float | None = None, metrics_port: int | None = None,
                 options: CascadeOptions | None = None, loglevel: str = "info") -> None:
    """Create topics, migrate ClickHouse, and run the cascade app until stopped (or idle)."""
    options = options or CascadeOptions()
    internal = CascadeTopics.of(settings)
    ensure_topics(settings.kafka_bootstrap, settings.topics(), settings.partitions, settings.replication)
    ensure_cascade_topics(settings.kafka_bootstrap, internal, settings.partitions, settings.replication)
    writer = None
    if options.clickhouse:
        backend = open_backend(settings.clickhouse_url)
        migrate(backend, settings.clickhouse_database)
        writer = ClickHouseWriter(backend, settings.clickhouse_database)
    runtime = CascadeRuntime(partial(rebuild_monitor, settings.kafka_bootstrap, internal, options.config))
    if metrics_port:
        metrics.serve(metrics_port, ready=runtime.ready)
    app = build_cascade_app(settings, runtime, writer, options, until_idle)
    run(app, loglevel)
