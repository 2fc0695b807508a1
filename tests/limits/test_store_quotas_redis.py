"""Issue 14's store quotas on nodes sharing a Redis (one server and a 3-master
cluster), and the Redis scripts that keep the counts.

The quotas themselves are described in tests/limits/test_store_quotas.py.
"""
from __future__ import annotations

import random
import time

import orjson
import pytest

from tests.limits.quota_helpers import BIG, check_channel_quota, check_mailbox_full, dm, login, message
from tests.support.node_servers import Backend, backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.support.client import error_code, unique


# ------------------------------------------------------------------ nodes (Redis)


QUOTA_NODE_FLAGS = ("--workers", "2", "--channel-rate", "0", "--max-mailbox", "5", "--max-channels-per-user", "3")


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend(request) -> Backend:
    yield from backend_fixture(request.param)


@pytest.fixture(scope="module")
def quota_nodes(backend, start_module_server):
    """Nodes A and B, two workers each, with the quotas, on the module's Redis."""
    return [start_module_server([*QUOTA_NODE_FLAGS, "--redis", backend.url]) for _ in range(2)]


@requires_redis_server
def test_nodes_a_full_mailbox_refuses_dms_and_drops_nothing(quota_nodes):
    check_mailbox_full(quota_nodes[0], quota_nodes[1])


@requires_redis_server
def test_nodes_too_many_channels_also_after_a_node_restart(quota_nodes, backend, start_server):
    a, b = quota_nodes
    alice, bob, names = check_channel_quota(a, b)
    # a node started afresh (an empty cache) counts from Redis
    fresh = start_server(flags=(*QUOTA_NODE_FLAGS, "--redis", backend.url))
    alice = login(fresh, "alice", alice.token)
    assert alice.error(3, {"name": unique("ch")}) == "too_many_channels"
    for name in names[:4]:
        alice.ok(3, {"name": name})                           # existing: joined, also uncached
    # the mailbox counts are Redis's too
    carol, dave = login(fresh), login(a)
    for number in range(5):
        carol.ok(2, {"receiverId": dave.user_id, "content": f"m{number}"})
    assert error_code(dm(login(b), dave)) == "mailbox_full"
    fresh.stop()


# ------------------------------------------------------------------ the Redis scripts


@pytest.fixture(scope="module")
def redis_client():
    from tests.support.clusters import local_redis

    with local_redis() as client:
        yield client


def fresh_user() -> int:
    return random.getrandbits(40) + 1


@requires_redis_server
def test_redis_mailbox_holds_count_bytes_exactly_and_expire(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import FULL_BY_BYTES, FULL_BY_COUNT, HELD, execute

    client = redis_client
    receiver = fresh_user()
    keys = schema.user_keys(receiver)
    now = int(time.time() * 1000)

    def hold(msg: dict, max_count: int = 3, max_bytes: int = 0, at: int = now) -> tuple[int, str]:
        size = schema.hold_size(msg)
        name = schema.hold_of(msg, size)
        return execute(client, schema.mailbox_hold_command(receiver, name, size, at, max_count, max_bytes)), name

    msgs = [message(i) for i in range(4)]
    holds = []
    for msg in msgs[:3]:
        reply, name = hold(msg)
        assert reply == HELD
        holds.append(name)
    assert hold(msgs[3])[0] == FULL_BY_COUNT                 # three held: full, by count
    for number, (msg, name) in enumerate(zip(msgs[:3], holds)):
        execute(client, schema.mailbox_add_command(receiver, dict(msg, seq=number + 1), name))
    copies = [orjson.dumps(dict(msg, seq=number + 1)) for number, msg in enumerate(msgs[:3])]
    assert int(client.get(keys.bytes)) == sum(map(len, copies))     # exact once added
    assert client.zcard(keys.held) == 0
    assert hold(msgs[3])[0] == FULL_BY_COUNT
    execute(client, schema.mailbox_ack_command(receiver, [msgs[0]["id"], msgs[0]["id"], "nope"]))
    assert int(client.get(keys.bytes)) == len(copies[1]) + len(copies[2])
    # by bytes: what is there plus the hold's upper bound
    used = len(copies[1]) + len(copies[2])
    assert hold(msgs[3], 0, used + schema.hold_size(msgs[3]) - 1)[0] == FULL_BY_BYTES
    reply, name = hold(msgs[3], 0, used + schema.hold_size(msgs[3]))
    assert reply == HELD
    # a send that failed gives its room back; a hold whose send never ended expires
    execute(client, schema.mailbox_release_command(receiver, name))
    execute(client, schema.mailbox_release_command(receiver, name))     # twice: no harm
    assert int(client.get(keys.bytes)) == used
    assert hold(msgs[3])[0] == HELD
    assert hold(message(9), 3, 0)[0] == FULL_BY_COUNT
    later = now + schema.HOLD_MS + 1
    assert hold(message(9), 3, 0, at=later)[0] == HELD       # the stale hold went first
    assert client.zcard(keys.held) == 1 and int(client.get(keys.bytes)) == used + schema.hold_size(message(9))
    # everything acked, the holds gone: nothing is left behind
    client.delete(keys.held)
    execute(client, schema.mailbox_ack_command(receiver, [msgs[1]["id"], msgs[2]["id"]]))
    assert client.exists(keys.box, keys.mail, keys.bytes) == 0


@requires_redis_server
def test_redis_a_mailbox_from_before_the_quota_is_counted_once(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import HELD, execute

    client = redis_client
    receiver = fresh_user()
    keys = schema.user_keys(receiver)
    copies = {}
    for number in range(3):       # as an older zim stored them: no bytes counter
        msg = dict(message(number, BIG), seq=number + 1)
        copies[msg["id"]] = orjson.dumps(msg)
        client.hset(keys.mail, msg["id"], copies[msg["id"]])
        client.zadd(keys.box, {msg["id"]: number + 1})
    total = sum(map(len, copies.values()))
    size = schema.hold_size(message(5))
    reply = execute(client, schema.mailbox_hold_command(receiver, schema.hold_of(message(5), size), size,
                                                        int(time.time() * 1000), 0, total + size))
    assert reply == HELD and int(client.get(keys.bytes)) == total + size


@requires_redis_server
def test_redis_channel_claims(redis_client):
    from zim.nodes import schema
    from zim.nodes.schema import CLAIM_REFUSED, CLAIMED, CLAIMED_BEFORE, execute

    client = redis_client
    user = fresh_user()
    assert execute(client, schema.channel_claim_command(user, "a", 2)) == CLAIMED
    assert execute(client, schema.channel_claim_command(user, "a", 2)) == CLAIMED_BEFORE   # a retry
    assert execute(client, schema.channel_claim_command(user, "b", 2)) == CLAIMED
    assert execute(client, schema.channel_claim_command(user, "c", 2)) == CLAIM_REFUSED
    assert execute(client, schema.channel_claim_command(user, "c", 0)) == CLAIMED          # 0: no limit
    channel = unique("made")
    assert execute(client, schema.channel_join_command(channel, user, True)) == 0
    assert not client.exists(schema.channel_keys(channel).seq)
    assert execute(client, schema.channel_create_command(channel, user, True)) == 1
    assert execute(client, schema.channel_create_command(channel, user + 1, False)) == 0
    assert execute(client, schema.channel_join_command(channel, user + 2, True)) == 1
    assert client.hgetall(schema.channel_keys(channel).members) == {
        str(user).encode(): b"1", str(user + 1).encode(): b"0", str(user + 2).encode(): b"1"}
