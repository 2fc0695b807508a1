"""zim.nodes.client (RedisClient) against a real redis-server and a real local
3-master Redis Cluster, inside a running zim Reactor: routing by slot, pipelines,
the NOSCRIPT fallback, shard pub/sub, a Redis restart, MOVED and ASK."""
from __future__ import annotations

import time
import uuid
from collections import defaultdict

import pytest
import redis
from redis.crc import key_slot

from tests.support.clusters import local_cluster
from tests.support.redis_servers import after, requires_redis_server, run_in_loop
from zim._core import Reactor
from zim.nodes import schema
from zim.nodes.client import ClusterRedis, open_redis, parse_cluster_slots
from zim.nodes.link import SubscriberLink, parse_redis_url
from zim.testing.ports import free_loopback_port
from zim.testing.redis import LocalRedis
from zim.storage.retention import Retention, Tier
from zim.pending import Pending

pytestmark = requires_redis_server

KEEP_ALL = Retention(private=Tier(0, 0), channel=Tier(0, 0), large=Tier(0, 0))
QUICK = {"first_backoff": 0.02, "max_backoff": 0.1}     # reconnect fast: short tests


class Deployment:
    """A running single server or cluster: its URL and a redis-py client per master."""

    def __init__(self, kind: str, url: str, masters: list[tuple[str, int]]) -> None:
        self.kind = kind
        self.url = url
        self.masters = masters
        self.direct = [redis.Redis(host=host, port=port) for host, port in masters]

    def owner_of(self, key: str) -> redis.Redis:
        """The direct client of the master holding ``key``."""
        if len(self.direct) == 1:
            return self.direct[0]
        for first, last, host, port in self.slot_ranges():
            if first <= key_slot(key.encode()) <= last:
                return self.direct[self.masters.index((host, port))]
        raise AssertionError(f"no master holds {key!r}")

    def slot_ranges(self):
        return parse_cluster_slots(self.direct[0].execute_command("CLUSTER", "SLOTS"), "127.0.0.1")

    def close(self) -> None:
        for client in self.direct:
            client.close()


@pytest.fixture(scope="module")
def single_deployment():
    server = LocalRedis().start()
    deployment = Deployment("single", server.url, [(server.host, server.port)])
    try:
        yield deployment
    finally:
        deployment.close()
        server.close()


@pytest.fixture(scope="module")
def cluster_deployment():
    with local_cluster() as cluster:
        masters = sorted((node.host, node.port) for node in cluster.get_primaries())
        deployment = Deployment("cluster", f"redis://{masters[0][0]}:{masters[0][1]}", masters)
        try:
            yield deployment
        finally:
            deployment.close()


@pytest.fixture(params=["single", "cluster"])
def deployment(request) -> Deployment:
    """Each test using this runs on a plain server and on the cluster."""
    return request.getfixturevalue(f"{request.param}_deployment")


def new_reactor() -> Reactor:
    return Reactor(65536, lambda *packet: None)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settled(*pendings: Pending):
    return lambda: all(p.outcome is not None for p in pendings)


def outcome(pending: Pending):
    """The outcome of a settled Pending (settled ones keep it when nobody waited)."""
    assert pending.outcome is not None
    return pending.outcome


def message(channel: str, number: int) -> dict:
    return {"id": str(7_259_483_021_034_782_720 + number), "content": f"{channel} #{number}",
            "sender": {"id": "42", "name": "alice"}, "channel": channel,
            "createdAt": int(time.time() * 1000)}


def append(client, channel: str, number: int) -> Pending:
    return client.call(*schema.append_channel_command(channel, message(channel, number),
                                                      int(time.time() * 1000), KEEP_ALL))


