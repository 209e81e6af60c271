"""The state-store interface, and the embedded (in-process) store.

The engine asks a store for two things per batch: `fetch` the keys and atomic operations
a round of rules needs (see `attribution.view` for the key kinds), and `commit` what the
batch wrote. Every backend answers the same questions, so the rules never know which one
they run on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

from attribution.model import LedgerEntry
from attribution.queues import Queue
from attribution.view import Key


@dataclass(slots=True)
class Commit:
    """What one batch of one partition changed."""

    partition: int
    writes: dict[Key, Any]
    entries: list[LedgerEntry]
    budget_returns: list[tuple[str, int]]
    queues: dict[str, Queue | None]
    position: int | None = None
    releases: list[Key] = field(default_factory=list)


class Store(Protocol):
    def fetch(self, partition: int, keys: list[Key]) -> dict[Key, Any]:
        """Values for `keys`, performing the atomic operations among them, in one round trip."""

    def commit(self, commit: Commit) -> None:
        """Make a batch's writes, credits and queues durable (idempotent under a re-run)."""

    def load_queues(self, partition: int) -> dict[str, Queue]:
        """Every waiting queue of a partition, for a worker that takes the partition over."""

    def position(self, partition: int) -> int | None:
        """The position (next offset) committed with the partition's state, if any."""

    def acquire(self, partition: int) -> int:
        """Take a partition over; returns the new owner's epoch (earlier owners are fenced)."""

    def balances(self, campaign: str | None = None) -> dict[str, dict[str, int]]:
        """Balances by campaign and beneficiary."""

    def nodes(self) -> list[tuple[str, str, Any]]:
        """Every (campaign, user_id, User) known to the store."""


@dataclass
class EmbeddedStore:
    """Everything in process memory: for `replay`, the demo and tests. No servers."""

    values: dict[Key, Any] = field(default_factory=dict)
    share_owner: dict[str, str] = field(default_factory=dict)
    order_owner: dict[tuple[str, str], str] = field(default_factory=dict)
    device_users: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    budget_spent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    budget_drawn: dict[str, bool] = field(default_factory=dict)
    group_buyers: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    group_completed_by: dict[tuple[str, str], str] = field(default_factory=dict)
    balance: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    queues: dict[int, dict[str, Queue]] = field(default_factory=lambda: defaultdict(dict))
    positions: dict[int, int] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def fetch(self, partition: int, keys: list[Key]) -> dict[Key, Any]:
        return {key: self._answer(key) for key in keys}

    def _answer(self, key: Key) -> Any:
        kind = key[0]
        if kind == "claim_share":
            _, share_id, event_id = key
            return self.share_owner.setdefault(share_id, event_id) == event_id
        if kind == "claim_order":
            _, campaign, order_id, event_id = key
            return self.order_owner.setdefault((campaign, order_id), event_id) == event_id
        if kind == "device":
            _, campaign, device, user, limit = key
            users = self.device_users[(campaign, device)]
            if user in users:
                return True
            if len(users) >= limit:
                return False
            users.add(user)
            return True
        if kind == "budget":
            _, campaign, entry_id, amount, budget = key
            if entry_id not in self.budget_drawn:
                fits = self.budget_spent[campaign] + amount <= budget
                if fits:
                    self.budget_spent[campaign] += amount
                self.budget_drawn[entry_id] = fits
            return self.budget_drawn[entry_id]
        if kind == "group_join":
            _, campaign, group_id, buyer, event_id, size = key
            group = (campaign, group_id)
            if group in self.group_completed_by:
                return self.group_completed_by[group] == event_id
            self.group_buyers[group].add(buyer)
            if len(self.group_buyers[group]) >= size:
                self.group_completed_by[group] = event_id
                return True
            return False
        return self.values.get(key)

    def commit(self, commit: Commit) -> None:
        self.values.update(commit.writes)
        for key in commit.releases:
            if key[0] == "claim_share" and ("share", key[1]) not in self.values:
                if self.share_owner.get(key[1]) == key[2]:
                    del self.share_owner[key[1]]
            elif key[0] == "claim_order" and ("order", key[1], key[2]) not in self.values:
                if self.order_owner.get((key[1], key[2])) == key[3]:
                    del self.order_owner[(key[1], key[2])]
        for entry in commit.entries:  # one process, one commit per batch: nothing to deduplicate
            self.balance[entry.campaign][entry.beneficiary] += entry.amount
        for campaign, amount in commit.budget_returns:
            self.budget_spent[campaign] -= amount
        partition_queues = self.queues[commit.partition]
        for user, queue in commit.queues.items():
            if queue is None:
                partition_queues.pop(user, None)
            else:
                partition_queues[user] = queue
        if commit.position is not None:
            self.positions[commit.partition] = commit.position

    def load_queues(self, partition: int) -> dict[str, Queue]:
        return dict(self.queues[partition])

    def position(self, partition: int) -> int | None:
        return self.positions.get(partition)

    def acquire(self, partition: int) -> int:
        """One process owns everything here: the epoch only counts takeovers."""
        self.epochs[partition] += 1
        return self.epochs[partition]

    def balances(self, campaign: str | None = None) -> dict[str, dict[str, int]]:
        return {
            c: dict(by_user)
            for c, by_user in self.balance.items()
            if campaign is None or c == campaign
        }

    def nodes(self) -> list[tuple[str, str, Any]]:
        return [(key[1], key[2], value) for key, value in self.values.items() if key[0] == "user" and value]
