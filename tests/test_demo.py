"""`fission demo`: a small run leaves replayable inputs and a self-contained report whose numbers agree with
what the engine emitted; the cascade maths (structural virality, stalled cascades, the tree layout) on
hand-made cases."""

from __future__ import annotations

import html
import json
import random
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import pytest

from attribution.campaigns import load_campaigns
from attribution.engine import BatchResult, Engine
from attribution.model import Outcome
from attribution.store import EmbeddedStore
from stream.demo import STALL_MIN_MS, Cascade, LiveStats, is_stalled, stall_threshold
from stream.embedded import EmbeddedRunner
from stream.replay import replay
from stream.report import pick_tree_root, sql_string, structural_virality, tree_layout

ROOT = Path(__file__).resolve().parent.parent
MINUTE = 60_000
T0 = 1_768_867_200_000


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3000-event demo, run in a child process: chDB allows one data path per process, and other
    test files open theirs in this one."""
    out = tmp_path_factory.mktemp("demo")
    code = f"from pathlib import Path; from stream.demo import run_demo; run_demo(Path({str(out)!r}), " \
           "events=3000, live=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120, capture_output=True)
    return out


@dataclass
class Run:
    """What the demo's engine emitted: outcomes, ledger entries and the latest node of each user."""

    outcomes: list[dict] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    nodes: dict[tuple[str, str], dict] = field(default_factory=dict)

    def add(self, _partition: int, result: BatchResult) -> None:
        self.outcomes += [o.to_dict() for o in result.outcomes]
        self.entries += [e.to_dict() for e in result.entries]
        self.nodes.update(((n.campaign, n.user_id), n.to_dict()) for n in result.nodes)


@pytest.fixture(scope="module")
def rerun(demo: Path) -> Run:
    """The demo's events through the embedded runner again, on as many partitions: the same processing order,
    so the same outputs, even where the order matters (the device limit, SPEC 4.7)."""
    run = Run()
    runner = EmbeddedRunner(load_campaigns(demo / "campaigns.json"), partitions=4, emit=run.add)
    runner.publish(line.encode() for line in (demo / "events.jsonl").read_text().splitlines())
    runner.run()
    return run


def section(page: str, title: str) -> str:
    """The HTML of the report section whose heading starts with `title`."""
    start = page.index(f"<h2>{title}")
    return page[start:page.index("</section>", start)]


def table_rows(fragment: str) -> list[list[str]]:
    body = fragment[fragment.index("<tbody>"):]
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_demo_events_replay_with_fission_replay(demo: Path, rerun: Run) -> None:
    engine = Engine(load_campaigns(demo / "campaigns.json"), EmbeddedStore())
    summary = replay(engine, demo / "events.jsonl", demo / "replay")
    assert summary.events == summary.outcomes == 3000
    shared = [o for o in read_jsonl(demo / "replay" / "outcomes.jsonl") if o["outcome"] == "shared"]
    assert len(shared) == sum(o["outcome"] == "shared" for o in rerun.outcomes)


def test_demo_writes_a_self_contained_report(demo: Path) -> None:
    page = (demo / "report.html").read_text()
    for title in ("K-factor over time", "Depth distribution", "Top seeds", "One cascade as a tree",
                  "Stalled cascades", "Rewards by kind", "Outcomes"):
        assert f"<h2>{title}" in page
    assert page.count("<svg") >= 6
    for external in ("<script", "<link", "src=", "@import", "url("):
        assert external not in page


def test_report_k_factor_is_binds_over_sharers_of_the_outcomes(demo: Path, rerun: Run) -> None:
    outcomes = rerun.outcomes
    binds = sum(o["outcome"] == "bound" for o in outcomes)
    sharers = len({(o["campaign"], o["user_id"]) for o in outcomes if o["outcome"] == "shared"})
    page = (demo / "report.html").read_text()
    card = re.search(r'K-factor</div><div class="value">([0-9.]+)</div><div class="note">([^<]*)<', page)
    assert card is not None
    assert card.group(1) == f"{binds / sharers:.3f}"
    assert card.group(2) == f"{binds:,} binds / {sharers:,} sharers"


def test_leaderboard_matches_the_cascades_of_the_run(demo: Path, rerun: Run) -> None:
    nodes = [n for n in rerun.nodes.values() if n["root"]]
    sizes = Counter(n["root"] for n in nodes)
    rows = table_rows(section((demo / "report.html").read_text(), "Top seeds"))
    assert [(r[0], int(r[1].replace(",", ""))) for r in rows] == sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[
        : len(rows)]
    root, *_, virality = rows[0]
    members = {n["user_id"]: n["parent"] for n in nodes if n["root"] == root}
    tree = nx.Graph((user, parent) for user, parent in members.items() if parent)
    assert float(virality) == pytest.approx(nx.wiener_index(tree) / (len(members) * (len(members) - 1) / 2),
                                            abs=0.005)
    paid = sum(e["amount"] for e in rerun.entries if e["root"] == root and e["amount"] > 0)
    assert rows[0][4] == f"{paid / 100:,.2f}"


def test_report_draws_a_cascade_and_lists_stalled_ones(demo: Path) -> None:
    page = (demo / "report.html").read_text()
    tree = section(page, "One cascade as a tree")
    assert tree.count("<circle") > 1 and tree.count('class="edge"') == tree.count("<circle") - 1
    stalled = section(page, "Stalled cascades")
    for row in table_rows(stalled) if "<tbody>" in stalled else []:
        assert int(row[1].replace(",", "")) >= 10


