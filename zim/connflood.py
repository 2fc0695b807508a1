"""connflood: open, log in and hold many zim connections (C10M-style load).

    tools/connflood --host 127.0.0.1 --port 8081 --connections 1000000 --processes 56 \\
                    --login --hold 60 --json

(``zim-connflood`` is the same program, installed with the package.)

N connections from K processes (each process holds at most 19,000: the
open-files limit here is 20,000 per process). Only loopback targets are
accepted.

Source ports. Towards a loopback target every socket is bound to its own
source address in 127.0.0.0/8 (127.2.0.1 and up) with IP_BIND_ADDRESS_NO_PORT,
so the kernel chooses the source port at connect() time for the whole 4-tuple,
from the stock ``ip_local_port_range`` (32768-60999): a port is shared by
sockets of different source addresses, and nothing needs the range widened.
Measured on Linux 6.18, one target port: 32,000 connections from 127.0.0.1
alone stop at the range's 28,232 ports (EADDRNOTAVAIL); 48,000 from spread
source addresses all connect, on about 9,600 ports per 16,000; 200,000 from 12
processes all connect on the stock range. Choosing ports ourselves was not
needed (and binding fixed ports would collide with other programs' listeners).

Phases, each bounded in time:
1. connect (``--rate`` new connections per second in all, 0: as fast as it
   goes, at most ``--inflight`` unfinished per process), WebSocket handshake
   with ``--ws``, login (action 1) with ``--login``;
2. hold ``--hold`` seconds once every process has connected: every connection
   sends a heartbeat (action 9) each ``--heartbeat`` seconds (spread out),
   reads and discards what comes; meanwhile a probe measures what a user feels
   at that scale: the round trip of a private message between two extra
   clients (A -> B, B answers on the push, A times the push), and a channel
   message to ``--probe-sample`` held connections (subscribed after their
   login) with its delivery latency. The hold lasts at least 1 s after the
   probe ends (its last pushes land);
3. close everything and print a summary, and with ``--json`` one JSON object
   as the last line of stdout.

Accounting: every one of the N connections is counted once, as ``connected``
(set up: connected, WebSocket handshake with ``--ws``, logged in with
``--login``), ``failed`` (never set up; ``errors`` by kind, ``timed_out`` for
the ones unfinished at ``--connect-timeout``) or ``unaccounted``:
``connected + failed + unaccounted == N``. Each client process sends its
running totals to this process every half second and its final figures when
told to stop; this process reads the processes' pipes all the time, in every
phase. A process that dies, or that does not answer within
``--report-timeout`` seconds (it is then killed), is listed in
``lost_processes``: its last report counts, the rest of its share is
``unaccounted``. ``closed`` counts connections (among the connected) closed
afterwards, by kind (``closed_by_server``, ``ECONNRESET``...);
``open_at_end`` the ones still open when the hold ended.

Exit code: 0 when all N connected and none was closed; 1 when some failed or
were closed; 3 when some are unaccounted or a client process was lost (2:
bad arguments).

A live progress line goes to stderr, and the lines ``holding: ...`` when the
hold starts after the probe and ``stopping: ...`` when the hold ends (a bench
can sample the server in between). The per-connection work is a few
non-blocking system calls on one epoll per process; framing uses zim's codec.
"""
from __future__ import annotations

import argparse
import base64
import errno
import ipaddress
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter

import orjson

from zim._codec import TcpDecoder, encode_tcp

LOGIN, SUBSCRIBE, SEND_USER, SEND_CHANNEL, HEARTBEAT = 1, 3, 2, 4, 9
PUSH_USER, PUSH_CHANNEL = 101, 102
PER_PROCESS_MAX = 19_000
IP_BIND_ADDRESS_NO_PORT = 24
PROBE_CHANNEL = "connflood-probe"
STAMP_DIGITS = 20
REPORT_EVERY = 0.5          # seconds between a client process's running totals
PROBE_GRACE = 60.0          # seconds the probe may outlast --hold
AFTER_PROBE = 1.0           # seconds held at least after the probe ends

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNACCOUNTED = 0, 1, 2, 3

