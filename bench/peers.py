#!/usr/bin/env python3
"""zim against its peers: channel fan-out and idle memory of zim, redis, NATS and asyncio.

The servers a user would pick instead of zim for pushing messages to many
connections, measured the same way, one after the other, on this machine and on
loopback only:

- zim: ``python -m zim`` with its default flags under ``benchlib.Server`` (one
  worker, the durable SQLite store: every channel message is stored, that is the
  product);
- redis: ``redis-server --save "" --appendonly no`` (nothing stored), pub/sub;
- nats: ``nats-server`` core pub/sub (no JetStream, nothing stored);
- asyncio: ``bench/asyncio_server.py``, the server a Python user would write
  (asyncio.Protocol, one ``transport.write`` per message per subscriber), on
  uvloop when it is installed.

(a) Fan-out. For each N in ``--subscribers-list`` (default 1,000 and 10,000) a
fresh server gets N subscribers of one channel, spread over client processes of
at most ``--per-process`` sockets, and one publisher (in this process) sends M
messages of 100 bytes, with at most ``--window`` unanswered (zim and redis answer
every publish, the asyncio server says OK; NATS answers nothing, so the publisher
sends a PING after every half window and counts the PONGs). M × N deliveries are
expected; the subscribers read big chunks and count bytes (every delivery of a
peer has one exact size; zim's are measured by bench/broadcast.py's sample
connection), and one connection per client process checks its whole stream byte
for byte. Measured over the send phase (first send → last delivery): server CPU
(user + system of the server's process tree, psutil), deliveries per
server-CPU-second, deliveries per second (wall) and loss, which must be 0. The
median of ``--runs`` runs is reported. zim's part is bench/broadcast.py's code.

(b) Idle memory. A fresh server gets ``--idle-connections`` K connections (default
19,000, from one client process: the open-files limit is 20,000 per process),
each doing what is natural for it (zim: log in as a new user; redis: SUBSCRIBE;
NATS: CONNECT and SUB; asyncio: SUB), then ``--settle`` seconds of quiet:
(server RSS after - RSS before) / K. The RSS is summed over the server's process
tree (zim: the server and its store's writer process).

The clients share the two cores with the servers, so wall rates depend on them;
deliveries per server-CPU-second much less. A peer whose binary is missing is
skipped with a line saying so. ``--write-docs`` writes docs/benchmarks.md and
docs/benchmarks.png (matplotlib).

Example: ``python bench/peers.py --write-docs``;
small: ``--subscribers-list 50 --messages 20 --idle-connections 100 --settle 1 --runs 1``
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import psutil

import benchlib
import broadcast  # zim's fan-out: members, publisher, one run
import idle_memory  # zim's idle clients: connect and log in

PEERS = ("zim", "redis", "nats", "asyncio")
CHANNEL = b"bench"
PAYLOAD_SIZE = 100
FIRST_PING_WAIT = 5.0       # NATS: seconds a subscriber waits for the server's first PING
QUIET_SECONDS = 2.0         # after the last answer, a subscriber silent this long is short
DOCS_MD = os.path.join(benchlib.REPO_ROOT, "docs", "benchmarks.md")
DOCS_PNG = os.path.join(benchlib.REPO_ROOT, "docs", "benchmarks.png")


def payload(number: int) -> bytes:
    """Message ``number``'s 100 bytes: its number, then padding (never a delimiter)."""
    return b"%010d" % number + b"x" * (PAYLOAD_SIZE - 10)


# -- the peers' wire formats ------------------------------------------------------
def resp_command(*parts: bytes) -> bytes:
    """A redis command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


NATS_CONNECT = b'CONNECT {"verbose":false,"pedantic":false}\r\n'


@dataclasses.dataclass(frozen=True)
class Wire:
    """What a peer's clients send and receive; every delivery has one exact size."""

    subscribe: bytes               # a subscriber sends this once connected
    subscribed: bytes              # ... and is subscribed when what it read ends so
    delivery_head: bytes           # a delivery is head + payload + tail
    delivery_tail: bytes
    publish_head: bytes            # a publish is head + payload + tail
    publish_tail: bytes
    publisher_hello: bytes         # the publisher's first bytes (then PING, NATS only)
    first_ping: bool               # the server PINGs each new client once (NATS)
    answer_end: bytes              # the publisher's answers are lines ending so
    ping_acks: bool                # no answer per publish: a PING after every batch
    good_answer: Callable[[int], bytes]   # the answer to one publish, given N subscribers

    def delivery(self, number: int) -> bytes:
        return self.delivery_head + payload(number) + self.delivery_tail

    @property
    def delivery_size(self) -> int:
        return len(self.delivery_head) + PAYLOAD_SIZE + len(self.delivery_tail)

    def publish(self, number: int) -> bytes:
        return self.publish_head + payload(number) + self.publish_tail


