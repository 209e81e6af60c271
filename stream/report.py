"""The demo's report: one self-contained HTML file (inline CSS and SVG, no script, no network).

The numbers come from the ClickHouse tables and per-minute views the sink fills, with the SQL a
Grafana panel would run (it is listed at the end of the report), so the report also shows that the
analytics path works. Only structural virality is computed here, from each cascade's parent links:
ClickHouse has no graph functions.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sinks.clickhouse import Backend

MINOR = 100  # amounts are integer minor units; the report shows currency units
TOP_SEEDS = 10
TREE_CAP = 150  # the drawn cascade: the largest with at most this many nodes
FRAUD_REASONS = ("self_referral", "device_limit")
ORANGE, BLUE, GREEN, GRAY, RED = "#e8590c", "#1c7ed6", "#2f9e44", "#868e96", "#c92a2a"


# -- cascade maths ------------------------------------------------------------------------------------


def structural_virality(parents: Mapping[str, str | None]) -> float:
    """Mean shortest-path distance over all pairs of a tree's nodes (Goel et al. 2016); 0 below two nodes.

    `parents` maps each node to its parent (None, or a node outside the mapping, for the root). In a tree
    an edge lies on the path of exactly size * (n - size) pairs, size being the nodes below it, so the
    Wiener index is that sum over the edges: O(n), where a BFS from every node would be O(n^2).
    """
    n = len(parents)
    if n < 2:
        return 0.0
    order = _top_down(parents)
    size = dict.fromkeys(parents, 1)
    wiener = 0
    for node in reversed(order[1:]):
        wiener += size[node] * (n - size[node])
        size[parents[node]] += size[node]  # type: ignore[index]  # every node after the root has a parent
    return wiener / (n * (n - 1) / 2)


def _children(parents: Mapping[str, str | None]) -> tuple[list[str], dict[str, list[str]]]:
    """The roots (nodes without a parent in the mapping) and each node's children, in mapping order."""
    roots: list[str] = []
    children: dict[str, list[str]] = defaultdict(list)
    for node, parent in parents.items():
        if parent is None or parent not in parents:
            roots.append(node)
        else:
            children[parent].append(node)
    return roots, children


def _top_down(parents: Mapping[str, str | None]) -> list[str]:
    """The nodes in BFS order from the single root; ValueError if the links do not form one tree."""
    roots, children = _children(parents)
    if len(roots) != 1:
        raise ValueError(f"not a tree: {len(roots)} roots")
    order = [roots[0]]
    for node in order:  # the list grows while it is walked: a BFS
        order.extend(children[node])
    if len(order) != len(parents):
        raise ValueError("not a tree: a cycle hangs off no root")
    return order


def tree_layout(parents: Mapping[str, str | None]) -> dict[str, tuple[float, int]]:
    """(x, row) per node: row = distance from the root, leaves numbered left to right, parents centred."""
    order = _top_down(parents)
    _, children = _children(parents)
    row = {order[0]: 0}
    for node in order[1:]:
        row[node] = row[parents[node]] + 1  # type: ignore[index]
    x: dict[str, float] = {}
    leaves = 0
    stack: list[tuple[str, bool]] = [(order[0], False)]
    while stack:  # iterative post-order DFS: children (in order) before their parent
        node, done = stack.pop()
        kids = children[node]
        if done:
            x[node] = (x[kids[0]] + x[kids[-1]]) / 2
        elif not kids:
            x[node] = leaves
            leaves += 1
        else:
            stack.append((node, True))
            stack.extend((kid, False) for kid in reversed(kids))
    return {node: (x[node], row[node]) for node in order}


# -- SQL ----------------------------------------------------------------------------------------------


def sql_string(value: str) -> str:
    """A ClickHouse string literal: user ids may hold quotes and backslashes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Queries:
    """Runs the report's SQL on one database and keeps each statement, to show it in the report."""

    backend: Backend
    db: str
    log: list[tuple[str, str]] = field(default_factory=list)

    def rows(self, purpose: str, sql: str) -> list[tuple]:
        statement = " ".join(sql.replace("{db}", self.db).split())
        if purpose not in {p for p, _ in self.log}:
            self.log.append((purpose, statement))
        return self.backend.query(statement)