# connection states
CONNECTING, HANDSHAKING, LOGGING_IN, SUBSCRIBING, READY = range(5)


def ws_client_frame(payload: bytes) -> bytes:
    """A masked binary WebSocket frame (clients must mask, RFC 6455 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x82, 0x80 | length])
    elif length < 65536:
        head = bytes([0x82, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big")
    return head + mask + bytes(byte ^ mask[i & 3] for i, byte in enumerate(payload))


def packet(websocket: bool, action: int, seq: int, body: dict) -> bytes:
    data = orjson.dumps(body)
    if websocket:
        return ws_client_frame(action.to_bytes(2, "big") + seq.to_bytes(2, "big") + data)
    return encode_tcp(action, seq, data)


def source_address(process: int, index: int) -> str:
    """A distinct loopback source address per connection (127.2.0.1 and up)."""
    number = process * PER_PROCESS_MAX + index
    return f"127.{2 + number // 62500 % 250}.{number // 250 % 250}.{1 + number % 250}"


def error_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number else "oserror"


class Packets:
    """Splits one connection's byte stream into server packets, cheaply: only the
    framing is read."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes, websocket: bool) -> list[tuple[int, int, bytes]]:
        buf = self.buf + data if self.buf else data
        out = []
        offset = 0
        while True:
            if websocket:
                if len(buf) - offset < 2:
                    break
                length = buf[offset + 1] & 0x7F
                head = 2
                if length == 126:
                    if len(buf) - offset < 4:
                        break
                    length = int.from_bytes(buf[offset + 2:offset + 4], "big")
                    head = 4
                elif length == 127:
                    if len(buf) - offset < 10:
                        break
                    length = int.from_bytes(buf[offset + 2:offset + 10], "big")
                    head = 10
                if len(buf) - offset < head + length:
                    break
                frame = buf[offset + head:offset + head + length]
                offset += head + length
                if buf[offset - head - length] & 0x0F == 2 and len(frame) >= 4:
                    out.append((int.from_bytes(frame[:2], "big"), int.from_bytes(frame[2:4], "big"), frame[4:]))
            else:
                if len(buf) - offset < 8:
                    break
                length = int.from_bytes(buf[offset:offset + 4], "big")
                if len(buf) - offset < length:
                    break
                out.append((int.from_bytes(buf[offset + 4:offset + 6], "big"),
                            int.from_bytes(buf[offset + 6:offset + 8], "big"), buf[offset + 8:offset + length]))
                offset += length
        self.buf = buf[offset:]
        return out


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

    def __init__(self, args, index: int, count: int, sample: int, conn) -> None:
        self.args = args
        self.index = index
        self.count = count
        self.sample = sample                # how many of ours join the probe channel
        self.conn = conn
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.state: dict[int, int] = {}
        self.parsers: dict[int, Packets] = {}
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
        self.handshake = (f"GET / HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: "
                          f"{base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          ).encode()

    # -- reports ---------------------------------------------------------------------
    def figures(self) -> dict:
        return {"phase": self.phase, "share": self.count, "opened": self.opened,
                "tcp_connected": self.tcp_connected, "logins": self.logins, "connected": self.connected,
                "failed": self.failed, "pending": self.pending, "alive": len(self.socks),
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
        self.state[fd] = CONNECTING
        self.pending += 1
        self.epoll.register(fd, select.EPOLLOUT | select.EPOLLIN)

    def drop(self, fd: int, kind: str) -> None:
        """Close one connection and count it: failed if it was never set up, closed if
        it was."""
        sock = self.socks.pop(fd)
        state = self.state.pop(fd)
        self.parsers.pop(fd, None)
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
            self.parsers[fd] = Packets()
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
        if state == HANDSHAKING:
            parser = self.parsers[fd]
            parser.buf += data
            end = parser.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not parser.buf.startswith(b"HTTP/1.1 101"):
                self.drop(fd, "handshake_refused")
                return
            rest, parser.buf = parser.buf[end + 4:], b""
            if self._after_connect(fd, sock) and rest:
                self._on_packets(fd, sock, parser.feed(rest, True))
            return
        self._on_packets(fd, sock, self.parsers[fd].feed(data, self.args.ws))

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
                if self.subscribed < self.sample:
                    self.subscribed += 1
                    self.state[fd] = SUBSCRIBING
                    if not self.send(fd, sock, packet(self.args.ws, SUBSCRIBE, 2, {"name": PROBE_CHANNEL})):
                        return
                else:
                    self.ready(fd)
            elif state == SUBSCRIBING and action == SUBSCRIBE:
                if body.startswith(b'{"error"'):
                    self.drop(fd, "subscribe_error")
                    return
                self.ready(fd)
            elif action == PUSH_CHANNEL:
                self.deliveries += 1
                at = body.find(b'"content":"') + 11
                stamp = body[at:at + STAMP_DIGITS]
                if at > 10 and stamp.isdigit():
                    self.latencies_ns.append(time.monotonic_ns() - int(stamp))

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
        fds = list(self.socks)
        beat = packet(args.ws, HEARTBEAT, 9, {})
        beats = 0           # sent so far: each connection once per --heartbeat seconds, spread out
        while time.monotonic() < hold_end:
            if time.monotonic() - self.last_report >= REPORT_EVERY:
                if self.stop_requested():
                    break
                self.report()
            if fds and args.heartbeat > 0:
                due = int((time.monotonic() - hold_start) * len(fds) / args.heartbeat)
                while beats < due:
                    fd = fds[beats % len(fds)]
                    beats += 1
                    sock = self.socks.get(fd)
                    if sock is not None:
                        self.send(fd, sock, beat)
            self.poll(0.1)
        self.poll(0)        # what already arrived (the probe's last pushes)

    def finish(self) -> None:
        self.phase = "done"
        lat = sorted(self.latencies_ns)
        self.report("done", self.deliveries, lat[:: max(1, len(lat) // 5000)])


def flood_process(args, index: int, count: int, sample: int, conn, inherited: list) -> None:
    for other in inherited:     # the parent's ends: the parent's exit must reach us as EOF
        other.close()
    try:
        Flood(args, index, count, sample, conn).run()
    except KeyboardInterrupt:
        pass


# -- the parent: collecting the reports ----------------------------------------------
class Child:
    """What the parent knows about one client process."""

    def __init__(self, index: int, share: int, process, pipe) -> None:
        self.index = index
        self.share = share
        self.process = process
        self.pipe = pipe
        self.figures: dict = {}             # the last report
        self.heard = time.monotonic()       # when the last report came
        self.connect_seconds: float | None = None
        self.done: tuple | None = None      # (deliveries, latencies) of the final report
        self.eof = False                    # the pipe closed: the process ended
        self.lost: str | None = None        # why its final report is missing

    @property
    def connected_phase_over(self) -> bool:
        return self.connect_seconds is not None or self.done is not None or self.eof


class Collector:
    """Reads every client process's pipe and keeps its last report. Every phase of
    the parent goes through ``pump``, so no report waits in a pipe unread."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.by_pipe = {child.pipe: child for child in children}

    def open_pipes(self) -> list:
        return [child.pipe for child in self.children if not child.eof]

    def pump(self, timeout: float) -> None:
        pipes = self.open_pipes()
        if not pipes:
            time.sleep(timeout)
            return
        for pipe in multiprocessing.connection.wait(pipes, timeout=timeout):
            child = self.by_pipe[pipe]
            try:
                while pipe.poll(0):
                    self.take(child, pipe.recv())
            except (EOFError, OSError):
                child.eof = True

    def take(self, child: Child, message: tuple) -> None:
        kind, _, figures = message[:3]
        child.figures = figures
        child.heard = time.monotonic()
        if kind == "connected":
            child.connect_seconds = message[3]
        elif kind == "done":
            child.done = (message[3], message[4])

    def silent(self, child: Child, report_timeout: float) -> bool:
        return time.monotonic() - child.heard > report_timeout

    def totals(self, *keys: str) -> dict:
        return {key: sum(child.figures.get(key, 0) for child in self.children) for key in keys}


# -- the probe (parent process) ------------------------------------------------------
class ProbeClient:
    """A blocking client for the probe: one logged-in TCP connection."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = TcpDecoder(1 << 24)
        self.pending: list[tuple[int, int, bytes]] = []
        self.user_id = self.request(LOGIN, {"name": name})["id"]

    def send(self, action: int, seq: int, body: dict) -> None:
        self.sock.sendall(encode_tcp(action, seq, orjson.dumps(body)))

    def next_packet(self, deadline: float) -> tuple[int, int, bytes]:
        while not self.pending:
            if time.monotonic() >= deadline:
                raise OSError("a probe answer did not come in time")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 16)
            if not data:
                raise OSError("the server closed a probe connection")
            self.pending += [(e[1], e[2], e[3]) for e in self.decoder.feed(data) if e[0] == "packet"]
        return self.pending.pop(0)

    def request(self, action: int, body: dict) -> dict:
        self.send(action, 1, body)
        deadline = time.monotonic() + 10
        while True:
            got_action, seq, raw = self.next_packet(deadline)
            if got_action == action and seq == 1:
                answer = orjson.loads(raw)
                if "error" in answer:
                    raise OSError(f"probe request {action}: {answer['error']}")
                return answer

    def wait_push(self, action: int, deadline: float) -> bytes:
        while True:
            got_action, seq, raw = self.next_packet(deadline)
            if got_action == action and seq == 0:
                return raw


def dm_round_trips(args) -> dict:
    """A -> B (push to B), B -> A on receipt (push to A): A times the round trip."""
    a = ProbeClient(args.host, args.port, "probe-a")
    b = ProbeClient(args.host, args.port, "probe-b")
    times = []
    try:
        for _ in range(args.probe_round_trips):
            start = time.monotonic_ns()
            a.send(SEND_USER, 2, {"receiverId": b.user_id, "content": "ping"})
            b.wait_push(PUSH_USER, time.monotonic() + 10)
            b.send(SEND_USER, 2, {"receiverId": a.user_id, "content": "pong"})
            a.wait_push(PUSH_USER, time.monotonic() + 10)
            times.append(time.monotonic_ns() - start)
    finally:
        a.sock.close()
        b.sock.close()
    times.sort()
    return {"round_trips": len(times), "p50_ms": times[len(times) // 2] / 1e6,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] / 1e6}


def broadcast_probe(args) -> int:
    """Send the probe channel messages (the sample connections receive them)."""
    publisher = ProbeClient(args.host, args.port, "probe-publisher")
    try:
        publisher.request(SUBSCRIBE, {"name": PROBE_CHANNEL})
        for _ in range(args.probe_messages):
            content = b"%020d" % time.monotonic_ns()
            publisher.request(SEND_CHANNEL, {"channel": PROBE_CHANNEL, "content": content.decode() + "x" * 80})
            time.sleep(0.05)
    finally:
        publisher.sock.close()
    return args.probe_messages


def run_probe(args, probe: dict) -> None:
    """The probe's thread: the parent's main thread keeps reading the pipes meanwhile."""
    try:
        probe["dm"] = dm_round_trips(args)
        probe["broadcast_messages"] = broadcast_probe(args)
    except OSError as exc:
        probe["error"] = str(exc)


# -- main -------------------------------------------------------------------------
def fault(text: str) -> tuple[int, int, str]:
    index, count, action = text.split(":", 2)
    if action not in ("kill", "stop", "hold-stop") and not action.startswith("pause:"):
        raise argparse.ArgumentTypeError(f"unknown fault action {action!r}")
    return int(index), int(count), action


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="connflood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--processes", type=int, default=0, help="default: connections / 19,000, rounded up")
    parser.add_argument("--ws", action="store_true", help="WebSocket (the port is zim's WebSocket port)")
    parser.add_argument("--login", action="store_true", help="log every connection in (action 1)")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to hold the connections")
    parser.add_argument("--rate", type=float, default=0.0, help="new connections per second in all (0: no limit)")
    parser.add_argument("--inflight", type=int, default=500, help="unfinished connects+logins per process")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a connection's heartbeats")
    parser.add_argument("--connect-timeout", type=float, default=600.0,
                        help="seconds a process may take to set up its connections")
    parser.add_argument("--report-timeout", type=float, default=60.0,
                        help="seconds a client process may stay silent (no report) before it counts as hung")
    parser.add_argument("--probe", action="store_true", help="measure DM round trips and a broadcast while holding")
    parser.add_argument("--probe-sample", type=int, default=1000)
    parser.add_argument("--probe-round-trips", type=int, default=200)
    parser.add_argument("--probe-messages", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    # tests: make client process K fail once M of its connections are set up
    parser.add_argument("--test-fault", type=fault, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    address = ipaddress.ip_address(socket.gethostbyname(args.host))
    if not address.is_loopback:
        parser.error("only loopback targets (127.0.0.0/8) are allowed")
    if args.connections < 1 or args.hold < 0 or args.rate < 0 or args.inflight < 1 or args.report_timeout <= 0:
        parser.error("connections and inflight must be >= 1, hold and rate >= 0, report-timeout > 0")
    if not args.processes:
        args.processes = -(-args.connections // PER_PROCESS_MAX)
    if args.processes < 1:
        parser.error("processes must be >= 1")
    if args.connections / args.processes > PER_PROCESS_MAX:
        parser.error(f"at most {PER_PROCESS_MAX} connections per process: use --processes "
                     f"{-(-args.connections // PER_PROCESS_MAX)} or more")
    if not args.probe:
        args.probe_sample = 0
    return args


def progress_line(collector: Collector, start: float, report_timeout: float) -> None:
    """connected: set up (logged in with --login); tcp: TCP connects done so far."""
    total = collector.totals("tcp_connected", "connected", "failed")
    elapsed = time.monotonic() - start
    ended = sum(1 for child in collector.children if child.eof and child.done is None)
    silent = sum(1 for child in collector.children
                 if not child.eof and collector.silent(child, min(5.0, report_timeout)))
    print(f"\rconnected {total['connected']:>9,}  tcp {total['tcp_connected']:>9,}  "
          f"failed {total['failed']:>7,}  {total['connected'] / max(elapsed, 1.0):>8,.0f}/s  "
          f"{elapsed:6.1f} s" + (f"  {ended} process(es) ended early" if ended else "")
          + (f"  {silent} silent" if silent else ""),
          end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base, extra = divmod(args.connections, args.processes)
    sample_base, sample_extra = divmod(min(args.probe_sample, args.connections), args.processes)
    context = multiprocessing.get_context("fork")
    children: list[Child] = []
    completed = False
    try:
        for index in range(args.processes):
            ours, theirs = context.Pipe()
            share = base + (index < extra)
            process = context.Process(target=flood_process, daemon=True, args=(
                args, index, share, sample_base + (index < sample_extra), theirs,
                [child.pipe for child in children] + [ours]))
            process.start()
            theirs.close()
            children.append(Child(index, share, process, ours))
        code = run(args, children)
        completed = True
        return code
    finally:
        # the client processes close their connections after their final report; after
        # an error here they would wait for a stop that does not come
        deadline = time.monotonic() + (30 if completed else 0)
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()
                child.process.join(5)


def run(args, children: list[Child]) -> int:
    collector = Collector(children)
    start = time.monotonic()

    # 1. connect: until every process has said so, ended, or stayed silent too long
    deadline = start + args.connect_timeout + args.report_timeout
    last_line = start
    while time.monotonic() < deadline:
        if all(child.connected_phase_over or collector.silent(child, args.report_timeout)
               for child in children):
            break
        collector.pump(0.2)
        if time.monotonic() - last_line >= 1.0:
            progress_line(collector, start, args.report_timeout)
            last_line = time.monotonic()
    progress_line(collector, start, args.report_timeout)
    print(file=sys.stderr)
    connect_seconds = max((c.connect_seconds for c in children if c.connect_seconds is not None), default=0.0)

    # 2. hold, with the probe in a thread: the pipes are read all along
    hold_start = time.monotonic()
    probe: dict = {}
    if args.probe:
        thread = threading.Thread(target=run_probe, args=(args, probe), daemon=True)
        thread.start()
        while thread.is_alive() and time.monotonic() < hold_start + args.hold + PROBE_GRACE:
            collector.pump(0.2)
        if thread.is_alive():
            probe["error"] = f"the probe did not finish within --hold + {PROBE_GRACE:.0f} s"
        hold_end = max(hold_start + args.hold, time.monotonic() + AFTER_PROBE)
    else:
        hold_end = hold_start + args.hold
    open_now = sum(c.figures.get("alive", 0) for c in children if not c.eof)
    print(f"holding: {open_now:,} open, {max(0.0, hold_end - time.monotonic()):.0f} s more",
          file=sys.stderr, flush=True)
    while time.monotonic() < hold_end:
        collector.pump(min(0.2, max(0.0, hold_end - time.monotonic())))
    held_seconds = time.monotonic() - hold_start

    # 3. stop, and wait a bounded time for every final report
    print("stopping: closing the connections", file=sys.stderr, flush=True)
    for child in children:
        if not child.eof:
            try:
                child.pipe.send(("stop",))
            except OSError:
                pass
    final_deadline = time.monotonic() + args.report_timeout
    while time.monotonic() < final_deadline and any(c.done is None and not c.eof for c in children):
        collector.pump(0.2)
    for child in children:
        if child.done is not None:
            continue
        if child.eof:
            child.process.join(5)
            child.lost = f"ended (exit code {child.process.exitcode}) without its final report"
        else:
            child.process.kill()
            child.process.join(5)
            child.lost = f"no final report within {args.report_timeout:g} s of the stop; killed"
    return summarize(args, children, collector, connect_seconds, held_seconds, probe)


def summarize(args, children: list[Child], collector: Collector, connect_seconds: float,
              held_seconds: float, probe: dict) -> int:
    totals = collector.totals("connected", "failed")
    errors: Counter = Counter()
    closed: Counter = Counter()
    for child in children:
        errors.update(child.figures.get("errors", {}))
        closed.update(child.figures.get("closed", {}))
    unaccounted = args.connections - totals["connected"] - totals["failed"]
    lost = [{"index": child.index, "pid": child.process.pid, "share": child.share, "why": child.lost,
             "last_report": {key: child.figures.get(key, 0) for key in
                             ("phase", "connected", "failed", "pending", "alive")}}
            for child in children if child.lost]
    finished = [child for child in children if child.done is not None]
    open_at_end = sum(child.figures.get("alive", 0) for child in finished)
    deliveries = sum(child.done[0] for child in finished)
    latencies = sorted(x for child in finished for x in child.done[1])
    logged_in = totals["connected"] if args.login else 0
    if args.probe and "broadcast_messages" in probe:
        members = min(args.probe_sample, logged_in)
        probe["broadcast"] = {
            "members": members, "expected": probe["broadcast_messages"] * members, "delivered": deliveries,
            "p50_ms": latencies[len(latencies) // 2] / 1e6 if latencies else None,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e6 if latencies else None}
    summary = {"connections": args.connections, "connected": totals["connected"], "failed": totals["failed"],
               "unaccounted": unaccounted, "logged_in": logged_in,
               "seconds": round(connect_seconds, 3),
               "connect_rate": round(totals["connected"] / connect_seconds) if connect_seconds else None,
               "errors": dict(errors), "closed": dict(closed), "open_at_end": open_at_end,
               "processes": args.processes, "lost_processes": lost,
               "held_seconds": round(held_seconds, 1), "probe": probe}
    print(f"connected {summary['connected']:,} of {args.connections:,} (logged in {logged_in:,}), failed "
          f"{summary['failed']:,}, unaccounted {unaccounted:,}, in {connect_seconds:.1f} s "
          f"({summary['connect_rate'] or 0:,}/s); errors {dict(errors)}; closed later {dict(closed)}; "
          f"open at the end of the hold: {open_at_end:,}")
    for entry in lost:
        print(f"client process {entry['index']} (pid {entry['pid']}, {entry['share']:,} connections) lost: "
              f"{entry['why']}; its last report: {entry['last_report']}")
    if probe:
        print(f"probe: {orjson.dumps(probe).decode()}")
    if args.json:
        print(orjson.dumps(summary).decode())
    if unaccounted or lost:
        return EXIT_UNACCOUNTED
    if summary["failed"] or closed:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
