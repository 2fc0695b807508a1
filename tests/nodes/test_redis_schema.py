"""The Redis layout of zim.nodes.schema against a real redis-server and a real
local 3-master Redis Cluster (tests/support/clusters.py): seq, history paging,
retention tiers, mailboxes, hash slots, and the EVALSHA/EVAL fallback."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from tests.support.clusters import local_cluster, local_redis
from zim.nodes import schema
from zim.nodes.schema import execute
from zim.storage.retention import Retention, Tier
from zim.storage.store import page

KEEP_ALL = Retention(private=Tier(0, 0), channel=Tier(0, 0), large=Tier(0, 0))
MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def single_redis():
    with local_redis() as client:
        yield client


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as client:
        yield client


@pytest.fixture(params=["single", "cluster"])
def client(request):
    """Each test using this runs on a plain server and on the cluster."""
    return request.getfixturevalue("single_redis" if request.param == "single" else "cluster")


def another_client(client):
    """A second client (its own connections) to the same server or cluster."""
    if isinstance(client, RedisCluster):
        node = client.get_default_node()
        return RedisCluster(host=node.host, port=node.port)
    options = client.get_connection_kwargs()
    return redis.Redis(host=options["host"], port=options["port"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def fresh_user() -> int:
    """A user id no other test uses (the servers live for the whole module)."""
    return uuid.uuid4().int >> 65 or 1


def now_ms() -> int:
    return int(time.time() * 1000)


def message(number: int, channel: str | None = None, created_ms: int | None = None) -> dict:
    msg = {"id": str(7_259_483_021_034_782_720 + number), "content": f"message {number}",
           "sender": {"id": "42", "name": "alice"},
           "createdAt": now_ms() if created_ms is None else created_ms}
    if channel is not None:
        msg["channel"] = channel
    return msg


def append_channel(client, channel: str, msg: dict, retention: Retention = KEEP_ALL) -> int:
    return execute(client, schema.append_channel_command(channel, msg, now_ms(), retention))


def join(client, channel: str, user_id: int, push: bool = True) -> None:
    for step in schema.subscribe_steps(channel, user_id, push):
        execute(client, step)


def history(client, keys: schema.ConversationKeys, before_seq: int | None, limit: int):
    reply = execute(client, schema.history_command(keys, before_seq, limit))
    return schema.parse_history(reply, limit)


def seqs(messages: list[dict]) -> list[int]:
    return [msg["seq"] for msg in messages]


def send_direct(client, sender: int, receiver: int, msg: dict,
                retention: Retention = KEEP_ALL) -> int:
    """A direct message as a node sends it: history, then the mailbox copy."""
    seq = execute(client, schema.append_pair_command(sender, receiver, msg, now_ms(), retention))
    execute(client, schema.mailbox_add_command(receiver, dict(msg, seq=seq)))
    return seq


# ---------------------------------------------------------------- seq


def test_seq_is_gap_free_under_concurrent_appends(client):
    channel = unique("busy")
    join(client, channel, 1)
    given_seqs: list[list[int]] = [[] for _ in range(8)]

    def sender(index: int) -> None:
        own = another_client(client)
        try:
            for number in range(200):
                given_seqs[index].append(append_channel(own, channel, message(index * 1000 + number)))
        finally:
            own.close()

    threads = [threading.Thread(target=sender, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = sorted(seq for one in given_seqs for seq in one)
    assert everything == list(range(1, 1601))
    for one in given_seqs:      # each sender saw its own seqs increase
        assert one == sorted(one)
    stored, more = history(client, schema.channel_keys(channel), None, 2000)
    assert seqs(stored) == list(range(1, 1601)) and not more


# ---------------------------------------------------------------- history


def test_history_paging_edges(client):
    channel = unique("edges")
    keys = schema.channel_keys(channel)
    assert history(client, keys, None, 20) == ([], False)
    assert history(client, keys, 5, 20) == ([], False)
    join(client, channel, 1)
    sent = [message(number, channel) for number in range(1, 6)]
    for msg in sent:
        append_channel(client, channel, msg)
    five, more = history(client, keys, None, 5)
    assert seqs(five) == [1, 2, 3, 4, 5] and not more
    assert five[0] == dict(sent[0], seq=1)            # the message comes back whole
    newest_four, more = history(client, keys, None, 4)
    assert seqs(newest_four) == [2, 3, 4, 5] and more
    assert history(client, keys, 1, 20) == ([], False)
    assert history(client, keys, 0, 20) == ([], False)
    assert seqs(history(client, keys, 2, 20)[0]) == [1]
    middle, more = history(client, keys, 4, 2)
    assert seqs(middle) == [2, 3] and more
    assert seqs(history(client, keys, 100, 2)[0]) == [4, 5]
    assert history(client, keys, None, 0) == ([], True)   # as store.page: older ones exist


def test_history_of_a_pair_is_the_same_from_either_side(client):
    low, high = fresh_user(), 18_446_744_073_709_551_615    # the largest id, too
    first = send_direct(client, high, low, message(1))
    second = send_direct(client, low, high, message(2))
    assert (first, second) == (1, 2)
    assert schema.pair_keys(low, high) == schema.pair_keys(high, low)
    messages, more = history(client, schema.pair_keys(high, low), None, 20)
    assert seqs(messages) == [1, 2] and not more


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(0, 40), before_seq=st.one_of(st.none(), st.integers(-2, 45)),
       limit=st.integers(0, 50))
def test_history_pages_like_store_page(single_redis, count, before_seq, limit):
    channel = unique("paged")
    join(single_redis, channel, 1)
    log = [message(number, channel) for number in range(1, count + 1)]
    pipe = single_redis.pipeline(transaction=False)
    for msg in log:
        pipe.execute_command(*schema.append_channel_command(channel, msg, now_ms(), KEEP_ALL))
    for position, seq in enumerate(pipe.execute() if log else []):
        log[position]["seq"] = seq
    expected_messages, expected_more = page(log, before_seq, limit)
    got_messages, got_more = history(single_redis, schema.channel_keys(channel), before_seq, limit)
    assert got_messages == expected_messages
    assert got_more == expected_more


# ---------------------------------------------------------------- retention


def test_caps_by_tier_and_the_large_tier_by_member_count(client):
    retention = Retention(private=Tier(0, 5), channel=Tier(0, 4), large=Tier(0, 2), large_members=3)
    sender, receiver = fresh_user(), fresh_user()
    channel = unique("capped")
    keys = schema.channel_keys(channel)
    join(client, channel, 1)
    join(client, channel, 2)
    for number in range(10):
        append_channel(client, channel, message(number), retention)
    assert client.xlen(keys.log) == 4
    assert seqs(history(client, keys, None, 20)[0]) == [7, 8, 9, 10]
    join(client, channel, 3)            # three members: now a large channel
    append_channel(client, channel, message(11), retention)
    assert seqs(history(client, keys, None, 20)[0]) == [10, 11]
    for number in range(8):
        send_direct(client, sender, receiver, message(number), retention)
    assert seqs(history(client, schema.pair_keys(sender, receiver), None, 20)[0]) == [4, 5, 6, 7, 8]


def test_ttl_by_tier_on_the_log_never_on_seq(client):
    retention = Retention(private=Tier(3 * MINUTE_MS, 0), channel=Tier(2 * MINUTE_MS, 0),
                          large=Tier(MINUTE_MS, 0), large_members=2)
    small, large = unique("small"), unique("large")
    join(client, small, 1)
    join(client, large, 1)
    join(client, large, 2)
    append_channel(client, small, message(1), retention)
    append_channel(client, large, message(2), retention)
    sender, receiver = fresh_user(), fresh_user()
    pair = schema.pair_keys(sender, receiver)
    send_direct(client, sender, receiver, message(3), retention)
    for keys, ttl in ((schema.channel_keys(small), 2 * MINUTE_MS),
                      (schema.channel_keys(large), MINUTE_MS), (pair, 3 * MINUTE_MS)):
        assert ttl - 5000 < client.pttl(keys.log) <= ttl
        assert client.pttl(keys.seq) == -1
    assert client.pttl(schema.user_keys(receiver).box) == -1      # a mailbox waits for its ack


def test_expired_messages_leave_from_the_head_on_append(client):
    retention = Retention(channel=Tier(MINUTE_MS, 0))
    channel = unique("aging")
    join(client, channel, 1)
    old = now_ms() - 2 * MINUTE_MS
    for number in range(12):
        append_channel(client, channel, message(number, created_ms=old), retention)
    append_channel(client, channel, message(12), retention)
    append_channel(client, channel, message(13), retention)
    # each append drops at most 8 expired ones: 12 expired went in two appends
    assert seqs(history(client, schema.channel_keys(channel), None, 50)[0]) == [13, 14]


def test_a_quiet_conversation_expires_whole_and_its_seq_goes_on(client):
    retention = Retention(channel=Tier(150, 0))
    channel = unique("quiet")
    keys = schema.channel_keys(channel)
    join(client, channel, 1)
    append_channel(client, channel, message(1), retention)
    append_channel(client, channel, message(2), retention)
    deadline = time.monotonic() + 5
    while client.exists(keys.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.exists(keys.log)
    assert append_channel(client, channel, message(3), retention) == 3
    assert seqs(history(client, keys, None, 20)[0]) == [3]


# ---------------------------------------------------------------- mailboxes


def pull(client, user_id: int, limit: int) -> list[dict]:
    return schema.parse_mailbox(execute(client, schema.mailbox_pull_command(user_id, limit)))


def ack(client, user_id: int, ids) -> None:
    command = schema.mailbox_ack_command(user_id, ids)
    if command is not None:
        execute(client, command)


def test_mailbox_add_pull_ack(client):
    sender, receiver = fresh_user(), fresh_user()
    first, second, third = (message(number) for number in (1, 2, 3))
    for msg in (first, second, third):
        send_direct(client, sender, receiver, msg)
    assert [msg["id"] for msg in pull(client, receiver, 2)] == [first["id"], second["id"]]
    assert pull(client, receiver, 100) == [dict(first, seq=1), dict(second, seq=2), dict(third, seq=3)]
    assert pull(client, receiver, 0) == []
    assert pull(client, sender, 100) == []
    # the same id again keeps its place and takes the new copy
    execute(client, schema.mailbox_add_command(receiver, dict(first, seq=1, content="again")))
    assert [msg["content"] for msg in pull(client, receiver, 100)] == ["again", "message 2", "message 3"]
    ack(client, receiver, [second["id"], "no-such-id", 17, None])
    assert [msg["id"] for msg in pull(client, receiver, 100)] == [first["id"], third["id"]]
    assert schema.mailbox_ack_command(receiver, [17, None]) is None
    ack(client, receiver, [first["id"], third["id"]])
    assert pull(client, receiver, 100) == []
    keys = schema.user_keys(receiver)
    assert client.exists(keys.box) == 0 and client.exists(keys.mail) == 0   # nothing left behind
    # an emptied mailbox starts over and keeps arrival order
    send_direct(client, sender, receiver, message(9))
    assert [msg["id"] for msg in pull(client, receiver, 100)] == [message(9)["id"]]


def test_mailbox_ack_of_many_ids_at_once(client):
    receiver = fresh_user()
    ids = []
    for number in range(2500):     # more than one chunk of the ack script
        msg = message(number)
        ids.append(msg["id"])
        execute(client, schema.mailbox_add_command(receiver, dict(msg, seq=number + 1)))
    ack(client, receiver, ids[:2400])
    assert [msg["seq"] for msg in pull(client, receiver, 1000)] == list(range(2401, 2501))


def test_unacknowledged_direct_messages_outlive_the_history_cap(client):
    retention = Retention(private=Tier(0, 1))
    sender, receiver = fresh_user(), fresh_user()
    for number in range(3):
        send_direct(client, sender, receiver, message(number), retention)
    assert seqs(history(client, schema.pair_keys(sender, receiver), None, 20)[0]) == [3]
    assert [msg["seq"] for msg in pull(client, receiver, 100)] == [1, 2, 3]


# ---------------------------------------------------------------- users, channels, presence


def test_subscribe_and_unsubscribe_keep_both_sides(client):
    channel = unique("club")
    keys = schema.channel_keys(channel)
    assert not client.exists(keys.seq)
    join(client, channel, 5, push=False)
    join(client, channel, 6)
    assert client.hgetall(keys.members) == {b"5": b"0", b"6": b"1"}
    assert client.hget(schema.user_keys(5).channels, channel) == b"0"
    join(client, channel, 5, push=True)     # subscribing again updates the flag
    assert client.hget(keys.members, "5") == b"1"
    assert client.hget(schema.user_keys(5).channels, channel) == b"1"
    results = [execute(client, step) for step in schema.unsubscribe_steps(channel, 5)]
    assert results[-1] == 1
    assert [execute(client, step) for step in schema.unsubscribe_steps(channel, 5)][-1] == 0
    for step in schema.unsubscribe_steps(channel, 6):
        execute(client, step)
    assert client.exists(keys.members) == 0
    assert client.exists(keys.seq) == 1     # the channel outlives its members
    assert append_channel(client, channel, message(1)) == 1


def test_users_names_and_the_shared_secret(client):
    execute(client, schema.user_record_command(31, "alice"))
    assert client.hget(schema.user_keys(31).user, "name") == b"alice"
    execute(client, schema.user_record_command(31, "alicia"))
    assert client.hget(schema.user_keys(31).user, "name") == b"alicia"
    client.delete(schema.SECRET_KEY)
    first = [execute(client, step) for step in schema.secret_steps(b"A" * 32)][-1]
    second = [execute(client, step) for step in schema.secret_steps(b"B" * 32)][-1]
    assert first == second == b"A" * 32


def test_presence_per_node_dead_nodes_and_the_sweep(client):
    users, node = [fresh_user() for _ in range(schema.SWEEP_BATCH + 3)], unique("node")
    for user in users:
        for command in schema.presence_in_commands(user, node):
            execute(client, command)
    assert client.hgetall(schema.user_keys(users[0]).presence) == {node.encode(): b"1"}
    for command in schema.presence_out_commands(users[0], node):
        execute(client, command)
    assert client.hget(schema.user_keys(users[0]).presence, node) is None
    assert not client.sismember(schema.node_users_key(node), users[0])
    now = now_ms()
    execute(client, schema.heartbeat_command(node, now, 3000))
    assert node.encode() not in execute(client, schema.dead_nodes_command(now + 2000))
    assert node.encode() in execute(client, schema.dead_nodes_command(now + 4000))
    # the sweep takes the users in batches, without repeats, until the set is empty
    swept = []
    while batch := execute(client, schema.sweep_step_command(node)):
        assert len(batch) <= schema.SWEEP_BATCH
        swept += [int(user) for user in batch]
    assert sorted(swept) == sorted(users[1:])
    execute(client, schema.forget_node_command(node))
    assert node.encode() not in execute(client, schema.dead_nodes_command(now + 4000))


# ---------------------------------------------------------------- cluster and script cache


def test_every_key_of_a_conversation_shares_one_slot(cluster):
    def slot(key: str) -> int:
        return cluster.execute_command("CLUSTER", "KEYSLOT", key)

    for channel in ("room", "a}b", "{x}", "x:log", "名前"):
        keys = [*schema.channel_keys(channel), *schema.channel_access_keys(channel)]
        assert len({slot(key) for key in keys}) == 1, channel
    assert len({slot(key) for key in schema.pair_keys(3, 1 << 63)[:2]}) == 1
    assert len({slot(key) for key in schema.user_keys(1 << 63)}) == 1
    # and conversations spread over the slots (hence over the masters)
    assert len({slot(schema.channel_keys(f"room{number}").log) for number in range(50)}) > 40


def test_appends_to_conversations_on_every_master(cluster):
    masters = {}
    for number in range(30):
        channel = unique("spread")
        join(cluster, channel, 1)
        assert append_channel(cluster, channel, message(number)) == 1
        node = cluster.get_node_from_key(schema.channel_keys(channel).log)
        masters[node.name] = channel
    assert len(masters) == 3


def test_evalsha_falls_back_to_eval_after_script_flush(client):
    channel = unique("flushed")
    join(client, channel, 1)
    command = schema.append_channel_command(channel, message(1), now_ms(), KEEP_ALL)
    client.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        client.execute_command(*command)
    assert execute(client, command) == 1            # EVAL ran it (the raw EVALSHA did not)
    for script in schema.SCRIPTS:           # what a node loads at start
        loaded = execute(client, script.load_command())
        # a cluster client sends SCRIPT LOAD to every master and answers per master
        assert set(loaded.values() if isinstance(loaded, dict) else [loaded]) == {script.sha.encode()}
    assert client.execute_command(*schema.append_channel_command(channel, message(2), now_ms(), KEEP_ALL)) == 2
