"""The generation marker (a single Redis with ``--archive``): while Redis holds
the archive's, a conversation Redis lacks is new, so its first message needs no
PostgreSQL, and works while PostgreSQL is down; once Redis lost its data
(``FLUSHALL``) the marker is gone for good and new conversations ask PostgreSQL
again (failing cleanly while it is down), so no seq starts again from 1.

Real node processes, a real redis-server and a real PostgreSQL (one of each for
the module, a database per test: the marker is set when the archive knows nothing).
"""
from __future__ import annotations

from tests.support import archive_nodes, postgres_servers, wait_for
from tests.support.archive_nodes import caught_up, start_node
from tests.support.client import unique
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server

from zim.nodes import schema
from zim.nodes.archive_schema import GENERATION_KEY, GENERATION_SETTING

pytestmark = [requires_postgres, requires_redis_server]
postgres_server, fresh_database = postgres_servers.postgres_server, postgres_servers.fresh_database
redis_server, redis_db = archive_nodes.redis_server, archive_nodes.redis_db

RESTORES = "zim_archive_restores_total"


def user(node):
    client = node.tcp_client()
    client.login(unique("u"))
    return client


def database(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def archived_seqs(postgres_server, dsn: str) -> dict[str, list[int]]:
    """conversation -> the seqs of its archived messages."""
    found: dict[str, list[int]] = {}
    for conversation, seq in postgres_server.execute("SELECT conversation, seq FROM messages ORDER BY seq",
                                                     database(dsn)):
        found.setdefault(conversation, []).append(int(seq))
    return found


def generation(postgres_server, dsn: str) -> bytes | None:
    rows = postgres_server.execute(f"SELECT convert_from(value, 'UTF8') FROM settings "
                                   f"WHERE name = '{GENERATION_SETTING}'", database(dsn))
    return rows[0][0].encode() if rows else None


def killed(postgres_server) -> None:
    postgres_server.kill()
    assert wait_for(lambda: not postgres_server.accepts_connections(), 10), "PostgreSQL is down"


def pair(one, other) -> str:
    low, high = sorted((one.user_id, other.user_id))
    return f"u:{low}:{high}"


def test_new_conversations_need_no_postgresql_while_redis_is_intact(start_server, redis_server, redis_db,
                                                                    fresh_database, postgres_server):
    dsn = fresh_database()
    node, scraper = start_node(start_server, redis_server, dsn, "--archive-kinds", "private,channel")
    marker = generation(postgres_server, dsn)
    assert marker and redis_db.get(GENERATION_KEY) == marker      # set at the first start, in both
    alice, bob, carol = user(node), user(node), user(node)

    # a new pair, a new channel: Redis answers alone, PostgreSQL is not asked
    assert alice.ok(2, {"receiverId": bob.user_id, "content": "first"})["seq"] == 1
    room = unique("room")
    assert alice.ok(3, {"name": room}) == {}
    assert scraper.value(RESTORES) == 0
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id))

    killed(postgres_server)
    try:
        # PostgreSQL down: a pair that never talked starts at seq 1, the others go on
        assert alice.ok(2, {"receiverId": carol.user_id, "content": "new"}, timeout=10)["seq"] == 1
        assert alice.ok(2, {"receiverId": bob.user_id, "content": "second"}, timeout=10)["seq"] == 2
        assert bob.ok(5, {"userId": carol.user_id}, timeout=10) == {"messages": [], "hasMore": False}
        other_room = unique("room")
        assert carol.ok(3, {"name": other_room}, timeout=10) == {}      # a channel made
        assert carol.ok(4, {"channel": other_room, "content": "hi"}, timeout=10)["seq"] == 1
        assert bob.ok(3, {"name": room}, timeout=10) == {}              # a channel joined
        dave = user(node)                                               # a user made
        assert carol.ok(2, {"receiverId": dave.user_id, "content": "hi"}, timeout=10)["seq"] == 1
        assert scraper.value(RESTORES) == 0
        # a node started now trusts the marker Redis holds (set only once PostgreSQL had it)
        later, _ = start_node(start_server, redis_server, dsn)
        erin, frank = user(later), user(later)
        assert erin.ok(2, {"receiverId": frank.user_id, "content": "new"}, timeout=10)["seq"] == 1
    finally:
        postgres_server.start()

    # PostgreSQL back: everything reaches it
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id),
              schema.pair_keys(alice.user_id, carol.user_id), schema.channel_keys(other_room))
    seqs = archived_seqs(postgres_server, dsn)
    assert seqs[pair(alice, bob)] == [1, 2]
    assert seqs[pair(alice, carol)] == [1]
    assert seqs[f"c:{other_room}"] == [1]


def test_after_flushall_new_conversations_ask_postgresql_again(start_server, redis_server, redis_db,
                                                              fresh_database, postgres_server):
    dsn = fresh_database()
    node, scraper = start_node(start_server, redis_server, dsn)
    alice, bob, carol = user(node), user(node), user(node)
    for n in range(3):
        alice.ok(2, {"receiverId": bob.user_id, "content": f"d{n}"})
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id))
    marker = redis_db.get(GENERATION_KEY)
    redis_db.flushall()

    # the running node sees the marker gone: the old pair's seq comes from PostgreSQL
    assert alice.ok(2, {"receiverId": bob.user_id, "content": "again"})["seq"] == 4
    assert scraper.value(RESTORES) == 1
    assert node.stderr().count("no longer holds the archive's generation marker") == 1
    killed(postgres_server)
    try:    # a new pair cannot be told from a lost one: it fails, nothing stored
        assert alice.error(2, {"receiverId": carol.user_id, "content": "new"}, timeout=30) == "internal"
        assert redis_db.get(schema.pair_keys(alice.user_id, carol.user_id).seq) is None
    finally:
        postgres_server.start()

    # no node sets the marker again: not one started now, nor one started after the
    # archive's row is deleted (the archive knows conversations: Redis may lack some)
    later, _ = start_node(start_server, redis_server, dsn)
    assert redis_db.get(GENERATION_KEY) is None
    assert generation(postgres_server, dsn) == marker
    assert "it lost its data since the marker was set" in later.stderr()
    postgres_server.execute(f"DELETE FROM settings WHERE name = '{GENERATION_SETTING}'", database(dsn))
    start_node(start_server, redis_server, dsn)
    assert redis_db.get(GENERATION_KEY) is None
    assert generation(postgres_server, dsn) is None
