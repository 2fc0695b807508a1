"""One connflood client process: its share of the connections on one epoll,
and its reports to the parent."""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import signal
import socket
import time
from collections import Counter

import orjson

from zim.client import (OP_BINARY, ProtocolError, new_ws_key, split_tcp, split_ws, tcp_packet, ws_packet,
                        ws_upgrade_accepted, ws_upgrade_request)
from zim.connflood.channels import ChannelPlan
from zim.connflood.options import (AFTER_PROBE, IP_BIND_ADDRESS_NO_PORT, PER_PROCESS_MAX, PROBE_CHANNEL,
                                   PROBE_GRACE, REPORT_EVERY, STAMP_DIGITS)
from zim.protocol import HEARTBEAT, LOGIN, PUSH_CHANNEL_MESSAGE, SUBSCRIBE

# connection states
CONNECTING, HANDSHAKING, LOGGING_IN, JOINING, SUBSCRIBING, READY = range(6)
JOIN_SEQ = 10           # seq of a connection's first --channels-per-user join


def packet(websocket: bool, action: int, seq: int, body: dict) -> bytes:
    data = orjson.dumps(body)
    return ws_packet(action, seq, data) if websocket else tcp_packet(action, seq, data)


def source_address(process: int, index: int) -> str:
    """A distinct loopback source address per connection (127.2.0.1 and up)."""
    number = process * PER_PROCESS_MAX + index
    return f"127.{2 + number // 62500 % 250}.{number // 250 % 250}.{1 + number % 250}"


def error_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number else "oserror"


def server_packets(buffer: bytearray, websocket: bool) -> list[tuple[int, int, bytes]]:
    """The whole packets at the start of a connection's ``buffer`` (removed from it),
    as (action, seq, body); a WebSocket's other frames are passed over."""
    if not websocket:
        return split_tcp(buffer)
    return [(action, seq, body) for opcode, action, seq, body in split_ws(buffer) if opcode == OP_BINARY]


class Stopped(Exception):
    """The parent said stop, or went away."""


