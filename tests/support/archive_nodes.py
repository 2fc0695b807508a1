"""Nodes with ``--archive`` for the read side's tests (tests/archive/test_node_*.py).

A module takes the fixtures by name (``redis_server = archive_nodes.redis_server``,
``redis_db = archive_nodes.redis_db``) next to tests.support.postgres_servers':
one redis-server for the module, emptied before each test (no shard lease of an
earlier test's nodes), and nodes whose archiver writes the module's PostgreSQL.
"""
from __future__ import annotations

import pytest

from tests.server.test_metrics import Scraper
from tests.support import wait_for
from tests.support.clusters import require
from tests.support.servers import free_port

from zim.nodes import schema
from zim.nodes.archive_schema import archive_keys
from zim.testing.redis import LocalRedis

CATCH_UP = 20.0         # seconds for the archiver to catch up (a pass every 0.1 s)


@pytest.fixture(scope="module")
def redis_server():
    require("redis-server")
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.close()


def emptied_client(url: str):
    """A redis-py client of the Redis at ``url``, emptied first (a fixture's body)."""
    import redis
    client = redis.Redis.from_url(url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_db(redis_server):
    """A client of the module's Redis, emptied first."""
    yield from emptied_client(redis_server.url)


def start_node(start_server, redis_server, dsn: str, *flags: str):
    """A node with --archive (no rate limits), and a Scraper of its /metrics."""
    metrics = free_port()
    node = start_server(["--redis", redis_server.url, "--archive", dsn, "--channel-rate", "0", "--user-rate", "0",
                         "--read-rate", "0", "--metrics", f"127.0.0.1:{metrics}", *flags])
    return node, Scraper(metrics)


def caught_up(scraper: Scraper, redis_db, *conversations: schema.ConversationKeys) -> None:
    """Wait until the archive holds every change the node made: the conversations'
    ``archived`` watermarks reached their seq, then nothing is pending (/metrics)."""
    def watermarks() -> bool:
        return all(redis_db.get(archive_keys(keys).archived) == redis_db.get(keys.seq) for keys in conversations)

    assert wait_for(lambda: watermarks() and scraper.value("zim_archive_pending") == 0
                    and scraper.value("zim_archive_lag_seconds") == 0, CATCH_UP, 0.1), "the archive catches up"
