"""``Node``: one zim server as a member of a multi-node service sharing a Redis.

``zim-server --redis redis://HOST:PORT/DB`` makes the process that runs the
handlers (the single process, or the router of ``--workers N``) a node:

- at start (before the loop runs, so waiting is allowed): Redis found once
  (``zim.nodes.client.discover``: cluster or not, the scripts loaded), the token
  secret (from ``--secret-file``; without one, the fallback: a Redis key, ``SET
  NX`` then ``GET``), checked against the fingerprint the other nodes recorded
  (every node signs with the same one), and a
  Snowflake worker id of its own (``SET zim:worker:<n> <node> NX PX``, renewed
  by every beat), so message and user ids stay unique across nodes;
- then, on the loop: a ``RedisClient`` (``zim.nodes.client``), the
  ``RedisStore`` over it, the ``NodeFabric`` wrapped around the process's own
  fabric, and its pub/sub channels: its inbox, the change feed, and the
  channels its users follow;
- with ``--archive DSN`` (``archive``): the archive's schema migrated at the
  start (a PostgreSQL unreachable then is only a warning: the archiver migrates
  once its link is up), the generation marker read (a single Redis: set if the
  archive knows nothing yet; ``_generation``), and on the loop the
  ``zim.nodes.archiving.Archiver`` with its link; the store gets ``archive``,
  ``archive_kinds``, ``archive_stats``, ``generation``;
- every second: a beat in ``zim:nodes`` (a deadline ``NODE_LIFETIME_MS`` ahead)
  and the list of nodes whose deadline has passed: their presence fields are
  ignored, and swept away (each dead node's set of users, taken by batches with
  ``SPOP`` so that several live nodes share the work), then the node is forgotten.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import orjson

from zim.archive.config import archive_kinds as parse_kinds
from zim.archive.schema import first_generation, migrate_at_start, shared_settings
from zim.datadir import check_file_directory
from zim.ids import MAX_WORKER
from zim.nodes import schema
from zim.nodes.archive_schema import GENERATION_KEY, GENERATION_SETTING
from zim.nodes.client import ClusterRedis, SingleRedis, discover
from zim.nodes.fabric import NodeFabric, channel_of_push, inbox_channel
from zim.nodes.link import parse_redis_url
from zim.nodes.store import RedisStore, now_ms
from zim.storage.retention import Retention
from zim.tokens import read_secret_file, secret_id

if TYPE_CHECKING:
    from zim._core import Reactor
    from zim.fabric import Fabric, Groups
    from zim.metrics import Metrics

log = logging.getLogger("zim.nodes")

NODE_LIFETIME_MS = 10_000          # a node silent this long is dead: its users are elsewhere
WORKER_CLAIM_MS = 60_000           # a worker id is held this long past the last beat
FEED_CHANNEL = f"{schema.PREFIX}:{{feed}}"     # memberships and names changed by any node
SECRET_SETTING = "token-secret"             # the archive's settings (with --archive): what outlives Redis
TOKENS_V2_SETTING = "tokens-v2-since"
SECRET_BYTES = 32


def worker_key(worker_id: int) -> str:
    return f"{schema.PREFIX}:worker:{worker_id}"


def start_client(address: dict[str, Any], slot_ranges: list | None) -> Any:
    """A blocking redis-py client for the node's start, once ``discover`` found
    Redis: a cluster client when ``slot_ranges`` says it is a cluster."""
    import redis
    from redis.cluster import RedisCluster

    options = {"host": address["host"], "port": address["port"], "password": address["password"],
               "username": address["username"], "socket_timeout": 2, "socket_connect_timeout": 2}
    if slot_ranges is None:
        return redis.Redis(db=address["db"], **options)
    return RedisCluster(**options)


class Node:
    """One node: see the module docstring. ``Node(url)`` does the start's
    blocking part; ``attach(reactor, ...)`` the rest, once the reactor exists."""

    def __init__(self, url: str, retention: Retention = Retention(), secret_file: str | None = None,
                 archive: str | None = None, archive_kinds: str = "private", archive_batch: int = 1000) -> None:
        self.address = parse_redis_url(url)     # ValueError for what the links could not use
        file_secret = None
        if secret_file is not None:             # read first: a bad file stops the node before Redis
            check_file_directory(secret_file, "secret file")
            file_secret = read_secret_file(secret_file, "secret file")
        self.url = url
        self.archive_dsn = archive
        self.archive_batch = archive_batch
        self.archiver: Any = None
        self.archive_migrated = archive is not None and self._migrate_archive(archive)
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{now_ms()}"
        # cluster or not, the slot map, the scripts on every master (RuntimeError
        # after START_TIMEOUT); ``attach`` opens the links on what it found
        self.slot_ranges = discover(self.address)
        client = start_client(self.address, self.slot_ranges)
        try:
            if file_secret is not None:
                self.secret = file_secret
            elif archive is not None:
                self.secret = self._secret_offered(client)
            else:
                log.warning("the token secret is the Redis key %s: whoever can read this Redis (or its "
                            "backups) can log in as every user. Give every node the same private file "
                            "instead: --secret-file PATH (docs/redis.md)", schema.SECRET_KEY)
                self.secret = self._shared_secret(client)
            self.tokens_v2_since = self._tokens_v2_since(client)
            if self.archive_migrated:   # they outlive Redis: the archive's settings say which they are
                self.secret, self.tokens_v2_since = self._archived_settings(client, file_secret is None)
            self._check_secret_id(client)
            self.worker_id = self._claim_worker_id(client)
            # a cluster keeps the marker in another slot than any conversation: not used there
            generation = self._generation(client) if archive is not None and self.slot_ranges is None else None
        finally:
            client.close()
        self.store = RedisStore(retention, on_change=self.publish_change)
        if archive is not None:
            self.store.archive_kinds = parse_kinds(archive_kinds)
            self.store.generation = generation
        self.redis: Any = None
        self.fabric: NodeFabric | None = None
        self.groups: "Groups | None" = None
        self.metrics: "Metrics | None" = None
        self.dead_nodes: set[str] = set()
        self.sweeping = False
        self.inbox = inbox_channel(self.node_id).encode()

    # -- the blocking start -------------------------------------------------------
    @staticmethod
    def _migrate_archive(dsn: str) -> bool:
        """The archive's schema, if PostgreSQL answers within seconds; else a warning
        (the node serves without it, the archiver migrates later)."""
        failure = migrate_at_start(dsn)
        if failure is not None:
            log.warning("the archive is unreachable at the start (%s): serving without it until it is; "
                        "its lag grows meanwhile", failure)
        return failure is None

    @staticmethod
    def _shared_secret(client: Any) -> bytes:
        for command in schema.secret_steps(os.urandom(SECRET_BYTES)):
            secret = client.execute_command(*command)
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise RuntimeError(f"{schema.SECRET_KEY} in redis is not a {SECRET_BYTES}-byte secret")
        return secret

    def _secret_offered(self, client: Any) -> bytes:
        """With --archive and no --secret-file: Redis's secret, to offer the archive
        (a new one if Redis has none). The archive unreachable: the one Redis holds,
        else a new one (the node serves; tokens signed before a Redis data loss
        then fail until the operator resolves it: ``_archived_settings`` refuses
        to start a node while Redis and the archive hold different secrets)."""
        secret = client.get(schema.SECRET_KEY)
        if secret is not None:
            return secret
        if self.archive_migrated:
            return os.urandom(SECRET_BYTES)
        log.warning("Redis has no token secret (%s) and the archive, which keeps it, is unreachable: "
                    "signing with a new one. If Redis lost its data, the tokens issued before will not "
                    "verify, and nodes started later will refuse to start until one of the two secrets "
                    "is removed (docs/redis.md)", schema.SECRET_KEY)
        return self._shared_secret(client)

    def _archived_settings(self, client: Any, secret_in_redis: bool) -> tuple[bytes, int]:
        """The token secret (without --secret-file) and ``tokens-v2-since`` as the
        archive holds them: a Redis that lost its data (its secret remade just
        now) takes them back, so the tokens issued before still verify. The first
        node offers Redis's (INSERT ... ON CONFLICT DO NOTHING, then read back)."""
        if secret_in_redis:
            log.warning("the token secret is the Redis key %s, kept in the archive's settings too: whoever can "
                        "read this Redis or this PostgreSQL (or their backups) can log in as every user. Give "
                        "every node the same private file instead: --secret-file PATH (docs/redis.md)",
                        schema.SECRET_KEY)
        offered = {TOKENS_V2_SETTING: str(self.tokens_v2_since).encode()}
        if secret_in_redis:
            offered[SECRET_SETTING] = self.secret
        found = shared_settings(self.archive_dsn, offered)
        secret = self.secret
        if secret_in_redis:
            secret = found[SECRET_SETTING]
            for command in schema.secret_steps(secret):     # SET NX, then GET: the one Redis holds
                held = client.execute_command(*command)
            if held != secret:
                raise RuntimeError(
                    f"the token secret in redis ({schema.SECRET_KEY}) differs from the archive's (its "
                    f"settings table, {SECRET_SETTING!r}), so the tokens of one would fail on nodes of the "
                    f"other. To keep the one the running nodes sign with: DELETE FROM settings WHERE name = "
                    f"'{SECRET_SETTING}'; to take the archive's back (the running nodes' tokens then fail): "
                    f"stop every node and delete {schema.SECRET_KEY} and {schema.SECRET_ID_KEY} in Redis")
        since = int(found[TOKENS_V2_SETTING])
        client.execute_command("SET", schema.TOKENS_V2_KEY, since)
        return secret, since

    def _generation(self, client: Any) -> bytes | None:
        """The generation marker's value if Redis holds the archive's (Redis lost
        nothing since it was set: a conversation it lacks is new), else None, said
        in the log. Set here only when the archive knows nothing yet, so never
        again once Redis lost it (docs/redis.md, "The generation marker")."""
        held = client.get(GENERATION_KEY)
        if not self.archive_migrated:
            # Redis gets the marker only after PostgreSQL stored it: holding one, it lost nothing since
            if held is None:
                log.warning("Redis has no generation marker (%s) and the archive is unreachable: new "
                            "conversations need PostgreSQL and fail until it is back", GENERATION_KEY)
            return held
        value, stored = first_generation(self.archive_dsn, GENERATION_SETTING, os.urandom(16).hex().encode())
        if stored:      # the archive knew nothing: whatever this Redis holds, it lost nothing the archive has
            client.set(GENERATION_KEY, value)
            held = value
        if value is None or held != value:
            why = ("the archive has conversations but no generation marker (archived before zim kept one, "
                   "or its row was deleted)" if value is None else f"Redis does not hold the archive's generation marker "
                   f"({GENERATION_KEY}): it lost its data since the marker was set")
            log.warning("%s. So a conversation Redis lacks may be one it lost: a new conversation's first "
                        "message, and a join that creates a channel, ask PostgreSQL first, and fail while it is "
                        "down. For good: nothing sets the marker again (docs/redis.md)", why)
            return None
        return value

    def _check_secret_id(self, client: Any) -> None:
        """Every node must sign with the same secret: the first one records its
        fingerprint, the others compare (a node with another --secret-file would
        issue tokens the rest refuse, and refuse theirs)."""
        mine = secret_id(self.secret)
        for command in schema.secret_id_steps(mine):
            recorded = client.execute_command(*command)
        if isinstance(recorded, bytes):
            recorded = recorded.decode("ascii", "replace")
        if recorded != mine:
            raise RuntimeError(
                f"this node's token secret differs from the one the other nodes of this Redis sign with "
                f"({schema.SECRET_ID_KEY}): give every node the same --secret-file (or none). To change "
                f"the secret on purpose, which logs every user out, stop every node and delete "
                f"{schema.SECRET_ID_KEY}")

    @staticmethod
    def _tokens_v2_since(client: Any) -> int:
        """When the service first ran with version 2 tokens (Unix ms)."""
        for command in schema.tokens_v2_steps(now_ms()):
            since = client.execute_command(*command)
        return int(since)

    def _claim_worker_id(self, client: Any) -> int:
        """A Snowflake worker id no live node holds (1..1023; 0 is a lone server's)."""
        start = client.incr(f"{schema.PREFIX}:worker-next")
        for step in range(MAX_WORKER):
            worker_id = (start + step) % MAX_WORKER + 1
            if client.set(worker_key(worker_id), self.node_id, nx=True, px=WORKER_CLAIM_MS):
                return worker_id
        raise RuntimeError(f"every Snowflake worker id (1..{MAX_WORKER}) is held by a live node")

    # -- on the loop -----------------------------------------------------------------
    def attach(self, reactor: "Reactor", fabric: "Fabric", groups: "Groups", metrics: "Metrics") -> NodeFabric:
        """Connect on ``reactor``; the fabric reaching every node, around this
        process's own ``fabric`` (whose channel groups are ``groups``), is returned."""
        self.groups = groups
        self.metrics = metrics
        if self.slot_ranges is None:
            self.redis = redis = SingleRedis(reactor, self.address)
        else:
            self.redis = redis = ClusterRedis(reactor, self.address, self.slot_ranges)
        redis.on_message = self._on_message
        self.store.redis = redis
        if self.archive_dsn is not None:
            from zim.nodes.archiving import Archiver    # here: psycopg is the archive extra's
            store = self.store
            self.archiver = archiver = Archiver(reactor, redis, self.archive_dsn, self.node_id, store.retention,
                                                store.archive_kinds, self.archive_batch, self.archive_migrated)
            store.archive, store.archive_stats = archiver.archive, archiver.stats
        self.fabric = NodeFabric(fabric, groups, self)
        redis.subscribe(FEED_CHANNEL)
        redis.subscribe(self.inbox.decode())
        self.beat()
        log.info("zim node %s (worker id %d) on %s", self.node_id, self.worker_id, self.url)
        return self.fabric

    def beat(self) -> None:
        """Every second: say this node is alive, and learn which nodes are not."""
        now = now_ms()
        redis = self.redis
        redis.call(*schema.heartbeat_command(self.node_id, now, NODE_LIFETIME_MS))
        redis.call("SET", worker_key(self.worker_id), self.node_id, "PX", WORKER_CLAIM_MS)
        redis.call(*schema.dead_nodes_command(now)).wait(self._learn_dead, time.monotonic(), None)

    def _learn_dead(self, sent: float, __: None, ok: bool, nodes: Any) -> None:
        if not ok:
            return
        # the beat's round trip, once a second: the latency a node's calls see (metrics)
        self.metrics.redis_latency.observe(time.monotonic() - sent)
        self.dead_nodes = {node.decode() for node in nodes}
        if self.dead_nodes and not self.sweeping:
            self._sweep(min(self.dead_nodes))

    # -- the sweep of dead nodes' presence ----------------------------------------------
    def _sweep(self, node: str) -> None:
        """One step: a batch of the dead node's users loses its field; the next
        step follows the answer (one batch in flight), until its set is empty."""
        self.sweeping = True
        self.redis.call(*schema.sweep_step_command(node)).wait(self._swept, node, None)

    def _swept(self, node: str, _: None, ok: bool, users: Any) -> None:
        if not ok:
            self.sweeping = False       # the next beat tries again
            return
        if not users:
            self.redis.call(*schema.forget_node_command(node))
            self.dead_nodes.discard(node)
            self.sweeping = False
            log.info("swept the presence of dead node %s", node)
            return
        for user in users:
            self.redis.call("HDEL", schema.user_keys(int(user)).presence, node)
        self._sweep(node)

    def close(self) -> None:
        """Leave: the node's beat goes (its users' presence fields then count as
        dead), and the connections close."""
        if self.archiver is not None:
            self.archiver.close()
        if self.redis is not None:
            self.redis.call("ZADD", schema.NODES_KEY, 0, self.node_id)
            self.redis.close()

    # -- pub/sub -----------------------------------------------------------------------
    def publish_change(self, change: dict) -> None:
        """Tell the other nodes of a membership or name change (RedisStore's feed)."""
        if self.redis is not None:
            change["n"] = self.node_id
            self.redis.publish(FEED_CHANNEL, orjson.dumps(change))

    def _on_message(self, topic: bytes, data: bytes) -> None:
        try:
            if topic == self.inbox:
                self.fabric.on_inbox(data)
                return
            channel = channel_of_push(topic)
            if channel is not None:
                self.fabric.on_channel_push(channel, data)
            elif topic == FEED_BYTES:
                self._on_change(orjson.loads(data))
        except Exception:  # noqa: BLE001 -- one bad message must not stop the node
            log.exception("a pub/sub message on %r could not be used", topic)

    def _on_change(self, change: dict) -> None:
        if change.get("n") == self.node_id:
            return
        if change.get("k") == "drop":
            self._channel_dropped(change["c"])
        self.store.apply_change(change)
        if change.get("k") == "epoch":
            # the user logged out everywhere on another node: its connections here go too
            self.fabric.close_user(change["u"], 0)
            return
        if change.get("k") != "member":
            return
        user_id, channel, push = change["u"], change["c"], change["p"]
        if not self.fabric.has_user(user_id):
            return
        # a membership changed on another node: this node's connections of the user follow it
        if push:
            self.fabric.follow(user_id, self.groups.id_of(channel))
        else:
            group = self.groups.get(channel)
            if group is not None:
                self.fabric.unfollow(user_id, group)


    def _channel_dropped(self, channel: str) -> None:
        """A channel deleted on another node: this node's connections of its
        members (as the cache knows them, before it forgets) stop following it."""
        group = self.groups.get(channel)
        if group is None:
            return
        for user_id in self.store.cache.channel_members(channel):
            if self.fabric.has_user(user_id):
                self.fabric.unfollow(user_id, group)


FEED_BYTES = FEED_CHANNEL.encode()