def channels_on_every_master(deployment: Deployment, prefix: str, per_master: int) -> list[str]:
    """Channel names whose keys spread over every master, ``per_master`` each."""
    by_master: dict[int, list[str]] = defaultdict(list)
    number = 0
    while len(by_master) < len(deployment.masters) or min(map(len, by_master.values())) < per_master:
        channel = f"{prefix}-{number}"
        number += 1
        owner = deployment.direct.index(deployment.owner_of(schema.channel_keys(channel).seq))
        if len(by_master[owner]) < per_master:
            by_master[owner].append(channel)
    return [channel for channels in by_master.values() for channel in channels]


def flush_scripts(deployment: Deployment) -> None:
    for direct in deployment.direct:
        direct.script_flush()
        assert direct.script_exists(schema.APPEND.sha) == [False]


# -- routing and calls --------------------------------------------------------------------------

def test_open_redis_learns_the_deployment_and_loads_every_script(deployment):
    flush_scripts(deployment)
    client = open_redis(new_reactor(), deployment.url)
    try:
        assert client.cluster is (deployment.kind == "cluster")
        assert sorted(client.masters) == deployment.masters
        for direct in deployment.direct:
            assert direct.script_exists(*(script.sha for script in schema.SCRIPTS)) == [True] * len(schema.SCRIPTS)
    finally:
        client.close()


def test_calls_are_routed_to_the_master_of_their_key(deployment):
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url, **QUICK)
    channels = channels_on_every_master(deployment, unique("route"), per_master=8)
    node_key_check = unique("node")

    def script():
        yield lambda: client.up
        appended = {channel: [append(client, channel, n) for n in range(1, 4)] for channel in channels}
        keyless = client.call("PING")
        beat = client.call(*schema.heartbeat_command(node_key_check, 1_000, 5_000))
        yield settled(keyless, beat, *(p for ps in appended.values() for p in ps))
        assert outcome(keyless) == (True, b"PONG")
        assert outcome(beat)[0] is True
        for channel, pendings in appended.items():
            assert sorted(outcome(p)[1] for p in pendings) == [1, 2, 3], channel

        pages = {channel: client.call(*schema.history_command(schema.channel_keys(channel), None, 10))
                 for channel in channels}
        expired = client.call(*schema.dead_nodes_command(10_000))      # keyed: NODES_KEY's master
        yield settled(expired, *pages.values())
        assert node_key_check.encode() in outcome(expired)[1]
        for channel, page in pages.items():
            messages, has_more = schema.parse_history(outcome(page)[1], 10)
            assert [m["seq"] for m in messages] == [1, 2, 3] and not has_more
            assert sorted(m["content"] for m in messages) == [f"{channel} #{n}" for n in (1, 2, 3)]

    run_in_loop(reactor, script())
    client.close()
    assert client.redirects == client.subscription_redirects == 0     # every command went where its key is
    for channel in channels:                # and its keys are there
        assert deployment.owner_of(schema.channel_keys(channel).log).exists(
            schema.channel_keys(channel).log) == 1
    assert len({deployment.owner_of(schema.channel_keys(c).seq).connection_pool.connection_kwargs["port"]
                for c in channels}) == len(deployment.masters)


def test_errors_come_back_as_failures(deployment):
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url)
    key = unique("text")

    def script():
        stored = client.call("SET", key, "v")
        wrong = client.call("LPUSH", key, "x")
        yield settled(stored, wrong)
        assert outcome(stored) == (True, b"OK")
        assert outcome(wrong)[0] is False and "WRONGTYPE" in outcome(wrong)[1]

    run_in_loop(reactor, script())
    client.close()
    assert client.call("PING").outcome[0] is False      # closed: fails at once


