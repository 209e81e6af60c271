"""Cascade analytics (SPEC 6): live cascade trees, K-factor, generation ratios, stall and K alerts.

Pure domain logic: rows in (outcomes and ledger entries as the output topics carry them), numbers and
alerts out. No I/O; `stream.cascades` feeds it from Kafka and calls `check` on a timer.

Clock: **event time**. Every check takes `now_ms`, and the stream layer passes each campaign's clock:
its *watermark* (the largest event `ts` seen for that campaign) less `lateness_ms`, the allowance for
events of other input partitions still in flight. Why not processing time:
- SPEC 6 defines windows and bind gaps in event time, so the threshold and the clock agree;
- a consumer catching up after downtime, or a backfill, replays hours of binds in seconds: on a wall
  clock every cascade would look stalled (or none would), in event time the alerts are those of the data;
- results are a function of the input, so a restart that rebuilds the state finds the same alerts, and
  tests need no sleeping.
The watermark is kept per campaign, so a finished campaign's cascades do not "stall" while another
campaign's clock runs on. The price: when a whole campaign goes silent its watermark stops and no new
stall fires; silence is an alert on the input rate (Prometheus), not a cascade alert.
Checks run on a timer rather than per event because they cost O(cascades). Each alert's `ts` is an event
time derived from the data (when the stall threshold was crossed, the bind that ended the stall, the end
of the window), so re-deriving an alert after a restart gives the same `alert_id`.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from attribution.model import stable_id

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
STALLED, K_BELOW_ONE = "stalled_cascade", "k_below_one"
FIRING, RESOLVED = "firing", "resolved"
OUTCOME, ENTRY = "outcome", "entry"
# Fraud rejections of SPEC 4.7. A rejection counts for the cascade its actor belongs to (the outcome's
# `root`): a member scanning their own share is counted; a device-farm scan by a user who is in no cascade
# yet carries no root and is counted nowhere.
FRAUD_REASONS = frozenset({"self_referral", "device_limit"})
LEADERBOARD_KEYS = ("size", "max_depth", "revenue", "rewards")

CascadeKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    """Thresholds of SPEC 6 (stall) and of the campaign-level K alert."""

    min_size: int = 10  # smaller cascades never count as stalled
    stall_min_ms: int = 10 * MINUTE_MS
    stall_factor: float = 5.0  # x the median gap between the last `recent_binds` binds
    recent_binds: int = 20
    k_window_ms: int = HOUR_MS  # K windows: [t - W, t) sliding for the gauge, tumbling for the alert
    k_windows_below: int = 3  # consecutive closed windows with K < 1 before `k_below_one` fires
    # The clock runs this far behind the newest event ts: events of other input partitions may still be in
    # flight, and a cascade must not look stalled (nor a window complete) only because they are.
    lateness_ms: int = MINUTE_MS


@dataclass(frozen=True, slots=True)
class Alert:
    """One transition of an alert episode; `root` is "" for a campaign-level alert."""

    campaign: str
    root: str
    kind: str
    state: str
    ts: int
    detail: dict[str, Any]

    @property
    def alert_id(self) -> str:
        """Stable: the same transition derived twice (a restart) has the same id, for consumers to dedupe."""
        return stable_id(self.campaign, self.root, self.kind, self.state, self.ts)

    def to_dict(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, **asdict(self)}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Alert:
        return cls(row["campaign"], row["root"], row["kind"], row["state"], int(row["ts"]), dict(row["detail"]))


@dataclass(frozen=True, slots=True)
class CascadeSummary:
    """A cascade's numbers at one moment: a snapshot row and a leaderboard entry."""

    campaign: str
    root: str
    size: int
    max_depth: int
    binds: int
    revenue: int
    rewards: int
    clawbacks: int
    fraud: int
    virality: float
    last_bind_ts: int | None

    @property
    def return_on_rewards(self) -> float | None:
        """Attributed revenue per unit of rewards paid (both gross of refunds); None before any reward."""
        return self.revenue / self.rewards if self.rewards else None

    @property
    def fraud_rate(self) -> float:
        """Fraud rejections per bind attempt that reached the fraud rules: fraud / (binds + fraud)."""
        attempts = self.binds + self.fraud
        return self.fraud / attempts if attempts else 0.0


