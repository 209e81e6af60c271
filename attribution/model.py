"""The records the rules read and write, and the outputs they produce (SPEC 3 and 5)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

SEED, BOUND, ORGANIC = "seed", "bound", "organic"


@dataclass(frozen=True, slots=True)
class User:
    """A (campaign, user) that left `unknown`. `ancestors` is parent first, cut to L."""

    state: str
    entered_at: int
    root: str | None = None
    depth: int | None = None
    ancestors: tuple[str, ...] = ()
    bound_at: int | None = None
    first_purchase_done: bool = False

    @property
    def parent(self) -> str | None:
        return self.ancestors[0] if self.state == BOUND else None

    def lineage(self) -> tuple[str | None, str | None, int | None]:
        """(parent, root, depth) as outcomes report them: null outside a cascade."""
        if self.state == ORGANIC:
            return None, None, None
        return self.parent, self.root, self.depth


NO_LINEAGE: tuple[None, None, None] = (None, None, None)


def _fields(record: Any) -> dict[str, Any]:
    """A slotted record as a dict, shallowly (dataclasses.asdict deep-copies: 10x slower on the hot path)."""
    return {name: getattr(record, name) for name in record.__slots__}


@dataclass(frozen=True, slots=True)
class Share:
    """A recorded share with the sharer's lineage snapshot taken when it was made."""

    share_id: str
    campaign: str
    sharer: str
    event_id: str
    ts: int
    root: str
    depth: int
    ancestors: tuple[str, ...]
    group: bool = False


@dataclass(frozen=True, slots=True)
class Credit:
    """What a purchase credited, kept on the order so a refund can reverse exactly that."""

    entry_id: str
    beneficiary: str
    amount: int
    kind: str
    level: int


@dataclass(frozen=True, slots=True)
class Order:
    campaign: str
    order_id: str
    buyer: str
    event_id: str
    credits: tuple[Credit, ...] = ()
    refunded_by: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    entry_id: str
    campaign: str
    beneficiary: str
    amount: int
    kind: str
    level: int
    source_event_id: str
    source_user: str
    ts: int
    root: str | None = None  # the cascade of the source user, for per-cascade analytics

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(slots=True)
class Outcome:
    event_id: str | None
    campaign: str | None
    type: str | None
    user_id: str | None
    outcome: str
    reason: str | None = None
    parent: str | None = None
    root: str | None = None
    depth: int | None = None
    ts: int | None = None
    detail: str | None = None
    budget_exhausted: list[dict[str, Any]] = field(default_factory=list)
    amount: int | None = None  # a purchase's amount, for revenue analytics
    partition: int | None = None
    offset: int | None = None
    outcome_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True, slots=True)
class Node:
    campaign: str
    user_id: str
    state: str
    parent: str | None
    root: str | None
    depth: int | None
    entered_at: int

    @classmethod
    def of(cls, campaign: str, user_id: str, user: User) -> Node:
        parent, root, depth = user.lineage()
        return cls(campaign, user_id, user.state, parent, root, depth, user.entered_at)

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


def entry_id(campaign: str, source_event_id: str, kind: str, level: int, beneficiary: str, *more: str) -> str:
    """A ledger entry's id: derived from what made it, so every re-run and every store agrees."""
    return stable_id(campaign, source_event_id, kind, level, beneficiary, *more)


def stable_id(*parts: str | int) -> str:
    """A deterministic id from parts that may hold any character (length-prefixed, then hashed)."""
    packed = "".join(f"{len(str(p))}:{p}" for p in parts)
    return hashlib.blake2b(packed.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