WIRES = {
    # A PUBLISH is answered with the number of receivers: ":N\r\n".
    "redis": Wire(
        subscribe=resp_command(b"SUBSCRIBE", CHANNEL),
        subscribed=b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(CHANNEL), CHANNEL),
        delivery_head=b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(CHANNEL), CHANNEL, PAYLOAD_SIZE),
        delivery_tail=b"\r\n",
        publish_head=b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(CHANNEL), CHANNEL, PAYLOAD_SIZE),
        publish_tail=b"\r\n", publisher_hello=b"", first_ping=False, answer_end=b"\r\n",
        ping_acks=False, good_answer=lambda subscribers: b":%d\r\n" % subscribers),
    # The PING makes the server answer PONG once the CONNECT and SUB are processed.
    # nats-server also PINGs every new client once, about 2 s after it connects (to
    # measure the round trip; later PINGs come every ping_interval, set to 1 h):
    # subscribers wait for that PING and answer it before any run, so that no PING
    # ever lands in a counted stream.
    "nats": Wire(
        subscribe=NATS_CONNECT + b"SUB %s 1\r\nPING\r\n" % CHANNEL,
        subscribed=b"PONG\r\n",
        delivery_head=b"MSG %s 1 %d\r\n" % (CHANNEL, PAYLOAD_SIZE),
        delivery_tail=b"\r\n",
        publish_head=b"PUB %s %d\r\n" % (CHANNEL, PAYLOAD_SIZE),
        publish_tail=b"\r\n", publisher_hello=NATS_CONNECT, first_ping=True,
        answer_end=b"\r\n", ping_acks=True,
        good_answer=lambda subscribers: b"PONG\r\n"),
    # bench/asyncio_server.py's line protocol.
    "asyncio": Wire(
        subscribe=b"SUB %s\n" % CHANNEL, subscribed=b"OK\n",
        delivery_head=b"MSG ", delivery_tail=b"\n",
        publish_head=b"PUB %s " % CHANNEL, publish_tail=b"\n",
        publisher_hello=b"", first_ping=False, answer_end=b"\n", ping_acks=False,
        good_answer=lambda subscribers: b"OK\n"),
}


# -- subscribers of redis, NATS and asyncio (client processes) -----------------------
def open_subscribers(wire: Wire, port: int, count: int, inflight: int,
                     deadline: float) -> tuple[list[socket.socket], list[str]]:
    """Connect ``count`` sockets and subscribe each; returns the subscribed ones.

    At most ``inflight`` are connecting or subscribing at once. NATS subscribers
    then wait for the server's first PING (see ``Wire.first_ping``) and answer it.
    """
    epoll = select.epoll()
    pending: dict[int, list] = {}       # fd → [socket, what it read, connected]
    awaiting_ping: dict[int, list] = {} # fd → [socket, what it read, subscribed at]
    ready: list[socket.socket] = []
    failures: list[str] = []
    opened = 0

    def fail(fd: int, reason: str) -> None:
        entry = pending.pop(fd, None) or awaiting_ping.pop(fd)
        epoll.unregister(fd)
        entry[0].close()
        failures.append(reason)

    def subscribed(fd: int, sock: socket.socket) -> None:
        epoll.unregister(fd)
        ready.append(sock)

    def read(fd: int, sock: socket.socket, buf: bytearray) -> bool:
        """Append what ``sock`` has to ``buf``; False (and the socket failed) if it broke."""
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            fail(fd, f"recv: {exc}")
            return False
        if not data:
            fail(fd, "closed by the server during setup")
            return False
        buf += data
        if b"ERR" in buf:
            fail(fd, f"server error: {bytes(buf[-200:])!r}")
            return False
        return True

    def answer_ping(fd: int) -> None:
        sock, buf, _ = awaiting_ping[fd]
        if b"PING\r\n" in buf:
            sock.send(b"PONG\r\n")
            del awaiting_ping[fd]
            subscribed(fd, sock)

    while len(ready) + len(failures) < count and time.monotonic() < deadline:
        while opened < count and len(pending) < inflight:
            sock, code = benchlib.start_connect(epoll, port)
            pending[sock.fileno()] = [sock, bytearray(), False]
            opened += 1
            if code:
                fail(sock.fileno(), f"connect: {os.strerror(code)}")
        for fd, _ in epoll.poll(0.2, 4096):
            if fd in awaiting_ping:
                sock, buf, _ = awaiting_ping[fd]
                if read(fd, sock, buf):
                    answer_ping(fd)
                continue
            entry = pending.get(fd)
            if entry is None:
                continue
            sock, buf, connected = entry
            if not connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(fd, f"connect: {os.strerror(code)}")
                    continue
                sock.send(wire.subscribe)       # a few dozen bytes: always fits
                entry[2] = True
                epoll.modify(fd, select.EPOLLIN)
                continue
            if not read(fd, sock, buf):
                continue
            if wire.subscribed in buf:
                del pending[fd]
                if wire.first_ping:
                    awaiting_ping[fd] = [sock, buf, time.monotonic()]
                    answer_ping(fd)
                else:
                    subscribed(fd, sock)
        # A server that sends no first PING after all: do not wait for it forever.
        too_old = time.monotonic() - FIRST_PING_WAIT
        for fd in [fd for fd, entry in awaiting_ping.items() if entry[2] < too_old]:
            subscribed(fd, awaiting_ping.pop(fd)[0])
    for entry in [*pending.values(), *awaiting_ping.values()]:
        entry[0].close()
        failures.append("setup timed out")
    epoll.close()
    return ready, failures


