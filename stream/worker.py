"""`fission worker`: the Faust app. Thin agents that hand batches to an `AttributionWorker`
(the commit protocol is written down in `stream.runtime`)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import faust

from attribution.engine import Engine
from attribution.redis_store import RedisStore
from stream import metrics
from stream.faustapp import RAW, new_app, run, stop_when_idle
from stream.outputs import KafkaOutputs
from stream.runtime import AttributionWorker
from stream.settings import Settings
from stream.topics import Topics

log = logging.getLogger("fission.worker")


def build_app(settings: Settings, worker: AttributionWorker, until_idle: float | None = None) -> faust.App:
    """The Faust app: one agent over the input topic, a timer, rebalance hooks."""
    topics = settings.topics()
    app = new_app(settings, settings.app_id)
    events = app.topic(topics.events, partitions=settings.partitions, **RAW)
    loop_call = _executor_call(worker)

    @app.agent(events)
    async def attribute(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            try:
                await loop_call(worker.handle, [(e.message.partition, e.message.offset, e.message.value)
                                                for e in batch])
            except Exception:
                # Faust acks a taken batch even when its handler fails, and the acks would let Kafka offsets
                # run ahead of the committed state. Store and Kafka failures are retried inside `handle`;
                # anything else is a bug: stop at once, unacknowledged, and resume from the committed position.
                log.critical("batch failed: exiting without acknowledging it", exc_info=True)
                os._exit(70)

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
        stop_when_idle(app, until_idle, worker.idle_for, lambda: loop_call(worker.finish))

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
    run(app, loglevel)
