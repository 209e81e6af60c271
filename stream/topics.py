"""Kafka topics: names, and creation with the admin client (Faust's confluent driver cannot)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic


@dataclass(frozen=True, slots=True)
class Topics:
    events: str = "referral.events"
    outcomes: str = "referral.outcomes"
    rewards: str = "referral.rewards"
    nodes: str = "referral.nodes"
    dlq: str = "referral.dlq"

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """PREFIX.events, PREFIX.outcomes, ...: how every process names them from `topic_prefix`."""
        return cls(*(f"{prefix}.{name}" for name in ("events", "outcomes", "rewards", "nodes", "dlq")))

    def all(self) -> list[str]:
        return [self.events, self.outcomes, self.rewards, self.nodes, self.dlq]


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, replication: int, timeout: float = 30) -> None:
    """Create every topic that does not exist yet; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(name, num_partitions=partitions, replication_factor=replication)
              for name in topics.all() if name not in existing]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - a concurrent creator is fine, anything else is not
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {name}: {exc}") from exc
