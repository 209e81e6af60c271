"""Writes the Grafana dashboards in grafana/dashboards/*.json from the panel definitions below.

Why a generator: the dashboards are ~50 panels of SQL, and SQL kept as readable multi-line strings here,
with the few fragments every panel shares (the campaign filter, the seed filter, the time bucket) written
once, is easier to review and keep correct than SQL escaped inside JSON. The JSON files are what Grafana
loads and what tests/test_grafana.py checks (it also fails if they differ from this script's output), so
after editing run:

    .venv/bin/python grafana/build_dashboards.py

Rules every ClickHouse query follows (tests/test_grafana.py runs each one on ClickHouse 18.16 and on chDB):
- valid on ClickHouse 18.16 and on current ClickHouse: no window functions, no DateTime64, no multiple
  JOINs (combine sources with UNION ALL and an outer GROUP BY), no deprecated running* functions
  (arrayCumSum over a sorted groupArray instead), explicit casts in UNION ALL branches;
- per-minute views (campaign_minute, ledger_minute, cascade_minute, cascade_rewards_minute, depth_minute)
  are read with -Merge functions and a GROUP BY; raw tables (nodes, ledger, alerts, fraud) where a view
  cannot answer (one cascade's tree, a user's offences);
- an alias never repeats a column name of the table it reads (``sumMerge(binds) AS b``, not ``AS binds``), so a
  name used again in WHERE, HAVING or ORDER BY cannot mean the column on one engine and the alias on another;
- variables are inserted percent-encoded and decoded by ClickHouse, ``decodeURLComponent('${seed:percentencode}')``:
  ids may hold any character (SPEC 1), and Grafana's ``sqlstring`` format doubles quotes but leaves backslashes,
  which ClickHouse reads as escapes (an id ending in a backslash breaks the query, or worse); a percent-encoded
  value is only [A-Za-z0-9%._~-]. "All" of ``seed`` is ``__all`` (Grafana percent-encodes a custom All value too);
- time macros of the ClickHouse plugin only (``$__timeFilter(col)``, ``$__fromTime``, ``$__toTime``,
  ``$__interval_s``).
"""

from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "fission-clickhouse"}
PROMETHEUS = {"type": "prometheus", "uid": "fission-prometheus"}
PLUGIN_VERSION = "4.3.2"  # the plugin version docker-compose.yml installs
TIME_SERIES, TABLE = 0, 1  # the plugin's `format`: 0 = time series (long frames become wide), 1 = table

# -- shared SQL fragments ----------------------------------------------------------------------------------

CAMPAIGN_VALUE = "decodeURLComponent('${campaign:percentencode}')"
SEED_VALUE = "decodeURLComponent('${seed:percentencode}')"
CAMPAIGN = f"campaign = {CAMPAIGN_VALUE}"
SEED = f"({SEED_VALUE} = '__all' OR root = {SEED_VALUE})"
BUDGET = "toFloat64OrZero('${budget:percentencode}')"  # a textbox: whatever is typed stays a literal
K_WINDOW = "greatest(60, toUInt32OrZero('${kwindow:percentencode}'))"  # seconds
# Per-minute views cannot be bucketed finer than a minute; panels also set a 1m minimum interval.
STEP = "greatest(60, $__interval_s)"
BUCKET = f"toDateTime(intDiv(toUInt32(minute), {STEP}) * {STEP})"
TO_MS = "toUInt64(toUInt32($__toTime)) * 1000"
# The cascade a per-cascade panel shows: the selected seed, or the largest cascade when seed is All.
SELECTED_ROOT = (
    f"if({SEED_VALUE} = '__all', (SELECT root FROM cascade_minute WHERE {CAMPAIGN} "
    f"GROUP BY root ORDER BY sumMerge(binds) DESC, root LIMIT 1), {SEED_VALUE})"
)
TREE_LIMIT = 1000  # the node graph panel draws at most 1,500 nodes


def sql(text: str) -> str:
    return dedent(text).strip()


# -- panel and target builders -----------------------------------------------------------------------------


def ch(raw: str, fmt: int = TABLE, ref: str = "A") -> dict[str, Any]:
    """A ClickHouse plugin (v4) SQL target."""
    return {
        "datasource": CLICKHOUSE,
        "editorType": "sql",
        "format": fmt,
        "pluginVersion": PLUGIN_VERSION,
        "queryType": "timeSeries" if fmt == TIME_SERIES else "table",
        "rawSql": sql(raw),
        "refId": ref,
    }


def prom(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": sql(expr),
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def panel(kind: str, title: str, targets: list[dict], w: int, h: int, description: str = "",
          unit: str = "short", options: dict | None = None, custom: dict | None = None,
          overrides: list | None = None, defaults: dict | None = None, interval: str | None = None) -> dict:
    datasource = targets[0]["datasource"]
    found: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource,
        "targets": targets,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {
            "defaults": {"unit": unit, **({"custom": custom} if custom else {}), **(defaults or {})},
            "overrides": overrides or [],
        },
        "options": options or {},
    }
    if interval:
        found["interval"] = interval
    elif datasource is CLICKHOUSE and any(t["format"] == TIME_SERIES for t in targets):
        found["interval"] = "1m"
    return found


def timeseries(title: str, targets: list[dict], w: int = 12, h: int = 8, stacked: bool = False,
               bars: bool = False, **kwargs: Any) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars else 10, "lineWidth": 1,
              "showPoints": "never", "spanNulls": True,
              "stacking": {"mode": "normal" if stacked else "none", "group": "A"}}
    custom.update(kwargs.pop("custom", {}))
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, targets, w, h, custom=custom, options=options, **kwargs)