def headline(q: Queries) -> dict[str, Any]:
    """The campaign totals: from the per-minute views, except the exact distinct sharers (raw outcomes)."""
    by_outcome: dict[str, int] = defaultdict(int)
    revenue = 0
    for outcome, events, amount in q.rows("events by outcome", """
            SELECT outcome, countMerge(events), sumMerge(amount_sum) FROM {db}.campaign_minute GROUP BY outcome"""):
        by_outcome[outcome] += int(events)
        revenue += int(amount) if outcome == "purchase_attributed" else 0
    sharers = int(q.rows("distinct sharers", """
        SELECT uniqExact(campaign, user_id) FROM {db}.outcomes FINAL WHERE outcome = 'shared'""")[0][0])
    paid, clawed = q.rows("rewards", "SELECT sumMerge(paid), sumMerge(clawed_back) FROM {db}.ledger_minute")[0]
    fraud = dict(q.rows("fraud rejections", "SELECT reason, count() FROM {db}.fraud GROUP BY reason"))
    cascades, max_depth, largest = q.rows("cascades", """
        SELECT count(), max(depth), max(binds) + 1 FROM (SELECT root, maxMerge(max_depth) AS depth,
        sumMerge(binds) AS binds FROM {db}.cascade_minute GROUP BY campaign, root)""")[0]
    deepest = q.rows("deepest cascade", """
        SELECT root FROM {db}.cascade_minute GROUP BY campaign, root ORDER BY maxMerge(max_depth) DESC, root
        LIMIT 1""")
    binds = by_outcome["bound"]
    return {
        "events": sum(by_outcome.values()), "binds": binds, "sharers": sharers,
        "k": binds / sharers if sharers else 0.0, "revenue": revenue, "paid": int(paid), "clawed": int(clawed),
        "fraud": {reason: int(fraud.get(reason, 0)) for reason in FRAUD_REASONS},
        "cascades": int(cascades), "largest_size": int(largest or 0), "max_depth": int(max_depth or 0),
        "deepest_root": deepest[0][0] if deepest else "",
        "by_outcome": dict(by_outcome),
    }


def k_over_time(q: Queries) -> list[tuple[int, int, int, int]]:
    """(hour, binds, distinct sharers in the hour, sharers sharing for the first time) per hour of event time."""
    binds = dict(q.rows("binds per hour", """
        SELECT intDiv(toUInt32(minute), 3600) * 3600 AS hour, countMerge(events) FROM {db}.campaign_minute
        WHERE outcome = 'bound' GROUP BY hour"""))
    sharers = dict(q.rows("sharers per hour", """
        SELECT intDiv(toUInt32(minute), 3600) * 3600 AS hour, uniqMerge(users) FROM {db}.campaign_minute
        WHERE type = 'share' AND outcome = 'shared' GROUP BY hour"""))
    new = dict(q.rows("new sharers per hour", """
        SELECT hour, count() FROM (SELECT intDiv(min(ts), 3600000) * 3600 AS hour FROM {db}.outcomes FINAL
        WHERE outcome = 'shared' GROUP BY campaign, user_id) GROUP BY hour"""))
    if not binds and not sharers:
        return []
    hours = range(min([*binds, *sharers]), max([*binds, *sharers]) + 3600, 3600)
    return [(h, int(binds.get(h, 0)), int(sharers.get(h, 0)), int(new.get(h, 0))) for h in hours]


def depth_counts(q: Queries) -> list[tuple[int, int]]:
    """(depth, nodes) for every depth from 0 to the deepest (cascade members only)."""
    found = dict(q.rows("nodes per depth", """
        SELECT depth, count() FROM {db}.nodes FINAL WHERE depth >= 0 GROUP BY depth"""))
    return [(d, int(found.get(d, 0))) for d in range(max(found) + 1)] if found else []


