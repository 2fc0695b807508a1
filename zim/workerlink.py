"""The router-worker link, Python side: what the router packs and the worker unpacks.

A worker of ``zim-server --workers N`` and its router share one Unix socketpair,
zim's TCP framing on it. The numbers of the link (command numbers, event kinds,
handle bits) are the core's (``zim._core``, one definition for C and Python);
this module packs and unpacks the commands the core leaves to Python.

- **Router -> worker commands**: the link packet's action field. ``CMD_REPLY``,
  ``CMD_PUSH_USER`` and ``CMD_BROADCAST`` are packed and carried out in C
  (``Reactor.command_*`` and the worker's ``_run_command``); ``CMD_BIND``,
  ``CMD_FOLLOW``, ``CMD_UNFOLLOW``, ``CMD_CLOSE``, ``CMD_BROADCAST_EXCEPT`` (a
  merged push, 103, with several senders on the worker), ``CMD_CLOSE_USER``
  (log out everywhere) and ``CMD_TCP_DEFLATE`` (a login agreed on compression,
  sent right after its answer) are packed below and carried out by ``zim.worker``.
- **Worker -> router events**: action ``EVENT``, the kind in the seq field:
  ``EVENT_USER_GONE`` (a user's last connection there closed), ``EVENT_LISTENING``
  (its listeners are open: the router's readiness), ``EVENT_USERS_CLOSED`` (8-byte
  user ids, one per logged-in connection closed, also a login whose connection
  had closed before its BIND came). Every other action on the link is a client
  request, packed and unpacked in C (``Reactor._forward``, ``_route_request``).
- **Connection handles**: the router names a connection by the worker's handle
  with the worker's index in the bits above ``HANDLE_BITS`` (``router_handle``).
- **Routes**: the worker answers unknown actions and callers not logged in in C,
  from a table of one byte per action (``route_table``) made from the App's routes
  it is started with (``pack_routes``).
"""
from __future__ import annotations

import struct
from typing import Iterable, Iterator

import orjson

from zim._core import (
    CMD_BIND, CMD_BROADCAST, CMD_BROADCAST_EXCEPT, CMD_CLOSE, CMD_CLOSE_USER, CMD_FOLLOW, CMD_PUSH_USER,
    CMD_REPLY, CMD_TCP_DEFLATE, CMD_UNFOLLOW, EVENT, EVENT_LISTENING, EVENT_USER_GONE, EVENT_USERS_CLOSED, HANDLE_BITS,
    LINK_HANDLE_MASK,
)

__all__ = [
    "CMD_BIND", "CMD_BROADCAST", "CMD_BROADCAST_EXCEPT", "CMD_CLOSE", "CMD_CLOSE_USER", "CMD_FOLLOW",
    "CMD_PUSH_USER", "CMD_REPLY", "CMD_TCP_DEFLATE", "CMD_UNFOLLOW", "EVENT", "EVENT_LISTENING",
    "EVENT_USER_GONE", "EVENT_USERS_CLOSED", "LINK_COMMAND_BUDGET", "pack_bind", "pack_broadcast_except",
    "pack_conn", "pack_close_user", "pack_follow", "pack_routes", "pack_user_ids", "route_table", "router_handle",
    "split_handle", "unpack_bind", "unpack_broadcast_except", "unpack_conn", "unpack_close_user", "unpack_follow",
    "unpack_routes", "unpack_user_id",
]

_BIND_HEAD = struct.Struct(">QQ")            # conn, user; then the groups, 4 bytes each
_GROUP = struct.Struct(">I")
_FOLLOW = struct.Struct(">QI")               # user, group
_CONN = struct.Struct(">Q")                  # conn
_CLOSE_USER = struct.Struct(">QQ")           # user, the connection to keep (0: none)
_USER_ID = struct.Struct(">Q")
_EXCEPT_HEAD = struct.Struct(">IHI")         # group, action, n; then n entries, then the payload
_EXCEPT_ENTRY = struct.Struct(">QI")         # conn, length of its own payload (0: none); the payload
LINK_COMMAND_BUDGET = 2 << 20   # bytes: far under the links' packet limit (64 MiB at least), a 103 is < 1 MiB


# -- connection handles ---------------------------------------------------------------

def router_handle(worker: int, conn: int) -> int:
    """The router's name for connection ``conn`` of worker ``worker``."""
    return worker << HANDLE_BITS | conn


def split_handle(handle: int) -> tuple[int, int]:
    """A router handle -> (worker index, the worker's own handle)."""
    return handle >> HANDLE_BITS, handle & LINK_HANDLE_MASK


# -- commands ---------------------------------------------------------------------------

def pack_bind(conn: int, user_id: int, groups: Iterable[int]) -> bytes:
    """CMD_BIND: log ``conn`` (the worker's handle) in as ``user_id``, member of ``groups``."""
    return _BIND_HEAD.pack(conn, user_id) + b"".join(_GROUP.pack(group) for group in groups)


