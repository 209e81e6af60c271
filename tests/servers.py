"""Pytest plugin: fixtures backed by the real Kafka, Redis and ClickHouse servers of ``scripts/services``.

Why real servers: fission's correctness lives in consumer-group rebalances, Lua atomicity in Redis and
ClickHouse DDL, none of which a mock can prove.

Enable it in a conftest with ``pytest_plugins = ["tests.servers"]`` (or ``pytest -p tests.servers``).

Where the servers come from: the session fixtures read ``FISSION_KAFKA_BOOTSTRAP``, ``FISSION_REDIS_URL``,
``FISSION_CLICKHOUSE_URL`` and ``FISSION_CLICKHOUSE_HTTP`` (as set by ``eval "$(scripts/services up)"``).
If any is missing they run ``scripts/services up`` once per session and use its export lines (and put
them into ``os.environ``, so subprocesses such as Faust workers see them too). A server that is not there
or does not answer is a test *error* with a message saying what to run -- never a silent skip.

Fixtures:

- ``kafka_bootstrap``, ``redis_url``, ``clickhouse_url``, ``clickhouse_http`` (session): addresses,
  checked to answer once per session.
- ``unique_prefix`` (function): a short unique name such as ``t1a2b3c4d`` for this test's resources.
- ``kafka_admin`` (session): a confluent-kafka ``AdminClient``.
- ``kafka_topic_factory`` (function): ``create(name="topic", partitions=1, config=None) -> topic``
  creates ``<unique_prefix>-<name>`` and waits until every partition has a leader; afterwards every
  topic and consumer group whose name starts with ``unique_prefix`` is deleted (so name app ids and
  groups after ``unique_prefix`` too).
- ``redis_key_prefix`` (function): ``"<unique_prefix>:"``; ``redis_client`` (function): a
  ``redis.Redis`` (bytes responses) on the shared DB; keys starting with ``redis_key_prefix`` are deleted
  afterwards, nothing else is touched -- so use only keys with that prefix.
- ``clickhouse_database`` (function): a fresh database named ``unique_prefix``, dropped afterwards;
  ``clickhouse_client`` (function): a clickhouse-driver ``Client`` whose default database is that one.

Marker: every test that uses one of these fixtures is marked ``servers``; ``pytest -m "not servers"``
runs the rest without starting anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from clickhouse_driver import Client as ClickHouseClient
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICES_SCRIPT = REPO_ROOT / "scripts" / "services"
ENV_VARS = (
    "FISSION_KAFKA_BOOTSTRAP",
    "FISSION_REDIS_URL",
    "FISSION_CLICKHOUSE_URL",
    "FISSION_CLICKHOUSE_HTTP",
)
SERVER_FIXTURES = frozenset(
    {
        "services_env",
        "kafka_bootstrap",
        "kafka_admin",
        "kafka_topic_factory",
        "redis_url",
        "redis_client",
        "clickhouse_url",
        "clickhouse_http",
        "clickhouse_database",
        "clickhouse_client",
    }
)
SERVICES_UP_TIMEOUT_S = 900
HINT = 'start them with: eval "$(scripts/services up)"   (state and logs: scripts/services status)'


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``servers`` marker so ``-m "not servers"`` and ``--strict-markers`` work."""
    config.addinivalue_line(
        "markers",
        "servers: uses the real Kafka/Redis/ClickHouse servers of scripts/services "
        "(applied automatically by tests.servers to tests that use its fixtures)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that need the servers, so they can be selected or deselected as a group."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


def parse_exports(text: str) -> dict[str, str]:
    """Read the ``export NAME=value`` lines that ``scripts/services up`` prints on stdout."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            found[name] = value
    return found


def run_services_up() -> dict[str, str]:
    """Start (or find running) servers via ``scripts/services up``; fail the test with its log if it can't."""
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)  # an interpreter that surely has confluent_kafka
    try:
        proc = subprocess.run(
            [str(SERVICES_SCRIPT), "up"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SERVICES_UP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"could not run {SERVICES_SCRIPT} up: {exc!r}", pytrace=False)
    exports = parse_exports(proc.stdout)
    missing = [name for name in ENV_VARS if name not in exports]
    if proc.returncode != 0 or missing:
        tail = "\n".join(proc.stderr.splitlines()[-60:])
        pytest.fail(
            f"{SERVICES_SCRIPT} up failed (exit {proc.returncode}, missing {missing}); its stderr:\n{tail}",
            pytrace=False,
        )
    return exports


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """The four FISSION_* server variables, from the environment or from one ``scripts/services up``."""
    if any(not os.environ.get(name) for name in ENV_VARS):
        for name, value in run_services_up().items():
            if not os.environ.get(name):
                os.environ[name] = value
    return {name: os.environ[name] for name in ENV_VARS}


def _retry_until(check: Callable[[], object], what: str, timeout_s: float) -> None:
    """Give a just-started server a few seconds; then fail with what was tried and why it failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except Exception as exc:  # any failure to answer counts; the message says which
            if time.monotonic() >= deadline:
                pytest.fail(f"{what} is not answering ({exc!r}); {HINT}", pytrace=False)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def kafka_bootstrap(services_env: dict[str, str]) -> str:
    """Kafka ``host:port``, verified to answer a metadata request."""
    bootstrap = services_env["FISSION_KAFKA_BOOTSTRAP"]
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})

    def check() -> None:
        if not admin.list_topics(timeout=5).brokers:
            raise RuntimeError("metadata lists no broker")

    _retry_until(check, f"Kafka at {bootstrap}", 15)
    return bootstrap


@pytest.fixture(scope="session")
def redis_url(services_env: dict[str, str]) -> str:
    """Redis URL, verified to answer PING."""
    url = services_env["FISSION_REDIS_URL"]

    def check() -> None:
        with redis.Redis.from_url(url, socket_timeout=3) as client:
            client.ping()

    _retry_until(check, f"Redis at {url}", 15)
    return url


@pytest.fixture(scope="session")
def clickhouse_url(services_env: dict[str, str]) -> str:
    """ClickHouse native-protocol URL (``clickhouse://host:port/db``), verified with ``SELECT 1``."""
    url = services_env["FISSION_CLICKHOUSE_URL"]

    def check() -> None:
        client = ClickHouseClient.from_url(url)
        try:
            assert client.execute("SELECT 1") == [(1,)]
        finally:
            client.disconnect()

    _retry_until(check, f"ClickHouse at {url}", 15)
    return url


@pytest.fixture(scope="session")
def clickhouse_http(services_env: dict[str, str], clickhouse_url: str) -> str:
    """ClickHouse HTTP base URL (same server as ``clickhouse_url``)."""
    return services_env["FISSION_CLICKHOUSE_HTTP"]


@pytest.fixture
def unique_prefix() -> str:
    """A short name no other test (or test run) uses, for topics, groups, keys and databases."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    """One AdminClient for the session: topic creation and cleanup."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap, "log_level": 0})


def _wait_for_leaders(admin: AdminClient, topic: str, partitions: int, timeout_s: float = 30) -> None:
    """Block until the topic's metadata shows every partition with a leader, so producing won't race."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 and p.error is None for p in meta.partitions.values())
        ):
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"topic {topic} has no leader for all {partitions} partitions after {timeout_s}s")
        time.sleep(0.2)


def _delete_kafka_leftovers(admin: AdminClient, prefix: str) -> None:
    """Best-effort removal of this test's topics and consumer groups (everything named ``prefix*``)."""
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            try:
                future.result(timeout=30)
            except KafkaException:
                pass  # already gone
    try:
        listing = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
    except KafkaException:
        return
    groups = [g.group_id for g in listing.valid if g.group_id.startswith(prefix)]
    if groups:
        for future in admin.delete_consumer_groups(groups, request_timeout=10).values():
            try:
                future.result(timeout=15)
            except KafkaException:
                pass  # a group with live members cannot be deleted; it expires on its own


@pytest.fixture
def kafka_topic_factory(kafka_admin: AdminClient, unique_prefix: str) -> Iterator[Callable[..., str]]:
    """Create ``<unique_prefix>-<name>`` topics; afterwards delete every ``unique_prefix*`` topic/group."""
    created: list[str] = []

    def create(name: str = "topic", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        topic = f"{unique_prefix}-{name}"
        if topic in created:
            raise ValueError(f"topic {topic} was already created in this test")
        new = NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config or {})
        kafka_admin.create_topics([new], operation_timeout=30)[topic].result(timeout=30)
        created.append(topic)
        _wait_for_leaders(kafka_admin, topic, partitions)
        return topic

    yield create
    _delete_kafka_leftovers(kafka_admin, unique_prefix)


@pytest.fixture
def redis_key_prefix(unique_prefix: str) -> str:
    """The only key prefix a test may write under: ``redis_client`` deletes exactly these keys."""
    return f"{unique_prefix}:"


@pytest.fixture
def redis_client(redis_url: str, redis_key_prefix: str) -> Iterator[redis.Redis]:
    """A Redis client on the shared server; afterwards deletes the keys under ``redis_key_prefix``."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"{redis_key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def clickhouse_database(clickhouse_url: str, unique_prefix: str) -> Iterator[str]:
    """A fresh ClickHouse database for one test, dropped afterwards."""
    client = ClickHouseClient.from_url(clickhouse_url)
    client.execute(f"CREATE DATABASE {unique_prefix}")
    try:
        yield unique_prefix
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {unique_prefix}")
        client.disconnect()


@pytest.fixture
def clickhouse_client(clickhouse_url: str, clickhouse_database: str) -> Iterator[ClickHouseClient]:
    """A clickhouse-driver client whose default database is this test's ``clickhouse_database``."""
    parts = urlsplit(clickhouse_url)
    client = ClickHouseClient.from_url(urlunsplit(parts._replace(path=f"/{clickhouse_database}")))
    try:
        yield client
    finally:
        client.disconnect()
