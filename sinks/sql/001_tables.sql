-- Raw tables. Valid on ClickHouse 18.16 (the Debian server) and on current ClickHouse (chDB):
-- no Nullable (null ids are '' and a null depth is -1, so every column can sit in a sorting key),
-- no DateTime64 (ts is epoch ms in UInt64; event_time is whole seconds for partitions and dashboards),
-- no LowCardinality, no insert deduplication tokens.
-- Every table is a ReplacingMergeTree on its row id: the sink filters redelivered rows before they
-- are inserted (see sinks/clickhouse.py), and a duplicate that still slips through collapses on merge
-- (read with FINAL or argMax for exact raw counts).
-- `{db}` is replaced by the database name. Statements end with `;` at the end of a line.

CREATE TABLE IF NOT EXISTS {db}.outcomes
(
    outcome_id String,
    event_id String,
    campaign String,
    type String,
    user_id String,
    outcome String,
    reason String,
    parent String,
    root String,
    depth Int32,
    ts UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(ts, 1000)),
    partition UInt32,
    offset Int64,
    amount Int64,
    budget_cut Int64,
    detail String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (campaign, outcome_id);

CREATE TABLE IF NOT EXISTS {db}.ledger
(
    entry_id String,
    campaign String,
    beneficiary String,
    amount Int64,
    kind String,
    level UInt8,
    source_event_id String,
    source_user String,
    root String,
    ts UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(ts, 1000)),
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (campaign, beneficiary, entry_id);

-- One row per state a (campaign, user) has been in; the highest version is the current state.
CREATE TABLE IF NOT EXISTS {db}.nodes
(
    campaign String,
    user_id String,
    state String,
    parent String,
    root String,
    depth Int32,
    entered_at UInt64,
    entered_time DateTime DEFAULT toDateTime(intDiv(entered_at, 1000)),
    version UInt64,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (campaign, user_id);

-- Stalled-cascade alerts: one row per transition ('firing' / 'resolved') of an alert episode.
CREATE TABLE IF NOT EXISTS {db}.alerts
(
    campaign String,
    root String,
    kind String,
    state String,
    ts UInt64,
    event_time DateTime DEFAULT toDateTime(intDiv(ts, 1000)),
    detail String,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (campaign, kind, root, ts, state);
