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
from tests.api.helpers import ApiClient, api_flags, channel_path, wait_for_port
from tests.support.archive_nodes import emptied_client
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
    yield from emptied_client(backend.url)


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
                                                      fresh_database, tmp_path):
    dsn = fresh_database()
    api, port = api_flags(tmp_path)
    a, b = (start_node(start_server, backend, dsn, "--archive-kinds", "private,channel", *flags)
            for flags in (api, ()))
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
    # the other entries are in other shards, whose passes may come a moment later
    eventually(lambda: dict(rows(postgres_server, dsn, "SELECT conversation, seq FROM conversations")) == {
        pair: "30", f"c:{channel}": "10"}, "the seq counters")
    eventually(lambda: dict(rows(postgres_server, dsn, "SELECT id, name FROM users")) == {
        alice.user_id: "alice", bob.user_id: "bob"}, "the users")
    eventually(lambda: set(rows(postgres_server, dsn, "SELECT channel, user_id, push FROM memberships")) == {
        (channel, alice.user_id, "t"), (channel, bob.user_id, "f")}, "the memberships")
    eventually(lambda: rows(postgres_server, dsn, "SELECT name, private FROM channels") == [(channel, "f")],
               "the channel")

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
    eventually(lambda: set(rows(postgres_server, dsn, "SELECT channel, user_id FROM grants")) >= {
        (secret, alice.user_id), (secret, bob.user_id)}, "the grants")
    alice.ok(6, {"name": secret})
    assert rows(postgres_server, dsn, "SELECT count(*) FROM grants WHERE user_id = " + alice.user_id) == [("1",)]

    # Redis loses everything: a channel's seq comes back from PostgreSQL, and goes on
    redis.flushall()
    assert alice.ok(4, {"channel": channel, "content": "after the loss"})["seq"] == 11
    assert redis.get(schema.channel_keys(channel).seq) == b"11"
    # a deleted channel leaves nothing of its own in PostgreSQL
    wait_for_port(port)
    ApiClient(port).ok("DELETE", channel_path(channel))
    eventually(lambda: not rows(postgres_server, dsn, "SELECT 1 FROM messages WHERE conversation = 'c:"
                                + channel + "' UNION ALL SELECT 1 FROM channels WHERE name = '" + channel + "'"),
               "the channel's rows deleted")
    assert rows(postgres_server, dsn, "SELECT count(*) FROM memberships WHERE channel = '" + channel + "'") == [("0",)]
    assert set(rows(postgres_server, dsn, "SELECT conversation FROM conversations")) == {(pair,), (f"c:{secret}",)}


def test_redis_trims_nothing_unarchived_while_postgresql_is_down(start_server, backend, redis):
    postgres = LocalPostgres().start()
    try:
        dsn = postgres.create_database("late")
        postgres.kill()         # down before the node starts: it serves, and migrates once it is up
        metrics = free_port()
        # a batch smaller than the backlog: the conversation takes several passes
        node = start_node(start_server, backend, dsn, "--retain-private", "2s:3", "--archive-batch", "4",
                          metrics=metrics)
        alice, bob = logged_in(node), logged_in(node)
        # a conversation's first message needs its seq from PostgreSQL (the archive may hold
        # one Redis lost): refused, nothing stored, while PostgreSQL is down
        assert alice.error(2, {"receiverId": bob.user_id, "content": "first"}) == "internal"
        postgres.start()
        eventually(lambda: "error" not in alice.call(2, {"receiverId": bob.user_id, "content": "m0"}),
                   "the first message once PostgreSQL is up (the schema migrated by the node)")
        eventually(lambda: len(archived_ids(postgres, dsn)) == 1, "the first message archived")
        postgres.kill()
        sent = [bob.ok(5, {"userId": alice.user_id})["messages"][0]["id"]]
        sent += [alice.ok(2, {"receiverId": bob.user_id, "content": f"m{i}"})["id"] for i in range(1, 10)]
        log = schema.pair_keys(int(alice.user_id), int(bob.user_id)).log
        scraper = Scraper(metrics)
        eventually(lambda: scraper.value("zim_archive_lag_seconds") > 5.5, "the lag grows", 10)
        # past the TTL (2 s) and the cap (3): everything is still in Redis, and no TTL on the log
        # (the first one, archived, went with the TTL)
        assert redis.xlen(log) == 9 and redis.pttl(log) == -1
        # a page the log holds whole is read while PostgreSQL is down; one that needs it (the
        # first message, archived and expired) fails rather than come back short
        page = bob.ok(5, {"userId": alice.user_id, "limit": 8})
        assert [m["id"] for m in page["messages"]] == sent[2:] and page["hasMore"]
        assert bob.error(5, {"userId": alice.user_id, "limit": 50}) == "internal"
        assert scraper.value("zim_archive_link_up") == 0 and scraper.value("zim_archive_pending") >= 1
        eventually(lambda: "archive lag" in node.stderr(), "the lag in the log", 5)
        postgres.start()
        eventually(lambda: set(archived_ids(postgres, dsn)) == set(sent), "the backlog archived")
        eventually(lambda: scraper.value("zim_archive_lag_seconds") == 0, "the lag back to 0", 5)
        assert scraper.value("zim_archive_link_up") == 1 and scraper.value("zim_archive_messages_total") == 10
        # everything archived: the cap and the TTL apply again
        eventually(lambda: redis.xlen(log) == 0, "the log trimmed and expired", 5)
        assert "archive lag drained" in node.stderr()
    finally:
        postgres.close()