def generation_ratios(counts: Sequence[tuple[int, int]]) -> list[tuple[int, float]]:
    """R_d = nodes at depth d+1 / nodes at depth d (SPEC 6), for each d with nodes."""
    return [(d, counts[i + 1][1] / n) for i, (d, n) in enumerate(counts[:-1]) if n]


def cascade_sizes(q: Queries) -> dict[str, int]:
    """Size (binds + the seed) of every cascade."""
    return {root: int(binds) + 1 for root, binds in q.rows("cascade sizes", """
        SELECT root, sumMerge(binds) FROM {db}.cascade_minute GROUP BY campaign, root""")}


def cascade_parents(q: Queries, roots: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """Each cascade's parent links (node -> parent, None for the seed), from the nodes table."""
    if not roots:
        return {}
    found: dict[str, dict[str, str | None]] = {root: {} for root in roots}
    for root, user, parent in q.rows("cascade nodes", f"""
            SELECT root, user_id, parent FROM {{db}}.nodes FINAL
            WHERE root IN ({', '.join(map(sql_string, roots))}) AND depth >= 0 ORDER BY entered_at, user_id"""):
        found[root][user] = parent or None
    return found


def leaderboard(q: Queries) -> list[dict[str, Any]]:
    """The largest cascades with their revenue, rewards, return on rewards and structural virality."""
    rows = q.rows("top seeds", f"""
        SELECT c.root, c.binds + 1 AS size, c.max_depth, c.revenue, r.paid, r.clawed_back
        FROM (SELECT campaign, root, sumMerge(binds) AS binds, maxMerge(max_depth) AS max_depth,
                     sumMerge(revenue) AS revenue
              FROM {{db}}.cascade_minute GROUP BY campaign, root) AS c
        LEFT JOIN (SELECT campaign, root, sumMerge(paid) AS paid, sumMerge(clawed_back) AS clawed_back
                   FROM {{db}}.cascade_rewards_minute GROUP BY campaign, root) AS r
        ON c.campaign = r.campaign AND c.root = r.root
        ORDER BY size DESC, c.root LIMIT {TOP_SEEDS}""")
    parents = cascade_parents(q, [row[0] for row in rows])
    board = []
    for root, size, depth, revenue, paid, clawed in rows:
        board.append({"root": root, "size": int(size), "max_depth": int(depth), "revenue": int(revenue),
                      "paid": int(paid), "clawed": int(clawed),
                      "ror": int(revenue) / int(paid) if paid else 0.0,
                      "virality": structural_virality(parents[root])})
    return board


def pick_tree_root(sizes: Mapping[str, int], cap: int = TREE_CAP) -> str | None:
    """The largest cascade of at most `cap` nodes (the largest may be thousands): drawable yet busy."""
    fitting = [(size, root) for root, size in sizes.items() if 1 < size <= cap]
    return min(fitting, key=lambda sr: (-sr[0], sr[1]))[1] if fitting else None


def buyers(q: Queries, root: str) -> set[str]:
    """Members of one cascade with an attributed purchase, to colour them in the tree."""
    return {row[0] for row in q.rows("buyers of the drawn cascade", f"""
        SELECT DISTINCT user_id FROM {{db}}.outcomes WHERE root = {sql_string(root)}
        AND outcome = 'purchase_attributed'""")}


def rewards_by_kind(q: Queries) -> list[tuple[str, int]]:
    return [(kind, int(paid)) for kind, paid in q.rows("rewards by kind", """
        SELECT kind, sumMerge(paid) + sumMerge(clawed_back) AS total FROM {db}.ledger_minute
        GROUP BY kind ORDER BY total DESC""")]


# -- SVG charts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    points: Sequence[tuple[float, float]]
    width: float = 2.0
    dashed: bool = False


@dataclass(frozen=True)
class Frame:
    """A plot area inside an SVG of `width` x `height`, mapping data ranges to pixels."""

    width: int
    height: int
    x0: float
    x1: float
    y1: float
    left: int = 60
    right: int = 20
    top: int = 30
    bottom: int = 36

    def px(self, x: float) -> float:
        span = self.x1 - self.x0 or 1
        return self.left + (x - self.x0) / span * (self.width - self.left - self.right)

    def py(self, y: float) -> float:
        return self.height - self.bottom - min(y, self.y1) / (self.y1 or 1) * (self.height - self.top - self.bottom)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `high` (1, 2, 2.5 or 5 times a power of ten apart)."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.2g}"


def _svg(frame: Frame, body: list[str], label: str) -> str:
    return (f'<svg viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{html.escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>')


def _y_axis(frame: Frame, ticks: Sequence[float], fmt: Callable[[float], str]) -> list[str]:
    out = []
    for tick in ticks:
        y = frame.py(tick)
        out.append(f'<line x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'class="grid"/><text x="{frame.left - 6}" y="{y + 4:.1f}" class="tick" '
                   f'text-anchor="end">{html.escape(fmt(tick))}</text>')
    return out


def _legend(frame: Frame, series: Sequence[Series]) -> list[str]:
    out, x = [], frame.left
    for s in series:
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<line x1="{x}" x2="{x + 22}" y1="14" y2="14" stroke="{s.color}" stroke-width="3"{dash}/>'
                   f'<text x="{x + 28}" y="18" class="legend">{html.escape(s.name)}</text>')
        x += 40 + 7 * len(s.name)
    return out


