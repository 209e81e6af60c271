"""A batch's view of the state: reads come from what the store fetched, writes stay local.

The rules read through `View.get`. A key the store has not fetched yet raises `NeedsLoad`;
the engine then gathers every missing key of the round and fetches them in one round trip,
so a batch costs a handful of round trips, never one per event. Writes are journaled per
event: an event interrupted by `NeedsLoad` leaves no trace and simply runs again.

Keys are tuples whose first item names the kind:

| key | value |
|---|---|
| ("user", campaign, user_id) | `User` or None |
| ("seen", event_id) | the duplicate mark ("partition:offset" where it was read) or None |
| ("share", share_id) | `Share` or None |
| ("order", campaign, order_id) | `Order` or None |
| ("claim_share", share_id, event_id) | bool: the share id is this event's (atomic, idempotent) |
| ("claim_order", campaign, order_id, event_id) | bool: the order id is this event's |
| ("device", campaign, device_id, user_id, limit) | bool: the device may bind this user |
| ("budget", campaign, entry_id, amount, budget) | bool: the credit fits the budget |
| ("group_join", campaign, group_id, buyer, event_id, size) | bool: this join completed the group |

The last five are atomic operations the store performs when fetching them; each is
idempotent for its key, so a batch re-run after a crash gets the same answers.
"""

from __future__ import annotations

from typing import Any

Key = tuple

WRITABLE = frozenset({"user", "seen", "share", "order"})
OPERATIONS = frozenset({"claim_share", "claim_order", "device", "budget", "group_join"})


class NeedsLoad(Exception):  # noqa: N818 - a control signal, not an error
    """The running event needs keys that have not been fetched."""

    def __init__(self, keys: list[Key]) -> None:
        super().__init__(keys)
        self.keys = keys


class View:
    """Fetched values + this batch's writes + the running event's journal."""

    def __init__(self) -> None:
        self.fetched: dict[Key, Any] = {}
        self.dirty: dict[Key, Any] = {}
        self._journal: dict[Key, Any] = {}

    def get(self, key: Key) -> Any:
        if key in self._journal:
            return self._journal[key]
        if key in self.dirty:
            return self.dirty[key]
        if key in self.fetched:
            return self.fetched[key]
        raise NeedsLoad([key])

    def written(self, key: Key) -> bool:
        """Written by this batch (not read from the store)."""
        return key in self._journal or key in self.dirty

    def has(self, key: Key) -> bool:
        return key in self._journal or key in self.dirty or key in self.fetched

    def put(self, key: Key, value: Any) -> None:
        if key[0] not in WRITABLE:
            raise ValueError(f"{key[0]!r} keys are not writable")
        self._journal[key] = value

    def journal_keys(self) -> list[Key]:
        return list(self._journal)

    def keep(self) -> None:
        """The running event finished: its writes become part of the batch."""
        self.dirty.update(self._journal)
        self._journal.clear()

    def discard(self) -> None:
        """The running event was interrupted: forget its writes."""
        self._journal.clear()

    def missing(self, keys: list[Key]) -> list[Key]:
        return [key for key in dict.fromkeys(keys) if not self.has(key)]
