"""A Redis that lost its data (``FLUSHALL``) is filled again from the archive as
it is used (zim.nodes.refill): the token secret outlives it, tokens still
verify (and a revoked one stays revoked), users keep their channels, a private
channel still refuses a user without a grant, seq goes on from where it was,
and a PostgreSQL that is down fails the call rather than let "unknown" pass
for "new".

Real node processes (whose archiver writes PostgreSQL), a real redis-server
and a real PostgreSQL (one of each for the module).
"""
from __future__ import annotations

import time

import pytest

from tests.support import archive_nodes, postgres_servers, wait_for
from tests.support.archive_nodes import caught_up, start_node
from tests.support.client import unique
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server

from zim.archive.schema import migrate
from zim.nodes import schema

pytestmark = [requires_postgres, requires_redis_server]
postgres_server = postgres_servers.postgres_server
redis_server, redis_db = archive_nodes.redis_server, archive_nodes.redis_db


@pytest.fixture(scope="module")
def dsn(postgres_server) -> str:
    found = postgres_server.create_database("node_refill")
    migrate(found)
    return found


def archive_node(start_server, redis_server, dsn):
    return start_node(start_server, redis_server, dsn, "--archive-kinds", "private,channel")


def user(node, name: str | None = None, token: str | None = None):
    client = node.tcp_client()
    client.login(name or unique("u"), token=token)
    return client


def test_after_flushall_tokens_channels_and_seq_come_back(start_server, redis_server, redis_db, dsn, postgres_server):
    first, scraper = archive_node(start_server, redis_server, dsn)
    alice, bob, carol, erin = (user(first, unique(name)) for name in ("alice", "bob", "carol", "erin"))
    secret_room, open_room = unique("secret"), unique("open")
    alice.ok(3, {"name": secret_room, "private": True})
    alice.ok(12, {"channel": secret_room, "userId": bob.user_id})
    bob.ok(3, {"name": secret_room})
    for member in (alice, carol):
        member.ok(3, {"name": open_room})
    revoked_token = carol.token
    carol_token = carol.ok(11)["token"]         # log out everywhere: epoch 1
    dms = [alice.ok(2, {"receiverId": bob.user_id, "content": f"d{n}"}) for n in range(3)]
    posts = [alice.ok(4, {"channel": secret_room, "content": f"p{n}"}) for n in range(4)]
    caught_up(scraper, redis_db, schema.pair_keys(alice.user_id, bob.user_id), schema.channel_keys(secret_room))
    redis_db.flushall()

    # a node started now takes the token secret from the archive: the tokens verify
    second, _ = archive_node(start_server, redis_server, dsn)
    alice2 = user(second, alice.name, token=alice.token)
    bob2 = user(second, bob.name, token=bob.token)
    assert (alice2.user_id, bob2.user_id) == (alice.user_id, bob.user_id)
    assert second.tcp_client().error(1, {"name": carol.name, "token": revoked_token}) == "unauthorized"
    assert user(second, carol.name, token=carol_token).user_id == carol.user_id

    # their channels are still theirs, the private one still private, seq goes on
    assert [m["content"] for m in bob2.ok(5, {"channel": secret_room})["messages"]] == [f"p{n}" for n in range(4)]
    assert alice2.ok(4, {"channel": secret_room, "content": "again"})["seq"] == posts[-1]["seq"] + 1
    action, pushed = bob2.recv_push()       # bob's connection follows his channels from its login
    assert (action, pushed["channel"], pushed["content"]) == (102, secret_room, "again")
    assert user(second).error(3, {"name": secret_room}) == "forbidden"
    assert user(second).ok(3, {"name": open_room}) == {}
    assert alice2.ok(2, {"receiverId": bob.user_id, "content": "again"})["seq"] == dms[-1]["seq"] + 1

    # PostgreSQL down: a user Redis lost cannot be told from a new one: the call fails
    postgres_server.kill()
    try:
        assert wait_for(lambda: not postgres_server.accepts_connections(), 10), "PostgreSQL is down"
        assert second.tcp_client().error(1, {"name": erin.name, "token": erin.token}, timeout=30) == "internal"
    finally:
        postgres_server.restart(down_for=0)
    deadline = time.monotonic() + 30
    while True:     # the link comes back on its own
        answer = second.tcp_client().call(1, {"name": erin.name, "token": erin.token})
        if "error" not in answer or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.get("id") == str(erin.user_id), answer

    # Redis signing with another secret than the archive's: a node refuses to start
    redis_db.set(schema.SECRET_KEY, b"x" * 32)
    redis_db.delete(schema.SECRET_ID_KEY)
    with pytest.raises(AssertionError, match="differs from the archive's"):
        archive_node(start_server, redis_server, dsn)
