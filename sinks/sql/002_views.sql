-- Materialized views: per-minute aggregate states, fed only by the rows the sink actually inserts
-- (it drops redelivered rows first), so every count lands once.
-- Read them with the -Merge functions and a GROUP BY, never the raw state columns, e.g.
--   SELECT campaign, countMerge(events) FROM {db}.campaign_minute WHERE outcome = 'bound' GROUP BY campaign
-- Views compute the minute from ts rather than from the event_time DEFAULT column, so they do not
-- depend on whether a server fills defaults before or after pushing a block to its views.
-- State columns are named apart from source columns (amount_sum, not amount) so a reader never
-- mistakes a state for a value; clickhouse-driver cannot even decode a raw state column.

-- Per campaign: events by type, outcome and reason; distinct actors (per (type, outcome): the
-- sharers are the users of type 'share', outcome 'shared'); amounts (attributed revenue is the
-- amount of 'purchase_attributed'); credits cut by the budget.
CREATE TABLE IF NOT EXISTS {db}.campaign_minute
(
    campaign String,
    minute DateTime,
    type String,
    outcome String,
    reason String,
    events AggregateFunction(count),
    users AggregateFunction(uniq, String),
    amount_sum AggregateFunction(sum, Int64),
    budget_cut_sum AggregateFunction(sum, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (campaign, minute, type, outcome, reason);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.campaign_minute_mv TO {db}.campaign_minute AS
SELECT
    campaign,
    toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute,
    type,
    outcome,
    reason,
    countState() AS events,
    uniqState(user_id) AS users,
    sumState(amount) AS amount_sum,
    sumState(budget_cut) AS budget_cut_sum
FROM {db}.outcomes
GROUP BY campaign, minute, type, outcome, reason;

-- Per campaign: credits by kind and level. paid = positive amounts, clawed_back = reversed amounts
-- (as a positive number), so rewards net of refunds = paid - clawed_back.
CREATE TABLE IF NOT EXISTS {db}.ledger_minute
(
    campaign String,
    minute DateTime,
    kind String,
    level UInt8,
    entries AggregateFunction(count),
    beneficiaries AggregateFunction(uniq, String),
    paid AggregateFunction(sum, Int64),
    clawed_back AggregateFunction(sum, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (campaign, minute, kind, level);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ledger_minute_mv TO {db}.ledger_minute AS
SELECT
    campaign,
    toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute,
    kind,
    level,
    countState() AS entries,
    uniqState(beneficiary) AS beneficiaries,
    sumState(if(amount > 0, amount, toInt64(0))) AS paid,
    sumState(if(amount < 0, -amount, toInt64(0))) AS clawed_back
FROM {db}.ledger
GROUP BY campaign, minute, kind, level;

-- Per cascade (root): binds (size = binds + 1 for the seed), deepest actor, attributed purchases
-- and revenue. Rewards per cascade come from the ledger (cascade_rewards_minute).
CREATE TABLE IF NOT EXISTS {db}.cascade_minute
(
    campaign String,
    root String,
    minute DateTime,
    binds AggregateFunction(sum, UInt64),
    max_depth AggregateFunction(max, Int32),
    purchases AggregateFunction(sum, UInt64),
    revenue AggregateFunction(sum, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (campaign, root, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.cascade_minute_mv TO {db}.cascade_minute AS
SELECT
    campaign,
    root,
    toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute,
    sumState(toUInt64(outcome = 'bound')) AS binds,
    maxState(depth) AS max_depth,
    sumState(toUInt64(outcome = 'purchase_attributed')) AS purchases,
    sumState(if(outcome = 'purchase_attributed', amount, toInt64(0))) AS revenue
FROM {db}.outcomes
WHERE root != ''
GROUP BY campaign, root, minute;

CREATE TABLE IF NOT EXISTS {db}.cascade_rewards_minute
(
    campaign String,
    root String,
    minute DateTime,
    paid AggregateFunction(sum, Int64),
    clawed_back AggregateFunction(sum, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (campaign, root, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.cascade_rewards_minute_mv TO {db}.cascade_rewards_minute AS
SELECT
    campaign,
    root,
    toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute,
    sumState(if(amount > 0, amount, toInt64(0))) AS paid,
    sumState(if(amount < 0, -amount, toInt64(0))) AS clawed_back
FROM {db}.ledger
WHERE root != ''
GROUP BY campaign, root, minute;

-- Per depth: binds landing at each depth, and the distinct sharers at each depth (depth 0 sharers
-- are the seeds), for generation ratios R_d = binds at d+1 / nodes at d (SPEC 6).
CREATE TABLE IF NOT EXISTS {db}.depth_minute
(
    campaign String,
    depth Int32,
    outcome String,
    minute DateTime,
    events AggregateFunction(count),
    users AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (campaign, depth, outcome, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.depth_minute_mv TO {db}.depth_minute AS
SELECT
    campaign,
    depth,
    outcome,
    toStartOfMinute(toDateTime(intDiv(ts, 1000))) AS minute,
    countState() AS events,
    uniqState(user_id) AS users
FROM {db}.outcomes
WHERE outcome IN ('bound', 'shared')
GROUP BY campaign, depth, outcome, minute;

-- Fraud rejections kept for review (SPEC 4.7), with their lineage and detail.
CREATE TABLE IF NOT EXISTS {db}.fraud
(
    outcome_id String,
    event_id String,
    campaign String,
    type String,
    user_id String,
    reason String,
    parent String,
    root String,
    ts UInt64,
    event_time DateTime,
    partition UInt32,
    offset Int64,
    detail String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(event_time)
ORDER BY (campaign, reason, outcome_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fraud_mv TO {db}.fraud AS
SELECT
    outcome_id,
    event_id,
    campaign,
    type,
    user_id,
    reason,
    parent,
    root,
    ts,
    toDateTime(intDiv(ts, 1000)) AS event_time,
    partition,
    offset,
    detail
FROM {db}.outcomes
WHERE outcome = 'rejected' AND reason IN ('self_referral', 'device_limit');
