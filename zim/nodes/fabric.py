"""``NodeFabric``: the routing interface of ``zim.fabric`` across nodes, over Redis.

A node's own connections are reached as before, through the fabric of its
process (``LocalFabric``, or ``RouterFabric`` with workers): ``NodeFabric``
wraps it and adds the other nodes.

- **Presence.** A user's hash ``zim:{m:<id>}:presence`` has a field per node
  holding some of its connections (set at login, removed when its last
  connection on the node closes), and each node keeps the set of its users.
  Nodes beat in ``zim:nodes``; fields of nodes whose beat ran out are ignored,
  so a dead node's users do not linger, and the live nodes sweep them away
  (``zim.nodes.node``).
- **Private pushes.** After the local delivery, the user's presence is read and
  the push is published on the inbox channel of each other live node holding
  the user (``zim:{node:<id>}:inbox``); that node delivers it to its
  connections.
- **Channel pushes.** Published once on the channel's own pub/sub channel
  (``zim:{c:<name>}:push``, in the slot of the channel's keys: sharded pub/sub
  on a cluster). A node subscribes only to the channels its own connected users
  follow, and fans a message out to its members in its reactors (C), as it does
  its own channel pushes.

Pub/sub is at most once: a push lost while Redis is unreachable is not resent.
Every message is stored before it is pushed, and clients fill gaps from history
by seq (docs/protocol.md).
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Iterable, Protocol

from zim.fabric import Fabric, Groups
from zim.nodes import schema
from zim.pending import Pending, gather

log = logging.getLogger("zim.nodes")

INBOX_HEAD = struct.Struct(">QH")       # user id, action; then the payload
INBOX_CLOSE = 0                         # the action of an inbox entry that closes the user's connections
CHANNEL_HEAD = struct.Struct(">HB")     # action, length of the sending node's id; then it, the payload


def _count(pending: Pending) -> Pending:
    """A Pending of the sum of the list ``pending`` settles with."""
    total = Pending()
    pending.wait(_summed, total, None)
    return total


def _summed(total: Pending, _: None, ok: bool, values: Any) -> None:
    total.settle(ok, sum(int(value) for value in values) if ok else values)


def inbox_channel(node: str) -> str:
    """The pub/sub channel of one node's private pushes."""
    return f"{schema.PREFIX}:{{node:{node}}}:inbox"


def push_channel(channel: str) -> str:
    """The pub/sub channel of one IM channel's pushes (the slot of its keys)."""
    return f"{schema.PREFIX}:{{c:{channel}}}:push"


PUSH_PREFIX = f"{schema.PREFIX}:{{c:".encode()
PUSH_SUFFIX = b"}:push"


def channel_of_push(topic: bytes) -> str | None:
    """The IM channel a ``push_channel`` topic belongs to, else None."""
    if topic.startswith(PUSH_PREFIX) and topic.endswith(PUSH_SUFFIX):
        return topic[len(PUSH_PREFIX):-len(PUSH_SUFFIX)].decode("utf-8")
    return None


class NodeView(Protocol):
    """What a NodeFabric reads of its node (``zim.nodes.node.Node``, which makes it)."""

    redis: Any                  # zim.nodes.client.RedisClient
    node_id: str
    dead_nodes: set[str]        # nodes whose beat ran out, not swept yet


