"""ClickHouse sink: batched columnar inserts of outcomes, ledger entries and nodes, idempotent on redelivery.

Backends. One schema (``sinks/sql/*.sql``) runs on two engines: ``ServerBackend`` speaks the native
protocol to a ClickHouse server (clickhouse-driver, columnar inserts) and ``ChdbBackend`` runs chDB,
the embedded engine, for the zero-install path. The SQL stays within ClickHouse 18.16 (Debian's server).

Why the sink deduplicates by itself. The engine emits a batch's outputs *before* it commits the batch,
so after a crash the uncommitted batches run again and their rows arrive a second time, with the same
ids. Newer servers could drop such a repeated insert by a deduplication token; 18.16 cannot
(non-replicated MergeTree has no insert deduplication), and a repeated row would be counted twice by
every materialized view, which a ReplacingMergeTree never corrects (aggregate states merge, they do
not replace). So rows are filtered *before* they are inserted:

- every row has an id: ``outcome_id``, ``entry_id``, and ``(campaign, user_id, version)`` for nodes;
- the sink keeps the ids it inserted in the last ``dedup_window_s`` seconds in memory (two rotating
  generations, so memory is bounded by the insert rate times twice the window), and drops a row whose id
  is there or already waiting in the buffer (that also removes repeats inside one batch);
- before its first insert, and before the first insert after any failed one, it reloads from ClickHouse
  the ids inserted within ``dedup_window_s`` of the newest ``inserted_at`` of each table. Anchoring at the
  newest row, not at ``now()``, means a lone writer that was down for an hour still finds the rows it wrote
  just before it crashed. Reloading after a failure covers an insert that landed although the client saw
  an error (a timeout, a dropped connection);
- the materialized views see only these filtered inserts, so their aggregates count each row once.

Memory for the ids is about (rows inserted per second, all writers) x 2 x ``dedup_window_s`` x ~100 bytes:
the window need only outlast a commit interval plus a restart or a rebalance, so minutes are plenty.

Limits. A duplicate older than the window (a writer that comes back after more than ``dedup_window_s``
while other writers kept inserting, or a replay of old input) is inserted again: the raw tables, being
ReplacingMergeTrees on the row id, still read right with ``FINAL`` (or ``argMax``), but the aggregates
count it twice. When Kafka partitions move to another worker, call ``resync()`` on the new owner so it
reloads the ids the previous owner wrote. An insert whose rows landed while a view's insert failed leaves
that view short; ClickHouse gives no atomicity across a table and its views.

Buffering and backpressure. ``add()`` only converts and buffers; ``flush()`` inserts. When ClickHouse
is unreachable, ``flush()`` returns False at once, and retries no sooner than an exponential backoff
(capped) allows; nothing ever sleeps except ``drain()``, which a caller uses at shutdown. The buffer is
bounded: an ``add()`` that would exceed ``buffer_limit`` raises ``SinkBackpressure`` and takes none of
its rows, so the caller keeps them and pauses consuming. No row is ever dropped. (A single batch larger
than the limit is still taken by an empty buffer, so the stream cannot wedge.) A row ClickHouse refuses
(a wrong type) fails every retry the same way: the sink stays unhealthy with ``last_error`` saying why,
and backpressure stops the stream instead of losing the row. Buffered rows live in
memory only: a caller commits its input offsets after ``flush()`` returned True, or accepts that a crash
re-emits them, which is harmless by the above.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

SQL_DIR = Path(__file__).with_name("sql")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A node's state only moves forward (unknown -> organic -> seed, or unknown -> seed / bound), and its
# lineage is fixed by the state, so the rank is a version that is the same on every re-run: repeated
# rows of one state share an id and are filtered, and ReplacingMergeTree(version) keeps the latest state.
NODE_VERSION = {"organic": 1, "seed": 2, "bound": 2}


def _metric(kind: type, name: str, doc: str, labels: Sequence[str] = (), **kwargs: Any) -> Any:
    """Register a metric once per process; importing this module again (tests, reloads) reuses it."""
    try:
        return kind(name, doc, labels, **kwargs)
    except ValueError:  # "Duplicated timeseries": the first import registered it
        return REGISTRY._names_to_collectors[name]


ROWS_INSERTED = _metric(Counter, "fission_sink_rows_inserted", "Rows inserted into ClickHouse", ["table"])
DUPLICATES_SKIPPED = _metric(
    Counter, "fission_sink_duplicate_rows_skipped", "Redelivered rows not inserted again", ["table"]
)
INSERT_FAILURES = _metric(Counter, "fission_sink_insert_failures", "Failed inserts (retried later)", ["table"])
BACKPRESSURE = _metric(Counter, "fission_sink_backpressure", "add() calls refused because the buffer is full")
BUFFERED_ROWS = _metric(Gauge, "fission_sink_buffered_rows", "Rows waiting to be inserted", ["database"])
HEALTHY = _metric(Gauge, "fission_sink_healthy", "1 if the last insert attempt succeeded", ["database"])
INSERT_SECONDS = _metric(
    Histogram,
    "fission_sink_insert_seconds",
    "Latency of one columnar insert",
    ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


# -- backends -----------------------------------------------------------------------------------------


class Backend(Protocol):
    """What the sink and migrations need from a ClickHouse engine."""

    def execute(self, sql: str) -> None: ...

    def query(self, sql: str) -> list[tuple]: ...

    def insert(self, table: str, columns: dict[str, Sequence[Any]]) -> None: ...

    def version(self) -> str: ...

    def close(self) -> None: ...


class ServerBackend:
    """A ClickHouse server over the native protocol; an insert is one block sent column by column."""

    def __init__(self, url: str, connect_timeout_s: float = 2.0, send_receive_timeout_s: float = 30.0) -> None:
        from clickhouse_driver import Client  # imported here, like chDB: load only the engine in use

        # Short connect timeout: a down server must fail a flush quickly, not hold the stream.
        parts = urlsplit(url)
        params = {"connect_timeout": str(connect_timeout_s), "send_receive_timeout": str(send_receive_timeout_s)}
        params.update(parse_qsl(parts.query))
        self.url = url
        self.client = Client.from_url(urlunsplit(parts._replace(query=urlencode(params))))

    def execute(self, sql: str) -> None:
        self.client.execute(sql)

    def query(self, sql: str) -> list[tuple]:
        return [tuple(row) for row in self.client.execute(sql)]

    def insert(self, table: str, columns: dict[str, Sequence[Any]]) -> None:
        self.client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", list(columns.values()),
                            columnar=True)

    def version(self) -> str:
        return str(self.client.execute("SELECT version()")[0][0])

    def close(self) -> None:
        self.client.disconnect()


class ChdbBackend:
    """chDB in process. One data path per process (a chDB limit): close it before opening another."""

    def __init__(self, path: str | Path) -> None:
        from chdb.session import Session  # imported here: a server deployment never loads the embedded engine

        self.path = str(path)
        self.session = Session(self.path)
        # 64-bit integers as JSON numbers, so query() returns ints as the server backend does.
        self.session.query("SET output_format_json_quote_64bit_integers = 0")

    def execute(self, sql: str) -> None:
        self.session.query(sql)

    def query(self, sql: str) -> list[tuple]:
        """Rows as tuples; DateTime values come back as strings (cast in SQL where it matters)."""
        data = self.session.query(sql, "JSONCompact").bytes()
        return [tuple(row) for row in orjson.loads(data)["data"]] if data else []

    def insert(self, table: str, columns: dict[str, Sequence[Any]]) -> None:
        # JSONCompactColumns is columnar too: one array per column, encoded by orjson in C (~2M rows/s).
        with self.session.send_insert(f"INSERT INTO {table} ({', '.join(columns)})", "JSONCompactColumns") as ins:
            ins.append(orjson.dumps(list(columns.values())))
            ins.finish()

    def version(self) -> str:
        return str(self.query("SELECT version()")[0][0])

    def close(self) -> None:
        self.session.close()


# -- migrations ---------------------------------------------------------------------------------------


def open_backend(url: str) -> Backend:
    """`chdb://PATH` for the embedded engine, else a server URL (clickhouse://host:port/db)."""
    return ChdbBackend(url.removeprefix("chdb://")) if url.startswith("chdb://") else ServerBackend(url)


def _check_identifier(name: str) -> str:
    """Database names are spliced into SQL, so only plain identifiers are accepted."""
    if not IDENTIFIER.match(name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return name


def migrations() -> list[tuple[int, str, list[str]]]:
    """(version, file name, statements) of every ``sql/NNN_name.sql``, in version order."""
    found = []
    for path in sorted(SQL_DIR.glob("[0-9]*.sql")):
        lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")]
        statements = [s.strip() for s in re.split(r";[ \t]*$", "\n".join(lines), flags=re.M) if s.strip()]
        found.append((int(path.name.split("_", 1)[0]), path.name, statements))
    return found


def migrate(backend: Backend, database: str) -> list[int]:
    """Create ``database`` and apply the migrations it has not recorded; returns the versions applied now.

    Every statement is ``IF NOT EXISTS``, so a run interrupted inside a file is safely re-run.
    Run it from one process (``fission migrate``): concurrent runs are not coordinated.
    """
    db = _check_identifier(database)
    backend.execute(f"CREATE DATABASE IF NOT EXISTS {db}")
    backend.execute(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree() ORDER BY version"
    )
    done = {int(row[0]) for row in backend.query(f"SELECT version FROM {db}.schema_migrations")}
    applied = []
    for version, name, statements in migrations():
        if version in done:
            continue
        for statement in statements:
            backend.execute(statement.replace("{db}", db))
        backend.insert(f"{db}.schema_migrations", {"version": [version], "name": [name]})
        applied.append(version)
    return applied


# -- row conversion -----------------------------------------------------------------------------------


def _outcome_values(row: dict[str, Any]) -> tuple:
    depth, offset = row.get("depth"), row.get("offset")
    return (
        row["outcome_id"], row.get("event_id") or "", row.get("campaign") or "", row.get("type") or "",
        row.get("user_id") or "", row["outcome"], row.get("reason") or "", row.get("parent") or "",
        row.get("root") or "", -1 if depth is None else depth, row.get("ts") or 0, row.get("partition") or 0,
        -1 if offset is None else offset, row.get("amount") or 0,
        sum(cut["amount"] for cut in row.get("budget_exhausted") or ()), row.get("detail") or "",
    )


def _entry_values(row: dict[str, Any]) -> tuple:
    return (
        row["entry_id"], row["campaign"], row["beneficiary"], row["amount"], row["kind"], row.get("level") or 0,
        row["source_event_id"], row["source_user"], row.get("root") or "", row["ts"],
    )


def _node_version(row: dict[str, Any]) -> int:
    version = row.get("version")
    return NODE_VERSION[row["state"]] if version is None else version


def _node_values(row: dict[str, Any]) -> tuple:
    depth = row.get("depth")
    return (
        row["campaign"], row["user_id"], row["state"], row.get("parent") or "", row.get("root") or "",
        -1 if depth is None else depth, row["entered_at"], _node_version(row),
    )


@dataclass(frozen=True)
class TableSpec:
    """How rows of one output become columns of one table, and what identifies a row."""

    name: str
    columns: tuple[str, ...]
    id_columns: tuple[str, ...]
    key: Callable[[dict[str, Any]], Hashable]
    values: Callable[[dict[str, Any]], tuple]


OUTCOMES = TableSpec(
    "outcomes",
    ("outcome_id", "event_id", "campaign", "type", "user_id", "outcome", "reason", "parent", "root", "depth", "ts",
     "partition", "offset", "amount", "budget_cut", "detail"),
    ("outcome_id",),
    lambda row: row["outcome_id"],
    _outcome_values,
)
LEDGER = TableSpec(
    "ledger",
    ("entry_id", "campaign", "beneficiary", "amount", "kind", "level", "source_event_id", "source_user", "root",
     "ts"),
    ("entry_id",),
    lambda row: row["entry_id"],
    _entry_values,
)
NODES = TableSpec(
    "nodes",
    ("campaign", "user_id", "state", "parent", "root", "depth", "entered_at", "version"),
    ("campaign", "user_id", "version"),
    lambda row: (row["campaign"], row["user_id"], _node_version(row)),
    _node_values,
)


# -- the sink -----------------------------------------------------------------------------------------


class SinkBackpressure(Exception):
    """The buffer is full: pause consuming, keep the rows, and add them again after a successful flush."""

    def __init__(self, buffered_rows: int, incoming_rows: int, buffer_limit: int, retry_after_s: float) -> None:
        super().__init__(
            f"ClickHouse sink buffer full: {buffered_rows} buffered + {incoming_rows} new > {buffer_limit}; "
            f"next insert attempt in {retry_after_s:.1f}s"
        )
        self.buffered_rows = buffered_rows
        self.incoming_rows = incoming_rows
        self.buffer_limit = buffer_limit
        self.retry_after_s = retry_after_s


class RecentIds:
    """Ids inserted lately: kept at least ``window_s`` and at most twice that (two rotating generations)."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self.clock = clock
        self.current: set[Hashable] = set()
        self.previous: set[Hashable] = set()
        self.rotated_at = clock()

    def __contains__(self, key: Hashable) -> bool:
        return key in self.current or key in self.previous

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def rotate(self) -> None:
        """Forget the older generation once the newer one has covered a whole window."""
        now = self.clock()
        if now - self.rotated_at >= self.window_s:
            self.previous, self.current = self.current, set()
            self.rotated_at = now

    def update(self, keys: Iterable[Hashable]) -> None:
        self.current.update(keys)

    def replace(self, keys: Iterable[Hashable]) -> None:
        self.previous, self.current = set(), set(keys)
        self.rotated_at = self.clock()


@dataclass
class _Buffer:
    """Rows of one table waiting for an insert, as value tuples, with their ids."""

    spec: TableSpec
    recent: RecentIds
    keys: list[Hashable] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    pending: set[Hashable] = field(default_factory=set)

    def stage(self, rows: Iterable[dict[str, Any]]) -> tuple[list[Hashable], list[tuple], int]:
        """New rows' ids and values (without those already inserted, buffered or repeated), and the count."""
        keys: list[Hashable] = []
        values: list[tuple] = []
        seen: set[Hashable] = set()
        total = 0
        for row in rows:
            total += 1
            key = self.spec.key(row)
            if key in seen or key in self.pending or key in self.recent:
                continue
            seen.add(key)
            keys.append(key)
            values.append(self.spec.values(row))
        return keys, values, total

    def refilter(self) -> int:
        """Drop buffered rows whose ids turned out to be in ClickHouse already; returns how many."""
        kept = [(k, r) for k, r in zip(self.keys, self.rows, strict=True) if k not in self.recent]
        dropped = len(self.rows) - len(kept)
        if dropped:
            self.keys = [k for k, _ in kept]
            self.rows = [r for _, r in kept]
            self.pending = set(self.keys)
        return dropped


class ClickHouseSink:
    """Buffers outcome, ledger and node rows and writes them in columnar batches, each row once."""

    def __init__(
        self,
        backend: Backend,
        database: str,
        buffer_limit: int = 200_000,
        batch_rows: int = 5000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        dedup_window_s: float = 300.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.backend = backend
        self.database = _check_identifier(database)
        self.buffer_limit = buffer_limit
        self.batch_rows = batch_rows
        self.clock = clock
        self.sleep = sleep
        self.dedup_window_s = dedup_window_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.buffers = [_Buffer(spec, RecentIds(dedup_window_s, clock)) for spec in (OUTCOMES, LEDGER, NODES)]
        self.healthy = True
        self.last_error: str | None = None
        self.failures = 0  # consecutive failed attempts; sets the backoff
        self.retry_at = 0.0  # clock() time before which flush() does not try again
        self.refused_adds = 0
        self.inserted_rows = {spec.name: 0 for spec in (OUTCOMES, LEDGER, NODES)}
        self.skipped_duplicates = {spec.name: 0 for spec in (OUTCOMES, LEDGER, NODES)}
        self._resync_needed = True  # load recent ids before the first insert
        self._buffered_gauge = BUFFERED_ROWS.labels(database=database)
        self._healthy_gauge = HEALTHY.labels(database=database)
        self._healthy_gauge.set(1)

    @property
    def buffered_rows(self) -> int:
        return sum(len(b.rows) for b in self.buffers)

    @property
    def should_flush(self) -> bool:
        """A full batch is waiting: a caller that flushes only at checkpoints may flush early."""
        return self.buffered_rows >= self.batch_rows

    def add(
        self,
        outcomes: Iterable[dict[str, Any]] = (),
        entries: Iterable[dict[str, Any]] = (),
        nodes: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Buffer a batch's rows (dicts as ``to_dict()`` gives them); no I/O.

        Raises ``SinkBackpressure`` without taking any row when the buffer would exceed ``buffer_limit``.
        """
        staged = [(buffer, *buffer.stage(rows)) for buffer, rows in zip(self.buffers, (outcomes, entries, nodes),
                                                                         strict=True)]
        incoming = sum(len(keys) for _, keys, _, _ in staged)
        buffered = self.buffered_rows
        if buffered and buffered + incoming > self.buffer_limit:
            self.refused_adds += 1
            BACKPRESSURE.inc()
            raise SinkBackpressure(buffered, incoming, self.buffer_limit, max(0.0, self.retry_at - self.clock()))
        for buffer, keys, values, total in staged:
            buffer.keys.extend(keys)
            buffer.rows.extend(values)
            buffer.pending.update(keys)
            self._skipped(buffer.spec.name, total - len(keys))
        self._buffered_gauge.set(self.buffered_rows)

    def flush(self) -> bool:
        """Insert everything buffered; False if ClickHouse failed (rows stay buffered) or is in backoff."""
        if not self.buffered_rows:
            return True
        if self.clock() < self.retry_at:
            return False
        table = "load_ids"
        try:
            if self._resync_needed:
                self._load_recent_ids()
            for buffer in self.buffers:
                table = buffer.spec.name
                buffer.recent.rotate()
                while buffer.rows:
                    self._insert_chunk(buffer)
        except Exception as exc:  # any failure: the rows stay; whether the insert landed is checked on retry
            self._failed(table, exc)
            return False
        finally:
            self._buffered_gauge.set(self.buffered_rows)
        self.failures = 0
        self.healthy = True
        self._healthy_gauge.set(1)
        return True

    def drain(self, timeout_s: float) -> bool:
        """Flush until everything is inserted or ``timeout_s`` passed, sleeping out the backoff (shutdown)."""
        deadline = self.clock() + timeout_s
        while not self.flush():
            wait = self.retry_at - self.clock()
            if self.clock() + wait > deadline:
                return False
            self.sleep(max(wait, 0.0))
        return True

    def resync(self) -> None:
        """Reload recent ids from ClickHouse before the next insert (call when partitions were reassigned)."""
        self._resync_needed = True

    # -- internals ------------------------------------------------------------------------------------

    def _insert_chunk(self, buffer: _Buffer) -> None:
        """Insert the oldest ``batch_rows`` rows of one table as columns; forget them only once it succeeded."""
        spec, n = buffer.spec, self.batch_rows
        columns = dict(zip(spec.columns, zip(*buffer.rows[:n], strict=True), strict=True))
        started = time.perf_counter()
        self.backend.insert(f"{self.database}.{spec.name}", columns)
        INSERT_SECONDS.labels(table=spec.name).observe(time.perf_counter() - started)
        keys = buffer.keys[:n]
        del buffer.keys[:n], buffer.rows[:n]
        buffer.pending.difference_update(keys)
        buffer.recent.update(keys)
        self.inserted_rows[spec.name] += len(keys)
        ROWS_INSERTED.labels(table=spec.name).inc(len(keys))

    def _load_recent_ids(self) -> None:
        """Replace each table's recent ids by those ClickHouse has within the window of its newest row."""
        for buffer in self.buffers:
            table = f"{self.database}.{buffer.spec.name}"
            newest = int(self.backend.query(f"SELECT toUInt32(max(inserted_at)) FROM {table}")[0][0])
            since = newest - int(self.dedup_window_s)
            rows = [] if newest == 0 else self.backend.query(
                f"SELECT {', '.join(buffer.spec.id_columns)} FROM {table} "
                f"PREWHERE inserted_at >= toDateTime({max(since, 0)})"
            )
            buffer.recent.replace(row[0] if len(row) == 1 else tuple(row) for row in rows)
            self._skipped(buffer.spec.name, buffer.refilter())
        self._resync_needed = False

    def _failed(self, table: str, exc: Exception) -> None:
        self.failures += 1
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self.failures - 1))
        self.retry_at = self.clock() + delay
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._resync_needed = True  # the failed insert may have landed: check before inserting again
        self._healthy_gauge.set(0)
        INSERT_FAILURES.labels(table=table).inc()

    def _skipped(self, table: str, count: int) -> None:
        if count:
            self.skipped_duplicates[table] += count
            DUPLICATES_SKIPPED.labels(table=table).inc(count)

