"""The supervisor of ``zim-server --workers N``, which is also its router.

It starts N workers (``zim.worker``), each linked to it by a Unix socketpair
that its own reactor serves, restarts a worker that dies, and stops them all on
SIGTERM. As the router it runs every handler (so the store and the per-
conversation seq live in one process) and turns the handlers' fabric calls into
commands for the workers:

- presence: user id -> bitmask of workers holding its connections (a C table);
- interest: channel group -> bitmask of workers with members that want pushes.

A private message goes to the workers of the receiver; a channel message to each
interested worker once, whatever the number of members there.
"""
from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import subprocess
import time
from array import array
from typing import Callable, Iterable

from zim._core import (
    COUNTER_BYTES, COUNTER_NAMES, GAUGE_NAMES, Reactor, address_table_bytes, clear_address_region,
    init_address_table,
)
from zim._idmap import IdMap
from zim.handler import error_body
from zim.metrics import combine_core_values
from zim.options import Options
from zim.process import Backoff, exit_reason, helper_command
from zim.workerlink import (
    CMD_BIND, CMD_BROADCAST_EXCEPT, CMD_CLOSE, CMD_CLOSE_USER, CMD_FOLLOW, CMD_TCP_DEFLATE, CMD_UNFOLLOW, EVENT,
    EVENT_LISTENING, EVENT_USER_GONE, EVENT_USERS_CLOSED, pack_bind, pack_broadcast_except, pack_close_user, pack_conn,
    pack_follow, pack_routes, split_handle, unpack_user_id,
)

log = logging.getLogger("zim.router")

STOP_GRACE_SECONDS = 5
GAUGE_INDEXES = [index for index, name in enumerate(COUNTER_NAMES) if name in GAUGE_NAMES]
CRASH_LIMIT = 5     # failures at start in a row (Backoff: at once, then 0.5, 1, 2 s) stop the server


def worker_bit(index: int) -> int:
    return 1 << index


class Interest:
    """Channel group -> bitmask of the workers with members that want its pushes: one
    word per group id in an array (ids are dense and never reused), no Python object
    per channel; the word is as wide as the workers need (1 byte up to 8 workers)."""

    __slots__ = ("words",)

    def __init__(self, workers: int = 64) -> None:
        typecode = next(code for code in "BHIQ" if array(code).itemsize * 8 >= workers)
        self.words = array(typecode)

    def get(self, group: int) -> int:
        words = self.words
        return words[group] if group < len(words) else 0

    def add(self, group: int, bits: int) -> None:
        words = self.words
        if group >= len(words):
            words.frombytes(bytes(words.itemsize * (group + 1 - len(words))))   # amortised by array
        words[group] |= bits

    def clear_bit(self, bit: int) -> None:
        """A worker is gone: no group is interesting to it any more."""
        words = self.words
        keep = ~bit & ((1 << words.itemsize * 8) - 1)
        for group, word in enumerate(words):
            if word & bit:
                words[group] = word & keep