class NodeFabric:
    """A Fabric reaching the users of every node; see the module docstring."""

    def __init__(self, inner: Fabric, groups: Groups, node: NodeView) -> None:
        self.inner = inner
        self.groups = groups            # this process's channel groups (the inner fabric's)
        self.node = node
        self.redis = node.redis
        self.me = node.node_id
        self.me_bytes = node.node_id.encode()
        # channels followed by this node's users: user -> channels, and how many
        # users follow each channel (the node's subscription to it)
        self.follows: dict[int, set[str]] = {}
        self.followers: dict[str, int] = {}

    # -- this node's connections only -------------------------------------------
    def reply(self, conn: int, action: int, seq: int, payload: bytes, response: bool) -> None:
        self.inner.reply(conn, action, seq, payload, response)

    def hold(self, conn: int) -> None:
        self.inner.hold(conn)

    def answer(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        self.inner.answer(conn, action, seq, payload)

    def close(self, conn: int) -> None:
        self.inner.close(conn)

    def tcp_deflate(self, conn: int) -> None:
        self.inner.tcp_deflate(conn)

    def close_user(self, user_id: int, exclude_conn: int) -> None:
        """This node's connections of the user only: the other nodes close theirs
        when the revocation reaches them over the feed (``Node._on_change``)."""
        self.inner.close_user(user_id, exclude_conn)

    def has_user(self, user_id: int) -> bool:
        return self.inner.has_user(user_id)

    def close_user_everywhere(self, user_id: int) -> None:
        """Close every connection of the user on every node (the server API's
        disconnect): this node's now, the others' through their inboxes."""
        self.inner.close_user(user_id, 0)
        presence = self.redis.call("HKEYS", schema.user_keys(user_id).presence)
        presence.wait(self._push_remote, INBOX_HEAD.pack(user_id, INBOX_CLOSE), None)

    def user_nodes(self, user_id: int) -> Pending:
        """A Pending of how many nodes hold connections of the user."""
        return self.redis.call("HLEN", schema.user_keys(user_id).presence)

    def online_among(self, user_ids: list[int]) -> Pending:
        """A Pending of how many of these users have connections on some node
        (one command each: their presence hashes are in their own slots)."""
        checks = [self.redis.call("EXISTS", schema.user_keys(user_id).presence) for user_id in user_ids]
        return _count(gather(checks))

    def user_connections(self, user_id: int) -> int:
        """This node's logged-in connections of the user (--max-conns-per-user is per node)."""
        return self.inner.user_connections(user_id)

    # -- presence ------------------------------------------------------------------
    def bind_user(self, conn: int, user_id: int, groups: Iterable[int]) -> None:
        groups = list(groups)
        self.inner.bind_user(conn, user_id, groups)
        for command in schema.presence_in_commands(user_id, self.me):
            self.redis.call(*command)
        for group in groups:
            self._count_follow(user_id, self.groups.name(group))

    def user_gone(self, user_id: int) -> None:
        """The user's last connection on this node closed."""
        for command in schema.presence_out_commands(user_id, self.me):
            self.redis.call(*command)
        for channel in self.follows.pop(user_id, ()):
            self._count_unfollow(channel)

    # -- pushes ------------------------------------------------------------------
    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int:
        sent = self.inner.push_user(user_id, action, payload, exclude_conn)
        presence = self.redis.call("HKEYS", schema.user_keys(user_id).presence)
        presence.wait(self._push_remote, INBOX_HEAD.pack(user_id, action) + payload, None)
        return sent

    def _push_remote(self, packet: bytes, _: None, ok: bool, nodes: Any) -> None:
        if not ok:
            return      # Redis is away: the message waits in the mailbox
        dead = self.node.dead_nodes     # a node not seen dead yet counts as alive
        for node in nodes:
            node = node.decode()
            if node != self.me and node not in dead:
                self.redis.publish(inbox_channel(node), packet)

    def broadcast(self, group: int, action: int, payload: bytes, exclude_conn: int) -> int:
        sent = self.inner.broadcast(group, action, payload, exclude_conn)
        self._publish_channel(group, action, payload)
        return sent

    def broadcast_except(self, group: int, action: int, payload: bytes,
                         own: dict[int, bytes | None]) -> int:
        sent = self.inner.broadcast_except(group, action, payload, own)
        if payload:     # the senders in ``own`` are all on this node
            self._publish_channel(group, action, payload)
        return sent

    def _publish_channel(self, group: int, action: int, payload: bytes) -> None:
        me = self.me_bytes
        self.redis.publish(push_channel(self.groups.name(group)),
                           CHANNEL_HEAD.pack(action, len(me)) + me + payload)

    def on_inbox(self, data: bytes) -> None:
        """A private push another node published for one of our users."""
        user_id, action = INBOX_HEAD.unpack_from(data)
        if action == INBOX_CLOSE:
            self.inner.close_user(user_id, 0)
            return
        self.inner.push_user(user_id, action, data[INBOX_HEAD.size:], 0)

    def on_channel_push(self, channel: str, data: bytes) -> None:
        """A channel push published by a node (ours too: skipped, delivered already)."""
        action, length = CHANNEL_HEAD.unpack_from(data)
        start = CHANNEL_HEAD.size
        if data[start:start + length] == self.me_bytes:
            return
        group = self.groups.get(channel)
        if group is not None:
            self.inner.broadcast(group, action, data[start + length:], 0)

    # -- following channels --------------------------------------------------------
    def follow(self, user_id: int, group: int) -> None:
        self.inner.follow(user_id, group)
        if self.inner.has_user(user_id):
            self._count_follow(user_id, self.groups.name(group))

    def unfollow(self, user_id: int, group: int) -> None:
        self.inner.unfollow(user_id, group)
        channel = self.groups.name(group)
        channels = self.follows.get(user_id)
        if channels is not None and channel in channels:
            channels.discard(channel)
            if not channels:
                del self.follows[user_id]
            self._count_unfollow(channel)

    def _count_follow(self, user_id: int, channel: str) -> None:
        channels = self.follows.get(user_id)
        if channels is None:
            channels = self.follows[user_id] = set()
        elif channel in channels:
            return
        channels.add(channel)
        count = self.followers.get(channel, 0)
        self.followers[channel] = count + 1
        if not count:
            self.redis.subscribe(push_channel(channel))

    def _count_unfollow(self, channel: str) -> None:
        count = self.followers.get(channel, 0) - 1
        if count > 0:
            self.followers[channel] = count
            return
        self.followers.pop(channel, None)
        self.redis.unsubscribe(push_channel(channel))