def receive_run(wire: Wire, sockets: list[socket.socket], messages: int, deadline: float,
                conn) -> dict:
    """Count the bytes of one run on every subscriber; check one stream byte for byte."""
    size = wire.delivery_size
    expected_bytes = messages * size
    epoll = select.epoll()
    fds = [s.fileno() for s in sockets]
    for fd in fds:
        epoll.register(fd, select.EPOLLIN)
    totals = [0] * (max(fds) + 1)
    sample_fd = fds[0]
    sample = bytearray()
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    bufs = [chunk]
    read_some = benchlib.read_some
    monotonic_ns = time.monotonic_ns
    # Bytes waiting before the run (a previous run's excess) count against it.
    stray = 0
    for fd, _ in epoll.poll(0):
        stray += max(0, read_some(fd, bufs))
    short = len(fds)                    # subscribers still short of the whole run
    closed = 0
    last_ns = 0
    published = False
    quiet_since = time.monotonic()
    conn.send(("armed",))
    while short and time.monotonic() < deadline:
        events = epoll.poll(0.2, 8192)
        if not events:
            if not published and conn.poll():
                if conn.recv()[0] != "published":
                    raise broadcast.StopRun()       # the parent gave up on this run
                published = True
            if published and time.monotonic() - quiet_since > QUIET_SECONDS:
                break                   # every publish was answered: the rest is lost
            continue
        now = monotonic_ns()
        for fd, _ in events:
            n = read_some(fd, bufs)
            if n < 0:
                continue
            if n == 0:
                closed += 1
                epoll.unregister(fd)
                if totals[fd] < expected_bytes:
                    short -= 1
                continue
            before = totals[fd]
            totals[fd] = before + n
            if before < expected_bytes <= before + n:
                short -= 1
            if fd == sample_fd:
                sample += view[:n]
        last_ns = now
        quiet_since = time.monotonic()
    epoll.close()
    delivered = sum(min(totals[fd], expected_bytes) // size for fd in fds)
    expected_stream = b"".join(wire.delivery(number) for number in range(messages))
    return {
        "subscribers": len(fds), "delivered": delivered,
        "short": sum(1 for fd in fds if totals[fd] < expected_bytes),
        "over": sum(1 for fd in fds if totals[fd] > expected_bytes) + (1 if stray else 0),
        "closed": closed, "last_ns": last_ns, "sample_exact": sample == expected_stream,
    }


def subscriber_process(peer: str, port: int, count: int, setup_timeout: float, conn) -> None:
    """A client process: subscribe ``count`` connections, then count runs on order."""
    wire = WIRES[peer]
    benchlib.raise_open_files(count + 100)
    sockets, failures = open_subscribers(wire, port, count, 500,
                                         time.monotonic() + setup_timeout)
    conn.send(("ready", len(sockets), failures[:5], len(failures)))
    try:
        while conn.poll(900):     # bounded: the parent gives orders well within this
            order = conn.recv()
            if order[0] == "published":
                continue          # a finished run's note, not read during the run
            if order[0] != "run" or not sockets:
                break
            _, messages, run_timeout = order
            conn.send(("result", receive_run(wire, sockets, messages,
                                             time.monotonic() + run_timeout, conn)))
    except broadcast.StopRun:
        pass
    finally:
        for sock in sockets:
            sock.close()


def idle_process(peer: str, port: int, count: int, setup_timeout: float, conn) -> None:
    """A client process: open ``count`` idle connections (zim: logged in; the others:
    subscribed), report, and hold them until told to stop."""
    benchlib.raise_open_files(count + 100)
    deadline = time.monotonic() + setup_timeout
    if peer == "zim":
        clients = idle_memory.IdleClients(port, 0, count, websocket=False, sources=1,
                                          inflight=1000)
        clients.run(deadline)
        sockets = [c.sock for c in clients.done]
        failures = clients.failures + ["setup timed out"] * (count - len(sockets) - clients.failed)
        failed = count - len(sockets)
    else:
        sockets, failures = open_subscribers(WIRES[peer], port, count, 500, deadline)
        failed = len(failures)
    conn.send(("ready", len(sockets), failures[:5], failed))
    try:
        conn.poll(900)            # bounded: the parent measures well within this
    finally:
        for sock in sockets:
            sock.close()


# -- the publisher of redis, NATS and asyncio (this process) ------------------------
class PeerPublisher:
    """One publishing connection keeping at most ``window`` messages unanswered."""

    def __init__(self, wire: Wire, port: int, window: int, subscribers: int) -> None:
        self.wire = wire
        self.window = window
        # NATS answers nothing: a PING after each half window, its PONG acks the batch.
        self.batch = max(1, window // 2) if wire.ping_acks else 1
        self.good_answer = wire.good_answer(subscribers)
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        if wire.publisher_hello:
            self.sock.sendall(wire.publisher_hello + b"PING\r\n")
            while b"PONG\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data or b"-ERR" in self.buf + data:
                    raise RuntimeError(f"publisher hello failed: {bytes(self.buf + data)!r}")
                self.buf += data
            self.buf.clear()        # the INFO line, then PONG (the server's PING comes later)

    def _answers(self, complete: bytes) -> tuple[int, int, int]:
        """(answers, bad answers, server PINGs) in complete answer lines."""
        if self.wire.ping_acks:
            pongs = complete.count(b"PONG\r\n")
            return pongs, complete.count(b"-ERR"), complete.count(b"PING\r\n")
        lines = complete.count(self.wire.answer_end)
        return lines, lines - complete.count(self.good_answer), 0

    def publish(self, messages: int, deadline: float) -> tuple[int, int, list[str]]:
        """Send ``messages`` messages; returns (acknowledged, bad answers, samples of them)."""
        # Built before the clock starts: the publisher's Python work stays out of the run.
        requests = [self.wire.publish(number) for number in range(messages)]
        ping = b"PING\r\n" if self.wire.ping_acks else b""
        end = self.wire.answer_end
        unanswered: collections.deque[int] = collections.deque()   # messages per answer
        sent = acked = errors = 0
        error_texts: list[str] = []
        while acked < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"publishing timed out after {acked}/{messages} answers")
            chunk = []
            while sent < messages and (sent == acked or sent - acked + self.batch <= self.window):
                count = min(self.batch, messages - sent)
                chunk.extend(requests[sent:sent + count])
                chunk.append(ping)
                unanswered.append(count)
                sent += count
            if chunk:
                self.sock.sendall(b"".join(chunk))
            data = self.sock.recv(1 << 18)
            if not data:
                raise RuntimeError("the server closed the publisher connection")
            self.buf += data
            last = self.buf.rfind(end)
            if last < 0:
                continue
            complete = bytes(self.buf[:last + len(end)])
            del self.buf[:last + len(end)]
            answers, bad, server_pings = self._answers(complete)
            if server_pings:
                self.sock.sendall(b"PONG\r\n" * server_pings)
            if bad:
                errors += bad
                if len(error_texts) < 3:
                    error_texts.append(complete[:200].decode("utf-8", "replace"))
            for _ in range(min(answers, len(unanswered))):
                acked += unanswered.popleft()
        return acked, errors, error_texts

    def close(self) -> None:
        self.sock.close()


def peer_run(number: int, peer: str, messages: int, run_timeout: float,
             tree: benchlib.ProcessTree, publisher: PeerPublisher, pipes: list) -> dict:
    """One fan-out run of a redis, NATS or asyncio server (broadcast.one_run for zim)."""
    for pipe in pipes:
        pipe.send(("run", messages, run_timeout))
    deadline = time.monotonic() + run_timeout + 10
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())) or pipe.recv()[0] != "armed":
            raise RuntimeError("a subscriber process did not start its run")
    cpu = tree.cpu_times()
    start_ns = time.monotonic_ns()
    acked, errors, error_texts = publisher.publish(messages, deadline)
    publish_seconds = (time.monotonic_ns() - start_ns) / 1e9
    for pipe in pipes:
        pipe.send(("published",))
    results = []
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError("a subscriber process did not report its run in time")
        results.append(pipe.recv()[1])
    cpu_after = tree.cpu_times()
    server_user = cpu_after.user - cpu.user
    server_system = cpu_after.system - cpu.system
    server_cpu = server_user + server_system
    subscribers = sum(r["subscribers"] for r in results)
    expected = messages * subscribers
    delivered = sum(r["delivered"] for r in results)
    wall = max(1e-9, (max(r["last_ns"] for r in results) - start_ns) / 1e9)
    run = {
        "run": number, "subscribers": subscribers, "messages": messages,
        "expected": expected, "delivered": delivered, "loss": expected - delivered,
        "short_members": sum(r["short"] for r in results),
        "over_members": sum(r["over"] for r in results),
        "closed_members": sum(r["closed"] for r in results),
        "sample_streams_exact": all(r["sample_exact"] for r in results),
        "delivery_bytes": WIRES[peer].delivery_size,
        "publish_errors": errors, "publish_error_samples": error_texts, "acked": acked,
        "wall_seconds": round(wall, 4), "publish_seconds": round(publish_seconds, 4),
        "server_cpu_seconds": round(server_cpu, 4),
        "server_cpu_user_seconds": round(server_user, 4),
        "server_cpu_system_seconds": round(server_system, 4),
        "deliveries_per_second": round(delivered / wall),
        "deliveries_per_cpu_second": round(delivered / server_cpu) if server_cpu > 0 else None,
    }
    run["ok"] = (run["loss"] == 0 and errors == 0 and run["over_members"] == 0
                 and run["closed_members"] == 0 and run["sample_streams_exact"])
    print(f"run {number}: {delivered:,}/{expected:,} deliveries (loss {run['loss']:,}) "
          f"in {wall:.3f} s wall = {broadcast.millions(delivered / wall)}/s; "
          f"server CPU {server_cpu:.3f} s (user {server_user:.2f} + sys {server_system:.2f}) = "
          f"{broadcast.millions(delivered / server_cpu) if server_cpu > 0 else 'n/a'} "
          f"deliveries/CPU-s; delivery {run['delivery_bytes']} B; publish errors {errors}; "
          f"sample streams {'exact' if run['sample_streams_exact'] else 'DIFFER'}")
    sys.stdout.flush()
    return run


