"""The engine: drives the rules over batches of raw events for one partition.

It owns what the rules do not: validation, duplicate and campaign-window checks, the
per-user waiting queues of SPEC 4.8, the rounds of fetching a batch needs, and the
outputs. The embedded runner, `replay` and the Faust agents all call `process`, `tick`
and `drain` here; only the store behind it differs.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import orjson

from attribution.campaigns import Campaign
from attribution.events import Event, Invalid, parse_event
from attribution.model import NO_LINEAGE, LedgerEntry, Node, Outcome, User, stable_id
from attribution.queues import Queue
from attribution.rules import RULES, Context, Result
from attribution.store import Commit, Store
from attribution.view import NeedsLoad, View

CLAIMS = ("claim_share", "claim_order")
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
    work: dict[str, None] = field(default_factory=dict)
    need: list = field(default_factory=list)
    final: set[str] = field(default_factory=set)
    arrival: dict[int, float] = field(default_factory=dict)
    heap: list = field(default_factory=list)
    tiebreak: itertools.count = field(default_factory=itertools.count)
    claims: set = field(default_factory=set)
    changed_queues: set[str] = field(default_factory=set)
    touched: set[tuple[str, str]] = field(default_factory=set)
    budget_returns: list[tuple[str, int]] = field(default_factory=list)
    result: BatchResult = field(default_factory=BatchResult)


def _token(partition: int, event: Event) -> str:
    """What a duplicate mark records: where the event was read, to recognise a re-run."""
    return f"{partition}:{'' if event.offset is None else event.offset}"


class Engine:
    def __init__(
        self,
        campaigns: dict[str, Campaign],
        store: Store,
        settings: Settings | None = None,
        emit: Callable[[int, BatchResult], None] | None = None,
    ) -> None:
        """`emit(partition, result)` publishes a batch's outputs; it runs *before* the batch's
        state is committed, so outputs are never lost (a crash re-runs and re-emits them,
        with the same ids, for consumers to deduplicate)."""
        self.campaigns = campaigns
        self.store = store
        self.settings = settings or Settings()
        self.emit = emit
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

    def drain(self, partitions: int | list[int], now: int | None = None) -> BatchResult:
        """End of input (replay, the embedded runner): end waits one round at a time, as SPEC
        4.8 says, across all the given partitions: a round ends only the waits for shares no
        queued event of any partition will record, and what it releases runs before the next."""
        partitions = [partitions] if isinstance(partitions, int) else partitions
        merged = BatchResult()
        while True:
            while self._absorb(merged, [self._settle(p, now) for p in partitions]):
                pass  # shares recorded in one partition release waits in another: until quiet
            parts = {p: self._partitions[p] for p in partitions}
            heads = [(p, u, q) for p, part in parts.items() for u, q in part.queues.items() if q.waiting_on]
            if not heads:
                return merged
            coming = {e.share_id for part in parts.values() for q in part.queues.values() for e in q.events
                      if e.type == "share"}
            hopeless = [(p, u, q) for p, u, q in heads if q.waiting_on not in coming] or heads
            for partition in partitions:
                batch = self._batch(partition, now)
                for p, user, queue in hopeless:
                    if p == partition:
                        self._expire(batch, user, queue)
                self._absorb(merged, [self._finish(partition, batch, None)])

    def _settle(self, partition: int, now: int | None) -> BatchResult:
        """A batch with no input that looks for every awaited share."""
        batch = self._batch(partition, now)
        self._poll(batch, everything=True)
        return self._finish(partition, batch, None)

    @staticmethod
    def _absorb(merged: BatchResult, results: list[BatchResult]) -> bool:
        """Add results to `merged`; True when any of them produced an outcome."""
        produced = False
        for result in results:
            produced = produced or bool(result.outcomes)
            merged.outcomes += result.outcomes
            merged.entries += result.entries
            merged.nodes += result.nodes
            merged.dead_letters += result.dead_letters
            merged.fetch_rounds += result.fetch_rounds
        return produced

    def forget(self, partition: int) -> None:
        """Drop what is cached of a partition (it was revoked; its next owner reloads it)."""
        self._partitions.pop(partition, None)

    def waiting(self, partition: int) -> int:
        part = self._partitions.get(partition)
        return part.waiting if part else 0

    # -- batch plumbing -------------------------------------------------------------

    def _batch(self, partition: int, now: int | None) -> _Batch:
        now = int(time.time() * 1000) if now is None else now
        part = self._partitions.get(partition)
        if part is None:
            queues = self.store.load_queues(partition)
            for queue in queues.values():
                queue.since = now  # the grace counts processing time: downtime is not waiting
            part = self._partitions[partition] = _Partition.of(queues)
        return _Batch(partition, part, now)

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
        parsed = replace(parsed, offset=message.offset, raw=message.value)
        batch.arrival[id(parsed)] = len(batch.arrival)
        batch.staged.setdefault(parsed.user_id, deque()).append(parsed)
        batch.work[parsed.user_id] = None
        planned = self._plan(parsed)
        self._ask(batch, parsed, planned)
        batch.claims.update(key for key in planned if key[0] in CLAIMS)

    def _plan(self, event: Event) -> list:
        """Keys an event will almost surely need, fetched up front with the rest of the batch.

        Claims among them are released at the end of the batch when the event did not use
        them (it was a duplicate, or still waits), so planning ahead takes no id for nothing."""
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

    def _poll(self, batch: _Batch, everything: bool = False) -> None:
        """Re-read awaited shares (a batch's share of them, or all): another partition may have
        recorded them."""
        part = batch.part
        awaited = list(part.waiters)
        if not awaited:
            return
        limit = len(awaited) if everything else self.settings.polls_per_batch
        start = part.poll_cursor % len(awaited)
        chosen = (awaited[start:] + awaited[:start])[:limit]
        part.poll_cursor = start + len(chosen)
        for share_id in chosen:
            batch.need.append((-1, ("share", share_id)))
            for user in part.waiters[share_id]:
                batch.work[user] = None

    def _expire(self, batch: _Batch, user: str, queue: Queue) -> None:
        batch.part.unwait(user, queue)
        batch.final.add(user)
        batch.work[user] = None
        batch.changed_queues.add(user)

    def _rounds(self, batch: _Batch) -> None:
        for _ in range(MAX_ROUNDS):
            missing = batch.view.missing(self._due(batch))
            batch.need = []
            if missing:
                batch.view.fetched.update(self.store.fetch(batch.partition, missing))
                batch.result.fetch_rounds += 1
            if not batch.work:
                return
            users, batch.work = list(batch.work), {}
            for user in users:
                self._schedule(batch, user)
            while batch.heap:
                _, _, user = heapq.heappop(batch.heap)
                needed = len(batch.need)
                if self._step(batch, user):
                    self._schedule(batch, user)
                elif len(batch.need) > needed:
                    batch.work[user] = None
            if not batch.need and not batch.work:
                return
        raise RuntimeError("batch did not settle: a rule keeps asking for keys it was given")

    def _ask(self, batch: _Batch, event: Event, keys: list) -> None:
        """Keys to fetch for `event`; a round fetches them in arrival order, so order-dependent
        operations (device admissions, budget draws) are decided first come, first served."""
        seq = batch.arrival.get(id(event), -1)
        batch.need.extend((seq, key) for key in keys)

    @staticmethod
    def _due(batch: _Batch) -> list:
        """This round's keys in arrival order, so that among the events asking in the same
        round, device slots and budget go first come, first served. An event that needed an
        extra round (it waited for a share, or its user was busy) asks later: SPEC 4.6 and
        4.7 promise only the invariants, which every order keeps."""
        return [key for _, key in sorted(batch.need, key=lambda item: item[0])]

    def _unused_claims(self, batch: _Batch) -> list:
        """Planned claims that were granted but not used: the store gives them back."""
        view, unused = batch.view, []
        for key in batch.claims:
            if not view.fetched.get(key):
                continue
            record_key = ("share", key[1]) if key[0] == "claim_share" else ("order", key[1], key[2])
            record = view.dirty.get(record_key)
            if record is None or record.event_id != key[-1]:
                unused.append(key)
        return unused

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
        if self.emit is not None:
            self.emit(partition, result)
        self.store.commit(Commit(partition, dict(view.dirty), result.entries, batch.budget_returns,
                                 queues, position, releases=self._unused_claims(batch)))
        return result

    # -- driving one user's events in order -----------------------------------------

    def _next(self, batch: _Batch, user: str) -> float | None:
        """Arrival number of the user's next event (-1: queued in an earlier batch); None: none."""
        queue = batch.part.queues.get(user)
        if queue is not None and queue.events:
            return batch.arrival.get(id(queue.events[0]), -1)
        staged = batch.staged.get(user)
        return batch.arrival[id(staged[0])] if staged else None

    def _schedule(self, batch: _Batch, user: str) -> None:
        position = self._next(batch, user)
        if position is not None:
            heapq.heappush(batch.heap, (position, next(batch.tiebreak), user))

    def _step(self, batch: _Batch, user: str) -> bool:
        """Apply the user's next event. False when nothing can run now: the user waits for a
        share, has nothing left, or needs keys fetched (then it has asked for them)."""
        part, view = batch.part, batch.view
        staged = batch.staged.get(user) or deque()
        queue = part.queues.get(user)
        if queue is not None and queue.waiting_on is not None:
            try:
                recorded = view.get(("share", queue.waiting_on)) is not None
            except NeedsLoad as exc:
                self._ask(batch, queue.events[0], exc.keys)
                return False
            if not recorded:
                self._enqueue_behind(batch, user, queue, staged)
                return False
            part.unwait(user, queue)
            batch.changed_queues.add(user)
        from_queue = queue is not None and bool(queue.events)
        if from_queue:
            event = queue.events[0]
        elif staged:
            event = staged[0]
        else:
            return False
        result = self._run(batch, event, final=from_queue and user in batch.final)
        if result is None:
            return False
        if from_queue:
            batch.final.discard(user)
        if result.outcome == "waiting":
            if not from_queue:
                if part.waiting >= self.settings.max_waiting_per_partition:
                    if self._overflow(batch, event):
                        staged.popleft()
                        return True
                    return False
                staged.popleft()
                queue = part.queues[user] = Queue([event])
                part.waiting += 1
            queue.waiting_on, queue.since = result.wait_for, batch.now
            part.waiters.setdefault(result.wait_for, []).append(user)
            batch.changed_queues.add(user)
            return True
        if from_queue:
            queue.events.pop(0)
            part.waiting -= 1
            if not queue.events:
                del part.queues[user]
            batch.changed_queues.add(user)
        else:
            staged.popleft()
        if result.recorded_share is not None:
            now_at = batch.arrival.get(id(event), -1) + 0.5
            for woken in part.waiters.get(result.recorded_share, []):
                for queued in part.queues[woken].events:  # they take effect now, after this share
                    batch.arrival[id(queued)] = max(batch.arrival.get(id(queued), -1), now_at)
                self._schedule(batch, woken)
        return True

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
        """Reject an event no queue can hold; its id counts as processed (SPEC 4), unless a copy
        of it is already queued: marking that copy's id would turn it into a duplicate."""
        view = batch.view
        queue = batch.part.queues.get(event.user_id)
        try:
            lineage = self._lineage(view, event.campaign, event.user_id)
            if not (queue and any(e.event_id == event.event_id for e in queue.events)):
                if not self._is_duplicate(view, batch.partition, event):
                    view.put(("seen", event.event_id), _token(batch.partition, event))
        except NeedsLoad as exc:
            view.discard()
            self._ask(batch, event, exc.keys)
            return False
        view.keep()
        outcome = Outcome(event.event_id, event.campaign, event.type, event.user_id, "rejected",
                          "wait_overflow", *lineage, ts=event.ts, offset=event.offset)
        self._dead_event(batch, outcome, event)
        return True

    @staticmethod
    def _is_duplicate(view: View, partition: int, event: Event) -> bool:
        """Seen before, unless the mark is this very message's own from a run that crashed
        before its commit (same partition and offset): then this is that run again."""
        key = ("seen", event.event_id)
        mark = view.get(key)
        if mark is None:
            return False
        return view.written(key) or event.offset is None or mark != _token(partition, event)

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
            if self._is_duplicate(view, batch.partition, event):
                result = Result("duplicate")
            elif not campaign.covers(event.ts):
                result = Result("rejected", "outside_campaign")
            else:
                result = RULES[event.type](ctx)
                ctx.settle()
            if result.outcome == "waiting":
                view.discard()
                return result
            if result.outcome != "duplicate":
                view.put(("seen", event.event_id), _token(batch.partition, event))
            lineage = self._lineage(view, campaign.id, event.user_id)
        except NeedsLoad as exc:
            view.discard()
            self._ask(batch, event, exc.keys)
            return None
        for key in view.journal_keys():
            if key[0] == "user":
                batch.touched.add((key[1], key[2]))
        view.keep()
        outcome = Outcome(event.event_id, event.campaign, event.type, event.user_id, result.outcome,
                          result.reason, *lineage, ts=event.ts, budget_exhausted=ctx.budget_cut,
                          amount=event.amount, offset=event.offset)
        batch.result.entries.extend(replace(e, root=lineage[1]) for e in ctx.entries)
        if campaign.budget is not None:
            batch.budget_returns.extend((e.campaign, -e.amount) for e in ctx.entries if e.amount < 0)
        if result.outcome == "rejected":
            self._dead_event(batch, outcome, event)
        else:
            batch.result.outcomes.append(outcome)
        return result

    @classmethod
    def _dead_event(cls, batch: _Batch, outcome: Outcome, event: Event) -> None:
        """Dead-letter an event with its original bytes."""
        cls._dead(batch, outcome, event.raw if event.raw is not None else orjson.dumps(event.to_dict()), event.offset)

    @staticmethod
    def _dead(batch: _Batch, outcome: Outcome, raw: bytes, offset: int | None) -> None:
        batch.result.outcomes.append(outcome)
        batch.result.dead_letters.append(DeadLetter(raw, outcome.reason, outcome.detail, offset))