def line_chart(series: Sequence[Series], x_ticks: Sequence[tuple[float, str]], label: str,
               y_max: float | None = None, y_fmt: Callable[[float], str] = _num, width: int = 1100,
               height: int = 300) -> str:
    """Lines over a shared x axis; values above `y_max` are drawn at the top edge (marked in the legend)."""
    xs = [x for s in series for x, _ in s.points] or [0.0, 1.0]
    top = y_max if y_max is not None else max([y for s in series for _, y in s.points] or [1.0])
    ticks = nice_ticks(top)
    frame = Frame(width, height, min(xs), max(xs), ticks[-1])
    body = _y_axis(frame, ticks, y_fmt)
    for x, text in x_ticks:
        body.append(f'<text x="{frame.px(x):.1f}" y="{height - 12}" class="tick" text-anchor="middle">'
                    f'{html.escape(text)}</text>')
    for s in series:
        path = " ".join(f"{'M' if i == 0 else 'L'}{frame.px(x):.1f},{frame.py(y):.1f}"
                        for i, (x, y) in enumerate(s.points))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        body.append(f'<path d="{path}" fill="none" stroke="{s.color}" stroke-width="{s.width}"'
                    f' stroke-linejoin="round"{dash}/>')
    return _svg(frame, body + _legend(frame, series), label)


def bar_chart(bars: Sequence[tuple[str, float]], label: str, color: str = BLUE, width: int = 1100,
              height: int = 260, y_fmt: Callable[[float], str] = _num, every: int = 1) -> str:
    """Vertical bars, one per (label, value); every `every`-th label is written under the axis."""
    ticks = nice_ticks(max([v for _, v in bars] or [1.0]))
    frame = Frame(width, height, 0, max(len(bars), 1), ticks[-1])
    slot = (frame.px(1) - frame.px(0)) if bars else 0
    body = _y_axis(frame, ticks, y_fmt)
    for i, (name, value) in enumerate(bars):
        x, y = frame.px(i) + slot * 0.1, frame.py(value)
        body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{frame.py(0) - y:.1f}" '
                    f'fill="{color}"><title>{html.escape(name)}: {html.escape(y_fmt(value))}</title></rect>')
        if i % every == 0:
            body.append(f'<text x="{x + slot * 0.4:.1f}" y="{height - 16}" class="tick" text-anchor="middle">'
                        f'{html.escape(name)}</text>')
    return _svg(frame, body, label)


