#!/usr/bin/env python3
"""Idle memory per connection: K logged-in, idle connections on one zim worker.

Starts a real server (``python -m zim``, one worker), measures its RSS (summed
over the server process and its children: the durable store's writer), opens K
connections from this one process (non-blocking sockets on one epoll), logs each
in as a new user (action 1), waits ``--settle`` seconds and measures the RSS again:

    bytes per connection = (RSS after - RSS before) / K

The figure includes everything the server keeps for a logged-in user: the
connection slot, presence, and the store's user record. Kernel memory is not in
RSS; the growth of ``Slab`` in /proc/meminfo is printed for information (both ends
of every loopback connection live on this machine, so it counts two sockets).

With ``--channels-per-user N`` (N >= 1) each user then joins channels through
the protocol (action 3), one phase at a time, the RSS measured after each (the
issue-18 measurement of a realistic user):

1. one shared channel (channels of ``--channel-size M`` members; N >= 2);
2. N - 2 more shared channels, each a different cut of the users into M-member
   channels;
3. a new channel of its own (one member).

It reports bytes per member of phase 1 (the shared channels' creation shared by
their M members), per membership of phase 2, per channel of phase 3, and per
user all in (the whole RSS growth / K).

Examples: ``python bench/idle_memory.py --connections 15000 --json``;
``python bench/idle_memory.py --channels-per-user 12 --channel-size 100 --workers 2``
"""
from __future__ import annotations

import argparse
import errno
import os
import select
import shlex
import socket
import sys
import time

import orjson

import benchlib

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect(), not bind()

CONNECTING, WS_HANDSHAKE, LOGGING_IN, LOGGED_IN = range(4)
from zim.client import close_payload
from zim.protocol import LOGIN, PULL as PULL_MAILBOX, SUBSCRIBE


class Conn:
    """One client connection's progress through connect → (upgrade) → login."""

    __slots__ = ("sock", "state", "buf", "accept", "index", "waiting")

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.buf = bytearray()
        self.accept = b""
        self.index = index
        self.waiting = 0        # answers still due to the current join phase