class WorkerSlot:
    """One worker: its process and its link."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None
        # the worker's reactor counters, in memory both processes map; kept across restarts
        # so the totals go on from the last worker's
        self.counters_fd = os.memfd_create(f"zim-worker-{index}-counters", os.MFD_CLOEXEC)
        os.ftruncate(self.counters_fd, COUNTER_BYTES)
        self.counters = mmap.mmap(self.counters_fd, COUNTER_BYTES)
        self.counter_values = memoryview(self.counters).cast("Q")
        self.link = 0               # the router reactor's handle for the link
        self.started = 0.0
        self.backoff = Backoff()
        self.restart_at = 0.0       # a failed start waits for this time (monotonic) before the next
        self.listening = False      # its listeners are open (EVENT_LISTENING)
        # user id -> logged-in connections on this worker (RouterFabric.user_connections):
        # one up per BIND sent, one down per close it reports (EVENT_USERS_CLOSED)
        self.user_conns = IdMap()


class Router:
    """Supervisor and fabric of a multi-worker server, on the reactor it is given
    (``zim.server.Server`` makes it and runs the loop). ``on_user_gone(user_id)``:
    a user has no connection left on any worker; ``on_give_up()``: workers keep
    failing at start, the server must stop (``exit_code`` is then 1)."""

    def __init__(self, reactor: Reactor, options: Options, routes: dict[int, bool],
                 on_user_gone: Callable[[int], None], on_give_up: Callable[[], None]) -> None:
        self.reactor = reactor
        self.options = options
        self.routes = pack_routes(routes)
        self.on_user_gone = on_user_gone
        self.on_give_up = on_give_up
        self.slots = [WorkerSlot(i) for i in range(options.workers)]
        # connections per address over every worker (--max-conns-per-address), one region
        # each, and the secret key of IPv6 addresses, shared by all: zim._core's address table
        self.address_table_fd = os.memfd_create("zim-address-table", os.MFD_CLOEXEC)
        os.ftruncate(self.address_table_fd, address_table_bytes(options.workers))
        self.address_table = mmap.mmap(self.address_table_fd, 0)
        init_address_table(self.address_table, options.workers)
        self.by_link: dict[int, WorkerSlot] = {}
        self.presence = IdMap()
        self.interest = Interest(options.workers)
        self.intake_paused = False          # the store is behind: the workers' links are not read
        self.intake_pauses = 0
        self.stopping = False
        self.terminate_pending = False      # SIGTERM came: terminate the workers at the next tick
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.worker_restarts = 0

    # -- processes -------------------------------------------------------------
    def start_workers(self) -> None:
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        for slot in self.slots:
            self._spawn(slot)

    def core_counters(self) -> dict[str, int]:
        """The C counters of this reactor and of every worker's (read from their shared memory)."""
        return combine_core_values([self.reactor.counters_dict(),
                                    *(dict(zip(COUNTER_NAMES, slot.counter_values)) for slot in self.slots)])

    def listening(self) -> tuple[bool, str]:
        """Every worker has opened its listeners (the server's part of /readyz)."""
        listening = sum(slot.listening for slot in self.slots)
        if listening < len(self.slots):
            return False, f"{listening} of {len(self.slots)} workers listening"
        return True, ""

    def _spawn(self, slot: WorkerSlot) -> None:
        if slot.started:
            self.worker_restarts += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        command = helper_command(
            "zim.worker", "--link-fd", str(theirs.fileno()), "--index", str(slot.index),
            "--parent", str(os.getpid()), "--routes", self.routes, "--options", self.options.worker_json(),
            "--counters-fd", str(slot.counters_fd), "--address-table-fd", str(self.address_table_fd),
            "--log-level", logging.getLevelName(logging.getLogger().level))
        slot.process = subprocess.Popen(command, pass_fds=(theirs.fileno(), slot.counters_fd,
                                                           self.address_table_fd))
        theirs.close()
        slot.link = self.reactor.adopt_link(ours.detach())
        self.reactor.set_link_index(slot.link, slot.index)
        if self.intake_paused:
            self.reactor.pause_reading(slot.link)
        slot.started = time.monotonic()
        slot.restart_at = 0.0
        self.by_link[slot.link] = slot

    def pause_intake(self, paused: bool) -> None:
        """Stop (or go back to) reading the workers' links: the store's writer is
        behind (``--max-store-backlog``). Their requests wait in the workers' link
        buffers and the kernel meanwhile; each client's own ``--max-inflight`` still
        holds, so nothing grows without bound."""
        if paused == self.intake_paused:
            return
        self.intake_paused = paused
        self.intake_pauses += paused
        # links resumed are read in this order, and the backlog may fill again before the
        # last: start one further each time, so no worker's clients wait behind the others
        first = self.intake_pauses % len(self.slots)
        for slot in self.slots[first:] + self.slots[:first]:
            if slot.link:
                (self.reactor.pause_reading if paused else self.reactor.resume_reading)(slot.link)

    def _on_sigchld(self, signum, frame) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None or process.poll() is None:
                continue
            slot.process = None
            self._forget_worker(slot)
            if self.stopping:
                continue
            delay = slot.backoff.after_exit(time.monotonic() - slot.started)
            if slot.backoff.failures >= CRASH_LIMIT:
                log.error("worker %d (pid %d) failed at start %d times in a row (%s); stopping",
                          slot.index, process.pid, slot.backoff.failures, exit_reason(process.returncode))
                self.exit_code = 1
                self.on_give_up()
                self.begin_stop()
                self.reactor.stop()
                return
            log.warning("worker %d (pid %d) ended (%s); restarting it%s", slot.index, process.pid,
                        exit_reason(process.returncode), f" in {delay:g} s" if delay else "")
            if delay:
                slot.restart_at = time.monotonic() + delay      # tick starts it
            else:
                self._spawn(slot)
        if self.stopping and all(slot.process is None for slot in self.slots):
            self.reactor.stop()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and slot.restart_at and now >= slot.restart_at:
                self._spawn(slot)

    def _forget_worker(self, slot: WorkerSlot) -> None:
        """A dead worker's users and members are gone: drop its bits everywhere."""
        slot.listening = False
        for index in GAUGE_INDEXES:         # its connections are gone; the next worker sets them again
            slot.counter_values[index] = 0
        clear_address_region(self.address_table, slot.index)    # ... and no longer count per address
        slot.user_conns = IdMap()
        bit = worker_bit(slot.index)
        for user_id in self.presence.clear_bits_everywhere(bit):
            self.on_user_gone(user_id)      # held by no other worker: gone from this server
        self.interest.clear_bit(bit)
        self.by_link.pop(slot.link, None)
        self.reactor.close(slot.link)
        slot.link = 0

    def on_link_closed(self, link: int) -> None:
        slot = self.by_link.get(link)
        if slot is not None and slot.process is not None and not self.stopping:
            log.warning("link to worker %d closed", slot.index)

    def begin_stop(self) -> None:
        """SIGTERM: ask every worker to stop (they flush and exit) at the next tick, then leave."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
        self.terminate_pending = True
        # the loop goes on until the workers are gone, so their last requests are answered

    def _terminate_workers(self) -> None:
        self.terminate_pending = False
        for slot in self.slots:
            if slot.process is not None:
                slot.process.terminate()

    def tick(self) -> None:
        """Once a second, after the handlers' chores: restarts, and stopping."""
        if not self.stopping:
            self._restart_due()
        if self.terminate_pending:
            self._terminate_workers()
        if self.stopping and (time.monotonic() > self.stop_deadline
                              or all(slot.process is None for slot in self.slots)):
            self.reactor.stop()

    def kill_all(self) -> None:
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            slot.process = None

    # -- events from workers (requests go from C to Server.serve) ----------------
    def on_link_packet(self, link: int, action: int, seq: int, payload: bytes) -> None:
        slot = self.by_link.get(link)
        if slot is None or action != EVENT:
            return
        if seq == EVENT_USER_GONE:
            user_id = unpack_user_id(payload)
            self.presence.clear_bits(user_id, worker_bit(slot.index))
            if not self.presence.get(user_id):
                self.on_user_gone(user_id)
        elif seq == EVENT_USERS_CLOSED:
            slot.user_conns.release(payload)
        elif seq == EVENT_LISTENING:
            slot.listening = True

    def send(self, index: int, command: int, body: bytes) -> bool:
        slot = self.slots[index]
        if not slot.link:
            return False
        return self.reactor.reply(slot.link, command, 0, body)

    def workers_in(self, bits: int) -> list[int]:
        """The worker indexes of a bitmask (lowest first)."""
        indexes = []
        while bits:
            low = bits & -bits
            indexes.append(low.bit_length() - 1)
            bits ^= low
        return indexes


