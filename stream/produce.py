"""Producing events to the input topic, keyed by user_id (the SPEC's ordering guarantee)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import orjson
from confluent_kafka import Producer


def user_key(raw: bytes) -> bytes | None:
    """The actor's id as message key; a malformed event has none and lands anywhere."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    user = value.get("user_id") if isinstance(value, dict) else None
    return user.encode("utf-8", "surrogatepass") if isinstance(user, str) else None


def produce(bootstrap: str, topic: str, events: Iterable[bytes], rate: float | None = None,
            progress: Callable[[int], None] | None = None) -> int:
    """Send every event (at most `rate` per second when given); returns how many were sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    started = time.monotonic()
    sent = 0
    for raw in events:
        while True:
            try:
                producer.produce(topic, raw, user_key(raw))
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                producer.poll(0)
                time.sleep(ahead)
        if sent % 1000 == 0:
            producer.poll(0)
            if progress:
                progress(sent)
    if producer.flush(60):
        raise RuntimeError("Kafka did not acknowledge every event")
    return sent
