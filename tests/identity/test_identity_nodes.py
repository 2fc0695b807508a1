"""JWT logins and private channels on two zim nodes sharing one Redis (and a
3-master Redis Cluster): each node verifies JWTs itself; a channel made private,
a grant or an invitation on one node is honoured on the other at once, and a
grant given back on one is gone on the other."""
from __future__ import annotations

import time

import jwt
import pytest

from tests.identity.test_jwt_login import user_number
from tests.nodes.test_nodes import redis_client
from tests.identity.test_jwtauth import SECRET, write
from tests.support.client import unique
from tests.support.node_servers import Backend, backend_fixture
from tests.support.redis_servers import requires_redis_server
from zim.nodes import schema

pytestmark = requires_redis_server

SUBSCRIBE, SEND_CHANNEL, UNSUBSCRIBE, INVITE = 3, 4, 6, 12


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend(request) -> Backend:
    yield from backend_fixture(request.param)


@pytest.fixture(scope="module")
def nodes(backend, start_module_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    keys.chmod(0o700)
    flags = ["--workers", "1", "--redis", backend.url, "--jwt-key", write(keys / "secret", SECRET)]
    return [start_module_server(flags) for _ in range(2)]


def on(node, name: str = "u", **claims):
    """A user logged in on ``node`` with a JWT (a new sub unless given)."""
    client = node.tcp_client()
    payload = {"sub": user_number(), "exp": int(time.time()) + 600, **claims}
    client.login(unique(name), jwt=jwt.encode(payload, SECRET, "HS256"))
    return client


def test_a_jwt_user_made_on_one_node_logs_in_on_the_other(nodes):
    a, b = nodes
    sub = user_number()
    first = on(a, sub=sub)
    again = on(b, sub=sub)
    assert first.user_id == again.user_id == sub
    # the user exists for the other node at once: a direct message reaches it
    again.ok(2, {"receiverId": first.user_id, "content": "from b"})
    assert first.recv_push()[1]["content"] == "from b"


def test_a_grant_made_on_one_node_is_honoured_on_the_other(nodes):
    a, b = nodes
    owner, bob, stranger = on(a, "owner"), on(b, "bob"), on(b, "stranger")
    channel = unique("secret")
    owner.ok(SUBSCRIBE, {"name": channel, "private": True})
    assert stranger.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    owner.ok(INVITE, {"channel": channel, "userId": bob.user_id})
    assert bob.recv_push() == (104, {"channel": channel, "by": {"id": owner.user_id, "name": owner.name}})
    bob.ok(SUBSCRIBE, {"name": channel})
    owner.ok(SEND_CHANNEL, {"channel": channel, "content": "across"})
    assert bob.recv_push()[1]["content"] == "across"
    assert stranger.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    # given back on B (leaving), gone on A
    bob.ok(UNSUBSCRIBE, {"name": channel})
    bob_on_a = a.tcp_client()
    bob_on_a.login(bob.name, token=bob.token)
    assert bob_on_a.error(SUBSCRIBE, {"name": channel}) == "forbidden"


def test_an_inviter_on_the_other_node(nodes):
    """The creator's invite right, made on A, lets it invite from B."""
    a, b = nodes
    owner, carol = on(a, "owner"), on(a, "carol")
    channel = unique("secret")
    owner.ok(SUBSCRIBE, {"name": channel, "private": True})
    owner_on_b = b.tcp_client()
    owner_on_b.login(owner.name, token=owner.token)
    owner_on_b.ok(INVITE, {"channel": channel, "userId": carol.user_id})
    assert carol.recv_push()[0] == 104
    carol.ok(SUBSCRIBE, {"name": channel})


def test_a_claim_on_one_node_for_a_channel_made_on_the_other(nodes):
    a, b = nodes
    owner = on(a, "owner")
    channel = unique("secret")
    owner.ok(SUBSCRIBE, {"name": channel, "private": True})
    on(b, "claimed", channels=[channel]).ok(SUBSCRIBE, {"name": channel})
    assert on(b, "unclaimed").error(SUBSCRIBE, {"name": channel}) == "forbidden"


def test_a_channel_and_grant_never_announced_are_read_before_a_join(nodes, backend):
    """Written straight into Redis (as a node whose change feed message was lost
    would leave them): a join still reads the flag and the grant there."""
    a, b = nodes
    channel = unique("quiet")
    bob, stranger = on(b, "bob"), on(b, "stranger")
    with redis_client(backend) as redis:
        assert schema.execute(redis, schema.channel_make_command(channel, None, True)) == 1
        schema.execute(redis, schema.grant_command(channel, int(bob.user_id), False))
    assert stranger.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    bob.ok(SUBSCRIBE, {"name": channel})


def test_a_join_meant_for_a_new_public_channel_does_not_enter_a_private_one(nodes, backend):
    """Another node made the channel private between a node's check and its join:
    the join scripts refuse, so nobody gets in without a grant."""
    channel = unique("raced")
    with redis_client(backend) as redis:
        assert schema.execute(redis, schema.channel_make_command(channel, 1, True)) == 1
        refused = (schema.channel_join_command(channel, 2, True, public_only=True),
                   schema.channel_create_command(channel, 2, True))
        assert [schema.execute(redis, command) for command in refused] == [schema.FOUND_PRIVATE] * 2
        assert redis.hgetall(schema.channel_keys(channel).members) == {}
        assert schema.execute(redis, schema.channel_join_command(channel, 2, True)) == 1    # with a grant