def test_a_pipeline_in_one_slot(deployment):
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url)
    tag = unique("t")

    def script():
        together = client.pipeline([("SET", f"{{{tag}}}:a", "1"), ("INCR", f"{{{tag}}}:n"),
                                    ("GET", f"{{{tag}}}:a"), ("PING",)])
        failing = client.pipeline([("INCR", f"{{{tag}}}:n"), ("LPUSH", f"{{{tag}}}:a", "x")])
        yield settled(together, failing)
        assert outcome(together) == (True, [b"OK", 1, b"1", b"PONG"])
        assert outcome(failing)[0] is False and "WRONGTYPE" in outcome(failing)[1]
        with pytest.raises(ValueError, match="one hash slot"):
            client.pipeline([("GET", f"{{{tag}}}:a"), ("GET", f"{{{tag}x}}:b")])
        with pytest.raises(ValueError):
            client.pipeline([])
        check = client.call("GET", f"{{{tag}}}:n")
        yield settled(check)
        assert outcome(check) == (True, b"2")       # the failing pipeline's INCR ran all the same

    run_in_loop(reactor, script())
    client.close()


def test_noscript_after_a_script_flush_is_transparent_to_calls_and_pipelines(deployment):
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url)
    channels = channels_on_every_master(deployment, unique("noscript"), per_master=2)
    first, second = channels[0], channels[-1]
    counter = schema.channel_keys(second).seq.replace(":seq", ":counter")

    def script():
        yield lambda: client.up
        flush_scripts(deployment)
        single = [append(client, channel, 1) for channel in channels]
        keys = schema.channel_keys(second)
        mixed = client.pipeline([
            schema.append_channel_command(second, message(second, 2), 1, KEEP_ALL),
            ("INCR", counter),
            schema.append_channel_command(second, message(second, 3), 1, KEEP_ALL),
            ("GET", keys.seq)])
        yield settled(mixed, *single)
        assert [outcome(p) for p in single] == [(True, 1)] * len(channels)
        ok, replies = outcome(mixed)
        assert ok, replies
        # the INCR ran once (only the scripts were sent again); the GET ran before any
        # retried append (the first append's EVAL, then this pipeline's two)
        assert replies == [2, 1, 3, None]
        later = client.call("GET", counter)
        yield settled(later)
        assert outcome(later) == (True, b"1")

    run_in_loop(reactor, script())
    client.close()
    assert deployment.owner_of(schema.channel_keys(first).seq).script_exists(schema.APPEND.sha) == [True]


# -- pub/sub -------------------------------------------------------------------------------------

def test_shard_channels_in_every_slot_deliver_until_unsubscribed(deployment):
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url)
    channels = channels_on_every_master(deployment, unique("sub"), per_master=4)
    received: list[tuple[bytes, bytes]] = []
    client.on_message = lambda channel, data: received.append((channel, data))
    staying, leaving = channels[::2], channels[1::2]

    def script():
        for channel in channels:
            client.subscribe(channel)
        client.subscribe(channels[0])               # twice: still one subscription
        yield lambda: all(client.is_subscribed(channel) for channel in channels)
        counts = [client.publish(channel, f"one {channel}".encode()) for channel in channels]
        yield lambda: len(received) >= len(channels)
        assert [outcome(count) for count in counts] == [(True, 1)] * len(channels)
        assert sorted(received) == sorted((c.encode(), f"one {c}".encode()) for c in channels)

        received.clear()
        for channel in leaving:
            client.unsubscribe(channel)
        # published in the same pass: already not delivered (the link drops them)
        counts = [client.publish(channel, b"two") for channel in channels]
        yield lambda: not any(client.is_subscribed(channel) for channel in leaving)
        counts += [client.publish(channel, b"three") for channel in channels]
        yield lambda: len(received) >= 2 * len(staying)
        yield after(0.05)
        assert all(outcome(count)[0] for count in counts)
        assert [outcome(count)[1] for count in counts[len(channels):]] == \
            [1 if channel in staying else 0 for channel in channels]    # Redis forgot them too
        assert sorted(received) == sorted((c.encode(), data) for c in staying for data in (b"two", b"three"))

    run_in_loop(reactor, script())
    client.close()


