"""Several zim nodes on one Redis (and on a 3-master Redis Cluster): two nodes
with two workers each serve one IM service. Private messages and channel pushes
cross nodes, tokens work on every node, seq stays gap-free with senders on both,
history reads the same from either, a node killed with SIGKILL leaves its users'
mailboxes to be read on the other, and a Redis restarted under load loses
nothing that was acknowledged.

Every test runs on both backends (the module's ``backend`` fixture).
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import psutil
import pytest
from tests.support.node_servers import Backend, backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.support.servers import free_port
from tests.server.test_metrics import Scraper
from tests.storage.test_storage_durable import Sender, all_history, drain_mailbox, kill_everything
from tests.support.client import unique

from zim.nodes import schema
from zim.nodes.node import NODE_LIFETIME_MS

pytestmark = requires_redis_server

NODE_FLAGS = ("--workers", "2", "--channel-rate", "0")


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend(request) -> Backend:
    yield from backend_fixture(request.param)


@pytest.fixture(scope="module")
def nodes(backend, start_module_server):
    """Nodes A and B, two workers each, on the module's Redis."""
    return [start_module_server([*NODE_FLAGS, "--redis", backend.url]) for _ in range(2)]


@contextlib.contextmanager
def redis_client(backend: Backend):
    """A blocking redis-py client of the backend (a cluster client on a cluster)."""
    import redis
    from redis.cluster import RedisCluster

    client = (RedisCluster if backend.kind == "cluster" else redis.Redis).from_url(backend.url)
    try:
        yield client
    finally:
        client.close()


def logged_in(node, name: str | None = None, token: str | None = None):
    client = node.tcp_client()
    client.login(name or unique("u"), token=token)
    return client


def test_a_private_message_crosses_nodes_both_ways(nodes):
    a, b = nodes
    alice, bob = logged_in(a, "alice"), logged_in(b, "bob")
    sent = alice.ok(2, {"receiverId": bob.user_id, "content": "hi bob"})
    action, pushed = bob.recv_push()
    assert action == 101 and pushed["id"] == sent["id"] and pushed["seq"] == sent["seq"] == 1
    assert pushed["sender"] == {"id": alice.user_id, "name": "alice"} and pushed["content"] == "hi bob"
    answer = bob.ok(2, {"receiverId": alice.user_id, "content": "hi alice"})
    action, pushed = alice.recv_push()
    assert (action, pushed["id"], pushed["seq"]) == (101, answer["id"], 2)
    # the mailbox is the same whichever node reads it
    assert [m["id"] for m in bob.ok(7)["messages"]] == [sent["id"]]
    # the sender's other connection, on the other node, gets its own message too
    alice_on_b = logged_in(b, "alice", token=alice.token)
    assert alice_on_b.recv_push()[1]["id"] == answer["id"]     # her mailbox, at login
    again = alice.ok(2, {"receiverId": bob.user_id, "content": "again"})
    assert alice_on_b.recv_push()[1]["id"] == again["id"]
    assert bob.recv_push()[1]["id"] == again["id"]


def test_a_token_from_one_node_works_on_the_other_at_once(nodes):
    a, b = nodes
    for _ in range(20):
        first = logged_in(a)
        resumed = b.tcp_client()
        assert resumed.login(first.name, token=first.token)["id"] == first.user_id
        first.close()
        resumed.close()
    # a token is still checked: a forged one is refused on either node
    forged = b.tcp_client()
    assert forged.error(1, {"name": "x", "token": first.user_id + ".AAAAAAAAAAAAAAAAAAAAAA"}) == "unauthorized"


def test_a_user_created_on_one_node_is_known_to_the_other_at_once(nodes):
    a, b = nodes
    for _ in range(20):
        newcomer = logged_in(a)
        writer = logged_in(b)
        # B never saw the newcomer: it asks Redis before answering not_found
        writer.ok(2, {"receiverId": newcomer.user_id, "content": "welcome"})
        assert newcomer.recv_push()[1]["content"] == "welcome"
        newcomer.close()
        writer.close()
    assert logged_in(b).error(2, {"receiverId": "12345", "content": "x"}) == "not_found"