def stat(title: str, targets: list[dict], w: int = 6, h: int = 4, **kwargs: Any) -> dict:
    options = {"colorMode": "value", "graphMode": "none", "justifyMode": "auto", "textMode": "value_and_name",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return panel("stat", title, targets, w, h, options=options, **kwargs)


def table(title: str, targets: list[dict], w: int = 12, h: int = 9, **kwargs: Any) -> dict:
    options = {"cellHeight": "sm", "showHeader": True, "footer": {"show": False, "reducer": ["sum"]}}
    return panel("table", title, targets, w, h, options=options, **kwargs)


def barchart(title: str, targets: list[dict], x_field: str, w: int = 12, h: int = 8, **kwargs: Any) -> dict:
    options = {"xField": x_field, "orientation": "vertical", "showValue": "auto", "barWidth": 0.8,
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "single"}}
    return panel("barchart", title, targets, w, h, options=options, **kwargs)


def unit_override(field: str, unit: str) -> dict:
    """Set the unit of one field (a name, or a /regex/ matching names)."""
    matcher = "byRegexp" if field.startswith("/") else "byName"
    return {"matcher": {"id": matcher, "options": field}, "properties": [{"id": "unit", "value": unit}]}


def threshold_line(value: float, color: str = "red") -> dict:
    return {"thresholds": {"mode": "absolute",
                           "steps": [{"color": "green", "value": None}, {"color": color, "value": value}]}}


# -- template variables -------------------------------------------------------------------------------------

CAMPAIGN_VAR = {
    "name": "campaign",
    "label": "Campaign",
    "type": "query",
    "datasource": CLICKHOUSE,
    "description": "Campaigns that have processed events (rejected-only ids such as unknown campaigns excluded).",
    # A plain string: the query format every plugin version (3.x legacy, 4.x) accepts for variables.
    "query": sql("""
        SELECT campaign FROM campaign_minute
        WHERE campaign != '' AND outcome NOT IN ('rejected', 'duplicate')
        GROUP BY campaign ORDER BY campaign
    """),
    "refresh": 1,
    "sort": 0,
    "multi": False,
    "includeAll": False,
    "current": {"selected": True, "text": "spring-red-packet", "value": "spring-red-packet"},
    "options": [],
    "hide": 0,
}
SEED_VAR = {
    "name": "seed",
    "label": "Seed (cascade root)",
    "type": "query",
    "datasource": CLICKHOUSE,
    "description": "A cascade, named by its seed (root) user; the largest cascades first. All = every cascade "
                   "(per-cascade panels then show the largest).",
    "query": sql(f"""
        SELECT root FROM cascade_minute WHERE {CAMPAIGN}
        GROUP BY root ORDER BY sumMerge(binds) DESC, root LIMIT 500
    """),
    "refresh": 2,
    "sort": 0,
    "multi": False,
    "includeAll": True,
    # What a query sees for All (through percentencode, which leaves it as it is); no seed has this id.
    "allValue": "__all",
    "current": {"selected": True, "text": "All", "value": "$__all"},
    "options": [],
    "hide": 0,
}
BUDGET_VAR = {
    "name": "budget",
    "label": "Budget (minor units)",
    "type": "textbox",
    "description": "The campaign's limits.budget from the campaigns file (ClickHouse does not hold it).",
    "query": "100000000",
    "current": {"selected": False, "text": "100000000", "value": "100000000"},
    "options": [{"selected": True, "text": "100000000", "value": "100000000"}],
    "hide": 0,
}
K_WINDOW_VAR = {
    "name": "kwindow",
    "label": "K-factor window",
    "type": "custom",
    "description": "The window W of SPEC 6's K = binds / sharers over [t - W, t).",
    "query": "1h : 3600, 6h : 21600, 24h : 86400",
    "current": {"selected": True, "text": "6h", "value": "21600"},
    "options": [
        {"selected": False, "text": "1h", "value": "3600"},
        {"selected": True, "text": "6h", "value": "21600"},
        {"selected": False, "text": "24h", "value": "86400"},
    ],
    "multi": False,
    "includeAll": False,
    "hide": 0,
}


# -- Campaign -------------------------------------------------------------------------------------------------


