"""`fission sink`: the output topics into ClickHouse.

A separate consumer group reads outcomes, rewards and nodes, buffers them in the
`ClickHouseSink` and commits its Kafka offsets only after ClickHouse took the rows: Kafka is
the durable buffer, so ClickHouse being down delays analytics but never credits (they are
made by the attribution workers, which do not wait for this process), and a crash re-reads
rows the sink then recognises by their ids.
"""

from __future__ import annotations

import logging
import time

import orjson
from confluent_kafka import Consumer

from sinks.clickhouse import ClickHouseSink, SinkBackpressure
from stream.topics import Topics

log = logging.getLogger("fission.sink")

FLUSH_INTERVAL_S = 1.0


class SinkRunner:
    def __init__(self, bootstrap: str, topics: Topics, group: str, sink: ClickHouseSink) -> None:
        self.topics = topics
        self.sink = sink
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        })
        self.consumer.subscribe([topics.outcomes, topics.rewards, topics.nodes],
                                on_assign=lambda *_: self.sink.resync())
        self.last_flush = time.monotonic()
        self.last_input = time.monotonic()
        self.uncommitted = False

    def step(self, max_messages: int = 5000) -> int:
        """Poll once, buffer what came, flush and commit when due. Returns messages read."""
        messages = [m for m in self.consumer.consume(max_messages, timeout=0.5) if not m.error()]
        if messages:
            self.last_input = time.monotonic()
            rows: dict[str, list[dict]] = {self.topics.outcomes: [], self.topics.rewards: [], self.topics.nodes: []}
            for message in messages:
                rows[message.topic()].append(orjson.loads(message.value()))
            self._add(rows[self.topics.outcomes], rows[self.topics.rewards], rows[self.topics.nodes])
            self.uncommitted = True
        if self.uncommitted and (self.sink.should_flush or time.monotonic() - self.last_flush >= FLUSH_INTERVAL_S):
            self._flush_and_commit()
        return len(messages)

    def _add(self, outcomes: list[dict], entries: list[dict], nodes: list[dict]) -> None:
        """Buffer; when the buffer is full, stop reading and wait for ClickHouse (backpressure)."""
        while True:
            try:
                self.sink.add(outcomes=outcomes, entries=entries, nodes=nodes)
                return
            except SinkBackpressure as full:
                log.warning("ClickHouse buffer full (%s rows): waiting for inserts", full.buffered_rows)
                if not self._flush_and_commit():
                    time.sleep(max(full.retry_after_s, 0.1))

    def _flush_and_commit(self) -> bool:
        self.last_flush = time.monotonic()
        if not self.sink.flush():
            log.warning("ClickHouse insert failed, rows kept and retried: %s", self.sink.last_error)
            return False
        if self.uncommitted:
            self.consumer.commit(asynchronous=False)
            self.uncommitted = False
        return True

    def run(self, until_idle: float | None = None) -> None:
        try:
            while True:
                self.step()
                idle = time.monotonic() - self.last_input
                if until_idle is not None and idle >= until_idle and not self.uncommitted:
                    return
        finally:
            self.consumer.close()
