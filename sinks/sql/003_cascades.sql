-- Cascade snapshots, written by `fission cascades` (stream/cascades.py) every snapshot interval: one row per
-- cascade that changed since the previous snapshot, stamped with its campaign's event-time watermark
-- (snapshot_ts, epoch ms), so the history of a cascade is a time series and its latest row is its state.
-- Same limits as 001 (ClickHouse 18.16 and chDB): no Nullable (a cascade without binds has last_bind_ts 0),
-- no DateTime64, no LowCardinality. Rows of one cascade at one watermark (late events, a restart writing the
-- rebuilt state again) collapse on merge to the one written last (written_at, processing time in ms), and
-- readers take the latest written row per cascade: it holds the most complete state.
-- revenue = attributed purchase amounts (gross of refunds); rewards = positive credits; clawbacks = reversed
-- credits as a positive number; fraud = self_referral and device_limit rejections of the cascade's members.
CREATE TABLE IF NOT EXISTS {db}.cascade_snapshots
(
    campaign String,
    root String,
    size UInt64,
    max_depth Int32,
    binds UInt64,
    revenue Int64,
    rewards Int64,
    clawbacks Int64,
    fraud UInt64,
    virality Float64,
    last_bind_ts UInt64,
    snapshot_ts UInt64,
    written_at UInt64,
    snapshot_time DateTime DEFAULT toDateTime(intDiv(snapshot_ts, 1000)),
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(snapshot_time)
ORDER BY (campaign, root, snapshot_ts);

-- The latest snapshot of every cascade: the seed leaderboard is one query on it, e.g.
--   SELECT root, size, max_depth, revenue, rewards, if(binds + fraud = 0, 0, fraud / (binds + fraud)) AS fraud_rate
--   FROM {db}.cascade_latest WHERE campaign = 'spring-red-packet' ORDER BY size DESC LIMIT 10
CREATE VIEW IF NOT EXISTS {db}.cascade_latest AS
SELECT campaign, root, size, max_depth, binds, revenue, rewards, clawbacks, fraud, virality, last_bind_ts, snapshot_ts
FROM {db}.cascade_snapshots
ORDER BY campaign, root, written_at DESC
LIMIT 1 BY campaign, root;
