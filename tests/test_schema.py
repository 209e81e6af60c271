"""The published JSON Schema (config/schemas/event.schema.json) agrees with the validator."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from jsonschema import Draft202012Validator

from attribution.events import MAX_EVENT_BYTES, Event, parse_event

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "config" / "schemas" / "event.schema.json").read_text())
LINES = [line.encode() for path in [*ROOT.glob("tests/conformance/*/events.jsonl"), ROOT / "examples" / "events.jsonl"]
         for line in path.read_text().splitlines() if line.strip()]
EDGES = [
    {"event_id": "e", "type": "share", "campaign": "c", "user_id": "u", "ts": 1, "share_id": "s", "group": None},
    {"event_id": "e", "type": "purchase", "campaign": "c", "user_id": "u", "ts": 1, "order_id": "o",
     "amount": 10**11},
    {"event_id": "e", "type": "purchase", "campaign": "c", "user_id": "u", "ts": 1, "order_id": "o",
     "amount": 10**11 + 1},
    {"event_id": "e", "type": "refund", "campaign": "c", "user_id": "u", "ts": -1, "order_id": "o"},
    {"event_id": "e" * 129, "type": "scan", "campaign": "c", "user_id": "u", "ts": 1, "share_id": "s"},
    {"event_id": "🚀" * 128, "type": "scan", "campaign": "c", "user_id": "u", "ts": 1, "share_id": "s"},
    {"event_id": "e", "type": "scan", "campaign": "c", "user_id": "u", "ts": True, "share_id": "s"},
]


def test_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)


def test_schema_accepts_exactly_what_the_validator_accepts() -> None:
    validator = Draft202012Validator(SCHEMA)
    documents = []
    for raw in LINES + [orjson.dumps(e) for e in EDGES]:
        try:
            documents.append((raw, json.loads(raw)))
        except ValueError:
            continue  # not JSON: no schema applies, the validator rejects it (tests/test_events.py)
    verdicts = [(validator.is_valid(doc), isinstance(parse_event(raw), Event), raw) for raw, doc in documents]
    assert [raw for by_schema, by_engine, raw in verdicts if by_schema != by_engine] == []
    assert {by_engine for _, by_engine, _ in verdicts} == {True, False}
    assert all(len(raw) <= MAX_EVENT_BYTES for raw, _ in documents)
