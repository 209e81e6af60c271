"""A deterministic simulator of a viral "fission" campaign, for load tests, demos and soak runs.

The traffic is a branching process: seed users (KOLs, super fans, staff) share codes, friends scan
them and bind, and a bound user shares in turn with probability `p_share`, bringing in `target_k`
friends per sharer on average. Around it: purchases, repeat purchases, refunds, group buys,
organic buyers, and the noise a real stream carries (self-scans, device farms, repeat scans,
redeliveries, malformed messages). Events come out in event-time order because actions are
scheduled on a heap and emitted as the heap unfolds; the same seed gives the same bytes.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
SHARE_TTL_MS = 7 * DAY
GROUP_WINDOW_MS = DAY
MAX_BINDS_PER_DEVICE = 3
CHANNELS = ("wechat", "moments", "qr", "link")
SEED_KINDS = ("kol", "fan", "staff")
# Heavy-tailed (lognormal) delays: (median ms, sigma). Most happen soon, a few take days.
DELAYS: dict[str, tuple[int, float]] = {
    "first_share": (6 * HOUR, 1.0),  # campaign launch -> a seed's first post
    "reshare": (8 * HOUR, 1.2),  # bound -> shares; also the gap to a second share
    "scan": (45 * MINUTE, 1.6),  # share -> a friend opens it (capped inside share_ttl)
    "rescan": (DAY, 1.0),  # first scan -> the same user scans again
    "purchase": (4 * HOUR, 1.8),  # scan -> purchase: minutes to days
    "group_join": (HOUR, 1.0),  # group share / scan -> group purchase
    "repurchase": (3 * DAY, 0.8),
    "refund": (4 * DAY, 0.6),
    "redelivery": (2 * MINUTE, 1.5),  # the broker hands the same message out again
}


@dataclass(frozen=True)
class SimulationParams:
    """Knobs of one run. Rates are probabilities per opportunity (per user, share or event)."""

    campaign: str = "spring-red-packet"
    seed: int = 0
    seeds: int = 20  # seed users: KOLs / super fans / staff
    target_k: float = 1.3  # mean binds per sharer (overdispersed Poisson)
    p_share: float = 0.9  # a bound user shares; the cascade grows when p_share * target_k > 1
    max_events: int = 20_000
    start_ts: int = 1_768_867_200_000  # 2026-01-20T00:00:00Z
    days: int = 30  # campaign length; nothing is generated after it ends
    p_purchase: float = 0.35  # a participant buys
    repeat_purchase_rate: float = 0.2  # after each purchase, another one follows
    refund_rate: float = 0.03
    repeat_scan_rate: float = 0.05
    self_scan_rate: float = 0.02  # a sharer scans their own code (fraud)
    device_reuse_rate: float = 0.02  # a share is hit by a device farm (2-6 fake accounts, one device)
    farm_devices: int = 5
    organic_per_day: float = 30.0  # buyers with no referral
    organic_share_rate: float = 0.1  # an organic buyer later shares (a new cascade)
    group_rate: float = 0.05  # a share opens a group buy
    bad_rate: float = 0.01
    duplicate_rate: float = 0.01
    budget: int = 100_000_000

    @property
    def end_ts(self) -> int:
        return self.start_ts + self.days * DAY


class _Simulation:
    """The heap of scheduled actions and the counters that name users, shares, orders and events."""

    def __init__(self, p: SimulationParams) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.heap: list[tuple[int, int, str, tuple]] = []
        self.seq = 0
        self.counters = {"u": 0, "s": 0, "o": 0, "ev": 0}

    def next_id(self, prefix: str, fmt: str = "{}{}") -> str:
        self.counters[prefix] += 1
        return fmt.format(prefix, self.counters[prefix])

    def new_user(self) -> str:
        return self.next_id("u", "{}{:06d}")

    def at(self, ts: int, action: str, *args: Any) -> None:
        """Schedule an action; anything after the campaign ends never happens."""
        if ts < self.p.end_ts:
            self.seq += 1
            heapq.heappush(self.heap, (ts, self.seq, action, args))

    def delay(self, name: str) -> int:
        median, sigma = DELAYS[name]
        return max(1000, int(self.rng.lognormvariate(math.log(median), sigma)))

    def friends(self, mean: float) -> int:
        """Gamma-Poisson (negative binomial): same mean, the long tail of a few viral posts."""
        lam = self.rng.gammavariate(2.0, mean / 2.0) if mean > 0 else 0.0
        limit, k, prod = math.exp(-lam), 0, self.rng.random()
        while prod > limit:
            k, prod = k + 1, prod * self.rng.random()
        return k

    def run(self) -> Iterator[bytes]:
        """Seed the heap, then pop actions in event-time order; each emits and schedules what follows."""
        p = self.p
        for i in range(p.seeds):
            self.start_sharing(p.start_ts, f"{SEED_KINDS[i % len(SEED_KINDS)]}-{i}", "first_share")
        if p.organic_per_day > 0:
            self.at(p.start_ts + int(self.rng.expovariate(p.organic_per_day / DAY)), "organic")
        while self.heap:
            ts, _, action, args = heapq.heappop(self.heap)
            yield from getattr(self, "_" + action)(ts, *args)

    # -- emitting -------------------------------------------------------------------------------

    def emit(self, ts: int, kind: str, user: str, **fields: Any) -> list[bytes]:
        """Encode one event; maybe schedule its redelivery, maybe follow it with a malformed one."""
        event = {"event_id": self.next_id("ev", "{}-{}"), "type": kind, "campaign": self.p.campaign,
                 "user_id": user, "ts": ts, **{k: v for k, v in fields.items() if v is not None}}
        raw = orjson.dumps(event)
        if self.rng.random() < self.p.duplicate_rate:
            self.at(ts + self.delay("redelivery"), "redeliver", raw)
        out = [raw]
        if self.rng.random() < self.p.bad_rate:
            out.append(self.malformed(event, raw))
        return out

    def malformed(self, event: dict, raw: bytes) -> bytes:
        """A broken sibling of a good event, as buggy clients produce (fresh event id)."""
        bad = {**event, "event_id": self.next_id("ev", "{}-{}")}
        kind = self.rng.randrange(6)
        if kind == 0:  # not JSON: cut off mid-object
            return raw[: len(raw) // 2]
        if kind == 1:  # a required field missing
            del bad[self.rng.choice(["ts", "user_id", "type", "campaign"])]
        elif kind == 2:  # money as a float
            bad.update(type="purchase", order_id=f"bad-{bad['event_id']}", amount=49.9)
        elif kind == 3:
            bad["campaign"] = "autumn-promo"
        elif kind == 4:  # over-long ids
            name = self.rng.choice(["user_id", "event_id", "campaign"])
            bad[name] = name[0] * (65 if name == "campaign" else 129)
        else:  # wrong types
            name, value = self.rng.choice([("ts", str(event["ts"])), ("user_id", 12345), ("type", ["scan"])])
            bad[name] = value
        return orjson.dumps(bad)

    # -- actions (each returns the bytes it emits, and schedules what follows) -----------------

    def start_sharing(self, ts: int, user: str, delay: str) -> None:
        """A new sharer posts once, sometimes twice; the friends they bring split across posts."""
        posts = 2 if self.rng.random() < 0.25 else 1
        for _ in range(posts):
            ts += self.delay(delay)
            delay = "reshare"
            self.at(ts, "share", user, self.p.target_k / posts, self.rng.random() < self.p.group_rate)

    def scan(self, ts: int, expiry: int, user: str, sid: str, device: str, ip: str | None, mode: str,
             group: bool = False, delay: str = "scan") -> None:
        self.at(min(ts + self.delay(delay), expiry), "scan", user, sid, expiry, device, ip, mode, group)

    def _share(self, ts: int, user: str, mean: float, group: bool) -> list[bytes]:
        p, rng = self.p, self.rng
        sid = self.next_id("s")
        out = self.emit(ts, "share", user, share_id=sid, channel=rng.choice(CHANNELS), group=group or None)
        expiry = ts + SHARE_TTL_MS - 1  # scans come inside the ttl: an expired scan would skew K
        for _ in range(self.friends(mean)):
            friend = self.new_user()
            ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            self.scan(ts, expiry, friend, sid, f"d-{friend}", ip, "friend", group)
        if rng.random() < p.device_reuse_rate:  # a device farm: fake accounts on one phone, beyond the friends
            farm = rng.randrange(p.farm_devices)
            for _ in range(rng.randint(2, 6)):
                self.scan(ts, expiry, self.new_user(), sid, f"farm-{farm}", f"100.64.0.{farm}", "farm")
        if rng.random() < p.self_scan_rate:
            self.scan(ts, expiry, user, sid, f"d-{user}", None, "self")
        if group and rng.random() < 0.8:  # the initiator usually buys into their own group
            self.at(ts + self.delay("group_join"), "purchase", user, sid)
        return out

    def _scan(self, ts: int, user: str, sid: str, expiry: int, device: str, ip: str | None, mode: str,
              group: bool) -> list[bytes]:
        out = self.emit(ts, "scan", user, share_id=sid, device_id=device, ip=ip)
        if mode != "friend":  # self-scans, repeats and farm accounts lead nowhere
            return out
        p, rng = self.p, self.rng
        if rng.random() < p.repeat_scan_rate:
            self.scan(ts, expiry, user, sid, device, ip, "repeat", delay="rescan")
        if group and rng.random() < 0.7:
            self.at(ts + min(self.delay("group_join"), GROUP_WINDOW_MS - HOUR), "purchase", user, sid)
        elif rng.random() < p.p_purchase:
            self.at(ts + self.delay("purchase"), "purchase", user, None)
        if rng.random() < p.p_share:
            self.start_sharing(ts, user, "reshare")
        return out

    def _purchase(self, ts: int, user: str, group_id: str | None) -> list[bytes]:
        order = self.next_id("o")
        price = self.rng.lognormvariate(math.log(4900), 0.8)
        amount = min(59_900, max(990, round(price, -2) - 10))  # prices like 49.90
        out = self.emit(ts, "purchase", user, order_id=order, amount=int(amount), group_id=group_id)
        if self.rng.random() < self.p.refund_rate:
            self.at(ts + self.delay("refund"), "refund", user, order)
        if self.rng.random() < self.p.repeat_purchase_rate:
            self.at(ts + self.delay("repurchase"), "purchase", user, None)
        return out

    def _refund(self, ts: int, user: str, order: str) -> list[bytes]:
        return self.emit(ts, "refund", user, order_id=order)

    def _redeliver(self, ts: int, raw: bytes) -> list[bytes]:
        return [raw]

    def _organic(self, ts: int) -> list[bytes]:
        """An organic buyer arrives (Poisson arrivals); a few go on to share and seed a cascade."""
        user = self.new_user()
        out = self._purchase(ts, user, None)
        if self.rng.random() < self.p.organic_share_rate:
            self.start_sharing(ts, user, "reshare")
        self.at(ts + 1 + int(self.rng.expovariate(self.p.organic_per_day / DAY)), "organic")
        return out


def simulate(params: SimulationParams) -> Iterator[bytes]:
    """The events of one run, JSON-encoded, in event-time order (redeliveries come later)."""
    return itertools.islice(_Simulation(params).run(), params.max_events)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def campaign_config(params: SimulationParams) -> dict:
    """The campaigns document the simulated traffic was made for, so a run replays with its config."""
    return {"campaigns": [{
        "id": params.campaign,
        "starts_at": _iso(params.start_ts),
        "ends_at": _iso(params.end_ts + 999),  # rounded up to the second: covers every event
        "share_ttl": f"{SHARE_TTL_MS // DAY}d",
        "attribution_window": "7d",
        "rewards": {
            "bind": {"scanner": 100, "sharer": 50},
            "first_purchase": {"sharer": 500, "min_amount": 1000},
            "commission_bps": [1000, 300, 100],
            "commission_cap": 5000,
        },
        "limits": {"budget": params.budget, "max_binds_per_device": MAX_BINDS_PER_DEVICE},
        "group_buy": {"size": 3, "window": f"{GROUP_WINDOW_MS // HOUR}h", "initiator_reward": 300},
    }]}


def write_jsonl(path: str | Path, events: Iterable[bytes]) -> int:
    """Write one event per line; returns how many were written."""
    count = 0
    with Path(path).open("wb") as handle:
        for raw in events:
            handle.write(raw + b"\n")
            count += 1
    return count
