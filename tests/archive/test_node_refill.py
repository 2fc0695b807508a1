"""A Redis that lost its data (``FLUSHALL``) is filled again from the archive as
it is used (zim.nodes.refill): the token secret outlives it, tokens still
verify (and a revoked one stays revoked), users keep their channels, a private
channel still refuses a user without a grant, seq goes on from where it was,
and a PostgreSQL that is down fails the call rather than let "unknown" pass
for "new".

Real node processes, a real redis-server and a real PostgreSQL (one of each for
the module); the archive's rows are written with tests.support.archive_rows
from what the test did while Redis held everything.
"""
from __future__ import annotations

import time

import pytest
import redis

from tests.support import postgres_servers
from tests.support.archive_rows import archive_channel, archive_messages, archive_user
from tests.support.client import unique
from tests.support.clusters import require
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server

from zim.archive.schema import migrate
from zim.testing.redis import LocalRedis

pytestmark = [requires_postgres, requires_redis_server]
postgres_server = postgres_servers.postgres_server


@pytest.fixture(scope="module")
def redis_server():
    require("redis-server")
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def dsn(postgres_server) -> str:
    found = postgres_server.create_database("node_refill")
    migrate(found)
    return found


def start_node(start_server, redis_server, dsn):
    return start_server(["--redis", redis_server.url, "--archive", dsn, "--archive-kinds", "private,channel",
                         "--channel-rate", "0", "--user-rate", "0"])


def user(node, name: str | None = None, token: str | None = None):
    client = node.tcp_client()
    client.login(name or unique("u"), token=token)
    return client


def archive_users(dsn: str, *users_and_channels) -> None:
    for client, epoch, channels in users_and_channels:
        archive_user(dsn, client.user_id, client.name, epoch, channels)


def test_after_flushall_tokens_channels_and_seq_come_back(start_server, redis_server, dsn, postgres_server):
    first = start_node(start_server, redis_server, dsn)
    alice, bob, carol, erin = (user(first, unique(name)) for name in ("alice", "bob", "carol", "erin"))
    secret_room, open_room = unique("secret"), unique("open")
    alice.ok(3, {"name": secret_room, "private": True})
    alice.ok(12, {"channel": secret_room, "userId": bob.user_id})
    bob.ok(3, {"name": secret_room})
    for member in (alice, carol):
        member.ok(3, {"name": open_room})
    dms = [alice.ok(2, {"receiverId": bob.user_id, "content": f"d{n}"}) for n in range(3)]
    posts = [alice.ok(4, {"channel": secret_room, "content": f"p{n}"}) for n in range(4)]
    revoked_token = carol.token
    carol_token = carol.ok(11)["token"]         # log out everywhere: epoch 1
    # what the archiver keeps (tests.support.archive_rows)
    archive_users(dsn, (alice, 0, [secret_room, open_room]), (bob, 0, [secret_room]), (carol, 1, [open_room]),
                  (erin, 0, []))
    archive_channel(dsn, secret_room, True, [(alice.user_id, True), (bob.user_id, False)])
    archive_channel(dsn, open_room, False)
    archive_messages(dsn, alice.ok(5, {"userId": bob.user_id})["messages"], pair=(alice.user_id, bob.user_id))
    archive_messages(dsn, alice.ok(5, {"channel": secret_room})["messages"], channel=secret_room)
    redis.Redis.from_url(redis_server.url).flushall()

    # a node started now takes the token secret from the archive: the tokens verify
    second = start_node(start_server, redis_server, dsn)
    alice2 = user(second, alice.name, token=alice.token)
    bob2 = user(second, bob.name, token=bob.token)
    assert (alice2.user_id, bob2.user_id) == (alice.user_id, bob.user_id)
    assert second.tcp_client().error(1, {"name": carol.name, "token": revoked_token}) == "unauthorized"
    assert user(second, carol.name, token=carol_token).user_id == carol.user_id

    # their channels are still theirs, the private one still private, seq goes on
    assert [m["content"] for m in bob2.ok(5, {"channel": secret_room})["messages"]] == [f"p{n}" for n in range(4)]
    assert alice2.ok(4, {"channel": secret_room, "content": "again"})["seq"] == posts[-1]["seq"] + 1
    assert user(second).error(3, {"name": secret_room}) == "forbidden"
    assert user(second).ok(3, {"name": open_room}) == {}
    assert alice2.ok(2, {"receiverId": bob.user_id, "content": "again"})["seq"] == dms[-1]["seq"] + 1

    # PostgreSQL down: a user Redis lost cannot be told from a new one: the call fails
    postgres_server.kill()
    try:
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