def campaign_panels() -> list[dict]:
    revenue_vs_rewards = f"""
        SELECT {BUCKET} AS time, toInt64(sumMerge(revenue)) AS rev, toInt64(0) AS rew
        FROM cascade_minute WHERE {CAMPAIGN} AND {SEED} AND {{time}} GROUP BY time
        UNION ALL
        SELECT {BUCKET} AS time, toInt64(0) AS rev, toInt64(sumMerge(paid) - sumMerge(clawed_back)) AS rew
        FROM cascade_rewards_minute WHERE {CAMPAIGN} AND {SEED} AND {{time}} GROUP BY time
    """
    return [
        stat("Binds · sharers · K-factor", [ch(f"""
            SELECT binds, sharers, if(sharers = 0, 0, binds / sharers) AS k_factor
            FROM (
                SELECT countMergeIf(events, outcome = 'bound') AS binds,
                       uniqMergeIf(users, type = 'share' AND outcome = 'shared') AS sharers
                FROM campaign_minute
                WHERE {CAMPAIGN} AND $__timeFilter(minute)
            )
        """)], w=8, description="Over the time range: users bound, distinct sharers, K = binds / sharers (SPEC 6).",
            overrides=[{"matcher": {"id": "byName", "options": "k_factor"},
                        "properties": [{"id": "decimals", "value": 2}, {"id": "displayName", "value": "K-factor"}]}]),
        stat("Attributed revenue · rewards · return", [ch(f"""
            SELECT revenue_attributed, rewards_net,
                   if(rewards_net = 0, 0, revenue_attributed / rewards_net) AS return_on_rewards
            FROM (
                SELECT
                    (SELECT sumMergeIf(amount_sum, outcome = 'purchase_attributed') FROM campaign_minute
                     WHERE {CAMPAIGN} AND $__timeFilter(minute)) AS revenue_attributed,
                    (SELECT sumMerge(paid) - sumMerge(clawed_back) FROM ledger_minute
                     WHERE {CAMPAIGN} AND $__timeFilter(minute)) AS rewards_net
            )
        """)], w=8, description="Over the time range, in minor units: revenue of attributed purchases (gross of "
                                "refunds), rewards net of clawbacks, and return on rewards = revenue / rewards.",
            overrides=[{"matcher": {"id": "byName", "options": "return_on_rewards"},
                        "properties": [{"id": "decimals", "value": 2}, {"id": "unit", "value": "x"}]}]),
        panel("gauge", "Budget used", [ch(f"""
            SELECT if({BUDGET} > 0, rewards_net / {BUDGET}, 0) AS budget_used
            FROM (
                SELECT sumMerge(paid) - sumMerge(clawed_back) AS rewards_net
                FROM ledger_minute WHERE {CAMPAIGN} AND minute <= $__toTime
            )
        """)], w=4, h=4, unit="percentunit",
            description="Net rewards since the campaign started, up to the end of the range, over the budget "
                        "variable (the campaign's limits.budget).",
            defaults={"min": 0, "max": 1, **threshold_line(0.9)},
            options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                     "showThresholdMarkers": True}),
        stat("Credits cut by the budget", [ch(f"""
            SELECT sumMerge(budget_cut_sum) AS cut_amount
            FROM campaign_minute WHERE {CAMPAIGN} AND $__timeFilter(minute)
        """)], w=4, description="Amount of credits not made because the budget ran out (SPEC 4.6), in range.",
            defaults=threshold_line(1)),
        timeseries("Events per second by type", [ch(f"""
            SELECT {BUCKET} AS time, if(type = '', 'invalid', type) AS event_type,
                   countMerge(events) / {STEP} AS events_per_s
            FROM campaign_minute
            WHERE {CAMPAIGN} AND $__timeFilter(minute)
            GROUP BY time, event_type
            ORDER BY time
        """, TIME_SERIES)], unit="ops", stacked=True,
            description="Processed events of the campaign per second (from ClickHouse; the Operations dashboard "
                        "has the live rate from Prometheus)."),
        timeseries("Shares, binds and attributed purchases", [ch(f"""
            SELECT {BUCKET} AS time,
                   countMergeIf(events, outcome = 'shared') AS shares,
                   countMergeIf(events, outcome = 'bound') AS binds,
                   countMergeIf(events, outcome = 'purchase_attributed') AS attributed_purchases
            FROM campaign_minute
            WHERE {CAMPAIGN} AND $__timeFilter(minute)
            GROUP BY time
            ORDER BY time
        """, TIME_SERIES)], bars=True, description="Per interval."),
        timeseries("K-factor over the last ${kwindow:text}", [ch(f"""
            SELECT toDateTime(bucket) AS time,
                   if(uniqMergeIf(users, outcome = 'shared') = 0, 0,
                      countMergeIf(events, outcome = 'bound') / uniqMergeIf(users, outcome = 'shared')) AS k_factor
            FROM (
                -- each minute counts in every bucket whose window [bucket + step - W, bucket + step) holds it
                SELECT events, users, outcome,
                       (intDiv(toUInt32(minute), {STEP})
                        + arrayJoin(range(toUInt64(intDiv({K_WINDOW} + {STEP} - 1, {STEP}))))) * {STEP} AS bucket
                FROM campaign_minute
                WHERE {CAMPAIGN}
                  AND ((type = 'share' AND outcome = 'shared') OR (type = 'scan' AND outcome = 'bound'))
                  AND minute >= $__fromTime - {K_WINDOW} AND minute <= $__toTime
            )
            WHERE bucket >= toUInt32($__fromTime) - {STEP} AND bucket <= toUInt32($__toTime)
            GROUP BY bucket
            ORDER BY bucket
        """, TIME_SERIES)], unit="none", defaults={"decimals": 2, **threshold_line(1, "green")},
            custom={"thresholdsStyle": {"mode": "line"}},
            description="K = binds / distinct sharers over the window ending at each point (SPEC 6). Above 1 "
                        "(the line) the campaign grows by itself."),
        timeseries("Rewards vs budget (cumulative)", [ch(f"""
            SELECT toDateTime(tupleElement(p, 1)) AS time, tupleElement(p, 2) AS rewards_net,
                   toInt64({BUDGET}) AS budget
            FROM (
                SELECT arrayJoin(arrayMap((b, c) -> (b, c), arrayMap(x -> tupleElement(x, 1), pts),
                                          arrayCumSum(arrayMap(x -> tupleElement(x, 2), pts)))) AS p
                FROM (
                    SELECT arraySort(groupArray((bucket, net))) AS pts
                    FROM (
                        SELECT intDiv(toUInt32(minute), {STEP}) * {STEP} AS bucket,
                               sumMerge(paid) - sumMerge(clawed_back) AS net
                        FROM ledger_minute
                        WHERE {CAMPAIGN} AND minute <= $__toTime
                        GROUP BY bucket
                    )
                )
            )
            WHERE time >= $__fromTime - {STEP}
            ORDER BY time
        """, TIME_SERIES)], description="Net rewards paid since the start of the campaign, against the budget."),
        timeseries("Attributed revenue vs rewards (${seed})", [ch(f"""
            SELECT time, sum(rev) AS revenue_attributed, sum(rew) AS rewards_net
            FROM (
                {revenue_vs_rewards.replace("{time}", "$__timeFilter(minute)")}
            )
            GROUP BY time
            ORDER BY time
        """, TIME_SERIES)], bars=True,
            description="Per interval, in minor units; one cascade when a seed is selected."),
        timeseries("Return on rewards, cumulative (${seed})", [ch(f"""
            SELECT toDateTime(tupleElement(p, 1)) AS time,
                   if(tupleElement(p, 3) = 0, 0, tupleElement(p, 2) / tupleElement(p, 3)) AS return_on_rewards
            FROM (
                SELECT arrayJoin(arrayMap((b, r, w) -> (b, r, w), arrayMap(x -> tupleElement(x, 1), pts),
                                          arrayCumSum(arrayMap(x -> tupleElement(x, 2), pts)),
                                          arrayCumSum(arrayMap(x -> tupleElement(x, 3), pts)))) AS p
                FROM (
                    SELECT arraySort(groupArray((toUInt32(bucket), rev_total, rew_total))) AS pts
                    FROM (
                        SELECT time AS bucket, sum(rev) AS rev_total, sum(rew) AS rew_total
                        FROM (
                            {revenue_vs_rewards.replace("{time}", "minute <= $__toTime")}
                        )
                        GROUP BY bucket
                    )
                )
            )
            WHERE time >= $__fromTime - {STEP}
            ORDER BY time
        """, TIME_SERIES)], unit="x", defaults={"decimals": 2},
            description="Attributed revenue / net rewards since the campaign started; one cascade when a seed is "
                        "selected."),
        timeseries("Rewards by kind", [ch(f"""
            SELECT {BUCKET} AS time, kind, sumMerge(paid) - sumMerge(clawed_back) AS rewards
            FROM ledger_minute
            WHERE {CAMPAIGN} AND $__timeFilter(minute)
            GROUP BY time, kind
            ORDER BY time
        """, TIME_SERIES)], bars=True, stacked=True,
            description="Net credits per interval by ledger kind (clawbacks are negative)."),
        table("Outcomes in range", [ch(f"""
            SELECT if(type = '', 'invalid', type) AS event_type, outcome, reason,
                   countMerge(events) AS events_count, uniqMerge(users) AS actors,
                   sumMerge(amount_sum) AS amount_total
            FROM campaign_minute
            WHERE {CAMPAIGN} AND $__timeFilter(minute)
            GROUP BY event_type, outcome, reason
            ORDER BY events_count DESC
        """)], description="Every outcome of SPEC 5 with its rejection reason; amount = purchase amounts."),
    ]


