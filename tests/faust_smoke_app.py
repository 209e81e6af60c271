"""A minimal Faust app for tests/test_servers_smoke.py, run as a separate worker process.

Why a module and a subprocess: a Faust worker owns its event loop and signal handlers, and the rebalance
test needs two workers of the same app at once. So the test starts
``python -m faust -A tests.faust_smoke_app worker --without-web`` once per worker, configured only
through environment variables:

- ``FISSION_KAFKA_BOOTSTRAP``   broker, ``host:port``
- ``FAUST_SMOKE_APP_ID``        app id = consumer group; unique per test
- ``FAUST_SMOKE_IN_TOPIC``      topic the agent consumes (created by the test)
- ``FAUST_SMOKE_OUT_TOPIC``     topic the agent writes one reply per event to (created by the test)
- ``FAUST_SMOKE_PARTITIONS``    partitions of the input topic (Faust's ``topic_partitions``)
- ``FAUST_SMOKE_WORKER``        this worker's name, copied into every reply
- ``FAUST_SMOKE_DATADIR``       a private data dir for this worker

Every reply is JSON ``{"worker", "partition", "offset", "value"}``, so the test can tell which worker
answered which input partition. After each rebalance the worker prints
``ASSIGNED <worker> [<input partitions>]``; a Faust worker routes stdout through its logger, so the
marker shows up inside a log line of the worker's log, where the test finds it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import faust


def _env(name: str) -> str:
    """Read a required setting; fail loudly at import time rather than run a misconfigured worker."""
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"tests.faust_smoke_app needs the environment variable {name}")
    return value


WORKER = _env("FAUST_SMOKE_WORKER")
IN_TOPIC = _env("FAUST_SMOKE_IN_TOPIC")
OUT_TOPIC = _env("FAUST_SMOKE_OUT_TOPIC")
PARTITIONS = int(_env("FAUST_SMOKE_PARTITIONS"))

app = faust.App(
    _env("FAUST_SMOKE_APP_ID"),
    broker=f"kafka://{_env('FISSION_KAFKA_BOOTSTRAP')}",
    store="memory://",
    datadir=_env("FAUST_SMOKE_DATADIR"),
    topic_partitions=PARTITIONS,
    topic_replication_factor=1,
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    # Small timeouts so a joining or leaving worker is noticed within seconds, not a minute.
    broker_session_timeout=10.0,
    broker_heartbeat_interval=1.0,
)

RAW_BYTES: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "value_serializer": "raw"}
in_topic = app.topic(IN_TOPIC, partitions=PARTITIONS, **RAW_BYTES)
out_topic = app.topic(OUT_TOPIC, **RAW_BYTES)


@app.agent(in_topic)
async def answer(stream: faust.StreamT[bytes]) -> None:
    """Reply to every input event, naming the worker and input partition that handled it."""
    async for event in stream.events():
        message = event.message
        reply = {
            "worker": WORKER,
            "partition": message.partition,
            "offset": message.offset,
            "value": event.value.decode(),
        }
        await out_topic.send(key=message.key, value=json.dumps(reply).encode())


@app.on_partitions_assigned.connect
async def report_assignment(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
    """Print the input partitions this worker now owns, for the test to follow the rebalance."""
    partitions = sorted(tp.partition for tp in assigned if tp.topic == IN_TOPIC)
    print(f"ASSIGNED {WORKER} {json.dumps(partitions)}", flush=True)


if __name__ == "__main__":
    app.main()
