"""Campaign configuration (SPEC 2): YAML in, validated immutable `Campaign`s out.

A bad file stops the process with an error that names the field: a campaign that pays
the wrong amounts is worse than one that does not start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


class ConfigError(ValueError):
    """The campaigns file is wrong; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class GroupBuy:
    size: int
    window_ms: int
    initiator_reward: int


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    starts_at: int | None
    ends_at: int | None
    share_ttl_ms: int
    attribution_window_ms: int
    bind_scanner: int
    bind_sharer: int
    first_purchase_sharer: int
    first_purchase_min_amount: int
    commission_bps: tuple[int, ...]
    commission_cap: int | None
    budget: int | None
    max_binds_per_device: int | None
    group_buy: GroupBuy | None

    @property
    def levels(self) -> int:
        """L in the SPEC: how many ancestors a lineage keeps."""
        return max(1, len(self.commission_bps))

    def covers(self, ts: int) -> bool:
        """Is event time `ts` inside [starts_at, ends_at)?"""
        return (self.starts_at is None or ts >= self.starts_at) and (self.ends_at is None or ts < self.ends_at)


def parse_duration(text: Any, where: str) -> int:
    """'45s', '30m', '24h', '7d' → milliseconds."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(f"{where}: {text!r} is not a duration like 45s, 30m, 24h or 7d")
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def _timestamp(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an ISO-8601 timestamp") from None
    else:
        raise ConfigError(f"{where}: {value!r} is not an ISO-8601 timestamp")
    if moment.tzinfo is None:
        raise ConfigError(f"{where}: {value!r} needs a time zone (e.g. Z)")
    return int(moment.timestamp() * 1000)


def _amount(section: dict, key: str, where: str, default: int | None = 0) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}.{key}: must be a non-negative integer of minor units, got {value!r}")
    return value


def _section(parent: dict, key: str, where: str, allowed: set[str]) -> dict:
    value = parent.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}: must be a mapping")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{key}: unknown key(s) {', '.join(map(str, unknown))}")
    return value


_TOP = {"id", "starts_at", "ends_at", "share_ttl", "attribution_window", "rewards", "limits", "group_buy"}


def parse_campaign(raw: Any, where: str) -> Campaign:
    """One campaign mapping → `Campaign`, or `ConfigError` naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    cid = raw.get("id")
    if not isinstance(cid, str) or not 1 <= len(cid) <= 64:
        raise ConfigError(f"{where}.id: must be a string of 1..64 characters")
    where = f"campaigns[{cid}]"
    rewards = _section(raw, "rewards", where, {"bind", "first_purchase", "commission_bps", "commission_cap"})
    bind = _section(rewards, "bind", f"{where}.rewards", {"scanner", "sharer"})
    first = _section(rewards, "first_purchase", f"{where}.rewards", {"sharer", "min_amount"})
    limits = _section(raw, "limits", where, {"budget", "max_binds_per_device"})
    bps = rewards.get("commission_bps") or []
    if not isinstance(bps, list) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bps):
        raise ConfigError(f"{where}.rewards.commission_bps: must be a list of non-negative integers")
    group_buy = None
    if raw.get("group_buy") is not None:
        gb = _section(raw, "group_buy", where, {"size", "window", "initiator_reward"})
        size = gb.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{where}.group_buy.size: must be a positive integer")
        group_buy = GroupBuy(
            size=size,
            window_ms=parse_duration(gb.get("window"), f"{where}.group_buy.window"),
            initiator_reward=_amount(gb, "initiator_reward", f"{where}.group_buy"),
        )
    max_binds = _amount(limits, "max_binds_per_device", f"{where}.limits", None)
    campaign = Campaign(
        id=cid,
        starts_at=_timestamp(raw.get("starts_at"), f"{where}.starts_at"),
        ends_at=_timestamp(raw.get("ends_at"), f"{where}.ends_at"),
        share_ttl_ms=parse_duration(raw.get("share_ttl", "30d"), f"{where}.share_ttl"),
        attribution_window_ms=parse_duration(raw.get("attribution_window", "7d"), f"{where}.attribution_window"),
        bind_scanner=_amount(bind, "scanner", f"{where}.rewards.bind"),
        bind_sharer=_amount(bind, "sharer", f"{where}.rewards.bind"),
        first_purchase_sharer=_amount(first, "sharer", f"{where}.rewards.first_purchase"),
        first_purchase_min_amount=_amount(first, "min_amount", f"{where}.rewards.first_purchase"),
        commission_bps=tuple(bps),
        commission_cap=_amount(rewards, "commission_cap", f"{where}.rewards", None),
        budget=_amount(limits, "budget", f"{where}.limits", None),
        max_binds_per_device=max_binds,
        group_buy=group_buy,
    )
    if campaign.starts_at is not None and campaign.ends_at is not None and campaign.ends_at <= campaign.starts_at:
        raise ConfigError(f"{where}.ends_at: must be after starts_at")
    return campaign


def parse_campaigns(doc: Any) -> dict[str, Campaign]:
    """A whole campaigns document (`{campaigns: [...]}`) → campaigns by id."""
    if not isinstance(doc, dict) or not isinstance(doc.get("campaigns"), list):
        raise ConfigError("campaigns file: must be a mapping with a 'campaigns' list")
    unknown = sorted(set(doc) - {"campaigns"})
    if unknown:
        raise ConfigError(f"campaigns file: unknown key(s) {', '.join(map(str, unknown))}")
    out: dict[str, Campaign] = {}
    for index, raw in enumerate(doc["campaigns"]):
        campaign = parse_campaign(raw, f"campaigns[{index}]")
        if campaign.id in out:
            raise ConfigError(f"campaigns[{index}].id: duplicate campaign id {campaign.id!r}")
        out[campaign.id] = campaign
    return out


def load_campaigns(path: str | Path) -> dict[str, Campaign]:
    """Read and validate a campaigns YAML (or JSON) file."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read campaigns: {exc}") from exc
    return parse_campaigns(doc)