def test_an_idle_subscriber_link_never_trips_the_reply_timeout(single_deployment):
    host, port = single_deployment.masters[0]
    reactor = new_reactor()
    link = SubscriberLink(reactor, host, port, reply_timeout=0.1)

    def script():
        link.subscribe(["quiet"])
        yield lambda: b"quiet" in link.confirmed
        yield after(0.6)        # six reply timeouts without a single push

    run_in_loop(reactor, script())
    link.close()
    assert link.connections == 1 and link.failures == 0


def test_the_subscriber_link_takes_no_calls(deployment):
    host, port = deployment.masters[0]
    link = SubscriberLink(new_reactor(), host, port)
    try:
        with pytest.raises(TypeError):
            link.call("PING")
        with pytest.raises(TypeError):
            link.pipeline([("PING",)])
    finally:
        link.close()


# -- failures ---------------------------------------------------------------------------------------

def test_a_restarted_redis_is_reconnected_resubscribed_and_its_empty_script_cache_is_no_matter():
    server = LocalRedis().start()
    reactor = new_reactor()
    client = open_redis(reactor, server.url, **QUICK)
    states: list[str] = []
    client.on_state = states.append
    received: list[bytes] = []
    client.on_message = lambda channel, data: received.append(data)
    channel = unique("restart")

    def script():
        client.subscribe(channel)
        yield lambda: client.up and client.is_subscribed(channel)
        server.kill()
        yield lambda: not client.up
        started = time.monotonic()
        while_down = [client.call("PING"), client.publish(channel, b"lost"), append(client, channel, 1)]
        yield settled(*while_down)
        assert [outcome(p)[0] for p in while_down] == [False] * 3
        assert time.monotonic() - started < 0.5

        server.start()
        yield lambda: client.up and client.is_subscribed(channel)
        delivered = client.publish(channel, b"after the restart")
        stored = append(client, channel, 2)             # EVALSHA: NOSCRIPT, then EVAL
        yield lambda: received and settled(delivered, stored)()
        assert outcome(delivered) == (True, 1)
        assert outcome(stored) == (True, 1)             # a new, empty server

    try:
        run_in_loop(reactor, script())
    finally:
        client.close()
        server.close()
    assert received == [b"after the restart"]
    assert states == ["up", "down", "up"]


def test_open_redis_on_an_unreachable_port_raises_within_its_deadline():
    url = f"redis://127.0.0.1:{free_loopback_port()}/0"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="could not be reached within 0.5 s"):
        open_redis(new_reactor(), url, start_timeout=0.5)
    assert time.monotonic() - started < 1.5


# -- the cluster's slot map ----------------------------------------------------------------------------

def test_a_wrong_slot_map_is_corrected_by_moved_for_calls_and_subscriptions(cluster_deployment):
    deployment = cluster_deployment
    reactor = new_reactor()
    host, port = deployment.masters[0]
    # every slot on the first master: two thirds of the map are wrong
    client = ClusterRedis(reactor, parse_redis_url(deployment.url), [(0, 16383, host, port)], **QUICK)
    received: list[bytes] = []
    client.on_message = lambda channel, data: received.append(channel)
    channels = channels_on_every_master(deployment, unique("moved"), per_master=3)

    def script():
        assert client.masters == [(host, port)]
        for channel in channels:                    # SSUBSCRIBE on the wrong master: MOVED
            client.subscribe(channel)
        yield lambda: all(client.is_subscribed(channel) for channel in channels)
        first = [append(client, channel, 1) for channel in channels]
        yield settled(*first)
        assert [outcome(p) for p in first] == [(True, 1)] * len(channels)
        yield lambda: len(client.masters) == 3 and client.up       # CLUSTER SLOTS read again
        redirected = (client.redirects, client.subscription_redirects)
        assert sum(redirected) > 0
        second = [append(client, channel, 2) for channel in channels]
        published = [client.publish(channel, b"x") for channel in channels]
        yield lambda: settled(*second, *published)() and len(received) == len(channels)
        assert [outcome(p) for p in second] == [(True, 2)] * len(channels)
        assert [outcome(p) for p in published] == [(True, 1)] * len(channels)
        assert (client.redirects, client.subscription_redirects) == redirected      # the map is right now
        assert sorted(received) == sorted(channel.encode() for channel in channels)

    run_in_loop(reactor, script())
    client.close()
    assert sorted(client.masters) == deployment.masters


