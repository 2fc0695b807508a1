"""A worker of ``zim-server --workers N``: sockets, framing and fan-out; no IM logic.

The supervisor (``zim.router``) starts it as ``python -m zim.worker`` with one end
of a Unix socketpair. Client requests go up that link to the router, which runs
the handlers; the router's commands come back down it and are carried out here
in C (replies, pushes, channel fan-out to this worker's members), or below
(``zim.workerlink`` packs them). Its server options come as the JSON the router
made of its own (``--options``: ``zim.options.Options``), not as flags to parse again.
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import sys

from zim._core import COUNTER_BYTES
from zim.closelog import CloseLog
from zim.fabric import bind_here, broadcast_except_here, close_user_here, follow_here, unfollow_here
from zim.options import Options
from zim.process import die_with_parent, stop_on_signals
from zim.workerlink import (
    CMD_BIND, CMD_BROADCAST_EXCEPT, CMD_CLOSE, CMD_CLOSE_USER, CMD_FOLLOW, CMD_TCP_DEFLATE, CMD_UNFOLLOW, EVENT,
    EVENT_LISTENING, EVENT_USER_GONE, EVENT_USERS_CLOSED, pack_user_ids, route_table, unpack_bind,
    unpack_broadcast_except, unpack_close_user, unpack_conn, unpack_follow, unpack_routes,
)

log = logging.getLogger("zim.worker")


class Worker:
    """One reactor serving clients, linked to the router."""

    def __init__(self, options: Options, link_fd: int, routes: dict[int, bool], index: int,
                 counters_fd: int = -1, address_table_fd: int = -1) -> None:
        self.index = index
        self.stopping = False               # our own shutdown closes the link: not a loss
        self.reactor = reactor = options.reactor(
            self._on_packet, on_user_gone=self._user_gone, on_tick=self._tick,
            on_users_closed=self._users_closed,     # the router's connection counts per user
            on_link_closed=self._link_closed)
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
        self.close_log = CloseLog(f"worker {index}")
        self.commands = {CMD_BIND: self._bind, CMD_FOLLOW: self._follow, CMD_UNFOLLOW: self._unfollow,
                         CMD_CLOSE: self._close, CMD_BROADCAST_EXCEPT: self._broadcast_except,
                         CMD_CLOSE_USER: self._close_user, CMD_TCP_DEFLATE: self._tcp_deflate}

    def run(self) -> None:
        reactor = self.reactor
        with stop_on_signals(reactor.stop):
            try:
                self.options.listen(reactor)
                reactor.reply(self.link, EVENT, EVENT_LISTENING, b"")
                reactor.run()
            finally:
                self.stopping = True
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
        self.reactor.reply(self.link, EVENT, EVENT_USER_GONE, pack_user_ids(user_id))

    def _users_closed(self, users: bytes) -> None:
        self.reactor.reply(self.link, EVENT, EVENT_USERS_CLOSED, users)

    def _link_closed(self, conn: int) -> None:
        if self.stopping:
            return
        log.warning("worker %d: router link closed; stopping", self.index)
        self.reactor.stop()

    # -- router commands -----------------------------------------------------
    def _bind(self, body: bytes) -> None:
        conn, user, groups = unpack_bind(body)
        if not bind_here(self.reactor, conn, user, groups):
            # the connection closed while its login was decided: the router counted
            # it, so tell it that connection is gone, and the user if it was the last
            self._users_closed(pack_user_ids(user))
            if not self.reactor.user_conns(user):
                self._user_gone(user)

    def _follow(self, body: bytes) -> None:
        follow_here(self.reactor, *unpack_follow(body))

    def _unfollow(self, body: bytes) -> None:
        unfollow_here(self.reactor, *unpack_follow(body))

    def _close(self, body: bytes) -> None:
        self.reactor.close(unpack_conn(body))

    def _tcp_deflate(self, body: bytes) -> None:
        self.reactor.set_tcp_deflate(unpack_conn(body))

    def _close_user(self, body: bytes) -> None:
        close_user_here(self.reactor, *unpack_close_user(body))

    def _broadcast_except(self, body: bytes) -> None:
        group, action, payload, own = unpack_broadcast_except(body)
        broadcast_except_here(self.reactor, group, action, payload, own)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zim.worker", description="a zim worker (started by zim-server)")
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--routes", required=True, help="the App's routes (zim.workerlink.pack_routes)")
    parser.add_argument("--options", required=True,
                        help="the server's options a worker needs, as JSON (zim.options.Options.worker_json)")
    parser.add_argument("--counters-fd", type=int, default=-1,
                        help="shared memory for the reactor's counters (Reactor.share_counters)")
    parser.add_argument("--address-table-fd", type=int, default=-1,
                        help="shared memory counting connections per address (Reactor.share_address_table)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(name)s[{args.index}] %(levelname)s %(message)s")
    try:
        Worker(Options.from_json(args.options), args.link_fd, unpack_routes(args.routes), args.index,
               args.counters_fd, args.address_table_fd).run()
    except OSError as exc:
        log.error("worker %d: %s", args.index, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
