"""Event validation (SPEC 1): `parse_event`, and what the engine does with an invalid event."""

from __future__ import annotations

import orjson
import pytest

from attribution.events import Event, Invalid, parse_event
from tests.conftest import T0, ev

COMMON = {"event_id": "e1", "campaign": "c", "user_id": "amy", "ts": T0}
VALID = {
    "share": {**COMMON, "type": "share", "share_id": "X"},
    "scan": {**COMMON, "type": "scan", "share_id": "X"},
    "purchase": {**COMMON, "type": "purchase", "order_id": "o1", "amount": 1000},
    "refund": {**COMMON, "type": "refund", "order_id": "o1"},
}
REQUIRED = [(kind, name) for kind, doc in VALID.items() for name in doc]


def parse(doc: dict) -> Event | Invalid:
    return parse_event(orjson.dumps(doc))


def changed(kind: str, **fields) -> dict:
    return {**VALID[kind], **fields}


def without(kind: str, name: str) -> dict:
    return {k: v for k, v in VALID[kind].items() if k != name}


# -- valid events ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", VALID)
def test_minimal_event_of_each_type_is_valid(kind: str) -> None:
    event = parse(VALID[kind])
    assert isinstance(event, Event)
    assert (event.event_id, event.type, event.campaign, event.user_id, event.ts) == ("e1", kind, "c", "amy", T0)


def test_fields_are_read_by_type() -> None:
    share = parse(changed("share", group=True, channel="moments"))
    scan = parse(changed("scan", device_id="d1", ip="10.0.0.1"))
    purchase = parse(changed("purchase", group_id="G"))
    assert (share.share_id, share.group, share.channel) == ("X", True, "moments")
    assert (scan.share_id, scan.device_id, scan.ip) == ("X", "d1", "10.0.0.1")
    assert (purchase.order_id, purchase.amount, purchase.group_id) == ("o1", 1000, "G")
    assert parse(VALID["refund"]).order_id == "o1"


def test_group_defaults_to_false() -> None:
    assert parse(VALID["share"]).group is False


def test_extra_fields_are_allowed_and_ignored() -> None:
    event = parse(changed("purchase", utm={"source": "poster", "n": [1, 2.5, None]}, currency="CNY", coupon=None))
    assert isinstance(event, Event)
    assert event == parse(VALID["purchase"])


def test_optional_fields_may_be_null() -> None:
    event = parse(changed("share", group=None, channel=None))
    assert (event.group, event.channel) == (False, None)


def test_bytes_and_text_are_both_accepted() -> None:
    assert parse_event(orjson.dumps(VALID["scan"]).decode()) == parse(VALID["scan"])


# -- invalid events --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{not json", b'{"event_id": "e1",}', b"nope", b"{}{}"],
                         ids=["empty", "broken", "trailing-comma", "bare-word", "two-objects"])
def test_not_json_is_invalid(raw: bytes) -> None:
    assert isinstance(parse_event(raw), Invalid)


