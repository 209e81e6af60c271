"""The shared conformance cases (tests/conformance, copied from shared/) on every store."""

from __future__ import annotations

from pathlib import Path

import pytest

from attribution.campaigns import load_campaigns
from attribution.engine import Engine
from stream.replay import replay
from tests.compare import differences

CASES = sorted(p for p in (Path(__file__).parent / "conformance").iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_replay_matches_expected_outputs(case: Path, store, tmp_path: Path) -> None:
    engine = Engine(load_campaigns(case / "campaigns.yaml"), store)
    replay(engine, case / "events.jsonl", tmp_path)
    assert differences(case / "expected", tmp_path) == {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_replay_in_small_batches_matches_expected_outputs(case: Path, store, tmp_path: Path) -> None:
    engine = Engine(load_campaigns(case / "campaigns.yaml"), store)
    replay(engine, case / "events.jsonl", tmp_path, batch_lines=3)
    assert differences(case / "expected", tmp_path) == {}
