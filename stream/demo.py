"""`fission demo`: a simulated viral campaign through the engine, live on the terminal, then a report.

Zero install: the engine runs embedded (`EmbeddedRunner`, no Kafka, no Redis) and its outputs go
into chDB through the same `ClickHouseSink` a deployment uses, so the report at the end is made
with the SQL a Grafana dashboard would run. The live numbers are kept in memory from the same
batches; the clock for stalled cascades is event time (the latest event time seen), so a replay
at any speed shows the same stalls.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from attribution.campaigns import parse_campaigns
from attribution.engine import BatchResult
from sinks.clickhouse import ChdbBackend, ClickHouseSink, migrate
from stream.embedded import EmbeddedRunner
from stream.report import MINOR, duration, write_report
from stream.simulate import SimulationParams, campaign_config, simulate, write_jsonl

DATABASE = "fission"
FRAUD_REASONS = ("self_referral", "device_limit")
# Stalled cascades (SPEC 6).
MIN_SIZE = 10
STALL_MIN_MS = 10 * 60_000
STALL_FACTOR = 5.0
STALL_BINDS = 20
RATE_WINDOW_S = 2.0  # events/s is measured over the last seconds, so it reacts to slow steps
PROGRESS_EVERY_S = 3.0  # without a terminal: one progress line this often
REFRESH_EVERY_S = 0.1


# -- stalled cascades ---------------------------------------------------------------------------------


def stall_threshold(bind_times: Sequence[int], stall_min_ms: int = STALL_MIN_MS,
                    stall_factor: float = STALL_FACTOR) -> float:
    """How long a cascade may go without a bind: max(stall_min, factor x median gap of its last 20 binds)."""
    times = sorted(bind_times)[-STALL_BINDS:]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    return max(float(stall_min_ms), stall_factor * statistics.median(gaps)) if gaps else float(stall_min_ms)


def is_stalled(size: int, bind_times: Sequence[int], now: int, min_size: int = MIN_SIZE) -> bool:
    """SPEC 6: size >= min_size and the time since the last bind exceeds the threshold."""
    return size >= min_size and bool(bind_times) and now - max(bind_times) > stall_threshold(bind_times)


@dataclass
class Cascade:
    """One root's cascade as the live view needs it: size, depth and its most recent bind times."""

    root: str
    binds: int = 0
    max_depth: int = 0
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=STALL_BINDS))

    @property
    def size(self) -> int:
        return self.binds + 1  # the seed and everyone bound under it

    @property
    def last_bind(self) -> int:
        return max(self.recent) if self.recent else 0

    def bind(self, ts: int, depth: int) -> None:
        self.binds += 1
        self.max_depth = max(self.max_depth, depth)
        self.recent.append(ts)

    def stalled(self, now: int) -> bool:
        return is_stalled(self.size, self.recent, now)


# -- live statistics ----------------------------------------------------------------------------------