# -- Cascades -------------------------------------------------------------------------------------------------


def cascades_panels() -> list[dict]:
    tree = f"{CAMPAIGN} AND root = {SELECTED_ROOT} AND entered_time <= $__toTime"
    seed_link = [{"title": "Show this cascade",
                  "url": "/d/fission-cascades/cascades?var-campaign=${campaign}&var-seed=${__value.raw}"
                         "&${__url_time_range}"}]
    return [
        stat("Cascades", [ch(f"""
            SELECT count() AS cascades, max(size) AS largest, max(depth_max) AS deepest,
                   if(count() = 0, 0, round(avg(size), 1)) AS mean_size
            FROM (
                SELECT root, sumMerge(binds) + 1 AS size, maxMerge(max_depth) AS depth_max
                FROM cascade_minute
                WHERE {CAMPAIGN} AND minute <= $__toTime
                GROUP BY root
            )
        """)], w=24, description="Cascades (one per seed) up to the end of the range: how many, the largest "
                                 "(nodes, seed included), the deepest generation and the mean size."),
        barchart("Depth distribution (${seed})", [ch(f"""
            SELECT toString(depth) AS generation, count() AS nodes_at_depth
            FROM nodes FINAL
            WHERE {CAMPAIGN} AND state IN ('seed', 'bound') AND {SEED} AND entered_time <= $__toTime
            GROUP BY depth
            ORDER BY depth
        """)], x_field="generation",
            description="Nodes per generation (depth 0 = seeds), the whole campaign or one cascade."),
        barchart("Generation ratios R_d (${seed})", [ch(f"""
            SELECT toString(tupleElement(p, 1)) AS generation,
                   if(tupleElement(p, 2) = 0, 0, tupleElement(p, 3) / tupleElement(p, 2)) AS ratio
            FROM (
                SELECT arrayJoin(arrayMap((x, nxt) -> (tupleElement(x, 1), tupleElement(x, 2), nxt), pts,
                                          arrayPopFront(arrayPushBack(arrayMap(y -> tupleElement(y, 2), pts),
                                                                      toUInt64(0))))) AS p
                FROM (
                    SELECT arraySort(groupArray((depth, cnt))) AS pts
                    FROM (
                        SELECT depth, count() AS cnt
                        FROM nodes FINAL
                        WHERE {CAMPAIGN} AND state IN ('seed', 'bound') AND {SEED} AND entered_time <= $__toTime
                        GROUP BY depth
                    )
                )
            )
            WHERE tupleElement(p, 3) > 0
            ORDER BY tupleElement(p, 1)
        """)], x_field="generation", unit="none", defaults={"decimals": 2, **threshold_line(1, "green")},
            custom={"thresholdsStyle": {"mode": "line"}},
            description="R_d = nodes at depth d+1 / nodes at depth d (SPEC 6); above 1 a generation outgrows the "
                        "one before it."),
        table("Seed leaderboard", [ch(f"""
            SELECT root AS seed,
                   sum(b) + 1 AS size,
                   max(d) AS max_depth,
                   sum(b_range) AS binds_in_range,
                   sum(p) AS attributed_purchases,
                   sum(rev) AS revenue_attributed,
                   sum(rew) AS rewards_net,
                   if(sum(rew) = 0, 0, sum(rev) / sum(rew)) AS return_on_rewards,
                   toDateTime(max(last)) AS last_activity
            FROM (
                SELECT root, toUInt64(sumMerge(binds)) AS b,
                       toUInt64(sumMergeIf(binds, minute >= $__fromTime)) AS b_range,
                       toInt32(maxMerge(max_depth)) AS d, toUInt64(sumMerge(purchases)) AS p,
                       toInt64(sumMerge(revenue)) AS rev, toInt64(0) AS rew, toUInt32(max(minute)) AS last
                FROM cascade_minute
                WHERE {CAMPAIGN} AND minute <= $__toTime
                GROUP BY root
                UNION ALL
                SELECT root, toUInt64(0), toUInt64(0), toInt32(0), toUInt64(0), toInt64(0),
                       toInt64(sumMerge(paid) - sumMerge(clawed_back)), toUInt32(0)
                FROM cascade_rewards_minute
                WHERE {CAMPAIGN} AND minute <= $__toTime
                GROUP BY root
            )
            GROUP BY root
            ORDER BY size DESC, seed
            LIMIT 50
        """)], w=24, h=10,
            description="The 50 largest cascades up to the end of the range; click a seed to show its cascade.",
            overrides=[
                {"matcher": {"id": "byName", "options": "seed"}, "properties": [{"id": "links", "value": seed_link}]},
                {"matcher": {"id": "byName", "options": "return_on_rewards"},
                 "properties": [{"id": "decimals", "value": 2}, {"id": "unit", "value": "x"}]},
            ]),
        panel("nodeGraph", "Cascade tree (${seed}; the largest cascade when All)", [
            ch(f"""
                SELECT id, id AS title, concat('depth ', toString(max(node_depth))) AS subTitle,
                       sum(invites) AS mainStat, sum(earned) AS secondaryStat,
                       if(max(node_depth) = 0, 1, 0) AS arc__seed, if(max(node_depth) = 0, 0, 1) AS arc__bound
                FROM (
                    SELECT user_id AS id, toInt32(depth) AS node_depth, toUInt8(1) AS is_node,
                           toUInt64(0) AS invites, toInt64(0) AS earned
                    FROM (
                        SELECT user_id, depth FROM nodes FINAL
                        WHERE {tree} AND state IN ('seed', 'bound')
                        ORDER BY depth, entered_at, user_id
                        LIMIT {TREE_LIMIT}
                    )
                    UNION ALL
                    SELECT parent, toInt32(-1), toUInt8(0), toUInt64(count()), toInt64(0)
                    FROM nodes FINAL WHERE {tree} AND state = 'bound' GROUP BY parent
                    UNION ALL
                    SELECT beneficiary, toInt32(-1), toUInt8(0), toUInt64(0), toInt64(sum(amount))
                    FROM ledger WHERE {CAMPAIGN} AND root = {SELECTED_ROOT}
                      AND event_time <= $__toTime
                    GROUP BY beneficiary
                )
                GROUP BY id
                HAVING max(is_node) = 1
                ORDER BY max(node_depth), id
            """, ref="nodes"),
            ch(f"""
                SELECT user_id AS id, parent AS source, user_id AS target
                FROM nodes FINAL
                WHERE {tree} AND state = 'bound'
                ORDER BY depth, entered_at, user_id
                LIMIT {TREE_LIMIT - 1}
            """, ref="edges"),
        ], w=24, h=16, description=(
            f"One cascade as a tree (first {TREE_LIMIT} nodes by generation): a node is a user (main stat: "
            "invites they bound, secondary: rewards earned in this cascade), an edge goes from sharer to the user "
            "they brought in. The seed is drawn in orange."),
            options={"nodes": {"mainStatUnit": "short", "secondaryStatUnit": "short",
                               "arcs": [{"field": "arc__seed", "color": "orange"},
                                        {"field": "arc__bound", "color": "blue"}]},
                     "edges": {}}),
        table("Stalled cascades (firing now)", [ch(f"""
            SELECT root AS seed, kind, toDateTime(intDiv(since, 1000)) AS firing_since, last_detail AS detail
            FROM (
                SELECT root, kind, argMax(state, ts) AS last_state, max(ts) AS since,
                       argMax(detail, ts) AS last_detail
                FROM alerts
                WHERE {CAMPAIGN} AND kind = 'stalled_cascade' AND ts <= {TO_MS}
                GROUP BY root, kind
            )
            WHERE last_state = 'firing'
            ORDER BY firing_since DESC, seed
        """)], w=12, h=8,
            description="Cascades whose last stall alert (SPEC 6) is firing at the end of the range; written by "
                        "the cascade agent into the alerts table.",
            overrides=[{"matcher": {"id": "byName", "options": "seed"},
                        "properties": [{"id": "links", "value": seed_link}]}]),
        timeseries("Cascade alerts", [ch(f"""
            SELECT toDateTime(intDiv(intDiv(ts, 1000), {STEP}) * {STEP}) AS time,
                   concat(kind, ' ', state) AS transition, count() AS transitions
            FROM alerts
            WHERE {CAMPAIGN} AND $__timeFilter(event_time)
            GROUP BY time, transition
            ORDER BY time
        """, TIME_SERIES)], bars=True, w=12, h=8,
            description="Alert transitions (stalled_cascade, k_below_one; firing / resolved) per interval."),
        timeseries("Binds by generation", [ch(f"""
            SELECT {BUCKET} AS time, concat('depth ', toString(depth)) AS generation, countMerge(events) AS binds
            FROM depth_minute
            WHERE {CAMPAIGN} AND outcome = 'bound' AND $__timeFilter(minute)
            GROUP BY time, generation
            ORDER BY time
        """, TIME_SERIES)], bars=True, stacked=True, w=12,
            description="Binds per interval by the depth they land at: how deep the cascades are growing."),
        timeseries("Live K-factor and stalled cascades (cascade agent)", [
            prom('fission_k_factor{campaign="${campaign}"}', "K-factor", "A"),
            prom('fission_stalled_cascades{campaign="${campaign}"}', "stalled cascades", "B"),
        ], w=12, description="Gauges of the cascade agent (Prometheus): sliding-window K and open stall episodes.",
            overrides=[unit_override("stalled cascades", "short")]),
        table("Cascade snapshots: structural virality", [ch(f"""
            SELECT root AS seed, size AS cascade_size, max_depth AS deepest, virality AS structural_virality,
                   revenue AS revenue_attributed, rewards AS rewards_paid,
                   if(binds + fraud = 0, 0, fraud / (binds + fraud)) AS fraud_rate,
                   toDateTime(intDiv(last_bind_ts, 1000)) AS last_bind
            FROM (
                SELECT root, size, max_depth, virality, revenue, rewards, binds, fraud, last_bind_ts
                FROM cascade_snapshots
                WHERE {CAMPAIGN} AND snapshot_ts <= {TO_MS}
                ORDER BY root, snapshot_ts DESC, written_at DESC
                LIMIT 1 BY root
            )
            ORDER BY cascade_size DESC, seed
            LIMIT 50
        """)], w=12, h=10,
            description="Each cascade's latest snapshot up to the end of the range (cascade agent). Structural "
                        "virality = mean shortest-path distance over all node pairs (Goel et al. 2016): about 2 "
                        "for a broadcast (one seed, many direct binds), large for long person-to-person chains. "
                        "Fraud rate = fraud rejections / (binds + fraud rejections) of its members.",
            overrides=[{"matcher": {"id": "byName", "options": "structural_virality"},
                        "properties": [{"id": "decimals", "value": 2}]},
                       unit_override("fraud_rate", "percentunit"),
                       {"matcher": {"id": "byName", "options": "seed"},
                        "properties": [{"id": "links", "value": seed_link}]}]),
        timeseries("Structural virality over time (${seed}; the largest when All)", [ch(f"""
            SELECT toDateTime(intDiv(snapshot_ts, 1000)) AS time, virality AS structural_virality,
                   toFloat64(size) AS cascade_size
            FROM (
                SELECT snapshot_ts, virality, size
                FROM cascade_snapshots
                WHERE {CAMPAIGN} AND root = {SELECTED_ROOT}
                  AND snapshot_ts >= toUInt64(toUInt32($__fromTime)) * 1000 AND snapshot_ts <= {TO_MS}
                ORDER BY snapshot_ts, written_at DESC
                LIMIT 1 BY snapshot_ts
            )
            ORDER BY time
        """, TIME_SERIES)], w=12, h=10, unit="none",
            description="One cascade's structural virality (left axis) and size (right axis) at each snapshot.",
            overrides=[{"matcher": {"id": "byName", "options": "cascade_size"},
                        "properties": [{"id": "custom.axisPlacement", "value": "right"}]}]),
    ]