def ratios(per_depth: list[int]) -> list[float]:
    """Generation ratios R_d = nodes at depth d+1 / nodes at depth d, for every d with a next generation."""
    return [per_depth[d + 1] / per_depth[d] if per_depth[d] else 0.0 for d in range(len(per_depth) - 1)]


class CascadeTracker:
    """One cascade (campaign, root): its tree, money, bind timeline and stall episode.

    The tree is kept as parallel lists indexed by node number (root = 0), with each node's subtree size,
    so the Wiener index W (sum of distances over unordered pairs) is updated in O(depth) per new leaf:
    a leaf v under p adds D(p) + n to W (v is one step further than p from each of the n existing nodes),
    where D(x) is the sum of distances from x to all nodes. D(root) is the sum of depths, and walking
    down, D(child) = D(parent) + n - 2 * size(child) (the child's subtree comes one step closer, the rest
    one step further), so D(p) is D(root) plus those terms along p's path, read on the same upward walk
    that increments the subtree sizes.
    """

    def __init__(self, campaign: str, root: str, config: CascadeConfig) -> None:
        self.campaign, self.root, self.config = campaign, root, config
        self.index: dict[str, int] = {root: 0}
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.sizes: list[int] = [1]
        self.per_depth: list[int] = [1]
        self.wiener = 0
        self.root_distance = 0  # D(root) = sum of depths
        # Outcomes of different users arrive in any order: a bind whose parent's bind has not arrived yet
        # waits here, under its parent, and is attached when the parent is.
        self.orphans: dict[str, list[str]] = {}
        self.pending: set[str] = set()
        self.binds: list[int] = []  # event ts of every bind, sorted
        self.revenue = self.rewards = self.clawbacks = self.fraud = 0
        self.applied: set[str] = set()  # ids of purchases, rejections and entries already counted
        self.stalled_after: int | None = None  # last bind ts when the open stall episode fired

    # -- updates ------------------------------------------------------------------------------------

    def add_bind(self, user: str, parent: str, ts: int) -> bool:
        """A bound user; False when already known (a redelivered outcome)."""
        if user in self.index or user in self.pending:
            return False
        bisect.insort(self.binds, ts)
        if parent not in self.index:
            self.pending.add(user)
            self.orphans.setdefault(parent, []).append(user)
            return True
        waiting = [(user, parent)]
        while waiting:
            child, under = waiting.pop()
            self._attach(child, self.index[under])
            self.pending.discard(child)
            waiting.extend((orphan, child) for orphan in self.orphans.pop(child, ()))
        return True

    def _attach(self, user: str, parent: int) -> None:
        n = len(self.parents)
        distance_sum = self.root_distance  # becomes D(parent), with sizes read before they grow
        node = parent
        while node:
            distance_sum += n - 2 * self.sizes[node]
            self.sizes[node] += 1
            node = self.parents[node]
        self.sizes[0] += 1
        self.wiener += distance_sum + n
        depth = self.depths[parent] + 1
        self.index[user] = n
        self.parents.append(parent)
        self.depths.append(depth)
        self.sizes.append(1)
        self.root_distance += depth
        if depth == len(self.per_depth):
            self.per_depth.append(0)
        self.per_depth[depth] += 1

    def add_once(self, record_id: str, field: str, amount: int) -> bool:
        """Add `amount` to a counter once per record id (purchases, rejections and entries are redelivered)."""
        if record_id in self.applied:
            return False
        self.applied.add(record_id)
        setattr(self, field, getattr(self, field) + amount)
        return True

    # -- numbers ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Every node known: the root, attached binds, and binds still waiting for their parent."""
        return len(self.parents) + len(self.pending)

    @property
    def max_depth(self) -> int:
        return len(self.per_depth) - 1

    @property
    def virality(self) -> float:
        """Structural virality: mean distance over all pairs of the attached tree (0 below two nodes)."""
        n = len(self.parents)
        return 2 * self.wiener / (n * (n - 1)) if n > 1 else 0.0

    @property
    def last_bind_ts(self) -> int | None:
        return self.binds[-1] if self.binds else None

    def generation_ratios(self) -> list[float]:
        return ratios(self.per_depth)

    def median_gap(self) -> float | None:
        """Median gap between consecutive binds among the last `recent_binds`; None below two binds."""
        recent = self.binds[-self.config.recent_binds:]
        if len(recent) < 2:
            return None
        return statistics.median(b - a for a, b in zip(recent, recent[1:], strict=False))

    def stall_threshold(self) -> int:
        """max(stall_min, stall_factor x median gap): a cascade that bound every second stalls sooner."""
        gap = self.median_gap()
        factor = 0 if gap is None else int(self.config.stall_factor * gap)
        return max(self.config.stall_min_ms, factor)

    def since_last_bind(self, now_ms: int) -> int | None:
        return None if not self.binds else now_ms - self.binds[-1]

    def stalled(self, now_ms: int) -> bool:
        since = self.since_last_bind(now_ms)
        return self.size >= self.config.min_size and since is not None and since > self.stall_threshold()

    def summary(self) -> CascadeSummary:
        return CascadeSummary(self.campaign, self.root, self.size, self.max_depth, len(self.binds), self.revenue,
                              self.rewards, self.clawbacks, self.fraud, self.virality, self.last_bind_ts)

    # -- alerts -------------------------------------------------------------------------------------

    def check(self, now_ms: int) -> list[Alert]:
        """Resolve the open stall episode if the cascade grew since it fired; fire a new one if stalled."""
        alerts = []
        if self.stalled_after is not None and self.binds and self.binds[-1] > self.stalled_after:
            grew_at = self.binds[bisect.bisect_right(self.binds, self.stalled_after)]
            alerts.append(self._alert(RESOLVED, grew_at, stalled_after_bind_ts=self.stalled_after))
            self.stalled_after = None
        if self.stalled_after is None and self.stalled(now_ms):
            last, threshold = self.binds[-1], self.stall_threshold()
            gap = self.median_gap()
            alerts.append(self._alert(FIRING, last + threshold, threshold_ms=threshold, median_gap_ms=gap))
            self.stalled_after = last
        return alerts

    def _alert(self, state: str, ts: int, **detail: Any) -> Alert:
        return Alert(self.campaign, self.root, STALLED, state, ts,
                     {"size": self.size, "last_bind_ts": self.last_bind_ts, **detail})

    def restore(self, alert: Alert) -> None:
        """Take over the episode state a previous run published (its last alert for this cascade)."""
        self.stalled_after = int(alert.detail["last_bind_ts"]) if alert.state == FIRING else None


