"""Compare replay outputs the way shared/conformance/README.md says: as multisets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

LEDGER_FIELDS = ("campaign", "beneficiary", "amount", "kind", "level", "source_event_id")
OUTCOME_FIELDS = ("event_id", "outcome", "reason", "parent", "root", "depth")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def projected(rows: list[dict], names: tuple[str, ...] | None) -> Counter:
    return Counter(json.dumps([row.get(n) for n in names] if names else row, sort_keys=True) for row in rows)


def nonzero(balances: dict) -> dict:
    kept = {c: {u: a for u, a in by_user.items() if a} for c, by_user in balances.items()}
    return {c: b for c, b in kept.items() if b}


def differences(expected_dir: Path, actual_dir: Path) -> dict[str, tuple[Counter, Counter]]:
    """For each output that differs: (expected-only rows, actual-only rows)."""
    diffs: dict[str, tuple[Counter, Counter]] = {}
    for name, fields in (("ledger.jsonl", LEDGER_FIELDS), ("outcomes.jsonl", OUTCOME_FIELDS), ("nodes.jsonl", None)):
        want = projected(read_jsonl(expected_dir / name), fields)
        got = projected(read_jsonl(actual_dir / name), fields)
        if want != got:
            diffs[name] = (want - got, got - want)
    want_bal = nonzero(json.loads((expected_dir / "balances.json").read_text(encoding="utf-8")))
    got_bal = nonzero(json.loads((actual_dir / "balances.json").read_text(encoding="utf-8")))
    if want_bal != got_bal:
        diffs["balances.json"] = (Counter([json.dumps(want_bal)]), Counter([json.dumps(got_bal)]))
    return diffs
