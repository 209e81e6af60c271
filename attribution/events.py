"""Event model and validation (SPEC 1): raw bytes in, a typed `Event` or a reason out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_EVENT_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_CAMPAIGN_CHARS = 64
MIN_AMOUNT = 1
MAX_AMOUNT = 10**11
MAX_TS = 2**53 - 1
EVENT_TYPES = ("share", "scan", "purchase", "refund")


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. Optional fields are None when absent."""

    event_id: str
    type: str
    campaign: str
    user_id: str
    ts: int
    share_id: str | None = None
    group: bool = False
    channel: str | None = None
    device_id: str | None = None
    ip: str | None = None
    order_id: str | None = None
    amount: int | None = None
    group_id: str | None = None
    offset: int | None = None  # where it was read from: not part of the event's JSON
    raw: bytes | None = field(default=None, repr=False, compare=False)  # the bytes it was read from

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready fields, absent optionals left out."""
        out: dict[str, Any] = {}
        for name in self.__slots__[:-2]:
            value = getattr(self, name)
            if value is not None and not (name == "group" and value is False):
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Invalid:
    """An event that failed validation: what could be read of it, and why it failed."""

    detail: str
    event_id: str | None = None
    type: str | None = None
    campaign: str | None = None
    user_id: str | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id(obj: dict, name: str, max_chars: int, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise ValueError(f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    if not 1 <= len(value) <= max_chars:
        raise ValueError(f"field {name!r} must be 1..{max_chars} characters")
    return value


def _text(obj: dict, name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    return value


def _echo(obj: Any, name: str) -> str | None:
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def parse_event(raw: bytes | str) -> Event | Invalid:
    """Validate one message. Never raises: every failure becomes an `Invalid` with a reason."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_EVENT_BYTES:
        return Invalid(f"event larger than {MAX_EVENT_BYTES} bytes")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Invalid(f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Invalid("not a JSON object")
    try:
        return _build(obj)
    except ValueError as exc:
        return Invalid(
            str(exc),
            event_id=_echo(obj, "event_id"),
            type=_echo(obj, "type"),
            campaign=_echo(obj, "campaign"),
            user_id=_echo(obj, "user_id"),
        )


def _build(obj: dict) -> Event:
    event_id = _id(obj, "event_id", MAX_ID_CHARS, True)
    kind = obj.get("type")
    if kind not in EVENT_TYPES:
        raise ValueError(f"field 'type' must be one of {', '.join(EVENT_TYPES)}")
    campaign = _id(obj, "campaign", MAX_CAMPAIGN_CHARS, True)
    user_id = _id(obj, "user_id", MAX_ID_CHARS, True)
    ts = obj.get("ts")
    if ts is None:
        raise ValueError("missing field 'ts'")
    if not _is_int(ts) or not 0 <= ts <= MAX_TS:
        raise ValueError("field 'ts' must be an integer of epoch milliseconds")
    fields: dict[str, Any] = {}
    if kind == "share":
        fields["share_id"] = _id(obj, "share_id", MAX_ID_CHARS, True)
        group = obj.get("group")
        if group is not None and not isinstance(group, bool):
            raise ValueError("field 'group' must be a boolean")
        fields["group"] = bool(group)
        fields["channel"] = _text(obj, "channel")
    elif kind == "scan":
        fields["share_id"] = _id(obj, "share_id", MAX_ID_CHARS, True)
        fields["device_id"] = _text(obj, "device_id")
        fields["ip"] = _text(obj, "ip")
    elif kind == "purchase":
        fields["order_id"] = _id(obj, "order_id", MAX_ID_CHARS, True)
        amount = obj.get("amount")
        if amount is None:
            raise ValueError("missing field 'amount'")
        if not _is_int(amount):
            raise ValueError("field 'amount' must be an integer of minor units")
        if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
            raise ValueError(f"field 'amount' must be {MIN_AMOUNT}..{MAX_AMOUNT}")
        fields["amount"] = amount
        fields["group_id"] = _id(obj, "group_id", MAX_ID_CHARS, False)
    else:
        fields["order_id"] = _id(obj, "order_id", MAX_ID_CHARS, True)
    return Event(event_id=event_id, type=kind, campaign=campaign, user_id=user_id, ts=ts, **fields)
