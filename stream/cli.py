"""The `fission` command line."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson

from attribution.campaigns import ConfigError, load_campaigns
from attribution.engine import Engine
from attribution.store import EmbeddedStore, Store
from stream.settings import Settings, load_settings


def open_store(settings: Settings) -> Store:
    """The store the settings name: `embedded` (in process) or `redis`."""
    if settings.store == "embedded":
        return EmbeddedStore()
    if settings.store == "redis":
        from attribution.redis_store import RedisStore

        return RedisStore.from_url(settings.redis_url, prefix=settings.redis_prefix, buckets=settings.redis_buckets)
    raise ConfigError(f"store: {settings.store!r} is not one of embedded, redis")


def _progress(total: int, label: str):
    """A rich progress bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn(label), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task(label, total=total)
    return bar, lambda done: bar.update(task, completed=done)


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.replay import file_size, replay

    settings = load_settings(args.config, campaigns=args.campaigns, store=args.store,
                             redis_url=args.redis_url, redis_prefix=args.redis_prefix)
    if settings.store == "redis" and args.redis_prefix is None:
        # A replay starts from empty state: state left by an earlier run would make its events duplicates.
        settings = replace(settings, redis_prefix=f"{settings.redis_prefix}-replay-{uuid.uuid4().hex[:8]}")
    engine = Engine(load_campaigns(settings.campaigns), open_store(settings), settings.engine())
    bar, update = _progress(file_size(args.events), "replay")
    if bar:
        with bar:
            summary = replay(engine, args.events, args.out, update)
    else:
        summary = replay(engine, args.events, args.out)
    print(
        f"replayed {summary.events} events: {summary.outcomes} outcomes, {summary.entries} ledger entries, "
        f"{summary.nodes} nodes, {summary.dead_letters} dead letters -> {args.out}",
        file=sys.stderr,
    )
    if settings.store == "redis":
        print(f"state in Redis under prefix {settings.redis_prefix!r} "
              f"(fission balances --store redis --redis-prefix {settings.redis_prefix})", file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from stream.simulate import SimulationParams, campaign_config, simulate, write_jsonl

    params = SimulationParams(campaign=args.campaign, seed=args.seed, seeds=args.seeds, target_k=args.k,
                              max_events=args.events, bad_rate=args.bad_rate, duplicate_rate=args.duplicate_rate)
    if args.campaigns_out:
        Path(args.campaigns_out).write_bytes(orjson.dumps(campaign_config(params), option=orjson.OPT_INDENT_2))
    events = list(simulate(params))
    if args.out:
        write_jsonl(args.out, events)
        print(f"simulated {len(events)} events of campaign {params.campaign} -> {args.out}", file=sys.stderr)
    if args.kafka:
        from stream.produce import produce
        from stream.topics import ensure_topics

        settings = load_settings(args.config, kafka_bootstrap=args.bootstrap, topic_prefix=args.topic_prefix,
                                 partitions=args.partitions)
        ensure_topics(settings.kafka_bootstrap, settings.topics(), settings.partitions, settings.replication)
        topic = settings.topics().events
        bar, update = _progress(len(events), f"produce -> {topic}")
        if bar:
            with bar:
                sent = produce(settings.kafka_bootstrap, topic, events, args.rate, update)
        else:
            sent = produce(settings.kafka_bootstrap, topic, events, args.rate)
        print(f"produced {sent} events to {topic} at {settings.kafka_bootstrap}", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.logs import configure_logging
    from stream.worker import run_worker

    configure_logging(args.log_level)
    settings = load_settings(args.config, campaigns=args.campaigns, kafka_bootstrap=args.bootstrap,
                             redis_url=args.redis_url, redis_prefix=args.redis_prefix,
                             topic_prefix=args.topic_prefix, metrics_port=args.metrics_port,
                             partitions=args.partitions, app_id=args.app_id)
    run_worker(settings, load_campaigns(settings.campaigns), until_idle=args.until_idle, loglevel=args.log_level)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.clickhouse import migrate, open_backend

    settings = load_settings(args.config, clickhouse_url=args.clickhouse_url, clickhouse_database=args.database)
    applied = migrate(open_backend(settings.clickhouse_url), settings.clickhouse_database)
    print(f"applied migrations {applied or 'none (up to date)'} to {settings.clickhouse_database}", file=sys.stderr)
    return 0


def _migrate_when_up(backend, database: str, migrate) -> bool:
    """ClickHouse may be down when the sink starts: wait for it (Kafka keeps the rows meanwhile)."""
    backoff = 0.5
    while True:
        try:
            migrate(backend, database)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to reach or migrate: retry, say why
            print(f"fission sink: ClickHouse not ready ({exc}); retrying in {backoff:.1f}s", file=sys.stderr)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


def cmd_sink(args: argparse.Namespace) -> int:
    from sinks.clickhouse import ClickHouseSink, migrate, open_backend
    from stream import metrics
    from stream.logs import configure_logging
    from stream.sink import SinkRunner

    configure_logging(args.log_level)
    settings = load_settings(args.config, clickhouse_url=args.clickhouse_url, clickhouse_database=args.database,
                             kafka_bootstrap=args.bootstrap, topic_prefix=args.topic_prefix, app_id=args.app_id,
                             metrics_port=args.metrics_port)
    backend = open_backend(settings.clickhouse_url)
    sink = ClickHouseSink(backend, settings.clickhouse_database)
    migrated = False
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, ready=lambda: migrated and sink.healthy)
    migrated = _migrate_when_up(backend, settings.clickhouse_database, migrate)
    SinkRunner(settings.kafka_bootstrap, settings.topics(), f"{settings.app_id}-sink", sink).run(args.until_idle)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import run_demo

    run_demo(args.out, events=args.events, seed=args.seed, partitions=args.partitions, live=not args.no_live,
             target_k=args.k)
    return 0


def cmd_cascades(args: argparse.Namespace) -> int:
    from stream.cascades import cascade_options, run_cascades
    from stream.logs import configure_logging

    configure_logging(args.log_level)
    settings = load_settings(args.config, clickhouse_url=args.clickhouse_url, clickhouse_database=args.database,
                             kafka_bootstrap=args.bootstrap, topic_prefix=args.topic_prefix, app_id=args.app_id,
                             partitions=args.partitions)
    run_cascades(settings, until_idle=args.until_idle, metrics_port=args.metrics_port,
                 options=cascade_options(settings, clickhouse=not args.no_clickhouse), loglevel=args.log_level)
    return 0


def cmd_balances(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, store=args.store, redis_url=args.redis_url, redis_prefix=args.redis_prefix)
    balances = open_store(settings).balances(args.campaign)
    if args.json:
        print(orjson.dumps(balances, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        return 0
    for campaign, by_user in sorted(balances.items()):
        for user, amount in sorted(by_user.items()):
            print(f"{campaign}\t{user}\t{amount}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, campaigns=args.campaigns)
    campaigns = load_campaigns(settings.campaigns)
    for campaign in campaigns.values():
        print(f"{campaign.id}: levels={campaign.levels} budget={campaign.budget} group_buy={bool(campaign.group_buy)}")
    return 0


def _store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", choices=["embedded", "redis"], help="state store (default: settings)")
    parser.add_argument("--redis-url", help="Redis URL (default: FISSION_REDIS_URL)")
    parser.add_argument("--redis-prefix", help="prefix of every Redis key (default: fx)")


def _kafka_flags(parser: argparse.ArgumentParser, app_id_help: str) -> None:
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: FISSION_KAFKA_BOOTSTRAP)")
    parser.add_argument("--topic-prefix", help="topic names are PREFIX.events, ... (default: referral)")
    parser.add_argument("--app-id", help=f"{app_id_help} (default: fission-attribution)")


def _clickhouse_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clickhouse-url", help="clickhouse://host:port/db, or chdb://PATH for the embedded engine")
    parser.add_argument("--database", help="database name (default: fission)")


def _process_flags(parser: argparse.ArgumentParser, until_idle_help: str) -> None:
    """What every long-running process takes: metrics, a way to stop when the input is done, logs."""
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /health, /ready on this port")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS", help=until_idle_help)
    parser.add_argument("--log-level", default="info", help="log level (default: info)")


PARTITIONS_HELP = "partitions of topics it creates (default: 6)"
IDLE_HELP = "exit after this long without input"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fission", description="Real-time referral attribution.")
    parser.add_argument("--config", help="settings YAML (default: FISSION_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="simulate a campaign and watch it run (no servers needed)",
                               description="Simulate a viral campaign, run it through the embedded runner with "
                               "the embedded store and chDB, show a live dashboard, and write an HTML report.")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (default: out/demo)")
    demo.add_argument("--events", type=int, default=40_000, help="events to simulate (default 40000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument("--k", type=float, default=1.3, help="target binds per sharer (default 1.3)")
    demo.add_argument("--partitions", type=int, default=4, help="partitions of the in-process log (default 4)")
    demo.add_argument("--no-live", action="store_true", help="no live dashboard, progress lines only")
    demo.set_defaults(run=cmd_demo)

    replay = commands.add_parser("replay", help="run the engine over a JSONL file of events",
                                 description="Run the engine over EVENTS (JSONL) and write ledger.jsonl, "
                                 "outcomes.jsonl, nodes.jsonl and balances.json into --out.")
    replay.add_argument("events", type=Path, help="JSONL file, one event per line")
    replay.add_argument("--campaigns", help="campaigns YAML (default: settings)")
    replay.add_argument("--out", type=Path, required=True, help="output directory")
    replay.add_argument("--store", choices=["embedded", "redis"], help="state store (default: settings)")
    replay.add_argument("--redis-url", help="Redis URL (default: FISSION_REDIS_URL)")
    replay.add_argument("--redis-prefix", help="prefix of the replay's Redis keys (default: a fresh one per run, "
                        "printed at the end; a given prefix continues from the state already under it)")
    replay.set_defaults(run=cmd_replay)

    simulate = commands.add_parser("simulate", help="simulate a viral campaign into a JSONL file",
                                   description="Generate a realistic viral campaign (seeds, a branching "
                                   "process with target K, purchases, refunds, fraud, bad events).")
    simulate.add_argument("--out", type=Path, help="JSONL file to write")
    simulate.add_argument("--kafka", action="store_true", help="also produce the events to the input topic")
    simulate.add_argument("--rate", type=float, help="events per second when producing (default: as fast as possible)")
    simulate.add_argument("--bootstrap", help="Kafka bootstrap servers (default: FISSION_KAFKA_BOOTSTRAP)")
    simulate.add_argument("--topic-prefix", help="topic names are PREFIX.events, ... (default: referral)")
    simulate.add_argument("--partitions", type=int, help=PARTITIONS_HELP)
    simulate.add_argument("--campaigns-out", type=Path, help="also write a matching campaigns file")
    simulate.add_argument("--events", type=int, default=20_000, help="number of events (default 20000)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    simulate.add_argument("--seeds", type=int, default=20, help="seed users: KOLs, fans, staff (default 20)")
    simulate.add_argument("--k", type=float, default=1.3, help="target binds per sharer (default 1.3)")
    simulate.add_argument("--campaign", default="spring-red-packet", help="campaign id")
    simulate.add_argument("--bad-rate", type=float, default=0.01, help="share of malformed events (default 0.01)")
    simulate.add_argument("--duplicate-rate", type=float, default=0.01, help="share of redeliveries (default 0.01)")
    simulate.set_defaults(run=cmd_simulate)

    worker = commands.add_parser("worker", help="run the streaming worker (Faust on Kafka, Redis state)",
                                 description="Consume PREFIX.events, attribute in batches, publish outcomes, "
                                 "rewards, nodes and dead letters, commit state and positions in Redis.")
    worker.add_argument("--campaigns", help="campaigns YAML (default: settings)")
    _kafka_flags(worker, "Faust app id = consumer group")
    worker.add_argument("--partitions", type=int, help=PARTITIONS_HELP)
    _process_flags(worker, "after this long without input, treat the input as ended: end the remaining waits "
                   "as replay does, then exit")
    worker.add_argument("--redis-url", help="Redis URL (default: FISSION_REDIS_URL)")
    worker.add_argument("--redis-prefix", help="prefix of every Redis key (default: fx)")
    worker.set_defaults(run=cmd_worker)

    migrate = commands.add_parser("migrate", help="create or upgrade the ClickHouse schema",
                                  description="Apply the schema migrations (sinks/sql) not applied yet.")
    _clickhouse_flags(migrate)
    migrate.set_defaults(run=cmd_migrate)

    sink = commands.add_parser("sink", help="write the output topics into ClickHouse",
                               description="Consume outcomes, rewards and nodes into ClickHouse, idempotently; "
                               "commits Kafka offsets only after ClickHouse took the rows.")
    _clickhouse_flags(sink)
    _kafka_flags(sink, "consumer group is APP_ID-sink")
    _process_flags(sink, IDLE_HELP)
    sink.set_defaults(run=cmd_sink)

    cascades = commands.add_parser("cascades", help="run the cascade agent (analytics and stall alerts)",
                                   description="Repartition outcomes and rewards by cascade root; keep size, depth, "
                                   "K, structural virality per cascade; alert on stalled cascades and K < 1.")
    _kafka_flags(cascades, "the agent's app id is APP_ID-cascades")
    cascades.add_argument("--partitions", type=int, help=PARTITIONS_HELP)
    _clickhouse_flags(cascades)
    cascades.add_argument("--no-clickhouse", action="store_true", help="alerts to Kafka and metrics only")
    _process_flags(cascades, IDLE_HELP)
    cascades.set_defaults(run=cmd_cascades)

    balances = commands.add_parser("balances", help="show balances from the configured store",
                                   description="Print balances (campaign, beneficiary, amount).")
    balances.add_argument("--campaign", help="only this campaign")
    balances.add_argument("--json", action="store_true", help="print JSON")
    _store_flags(balances)
    balances.set_defaults(run=cmd_balances)

    check = commands.add_parser("check-config", help="validate a campaigns file",
                                description="Load and validate the campaigns file; exit 2 on errors.")
    check.add_argument("--campaigns", help="campaigns YAML (default: settings)")
    check.set_defaults(run=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"fission: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