# -- Operations -----------------------------------------------------------------------------------------------


def quantiles(metric: str, by: str = "") -> list[dict]:
    extra = f", {by}" if by else ""
    legend = f" {{{{{by}}}}}" if by else ""
    return [
        prom(f"histogram_quantile(0.5, sum by (le{extra}) (rate({metric}_bucket[$__rate_interval])))",
             f"p50{legend}", "A"),
        prom(f"histogram_quantile(0.99, sum by (le{extra}) (rate({metric}_bucket[$__rate_interval])))",
             f"p99{legend}", "B"),
    ]


def operations_panels() -> list[dict]:
    return [
        timeseries("Throughput by outcome", [
            prom("sum by (outcome) (rate(fission_events_total[$__rate_interval]))", "{{outcome}}"),
        ], w=8, unit="ops", stacked=True, description="Events processed per second by every worker."),
        timeseries("Credits by kind (${campaign})", [
            prom('sum by (kind) (rate(fission_credits_total{campaign="${campaign}"}[$__rate_interval]))', "{{kind}}"),
        ], w=8, unit="ops", stacked=True, description="Ledger entries made per second."),
        timeseries("Consumer lag by partition", [
            prom("max by (partition) (fission_consumer_lag)", "partition {{partition}}"),
        ], w=8, description="Messages behind the end of each input partition."),
        timeseries("Event → credit latency", quantiles("fission_event_to_credit_seconds"), w=8, unit="s",
                   description="Event time to credit visible in the store (histogram quantiles)."),
        timeseries("Batch processing time", quantiles("fission_batch_seconds"), w=8, unit="s",
                   description="Time to process and commit one batch."),
        timeseries("Batch size and store round trips", [
            prom("sum(rate(fission_batch_size_sum[$__rate_interval])) / sum(rate(fission_batch_size_count"
                 "[$__rate_interval]))", "events per batch", "A"),
            prom("histogram_quantile(0.99, sum by (le) (rate(fission_fetch_rounds_bucket[$__rate_interval])))",
                 "store round trips p99", "B"),
        ], w=8, description="Mean events per batch; round trips to the store a batch needed (p99)."),
        timeseries("Dead letters by reason", [
            prom("sum by (reason) (rate(fission_dead_letters_total[$__rate_interval]))", "{{reason}}"),
        ], w=8, unit="ops", stacked=True, description="Rejected events sent to the dead-letter topic, per second."),
        timeseries("Waiting events by partition", [
            prom("sum by (partition) (fission_waiting_events)", "partition {{partition}}"),
        ], w=8, description="Scans and group purchases waiting for a share not recorded yet (SPEC 4.8)."),
        timeseries("Workers: partitions, store errors, budget cuts", [
            prom("fission_assigned_partitions", "partitions {{instance}}", "A"),
            prom("sum by (kind) (rate(fission_store_errors_total[$__rate_interval]))", "store errors {{kind}}", "B"),
            prom('sum(rate(fission_budget_exhausted_total{campaign="${campaign}"}[$__rate_interval]))',
                 "budget cuts/s", "C"),
        ], w=8, description="Partitions each worker owns; store failures (retried); credits cut by the budget."),
        timeseries("ClickHouse sink: buffer and health", [
            prom("sum by (instance) (fission_sink_buffered_rows)", "buffered rows {{instance}}", "A"),
            prom("min by (instance) (fission_sink_healthy)", "healthy {{instance}}", "B"),
            prom("sum(rate(fission_sink_backpressure_total[$__rate_interval]))", "backpressure/s", "C"),
        ], w=8, description="Rows waiting for an insert; 1 if the last insert succeeded; refused add() calls.",
            overrides=[unit_override("/healthy.*/", "bool")]),
        timeseries("ClickHouse sink: rows inserted", [
            prom("sum by (table) (rate(fission_sink_rows_inserted_total[$__rate_interval]))", "{{table}}", "A"),
            prom("sum by (table) (rate(fission_sink_duplicate_rows_skipped_total[$__rate_interval]))",
                 "duplicates skipped {{table}}", "B"),
            prom("sum by (table) (rate(fission_sink_insert_failures_total[$__rate_interval]))",
                 "failures {{table}}", "C"),
        ], w=8, unit="rps", description="Rows per second into ClickHouse; redelivered rows not inserted again."),
        timeseries("ClickHouse insert latency", quantiles("fission_sink_insert_seconds", "table"), w=8, unit="s",
                   description="Latency of one columnar insert, by table."),
        timeseries("Event → aggregate visible (ClickHouse)", [ch(f"""
            SELECT toDateTime(intDiv(toUInt32(event_time), {STEP}) * {STEP}) AS time,
                   quantile(0.5)(greatest(0, toInt64(inserted_at) - toInt64(event_time))) AS p50,
                   quantile(0.99)(greatest(0, toInt64(inserted_at) - toInt64(event_time))) AS p99
            FROM outcomes
            WHERE {CAMPAIGN} AND $__timeFilter(event_time)
            GROUP BY time
            ORDER BY time
        """, TIME_SERIES)], w=12, unit="s",
            description="Seconds from event time to the row landing in ClickHouse (whole seconds; the views are "
                        "fed by the same insert). Backfills and replays show as large values."),
        table("ClickHouse tables", [ch("""
            SELECT table, sum(rows) AS table_rows, sum(bytes_on_disk) AS disk_bytes, count() AS active_parts,
                   max(modification_time) AS last_change
            FROM system.parts
            WHERE active AND database = currentDatabase()
            GROUP BY table
            ORDER BY table
        """)], w=12, h=8, overrides=[unit_override("disk_bytes", "bytes")],
            description="Rows, size and active parts of the fission tables (many parts = inserts too small)."),
    ]