def hbar_chart(bars: Sequence[tuple[str, float]], label: str, fmt: Callable[[float], str],
               colors: Mapping[str, str] | None = None, width: int = 500, left: int = 130) -> str:
    """Horizontal bars with the value written at the end: a few categories of very different sizes."""
    row = 28
    height = row * len(bars) + 10
    frame = Frame(width, height, 0, max([v for _, v in bars] or [1.0]), 1, left=left, right=90)
    body = []
    for i, (name, value) in enumerate(bars):
        y, end = 5 + i * row, frame.px(value)
        color = (colors or {}).get(name, ORANGE)
        body.append(f'<text x="{left - 8}" y="{y + 17}" class="tick" text-anchor="end">{html.escape(name)}</text>'
                    f'<rect x="{left}" y="{y + 4}" width="{max(end - left, 1):.1f}" height="{row - 10}" '
                    f'fill="{color}" rx="2"/><text x="{end + 6:.1f}" y="{y + 17}" class="tick">'
                    f'{html.escape(fmt(value))}</text>')
    return _svg(frame, body, label)


def tree_svg(parents: Mapping[str, str | None], bought: set[str], width: int = 1100) -> str:
    """One cascade as a layered tree: a row per generation, leaves spread across, parents above their children."""
    layout = tree_layout(parents)
    columns = max(x for x, _ in layout.values()) or 1
    rows = max(r for _, r in layout.values())
    height = 50 + rows * 46
    frame = Frame(width, height, 0, columns, 1, left=30, right=30, top=25, bottom=25)

    def at(node: str) -> tuple[float, float]:
        x, r = layout[node]
        return frame.px(x), 25 + r * 46

    body = [f'<text x="4" y="{25 + r * 46 + 4}" class="tick">{r}</text>' for r in range(rows + 1)]
    for node, parent in parents.items():
        if parent in layout:
            (x1, y1), (x2, y2) = at(parent), at(node)
            body.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + 23:.1f} {x2:.1f},{y2 - 23:.1f} '
                        f'{x2:.1f},{y2:.1f}" class="edge"/>')
    for node, (_, r) in layout.items():
        x, y = at(node)
        color = ORANGE if r == 0 else GREEN if node in bought else BLUE
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{8 if r == 0 else 5}" fill="{color}">'
                    f'<title>{html.escape(node)} · generation {r}{" · bought" if node in bought else ""}</title>'
                    f'</circle>')
    return _svg(frame, body, "cascade tree")


def day_ticks(start_s: float, end_s: float, most: int = 10) -> list[tuple[float, str]]:
    """Midnight (UTC) ticks, every 1, 2, 3, 7 or 14 days so that at most `most` fit."""
    days = max(1.0, (end_s - start_s) / 86_400)
    step = next((s for s in (1, 2, 3, 7, 14) if days / s <= most), 28)
    first = math.ceil(start_s / 86_400) * 86_400
    return [(t, datetime.fromtimestamp(t, UTC).strftime("%b %d"))
            for t in range(int(first), int(end_s) + 1, step * 86_400)]


# -- the page ---------------------------------------------------------------------------------------------


def money(minor: float) -> str:
    return f"{minor / MINOR:,.2f}"


def _card(title: str, value: str, note: str = "") -> str:
    return (f'<div class="card"><div class="label">{html.escape(title)}</div>'
            f'<div class="value">{html.escape(value)}</div><div class="note">{html.escape(note)}</div></div>')


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    cells = "".join(f'<th class="{"num" if i >= numeric_from else ""}">{html.escape(h)}</th>'
                    for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i >= numeric_from else ""}">{html.escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def duration(ms: float) -> str:
    """A time span for people: minutes, hours or days."""
    minutes = ms / 60_000
    if minutes >= 48 * 60:
        return f"{minutes / 1440:.1f} d"
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.0f} min"


