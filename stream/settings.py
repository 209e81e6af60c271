"""Settings: a YAML file, overridden by FISSION_* environment variables, overridden by flags.

`scripts/services up` prints the FISSION_* variables of the servers it started, so
`eval "$(scripts/services up)"` points every command at them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from attribution.campaigns import ConfigError, parse_duration
from attribution.engine import Settings as EngineSettings
from stream.topics import Topics


@dataclass(frozen=True, slots=True)
class Settings:
    campaigns: str = "config/campaigns.yaml"
    store: str = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "fx"
    redis_buckets: int = 16384
    kafka_bootstrap: str = "127.0.0.1:9092"
    clickhouse_url: str = "clickhouse://127.0.0.1:9000/default"
    clickhouse_database: str = "fission"
    topic_prefix: str = "referral"
    app_id: str = "fission-attribution"
    partitions: int = 6
    replication: int = 1
    batch_size: int = 2000
    batch_within_ms: int = 50
    tick_interval_ms: int = 1000
    metrics_port: int = 0
    cascade_check_interval_ms: int = 5000
    cascade_snapshot_interval_ms: int = 60000
    stall_min_size: int = 10
    stall_min: str = "10m"
    stall_factor: int = 5
    k_window: str = "1h"
    k_windows_below: int = 3
    cascade_lateness: str = "1m"
    grace: str = "10m"
    max_waiting_per_user: int = 100
    max_waiting_per_partition: int = 100_000

    @property
    def batch_within_s(self) -> float:
        return self.batch_within_ms / 1000

    @property
    def tick_interval_s(self) -> float:
        return self.tick_interval_ms / 1000

    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    def engine(self) -> EngineSettings:
        return EngineSettings(
            max_waiting_per_user=self.max_waiting_per_user,
            max_waiting_per_partition=self.max_waiting_per_partition,
            grace_ms=parse_duration(self.grace, "grace"),
        )


def load_settings(path: str | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """File (FISSION_CONFIG or `path`, optional) < environment < explicit overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = path or environ.get("FISSION_CONFIG")
    if config_path:
        doc = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{config_path}: must be a mapping of settings")
        values.update(doc)
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{config_path}: unknown setting(s) {', '.join(unknown)}")
    for name, spec in known.items():
        env = environ.get(f"FISSION_{name.upper()}")
        if env is not None:
            values[name] = int(env) if spec.type in ("int", int) else env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Settings(), **values)
