"""Publishing a batch's outputs to Kafka: outcomes, ledger entries (rewards), nodes, dead letters.

One confluent-kafka producer, one flush per batch. Every message carries an id its consumers
deduplicate on (`outcome_id`, `entry_id`, (campaign, user_id, version)), because a batch
re-run after a crash publishes its outputs again.
"""

from __future__ import annotations

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
            # The value is the rejected message's bytes, untouched (a fixed event can be produced again
            # from it); why and where it came from travel in headers, as Kafka Connect's DLQs do.
            headers = [
                ("fission.reason", letter.reason.encode()),
                ("fission.detail", (letter.detail or "").encode()),
                ("fission.source.topic", self.source_topic.encode()),
                ("fission.source.partition", str(partition).encode()),
                ("fission.source.offset", ("" if letter.offset is None else str(letter.offset)).encode()),
            ]
            produce(topics.dlq, letter.raw, None, headers=headers)
        remaining = self.producer.flush(30)
        if remaining:
            raise OutputError(f"{remaining} output messages not acknowledged by Kafka")