class Flood:
    """One client process: its share of the connections on one epoll.

    Every connection it opens ends in exactly one of ``connected`` (reached
    READY) and ``failed`` (``errors`` by kind); a connected one closed later is
    also counted in ``closed`` (by kind). It reports its running totals to the
    parent every REPORT_EVERY seconds, in every phase, and its final figures
    when told to stop.
    """

    def __init__(self, args, index: int, count: int, sample: int, conn, first: int = 0) -> None:
        self.args = args
        self.index = index
        self.count = count
        self.first = first                  # the user number of our first connection (of all processes')
        self.plan = (ChannelPlan(args.connections, args.channels_per_user, *args.channel_sizes)
                     if args.channels_per_user else None)
        self.joins_left: dict[int, int] = {}    # a JOINING connection: answers still to come
        self.numbers: dict[int, int] = {}       # a connection not set up yet: its user number
        self.joins = 0                      # joins answered OK
        self.ready_fds: list[int] = []      # set-up connections in the order they got there
        self.beat = packet(args.ws, HEARTBEAT, 9, {})
        self.beat_credit = 0.0              # heartbeats due and not sent yet
        self.beat_cursor = 0
        self.beat_last = time.monotonic()
        self.sample = sample                # how many of ours join the probe channel
        self.conn = conn
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.state: dict[int, int] = {}
        self.buffers: dict[int, bytearray] = {}     # what a connection's server sent, not yet whole
        self.opened = self.tcp_connected = self.logins = self.connected = self.failed = 0
        self.errors: Counter = Counter()    # why connections were never set up
        self.closed: Counter = Counter()    # why set-up connections closed later
        self.pending = 0                    # opened, not READY, not failed
        self.subscribed = 0
        self.deliveries = 0
        self.latencies_ns: list[int] = []
        self.phase = "connecting"
        self.last_report = 0.0
        self.fault = args.test_fault if args.test_fault and args.test_fault[0] == index else None
        self.loopback = ipaddress.ip_address(socket.gethostbyname(args.host)).is_loopback
        self.ws_key = new_ws_key()          # one for the process's connections: no need for more
        self.handshake = ws_upgrade_request(self.ws_key, f"{args.host}:{args.port}")

    # -- reports ---------------------------------------------------------------------
    def figures(self) -> dict:
        return {"phase": self.phase, "share": self.count, "opened": self.opened,
                "tcp_connected": self.tcp_connected, "logins": self.logins, "connected": self.connected,
                "failed": self.failed, "pending": self.pending, "joins": self.joins, "alive": len(self.socks),
                "errors": dict(self.errors), "closed": dict(self.closed)}

    def report(self, kind: str = "progress", *extra) -> None:
        self.last_report = time.monotonic()
        try:
            self.conn.send((kind, self.index, self.figures(), *extra))
        except OSError:             # the parent is gone
            raise Stopped from None

    def stop_requested(self) -> bool:
        try:
            while self.conn.poll(0):
                if self.conn.recv()[0] == "stop":
                    return True
        except (EOFError, OSError):   # the parent is gone: stop, nobody to report to
            raise Stopped from None
        return False

    def check_fault(self) -> None:
        """--test-fault K:M:ACTION: once process K has M connections set up, it reports,
        then dies (kill), hangs (stop), or sleeps S seconds without reporting (pause:S).
        ``hold-stop`` hangs at the start of the hold instead."""
        if self.fault is None or self.fault[2] == "hold-stop" or self.connected < self.fault[1]:
            return
        action, self.fault = self.fault[2], None
        self.report()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action.startswith("pause:"):
            time.sleep(float(action[6:]))

    # -- connections -----------------------------------------------------------------
    def open_one(self) -> None:
        number = self.opened
        self.opened += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if self.loopback:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source_address(self.index, number), 0))
            err = sock.connect_ex((self.args.host, self.args.port))
        except OSError as exc:
            self.failed += 1
            self.errors[error_name(exc.errno)] += 1
            sock.close()
            return
        if err not in (0, errno.EINPROGRESS):
            self.failed += 1
            self.errors[error_name(err)] += 1
            sock.close()
            return
        fd = sock.fileno()
        self.socks[fd] = sock
        if self.plan is not None:
            self.numbers[fd] = self.first + number
        self.state[fd] = CONNECTING
        self.pending += 1
        self.epoll.register(fd, select.EPOLLOUT | select.EPOLLIN)

    def drop(self, fd: int, kind: str) -> None:
        """Close one connection and count it: failed if it was never set up, closed if
        it was."""
        sock = self.socks.pop(fd)
        state = self.state.pop(fd)
        self.buffers.pop(fd, None)
        self.joins_left.pop(fd, None)
        self.numbers.pop(fd, None)
        if state == READY:
            self.closed[kind] += 1
        else:
            self.pending -= 1
            self.failed += 1
            self.errors[kind] += 1
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        sock.close()

    def send(self, fd: int, sock: socket.socket, data: bytes) -> bool:
        """Send a small packet; False if it did not go (the connection may be dropped)."""
        try:
            sock.send(data)
            return True
        except (BlockingIOError, InterruptedError):
            if self.state[fd] != READY:         # a few bytes on a fresh connection: never expected
                self.drop(fd, "send_blocked")
            # a held connection whose send buffer is full skips this heartbeat
        except OSError as exc:
            self.drop(fd, error_name(exc.errno))
        return False

    def ready(self, fd: int) -> None:
        self.state[fd] = READY
        self.ready_fds.append(fd)
        self.pending -= 1
        self.connected += 1

    def on_event(self, fd: int, events: int) -> None:
        sock = self.socks.get(fd)
        if sock is None:
            return
        state = self.state[fd]
        if state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.drop(fd, error_name(err))
                return
            self.tcp_connected += 1
            self.epoll.modify(fd, select.EPOLLIN)
            self.buffers[fd] = bytearray()
            if self.args.ws:
                self.state[fd] = HANDSHAKING
                self.send(fd, sock, self.handshake)
            else:
                self._after_connect(fd, sock)
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(fd, error_name(exc.errno))
            return
        if not data:
            self.drop(fd, "closed_by_server")
            return
        buffer = self.buffers[fd]
        buffer += data
        if state == HANDSHAKING:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not ws_upgrade_accepted(bytes(buffer[:end]), self.ws_key):
                self.drop(fd, "handshake_refused")
                return
            del buffer[:end + 4]
            if not self._after_connect(fd, sock) or not buffer:
                return
        try:
            packets = server_packets(buffer, self.args.ws)
        except ProtocolError:
            self.drop(fd, "protocol_error")
            return
        self._on_packets(fd, sock, packets)

    def _after_connect(self, fd: int, sock: socket.socket) -> bool:
        if self.args.login:
            self.state[fd] = LOGGING_IN
            return self.send(fd, sock, packet(self.args.ws, LOGIN, 1, {"name": f"flood-{self.index}-{fd}"}))
        self.ready(fd)
        return True

    def _on_packets(self, fd: int, sock: socket.socket, packets: list) -> None:
        for action, seq, body in packets:
            state = self.state.get(fd)
            if state is None:
                return
            if state == LOGGING_IN and action == LOGIN and seq == 1:
                if body.startswith(b'{"error"'):
                    self.drop(fd, "login_error")
                    return
                self.logins += 1
                if self.plan is not None:
                    self._join_channels(fd, sock)
                elif not self._after_joins(fd, sock):
                    return
            elif state == JOINING and action == SUBSCRIBE and seq >= JOIN_SEQ:
                if body.startswith(b'{"error"'):
                    self.drop(fd, "join_error")
                    return
                self.joins += 1
                self.joins_left[fd] -= 1
                if not self.joins_left[fd]:
                    del self.joins_left[fd]
                    if not self._after_joins(fd, sock):
                        return
            elif state == SUBSCRIBING and action == SUBSCRIBE:
                if body.startswith(b'{"error"'):
                    self.drop(fd, "subscribe_error")
                    return
                self.ready(fd)
            elif action == PUSH_CHANNEL_MESSAGE:
                self.deliveries += 1
                at = body.find(b'"content":"') + 11
                stamp = body[at:at + STAMP_DIGITS]
                if at > 10 and stamp.isdigit():
                    self.latencies_ns.append(time.monotonic_ns() - int(stamp))

    def _join_channels(self, fd: int, sock: socket.socket) -> None:
        """Send all of the user's joins at once (pipelined: one write)."""
        names = self.plan.names(self.numbers.pop(fd))
        self.state[fd] = JOINING
        self.joins_left[fd] = len(names)
        self.send(fd, sock, b"".join(packet(self.args.ws, SUBSCRIBE, JOIN_SEQ + k, {"name": name})
                                     for k, name in enumerate(names)))

    def _after_joins(self, fd: int, sock: socket.socket) -> bool:
        """Logged in (and joined): the probe's sample also joins its channel; False if
        the connection was dropped."""
        if self.subscribed < self.sample:
            self.subscribed += 1
            self.state[fd] = SUBSCRIBING
            return self.send(fd, sock, packet(self.args.ws, SUBSCRIBE, 2, {"name": PROBE_CHANNEL}))
        self.ready(fd)
        return True

    def heartbeats(self) -> None:
        """Each set-up connection sends a heartbeat every --heartbeat seconds, spread
        out, from the moment it is set up: in a long connect phase (a million users
        joining channels) the first ones must not go silent past the server's
        --idle-timeout."""
        now = time.monotonic()
        if self.args.heartbeat <= 0 or not self.ready_fds:
            self.beat_last = now
            return
        self.beat_credit += (now - self.beat_last) * len(self.ready_fds) / self.args.heartbeat
        self.beat_last = now
        while self.beat_credit >= 1.0:
            self.beat_credit -= 1.0
            fd = self.ready_fds[self.beat_cursor % len(self.ready_fds)]
            self.beat_cursor += 1
            sock = self.socks.get(fd)
            if sock is not None and self.state.get(fd) == READY:
                self.send(fd, sock, self.beat)

    def poll(self, timeout: float) -> None:
        for fd, events in self.epoll.poll(timeout, 4096):
            self.on_event(fd, events)

    # -- the whole life of one process ----------------------------------------------
    def run(self) -> None:
        try:
            if self.connect_phase():
                self.hold_phase()
            self.finish()
        except Stopped:
            return
        finally:
            for sock in self.socks.values():
                sock.close()

    def connect_phase(self) -> bool:
        """Returns False when the parent said stop before the end."""
        args = self.args
        start = time.monotonic()
        deadline = start + args.connect_timeout
        rate = args.rate / args.processes if args.rate else 0.0
        stopped = False
        self.report()
        while time.monotonic() < deadline:
            now = time.monotonic()
            allowed = self.count if not rate else min(self.count, int((now - start) * rate) + 1)
            while self.opened < allowed and self.pending < args.inflight:
                self.open_one()
            if self.opened >= self.count and self.pending <= 0:
                break
            self.poll(0.01)
            self.heartbeats()
            self.check_fault()
            if time.monotonic() - self.last_report >= REPORT_EVERY:
                if self.stop_requested():
                    stopped = True
                    break
                self.report()
        # what never finished: opened ones time out; with an early stop, unopened ones too
        for fd, state in list(self.state.items()):
            if state != READY:
                self.drop(fd, "stopped" if stopped else "timed_out")
        missing = self.count - self.opened
        if missing:
            self.opened += missing
            self.failed += missing
            self.errors["stopped" if stopped else "timed_out"] += missing
        self.phase = "holding"
        self.report("connected", time.monotonic() - start)
        return not stopped

    def hold_phase(self) -> None:
        """Heartbeats spread over the period, until the parent says stop; bounded by a
        deadline past anything the parent may take."""
        args = self.args
        if self.fault is not None and self.fault[2] == "hold-stop":
            self.fault = None
            os.kill(os.getpid(), signal.SIGSTOP)
        hold_start = time.monotonic()
        hold_end = (hold_start + args.connect_timeout + 2 * args.report_timeout + args.hold + PROBE_GRACE
                    + AFTER_PROBE + 60.0)
        while time.monotonic() < hold_end:
            if time.monotonic() - self.last_report >= REPORT_EVERY:
                if self.stop_requested():
                    break
                self.report()
            self.heartbeats()
            self.poll(0.1)
        self.poll(0)        # what already arrived (the probe's last pushes)

    def finish(self) -> None:
        self.phase = "done"
        lat = sorted(self.latencies_ns)
        self.report("done", self.deliveries, lat[:: max(1, len(lat) // 5000)])


def flood_process(args, index: int, count: int, sample: int, conn, inherited: list, first: int = 0) -> None:
    for other in inherited:     # the parent's ends: the parent's exit must reach us as EOF
        other.close()
    try:
        Flood(args, index, count, sample, conn, first).run()
    except KeyboardInterrupt:
        pass