class IdleClients:
    """Opens and logs in ``count`` connections, pipelined, all in this process."""

    def __init__(self, tcp_port: int, ws_port: int, count: int, websocket: bool,
                 sources: int, inflight: int) -> None:
        self.port = ws_port if websocket else tcp_port
        self.count = count
        self.websocket = websocket
        self.sources = sources
        self.inflight = inflight
        self.epoll = select.epoll()
        self.pending: dict[int, Conn] = {}     # fd → connection not yet logged in
        self.done: list[Conn] = []             # logged in; idle from now on
        self.opened = 0
        self.failed = 0
        self.failures: list[str] = []

    # -- packets in this connection's transport ---------------------------
    def _packet(self, action: int, seq: int, body: dict) -> bytes:
        data = orjson.dumps(body)
        if self.websocket:
            return benchlib.ws_packet(action, seq, data)
        return benchlib.tcp_packet(action, seq, data)

    def _split(self, buf: bytearray) -> list[tuple[int, int, bytes]]:
        if not self.websocket:
            return benchlib.tcp_split(buf)
        packets = []
        for opcode, action, seq, body in benchlib.ws_split(buf):
            if opcode == 0x8:
                raise ValueError(f"server sent a WebSocket close: {close_payload(body)}")
            if opcode == 0x2:
                packets.append((action, seq, body))
        return packets

    def _fail(self, conn: Conn, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(f"connection {conn.index}: {reason}")
        fd = conn.sock.fileno()
        self.pending.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    # -- opening ------------------------------------------------------------
    def _open(self) -> None:
        index = self.opened
        self.opened += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.sources > 1:
            # Spread source addresses over 127.0.0.x so the ephemeral ports of one
            # address never run out; the port is chosen at connect time.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{1 + index % self.sources}", 0))
        conn = Conn(sock, index)
        code = sock.connect_ex((benchlib.LOOPBACK, self.port))
        fd = sock.fileno()
        self.pending[fd] = conn
        self.epoll.register(fd, select.EPOLLOUT)
        if code not in (0, errno.EINPROGRESS):
            self._fail(conn, f"connect: {os.strerror(code)}")

    def _on_event(self, conn: Conn, events: int) -> None:
        sock = conn.sock
        if conn.state == CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return self._fail(conn, f"connect: {os.strerror(code)}")
            if self.websocket:
                request, conn.accept = benchlib.ws_handshake_request(self.port)
                conn.state = WS_HANDSHAKE
            else:
                request = self._login_packet(conn)
                conn.state = LOGGING_IN
            if sock.send(request) != len(request):   # a few hundred bytes: always fits
                return self._fail(conn, "short send")
            self.epoll.modify(sock.fileno(), select.EPOLLIN)
            return None
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._fail(conn, f"recv: {exc}")
        if not data:
            return self._fail(conn, f"closed by the server (state {conn.state})")
        conn.buf += data
        if conn.state == WS_HANDSHAKE:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return None
            if not benchlib.ws_handshake_ok(bytes(conn.buf[:end]), conn.accept):
                return self._fail(conn, f"bad upgrade response {bytes(conn.buf[:60])!r}")
            del conn.buf[:end + 4]
            conn.state = LOGGING_IN
            sock.send(self._login_packet(conn))
        try:
            packets = self._split(conn.buf)
        except ValueError as exc:
            return self._fail(conn, str(exc))
        for action, seq, body in packets:
            if action == LOGIN and seq == 1:
                reply = orjson.loads(body) if body else {}
                if "id" not in reply:
                    return self._fail(conn, f"login failed: {body[:200]!r}")
                conn.state = LOGGED_IN
                conn.buf = bytearray()
                fd = sock.fileno()
                del self.pending[fd]
                # From here on the connection is idle: nothing is read from it.
                self.epoll.unregister(fd)
                self.done.append(conn)
                return None
        return None

    def _login_packet(self, conn: Conn) -> bytes:
        return self._packet(LOGIN, 1, {"name": f"idle-{conn.index}"})

    def run(self, deadline: float) -> None:
        """Open and log in every connection, or stop at ``deadline`` (monotonic)."""
        while len(self.done) + self.failed < self.count and time.monotonic() < deadline:
            while self.opened < self.count and len(self.pending) < self.inflight:
                self._open()
            for fd, events in self.epoll.poll(0.2, 4096):
                conn = self.pending.get(fd)
                if conn is not None:
                    self._on_event(conn, events)

    def verify(self, sample: int, timeout: float) -> tuple[int, int]:
        """Send a logged-in-only request (pull mailbox) on ``sample`` idle connections.

        Returns (asked, answered without error): proves they are still open and logged in.
        """
        step = max(1, len(self.done) // max(1, sample))
        chosen = {c.sock.fileno(): c for c in self.done[::step][:sample]}
        for fd, conn in chosen.items():
            conn.sock.send(self._packet(PULL_MAILBOX, 2, {"limit": 1}))
            self.epoll.register(fd, select.EPOLLIN)
        answered = 0
        deadline = time.monotonic() + timeout
        waiting = dict(chosen)
        while waiting and time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.2, 4096):
                conn = waiting.get(fd)
                data = None if conn is None else _recv(conn)
                if data is None:
                    continue
                if not data:
                    del waiting[fd]
                    self.epoll.unregister(fd)
                    continue
                conn.buf += data
                try:
                    packets = self._split(conn.buf)
                except ValueError:      # a WebSocket close or a broken frame
                    packets = []
                    del waiting[fd]
                    self.epoll.unregister(fd)
                for action, seq, body in packets:
                    if action == PULL_MAILBOX and seq == 2:
                        if "error" not in orjson.loads(body or b"{}"):
                            answered += 1
                        del waiting[fd]
                        self.epoll.unregister(fd)
                        break
        return len(chosen), answered

    def join_phase(self, names, per_conn: int, deadline: float) -> int:
        """Each logged-in connection joins the channels ``names(conn.index)`` (its
        ``per_conn`` requests sent at once), with at most ``inflight`` requests in
        flight in all (more would measure the peak of a burst, kept by the
        allocator, rather than what the joins hold); returns how many joins
        failed (an error answer, a closed connection or the deadline)."""
        queue = list(self.done)
        queue.reverse()
        active: dict[int, Conn] = {}
        failed = 0
        most = max(1, self.inflight // max(1, per_conn))     # connections joining at once
        while (queue or active) and time.monotonic() < deadline:
            while queue and len(active) < most:
                conn = queue.pop()
                packets = [self._packet(SUBSCRIBE, 3 + n, {"name": name})
                           for n, name in enumerate(names(conn.index))]
                if not packets:
                    continue
                conn.waiting = len(packets)
                conn.sock.sendall(b"".join(packets))    # a few hundred bytes: fits the buffer
                fd = conn.sock.fileno()
                active[fd] = conn
                self.epoll.register(fd, select.EPOLLIN)
            for fd, _ in self.epoll.poll(0.2, 4096):
                conn = active.get(fd)
                data = None if conn is None else _recv(conn)
                if data is None:
                    continue
                try:
                    if not data:
                        raise ValueError("closed by the server")
                    conn.buf += data
                    for action, seq, body in self._split(conn.buf):
                        if action == SUBSCRIBE and seq >= 3:
                            conn.waiting -= 1
                            if body and b'"error"' in body:
                                failed += 1
                                if len(self.failures) < 5:
                                    self.failures.append(f"join by {conn.index}: {body[:200]!r}")
                except ValueError as exc:
                    failed += conn.waiting
                    conn.waiting = 0
                    if len(self.failures) < 5:
                        self.failures.append(f"join by {conn.index}: {exc}")
                if conn.waiting <= 0:
                    del active[fd]
                    self.epoll.unregister(fd)
        failed += sum(c.waiting for c in active.values()) + sum(
            len(names(c.index)) for c in queue)
        for fd in active:
            self.epoll.unregister(fd)
        return failed

    def close(self) -> None:
        for conn in self.done:
            conn.sock.close()
        for conn in self.pending.values():
            conn.sock.close()
        self.epoll.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=15_000, metavar="K",
                        help="idle logged-in connections to open (default 15000)")
    parser.add_argument("--ws", action="store_true",
                        help="connect over WebSocket instead of plain TCP")
    parser.add_argument("--settle", type=float, default=12.0, metavar="S",
                        help="seconds to wait after the last login (or join) before measuring; "
                             "longer than the server's --memory-release-interval (10 s) and its "
                             "once-a-second tick, so the burst's freed heap has gone back (default 12)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="give up connecting and logging in after S seconds (default 120)")
    parser.add_argument("--inflight", type=int, default=1000, metavar="N",
                        help="logins (then joins) in flight at once (default 1000)")
    parser.add_argument("--sources", type=int, default=1, metavar="N",
                        help="spread client source addresses over 127.0.0.1..N (default 1)")
    parser.add_argument("--verify", type=int, default=100, metavar="N",
                        help="after measuring, check N connections still answer (default 100)")
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra zim-server flags, one string (e.g. \"--max-packet 131072\")")
    parser.add_argument("--channels-per-user", type=int, default=0, metavar="N",
                        help="after logging in, each user joins N channels: N - 1 shared ones "
                             "of --channel-size members and one of its own (default 0: none)")
    parser.add_argument("--channel-size", type=int, default=100, metavar="M",
                        help="members of each shared channel (default 100)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="zim worker processes (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    if args.channels_per_user < 0 or args.channel_size < 1 or args.workers < 1:
        parser.error("--channels-per-user must be >= 0, --channel-size and --workers >= 1")
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    if not 1 <= args.sources <= 254:
        parser.error("--sources must be in 1..254")
    if args.settle < 0 or args.timeout <= 0 or args.inflight < 1:
        parser.error("--settle must be >= 0, --timeout and --inflight > 0")
    return args


def join_phases(args: argparse.Namespace, users: int):
    """(phase, joins per user, user index -> channel names) of ``--channels-per-user``:
    one shared channel, the other shared ones (each phase-2 channel a different cut of
    the users: index shifted before grouping by ``--channel-size``), one of its own."""
    shared, size = args.channels_per_user - 1, args.channel_size
    if shared >= 1:
        yield "first_shared", 1, lambda i: [f"s0-{i // size}"]
    if shared >= 2:
        yield "more_shared", shared - 1, lambda i: [
            f"s{j}-{(i + j * 7919) % users // size}" for j in range(1, shared)]
    if args.channels_per_user >= 1:
        yield "own_channel", 1, lambda i: [f"own-{i}"]


def channel_figures(args: argparse.Namespace, phases: dict[str, int], users: int) -> dict[str, float]:
    """Bytes per user (login, all in), per member of the first shared channel, per
    further membership, per channel of one's own."""
    if not args.channels_per_user:
        return {}
    users = max(1, users)
    figures = {"login_bytes_per_user": phases["login"] / users}
    if "first_shared" in phases:
        figures["first_shared_bytes_per_member"] = phases["first_shared"] / users
    if "more_shared" in phases:
        figures["more_shared_bytes_per_membership"] = \
            phases["more_shared"] / (users * (args.channels_per_user - 2))
    figures["own_channel_bytes_per_channel"] = phases["own_channel"] / users
    figures["all_in_bytes_per_user"] = sum(phases.values()) / users
    return figures


def process_growth(tree, before: list[int], users: int) -> dict[str, float]:
    """RSS growth per user since ``before`` (one figure per process of the tree), by
    kind of process: supervisor (or the single server), workers, writer."""
    kinds: dict[str, float] = {}
    for process, was in zip(tree.processes, before):
        command = " ".join(process.cmdline())
        kind = "writer" if "zim.storage.writer" in command else "workers" if "zim.worker" in command \
            else "server"
        kinds[kind] = kinds.get(kind, 0.0) + (process.memory_info().rss - was) / users
    return kinds


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _recv(conn) -> bytes | None:
    """What a ready connection has: its bytes, b"" once closed (or broken), None if nothing yet."""
    try:
        return conn.sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("idle_memory", "zim idle memory per connection", parse_args(argv), run)


def run(args: argparse.Namespace, info: dict) -> int:
    limit = benchlib.raise_open_files(args.connections + 100)
    if args.connections + 50 > limit:
        print(f"error: {args.connections} connections need more than this process's "
              f"open-files limit {limit}", file=sys.stderr)
        return 2
    transport = "websocket" if args.ws else "tcp"
    server = benchlib.Server(extra_args=shlex.split(args.server_args), workers=args.workers)
    clients = None
    try:
        proc = server.start()
        print(f"server: pid {proc.pid}: {' '.join(server.command)}")
        time.sleep(0.5)  # let the interpreter finish importing before the baseline
        tree = benchlib.ProcessTree(proc)   # the server and its writer process (and workers)
        rss_before = tree.rss()
        each_before = [p.memory_info().rss for p in tree.processes]
        fds_before = sum(p.num_fds() for p in tree.processes)     # the workers hold the sockets
        slab_before = benchlib.meminfo_kib("Slab") * 1024
        print(f"baseline: rss {mib(rss_before)}, {fds_before} fds, kernel slab {mib(slab_before)}")
        sys.stdout.flush()

        clients = IdleClients(server.tcp_port, server.ws_port, args.connections, args.ws,
                              args.sources, args.inflight)
        started = time.monotonic()
        clients.run(started + args.timeout)
        login_seconds = time.monotonic() - started
        logged_in = len(clients.done)
        print(f"logged in {logged_in}/{args.connections} {transport} connections in "
              f"{login_seconds:.1f} s ({logged_in / max(login_seconds, 1e-9):,.0f}/s), "
              f"{clients.failed} failed")
        for reason in clients.failures:
            print(f"  failure: {reason}")
        sys.stdout.flush()

        def settle() -> int:
            """Wait ``--settle`` seconds; the tree's RSS then (the same processes)."""
            settle_end = time.monotonic() + args.settle
            while server.alive() and time.monotonic() < settle_end:
                time.sleep(min(0.5, max(0.0, settle_end - time.monotonic())))
            if not server.alive():
                raise RuntimeError(f"the server died:\n{server.log_tail()}")
            if tree.changed():
                raise RuntimeError("a server process ended or restarted during the run")
            return tree.rss()

        settled = settle()
        phases = {"login": settled - rss_before}
        by_process: dict[str, dict[str, float]] = {}
        join_failures = 0
        for phase, count, names in join_phases(args, logged_in):
            each_start = [p.memory_info().rss for p in tree.processes]
            started = time.monotonic()
            failed = clients.join_phase(names, count, started + args.timeout)
            join_failures += failed
            print(f"{phase}: {count * logged_in - failed}/{count * logged_in} joins in "
                  f"{time.monotonic() - started:.1f} s, {failed} failed")
            rss_start, settled = settled, settle()
            phases[phase] = settled - rss_start
            by_process[phase] = process_growth(tree, each_start, max(1, logged_in))
            print(f"  {phase}, bytes per user by process: "
                  + ", ".join(f"{kind} {size:.0f}" for kind, size in by_process[phase].items()))
            sys.stdout.flush()
        for reason in clients.failures:
            print(f"  failure: {reason}")
        rss_after = tree.rss()
        growth = [p.memory_info().rss - before for p, before in zip(tree.processes, each_before)]
        print("rss growth by process: " + ", ".join(
            f"{' '.join(p.cmdline()[1:3])} +{mib(g)}" for p, g in zip(tree.processes, growth)))
        fds_after = sum(p.num_fds() for p in tree.processes)
        slab_after = benchlib.meminfo_kib("Slab") * 1024
        asked, answered = clients.verify(args.verify, timeout=15.0)
        per_conn = (rss_after - rss_before) / max(1, logged_in)
        slab_per_conn = (slab_after - slab_before) / max(1, logged_in)
        print(f"after {args.settle:g} s idle: rss {mib(rss_after)} (+{mib(rss_after - rss_before)}), "
              f"{fds_after} fds (+{fds_after - fds_before}), "
              f"kernel slab +{mib(slab_after - slab_before)}")
        print(f"verify: {answered}/{asked} sampled connections answered a pull-mailbox request")
        ok = logged_in == args.connections and answered == asked and \
            fds_after - fds_before >= logged_in and join_failures == 0
        figures = channel_figures(args, phases, logged_in)
        if figures:
            print("channels: " + ", ".join(f"{name} {value:,.0f} B" for name, value in figures.items()))
        print(f"RESULT idle_memory transport={transport} connections={logged_in} "
              f"bytes_per_connection={per_conn:.0f} "
              f"kernel_slab_bytes_per_connection={slab_per_conn:.0f} (both ends) "
              f"{'OK' if ok else 'INCOMPLETE'}" + "".join(f" {k}={v:.0f}" for k, v in figures.items()))
        result = {
            "bench": "idle_memory", "ok": ok, "transport": transport,
            "connections_wanted": args.connections, "connections": logged_in,
            "failed": clients.failed, "login_seconds": round(login_seconds, 3),
            "settle_seconds": args.settle,
            "rss_before": rss_before, "rss_after": rss_after,
            "bytes_per_connection": round(per_conn, 1), "workers": args.workers,
            "channels_per_user": args.channels_per_user, "channel_size": args.channel_size,
            "join_failures": join_failures, "phase_growth": phases, "phase_growth_by_process": by_process,
            **{k: round(v, 1) for k, v in figures.items()},
            "server_fds_before": fds_before, "server_fds_after": fds_after,
            "slab_before": slab_before, "slab_after": slab_after,
            "kernel_slab_bytes_per_connection": round(slab_per_conn, 1),
            "verified": answered, "verify_asked": asked,
            "machine": info, "server_command": server.command,
        }
    finally:
        if clients is not None:
            clients.close()
        code = server.stop()
    result["server_exit_code"] = code
    if code not in (0, None):
        print(f"warning: the server exited with code {code}")
    if args.json:
        benchlib.print_json(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