def test_a_channel_with_members_on_both_nodes(nodes):
    a, b = nodes
    channel = unique("both")
    members = [logged_in(node) for node in (a, a, b, b)]
    for member in members:
        member.ok(3, {"name": channel})
    for sender in (members[0], members[2]):
        sent = sender.ok(4, {"channel": channel, "content": f"from {sender.name}"})
        for member in members:
            if member is sender:
                continue
            action, pushed = member.recv_push()
            assert (action, pushed["id"], pushed["seq"], pushed["channel"]) == (102, sent["id"], sent["seq"],
                                                                                channel)
        sender.assert_no_push()
    # a member who joined on A and sends from B is a member there at once
    late = logged_in(a)
    late.ok(3, {"name": channel})
    late_on_b = logged_in(b, late.name, token=late.token)
    assert late_on_b.ok(4, {"channel": channel, "content": "late"})["seq"] == 3
    for member in (*members, late):
        assert member.recv_push()[1]["content"] == "late"
    # ...and a stranger is refused on both nodes
    stranger = logged_in(b)
    assert stranger.error(4, {"channel": channel, "content": "x"}) == "forbidden"
    assert stranger.error(4, {"channel": unique("none"), "content": "x"}) == "not_found"
    # leaving on one node stops the pushes on the other
    members[3].ok(6, {"name": channel})
    members[0].ok(4, {"channel": channel, "content": "after the leave"})
    assert members[1].recv_push()[1]["content"] == "after the leave"
    members[3].assert_no_push(0.3)


def test_a_join_on_one_node_reaches_the_users_connections_on_the_other(nodes):
    a, b = nodes
    channel = unique("feed")
    carol_a = logged_in(a)
    carol_b = logged_in(b, carol_a.name, token=carol_a.token)
    dave = logged_in(b)
    dave.ok(3, {"name": channel})
    carol_a.ok(3, {"name": channel})        # joined on A: her connection on B follows too
    deadline = time.monotonic() + 5
    while True:                             # B learns of the join over the feed, a moment later
        sent = dave.ok(4, {"channel": channel, "content": "to both of carol's"})
        assert carol_a.recv_push()[1]["id"] == sent["id"]
        try:
            assert carol_b.recv_push(0.5)[1]["id"] == sent["id"]
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "carol's connection on B never followed the channel"
    carol_a.ok(6, {"name": channel})        # and leaving on A stops them on B
    deadline = time.monotonic() + 5
    while True:
        dave.ok(4, {"channel": channel, "content": "to nobody"})
        try:
            carol_b.recv_push(0.5)
        except TimeoutError:
            break
        assert time.monotonic() < deadline, "carol's connection on B kept the channel"
    carol_a.assert_no_push()


def test_merged_pushes_cross_nodes(backend, start_server):
    flags = [*NODE_FLAGS, "--push-window-ms", "100", "--redis", backend.url]
    a, b = (start_server(flags) for _ in range(2))
    channel = unique("merged")
    sender, near, far = logged_in(a), logged_in(a), logged_in(b)
    for client in (sender, near, far):
        client.ok(3, {"name": channel})
    sent = [sender.ok(4, {"channel": channel, "content": f"m{i}"})["id"] for i in range(3)]
    for member in (near, far):
        action, batch = member.recv_push()
        assert action == 103 and batch["channel"] == channel
        assert [m["id"] for m in batch["messages"]] == sent and batch["skipped"] == 0
    sender.assert_no_push()


