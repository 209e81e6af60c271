"""Campaign configuration (SPEC 2): a wrong file is refused with an error that names the field."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from attribution.campaigns import ConfigError, load_campaigns, parse_campaigns, parse_duration
from tests.conftest import BASE_CAMPAIGN, T0

SPEC_EXAMPLE = """\
campaigns:
  - id: spring-red-packet
    starts_at: 2026-01-20T00:00:00Z      # optional; events outside [starts_at, ends_at) are rejected
    ends_at: 2026-03-01T00:00:00Z        # optional
    share_ttl: 30d                       # a scan later than this after its share does not bind
    attribution_window: 7d               # purchases within this time after binding earn rewards
    rewards:
      bind: {scanner: 100, sharer: 0}    # two-sided reward when a new user binds
      first_purchase: {sharer: 500, min_amount: 1000}   # to the direct sharer, once per bound user
      commission_bps: [1000, 300]        # level 1 = direct sharer 10 %, level 2 = 3 %, …
      commission_cap: 5000               # max per purchase per beneficiary
    limits:
      budget: 100000000                  # optional total of positive credits; see 4.6
      max_binds_per_device: 3            # optional; see 4.7
    group_buy: {size: 3, window: 24h, initiator_reward: 300}   # optional
"""
DAY_MS = 86_400_000
JAN_20 = T0 + 19 * DAY_MS


def campaign(**changes) -> dict:
    """The shared base campaign with top-level keys replaced (None removes a key)."""
    doc = orjson.loads(orjson.dumps(BASE_CAMPAIGN))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def section(name: str, **changes) -> dict:
    """A copy of one section of the base campaign with some keys replaced."""
    return {**orjson.loads(orjson.dumps(BASE_CAMPAIGN[name])), **changes}


def refused(doc: dict) -> str:
    """The error message for a document that must be refused."""
    with pytest.raises(ConfigError) as info:
        parse_campaigns(doc)
    return str(info.value)


def one(**changes) -> dict:
    return {"campaigns": [campaign(**changes)]}


# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ms"), [("45s", 45_000), ("30m", 1_800_000), ("24h", 86_400_000),
                                          ("7d", 604_800_000), ("30d", 2_592_000_000), ("1s", 1000)])
def test_duration(text: str, ms: int) -> None:
    assert parse_duration(text, "share_ttl") == ms


@pytest.mark.parametrize("text", ["", "7", "d", "7 days", "1.5h", "-1d", "7x", "d7", "7D", "7dd", 7, None, True, [7]])
def test_bad_duration_is_refused_naming_where(text) -> None:
    with pytest.raises(ConfigError, match="share_ttl"):
        parse_duration(text, "campaigns[c].share_ttl")


@pytest.mark.parametrize("key", ["share_ttl", "attribution_window"])
def test_bad_campaign_duration_names_the_field(key: str) -> None:
    message = refused(one(**{key: "a week"}))
    assert f"campaigns[c].{key}" in message
    assert "a week" in message


def test_bad_group_window_names_the_field() -> None:
    assert "campaigns[c].group_buy.window" in refused(one(group_buy=section("group_buy", window="1.5d")))


# -- a good file -----------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "campaigns.yaml"
    path.write_text(SPEC_EXAMPLE, encoding="utf-8")
    c = load_campaigns(path)["spring-red-packet"]
    assert (c.starts_at, c.ends_at) == (JAN_20, T0 + 59 * DAY_MS)
    assert (c.share_ttl_ms, c.attribution_window_ms) == (30 * DAY_MS, 7 * DAY_MS)
    assert (c.bind_scanner, c.bind_sharer, c.first_purchase_sharer, c.first_purchase_min_amount) == (100, 0, 500, 1000)
    assert (c.commission_bps, c.commission_cap, c.levels) == ((1000, 300), 5000, 2)
    assert (c.budget, c.max_binds_per_device) == (100_000_000, 3)
    assert (c.group_buy.size, c.group_buy.window_ms, c.group_buy.initiator_reward) == (3, DAY_MS, 300)


def test_json_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "campaigns.json"
    path.write_bytes(orjson.dumps({"campaigns": [BASE_CAMPAIGN]}))
    assert list(load_campaigns(path)) == ["c"]


def test_repository_campaigns_file_loads() -> None:
    campaigns = load_campaigns(Path(__file__).resolve().parent.parent / "config" / "campaigns.yaml")
    assert campaigns
    assert all(c.levels >= 1 for c in campaigns.values())


def test_optional_parts_may_be_left_out() -> None:
    c = parse_campaigns({"campaigns": [{"id": "bare", "rewards": {"bind": {"scanner": 10}}}]})["bare"]
    assert (c.starts_at, c.ends_at, c.budget, c.max_binds_per_device, c.group_buy, c.commission_cap) == (None,) * 6
    assert (c.bind_scanner, c.bind_sharer) == (10, 0)
    assert c.covers(0) and c.covers(2**53 - 1)


def test_levels_are_at_least_one() -> None:
    doc = {"campaigns": [campaign(id="none", rewards=section("rewards", commission_bps=[])),
                         campaign(id="three", rewards=section("rewards", commission_bps=[1000, 300, 100]))]}
    campaigns = parse_campaigns(doc)
    assert (campaigns["none"].levels, campaigns["three"].levels) == (1, 3)


def test_campaign_covers_starts_at_but_not_ends_at() -> None:
    c = parse_campaigns(one())["c"]
    assert (c.covers(T0 - 1), c.covers(T0), c.covers(T0 + 31 * DAY_MS - 1), c.covers(T0 + 31 * DAY_MS)) == (
        False, True, True, False)


@pytest.mark.parametrize("stamp", ["2026-01-20T08:00:00+08:00", "2026-01-19T19:00:00-05:00", "2026-01-20T00:00:00Z",
                                   "2026-01-20T00:00:00.000+00:00"])
def test_timestamp_time_zones_are_honoured(stamp: str) -> None:
    assert parse_campaigns(one(starts_at=stamp))["c"].starts_at == JAN_20


def test_unquoted_yaml_timestamp_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "campaigns.yaml"
    path.write_text("campaigns:\n  - id: x\n    starts_at: 2026-01-20T08:00:00+08:00\n", encoding="utf-8")
    assert load_campaigns(path)["x"].starts_at == JAN_20


# -- refused files ---------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "field"), [
    (one(colour="red"), "colour"),
    (one(rewards=section("rewards", bonus=1)), "bonus"),
    (one(rewards=section("rewards", bind={"scanner": 1, "referrer": 2})), "referrer"),
    (one(rewards=section("rewards", first_purchase={"sharer": 1, "min": 2})), "min"),
    (one(limits={"budgett": 5}), "budgett"),
    (one(group_buy=section("group_buy", sizes=3)), "sizes"),
], ids=["campaign", "rewards", "bind", "first_purchase", "limits", "group_buy"])
def test_unknown_key_is_refused_naming_it(doc: dict, field: str) -> None:
    assert field in refused(doc)


def test_unknown_key_names_its_section() -> None:
    message = refused(one(rewards=section("rewards", bind={"scanner": 1, "referrer": 2})))
    assert "rewards.bind" in message and "referrer" in message


def test_unknown_top_level_key_is_refused() -> None:
    assert "version" in refused({"campaigns": [campaign()], "version": 2})


@pytest.mark.parametrize(("doc", "field"), [
    (one(rewards=section("rewards", bind={"scanner": -1, "sharer": 0})), "rewards.bind.scanner"),
    (one(rewards=section("rewards", bind={"scanner": 1, "sharer": -20})), "rewards.bind.sharer"),
    (one(rewards=section("rewards", first_purchase={"sharer": -500, "min_amount": 1})), "first_purchase.sharer"),
    (one(rewards=section("rewards", first_purchase={"sharer": 5, "min_amount": -1})), "first_purchase.min_amount"),
    (one(rewards=section("rewards", commission_cap=-1)), "rewards.commission_cap"),
    (one(limits={"budget": -100}), "limits.budget"),
    (one(limits={"max_binds_per_device": -1}), "limits.max_binds_per_device"),
    (one(group_buy=section("group_buy", initiator_reward=-300)), "group_buy.initiator_reward"),
], ids=["scanner", "sharer", "first-purchase", "min-amount", "cap", "budget", "device", "initiator"])
def test_negative_amount_is_refused_naming_the_field(doc: dict, field: str) -> None:
    assert field in refused(doc)


@pytest.mark.parametrize("value", [1.5, 100.0, "100", True, [100]])
def test_non_integer_amount_is_refused(value) -> None:
    assert "rewards.bind.scanner" in refused(one(rewards=section("rewards", bind={"scanner": value, "sharer": 0})))


@pytest.mark.parametrize("bps", [[1000.5], [1000.0], ["1000"], [True], [1000, -1], 1000, "1000,300"])
def test_non_integer_bps_is_refused(bps) -> None:
    assert "commission_bps" in refused(one(rewards=section("rewards", commission_bps=bps)))


@pytest.mark.parametrize("size", [0, -3, 2.5, "3", True, None])
def test_bad_group_size_is_refused(size) -> None:
    assert "group_buy.size" in refused(one(group_buy=section("group_buy", size=size)))


@pytest.mark.parametrize("ends", ["2026-01-01T00:00:00Z", "2025-12-31T23:59:59Z", "2026-01-01T08:00:00+08:00"],
                         ids=["equal", "before", "equal-other-zone"])
def test_ends_not_after_starts_is_refused(ends: str) -> None:
    assert "ends_at" in refused(one(ends_at=ends))


def test_duplicate_campaign_id_is_refused() -> None:
    message = refused({"campaigns": [campaign(), campaign(share_ttl="1d")]})
    assert "campaigns[1].id" in message
    assert "duplicate" in message


@pytest.mark.parametrize("key", ["starts_at", "ends_at"])
@pytest.mark.parametrize("stamp", ["2026-01-20T00:00:00", "2026-01-20"])
def test_timestamp_without_time_zone_is_refused(key: str, stamp: str) -> None:
    doc = one(starts_at="2026-01-01T00:00:00Z", ends_at="2026-03-01T00:00:00Z")
    doc["campaigns"][0][key] = stamp
    assert f"campaigns[c].{key}" in refused(doc)


@pytest.mark.parametrize("text", ["starts_at: 2026-01-20T00:00:00", "starts_at: 2026-01-20"], ids=["datetime", "date"])
def test_unquoted_yaml_timestamp_without_time_zone_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "campaigns.yaml"
    path.write_text(f"campaigns:\n  - id: x\n    {text}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"campaigns\[x\]\.starts_at"):
        load_campaigns(path)


@pytest.mark.parametrize("stamp", ["yesterday", "2026-13-01T00:00:00Z", 20260101, True])
def test_unreadable_timestamp_is_refused(stamp) -> None:
    assert "campaigns[c].starts_at" in refused(one(starts_at=stamp))


@pytest.mark.parametrize("cid", [None, "", "c" * 65, 7])
def test_bad_campaign_id_is_refused(cid) -> None:
    doc = one()
    doc["campaigns"][0]["id"] = cid
    if cid is None:
        del doc["campaigns"][0]["id"]
    assert "campaigns[0].id" in refused(doc)


def test_campaign_id_of_64_characters_is_fine() -> None:
    assert list(parse_campaigns(one(id="春" * 64))) == ["春" * 64]


@pytest.mark.parametrize("doc", [None, [], {"campaigns": {"id": "c"}}, {"campaign": []}, {"campaigns": ["c"]}],
                         ids=["empty", "list", "campaigns-mapping", "misspelt", "entry-not-mapping"])
def test_malformed_document_is_refused(doc) -> None:
    with pytest.raises(ConfigError):
        parse_campaigns(doc)


def test_missing_file_and_broken_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_campaigns(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("campaigns: [\n  - id: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_campaigns(broken)