class CampaignStats:
    """A campaign's K-factor windows, nodes per depth, and the `k_below_one` episode.

    Distinct sharers are counted per window, so the share and bind times of the windows not judged yet
    are kept (sorted); older ones are pruned after each check. Nodes are kept as a set of user ids so a
    redelivered bind counts once.
    """

    def __init__(self, campaign: str, config: CascadeConfig) -> None:
        self.campaign, self.config = campaign, config
        self.shares: list[tuple[int, str]] = []  # (ts, sharer), sorted
        self.bind_times: list[int] = []  # sorted
        self.nodes: set[str] = set()
        self.per_depth: list[int] = []
        self.next_window: int | None = None  # start of the first tumbling window not judged yet
        self.below = 0  # consecutive judged windows with K < 1
        self.firing = False

    def add_share(self, user: str, depth: int | None, ts: int) -> None:
        """A share: its sharer counts in K's denominator; a seed's first share also makes a depth-0 node."""
        bisect.insort(self.shares, (ts, user))
        if depth == 0:
            self._node(user, 0)

    def add_bind(self, user: str, depth: int, ts: int) -> bool:
        if not self._node(user, depth):
            return False
        bisect.insort(self.bind_times, ts)
        return True

    def _node(self, user: str, depth: int) -> bool:
        if user in self.nodes:
            return False
        self.nodes.add(user)
        self.per_depth.extend([0] * (depth + 1 - len(self.per_depth)))
        self.per_depth[depth] += 1
        return True

    def k_factor(self, start_ms: int, end_ms: int) -> float:
        """K = binds / distinct sharers in [start, end); 0 without sharers (SPEC 6)."""
        lo = bisect.bisect_left(self.shares, (start_ms, ""))
        hi = bisect.bisect_left(self.shares, (end_ms, ""))
        sharers = len({user for _, user in self.shares[lo:hi]})
        binds = bisect.bisect_left(self.bind_times, end_ms) - bisect.bisect_left(self.bind_times, start_ms)
        return binds / sharers if sharers else 0.0

    def sliding_k(self, now_ms: int) -> float:
        return self.k_factor(now_ms - self.config.k_window_ms, now_ms)

    def generation_ratios(self) -> list[float]:
        return ratios(self.per_depth)

    def check(self, now_ms: int) -> list[Alert]:
        """Judge every window [s, s + W) that closed (its end is not after `now_ms`), in order."""
        size = self.config.k_window_ms
        if self.next_window is None:
            first = min([t for t, _ in self.shares[:1]] + self.bind_times[:1], default=None)
            if first is None:
                return []
            self.next_window = first - first % size
        alerts = []
        while self.next_window + size <= now_ms:
            alerts.extend(self._judge(self.next_window, self.next_window + size))
            self.next_window += size
        self._prune(min(self.next_window, now_ms - size))
        return alerts

    def _judge(self, start: int, end: int) -> list[Alert]:
        k = self.k_factor(start, end)
        self.below = self.below + 1 if k < 1 else 0
        if self.firing == (self.below >= self.config.k_windows_below):
            return []
        self.firing = not self.firing
        detail = {"k": k, "window_start": start, "window_end": end, "windows_below": self.below}
        return [Alert(self.campaign, "", K_BELOW_ONE, FIRING if self.firing else RESOLVED, end, detail)]

    def _prune(self, before_ms: int) -> None:
        del self.shares[: bisect.bisect_left(self.shares, (before_ms, ""))]
        del self.bind_times[: bisect.bisect_left(self.bind_times, before_ms)]

    def restore(self, alert: Alert) -> None:
        """Resume after the window a previous run's last alert judged, in the state that alert left."""
        self.firing = alert.state == FIRING
        self.below = self.config.k_windows_below if self.firing else 0
        self.next_window = alert.ts