def cards_html(h: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    fraud = h["fraud"]
    ror = h["revenue"] / h["paid"] if h["paid"] else 0.0
    stalled = stats.get("stalled", [])
    cards = [
        _card("events processed", f"{h['events']:,}", f"{stats.get('rate', 0):,.0f} events/s embedded"),
        _card("K-factor", f"{h['k']:.3f}", f"{h['binds']:,} binds / {h['sharers']:,} sharers"),
        _card("deepest cascade", f"depth {h['max_depth']}", f"root {h['deepest_root']}"),
        _card("cascades", f"{h['cascades']:,}", f"largest {h['largest_size']:,} members"),
        _card("stalled cascades", f"{len(stalled):,}", "at the end, on the event-time clock"),
        _card("attributed revenue", money(h["revenue"]), f"{h['by_outcome'].get('purchase_attributed', 0):,} "
              "attributed purchases"),
        _card("rewards paid", money(h["paid"]), f"{money(h['clawed'])} clawed back on refunds"),
        _card("return on rewards", f"{ror:.1f}×", "attributed revenue / rewards paid"),
        _card("fraud rejections", f"{sum(fraud.values()):,}",
              " · ".join(f"{reason} {count:,}" for reason, count in fraud.items())),
        _card("dead letters", f"{stats.get('dead_letters', 0):,}", "rejected events, kept with their raw bytes"),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def k_section(hours: Sequence[tuple[int, int, int, int]]) -> str:
    if not hours:
        return "<section><h2>K-factor over time</h2><p>No shares.</p></section>"
    cumulative, hourly, binds_line, shares_line = [], [], [], []
    total_binds = total_sharers = 0
    for hour, binds, sharers, new in hours:
        total_binds, total_sharers = total_binds + binds, total_sharers + new
        if total_sharers:
            cumulative.append((hour, total_binds / total_sharers))
        if sharers:
            hourly.append((hour, binds / sharers))
        binds_line.append((hour, binds))
        shares_line.append((hour, sharers))
    ordered = sorted(k for _, k in hourly)
    y_max = max(2.0, max(k for _, k in cumulative), ordered[int(len(ordered) * 0.98)] if ordered else 0)
    ticks = day_ticks(hours[0][0], hours[-1][0])
    one = [(hours[0][0], 1.0), (hours[-1][0], 1.0)]
    k_chart = line_chart([Series("per hour: binds / sharers in the hour", "#a5d8ff", hourly, 1.2),
                          Series("cumulative: binds / distinct sharers so far", ORANGE, cumulative, 2.6),
                          Series("K = 1", GRAY, one, 1.2, dashed=True)], ticks, "K-factor over time",
                         y_max=y_max, y_fmt=lambda v: f"{v:.1f}")
    flow = line_chart([Series("binds per hour", BLUE, binds_line),
                       Series("distinct sharers per hour", ORANGE, shares_line)], ticks, "binds and sharers per hour",
                      height=240)
    return ("<section><h2>K-factor over time</h2><p class=\"lead\">Per hour of event time. Above the dashed line "
            "each sharer brings in more than one new member: the campaign grows by itself. Hourly values above the "
            "top of the axis are drawn at the top; the last hour is cut short where the simulation stops.</p>"
            f"{k_chart}<h3>Binds and sharers per hour</h3>{flow}</section>")


def depth_section(counts: Sequence[tuple[int, int]]) -> str:
    if not counts:
        return "<section><h2>Depth distribution</h2><p>No cascades.</p></section>"
    every = max(1, len(counts) // 25)
    nodes = bar_chart([(str(d), n) for d, n in counts], "nodes per depth", every=every)
    ratios = generation_ratios(counts)
    ratio_chart = line_chart([Series("R_d = nodes at depth d+1 / nodes at depth d", GREEN, ratios, 2.2),
                              Series("R = 1", GRAY, [(0, 1.0), (max(len(ratios) - 1, 1), 1.0)], 1.2, dashed=True)],
                             [(d, str(d)) for d, _ in ratios if d % max(1, every * 2) == 0],
                             "generation ratios", y_max=max(2.0, min(max(r for _, r in ratios), 6.0)) if ratios
                             else 2.0, y_fmt=lambda v: f"{v:.1f}", height=220)
    peak = max(counts, key=lambda dn: dn[1])
    return (f"<section><h2>Depth distribution</h2><p class=\"lead\">Cascade members per generation (depth 0 = "
            f"seeds). The widest generation is depth {peak[0]} with {peak[1]:,} members; a generation ratio above 1 "
            f"means that generation out-recruited the one before.</p>{nodes}<h3>Generation ratios R<sub>d</sub>"
            f"</h3>{ratio_chart}</section>")


def leaderboard_section(board: Sequence[Mapping[str, Any]]) -> str:
    rows = [[row["root"], f"{row['size']:,}", str(row["max_depth"]), money(row["revenue"]), money(row["paid"]),
             f"{row['ror']:.2f}×", f"{row['virality']:.2f}"] for row in board]
    table = _table(["seed (root)", "cascade size", "max depth", "attributed revenue", "rewards paid",
                    "return on rewards", "structural virality"], rows)
    return ("<section><h2>Top seeds</h2><p class=\"lead\">The largest cascades. Structural virality is the mean "
            "distance between two members (Goel et al.): about 2 for a broadcast from one hub, large for a long "
            f"person-to-person chain.</p>{table}</section>")


def tree_section(q: Queries, sizes: Mapping[str, int]) -> str:
    root = pick_tree_root(sizes)
    if root is None:
        return "<section><h2>One cascade as a tree</h2><p>No cascade with members.</p></section>"
    parents = cascade_parents(q, [root])[root]
    largest = max(sizes.values())
    why = "The largest cascade" if sizes[root] == largest else \
        f"The largest cascade with at most {TREE_CAP} members (the largest has {largest:,})"
    legend = (f'<span class="dot" style="background:{ORANGE}"></span>seed '
              f'<span class="dot" style="background:{BLUE}"></span>bound '
              f'<span class="dot" style="background:{GREEN}"></span>bound and bought')
    return (f"<section><h2>One cascade as a tree: {html.escape(root)}</h2><p class=\"lead\">{why}: "
            f"{len(parents)} members, depth {max(row for _, row in tree_layout(parents).values())}, "
            f"structural virality {structural_virality(parents):.2f}. One row per generation; hover a node for "
            f"its user id.</p><p class=\"lead\">{legend}</p>"
            f"{tree_svg(parents, buyers(q, root))}</section>")


def stalled_section(stats: Mapping[str, Any]) -> str:
    stalled = stats.get("stalled", [])
    note = ("Cascades of at least 10 members whose last bind is older than max(10 min, 5 × the median gap of "
            "their last 20 binds), on the event-time clock (the latest event time seen).")
    if not stalled:
        return f"<section><h2>Stalled cascades</h2><p class=\"lead\">{note}</p><p>None at the end.</p></section>"
    rows = [[s["root"], f"{s['size']:,}", str(s["max_depth"]), duration(s["idle_ms"]), duration(s["threshold_ms"])]
            for s in stalled[:15]]
    more = f"<p>… and {len(stalled) - 15} more.</p>" if len(stalled) > 15 else ""
    return (f"<section><h2>Stalled cascades ({len(stalled)})</h2><p class=\"lead\">{note}</p>"
            f"{_table(['seed (root)', 'size', 'max depth', 'since last bind', 'stall threshold'], rows)}{more}"
            "</section>")


def rewards_section(kinds: Sequence[tuple[str, int]]) -> str:
    chart = hbar_chart(kinds, "rewards by kind", money, {"clawback": RED})
    return ("<section><h2>Rewards by kind</h2><p class=\"lead\">Ledger credits, in currency units; clawbacks "
            f"reverse the commissions and first-purchase rewards of refunded orders.</p>{chart}</section>")


def outcomes_section(outcomes: Sequence[tuple[str, int]]) -> str:
    colors = {name: RED for name, _ in outcomes if name.startswith("rejected")}
    chart = hbar_chart(outcomes, "outcomes", lambda v: f"{v:,.0f}", colors | {"bound": BLUE, "shared": BLUE},
                       left=190)
    return ("<section><h2>Outcomes</h2><p class=\"lead\">One per input event; rejections with their reason "
            f"(the simulator mixes in fraud, malformed and redelivered events).</p>{chart}</section>")


def outcome_counts(q: Queries) -> list[tuple[str, int]]:
    return [(f"{outcome} · {reason}" if reason else outcome, int(events)) for outcome, reason, events in q.rows(
        "outcomes", """SELECT outcome, reason, countMerge(events) AS n FROM {db}.campaign_minute
        GROUP BY outcome, reason ORDER BY n DESC, outcome, reason""")]


def run_line(stats: Mapping[str, Any]) -> str:
    """What was run, and how fast, for the page header."""
    parts = [f"{stats.get('total', 0):,} simulated events", f"seed {stats.get('seed', '')}",
             f"target K {stats.get('target_k', '')}", f"{stats.get('partitions', '')} partitions",
             f"processed in {stats.get('elapsed_s', 0):.1f} s ({stats.get('rate', 0):,.0f} events/s, engine + "
             "ClickHouse sink)", f"event time {stats.get('span', '')}"]
    return " · ".join(html.escape(p) for p in parts)


def sql_section(q: Queries) -> str:
    items = "".join(f"<h4>{html.escape(purpose)}</h4><pre>{html.escape(sql)}</pre>" for purpose, sql in q.log)
    return f"<section><details><summary>The SQL behind this report ({len(q.log)} queries)</summary>{items}" \
           "</details></section>"


STYLE = """
*{box-sizing:border-box}body{margin:0;background:#f4f5f7;color:#212529;
font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 24px 60px}
header h1{margin:0;font-size:28px}header p{margin:4px 0 20px;color:#495057}
.accent{color:#e8590c}.run{font-size:13px;color:#868e96}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px;margin-bottom:18px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#868e96}
.card .value{font-size:24px;font-weight:650;margin:2px 0}
.card .note{font-size:12.5px;color:#495057;overflow-wrap:anywhere}
section{background:#fff;border-radius:10px;padding:18px 22px;margin-bottom:18px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.row{display:grid;grid-template-columns:1fr 1fr;gap:18px}.row section{margin-bottom:18px}
h2{margin:0 0 4px;font-size:20px}h3{margin:18px 0 4px;font-size:15px;color:#495057}
h4{margin:12px 0 4px;font-size:13px;color:#495057}
.lead{margin:0 0 10px;color:#495057;font-size:14px}
svg{width:100%;height:auto;display:block}
svg text{font-family:inherit}.tick{font-size:11px;fill:#868e96}.legend{font-size:12px;fill:#495057}
.grid{stroke:#e9ecef;stroke-width:1}.edge{fill:none;stroke:#adb5bd;stroke-width:1.2}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #e9ecef;text-align:left}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#868e96;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:hover{background:#f8f9fa}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin:0 4px 0 10px;vertical-align:-1px}
pre{background:#f8f9fa;padding:8px 10px;border-radius:6px;white-space:pre-wrap;font-size:12px;margin:0}
summary{cursor:pointer;font-weight:600}
"""


def write_report(backend: Backend, database: str, out_path: Path, stats: Mapping[str, Any]) -> Path:
    """Query the sink's tables and views and write the report.

    `stats` carries what only the run knows (keys: campaign, seed, target_k, partitions, total, elapsed_s,
    rate, dead_letters, span, stalled: a list of {root, size, max_depth, idle_ms, threshold_ms}).
    """
    q = Queries(backend, database)
    h = headline(q)
    sizes = cascade_sizes(q)
    sections = [
        cards_html(h, stats),
        k_section(k_over_time(q)),
        depth_section(depth_counts(q)),
        leaderboard_section(leaderboard(q)),
        tree_section(q, sizes),
        stalled_section(stats),
        f'<div class="row">{rewards_section(rewards_by_kind(q))}{outcomes_section(outcome_counts(q))}</div>',
        sql_section(q),
    ]
    title = f"fission demo · {stats.get('campaign', database)}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><main><header><h1><span class="accent">fission</span> demo report</h1>'
            f'<p>Campaign <b>{html.escape(str(stats.get("campaign", "")))}</b>: a simulated viral campaign run '
            f'through the attribution engine and the ClickHouse sink (chDB). Amounts in currency units.<br>'
            f'<span class="run">{run_line(stats)}</span></p>'
            f'</header>{"".join(sections)}</main></body></html>')
    out_path = Path(out_path)
    out_path.write_text(page, encoding="utf-8")
    return out_path
