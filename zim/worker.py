"""A worker of ``zim-server --workers N``: sockets, framing and fan-out; no IM logic.

The supervisor (``zim.router``) starts it as ``python -m zim.worker`` with one end
of a Unix socketpair. Client requests go up that link to the router, which runs
the handlers; the router's commands come back down it and are carried out here
in C (replies, pushes, channel fan-out to this worker's members).
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import struct
import sys

from zim.app import ServeOptions, stop_on_signals
from zim.closelog import CloseLog
from zim._core import COUNTER_BYTES
from zim.fabric import bind_here, broadcast_except_here, close_user_here, follow_here, unfollow_here
from zim.process import die_with_parent

log = logging.getLogger("zim.worker")

# Router -> worker commands: the link packet's action field. REPLY, PUSH_USER and
# BROADCAST are packed and carried out in C (Reactor.command_* and _run_command);
# the rest are packed below and carried out here.
CMD_REPLY, CMD_PUSH_USER, CMD_BROADCAST, CMD_BIND, CMD_FOLLOW, CMD_UNFOLLOW, CMD_CLOSE = range(1, 8)
CMD_BROADCAST_EXCEPT = 8    # a merged push (103) with several senders on this worker
CMD_CLOSE_USER = 9          # close a user's connections here but one (log out everywhere)
# Worker -> router events: action 0, the kind in the seq field. Every other
# action on the link is a client request: body = conn(8) user(8) client body
# (packed and unpacked in C: Reactor._forward and Reactor._route_request).
EVENT = 0
EVENT_USER_GONE = 1
EVENT_LISTENING = 2         # the worker's listeners are open (the router's readiness)
EVENT_USERS_CLOSED = 3      # logged-in connections closed here: 8-byte user ids, one per connection
                            # (also a login whose connection had closed before its BIND came)

BIND_HEAD = struct.Struct(">QQ")            # conn, user (then groups, 4 bytes each)
FOLLOW_BODY = struct.Struct(">QI")          # user, group
CLOSE_BODY = struct.Struct(">Q")
CLOSE_USER_BODY = struct.Struct(">QQ")      # user, the connection to keep (0: none)
EXCEPT_HEAD = struct.Struct(">IHI")         # group, action, n; then n entries, then the payload
EXCEPT_ENTRY = struct.Struct(">QI")         # conn, length of its own payload (0: none), payload
LINK_COMMAND_BUDGET = 2 << 20   # bytes: far under the links' packet limit (64 MiB at least), a 103 is < 1 MiB

class Worker:
    """One reactor serving clients, linked to the router."""

    def __init__(self, options: ServeOptions, link_fd: int, routes: dict[int, bool], index: int,
                 counters_fd: int = -1, address_table_fd: int = -1) -> None:
        self.index = index
        self.reactor = reactor = options.reactor(self._on_packet)
        if counters_fd >= 0:
            # the router reads this worker's counters from there (metrics), without asking
            self.counters = mmap.mmap(counters_fd, COUNTER_BYTES)
            os.close(counters_fd)
            reactor.share_counters(self.counters)
        if address_table_fd >= 0:
            # connections per address over every worker, and the address keys' secret
            self.addresses = mmap.mmap(address_table_fd, 0)
            os.close(address_table_fd)
            reactor.share_address_table(self.addresses, index)
        self.options = options
        self.link = reactor.adopt_link(link_fd)
        # requests up and the hot commands down are handled in C from here on
        reactor.forward_to(self.link, route_table(routes))
        reactor.on_user_gone = self._user_gone
        reactor.on_users_closed = self._users_closed    # the router's connection counts per user
        reactor.on_link_closed = self._link_closed
        self.close_log = CloseLog(f"worker {index}")
        reactor.on_tick = self._tick
        self.commands = {CMD_BIND: self._bind, CMD_FOLLOW: self._follow, CMD_UNFOLLOW: self._unfollow,
                         CMD_CLOSE: self._close, CMD_BROADCAST_EXCEPT: self._broadcast_except,
                         CMD_CLOSE_USER: self._close_user}

    def run(self) -> None:
        reactor = self.reactor
        with stop_on_signals(reactor.stop):
            try:
                self.options.listen(reactor)
                reactor.reply(self.link, EVENT, EVENT_LISTENING, b"")
                reactor.run()
            finally:
                reactor.on_link_closed = None   # our own shutdown closes it
                reactor.close_all()
                self.close_log(reactor.counters_dict(), final=True)

    def _tick(self) -> None:
        self.close_log(self.reactor.counters_dict())

    # -- from the router (what C leaves to Python: logins and channel bookkeeping)
    def _on_packet(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        command = self.commands.get(action)
        if command is None:
            log.error("worker %d: unknown router command %d", self.index, action)
            return
        command(payload)

    def _user_gone(self, user_id: int) -> None:
        self.reactor.reply(self.link, EVENT, EVENT_USER_GONE, user_id.to_bytes(8, "big"))

    def _users_closed(self, users: bytes) -> None:
        self.reactor.reply(self.link, EVENT, EVENT_USERS_CLOSED, users)

    def _link_closed(self, conn: int) -> None:
        log.warning("worker %d: router link closed; stopping", self.index)
        self.reactor.stop()

    # -- router commands -----------------------------------------------------
    def _bind(self, body: bytes) -> None:
        conn, user = BIND_HEAD.unpack_from(body)
        groups = (group for (group,) in struct.iter_unpack(">I", body[BIND_HEAD.size:]))
        if not bind_here(self.reactor, conn, user, groups):
            # the connection closed while its login was decided: the router counted
            # it, so tell it that connection is gone, and the user if it was the last
            self._users_closed(user.to_bytes(8, "big"))
            if not self.reactor.user_conns(user):
                self._user_gone(user)

    def _follow(self, body: bytes) -> None:
        follow_here(self.reactor, *FOLLOW_BODY.unpack(body))

    def _unfollow(self, body: bytes) -> None:
        unfollow_here(self.reactor, *FOLLOW_BODY.unpack(body))

    def _close(self, body: bytes) -> None:
        self.reactor.close(CLOSE_BODY.unpack(body)[0])

    def _close_user(self, body: bytes) -> None:
        close_user_here(self.reactor, *CLOSE_USER_BODY.unpack(body))

    def _broadcast_except(self, body: bytes) -> None:
        group, action, payload, own = unpack_broadcast_except(body)
        broadcast_except_here(self.reactor, group, action, payload, own)


def pack_broadcast_except(group: int, action: int, payload: bytes,
                          own: dict[int, bytes | None]) -> list[bytes]:
    """The CMD_BROADCAST_EXCEPT bodies for ``Fabric.broadcast_except`` on one worker
    (``own``: its connection handles), each under LINK_COMMAND_BUDGET. The first
    broadcasts ``payload`` leaving out every connection of ``own`` and carries the
    own payloads that fit; the rest carry the others, with an empty broadcast
    payload (none is sent then)."""
    first: dict[int, bytes | None] = {}
    later: list[dict[int, bytes | None]] = []
    size = len(payload) + EXCEPT_ENTRY.size * len(own)
    later_size = 0
    for conn, body in own.items():
        if body is not None and size + len(body) > LINK_COMMAND_BUDGET:
            if not later or later_size + len(body) > LINK_COMMAND_BUDGET:
                later.append({})
                later_size = 0
            later[-1][conn] = body
            later_size += EXCEPT_ENTRY.size + len(body)
            body = None         # left out of the broadcast here, sent by a later command
        elif body is not None:
            size += len(body)
        first[conn] = body
    return [_pack_except(group, action, payload, first)] + [_pack_except(group, action, b"", part)
                                                            for part in later]


def _pack_except(group: int, action: int, payload: bytes, own: dict[int, bytes | None]) -> bytes:
    parts = [EXCEPT_HEAD.pack(group, action, len(own))]
    for conn, body in own.items():
        parts += (EXCEPT_ENTRY.pack(conn, len(body or b"")), body or b"")
    parts.append(payload)
    return b"".join(parts)


def unpack_broadcast_except(body: bytes) -> tuple[int, int, bytes, dict[int, bytes | None]]:
    group, action, count = EXCEPT_HEAD.unpack_from(body)
    at = EXCEPT_HEAD.size
    own: dict[int, bytes | None] = {}
    for _ in range(count):
        conn, length = EXCEPT_ENTRY.unpack_from(body, at)
        at += EXCEPT_ENTRY.size
        own[conn] = body[at:at + length] if length else None   # an own body is never empty JSON
        at += length
    return group, action, body[at:], own


def route_table(routes: dict[int, bool]) -> bytes:
    """One byte per action for the C fast path: 0 unknown, 1 open, 2 login needed."""
    table = bytearray(65536)
    for action, needs_login in routes.items():
        table[action] = 2 if needs_login else 1
    return bytes(table)


def parse_routes(text: str) -> dict[int, bool]:
    """``"1:0,2:1"`` -> {1: False, 2: True} (action: needs login)."""
    routes = {}
    for item in filter(None, text.split(",")):
        action, needs_login = item.split(":")
        routes[int(action)] = needs_login == "1"
    return routes


def format_routes(routes: dict[int, tuple]) -> str:
    return ",".join(f"{action}:{int(bool(login))}" for action, (_, login) in sorted(routes.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zim.worker", description="a zim worker (started by zim-server)")
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--routes", required=True)
    parser.add_argument("--tcp", required=True)
    parser.add_argument("--ws", required=True)
    parser.add_argument("--max-packet", type=int, required=True)
    parser.add_argument("--login-timeout", type=int, required=True)
    parser.add_argument("--idle-timeout", type=int, required=True)
    parser.add_argument("--max-outbuf", type=int, required=True)
    parser.add_argument("--max-inflight", type=int, required=True)
    parser.add_argument("--max-client-memory", type=int, required=True)
    parser.add_argument("--ws-deflate", choices=["on", "off"], default="on")
    parser.add_argument("--ws-origins", default="*")
    parser.add_argument("--counters-fd", type=int, default=-1,
                        help="shared memory for the reactor's counters (Reactor.share_counters)")
    parser.add_argument("--max-conns-per-address", type=int, default=0)
    parser.add_argument("--address-table-fd", type=int, default=-1,
                        help="shared memory counting connections per address (Reactor.share_address_table)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(name)s[{args.index}] %(levelname)s %(message)s")
    options = ServeOptions(None if args.tcp == "off" else args.tcp, None if args.ws == "off" else args.ws,
                           args.max_packet, args.login_timeout, args.idle_timeout,
                           max_outbuf=args.max_outbuf, ws_deflate=args.ws_deflate == "on",
                           max_inflight=args.max_inflight, max_client_memory=args.max_client_memory,
                           ws_origins=args.ws_origins, max_conns_per_address=args.max_conns_per_address)
    try:
        Worker(options, args.link_fd, parse_routes(args.routes), args.index, args.counters_fd,
               args.address_table_fd).run()
    except OSError as exc:
        log.error("worker %d: %s", args.index, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
