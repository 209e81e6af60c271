"""`fission replay` and friends as a user runs them: the CLI, files in, files out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from stream.cli import main
from tests.compare import differences

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def test_replay_of_the_bundled_sample_gives_the_checked_in_result(tmp_path: Path) -> None:
    code = main(["replay", str(EXAMPLES / "events.jsonl"), "--campaigns", str(EXAMPLES / "campaigns.yaml"),
                 "--out", str(tmp_path)])
    assert code == 0
    assert differences(EXAMPLES / "expected", tmp_path) == {}
    for name in ("ledger.jsonl", "outcomes.jsonl", "nodes.jsonl"):
        assert sorted((tmp_path / name).read_text().splitlines()) == sorted(
            (EXAMPLES / "expected" / name).read_text().splitlines()
        )


def test_replay_turns_every_bad_line_into_an_invalid_event_outcome(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"broken\n\n   \n\xff\xfe\n[1]\n{"event_id": "e1"}\n')
    code = main(["replay", str(events), "--campaigns", str(EXAMPLES / "campaigns.yaml"), "--out", str(tmp_path / "o")])
    assert code == 0
    outcomes = [json.loads(line) for line in (tmp_path / "o" / "outcomes.jsonl").read_text().splitlines()]
    assert [(o["outcome"], o["reason"]) for o in outcomes] == [("rejected", "invalid_event")] * 4
    assert outcomes[3]["event_id"] == "e1"


def test_replay_reads_crlf_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    lines = (EXAMPLES / "events.jsonl").read_bytes().splitlines()[:50]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    campaigns = str(EXAMPLES / "campaigns.yaml")
    assert main(["replay", str(events), "--campaigns", campaigns, "--out", str(tmp_path / "a")]) == 0
    assert main(["replay", str(plain), "--campaigns", campaigns, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "outcomes.jsonl").read_bytes() == (tmp_path / "b" / "outcomes.jsonl").read_bytes()


def test_replay_against_redis_equals_embedded(tmp_path: Path, redis_url: str, unique_prefix: str) -> None:
    args = [str(EXAMPLES / "events.jsonl"), "--campaigns", str(EXAMPLES / "campaigns.yaml")]
    assert main(["replay", *args, "--out", str(tmp_path / "redis"), "--store", "redis", "--redis-url", redis_url,
                 "--redis-prefix", unique_prefix]) == 0
    assert differences(EXAMPLES / "expected", tmp_path / "redis") == {}


def test_replay_against_redis_twice_without_a_prefix_starts_from_empty_state_each_time(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture
) -> None:
    args = [str(EXAMPLES / "events.jsonl"), "--campaigns", str(EXAMPLES / "campaigns.yaml"), "--store", "redis",
            "--redis-url", redis_url]
    client = redis.Redis.from_url(redis_url)
    for run in ("first", "second"):
        assert main(["replay", *args, "--out", str(tmp_path / run)]) == 0
        prefix = capsys.readouterr().err.split("under prefix '")[1].split("'")[0]
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
        assert keys
        client.delete(*keys)
        assert differences(EXAMPLES / "expected", tmp_path / run) == {}


def test_balances_command_reads_the_redis_store(tmp_path: Path, redis_url: str, unique_prefix: str,
                                                capsys: pytest.CaptureFixture) -> None:
    store_flags = ["--store", "redis", "--redis-url", redis_url, "--redis-prefix", unique_prefix]
    main(["replay", str(EXAMPLES / "events.jsonl"), "--campaigns", str(EXAMPLES / "campaigns.yaml"),
          "--out", str(tmp_path), *store_flags])
    capsys.readouterr()
    assert main(["balances", "--json", *store_flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = json.loads((EXAMPLES / "expected" / "balances.json").read_text())
    assert {c: {u: a for u, a in b.items() if a} for c, b in printed.items()} == expected


def test_bad_campaigns_file_stops_with_an_error_naming_the_field(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "campaigns.yaml"
    bad.write_text("campaigns:\n  - id: c\n    share_ttl: 3 days\n")
    assert main(["check-config", "--campaigns", str(bad)]) == 2
    assert "campaigns[c].share_ttl" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["replay"], ["balances"], ["simulate"], ["check-config"], ["demo"],
                                     ["worker"], ["sink"], ["migrate"], ["cascades"]])
def test_every_command_has_help(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "stream.cli", *command, "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert done.returncode == 0
    assert "usage: fission" in done.stdout
