"""The embedded runner: the worker's logic over an in-process partitioned log, no Kafka.

Events are partitioned by user_id like the Kafka topic, consumed in fetch-sized chunks
across partitions like a consumer, and handed to the same `AttributionWorker` the Faust
agent uses. The demo runs on it; so can tests and notebooks.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

from attribution.campaigns import Campaign
from attribution.engine import BatchResult, Engine, Settings
from attribution.store import EmbeddedStore, Store
from stream.produce import user_key
from stream.runtime import AttributionWorker


class EmbeddedLog:
    """Append-only partitions; an event's partition follows its key, as in Kafka."""

    def __init__(self, partitions: int) -> None:
        self.partitions: list[list[bytes]] = [[] for _ in range(partitions)]

    def append(self, raw: bytes) -> int:
        key = user_key(raw)
        partition = zlib.crc32(key) % len(self.partitions) if key is not None else 0
        self.partitions[partition].append(raw)
        return partition


class EmbeddedRunner:
    def __init__(
        self,
        campaigns: dict[str, Campaign],
        store: Store | None = None,
        partitions: int = 4,
        fetch: int = 500,
        settings: Settings | None = None,
        emit: Callable[[int, BatchResult], None] | None = None,
    ) -> None:
        self.log = EmbeddedLog(partitions)
        self.store = store if store is not None else EmbeddedStore()
        self.engine = Engine(campaigns, self.store, settings, emit=emit)
        self.worker = AttributionWorker(self.engine, self.store)
        self.worker.assign(list(range(partitions)))
        self.read = [0] * partitions
        self.fetch = fetch

    def publish(self, events: Iterable[bytes]) -> int:
        count = 0
        for raw in events:
            self.log.append(raw)
            count += 1
        return count

    def lag(self) -> int:
        return sum(len(p) - r for p, r in zip(self.log.partitions, self.read, strict=True))

    def step(self) -> int:
        """One consumer poll: up to `fetch` messages from each partition, as one batch."""
        batch: list[tuple[int, int, bytes]] = []
        for partition, messages in enumerate(self.log.partitions):
            start = self.read[partition]
            chunk = messages[start : start + self.fetch]
            batch.extend((partition, start + i, raw) for i, raw in enumerate(chunk))
            self.read[partition] = start + len(chunk)
        if batch:
            self.worker.handle(batch)
        self.worker.tick()
        return len(batch)

    def finish(self) -> None:
        """End of input: end every wait round by round, as `replay` does (SPEC 4.8)."""
        self.engine.drain(list(range(len(self.log.partitions))))

    def run(self) -> None:
        while self.step():
            pass
        self.finish()
