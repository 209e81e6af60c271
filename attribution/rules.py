"""The rules of SPEC 4, one small function per event type, over a `View`.

Each rule reads what it needs first through the view (which may interrupt it with
`NeedsLoad`), then writes. It never talks to a server and knows nothing of batches,
queues or outputs: the engine drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from attribution.campaigns import Campaign
from attribution.events import Event
from attribution.model import BOUND, ORGANIC, SEED, Credit, LedgerEntry, Order, Share, User, entry_id
from attribution.view import NeedsLoad, View


@dataclass(slots=True)
class Result:
    outcome: str
    reason: str | None = None
    wait_for: str | None = None
    recorded_share: str | None = None


@dataclass(slots=True)
class Context:
    """One event being applied: its campaign, the view, and the credits it makes."""

    view: View
    campaign: Campaign
    event: Event
    final: bool = False
    entries: list[LedgerEntry] = field(default_factory=list)
    budget_cut: list[dict] = field(default_factory=list)
    unanswered: list[tuple] = field(default_factory=list)

    def settle(self) -> None:
        """All budget draws of an event are asked for together, in one round."""
        if self.unanswered:
            raise NeedsLoad(self.unanswered)

    def user(self, user_id: str | None = None) -> User | None:
        return self.view.get(("user", self.campaign.id, user_id or self.event.user_id))

    def set_user(self, user: User, user_id: str | None = None) -> None:
        self.view.put(("user", self.campaign.id, user_id or self.event.user_id), user)

    def credit(
        self,
        beneficiary: str,
        amount: int,
        kind: str,
        level: int = 0,
        *,
        source_event_id: str | None = None,
        entry_key: tuple = (),
    ) -> LedgerEntry | None:
        """Make a credit, drawing on the campaign budget; a zero amount makes nothing."""
        if amount == 0:
            return None
        event = self.event
        source = source_event_id or event.event_id
        ident = entry_id(self.campaign.id, source, kind, level, beneficiary, *entry_key)
        if amount > 0 and self.campaign.budget is not None:
            key = ("budget", self.campaign.id, ident, amount, self.campaign.budget)
            if not self.view.has(key):
                self.unanswered.append(key)  # assume it fits; the event re-runs once answered
            elif not self.view.get(key):
                self.budget_cut.append({"beneficiary": beneficiary, "amount": amount, "kind": kind, "level": level})
                return None
        entry = LedgerEntry(ident, self.campaign.id, beneficiary, amount, kind, level, source,
                            event.user_id, event.ts)
        self.entries.append(entry)
        return entry


def apply_share(ctx: Context) -> Result:
    event, campaign, view = ctx.event, ctx.campaign, ctx.view
    existing: Share | None = view.get(("share", event.share_id))
    user = ctx.user()
    if existing is not None and existing.event_id != event.event_id:
        return Result("rejected", "duplicate_share_id")
    if not view.get(("claim_share", event.share_id, event.event_id)):
        return Result("rejected", "duplicate_share_id")
    if user is None or user.state == ORGANIC:
        entered = user.entered_at if user else event.ts
        user = User(SEED, entered_at=entered, root=event.user_id, depth=0)
        ctx.set_user(user)
    ancestors = ((event.user_id,) + user.ancestors)[: campaign.levels]
    group = event.group and campaign.group_buy is not None
    share = Share(event.share_id, campaign.id, event.user_id, event.event_id, event.ts,
                  user.root, user.depth, ancestors, group)
    view.put(("share", event.share_id), share)
    return Result("shared", recorded_share=event.share_id)


def apply_scan(ctx: Context) -> Result:
    event, campaign, view = ctx.event, ctx.campaign, ctx.view
    share: Share | None = view.get(("share", event.share_id))
    user = ctx.user()
    if share is None:
        return Result("rejected", "unknown_share") if ctx.final else Result("waiting", wait_for=event.share_id)
    if share.campaign != campaign.id:
        return Result("rejected", "campaign_mismatch")
    if event.ts < share.ts or event.ts > share.ts + campaign.share_ttl_ms:
        return Result("rejected", "share_expired")
    if event.user_id == share.sharer:
        return Result("rejected", "self_referral")
    if user is not None:
        return Result("repeat_scan")
    limit = campaign.max_binds_per_device
    if limit is not None and event.device_id:
        if not view.get(("device", campaign.id, event.device_id, event.user_id, limit)):
            return Result("rejected", "device_limit")
    ctx.set_user(User(BOUND, entered_at=event.ts, root=share.root, depth=share.depth + 1,
                      ancestors=share.ancestors, bound_at=event.ts))
    ctx.credit(event.user_id, campaign.bind_scanner, "bind_scanner")
    ctx.credit(share.sharer, campaign.bind_sharer, "bind_sharer")
    return Result("bound")


def apply_purchase(ctx: Context) -> Result:
    event, campaign, view = ctx.event, ctx.campaign, ctx.view
    group_share = _group_to_join(ctx)
    if group_share == "wait":
        return Result("waiting", wait_for=event.group_id)
    user = ctx.user()
    if not view.get(("claim_order", campaign.id, event.order_id, event.event_id)):
        return Result("rejected", "duplicate_order")
    if user is None:
        user = User(ORGANIC, entered_at=event.ts)
        ctx.set_user(user)
    credits: list[Credit] = []
    attributed = user.state == BOUND and user.bound_at <= event.ts <= user.bound_at + campaign.attribution_window_ms
    if attributed:
        for level, bps in enumerate(campaign.commission_bps, start=1):
            if level > len(user.ancestors):
                break
            amount = event.amount * bps // 10000
            if campaign.commission_cap is not None:
                amount = min(amount, campaign.commission_cap)
            credits.append(_kept(ctx.credit(user.ancestors[level - 1], amount, "commission", level)))
        if not user.first_purchase_done and event.amount >= campaign.first_purchase_min_amount:
            if campaign.first_purchase_sharer:
                credits.append(_kept(ctx.credit(user.parent, campaign.first_purchase_sharer, "first_purchase")))
            ctx.set_user(replace(user, first_purchase_done=True))
    if isinstance(group_share, Share):
        gb = campaign.group_buy
        joined_key = ("group_join", campaign.id, group_share.share_id, event.user_id, event.event_id, gb.size)
        if view.get(joined_key):
            ctx.credit(group_share.sharer, gb.initiator_reward, "group_initiator",
                       source_event_id=group_share.event_id)
    order = Order(campaign.id, event.order_id, event.user_id, event.event_id,
                  tuple(c for c in credits if c is not None))
    view.put(("order", campaign.id, event.order_id), order)
    return Result("purchase_attributed" if attributed else "purchase_unattributed")


def _kept(entry: LedgerEntry | None) -> Credit | None:
    if entry is None:
        return None
    return Credit(entry.entry_id, entry.beneficiary, entry.amount, entry.kind, entry.level)


def _group_to_join(ctx: Context) -> Share | str | None:
    """The group this purchase joins, "wait" while its share is unknown, or None."""
    event, campaign = ctx.event, ctx.campaign
    if event.group_id is None or campaign.group_buy is None:
        return None
    share: Share | None = ctx.view.get(("share", event.group_id))
    if share is None:
        return None if ctx.final else "wait"
    if not share.group or share.campaign != campaign.id:
        return None
    if not share.ts <= event.ts <= share.ts + campaign.group_buy.window_ms:
        return None
    return share


def apply_refund(ctx: Context) -> Result:
    event, campaign, view = ctx.event, ctx.campaign, ctx.view
    order: Order | None = view.get(("order", campaign.id, event.order_id))
    if order is None or order.buyer != event.user_id:
        return Result("rejected", "unknown_order")
    if order.refunded_by is not None and order.refunded_by != event.event_id:
        return Result("rejected", "duplicate_refund")
    for credit in order.credits:
        ctx.credit(credit.beneficiary, -credit.amount, "clawback", credit.level, entry_key=(credit.entry_id,))
    view.put(("order", campaign.id, event.order_id), replace(order, refunded_by=event.event_id))
    return Result("refunded")


RULES = {"share": apply_share, "scan": apply_scan, "purchase": apply_purchase, "refund": apply_refund}
