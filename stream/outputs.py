"""Publishing a batch's outputs to Kafka: outcomes, ledger entries (rewards), nodes, dead letters.

One confluent-kafka producer, one flush per batch. Every message carries an id its consumers
deduplicate on (`outcome_id`, `entry_id`, (campaign, user_id, version)), because a batch
re-run after a crash publishes its outputs again.
"""

from __future__ import annotations

import base64

import orjson
from confluent_kafka import Producer

from attribution.engine import BatchResult
from stream.topics import Topics


class OutputError(Exception):
    """Kafka did not acknowledge a batch's outputs: the batch must not be committed."""


class KafkaOutputs:
    def __init__(self, bootstrap: str, topics: Topics, source_topic: str | None = None) -> None:
        self.topics = topics
        self.source_topic = source_topic or topics.events
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 2,
            "compression.type": "lz4",
        })

    def emit(self, partition: int, result: BatchResult) -> None:
        """Produce everything a batch made, then wait until the broker has it all."""
        produce, topics = self.producer.produce, self.topics
        for outcome in result.outcomes:
            produce(topics.outcomes, orjson.dumps(outcome), (outcome.user_id or "").encode())
        for entry in result.entries:
            produce(topics.rewards, orjson.dumps(entry), entry.beneficiary.encode())
        for node in result.nodes:
            produce(topics.nodes, orjson.dumps(node), node.user_id.encode())
        self.producer.poll(0)
        for letter in result.dead_letters:
            record = {
                "reason": letter.reason,
                "detail": letter.detail,
                "topic": self.source_topic,
                "partition": partition,
                "offset": letter.offset,
                "raw_base64": base64.b64encode(letter.raw).decode(),
            }
            produce(topics.dlq, orjson.dumps(record), None)
        remaining = self.producer.flush(30)
        if remaining:
            raise OutputError(f"{remaining} output messages not acknowledged by Kafka")
