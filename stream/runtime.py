"""The worker's logic, independent of how batches arrive: Faust agents (`stream.worker`)
and the embedded runner (`stream.embedded`) both feed an `AttributionWorker`.

Commit protocol, per batch of one input partition (the order is the point; each step says
what breaks without it):

1. Skip messages below the position committed with the partition's state: they were fully
   processed before a crash or rebalance, and re-running them would report them as
   duplicates.
2. Compute (the engine, rounds of pipelined fetches).
3. Publish outcomes, rewards, nodes and dead letters and wait for the acks, before any
   state is committed: otherwise a crash after the commit would lose them.
4. Apply credits (idempotent per ledger entry) and other cross-slot effects, then commit the
   partition's state and position in one fenced script: a crash between the two re-runs
   the batch, which changes nothing twice; a worker that lost the partition is fenced out.
5. Only then is the input acknowledged (Faust acks after the batch), so the consumer's
   offsets never run ahead of the store.

A store failure retries the batch with backoff (credits are delayed, never lost or
doubled); a fenced commit drops the partition, which now belongs to another worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from attribution.engine import BatchResult, Engine, Message
from attribution.store import Store
from stream import metrics
from stream.outputs import OutputError

log = logging.getLogger("fission.runtime")

MAX_BACKOFF_S = 5.0


class AttributionWorker:
    """The engine, store and outputs of one worker process; Faust only feeds it batches.

    Every call runs on one thread (an executor of size one), so the engine never sees two
    batches at once and the event loop keeps heartbeating while Redis and Kafka are busy.
    """

    def __init__(self, engine: Engine, store: Store, clock: Callable[[], float] = time.time) -> None:
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
        return time.monotonic() - self.last_input

    def finish(self) -> None:
        """End of input (`--until-idle`): end the remaining waits round by round, as `replay`
        does at the end of its file (SPEC 4.8), so a finished run's results equal replay's."""
        partitions = sorted(self.positions)
        if any(self.engine.waiting(p) for p in partitions):
            started = time.perf_counter()
            metrics.observe(self.engine.drain(partitions), started, int(self.clock() * 1000))

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
