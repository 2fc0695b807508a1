"""The routing layer: how the IM reaches connections, wherever they are.

Handlers never touch sockets. They call a ``Fabric``:

- ``LocalFabric``: one process; calls go straight to its reactor.
- ``zim.router.RouterFabric``: the supervisor of ``--workers N``; calls become
  commands to the workers holding the connections (a channel message crosses to
  each interested worker once, then fans out in C there).

- ``zim.nodes.fabric.NodeFabric``: one node of several sharing a Redis; it
  wraps one of the above and reaches the other nodes over pub/sub.

A connection is named by an int ``conn``: the reactor's handle (generation and
fd, 56 bits), with the worker index in the top 8 bits when there are workers
(``zim.workerlink``). A channel is named by a group id (``Groups``).
"""
from __future__ import annotations

from typing import Iterable, Protocol

from zim._core import Reactor
from zim._names import Names


class Fabric(Protocol):
    """What the framework needs of the transport, per message (never per byte)."""

    def reply(self, conn: int, action: int, seq: int, payload: bytes, response: bool) -> None:
        """Queue a packet to one connection (``response``: it answers a request)."""

    def hold(self, conn: int) -> None:
        """The answer to ``conn``'s current request comes later (``answer``)."""

    def answer(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        """Queue the answer to a held request."""

    def bind_user(self, conn: int, user_id: int, groups: Iterable[int]) -> None:
        """Log ``conn`` in as ``user_id``; it receives the pushes of ``groups``."""

    def has_user(self, user_id: int) -> bool:
        """Whether the user has connections here (on this server)."""

    def user_connections(self, user_id: int) -> int:
        """How many logged-in connections the user has here (on this server, every
        worker), for ``--max-conns-per-user``. With workers a close counts once its
        worker has reported it (a loop pass later); a login counts at once."""

    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int:
        """Push to every connection of a user; returns how many deliveries (or
        worker messages) were queued."""

    def broadcast(self, group: int, action: int, payload: bytes, exclude_conn: int) -> int:
        """Push to every connection following a channel group."""

    def broadcast_except(self, group: int, action: int, payload: bytes,
                         own: dict[int, bytes | None]) -> int:
        """Push ``payload`` to every connection following a group but those in
        ``own``; each of those that follows it gets its own payload instead (None:
        nothing). For merged pushes: the senders of a slice."""

    def follow(self, user_id: int, group: int) -> None:
        """Every connection of the user starts receiving the group's pushes."""

    def unfollow(self, user_id: int, group: int) -> None:
        """Every connection of the user stops receiving the group's pushes."""

    def close(self, conn: int) -> None:
        """Close a connection after what is queued for it."""

    def tcp_deflate(self, conn: int) -> None:
        """From the next packet on, compress what goes to this TCP connection (its
        login asked for it; the login's answer is queued already)."""

    def close_user(self, user_id: int, exclude_conn: int) -> None:
        """Close every connection of the user here but ``exclude_conn`` (log out
        everywhere), each after what is queued for it."""


class LocalFabric:
    """The single-process fabric: every connection is on this reactor."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor

    def reply(self, conn: int, action: int, seq: int, payload: bytes, response: bool) -> None:
        self.reactor.reply(conn, action, seq, payload)

    def hold(self, conn: int) -> None:
        self.reactor.hold(conn)

    def answer(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        self.reactor.answer(conn, action, seq, payload)

    def bind_user(self, conn: int, user_id: int, groups: Iterable[int]) -> None:
        bind_here(self.reactor, conn, user_id, groups)

    def has_user(self, user_id: int) -> bool:
        return bool(self.reactor.user_conns(user_id))

    def user_connections(self, user_id: int) -> int:
        return self.reactor.user_conn_count(user_id)

    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int:
        return self.reactor.push_user(user_id, action, payload, exclude_conn)

    def broadcast(self, group: int, action: int, payload: bytes, exclude_conn: int) -> int:
        return self.reactor.broadcast(group, action, payload, exclude_conn)

    def broadcast_except(self, group: int, action: int, payload: bytes,
                         own: dict[int, bytes | None]) -> int:
        return broadcast_except_here(self.reactor, group, action, payload, own)

    def follow(self, user_id: int, group: int) -> None:
        follow_here(self.reactor, user_id, group)

    def unfollow(self, user_id: int, group: int) -> None:
        unfollow_here(self.reactor, user_id, group)

    def close(self, conn: int) -> None:
        self.reactor.close(conn)

    def tcp_deflate(self, conn: int) -> None:
        self.reactor.set_tcp_deflate(conn)

    def close_user(self, user_id: int, exclude_conn: int) -> None:
        close_user_here(self.reactor, user_id, exclude_conn)


def bind_here(reactor: Reactor, conn: int, user_id: int, groups: Iterable[int]) -> bool:
    """Log a connection of this reactor in and add it to its groups; False if it is gone."""
    if not reactor.set_user(conn, user_id):
        return False
    for group in groups:
        reactor.group_add(group, conn, False)   # a fresh login holds no group yet
    return True


def broadcast_except_here(reactor: Reactor, group: int, action: int, payload: bytes,
                          own: dict[int, bytes | None]) -> int:
    """``Fabric.broadcast_except`` on this reactor's members (connections of this
    reactor); an empty ``payload`` is not broadcast (only the own payloads go out)."""
    if not own:
        return reactor.broadcast(group, action, payload)
    if len(own) == 1:
        (conn, body), = own.items()
        if body is None:        # the common case, one sender alone in its slice
            return reactor.broadcast(group, action, payload, conn)
    # Several left out: one C pass that also says which of them are members; those
    # then get their own payload (a sender who is not a member gets nothing).
    if payload:
        count, members = reactor.broadcast_except(group, action, payload, list(own))
    else:
        count, members = 0, [conn for conn in own if reactor.group_has(group, conn)]
    for conn in members:
        body = own[conn]
        if body is not None:
            count += reactor.reply(conn, action, 0, body)
    return count


def close_user_here(reactor: Reactor, user_id: int, exclude_conn: int) -> None:
    """Close the user's connections on this reactor but ``exclude_conn``."""
    for conn in reactor.user_conns(user_id):
        if conn != exclude_conn:
            reactor.close(conn)


def follow_here(reactor: Reactor, user_id: int, group: int) -> None:
    """Add the user's connections on this reactor to a group (once each)."""
    for conn in reactor.user_conns(user_id):
        reactor.group_add(group, conn)


def unfollow_here(reactor: Reactor, user_id: int, group: int) -> None:
    for conn in reactor.user_conns(user_id):
        reactor.group_remove(group, conn)


class Groups:
    """This process's channel groups: channel name <-> the group id its fabric knows
    the channel's members by (1, 2, ...; made on first use, never reused). The names
    are interned in C (``zim._names``): no Python object per channel."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names = Names()            # group id - 1 <-> channel

    def get(self, channel: str) -> int | None:
        """The channel's group id, or None if no connection here ever followed it."""
        index = self.names.get(channel)
        return index + 1 if index >= 0 else None

    def id_of(self, channel: str) -> int:
        """The channel's group id, made if it has none yet."""
        return self.names.intern(channel) + 1

    def name(self, group: int) -> str:
        return self.names.name(group - 1)