@dataclass
class LiveStats:
    """Running totals over every batch the engine emits: what the dashboard shows while the run goes."""

    total: int
    started: float = field(default_factory=time.monotonic)
    processed: int = 0
    binds: int = 0
    sharers: set[tuple[str, str]] = field(default_factory=set)
    paid: int = 0  # minor units
    clawed: int = 0
    clawbacks: int = 0
    fraud: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    watermark: int = 0  # the event-time clock: the latest ts seen
    first_ts: int = 0
    cascades: dict[tuple[str, str], Cascade] = field(default_factory=dict)
    deepest: tuple[int, str] = (0, "")
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, result: BatchResult) -> None:
        for outcome in result.outcomes:
            if outcome.outcome == "rejected":
                if outcome.reason in FRAUD_REASONS:
                    self.fraud[outcome.reason] += 1
                continue
            if isinstance(outcome.ts, int):
                self.watermark = max(self.watermark, outcome.ts)
                self.first_ts = min(self.first_ts or outcome.ts, outcome.ts)
            if outcome.outcome == "shared" and outcome.campaign and outcome.user_id:
                self.sharers.add((outcome.campaign, outcome.user_id))
                self._cascade(outcome.campaign, outcome.root)
            elif outcome.outcome == "bound":
                self.binds += 1
                depth = outcome.depth or 0
                cascade = self._cascade(outcome.campaign, outcome.root)
                if cascade is not None and isinstance(outcome.ts, int):
                    cascade.bind(outcome.ts, depth)
                if depth > self.deepest[0]:
                    self.deepest = (depth, outcome.root or "")
        for entry in result.entries:
            if entry.amount > 0:
                self.paid += entry.amount
            else:
                self.clawed -= entry.amount
                self.clawbacks += 1
        self.dead_letters += len(result.dead_letters)

    def _cascade(self, campaign: str | None, root: str | None) -> Cascade | None:
        if not campaign or not root:
            return None
        return self.cascades.setdefault((campaign, root), Cascade(root))

    def took(self, messages: int) -> None:
        """Count the messages a consumer poll took, and remember when, for the rate."""
        self.processed += messages
        now = time.monotonic()
        self.samples.append((now, self.processed))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    @property
    def k(self) -> float:
        return self.binds / len(self.sharers) if self.sharers else 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Events per second over the last couple of seconds (the whole run until then)."""
        if len(self.samples) >= 2 and self.samples[-1][0] > self.samples[0][0]:
            (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
            if t1 - t0 >= 0.5:
                return (n1 - n0) / (t1 - t0)
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    def stalled(self) -> list[Cascade]:
        """Stalled cascades now (on the event-time clock), largest first."""
        found = [c for c in self.cascades.values() if c.size >= MIN_SIZE and c.stalled(self.watermark)]
        return sorted(found, key=lambda c: (-c.size, c.root))

    def largest(self, count: int) -> list[Cascade]:
        return sorted(self.cascades.values(), key=lambda c: (-c.size, c.root))[:count]

    def summary(self, params: SimulationParams, partitions: int) -> dict[str, Any]:
        """What the report needs from the run (everything else it reads from ClickHouse)."""
        elapsed = self.elapsed
        return {
            "campaign": params.campaign, "seed": params.seed, "target_k": params.target_k, "partitions": partitions,
            "total": self.total, "events": self.processed, "elapsed_s": elapsed,
            "rate": self.processed / elapsed if elapsed else 0.0, "binds": self.binds, "sharers": len(self.sharers),
            "dead_letters": self.dead_letters, "watermark": self.watermark,
            "span": f"{_when(self.first_ts)} → {_when(self.watermark)}" if self.watermark else "",
            "stalled": [{"root": c.root, "size": c.size, "max_depth": c.max_depth,
                         "idle_ms": self.watermark - c.last_bind, "threshold_ms": stall_threshold(c.recent)}
                        for c in self.stalled()],
        }


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


# -- the terminal view ---------------------------------------------------------------------------------


def dashboard(stats: LiveStats, params: SimulationParams) -> Any:
    """The live view: progress, the headline numbers in three columns, the largest and the stalled cascades."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    top = Table.grid(padding=(0, 2))
    top.add_row(ProgressBar(total=stats.total, completed=stats.processed, width=30),
                f"[bold]{stats.processed:,}[/] / {stats.total:,} events",
                f"[bold cyan]{stats.rate:,.0f}[/] events/s",
                f"event time [bold]{_when(stats.watermark) if stats.watermark else '—'}[/]")
    depth, root = stats.deepest
    columns = Table.grid(padding=(0, 4))
    columns.add_row(
        _metrics("virality", [("binds", f"{stats.binds:,}"), ("sharers", f"{len(stats.sharers):,}"),
                              ("K-factor", f"[bold]{stats.k:.3f}[/]"),
                              ("deepest", f"{depth} ({root or '—'})"),
                              ("cascades", f"{len(stats.cascades):,}")]),
        _metrics("money", [("rewards paid", f"{stats.paid / MINOR:,.2f}"),
                           ("clawed back", f"{stats.clawed / MINOR:,.2f}"), ("clawbacks", f"{stats.clawbacks:,}")]),
        _metrics("fraud and errors", [*((reason, f"{stats.fraud[reason]:,}") for reason in FRAUD_REASONS),
                                      ("dead letters", f"{stats.dead_letters:,}")]),
    )
    stalled = stats.stalled()
    tables = Table.grid(padding=(0, 4))
    tables.add_row(_cascade_table("largest cascades", stats.largest(6), stats),
                   _cascade_table(f"stalled cascades: {len(stalled)}", stalled[:6], stats))
    title = f"[bold]fission demo[/] · {params.campaign} · seed {params.seed} · target K {params.target_k}"
    return Panel(Group(top, "", columns, "", tables), title=title, border_style="red", expand=False)