def test_postgresql_killed_under_load_loses_nothing_acknowledged(start_server, backend, redis, postgres_server,
                                                                  fresh_database):
    dsn = fresh_database()
    nodes = [start_node(start_server, backend, dsn, "--archive-kinds", "private,channel") for _ in range(2)]
    channel = unique("load")
    senders = []
    for i in range(4):
        node = nodes[i % 2]
        receiver = logged_in(nodes[1 - i % 2])
        sender = logged_in(node)
        sender.ok(3, {"name": channel, "push": False})
        sender.ok(2, {"receiverId": receiver.user_id, "content": "first"})    # the pair's seq, from PostgreSQL
        senders.append(Sender(sender, receiver.user_id, channel))
    for sender in senders:
        sender.start()
    time.sleep(1.0)
    postgres_server.kill()
    time.sleep(1.5)
    postgres_server.start()
    time.sleep(0.5)
    for sender in senders:
        sender.stop.set()
    for sender in senders:
        sender.join(15)
        assert not sender.is_alive() and not sender.errors, sender.errors[:5]
    acked = {message_id: seq for sender in senders for message_id, seq in
             {**sender.acked_dms, **sender.acked_channel}.items()}
    assert len(acked) > 100
    eventually(lambda: set(acked) <= set(archived_ids(postgres_server, dsn)), "every acknowledged message archived",
               30)
    archived = archived_ids(postgres_server, dsn)      # each id once (asserted), with its seq
    assert all(archived[message_id][1] == seq for message_id, seq in acked.items())
    seqs = sorted(seq for conversation, seq in archived.values() if conversation == f"c:{channel}")
    assert seqs == list(range(1, len(seqs) + 1))        # gap-free: nothing acknowledged went missing


def test_a_node_killed_mid_batch_leaves_its_entries_to_another(start_server, backend, redis, postgres_server,
                                                               fresh_database):
    dsn = fresh_database()
    first = start_node(start_server, backend, dsn, "--archive-kinds", "private,channel")
    channel = unique("orphan")
    alice = logged_in(first)
    alice.ok(3, {"name": channel})
    postgres_server.kill()          # its entries pile up under its leases
    sent = {alice.ok(4, {"channel": channel, "content": f"m{i}"})["id"] for i in range(20)}
    assert redis.exists(*(f"zim:{{arch:{shard}}}:lease" for shard in range(8))) >= 1
    first.kill()
    postgres_server.start()
    killed_at = time.monotonic()
    # a new node id: it takes the shards once the dead node's leases have run out
    start_node(start_server, backend, dsn, "--archive-kinds", "private,channel")
    eventually(lambda: sent <= set(archived_ids(postgres_server, dsn)), "the dead node's backlog archived", 25)
    assert time.monotonic() - killed_at < 10 + 8
    keys = schema.channel_keys(channel)
    eventually(lambda: redis.get(archive_keys(keys).archived) == b"20" == redis.get(keys.seq), "the watermark", 5)


def test_a_change_made_during_a_pass_is_archived_by_the_next(start_server, backend, redis, postgres_server,
                                                              fresh_database):
    import psycopg

    dsn = fresh_database()
    node = start_node(start_server, backend, dsn)
    alice, bob = logged_in(node), logged_in(node)
    sent = [alice.ok(2, {"receiverId": bob.user_id, "content": "first"})["id"]]
    eventually(lambda: set(archived_ids(postgres_server, dsn)) == set(sent), "the first message archived")
    with psycopg.connect(dsn) as blocker:
        # the archiver's next transaction waits on this lock: its pass read the conversation
        # at seq 2, and the third message marks it again meanwhile
        blocker.execute("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        sent.append(alice.ok(2, {"receiverId": bob.user_id, "content": "second"})["id"])
        time.sleep(0.5)
        sent.append(alice.ok(2, {"receiverId": bob.user_id, "content": "third"})["id"])
        time.sleep(0.5)
    eventually(lambda: set(archived_ids(postgres_server, dsn)) == set(sent), "the change made during the pass")
    # Redis loses everything: the pair's seq comes back from PostgreSQL, never from 1
    redis.flushall()
    assert alice.ok(2, {"receiverId": bob.user_id, "content": "after the loss"})["seq"] == 4
