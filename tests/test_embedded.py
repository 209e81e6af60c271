"""The embedded runner (in-process partitioned log) gives what `replay` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attribution.campaigns import load_campaigns
from attribution.engine import BatchResult
from stream.embedded import EmbeddedRunner
from tests.compare import LEDGER_FIELDS, OUTCOME_FIELDS, nonzero, projected, read_jsonl

CASE = Path(__file__).parent / "conformance" / "11-generated-medium"


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_embedded_runner_over_partitions_matches_the_expected_replay(partitions: int) -> None:
    outputs: list[BatchResult] = []
    runner = EmbeddedRunner(load_campaigns(CASE / "campaigns.yaml"), partitions=partitions, fetch=37,
                            emit=lambda _, result: outputs.append(result))
    runner.publish(line.encode() for line in (CASE / "events.jsonl").read_text().splitlines() if line.strip())
    runner.run()
    outcomes = projected([o.to_dict() for r in outputs for o in r.outcomes], OUTCOME_FIELDS)
    ledger = projected([e.to_dict() for r in outputs for e in r.entries], LEDGER_FIELDS)
    expected = CASE / "expected"
    assert outcomes == projected(read_jsonl(expected / "outcomes.jsonl"), OUTCOME_FIELDS)
    assert ledger == projected(read_jsonl(expected / "ledger.jsonl"), LEDGER_FIELDS)
    assert nonzero(runner.store.balances()) == json.loads((expected / "balances.json").read_text())
    assert runner.lag() == 0
