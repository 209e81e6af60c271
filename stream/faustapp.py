"""What every fission Faust app shares: its construction, raw-bytes topics, running, stopping."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from stream.settings import Settings

log = logging.getLogger("fission.faust")

RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def new_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app on the aiokafka transport; short session timeouts so a dead worker's
    partitions move within seconds; no web server (metrics are served by `stream.metrics`)."""
    return faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        stream_wait_empty=False,
    )


def run(app: faust.App, loglevel: str) -> None:
    """Run the app's worker in this process until it is stopped (signal, or `stop`)."""
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    app._fission_worker = worker
    worker.execute_from_commandline()


def stop(app: faust.App) -> None:
    """Stop the worker as SIGTERM would, from inside its event loop."""
    worker = app._fission_worker
    worker._signal_stop_future = asyncio.ensure_future(worker._stop_on_signal(signal.SIGTERM))


def stop_when_idle(app: faust.App, until_idle: float, idle_for: Callable[[], float],
                   finish: Callable[[], Awaitable[None]]) -> None:
    """`--until-idle`: once `idle_for()` reaches `until_idle` seconds, run `finish` once, then stop."""
    stopping = False

    @app.timer(interval=0.5)
    async def stop_when_idle() -> None:
        nonlocal stopping
        if stopping or idle_for() < until_idle:
            return
        stopping = True
        log.info("no input for %.1fs: finishing, then stopping", until_idle)
        await finish()
        stop(app)
