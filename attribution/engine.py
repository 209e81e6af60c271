"""The engine: drives the rules over batches of raw events for one partition.

It owns what the rules do not: validation, duplicate and campaign-window checks, the
per-user waiting queues of SPEC 4.8, the rounds of fetching a batch needs, and the
outputs. The embedded runner, `replay` and the Faust agents all call `process`, `tick`
and `drain` here; only the store behind it differs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import orjson

from attribution.campaigns import Campaign
from attribution.events import Event, Invalid, parse_event
from attribution.model import NO_LINEAGE, LedgerEntry, Node, Outcome, User, stable_id
from attribution.queues import Queue
from attribution.rules import RULES, Context, Result
from attribution.store import Commit, Store
from attribution.view import NeedsLoad, View

MAX_ROUNDS = 1000  # a batch needs a handful; more means a bug, not a big batch


@dataclass(frozen=True, slots=True)
class Settings:
    max_waiting_per_user: int = 100
    max_waiting_per_partition: int = 100_000
    grace_ms: int = 10 * 60 * 1000
    polls_per_batch: int = 1000


@dataclass(slots=True)
class Message:
    """One input message: its bytes and, when it came from a log, where."""

    value: bytes
    offset: int | None = None


@dataclass(slots=True)
class DeadLetter:
    raw: bytes
    reason: str
    detail: str | None
    offset: int | None


@dataclass(slots=True)
class BatchResult:
    outcomes: list[Outcome] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    fetch_rounds: int = 0


@dataclass(slots=True)
class _Partition:
    """The waiting queues of one partition, kept in memory by the worker that owns it."""

    queues: dict[str, Queue]
    waiters: dict[str, list[str]] = field(default_factory=dict)
    waiting: int = 0
    poll_cursor: int = 0

    @classmethod
    def of(cls, queues: dict[str, Queue]) -> _Partition:
        part = cls(queues)
        for user, queue in queues.items():
            part.waiting += len(queue.events)
            if queue.waiting_on is not None:
                part.waiters.setdefault(queue.waiting_on, []).append(user)
        return part

    def unwait(self, user: str, queue: Queue) -> None:
        users = self.waiters.get(queue.waiting_on, [])
        if user in users:
            users.remove(user)
        if not users:
            self.waiters.pop(queue.waiting_on, None)
        queue.waiting_on = None


@dataclass(slots=True)
class _Batch:
    partition: int
    part: _Partition
    now: int
    view: View = field(default_factory=View)
    staged: dict[str, deque[Event]] = field(default_factory=dict)
    origin: dict[int, Message] = field(default_factory=dict)
    work: dict[str, None] = field(default_factory=dict)
    need: list = field(default_factory=list)
    final: set[str] = field(default_factory=set)
    changed_queues: set[str] = field(default_factory=set)
    touched: set[tuple[str, str]] = field(default_factory=set)
    budget_returns: list[tuple[str, str, int]] = field(default_factory=list)
    result: BatchResult = field(default_factory=BatchResult)


class Engine:
    def __init__(self, campaigns: dict[str, Campaign], store: Store, settings: Settings | None = None) -> None:
        self.campaigns = campaigns
        self.store = store
        self.settings = settings or Settings()
        self._partitions: dict[int, _Partition] = {}

    # -- public surface -------------------------------------------------------------

    def process(self, partition: int, messages: list[Message], now: int | None = None) -> BatchResult:
        """Apply a batch of raw messages (in log order) and commit it with its position."""
        batch = self._batch(partition, now)
        for message in messages:
            self._admit(batch, message)
        self._poll(batch)
        position = max((m.offset for m in messages if m.offset is not None), default=None)
        return self._finish(partition, batch, None if position is None else position + 1)

    def tick(self, partition: int, now: int | None = None) -> BatchResult:
        """End waits older than the grace period, and look for shares other partitions recorded."""
        batch = self._batch(partition, now)
        part = batch.part
        for user, queue in part.queues.items():
            if queue.waiting_on is not None and queue.since + self.settings.grace_ms <= batch.now:
                self._expire(batch, user, queue)
        self._poll(batch)
        return self._finish(partition, batch, None)

    def drain(self, partition: int, now: int | None = None) -> BatchResult:
        """End of input (replay): end waits round by round, as SPEC 4.8 says."""
        batch = self._batch(partition, now)
        part = batch.part
        while part.waiters:
            coming = {e.share_id for q in part.queues.values() for e in q.events if e.type == "share"}
            heads = [(u, q) for u, q in part.queues.items() if q.waiting_on is not None]
            hopeless = [(u, q) for u, q in heads if q.waiting_on not in coming] or heads
            for user, queue in hopeless:
                self._expire(batch, user, queue)
            self._rounds(batch)
        return self._finish(partition, batch, None)

    def forget(self, partition: int) -> None:
        """Drop what is cached of a partition (it was revoked; its next owner reloads it)."""
        self._partitions.pop(partition, None)

    def waiting(self, partition: int) -> int:
        part = self._partitions.get(partition)
        return part.waiting if part else 0

    # -- batch plumbing -------------------------------------------------------------

    def _batch(self, partition: int, now: int | None) -> _Batch:
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition.of(self.store.load_queues(partition))
        return _Batch(partition, part, int(time.time() * 1000) if now is None else now)

    def _admit(self, batch: _Batch, message: Message) -> None:
        parsed = parse_event(message.value)
        if isinstance(parsed, Invalid):
            outcome = Outcome(parsed.event_id, parsed.campaign, parsed.type, parsed.user_id, "rejected",
                              "invalid_event", detail=parsed.detail, offset=message.offset)
            self._dead(batch, outcome, message.value, message.offset)
            return
        if parsed.campaign not in self.campaigns:
            outcome = Outcome(parsed.event_id, parsed.campaign, parsed.type, parsed.user_id, "rejected",
                              "unknown_campaign", ts=parsed.ts, offset=message.offset)
            self._dead(batch, outcome, message.value, message.offset)
            return
        parsed = replace(parsed, offset=message.offset)
        batch.staged.setdefault(parsed.user_id, deque()).append(parsed)
        batch.origin[id(parsed)] = message
        batch.work[parsed.user_id] = None
        batch.need.extend(self._plan(parsed))

    def _plan(self, event: Event) -> list:
        """Keys an event will almost surely need, fetched up front with the rest of the batch."""
        campaign = self.campaigns[event.campaign]
        keys: list = [("user", campaign.id, event.user_id), ("seen", event.event_id)]
        if not campaign.covers(event.ts):
            return keys
        if event.type == "share":
            keys += [("share", event.share_id), ("claim_share", event.share_id, event.event_id)]
        elif event.type == "scan":
            keys.append(("share", event.share_id))
        elif event.type == "purchase":
            keys.append(("claim_order", campaign.id, event.order_id, event.event_id))
            if event.group_id is not None and campaign.group_buy is not None:
                keys.append(("share", event.group_id))
        else:
            keys.append(("order", campaign.id, event.order_id))
        return keys

    def _poll(self, batch: _Batch) -> None:
        """Re-read some awaited shares: another partition may have recorded them."""
        part = batch.part
        awaited = list(part.waiters)
        if not awaited:
            return
        limit = self.settings.polls_per_batch
        start = part.poll_cursor % len(awaited)
        chosen = (awaited[start:] + awaited[:start])[:limit]
        part.poll_cursor = start + len(chosen)
        for share_id in chosen:
            batch.need.append(("share", share_id))
            for user in part.waiters[share_id]:
                batch.work[user] = None

    def _expire(self, batch: _Batch, user: str, queue: Queue) -> None:
        batch.part.unwait(user, queue)
        batch.final.add(user)
        batch.work[user] = None
        batch.changed_queues.add(user)

    def _rounds(self, batch: _Batch) -> None:
        for _ in range(MAX_ROUNDS):
            missing = batch.view.missing(batch.need)
            batch.need = []
            if missing:
                batch.view.fetched.update(self.store.fetch(batch.partition, missing))
                batch.result.fetch_rounds += 1
            if not batch.work:
                return
            users, batch.work = list(batch.work), {}
            for user in users:
                needed = len(batch.need)
                self._drive(batch, user)
                if len(batch.need) > needed:
                    batch.work[user] = None
            if not batch.need and not batch.work:
                return
        raise RuntimeError("batch did not settle: a rule keeps asking for keys it was given")

    def _finish(self, partition: int, batch: _Batch, position: int | None) -> BatchResult:
        self._rounds(batch)
        view, result = batch.view, batch.result
        for outcome in result.outcomes:
            outcome.partition = partition
            outcome.outcome_id = stable_id(partition, "" if outcome.offset is None else outcome.offset,
                                           outcome.event_id or "", outcome.outcome, outcome.reason or "")
        for campaign, user in sorted(batch.touched):
            state = view.dirty.get(("user", campaign, user))
            if state is not None:
                result.nodes.append(Node.of(campaign, user, state))
        queues = {u: (batch.part.queues.get(u) or None) for u in batch.changed_queues}
        self.store.commit(Commit(partition, dict(view.dirty), result.entries, batch.budget_returns,
                                 queues, position))
        return result

    # -- driving one user's events in order -----------------------------------------

    def _drive(self, batch: _Batch, user: str) -> None:
        part, view = batch.part, batch.view
        staged = batch.staged.get(user) or deque()
        while True:
            queue = part.queues.get(user)
            if queue is not None and queue.waiting_on is not None:
                try:
                    recorded = view.get(("share", queue.waiting_on)) is not None
                except NeedsLoad as exc:
                    batch.need.extend(exc.keys)
                    return
                if not recorded:
                    self._enqueue_behind(batch, user, queue, staged)
                    return
                part.unwait(user, queue)
                batch.changed_queues.add(user)
            from_queue = queue is not None and bool(queue.events)
            if from_queue:
                event = queue.events[0]
            elif staged:
                event = staged[0]
            else:
                return
            final = from_queue and user in batch.final
            result = self._run(batch, event, final)
            if result is None:
                return
            if from_queue:
                batch.final.discard(user)
            if result.outcome == "waiting":
                if not from_queue:
                    if part.waiting >= self.settings.max_waiting_per_partition:
                        if self._overflow(batch, event):
                            staged.popleft()
                            continue
                        return
                    staged.popleft()
                    queue = part.queues[user] = Queue([event])
                    part.waiting += 1
                queue.waiting_on, queue.since = result.wait_for, batch.now
                part.waiters.setdefault(result.wait_for, []).append(user)
                batch.changed_queues.add(user)
                continue
            if from_queue:
                queue.events.pop(0)
                part.waiting -= 1
                if not queue.events:
                    del part.queues[user]
                batch.changed_queues.add(user)
            else:
                staged.popleft()
            if result.recorded_share is not None:
                for woken in part.waiters.get(result.recorded_share, []):
                    batch.work[woken] = None

    def _enqueue_behind(self, batch: _Batch, user: str, queue: Queue, staged: deque[Event]) -> None:
        part = batch.part
        while staged:
            event = staged[0]
            if len(queue.events) >= self.settings.max_waiting_per_user or (
                part.waiting >= self.settings.max_waiting_per_partition
            ):
                if not self._overflow(batch, event):
                    return
            else:
                queue.events.append(event)
                part.waiting += 1
                batch.changed_queues.add(user)
            staged.popleft()

    def _overflow(self, batch: _Batch, event: Event) -> bool:
        """Reject an event no queue can hold. Not marked as seen: a resend may still get in."""
        try:
            lineage = self._lineage(batch.view, event.campaign, event.user_id)
        except NeedsLoad as exc:
            batch.need.extend(exc.keys)
            return False
        outcome = Outcome(event.event_id, event.campaign, event.type, event.user_id, "rejected",
                          "wait_overflow", *lineage, ts=event.ts, offset=event.offset)
        self._dead_event(batch, outcome, event)
        return True

    @staticmethod
    def _lineage(view: View, campaign: str, user_id: str) -> tuple:
        user: User | None = view.get(("user", campaign, user_id))
        return user.lineage() if user else NO_LINEAGE

    def _run(self, batch: _Batch, event: Event, final: bool) -> Result | None:
        """Apply one event; None when it must wait for keys to be fetched."""
        view = batch.view
        campaign = self.campaigns[event.campaign]
        ctx = Context(view, campaign, event, final)
        try:
            if view.get(("seen", event.event_id)):
                result = Result("duplicate")
            elif not campaign.covers(event.ts):
                result = Result("rejected", "outside_campaign")
            else:
                result = RULES[event.type](ctx)
            if result.outcome == "waiting":
                view.discard()
                return result
            if result.outcome != "duplicate":
                view.put(("seen", event.event_id), True)
            lineage = self._lineage(view, campaign.id, event.user_id)
        except NeedsLoad as exc:
            view.discard()
            batch.need.extend(exc.keys)
            return None
        for key in view.journal_keys():
            if key[0] == "user":
                batch.touched.add((key[1], key[2]))
        view.keep()
        outcome = Outcome(event.event_id, event.campaign, event.type, event.user_id, result.outcome,
                          result.reason, *lineage, ts=event.ts, budget_exhausted=ctx.budget_cut,
                          offset=event.offset)
        batch.result.entries.extend(replace(e, root=lineage[1]) for e in ctx.entries)
        if campaign.budget is not None:
            batch.budget_returns.extend((e.campaign, e.entry_id, -e.amount) for e in ctx.entries if e.amount < 0)
        if result.outcome == "rejected":
            self._dead_event(batch, outcome, event)
        else:
            batch.result.outcomes.append(outcome)
        return result

    @classmethod
    def _dead_event(cls, batch: _Batch, outcome: Outcome, event: Event) -> None:
        """Dead-letter an event: its original bytes when this batch read it, else its fields."""
        message = batch.origin.get(id(event))
        if message is None:
            cls._dead(batch, outcome, orjson.dumps(event.to_dict()), None)
        else:
            cls._dead(batch, outcome, message.value, message.offset)

    @staticmethod
    def _dead(batch: _Batch, outcome: Outcome, raw: bytes, offset: int | None) -> None:
        batch.result.outcomes.append(outcome)
        batch.result.dead_letters.append(DeadLetter(raw, outcome.reason, outcome.detail, offset))