def unpack_bind(body: bytes) -> tuple[int, int, Iterator[int]]:
    conn, user_id = _BIND_HEAD.unpack_from(body)
    return conn, user_id, (group for (group,) in _GROUP.iter_unpack(body[_BIND_HEAD.size:]))


def pack_follow(user_id: int, group: int) -> bytes:
    """CMD_FOLLOW and CMD_UNFOLLOW: the user's connections on the worker join or leave a group."""
    return _FOLLOW.pack(user_id, group)


def unpack_follow(body: bytes) -> tuple[int, int]:
    return _FOLLOW.unpack(body)


def pack_conn(conn: int) -> bytes:
    """CMD_CLOSE: close one connection (the worker's handle) after what is queued
    for it; CMD_TCP_DEFLATE: compress what is queued for it from now on."""
    return _CONN.pack(conn)


def unpack_conn(body: bytes) -> int:
    return _CONN.unpack(body)[0]


def pack_close_user(user_id: int, keep_conn: int) -> bytes:
    """CMD_CLOSE_USER: close the user's connections on the worker but ``keep_conn`` (0: none)."""
    return _CLOSE_USER.pack(user_id, keep_conn)


def unpack_close_user(body: bytes) -> tuple[int, int]:
    return _CLOSE_USER.unpack(body)


def pack_broadcast_except(group: int, action: int, payload: bytes,
                          own: dict[int, bytes | None]) -> list[bytes]:
    """The CMD_BROADCAST_EXCEPT bodies for ``Fabric.broadcast_except`` on one worker
    (``own``: its connection handles), each under LINK_COMMAND_BUDGET. The first
    broadcasts ``payload`` leaving out every connection of ``own`` and carries the
    own payloads that fit; the rest carry the others, with an empty broadcast
    payload (none is sent then)."""
    first: dict[int, bytes | None] = {}
    later: list[dict[int, bytes | None]] = []
    size = len(payload) + _EXCEPT_ENTRY.size * len(own)
    later_size = 0
    for conn, body in own.items():
        if body is not None and size + len(body) > LINK_COMMAND_BUDGET:
            if not later or later_size + len(body) > LINK_COMMAND_BUDGET:
                later.append({})
                later_size = 0
            later[-1][conn] = body
            later_size += _EXCEPT_ENTRY.size + len(body)
            body = None         # left out of the broadcast here, sent by a later command
        elif body is not None:
            size += len(body)
        first[conn] = body
    return [_pack_except(group, action, payload, first)] + [_pack_except(group, action, b"", part)
                                                            for part in later]


def _pack_except(group: int, action: int, payload: bytes, own: dict[int, bytes | None]) -> bytes:
    parts = [_EXCEPT_HEAD.pack(group, action, len(own))]
    for conn, body in own.items():
        parts += (_EXCEPT_ENTRY.pack(conn, len(body or b"")), body or b"")
    parts.append(payload)
    return b"".join(parts)


def unpack_broadcast_except(body: bytes) -> tuple[int, int, bytes, dict[int, bytes | None]]:
    """A CMD_BROADCAST_EXCEPT body -> (group, action, payload, own payloads by connection)."""
    group, action, count = _EXCEPT_HEAD.unpack_from(body)
    at = _EXCEPT_HEAD.size
    own: dict[int, bytes | None] = {}
    for _ in range(count):
        conn, length = _EXCEPT_ENTRY.unpack_from(body, at)
        at += _EXCEPT_ENTRY.size
        own[conn] = body[at:at + length] if length else None   # an own body is never empty JSON
        at += length
    return group, action, body[at:], own


# -- events -------------------------------------------------------------------------------

def pack_user_ids(*user_ids: int) -> bytes:
    """EVENT_USER_GONE (one id) and EVENT_USERS_CLOSED (one id per connection closed)."""
    return b"".join(_USER_ID.pack(user_id) for user_id in user_ids)


def unpack_user_id(body: bytes) -> int:
    return _USER_ID.unpack_from(body)[0]


# -- routes -------------------------------------------------------------------------------

def route_table(routes: dict[int, bool]) -> bytes:
    """One byte per action for the worker's C fast path: 0 unknown, 1 open, 2 login needed."""
    table = bytearray(65536)
    for action, needs_login in routes.items():
        table[action] = 2 if needs_login else 1
    return bytes(table)


def pack_routes(routes: dict[int, bool]) -> str:
    """The App's routes for a worker's command line: JSON ``[[action, needs login], ...]``."""
    return orjson.dumps(sorted(routes.items())).decode()


def unpack_routes(text: str) -> dict[int, bool]:
    return {action: needs_login for action, needs_login in orjson.loads(text)}