def test_seq_is_gap_free_with_senders_on_both_nodes_and_history_reads_the_same(nodes):
    a, b = nodes
    channel = unique("seq")
    senders = [logged_in(node) for node in (a, b, a, b)]
    for sender in senders:
        sender.ok(3, {"name": channel, "push": False})
    acked: dict[str, int] = {}
    lock = threading.Lock()

    def send(client, count: int) -> None:
        for i in range(count):
            result = client.ok(4, {"channel": channel, "content": f"{client.name} {i}"})
            with lock:
                acked[result["id"]] = result["seq"]

    threads = [threading.Thread(target=send, args=(sender, 100)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(acked.values()) == list(range(1, 401))
    from_a, from_b = all_history(senders[0], channel=channel), all_history(senders[1], channel=channel)
    assert from_a == from_b
    assert {m["id"]: m["seq"] for m in from_a} == acked
    # a private conversation too, written from both nodes
    x, y = senders[0], senders[1]
    for i in range(10):
        (x if i % 2 else y).ok(2, {"receiverId": (y if i % 2 else x).user_id, "content": str(i)})
    pair_a, pair_b = all_history(x, userId=y.user_id), all_history(y, userId=x.user_id)
    assert pair_a == pair_b and [m["seq"] for m in pair_a] == list(range(1, 11))


def test_the_users_of_a_killed_node_resume_on_the_other_and_find_their_mailbox(backend, start_server):
    a, b = (start_server([*NODE_FLAGS, "--redis", backend.url]) for _ in range(2))
    bob = logged_in(b, "bob")
    channel = unique("after-kill")
    bob.ok(3, {"name": channel})
    alice = logged_in(a, "alice")
    alice.ok(3, {"name": channel})
    before = alice.ok(2, {"receiverId": bob.user_id, "content": "before"})
    assert bob.recv_push()[1]["id"] == before["id"]        # pushed, not acked
    b_pid = b.proc.pid
    kill_everything(b)
    during = [alice.ok(2, {"receiverId": bob.user_id, "content": f"during {i}"})["id"] for i in range(5)]
    resumed = logged_in(a, "bob", token=bob.token)
    pushed = resumed.recv_pushes(6)
    assert [m["id"] for _, m in pushed] == [before["id"], *during]
    assert [m["id"] for m in drain_mailbox(resumed)] == [before["id"], *during]
    # its channels follow it: a push reaches it on A
    sent = alice.ok(4, {"channel": channel, "content": "welcome back"})
    assert resumed.recv_push()[1]["id"] == sent["id"]
    # once B's beat has run out, A sweeps B's presence fields and forgets B
    presence = schema.user_keys(int(bob.user_id)).presence
    with redis_client(backend) as client:
        # a node id is "<host>-<pid>-<start ms>"
        node_b = next(field for field in client.hkeys(presence) if f"-{b_pid}-".encode() in field)
        fields = set(client.hkeys(presence))
        assert len(fields) == 2                               # B's field (stale) and A's
        deadline = time.monotonic() + NODE_LIFETIME_MS / 1000 + 10
        while len(client.hkeys(presence)) > 1 or client.zscore(schema.NODES_KEY, node_b) is not None:
            assert time.monotonic() < deadline, "the dead node's presence was never swept"
            time.sleep(0.2)
        assert (node_b,) == tuple(fields - set(client.hkeys(presence)))


def test_the_users_of_a_dead_worker_leave_the_nodes_presence(backend, start_server):
    node = start_server([*NODE_FLAGS, "--redis", backend.url])
    users = [logged_in(node) for _ in range(6)]
    presences = [schema.user_keys(int(user.user_id)).presence for user in users]
    with redis_client(backend) as client:
        assert all(len(client.hkeys(presence)) == 1 for presence in presences)
        for worker in psutil.Process(node.proc.pid).children():
            if "zim.worker" in worker.cmdline():
                worker.kill()               # the router notices, restarts it, and forgets its users
        deadline = time.monotonic() + 10
        while any(client.hkeys(presence) for presence in presences):
            assert time.monotonic() < deadline, "a dead worker's users stayed present"
            time.sleep(0.1)
    deadline = time.monotonic() + 15
    while True:                             # a restarted worker serves again (once it listens)
        try:
            back = logged_in(node, users[0].name, token=users[0].token)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "no worker listened again"
            time.sleep(0.1)
    with redis_client(backend) as client:
        assert len(client.hkeys(presences[0])) == 1
    back.close()


def test_redis_restarted_under_load_loses_nothing_acknowledged(backend, start_server):
    # no cap: every acknowledged message must be found in history afterwards
    flags = [*NODE_FLAGS, "--retain-channel", "0:0", "--retain-private", "0:0", "--redis", backend.url]
    metrics = [free_port(), free_port()]        # /readyz: every Redis link of the node is up
    a, b = (start_server([*flags, "--metrics", f"127.0.0.1:{port}"]) for port in metrics)
    channel = unique("restart")
    receivers = []
    for i in range(4):
        receiver = logged_in((a, b)[i % 2])
        receivers.append(receiver)
    senders = []
    for i in range(4):
        client = logged_in((b, a)[i % 2])
        client.ok(3, {"name": channel, "push": False})
        senders.append(Sender(client, receivers[i].user_id, channel))
    for sender in senders:
        sender.start()
    time.sleep(1.0)
    backend.restart(which=len(backend.servers) - 1)
    time.sleep(1.5)
    for sender in senders:
        sender.stop.set()
    for sender in senders:
        sender.join(30)
        assert not sender.is_alive()
        assert set(sender.errors) <= {"internal"}, sender.errors[:5]
    acked_channel = {k: v for s in senders for k, v in s.acked_channel.items()}
    assert len(acked_channel) > 50, "the senders barely sent anything"
    # the nodes recover by themselves: a send goes through again within seconds
    deadline = time.monotonic() + 15
    while "seq" not in senders[0].client.call(4, {"channel": channel, "content": "after"}):
        assert time.monotonic() < deadline, "the node never recovered from the Redis restart"
        time.sleep(0.2)
    stored = all_history(senders[1].client, channel=channel)
    by_id = {m["id"]: m["seq"] for m in stored}
    lost = {k: (v, by_id.get(k)) for k, v in acked_channel.items() if by_id.get(k) != v}
    assert not lost, (len(lost), len(acked_channel), len(stored), sorted(lost.items(), key=lambda x: x[1])[:10])
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    for sender, receiver in zip(senders, receivers):
        mailbox = {m["id"] for m in drain_mailbox(receiver)}
        assert set(sender.acked_dms) <= mailbox
        pair = {m["id"]: m["seq"] for m in all_history(receiver, userId=sender.client.user_id)}
        assert all(pair.get(k) == v for k, v in sender.acked_dms.items())
    # pushes cross nodes again once the nodes say they are ready: their subscriber links
    # reconnect on their own back-off, after the command links a send needs
    for port in metrics:
        scraper = Scraper(port)
        deadline = time.monotonic() + 15
        while scraper.get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, f"a node never got ready again: {scraper.get('/readyz')}"
            time.sleep(0.1)
    listener, talker = logged_in(a), logged_in(b)
    room = unique("room")
    listener.ok(3, {"name": room})
    talker.ok(3, {"name": room})
    # node A subscribes to the room's pushes as its listener joins; on a cluster the link
    # to the restarted shard may still be coming back, and a push published before the
    # subscription holds is not resent (pub/sub is at most once: clients fill gaps from
    # history): a push crosses once the subscription is in place
    sent, deadline = set(), time.monotonic() + 15
    while True:
        sent.add(talker.ok(4, {"channel": room, "content": "still here"})["id"])
        try:
            assert listener.recv_push(timeout=1.0)[1]["id"] in sent
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "no push crossed the nodes after the Redis restart"


@pytest.mark.parametrize("url, says", [
    ("redis://127.0.0.1:{closed}/0", "could not be reached"),
    ("http://127.0.0.1:{closed}/0", "redis://"),
])
def test_a_node_whose_redis_cannot_be_used_exits_with_a_clear_error(tmp_path, zim_env, url, says):
    from tests.support.servers import free_port

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "zim", "--tcp", f"127.0.0.1:{free_port()}", "--ws", "off",
                             "--redis", url.format(closed=free_port())],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=zim_env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr, result.stderr
    assert time.monotonic() - started < 30


def test_compressed_tcp_members_get_pushes_from_the_other_node(nodes):
    """A login asking for compression on node B (NodeFabric, workers): pushes sent
    on node A arrive compressed and inflate to what a plain member gets."""
    from tests.protocol.test_tcp_deflate import WireTcp, prose
    from zim.client import SEQ_DEFLATED

    a, b = nodes
    packed = WireTcp(b.tcp_port)
    b.clients.append(packed)
    assert packed.login(unique("packed"))["compress"] == "deflate"
    plain, sender = logged_in(b), logged_in(a)
    channel = unique("packed")
    for member in (packed, plain, sender):
        member.ok(3, {"name": channel})
    sender.ok(4, {"channel": channel, "content": prose(500)})
    sender.ok(2, {"receiverId": packed.user_id, "content": prose(300)})
    got = packed.recv_pushes(2)
    assert got[0] == plain.recv_push() and got[0][1]["content"] == prose(500)
    assert got[1][0] == 101 and got[1][1]["content"] == prose(300)
    assert [bool(seq & SEQ_DEFLATED) for action, seq, _ in packed.wire if action in (101, 102)] == [True, True]
