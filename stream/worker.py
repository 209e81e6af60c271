"""`fission worker`: the Faust app. Thin agents that hand batches to the engine.

Commit protocol, per batch of one input partition (the order is the point; each step says
what breaks without it):

1. Skip messages below the position committed in Redis: they were fully processed before
   a crash or rebalance, and re-running them would report them as duplicates.
2. Compute (the engine, rounds of pipelined fetches).
3. Publish outcomes, rewards, nodes and dead letters to Kafka and wait for the acks, before
   any state is committed: otherwise a crash after the commit would lose them.
4. Apply credits (idempotent per ledger entry) and other cross-slot effects, then commit the
   partition's state and position in one fenced Lua script: a crash between the two re-runs
   the batch, which changes nothing twice; a worker that lost the partition is fenced out.
5. Only then does Faust ack the events, so Kafka offsets never run ahead of Redis.

A store failure retries the batch with backoff (credits are delayed, never lost or
doubled); a fenced commit drops the partition, which now belongs to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import redis

from attribution.engine import BatchResult, Engine, Message
from attribution.redis_store import RedisStore
from stream import metrics
from stream.outputs import KafkaOutputs, OutputError
from stream.settings import Settings
from stream.topics import Topics

log = logging.getLogger("fission.worker")

MAX_BACKOFF_S = 5.0


class Fenced(Exception):  # noqa: N818 - a state, not a failure of ours
    """Another worker owns the partition now."""


class AttributionWorker:
    """The engine, store and outputs of one worker process; Faust only feeds it batches.

    Every call runs on one thread (an executor of size one), so the engine never sees two
    batches at once and the event loop keeps heartbeating while Redis and Kafka are busy.
    """

    def __init__(self, engine: Engine, store: RedisStore, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.positions: dict[int, int | None] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.last_input = time.monotonic()

    def assign(self, partitions: list[int]) -> None:
        """Take partitions over: fence earlier owners, reload queues, resume from Redis."""
        for partition in set(self.positions) - set(partitions):
            self.revoke([partition])
        for partition in partitions:
            self.store.acquire(partition)
            self.engine.forget(partition)
            self.positions[partition] = self.store.position(partition)
        metrics.ASSIGNED.set(len(self.positions))
        log.info("assigned partitions %s at positions %s", sorted(partitions), self.positions)

    def revoke(self, partitions: list[int]) -> None:
        for partition in partitions:
            self.engine.forget(partition)
            self.positions.pop(partition, None)
        metrics.ASSIGNED.set(len(self.positions))

    def handle(self, batch: list[tuple[int, int, bytes]]) -> None:
        """A batch from Faust: (partition, offset, value) in consumption order."""
        self.last_input = time.monotonic()
        by_partition: dict[int, list[Message]] = {}
        for partition, offset, value in batch:
            position = self.positions.get(partition)
            if position is None or offset >= position:
                by_partition.setdefault(partition, []).append(Message(value, offset))
        for partition, messages in by_partition.items():
            if partition not in self.positions:
                self.assign([*self.positions, partition])
            if self._retrying(partition, lambda p=partition, m=messages: self.engine.process(p, m)):
                self.positions[partition] = messages[-1].offset + 1
        self.last_input = time.monotonic()

    def tick(self) -> None:
        """End waits past the grace period and pick up shares recorded by other partitions."""
        for partition in list(self.positions):
            self._retrying(partition, lambda p=partition: self.engine.tick(p))
            metrics.WAITING.labels(str(partition)).set(self.engine.waiting(partition))

    def idle_for(self) -> float:
        """Seconds without input and without events waiting for a share (they still owe outcomes)."""
        if any(self.engine.waiting(p) for p in self.positions):
            return 0.0
        return time.monotonic() - self.last_input

    def _retrying(self, partition: int, work: Callable[[], BatchResult]) -> bool:
        """Run `work` until it commits; False when the partition was lost meanwhile."""
        backoff = 0.05
        while partition in self.positions:
            started = time.perf_counter()
            try:
                result = work()
            except redis.ResponseError as exc:
                if "FENCED" not in str(exc):
                    raise
                log.warning("partition %s is owned by another worker now: %s", partition, exc)
                self.revoke([partition])
                return False
            except (redis.ConnectionError, redis.TimeoutError, OutputError) as exc:
                metrics.STORE_ERRORS.labels(type(exc).__name__).inc()
                log.warning("batch of partition %s failed, retrying in %.2fs: %s", partition, backoff, exc)
                self.engine.forget(partition)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            metrics.observe(result, started, int(self.clock() * 1000))
            return True
        return False


def build_app(settings: Settings, worker: AttributionWorker, until_idle: float | None = None) -> faust.App:
    """The Faust app: one agent over the input topic, a timer, rebalance hooks."""
    topics = settings.topics()
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        stream_wait_empty=False,
    )
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(topics.events, partitions=settings.partitions, **raw)
    loop_call = _executor_call(worker)

    @app.agent(events)
    async def attribute(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await loop_call(worker.handle, [(e.message.partition, e.message.offset, e.message.value) for e in batch])

    @app.timer(interval=settings.tick_interval_s)
    async def tick() -> None:
        await loop_call(worker.tick)
        for partition, position in list(worker.positions.items()):
            tp = faust.types.TP(topics.events, partition)
            try:
                metrics.LAG.labels(str(partition)).set(max(0, app.consumer.highwater(tp) - (position or 0)))
            except Exception:  # noqa: BLE001 - lag is best effort before the first fetch
                pass

    @app.on_partitions_assigned.connect
    async def assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        await loop_call(worker.assign, sorted(tp.partition for tp in assigned if tp.topic == topics.events))

    @app.on_partitions_revoked.connect
    async def revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        await loop_call(worker.revoke, sorted(tp.partition for tp in revoked if tp.topic == topics.events))

    if until_idle is not None:

        @app.timer(interval=0.5)
        async def stop_when_idle() -> None:
            if worker.idle_for() >= until_idle:
                log.info("no input for %.1fs: stopping", until_idle)
                faust_worker = app._fission_worker  # set by run_worker
                faust_worker._signal_stop_future = asyncio.ensure_future(
                    faust_worker._stop_on_signal(signal.SIGTERM)
                )

    return app


def _executor_call(worker: AttributionWorker) -> Callable[..., Any]:
    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(worker.executor, fn, *args)

    return call


def run_worker(settings: Settings, campaigns: dict, until_idle: float | None = None, loglevel: str = "info") -> None:
    """Create topics, wire engine, store and outputs, and run the Faust worker until stopped."""
    from stream.topics import ensure_topics

    topics: Topics = settings.topics()
    ensure_topics(settings.kafka_bootstrap, topics, settings.partitions, settings.replication)
    store = RedisStore.from_url(settings.redis_url, prefix=settings.redis_prefix, buckets=settings.redis_buckets)
    outputs = KafkaOutputs(settings.kafka_bootstrap, topics)
    engine = Engine(campaigns, store, settings.engine(), emit=outputs.emit)
    worker = AttributionWorker(engine, store)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, ready=lambda: bool(worker.positions))
    app = build_app(settings, worker, until_idle)
    faust_worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    app._fission_worker = faust_worker
    faust_worker.execute_from_commandline()