# -- Fraud ----------------------------------------------------------------------------------------------------


def fraud_panels() -> list[dict]:
    return [
        stat("Fraud in range", [ch(f"""
            SELECT countMergeIf(events, outcome = 'rejected' AND reason IN ('self_referral', 'device_limit'))
                       AS fraud_rejections,
                   countMergeIf(events, type = 'scan') AS scans,
                   if(scans = 0, 0, fraud_rejections / scans) AS fraud_share_of_scans
            FROM campaign_minute
            WHERE {CAMPAIGN} AND $__timeFilter(minute)
        """)], w=12, description="Self-referrals and device-limit rejections, and their share of all scans.",
            overrides=[unit_override("fraud_share_of_scans", "percentunit")]),
        stat("Fraud by reason", [ch(f"""
            SELECT countIf(reason = 'self_referral') AS self_referrals,
                   countIf(reason = 'device_limit') AS device_limit,
                   uniqExact(user_id) AS offenders
            FROM fraud
            WHERE {CAMPAIGN} AND {SEED} AND $__timeFilter(event_time)
        """)], w=12, description="From the fraud table (kept for review, SPEC 4.7). With a seed selected, only "
                                 "fraud inside that cascade (a device-limit scan of a newcomer has no cascade)."),
        timeseries("Rejections by reason", [ch(f"""
            SELECT {BUCKET} AS time, reason, countMerge(events) AS rejections
            FROM campaign_minute
            WHERE {CAMPAIGN} AND outcome = 'rejected' AND $__timeFilter(minute)
            GROUP BY time, reason
            ORDER BY time
        """, TIME_SERIES)], bars=True, stacked=True, w=12, description="Every rejection reason, per interval."),
        panel("piechart", "Rejections by reason (range)", [ch(f"""
            SELECT reason, countMerge(events) AS rejections
            FROM campaign_minute
            WHERE {CAMPAIGN} AND outcome = 'rejected' AND $__timeFilter(minute)
            GROUP BY reason
            ORDER BY rejections DESC
        """)], w=6, h=8, options={"reduceOptions": {"calcs": ["sum"], "fields": "", "values": True},
                                  "pieType": "donut", "displayLabels": ["name", "percent"],
                                  "legend": {"displayMode": "list", "placement": "right", "showLegend": True}}),
        timeseries("Live rejections (Prometheus)", [
            prom('sum by (reason) (rate(fission_events_total{outcome="rejected"}[$__rate_interval]))', "{{reason}}"),
        ], w=6, h=8, unit="ops", stacked=True, description="All campaigns, per second, from the workers."),
        timeseries("Device-limit rejections", [ch(f"""
            SELECT {BUCKET} AS time, count() AS device_limit_rejections, uniqExact(user_id) AS accounts
            FROM (SELECT user_id, toDateTime(toStartOfMinute(event_time)) AS minute FROM fraud
                  WHERE {CAMPAIGN} AND reason = 'device_limit' AND $__timeFilter(event_time))
            GROUP BY time
            ORDER BY time
        """, TIME_SERIES)], bars=True, w=12,
            description="Scans refused because their device already bound max_binds_per_device users (device "
                        "farms), and the distinct accounts behind them."),
        table("Self-referrals", [ch(f"""
            SELECT user_id AS sharer, root AS seed, count() AS attempts,
                   min(event_time) AS first_seen, max(event_time) AS last_seen
            FROM fraud
            WHERE {CAMPAIGN} AND reason = 'self_referral' AND {SEED} AND $__timeFilter(event_time)
            GROUP BY user_id, root
            ORDER BY attempts DESC, sharer, seed
            LIMIT 100
        """)], w=12, description="Users who scanned their own share, with the cascade they belong to."),
        table("Top offenders", [ch(f"""
            SELECT user_id AS offender,
                   countIf(reason = 'self_referral') AS self_referrals,
                   countIf(reason = 'device_limit') AS device_limit,
                   count() AS total, max(event_time) AS last_seen, max(root) AS seed
            FROM fraud
            WHERE {CAMPAIGN} AND {SEED} AND $__timeFilter(event_time)
            GROUP BY user_id
            ORDER BY total DESC, offender
            LIMIT 50
        """)], w=12),
        table("Fraud by cascade", [ch(f"""
            SELECT root AS seed, count() AS fraud_rejections, uniqExact(user_id) AS offenders,
                   countIf(reason = 'self_referral') AS self_referrals
            FROM fraud
            WHERE {CAMPAIGN} AND root != '' AND $__timeFilter(event_time)
            GROUP BY root
            ORDER BY fraud_rejections DESC, seed
            LIMIT 50
        """)], w=12, description="Cascades whose members were rejected for fraud."),
    ]


