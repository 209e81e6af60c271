"""Per-user waiting queues (SPEC 4.8).

A user whose event waits for a share that is not recorded yet gets a queue: the waiting
event at its head, every later event of the same user behind it, so each user's events
still take effect in their own order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attribution.events import Event


@dataclass(slots=True)
class Queue:
    events: list[Event] = field(default_factory=list)
    waiting_on: str | None = None
    since: int = 0