class RouterFabric:
    """The Fabric of a multi-worker server: commands to the workers concerned.

    Reply, push and broadcast commands are packed in C (``Reactor.command_*``)
    and carried out in C by the worker.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self.reactor = router.reactor
        self.slots = router.slots

    def reply(self, conn: int, action: int, seq: int, payload: bytes, response: bool) -> None:
        index, local = split_handle(conn)
        link = self.slots[index].link
        if link and not self.reactor.command_reply(link, local, action, seq, response, payload) \
                and response and len(payload) > self.reactor.link_max_packet - 64:
            # an answer no link carries (a handler's of some 64 MiB: never one of zim.im,
            # whose pages stay under 1 MiB) is not sent (logged); the client, whose
            # worker holds the request until it is answered, gets internal instead
            self.reactor.command_reply(link, local, action, seq, response,
                                       error_body("internal", "the answer is too large"))

    def hold(self, conn: int) -> None:
        pass    # the worker holds every forwarded request until its response

    def answer(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        self.reply(conn, action, seq, payload, True)

    def has_user(self, user_id: int) -> bool:
        return bool(self.router.presence.get(user_id))

    def user_connections(self, user_id: int) -> int:
        """The user's logged-in connections over every worker: logins sent to a worker
        count at once, closes once the worker has reported them (so a close is seen a
        loop pass late, never a login). Every worker is asked: 64 C lookups at most."""
        return sum(slot.user_conns.get(user_id) for slot in self.slots)

    def bind_user(self, conn: int, user_id: int, groups: Iterable[int]) -> None:
        router = self.router
        index, local = split_handle(conn)
        bit = worker_bit(index)
        router.presence.set_bits(user_id, bit)
        groups = list(groups)
        for group in groups:
            router.interest.add(group, bit)
        if router.send(index, CMD_BIND, pack_bind(local, user_id, groups)):
            # the worker reports this connection's close, or that it was gone already
            self.slots[index].user_conns.add_one(user_id)

    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int:
        return self._to_workers(self.router.presence.get(user_id), self.reactor.command_push_user,
                                user_id, action, payload, exclude_conn)

    def broadcast(self, group: int, action: int, payload: bytes, exclude_conn: int) -> int:
        return self._to_workers(self.router.interest.get(group), self.reactor.command_broadcast,
                                group, action, payload, exclude_conn)

    def broadcast_except(self, group: int, action: int, payload: bytes,
                         own: dict[int, bytes | None]) -> int:
        """One command per interested worker: the C broadcast when at most one of
        its connections is left out, with nothing of its own; else CMD_BROADCAST_EXCEPT
        (which the worker carries out in Python, once per merged slice)."""
        by_worker: dict[int, dict[int, bytes | None]] = {}
        for conn, body in own.items():
            index, local = split_handle(conn)
            by_worker.setdefault(index, {})[local] = body
        sent = 0
        for index in self.router.workers_in(self.router.interest.get(group)):
            link = self.slots[index].link
            if not link:
                continue
            mine = by_worker.get(index, {})
            if len(mine) > 1 or any(body is not None for body in mine.values()):
                for body in pack_broadcast_except(group, action, payload, mine):
                    sent += self.router.send(index, CMD_BROADCAST_EXCEPT, body)
            else:
                sent += self.reactor.command_broadcast(link, group, next(iter(mine), 0), action, payload)
        return sent

    def _to_workers(self, bits: int, command, target: int, action: int, payload: bytes,
                    exclude_conn: int) -> int:
        """Send a push command to each worker in bits; the excluded connection
        matters only to its own worker."""
        sent = 0
        exclude_index, exclude_local = split_handle(exclude_conn)
        for index in self.router.workers_in(bits):
            link = self.slots[index].link
            if link:
                exclude = exclude_local if exclude_index == index else 0
                sent += command(link, target, exclude, action, payload)
        return sent

    def follow(self, user_id: int, group: int) -> None:
        router = self.router
        bits = router.presence.get(user_id)
        router.interest.add(group, bits)
        for index in router.workers_in(bits):
            router.send(index, CMD_FOLLOW, pack_follow(user_id, group))

    def unfollow(self, user_id: int, group: int) -> None:
        router = self.router
        for index in router.workers_in(router.presence.get(user_id)):
            router.send(index, CMD_UNFOLLOW, pack_follow(user_id, group))

    def close(self, conn: int) -> None:
        index, local = split_handle(conn)
        self.router.send(index, CMD_CLOSE, pack_conn(local))

    def tcp_deflate(self, conn: int) -> None:
        index, local = split_handle(conn)
        self.router.send(index, CMD_TCP_DEFLATE, pack_conn(local))

    def close_user(self, user_id: int, exclude_conn: int) -> None:
        router = self.router
        exclude_index, exclude_local = split_handle(exclude_conn)
        for index in router.workers_in(router.presence.get(user_id)):
            keep = exclude_local if exclude_conn and exclude_index == index else 0
            router.send(index, CMD_CLOSE_USER, pack_close_user(user_id, keep))