def routes(source: str, row: Mapping[str, Any]) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Where a row goes when repartitioned: ((campaign, root), record) for the cascade it changes and
    ((campaign,), record) for the campaign's K and generations. Rows that change nothing go nowhere.
    Records keep only the fields read here, so the repartitioned log stays small."""
    campaign, root, ts = row.get("campaign"), row.get("root"), row.get("ts")
    if not campaign or ts is None:
        return []
    if source == ENTRY:
        record = {"source": ENTRY, "id": row["entry_id"], "amount": row["amount"], "kind": row["kind"], "ts": ts}
        return [((campaign, root), record)] if root else []
    outcome, reason = row.get("outcome"), row.get("reason")
    record = {"source": OUTCOME, "id": row.get("outcome_id") or row.get("event_id"), "outcome": outcome,
              "user_id": row.get("user_id"), "parent": row.get("parent"), "depth": row.get("depth"),
              "amount": row.get("amount"), "ts": ts}
    found: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    seed_share = outcome == "shared" and row.get("depth") == 0
    if root and (outcome in ("bound", "purchase_attributed") or seed_share or reason in FRAUD_REASONS):
        found.append(((campaign, root), record))
    if outcome in ("shared", "bound"):
        found.append(((campaign,), record))
    return found


class CascadeMonitor:
    """All cascades and campaigns of one stream partition (or of everything, in one process)."""

    def __init__(self, config: CascadeConfig | None = None) -> None:
        self.config = config or CascadeConfig()
        self.trackers: dict[CascadeKey, CascadeTracker] = {}
        self.campaigns: dict[str, CampaignStats] = {}
        self.watermark: dict[str, int] = {}
        self.changed: set[CascadeKey] = set()
        self.restored: dict[tuple[str, str, str], Alert] = {}

    def apply_outcome(self, row: Mapping[str, Any]) -> bool:
        """An outcome row as the outcomes topic carries it; True when it changed something."""
        return self._apply_all(OUTCOME, row)

    def apply_entry(self, row: Mapping[str, Any]) -> bool:
        """A ledger entry as the rewards topic carries it (with the `root` of its source user)."""
        return self._apply_all(ENTRY, row)

    def _apply_all(self, source: str, row: Mapping[str, Any]) -> bool:
        return any([self.apply(key, record) for key, record in routes(source, row)])

    def apply(self, key: tuple[str, ...], record: Mapping[str, Any]) -> bool:
        """One routed record (see `routes`); idempotent, so a redelivered record changes nothing."""
        campaign, ts = key[0], record["ts"]
        self.watermark[campaign] = max(ts, self.watermark.get(campaign, ts))
        if len(key) == 1:
            return self._apply_campaign(self._campaign(campaign), record)
        cascade = (campaign, key[1])
        created = cascade not in self.trackers
        changed = self._apply_cascade(self._tracker(cascade), record) or created
        if changed:
            self.changed.add(cascade)
        return changed

    @staticmethod
    def _apply_campaign(stats: CampaignStats, record: Mapping[str, Any]) -> bool:
        if record["outcome"] == "shared":
            stats.add_share(record["user_id"], record["depth"], record["ts"])
            return True
        return stats.add_bind(record["user_id"], record["depth"], record["ts"])

    @staticmethod
    def _apply_cascade(tracker: CascadeTracker, record: Mapping[str, Any]) -> bool:
        if record["source"] == ENTRY:
            amount = record["amount"]
            if record["kind"] == "clawback":
                return tracker.add_once(record["id"], "clawbacks", -amount)
            return tracker.add_once(record["id"], "rewards", max(amount, 0))
        outcome = record["outcome"]
        if outcome == "bound":
            return tracker.add_bind(record["user_id"], record["parent"], record["ts"])
        if outcome == "purchase_attributed":
            return tracker.add_once(record["id"], "revenue", record["amount"] or 0)
        if outcome == "rejected":
            return tracker.add_once(record["id"], "fraud", 1)
        return False  # the seed's share: it only makes sure the cascade exists

    def _tracker(self, key: CascadeKey) -> CascadeTracker:
        tracker = self.trackers.get(key)
        if tracker is None:
            tracker = self.trackers[key] = CascadeTracker(*key, self.config)
            if (alert := self.restored.get((*key, STALLED))) is not None:
                tracker.restore(alert)
        return tracker

    def _campaign(self, campaign: str) -> CampaignStats:
        stats = self.campaigns.get(campaign)
        if stats is None:
            stats = self.campaigns[campaign] = CampaignStats(campaign, self.config)
            if (alert := self.restored.get((campaign, "", K_BELOW_ONE))) is not None:
                stats.restore(alert)
        return stats

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Alerts a previous run published, oldest first: the last one per episode key says whether it is
        open, so a restarted monitor neither fires an open episode again nor misses its resolution."""
        for alert in alerts:
            self.restored[(alert.campaign, alert.root, alert.kind)] = alert

    def clock(self) -> dict[str, int]:
        """Each campaign's event-time clock: its watermark less the allowed lateness."""
        return {campaign: ts - self.config.lateness_ms for campaign, ts in self.watermark.items()}

    def check(self, now_ms: int | Mapping[str, int]) -> list[Alert]:
        """Alerts due at `now_ms`: one event time for every campaign, or one per campaign (campaigns
        missing from the mapping are not checked)."""
        def now(campaign: str) -> int | None:
            return now_ms.get(campaign) if isinstance(now_ms, Mapping) else now_ms

        alerts = []
        for (campaign, _), tracker in self.trackers.items():
            at = now(campaign)
            if at is not None and (tracker.stalled_after is not None or tracker.size >= self.config.min_size):
                alerts.extend(tracker.check(at))
        for campaign, stats in self.campaigns.items():
            at = now(campaign)
            if at is not None:
                alerts.extend(stats.check(at))
        return alerts

    def stalled(self) -> Counter[str]:
        """Cascades with an open stall episode, per campaign."""
        return Counter(c for (c, _), t in self.trackers.items() if t.stalled_after is not None)

    def take_changed(self) -> list[CascadeSummary]:
        """Summaries of the cascades changed since the last call (what a snapshot needs to write)."""
        found = [self.trackers[key].summary() for key in sorted(self.changed)]
        self.changed.clear()
        return found


def leaderboard(summaries: Iterable[CascadeSummary], by: str = "size", limit: int = 10) -> list[CascadeSummary]:
    """Top cascades by size, max_depth, revenue or rewards (ties: the larger cascade, then the root id)."""
    if by not in LEADERBOARD_KEYS:
        raise ValueError(f"leaderboard by {by!r}: must be one of {', '.join(LEADERBOARD_KEYS)}")
    return sorted(summaries, key=lambda s: (-getattr(s, by), -s.size, s.campaign, s.root))[:limit]