@pytest.mark.parametrize("raw", [b"[1, 2]", b"1", b'"share"', b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid(raw: bytes) -> None:
    assert isinstance(parse_event(raw), Invalid)


@pytest.mark.parametrize("raw", [
    b'{"event_id": "\xff", "type": "share", "campaign": "c", "user_id": "amy", "ts": 1, "share_id": "X"}',
    b'{"event_id": "\xed\xa0\x80", "type": "share", "campaign": "c", "user_id": "amy", "ts": 1, "share_id": "X"}',
    b'{"event_id": "\\ud800", "type": "share", "campaign": "c", "user_id": "amy", "ts": 1, "share_id": "X"}',
], ids=["bad-byte", "encoded-surrogate", "lone-surrogate-escape"])
def test_invalid_utf8_is_invalid(raw: bytes) -> None:
    assert isinstance(parse_event(raw), Invalid)


def padded(size: int) -> bytes:
    """A valid share event of exactly `size` bytes (padded with an extra field)."""
    base = orjson.dumps({**VALID["share"], "pad": ""})
    return orjson.dumps({**VALID["share"], "pad": "x" * (size - len(base))})


def test_event_of_64_kib_is_valid_and_one_byte_more_is_invalid() -> None:
    assert len(padded(64 * 1024)) == 64 * 1024
    assert isinstance(parse_event(padded(64 * 1024)), Event)
    assert isinstance(parse_event(padded(64 * 1024 + 1)), Invalid)


@pytest.mark.parametrize(("kind", "name"), REQUIRED, ids=[f"{k}-{n}" for k, n in REQUIRED])
def test_missing_required_field_is_invalid(kind: str, name: str) -> None:
    assert isinstance(parse(without(kind, name)), Invalid)


@pytest.mark.parametrize(("kind", "name"), REQUIRED, ids=[f"{k}-{n}" for k, n in REQUIRED])
def test_null_required_field_is_invalid(kind: str, name: str) -> None:
    assert isinstance(parse(changed(kind, **{name: None})), Invalid)


WRONG_TYPES = [
    ("share", "event_id", 1), ("share", "event_id", ["e1"]), ("share", "type", 1), ("share", "campaign", 7),
    ("share", "user_id", 42), ("share", "user_id", {"id": "amy"}), ("share", "ts", "1767225600000"),
    ("share", "ts", True), ("share", "ts", T0 + 0.5), ("share", "ts", float(T0)), ("share", "share_id", 5),
    ("share", "group", "true"), ("share", "group", 1), ("share", "channel", 3), ("scan", "share_id", False),
    ("scan", "device_id", 9), ("scan", "ip", ["10.0.0.1"]),
    ("purchase", "order_id", 17), ("purchase", "amount", "1000"), ("purchase", "amount", True),
    ("purchase", "amount", 1000.0), ("purchase", "amount", 9.5), ("purchase", "group_id", 3),
    ("refund", "order_id", {"o": 1}),
]


@pytest.mark.parametrize(("kind", "name", "value"), WRONG_TYPES, ids=[f"{k}-{n}-{v!r}" for k, n, v in WRONG_TYPES])
def test_wrong_type_is_invalid(kind: str, name: str, value) -> None:
    assert isinstance(parse(changed(kind, **{name: value})), Invalid)


@pytest.mark.parametrize(("amount", "valid"), [
    (0, False), (-1, False), (1, True), (10**11, True), (10**11 + 1, False), (2**63, False), (2**64 + 1, False),
])
def test_amount_range(amount: int, valid: bool) -> None:
    raw = orjson.dumps(changed("purchase", amount=0)).replace(b'"amount":0', b'"amount":%d' % amount)
    assert isinstance(parse_event(raw), Event if valid else Invalid)


def test_amount_is_kept_exactly() -> None:
    assert parse(changed("purchase", amount=10**11)).amount == 100_000_000_000


ID_FIELDS = [("share", "event_id"), ("share", "user_id"), ("share", "share_id"), ("scan", "share_id"),
             ("purchase", "order_id"), ("purchase", "group_id"), ("refund", "order_id")]


@pytest.mark.parametrize(("kind", "name"), ID_FIELDS, ids=[f"{k}-{n}" for k, n in ID_FIELDS])
@pytest.mark.parametrize(("value", "valid"), [
    ("x" * 128, True), ("x" * 129, False), ("🚀" * 128, True), ("🚀" * 129, False), ("中" * 128, True), ("", False),
], ids=["128", "129", "128-emoji", "129-emoji", "128-cjk", "empty"])
def test_id_length_counts_characters(kind: str, name: str, value: str, valid: bool) -> None:
    assert isinstance(parse(changed(kind, **{name: value})), Event if valid else Invalid)


@pytest.mark.parametrize(("value", "valid"), [
    ("c" * 64, True), ("c" * 65, False), ("春" * 64, True), ("春" * 65, False), ("", False)])
def test_campaign_length(value: str, valid: bool) -> None:
    assert isinstance(parse(changed("share", campaign=value)), Event if valid else Invalid)


@pytest.mark.parametrize("kind", ["click", "Share", "", "purchases"])
def test_unknown_type_is_invalid(kind: str) -> None:
    assert isinstance(parse(changed("share", type=kind)), Invalid)


def test_ids_may_hold_any_character() -> None:
    odd = "a|b:{c} \"d\" 'e' 😀 中文\t\n\x00\\"
    event = parse(changed("purchase", event_id=odd, user_id=odd, order_id=odd, group_id=odd, campaign="c|{1}: 春"))
    assert (event.event_id, event.user_id, event.order_id, event.group_id) == (odd,) * 4
    assert event.campaign == "c|{1}: 春"


# -- the engine and invalid events -----------------------------------------------------


def test_invalid_event_is_rejected_dead_lettered_and_never_stops_the_batch(run_factory) -> None:
    run = run_factory()
    bad = [b"{not json", b"[1, 2]", b"\xff\xfe", orjson.dumps(changed("purchase", amount=0, event_id="x2")),
           padded(64 * 1024 + 1)]
    result = run.feed(ev("k1", "share", "kol", 1, share_id="X"), *bad, ev("a1", "scan", "amy", 2, share_id="X"))
    rejected = [o for o in result.outcomes if o.reason == "invalid_event"]
    assert len(rejected) == len(bad)
    assert {(o.outcome, o.parent, o.root, o.depth) for o in rejected} == {("rejected", None, None, None)}
    assert [(d.raw, d.reason) for d in result.dead_letters] == [(raw, "invalid_event") for raw in bad]
    assert run.outcome("a1")["outcome"] == "bound"  # valid events after them still apply
    assert run.balances() == {"amy": 100, "kol": 20}


def test_invalid_event_of_a_known_user_reports_no_lineage_and_changes_nothing(run_factory) -> None:
    run = run_factory()
    run.feed(ev("k1", "share", "kol", 1, share_id="X"), ev("a1", "scan", "amy", 2, share_id="X"))
    ledger = run.ledger()
    result = run.feed(changed("purchase", event_id="x1", user_id="amy", amount=9.5))
    assert [(o.event_id, o.outcome, o.reason, o.parent, o.root, o.depth) for o in result.outcomes] == [
        ("x1", "rejected", "invalid_event", None, None, None)]
    assert (result.entries, result.nodes) == ([], [])
    assert run.ledger() == ledger


def test_extra_fields_do_not_change_processing(run_factory) -> None:
    run = run_factory()
    run.feed({**ev("k1", "share", "kol", 1, share_id="X"), "extra": 1},
             {**ev("a1", "scan", "amy", 2, share_id="X"), "meta": {"ua": "WeChat"}})
    assert run.outcome("a1")["outcome"] == "bound"
    assert run.balances() == {"amy": 100, "kol": 20}
