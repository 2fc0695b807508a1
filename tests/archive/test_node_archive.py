"""The archive's write side on nodes (``--redis URL --archive DSN``): real zim-server
nodes, a real redis-server (appendfsync always) and a real PostgreSQL.

- what two nodes acknowledge (DMs, channel messages) reaches PostgreSQL exactly,
  with users, memberships, grants and channels following joins, leaves, renames
  and deletion;
- with PostgreSQL down, Redis trims nothing unarchived (TTL, cap), the lag shows
  in /metrics and the log, and everything drains once PostgreSQL is up;
- PostgreSQL SIGKILLed under load, and a node SIGKILLed mid-batch, lose nothing
  acknowledged.

Every test starts from an empty Redis (FLUSHALL: no lease of an earlier test's
nodes) and an empty database.
"""
from __future__ import annotations

import time

import pytest
from tests.server.test_metrics import Scraper
from tests.storage.test_storage_durable import Sender
from tests.support import postgres_servers, wait_for
from tests.support.client import unique
from tests.support.node_servers import backend_fixture
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server
from tests.support.servers import free_port

from zim.nodes import schema
from zim.nodes.archive_schema import archive_keys
from zim.testing.postgres import LocalPostgres

pytestmark = [requires_redis_server, requires_postgres]
postgres_server = postgres_servers.postgres_server
fresh_database = postgres_servers.fresh_database

NODE_FLAGS = ("--channel-rate", "0")
DRAIN = 15.0            # seconds for the archiver to catch up (passes every 0.1 s; leases 10 s)


@pytest.fixture(scope="module")
def backend():
    yield from backend_fixture("redis")


@pytest.fixture
def redis(backend):
    import redis as redis_py
    client = redis_py.Redis.from_url(backend.url)
    client.flushall()
    yield client
    client.close()


def start_node(start_server, backend, dsn: str, *flags: str, metrics: int | None = None):
    extra = ("--metrics", f"127.0.0.1:{metrics}") if metrics else ()
    return start_server([*NODE_FLAGS, "--redis", backend.url, "--archive", dsn, *flags, *extra])


def rows(postgres: LocalPostgres, dsn: str, sql: str) -> list[tuple]:
    return postgres.execute(sql, dsn.rsplit("/", 1)[1])


def archived_ids(postgres: LocalPostgres, dsn: str) -> dict[str, tuple[str, int]]:
    """Archived messages: id -> (conversation, seq), asserting each id is there once."""
    found = rows(postgres, dsn, "SELECT id, conversation, seq, body->>'id' FROM messages")
    assert len({row[0] for row in found}) == len(found)
    assert all(row[0] == row[3] for row in found)       # the body is the message, its id the row's
    return {row[0]: (row[1], int(row[2])) for row in found}


def eventually(predicate, what: str, timeout: float = DRAIN) -> None:
    assert wait_for(predicate, timeout, 0.1), f"{what}: not within {timeout} s"


def logged_in(node, name: str | None = None):
    client = node.tcp_client()
    client.login(name or unique("u"))
    return client


def test_what_two_nodes_acknowledge_reaches_postgresql(start_server, backend, redis, postgres_server,
                                                      fresh_database):
    dsn = fresh_database()
    a, b = (start_node(start_server, backend, dsn, "--archive-kinds", "private,channel") for _ in range(2))
    alice, bob = logged_in(a, "alice"), logged_in(b, "bob")
    channel = unique("room")
    alice.ok(3, {"name": channel})
    bob.ok(3, {"name": channel, "push": False})
    acked = {}
    for i in range(30):
        sender, receiver = (alice, bob) if i % 2 else (bob, alice)
        sent = sender.ok(2, {"receiverId": receiver.user_id, "content": f"dm {i}"})
        acked[sent["id"]] = sent["seq"]
    low, high = sorted((int(alice.user_id), int(bob.user_id)))
    pair = f"u:{low}:{high}"
    in_channel = {}
    for i in range(10):
        sent = (alice if i % 2 else bob).ok(4, {"channel": channel, "content": f"ch {i}"})
        in_channel[sent["id"]] = sent["seq"]
    expected = {**{k: (pair, v) for k, v in acked.items()}, **{k: (f"c:{channel}", v) for k, v in in_channel.items()}}
    eventually(lambda: archived_ids(postgres_server, dsn) == expected, "the messages archived")
    assert sorted(acked.values()) == list(range(1, 31))
    assert dict(rows(postgres_server, dsn, "SELECT conversation, seq FROM conversations")) == {
        pair: "30", f"c:{channel}": "10"}
    users = dict(rows(postgres_server, dsn, "SELECT id, name FROM users"))
    assert users == {alice.user_id: "alice", bob.user_id: "bob"}
    members = set(rows(postgres_server, dsn, "SELECT channel, user_id, push FROM memberships"))
    assert members == {(channel, alice.user_id, "t"), (channel, bob.user_id, "f")}
    assert rows(postgres_server, dsn, "SELECT name, private FROM channels") == [(channel, "f")]

    # a leave, a private channel with a grant, a revoked grant, a deleted channel
    bob.ok(6, {"name": channel})
    secret = unique("secret")
    alice.ok(3, {"name": secret, "private": True})
    alice.ok(12, {"channel": secret, "userId": bob.user_id})
    bob.ok(3, {"name": secret})
    eventually(lambda: set(rows(postgres_server, dsn, "SELECT channel, user_id FROM memberships")) == {
        (channel, alice.user_id), (secret, alice.user_id), (secret, bob.user_id)}, "the memberships")
    eventually(lambda: set(rows(postgres_server, dsn, "SELECT name, private FROM channels")) == {
        (channel, "f"), (secret, "t")}, "the channels")
    grants = set(rows(postgres_server, dsn, "SELECT channel, user_id FROM grants"))
    assert (secret, alice.user_id) in grants and (secret, bob.user_id) in grants
    alice.ok(6, {"name": secret})
    assert rows(postgres_server, dsn, "SELECT count(*) FROM grants WHERE user_id = " + alice.user_id) == [("1",)]