def test_ask_during_a_slot_migration_then_moved_after_it(cluster_deployment):
    deployment = cluster_deployment
    reactor = new_reactor()
    client = open_redis(reactor, deployment.url, **QUICK)
    tag = unique("migrating")
    old_key, new_key, other_key = f"{{{tag}}}:old", f"{{{tag}}}:new", f"{{{tag}}}:other"
    slot = key_slot(old_key.encode())
    source = deployment.owner_of(old_key)
    target = next(direct for direct in deployment.direct if direct is not source)
    source_id, target_id = (node.execute_command("CLUSTER", "MYID").decode() for node in (source, target))
    target_port = target.connection_pool.connection_kwargs["port"]
    source.set(old_key, "old")
    channel = f"{{{tag}}}:pushes"              # a shard channel in the migrating slot
    received: list[bytes] = []
    client.on_message = lambda _channel, data: received.append(data)

    def script():
        client.subscribe(channel)
        yield lambda: client.up and client.is_subscribed(channel)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        # the source answers for the key it still has, ASK for the others
        alone = client.call("SET", new_key, "new")
        mixed = client.pipeline([("GET", old_key), ("SET", other_key, "other")])
        yield settled(alone, mixed)
        assert outcome(alone) == (True, b"OK")
        assert outcome(mixed) == (True, [b"old", b"OK"])
        assert client.redirects == 2 and client.subscription_redirects == 0
        # the migration ends: the old key moves, every master learns the new owner
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", old_key)
        for node in (target, source, *(d for d in deployment.direct if d not in (source, target))):
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        moved = client.pipeline([("GET", old_key), ("GET", new_key), ("GET", other_key)])
        yield settled(moved)
        assert outcome(moved) == (True, [b"old", b"new", b"other"])
        # one MOVED per command. (The subscription meets MOVED or not, and how
        # often, depending on when the source drops it against when the map is
        # corrected: ``subscription_redirects`` is a race; where it ends is checked below.)
        assert client.redirects == 2 + 3
        # the subscription followed the slot to its new master
        yield lambda: client.is_subscribed(channel)
        delivered = client.publish(channel, b"on the new master")
        yield lambda: received and settled(delivered)()
        assert outcome(delivered) == (True, 1) and received == [b"on the new master"]

    run_in_loop(reactor, script())
    client.close()
    assert target.exists(old_key, new_key, other_key) == 3     # all on the new owner


def test_a_master_that_cannot_be_reached_is_replaced_from_the_slot_map(cluster_deployment):
    # no MOVED can come from a master that is down: the map is read again through
    # another one (what finds a replica promoted in its place)
    deployment = cluster_deployment
    reactor = new_reactor()
    dead = ("127.0.0.1", free_loopback_port())
    live = deployment.masters[0]
    client = ClusterRedis(reactor, parse_redis_url(deployment.url),
                          [(0, 8191, *dead), (8192, 16383, *live)], **QUICK)
    channel = next(name for name in (unique("dead") for _ in range(1000))
                   if key_slot(schema.channel_keys(name).seq.encode()) < 8192)

    def script():
        refused = append(client, channel, 1)
        yield settled(refused)
        assert outcome(refused)[0] is False
        yield lambda: dead not in client.masters and client.up
        stored = append(client, channel, 1)
        yield settled(stored)
        assert outcome(stored) == (True, 1)

    beats = run_in_loop(reactor, script(), timeout=10)
    client.close()
    assert sorted(client.masters) == deployment.masters
    assert beats[-1] - beats[0] < 3.0