# -- structural virality --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 10, 57, 300])
def test_structural_virality_matches_networkx_wiener_index(n: int) -> None:
    for seed in range(5):
        tree = nx.random_labeled_tree(n, seed=seed)
        root = random.Random(seed).randrange(n)
        parents: dict[str, str | None] = {str(root): None}
        parents.update({str(child): str(parent) for child, parent in nx.bfs_predecessors(tree, root)})
        assert structural_virality(parents) == pytest.approx(nx.wiener_index(tree) / (n * (n - 1) / 2))


def test_structural_virality_of_simple_shapes() -> None:
    assert structural_virality({"a": None}) == 0.0
    star = {"hub": None, **{f"l{i}": "hub" for i in range(9)}}  # a broadcast: close to 2
    assert structural_virality(star) == pytest.approx(2 - 2 / 10)
    chain = {"0": None, **{str(i): str(i - 1) for i in range(1, 10)}}  # person to person: (n + 1) / 3
    assert structural_virality(chain) == pytest.approx(11 / 3)


def test_structural_virality_refuses_what_is_not_a_tree() -> None:
    with pytest.raises(ValueError):
        structural_virality({"a": None, "b": None})
    with pytest.raises(ValueError):
        structural_virality({"r": None, "x": "y", "y": "x"})


def test_tree_layout_puts_generations_in_rows_and_parents_over_their_children() -> None:
    layout = tree_layout({"r": None, "a": "r", "b": "r", "a1": "a", "a2": "a"})
    assert {node: row for node, (_, row) in layout.items()} == {"r": 0, "a": 1, "b": 1, "a1": 2, "a2": 2}
    assert layout["a1"][0] == 0 and layout["a2"][0] == 1 and layout["b"][0] == 2
    assert layout["a"][0] == 0.5 and layout["r"][0] == 1.25


def test_the_drawn_cascade_is_the_largest_that_fits() -> None:
    assert pick_tree_root({"huge": 5000, "mid": 120, "small": 30}) == "mid"
    assert pick_tree_root({"a": 40, "b": 40}) == "a"
    assert pick_tree_root({"alone": 1}) is None


def test_sql_strings_escape_quotes_and_backslashes() -> None:
    assert sql_string("o'brien\\x") == "'o\\'brien\\\\x'"


# -- stalled cascades -------------------------------------------------------------------------------------------


def every(gap_ms: int, count: int, start: int = T0) -> list[int]:
    return [start + i * gap_ms for i in range(count)]


def test_stall_threshold_is_the_larger_of_the_minimum_and_five_median_gaps() -> None:
    assert stall_threshold(every(MINUTE, 20)) == STALL_MIN_MS  # 5 x 1 min < 10 min
    assert stall_threshold(every(10 * MINUTE, 20)) == 50 * MINUTE
    assert stall_threshold([T0]) == STALL_MIN_MS  # no gap yet
    # only the last 20 binds count: hourly gaps long ago do not slow the alert down
    assert stall_threshold(every(60 * MINUTE, 10) + every(MINUTE, 20, start=T0 + 20 * 60 * MINUTE)) == STALL_MIN_MS
    assert stall_threshold(list(reversed(every(10 * MINUTE, 20)))) == 50 * MINUTE  # arrival order does not matter


def test_a_cascade_stalls_after_the_threshold_and_only_from_ten_members() -> None:
    binds = every(MINUTE, 20)
    last = binds[-1]
    assert not is_stalled(21, binds, last + 10 * MINUTE)  # exactly the threshold: not yet
    assert is_stalled(21, binds, last + 10 * MINUTE + 1)
    slow = every(10 * MINUTE, 20)
    assert not is_stalled(21, slow, slow[-1] + 49 * MINUTE)
    assert is_stalled(21, slow, slow[-1] + 51 * MINUTE)
    assert not is_stalled(9, every(MINUTE, 8), T0 + 1000 * MINUTE)  # too small to alert
    assert is_stalled(10, every(MINUTE, 9), T0 + 1000 * MINUTE)


def outcome(kind: str, user: str, minute: int, root: str = "seed", depth: int = 1) -> Outcome:
    return Outcome(f"e-{user}-{minute}", "c", "scan" if kind == "bound" else "share", user, kind,
                   root=root, depth=depth, ts=T0 + minute * MINUTE)


def test_live_stats_use_event_time_as_the_stall_clock() -> None:
    stats = LiveStats(total=100)
    stats.observe(BatchResult(outcomes=[outcome("shared", "seed", 0, depth=0)]
                              + [outcome("bound", f"u{i}", i) for i in range(1, 12)]))
    assert stats.binds == 11 and len(stats.sharers) == 1 and stats.k == 11.0
    assert stats.cascades[("c", "seed")].size == 12 and stats.stalled() == []
    stats.observe(BatchResult(outcomes=[outcome("shared", "other", 25, root="other", depth=0)]))  # the clock moves
    assert [c.root for c in stats.stalled()] == ["seed"]
    stats.observe(BatchResult(outcomes=[outcome("bound", "late", 26, depth=4)]))  # it grows again
    assert stats.stalled() == [] and stats.deepest == (4, "seed")


def test_cascade_keeps_only_the_last_twenty_binds() -> None:
    cascade = Cascade("r")
    for ts in every(MINUTE, 30):
        cascade.bind(ts, 1)
    assert cascade.size == 31 and len(cascade.recent) == 20 and cascade.last_bind == T0 + 29 * MINUTE