def _metrics(title: str, rows: Sequence[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None,
                  padding=(0, 1))
    table.add_column(style="dim")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def _cascade_table(title: str, cascades: Sequence[Cascade], stats: LiveStats) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold", box=None, padding=(0, 1),
                  header_style="dim")
    for name in ("root", "size", "depth", "last bind"):
        table.add_column(name, justify="left" if name == "root" else "right")
    for cascade in cascades:
        style = "yellow" if cascade.stalled(stats.watermark) else ""
        table.add_row(cascade.root, f"{cascade.size:,}", str(cascade.max_depth),
                      f"{duration(stats.watermark - cascade.last_bind)} ago" if cascade.recent else "—", style=style)
    return table


def _progress_line(stats: LiveStats) -> str:
    return (f"fission demo: {stats.processed:,}/{stats.total:,} events, {stats.rate:,.0f} events/s, "
            f"binds {stats.binds:,}, K {stats.k:.3f}, stalled {len(stats.stalled())}")


# -- the run ----------------------------------------------------------------------------------------------


def rows(items: Sequence[Any]) -> list[dict[str, Any]]:
    """Outputs as the dicts the sink takes. Shallow, unlike `to_dict()` (`asdict` deep-copies every field,
    a third of the demo's time); the sink only reads them."""
    if not items:
        return []
    get = attrgetter(*(names := [f.name for f in fields(items[0])]))
    return [dict(zip(names, get(item), strict=True)) for item in items]


def _consume(runner: EmbeddedRunner, sink: ClickHouseSink, stats: LiveStats, show: Callable[[bool], None]) -> None:
    """Poll until the log is empty, flushing the sink whenever a full batch waits; then end the waits."""
    while taken := runner.step():
        stats.took(taken)
        if sink.should_flush and not sink.flush():
            raise RuntimeError(f"chDB insert failed: {sink.last_error}")
        show(False)
    runner.finish()
    if not sink.drain(60):
        raise RuntimeError(f"chDB insert failed: {sink.last_error}")
    show(True)


def _throttled(update: Callable[[], None], every_s: float) -> Callable[[bool], None]:
    """Call `update` at most every `every_s` seconds, and always when forced (the final frame)."""
    last = [0.0]

    def show(force: bool) -> None:
        now = time.monotonic()
        if force or now - last[0] >= every_s:
            last[0] = now
            update()

    return show


def run_demo(out: Path, events: int = 40_000, seed: int = 7, partitions: int = 4, live: bool = True,
             target_k: float = 1.3) -> Path:
    """Simulate, process with a live dashboard, write `out/report.html`; returns its path.

    `out` also gets `events.jsonl` and `campaigns.json` (to replay the run with `fission replay`) and the
    chDB data in `out/chdb` (recreated on every run: a second run into the same views would count twice).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = SimulationParams(seed=seed, target_k=target_k, max_events=events)
    raw = list(simulate(params))
    write_jsonl(out / "events.jsonl", raw)
    doc = campaign_config(params)
    (out / "campaigns.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    shutil.rmtree(out / "chdb", ignore_errors=True)
    backend = ChdbBackend(out / "chdb")
    try:
        migrate(backend, DATABASE)
        sink = ClickHouseSink(backend, DATABASE)
        stats = LiveStats(total=len(raw))

        def emit(_partition: int, result: BatchResult) -> None:
            stats.observe(result)
            sink.add(outcomes=rows(result.outcomes), entries=rows(result.entries), nodes=rows(result.nodes))

        runner = EmbeddedRunner(parse_campaigns(doc), partitions=partitions, emit=emit)
        runner.publish(raw)
        if live and sys.stdout.isatty():
            from rich.live import Live

            with Live(dashboard(stats, params), auto_refresh=False) as view:
                _consume(runner, sink, stats, _throttled(
                    lambda: view.update(dashboard(stats, params), refresh=True), REFRESH_EVERY_S))
        else:
            _consume(runner, sink, stats, _throttled(lambda: print(_progress_line(stats), flush=True),
                                                     PROGRESS_EVERY_S))
        report = write_report(backend, DATABASE, out / "report.html", stats.summary(params, partitions))
    finally:
        backend.close()
    print(f"report: {report}  (replay: fission replay {out / 'events.jsonl'} --campaigns {out / 'campaigns.json'} "
          f"--out {out / 'replay'})")
    return report