# -- dashboards -----------------------------------------------------------------------------------------------


def layout(panels: list[dict]) -> list[dict]:
    """Give panels ids and flow them left to right, top to bottom, on Grafana's 24-column grid."""
    x = y = row_h = 0
    for number, found in enumerate(panels, start=1):
        pos = found["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        pos.update(x=x, y=y)
        x += pos["w"]
        row_h = max(row_h, pos["h"])
        found["id"] = number
    return panels


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict],
              time_from: str = "now-24h") -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["fission"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "links": [{"title": "fission", "type": "dashboards", "tags": ["fission"], "asDropdown": True,
                   "includeVars": True, "keepTime": True}],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables},
        "panels": layout(panels),
    }


def dashboards() -> dict[str, dict]:
    common = [CAMPAIGN_VAR, SEED_VAR]
    return {
        "campaign.json": dashboard(
            "fission-campaign", "fission · Campaign",
            "Traffic, binds, K-factor, rewards against the budget and return on rewards of one campaign.",
            campaign_panels(), [*common, BUDGET_VAR, K_WINDOW_VAR], "now-7d"),
        "cascades.json": dashboard(
            "fission-cascades", "fission · Cascades",
            "Referral cascades: depth distribution, generation ratios, seed leaderboard, one cascade's tree, "
            "structural virality and stalled cascades.", cascades_panels(), common, "now-7d"),
        "operations.json": dashboard(
            "fission-operations", "fission · Operations",
            "Workers and sink: throughput, consumer lag, latency, dead letters, waiting events, ClickHouse.",
            operations_panels(), common, "now-1h"),
        "fraud.json": dashboard(
            "fission-fraud", "fission · Fraud",
            "Rejections by reason, device farms, self-referrals and top offenders (SPEC 4.7).",
            fraud_panels(), common, "now-7d"),
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, doc in dashboards().items():
        (OUT / name).write_text(render(doc), encoding="utf-8")
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