# -- the servers ---------------------------------------------------------------------
class PeerServer:
    """One server under test on a free loopback port; ``start()`` returns its process
    tree once it accepts connections."""

    def __init__(self, name: str, loop: str) -> None:
        self.name = name
        self.loop = loop                # the asyncio server's event loop
        self.port = 0
        self.zim: benchlib.Server | None = None
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        binary = {"redis": "redis-server", "nats": "nats-server"}.get(self.name)
        if binary and shutil.which(binary) is None:
            return f"{binary} not found (apt-get install {binary})"
        return None

    def version(self) -> str:
        if self.name == "zim":
            return f"zim {_zim_version()}, 1 worker, durable store (sqlite)"
        if self.name == "asyncio":
            return f"Python {sys.version.split()[0]}, {self.loop}"
        binary = {"redis": "redis-server", "nats": "nats-server"}[self.name]
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return binary
        if self.name == "redis":        # "Redis server v=7.0.15 sha=... malloc=jemalloc-5.3.0 ..."
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            return f"redis {fields.get('v', '?')} ({fields.get('malloc', '?')})"
        return out.replace("nats-server: ", "nats-server ")

    def command(self, template: bool = False) -> list[str]:
        """The server's command line; ``template``: with PORT and DIR, as the docs show it."""
        port = "PORT" if template else str(self.port)
        directory = "DIR" if template else (self._tmp.name if self._tmp else ".")
        python = "python" if template else sys.executable
        if self.name == "zim":
            if self.zim is not None and not template:
                return self.zim.command
            return [python, "-m", "zim", "--tcp", f"{benchlib.LOOPBACK}:{port}",
                    "--ws", f"{benchlib.LOOPBACK}:{port}", "--data", directory, "--workers", "1",
                    "--channel-rate", "0"]
        if self.name == "redis":
            # maxclients: as many as the open-files limit allows (redis keeps 32 spare).
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            return ["redis-server", "--port", port, "--bind", benchlib.LOOPBACK,
                    "--save", "", "--appendonly", "no", "--maxclients", str(max(1000, hard - 100)),
                    "--dir", directory]
        if self.name == "nats":
            # The config only stops server PINGs (every 2 min by default) from landing
            # in the subscribers' counted streams.
            return ["nats-server", "-a", benchlib.LOOPBACK, "-p", port,
                    "-c", os.path.join(directory, "nats.conf")]
        script = os.path.join("" if template else benchlib.REPO_ROOT, "bench", "asyncio_server.py")
        loop = "uvloop" if self.loop.startswith("uvloop") else "asyncio"
        return [python, script, "--port", port, "--loop", loop]

    def start(self, timeout: float = 30.0) -> benchlib.ProcessTree:
        if self.name == "zim":
            self.zim = benchlib.Server()
            root = self.zim.start(timeout)
            self.port = self.zim.tcp_port
            return benchlib.ProcessTree(root)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"peers-{self.name}-")
        self.port = benchlib.free_port()
        if self.name == "nats":
            with open(os.path.join(self._tmp.name, "nats.conf"), "w") as config:
                config.write('ping_interval: "1h"\n')
        self._log = open(os.path.join(self._tmp.name, "server.log"), "w+b")
        self.process = subprocess.Popen(self.command(), cwd=self._tmp.name, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection((benchlib.LOOPBACK, self.port), timeout=0.5):
                    return benchlib.ProcessTree(psutil.Process(self.process.pid))
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:.0f} s")

    def alive(self) -> bool:
        if self.zim is not None:
            return self.zim.alive()
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        if self.zim is not None:
            return self.zim.log_tail(size)
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - size))
        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.zim is not None:
            code = self.zim.stop(timeout)
            self.zim = None
            return code
        code = None
        if self.process is not None:
            # nats-server exits 1 on SIGTERM, 0 on SIGINT; the others exit 0 on SIGTERM.
            self.process.send_signal(signal.SIGINT if self.name == "nats" else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                print(f"warning: {self.name} ignored SIGTERM for {timeout:.0f} s; killed")
            code = self.process.returncode
            self.process = None
        benchlib.release_files(self._log, self._tmp)
        self._log = self._tmp = None
        return code


def _zim_version() -> str:
    try:
        from importlib.metadata import version
        number = version("zim")
    except Exception:               # not installed as a distribution: the checkout
        number = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=benchlib.REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{number} ({commit})" if commit else number


# -- the two measurements ---------------------------------------------------------------
def messages_for(subscribers: int, args) -> int:
    """M: ``--messages``, or about 10,000,000 deliveries per run: a second or more of
    server CPU for the fastest peers, so psutil's 10 ms ticks do not matter."""
    return args.messages or max(100, min(20_000, 10_000_000 // subscribers))


def fanout(server: PeerServer, subscribers: int, args) -> dict:
    """The runs of one server with ``subscribers`` subscribers; medians of the runs."""
    messages = messages_for(subscribers, args)
    processes = -(-subscribers // args.per_process)
    base, extra = divmod(subscribers, processes)
    counts = [base + (1 if index < extra else 0) for index in range(processes)]
    tree = server.start()
    publisher = None
    runs: list[dict] = []
    try:
        print(f"== {server.name}: {subscribers:,} subscribers in {processes} client "
              f"process(es), {messages:,} messages of {PAYLOAD_SIZE} B per run, window "
              f"{args.window}; server pid {tree.root.pid}: {shlex.join(server.command())}")
        sys.stdout.flush()
        with benchlib.ClientProcesses() as group:
            setup_start = time.monotonic()
            if server.name == "zim":
                group.start(broadcast.member_process, [
                    (server.port, index * (base + 1), count, 500, args.setup_timeout)
                    for index, count in enumerate(counts)])
            else:
                group.start(subscriber_process, [
                    (server.name, server.port, count, args.setup_timeout) for count in counts])
            ready = 0
            for _, count, failures, failed in group.receive_all(args.setup_timeout + 30,
                                                                "subscribe its connections"):
                ready += count
                for reason in failures:
                    print(f"  setup failure: {reason}")
                if failed:
                    print(f"  {failed} subscriber(s) of one process failed to set up")
            print(f"setup: {ready:,}/{subscribers:,} subscribed in "
                  f"{time.monotonic() - setup_start:.1f} s")
            sys.stdout.flush()
            if ready != subscribers:
                raise RuntimeError(f"{server.name}: not every subscriber could subscribe")
            if server.name == "zim":
                publisher = broadcast.Publisher(server.port, PAYLOAD_SIZE, args.window)
                run_args = argparse.Namespace(messages=messages, run_timeout=args.run_timeout)
            else:
                publisher = PeerPublisher(WIRES[server.name], server.port, args.window,
                                          subscribers)
            for number in range(1, args.runs + 1):
                if server.name == "zim":
                    run = broadcast.one_run(number, run_args, tree, publisher, group.pipes)
                    run["ok"] = (run["loss"] == 0 and run["publish_errors"] == 0
                                 and run["over_members"] == 0 and run["unexpected_packets"] == 0)
                else:
                    run = peer_run(number, server.name, messages, args.run_timeout, tree,
                                   publisher, group.pipes)
                runs.append(run)
                if not server.alive():
                    raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
                if tree.changed():
                    raise RuntimeError(f"a {server.name} process ended or started during a run")
            publisher.close()
            publisher = None
    finally:
        if publisher is not None:
            publisher.close()
        code = server.stop()
    # Bytes of one delivery on the wire: zim's push packet (measured), the peers' frame.
    delivery_bytes = (runs[0]["push_bytes"] if server.name == "zim"
                      else WIRES[server.name].delivery_size) if runs else None
    return {
        "subscribers": subscribers, "messages": messages, "client_processes": processes,
        "delivery_bytes": delivery_bytes,
        "ok": all(r["ok"] for r in runs) and len(runs) == args.runs,
        "loss": sum(r["loss"] for r in runs),
        "deliveries_per_cpu_second": _median(runs, "deliveries_per_cpu_second"),
        "deliveries_per_second": _median(runs, "deliveries_per_second"),
        "server_cpu_seconds": _median(runs, "server_cpu_seconds"),
        "wall_seconds": _median(runs, "wall_seconds"),
        "server_exit_code": code, "runs": runs,
    }


def idle(server: PeerServer, connections: int, args) -> dict:
    """Server RSS growth per idle connection, after ``--settle`` seconds."""
    tree = server.start()
    try:
        time.sleep(0.5)     # let the server finish starting before the baseline
        rss_before = tree.rss()
        fds_before = tree.root.num_fds()
        print(f"== {server.name}: idle memory, {connections:,} connections; server pid "
              f"{tree.root.pid}: {shlex.join(server.command())}; baseline rss "
              f"{rss_before / 2**20:.1f} MiB, {fds_before} fds")
        sys.stdout.flush()
        with benchlib.ClientProcesses() as group:
            started = time.monotonic()
            group.start(idle_process, [(server.name, server.port, connections,
                                        args.setup_timeout)])
            _, ready, failures, failed = group.receive_all(args.setup_timeout + 30,
                                                           "open its idle connections")[0]
            setup_seconds = time.monotonic() - started
            for reason in failures:
                print(f"  setup failure: {reason}")
            settle_end = time.monotonic() + args.settle
            while server.alive() and time.monotonic() < settle_end:
                time.sleep(min(0.5, max(0.0, settle_end - time.monotonic())))
            if not server.alive():
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
            if tree.changed():
                raise RuntimeError(f"a {server.name} process ended or started during the settle")
            rss_after = tree.rss()
            fds_after = tree.root.num_fds()
    finally:
        code = server.stop()
    per_connection = (rss_after - rss_before) / max(1, ready)
    # Every connection must still be open at the measurement: the server holds its fd.
    ok = ready == connections and failed == 0 and fds_after - fds_before >= ready
    print(f"idle: {ready:,}/{connections:,} connections ({failed} failed) "
          f"in {setup_seconds:.1f} s; "
          f"after {args.settle:g} s: rss {rss_after / 2**20:.1f} MiB "
          f"(+{(rss_after - rss_before) / 2**20:.1f} MiB), fds +{fds_after - fds_before} "
          f"= {per_connection:,.0f} bytes per connection")
    sys.stdout.flush()
    return {
        "ok": ok, "connections": ready, "connections_wanted": connections, "failed": failed,
        "setup_seconds": round(setup_seconds, 2), "settle_seconds": args.settle,
        "rss_before": rss_before, "rss_after": rss_after,
        "bytes_per_connection": round(per_connection, 1),
        "server_fds_before": fds_before, "server_fds_after": fds_after,
        "server_exit_code": code,
    }


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# -- reporting ---------------------------------------------------------------------------
def _millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f} M"


def table(result: dict) -> list[str]:
    """The markdown table: one row per server."""
    counts = result["subscribers"]
    header = ["server"]
    for count in counts:
        header += [f"{count:,} subs: deliveries / server-CPU-s", f"{count:,} subs: deliveries / s"]
    header += ["loss", "bytes / delivery"]
    if result["idle_connections"]:
        header.append(f"bytes / idle connection ({result['idle_connections']:,})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in result["servers"].items():
        if not entry["available"]:
            lines.append(f"| {name} | skipped: {entry['skipped']} |" + " |" * (len(header) - 2))
            continue
        row = [name]
        loss = 0
        sizes = set()
        for count in counts:
            part = entry["fanout"].get(str(count))
            if part is None:
                row += ["failed", "failed"]
                continue
            row += [_millions(part["deliveries_per_cpu_second"]),
                    _millions(part["deliveries_per_second"])]
            loss += part["loss"]
            sizes.add(part["delivery_bytes"])
        idle_part = entry.get("idle")
        row += [f"{loss:,}", "/".join(str(size) for size in sorted(sizes))]
        if result["idle_connections"]:
            row.append("failed" if idle_part is None
                       else f"{idle_part['bytes_per_connection']:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ratios(result: dict) -> list[str]:
    """zim relative to each peer: deliveries per server-CPU-second (zim ÷ peer, above 1:
    zim does more with a CPU-second) and idle memory (peer ÷ zim, above 1: zim holds
    a connection for less)."""
    zim = result["servers"].get("zim") or {}
    if not zim.get("available"):
        return []
    peers = [n for n, e in result["servers"].items() if n != "zim" and e.get("available")]
    header = ["figure", *[f"zim vs {name}" for name in peers]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def quotient(top: float | None, bottom: float | None) -> str:
        return "n/a" if not top or not bottom else f"{top / bottom:.2f}×"

    for count in result["subscribers"]:
        mine = (zim["fanout"].get(str(count)) or {}).get("deliveries_per_cpu_second")
        cells = [quotient(mine, (result["servers"][n]["fanout"].get(str(count)) or {}).get(
            "deliveries_per_cpu_second")) for n in peers]
        lines.append(f"| deliveries / server-CPU-s at {count:,} subscribers, zim ÷ peer | "
                     + " | ".join(cells) + " |")
    if result["idle_connections"]:
        mine = (zim.get("idle") or {}).get("bytes_per_connection")
        cells = [quotient((result["servers"][n].get("idle") or {}).get("bytes_per_connection"),
                          mine) for n in peers]
        lines.append("| bytes / idle connection, peer ÷ zim | " + " | ".join(cells) + " |")
    return lines


def write_docs(result: dict, lines: list[str]) -> None:
    """docs/benchmarks.md (the table, how it was measured, each run) and docs/benchmarks.png."""
    info = result["machine"]
    runs_text = []
    for name, entry in result["servers"].items():
        for count, part in entry.get("fanout", {}).items():
            figures = ", ".join(_millions(r["deliveries_per_cpu_second"]) for r in part["runs"])
            runs_text.append(f"- {name}, {int(count):,} subscribers × {part['messages']:,} "
                             f"messages: {figures} deliveries per server-CPU-second; "
                             f"loss {part['loss']:,}")
        if entry.get("idle"):
            idle_part = entry["idle"]
            runs_text.append(
                f"- {name}, idle: {idle_part['connections']:,} connections, RSS "
                f"{idle_part['rss_before'] / 2**20:.1f} → "
                f"{idle_part['rss_after'] / 2**20:.1f} MiB")
        if entry.get("error"):
            runs_text.append(f"- {name}: FAILED: {entry['error'].splitlines()[0]}")
    versions = "\n".join(f"- {name}: {entry.get('version', '')} — "
                         + (f"`{shlex.join(entry['command'])}`" if entry.get("command")
                            else f"skipped ({entry.get('skipped')})")
                         for name, entry in result["servers"].items())
    messages = ", ".join(f"{int(n):,} at {int(count):,} subscribers"
                         for count, n in result["messages"].items())
    status = ("every run delivered every message (loss 0)" if result["ok"]
              else "**some runs failed or lost messages: see the Runs section**")
    relative = ratios(result)
    memory_gib = info["memory_bytes"] / 2**30
    idle_text = "" if not result["idle_connections"] else f"""
**Idle memory.** A fresh server, {result['idle_connections']:,} connections from one client
process, each doing what is natural for it (zim: log in as a new user; redis:
SUBSCRIBE; NATS: CONNECT and SUB; asyncio: SUB), then {result['settle']:g} s of quiet:
(RSS after − RSS before) / connections, the RSS summed over the server's process
tree. Kernel socket memory is in none of them.
"""
    text = f"""# zim against its peers

zim, redis, NATS and a plain asyncio server on the same machine, measured the
same way by `bench/peers.py`. Generated by `bench/peers.py --write-docs` on
{result['date']}; the figures drift by ±25% from minute to minute on this
machine, measure your own.

    {result['command']}

Machine: {info['nproc']} cores, shared by the server and the clients; {memory_gib:.1f} GiB;
Linux {info['kernel']}; Python {info['python']}; open-files limit {info['open_files_limit']:,}.
Loopback only. Medians of {result['runs']} run(s); {status}.

{chr(10).join(lines)}

{chr(10).join(relative)}

![deliveries per server-CPU-second and bytes per idle connection](benchmarks.png)

## What is measured

**Fan-out.** A fresh server for each subscriber count: N subscribers of one
channel, in client processes of at most {result['per_process']:,} sockets each, and one
publisher sending messages of {PAYLOAD_SIZE} bytes ({messages}), with at
most {result['window']} unanswered. zim answers each send once it is stored, redis answers each
PUBLISH with its receiver count, the asyncio server answers OK; NATS answers
nothing, so its publisher sends a PING after every half window and counts the
PONGs. Every subscriber must receive every message: the subscribers count bytes
(each delivery of a peer has one exact size; zim's size is read by a sample
connection that parses every packet), one connection per client process checks
its whole stream, and *loss* is what did not arrive.
*Deliveries per server-CPU-second* = deliveries ÷ the user + system CPU time of
the server's process tree from the first send to the last delivery. That is the
figure to compare. The wall rate (*deliveries / s*) also depends on the Python
clients, which share the two cores with the server. *Bytes / delivery* is the
size of one delivery on the wire: zim pushes a whole message (id, seq, content,
sender, time, channel) in its own framing, the peers only the payload and a
short header.
{idle_text}
## The servers

Versions and command lines (PORT: a free loopback port; DIR: a temporary directory):

{versions}

Notes:

- **zim** runs with its default flags (`benchlib.Server`: one worker, loopback
  ports) but for `--channel-rate 0`: the default limit of 40 messages per second
  per channel would refuse the bench's stream. The durable SQLite store is on:
  every channel message is also committed to the database by the writer process
  before the send is answered (the writer's CPU is counted), and every user
  logged in by the idle test is stored.
- **redis** stores nothing (`--save "" --appendonly no`): pub/sub over RESP2,
  one thread.
- **nats** is core NATS (no JetStream: nothing stored). It is written in Go and
  multi-threaded, so it can use both cores; its CPU time is summed over its
  threads. The config file only sets `ping_interval: "1h"`, and the subscribers
  answer the one PING it sends each new connection before the runs, so no PING
  lands in a counted stream.
- **asyncio** is `bench/asyncio_server.py`, what a Python user would write: one
  `asyncio.Protocol` per connection, one `transport.write` per message per
  subscriber, one thread.

zim, redis and NATS queue a subscriber's messages and hand them to the kernel
in one write per subscriber per loop iteration (NATS: per flush of its writer);
the asyncio server makes one system call per delivery, and on loopback that
call also runs the receiving side's TCP work, which is where its CPU time goes.
redis copies each message into every subscriber's output buffer; zim frames it
once into the channel's buffer for the loop iteration and writes each
subscriber's slice straight from there (docs/architecture.md, "Broadcast"), so
its bytes are written to memory once, not once per subscriber: it sends twice
the bytes per delivery and still spends less CPU on each.

## Runs

{chr(10).join(runs_text)}

Reproduce: `apt-get install redis-server nats-server`, `pip install -e '.[bench]'`,
then the command above (see [bench/README.md](../bench/README.md)).
"""
    with open(DOCS_MD, "w") as out:
        out.write(text)
    plot(result, DOCS_PNG)
    print(f"wrote {os.path.relpath(DOCS_MD, benchlib.REPO_ROOT)} and "
          f"{os.path.relpath(DOCS_PNG, benchlib.REPO_ROOT)}")


def plot(result: dict, path: str) -> None:
    """Bar charts: deliveries per server-CPU-second for each N, bytes per idle connection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in result["servers"].items() if e["available"]]
    colors = {"zim": "#2b7bba", "redis": "#d62728", "nats": "#2ca02c", "asyncio": "#ff7f0e"}
    panels = [(f"deliveries per server-CPU-second (millions)\n{count:,} subscribers",
               [(result["servers"][n]["fanout"].get(str(count)) or {}).get(
                   "deliveries_per_cpu_second") for n in names], 1e6, "{:.2f}")
              for count in result["subscribers"]]
    if result["idle_connections"]:
        panels.append((f"server bytes per idle connection\n{result['idle_connections']:,} "
                       "connections (lower is better)",
                       [(result["servers"][n].get("idle") or {}).get("bytes_per_connection")
                        for n in names], 1, "{:,.0f}"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    for axis, (title, values, scale, label) in zip(axes[0], panels):
        heights = [0 if v is None else v / scale for v in values]
        bars = axis.bar(names, heights, color=[colors.get(n, "grey") for n in names])
        for bar, value in zip(bars, values):
            axis.annotate("n/a" if value is None else label.format(value / scale),
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.margins(y=0.15)
        axis.spines[["top", "right"]].set_visible(False)
    figure.suptitle(f"zim and its peers, {result['date']} "
                    f"({result['machine']['nproc']} shared cores, loopback)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- orchestration -------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(PEERS), metavar="A,B",
                        help=f"servers to measure, comma-separated (default {','.join(PEERS)})")
    parser.add_argument("--subscribers-list", default="1000,10000", metavar="N,N",
                        help="fan-out subscriber counts (default 1000,10000)")
    parser.add_argument("--messages", type=int, default=0, metavar="M",
                        help="messages per run (default: about 10,000,000 / N, in 100..20,000)")
    parser.add_argument("--window", type=int, default=64, metavar="N",
                        help="publisher messages in flight (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="fan-out runs; the median is reported")
    parser.add_argument("--per-process", type=int, default=5000, metavar="N",
                        help="subscriber sockets per client process (default 5000)")
    parser.add_argument("--idle-connections", type=int, default=19_000, metavar="K",
                        help="idle connections per server, one client process (default 19000; "
                             "0 skips the idle test)")
    parser.add_argument("--settle", type=float, default=10.0, metavar="S",
                        help="seconds idle before measuring memory (default 10)")
    parser.add_argument("--setup-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed to connect and subscribe (default 120)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed per run (default 120)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write docs/benchmarks.md and docs/benchmarks.png")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    args.server_names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.server_names) - set(PEERS))
    if unknown or not args.server_names:
        parser.error(f"--servers takes names among {','.join(PEERS)}")
    try:
        args.subscriber_counts = [int(n) for n in args.subscribers_list.split(",") if n.strip()]
    except ValueError:
        parser.error("--subscribers-list takes comma-separated integers, e.g. 1000,10000")
    if not args.subscriber_counts or min(args.subscriber_counts) < 1:
        parser.error("--subscribers-list needs counts of at least 1")
    if min(args.window, args.runs, args.per_process) < 1 or args.messages < 0:
        parser.error("--window, --runs and --per-process must be at least 1, --messages >= 0")
    if args.per_process > 19000 or args.idle_connections > 19000 or args.idle_connections < 0:
        parser.error("--per-process and --idle-connections must fit the open-files limit (19000)")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    return args


def asyncio_loop() -> str:
    """The asyncio server's event loop: uvloop when installed."""
    if importlib.util.find_spec("uvloop") is None:
        return "asyncio default loop (uvloop not installed)"
    import uvloop
    return f"uvloop {uvloop.__version__}"


def run(args: argparse.Namespace, info: dict) -> int:
    benchlib.raise_open_files(resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # servers inherit it
    loop = asyncio_loop()
    print(f"servers {','.join(args.server_names)}; subscribers {args.subscriber_counts}; "
          f"{args.runs} run(s); idle connections {args.idle_connections:,}; "
          f"asyncio server on {loop}")
    sys.stdout.flush()
    result: dict = {
        "bench": "peers", "subscribers": args.subscriber_counts,
        "messages": {str(n): messages_for(n, args) for n in args.subscriber_counts},
        "runs": args.runs, "window": args.window, "per_process": args.per_process,
        "idle_connections": args.idle_connections, "settle": args.settle,
        "payload_bytes": PAYLOAD_SIZE, "machine": info,
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "servers": {},
    }
    ok = True
    for name in args.server_names:
        server = PeerServer(name, loop)
        reason = server.missing()
        if reason is not None:
            print(f"== {name}: SKIPPED: {reason}")
            result["servers"][name] = {"available": False, "skipped": reason}
            continue
        entry = {"available": True, "version": server.version(),
                 "command": server.command(template=True), "fanout": {}, "ok": True}
        result["servers"][name] = entry
        try:
            for count in args.subscriber_counts:
                part = fanout(server, count, args)
                entry["fanout"][str(count)] = part
                print(f"{name} {count:,} subscribers: median "
                      f"{_millions(part['deliveries_per_cpu_second'])} deliveries/CPU-s, "
                      f"{_millions(part['deliveries_per_second'])} deliveries/s, "
                      f"loss {part['loss']:,} {'OK' if part['ok'] else 'FAILED'}")
                entry["ok"] = entry["ok"] and part["ok"]
            if args.idle_connections:
                entry["idle"] = idle(server, args.idle_connections, args)
                entry["ok"] = entry["ok"] and entry["idle"]["ok"]
        except (RuntimeError, OSError) as exc:
            print(f"== {name}: FAILED: {exc}")
            entry.update(ok=False, error=str(exc))
            server.stop()
        ok = ok and entry["ok"]
    result["ok"] = ok
    lines = table(result)
    print()
    for line in [*lines, "", *ratios(result)]:
        print(line)
    figures = []
    for name, entry in result["servers"].items():
        if not entry["available"]:
            figures.append(f"{name}=skipped")
            continue
        for count, part in entry["fanout"].items():
            rate = part["deliveries_per_cpu_second"]
            figures.append(f"{name}_deliveries_per_cpu_second_{count}="
                           + ("n/a" if rate is None else f"{rate:,.0f}"))
        if entry.get("idle"):
            figures.append(f"{name}_bytes_per_idle_connection="
                           f"{entry['idle']['bytes_per_connection']:,.0f}")
    print(f"RESULT peers {' '.join(figures)} {'OK' if ok else 'FAILED'}")
    sys.stdout.flush()
    if args.write_docs:
        write_docs(result, lines)
    if args.json:
        benchlib.print_json(result)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("peers", "zim against redis, NATS and asyncio: fan-out and "
                             "idle memory", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
