"""The clients of redis, NATS and the asyncio server in bench/peers.py:
subscriber and idle-connection client processes, the publisher (in the bench's
own process) and one fan-out run of a peer. zim's clients are those of
bench/broadcast.py and bench/idle_memory.py.
"""
from __future__ import annotations

import argparse
import collections
import os
import select
import socket
import sys
import time
from typing import Callable

import benchlib
import broadcast  # (zim's fan-out: members, publisher, one run)
import idle_memory  # (zim's idle clients: connect and log in)
from peers_wire import FIRST_PING_WAIT, QUIET_SECONDS, WIRES, Wire

IDLE_REQUESTS_IN_FLIGHT = 1000  # logins or subscriptions, as bench/idle_memory.py's default


# -- subscribers of redis, NATS and asyncio (client processes) -----------------------
def open_subscribers(wire: Wire, port: int, count: int, inflight: int, deadline: float,
                     names: Callable[[int], list[str]] | None = None,
                     ) -> tuple[list[socket.socket], list[str]]:
    """Connect ``count`` sockets and subscribe each; returns the subscribed ones.

    Each subscribes to the bench channel, or with ``names`` connection i to the
    channels ``names(i)`` in one request. At most ``inflight`` are connecting or
    subscribing at once. NATS subscribers then wait for the server's first PING
    (see ``Wire.first_ping``) and answer it.
    """
    epoll = select.epoll()
    pending: dict[int, list] = {}       # fd → [socket, what it read, connected, channels]
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
            channels = None if names is None else [n.encode() for n in names(opened)]
            pending[sock.fileno()] = [sock, bytearray(), False, channels]
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
            sock, buf, connected, channels = entry
            if not connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(fd, f"connect: {os.strerror(code)}")
                    continue
                request = wire.subscribe if channels is None else wire.subscribe_many(channels)
                if sock.send(request) != len(request):  # a few hundred bytes: always fits
                    fail(fd, "short send")
                    continue
                entry[2] = True
                epoll.modify(fd, select.EPOLLIN)
                continue
            if not read(fd, sock, buf):
                continue
            if (wire.subscribed in buf if channels is None
                    else wire.subscribed_many(buf, len(channels))):
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


def idle_channel_names(channels: int, size: int, users: int) -> Callable[[int], list[str]]:
    """Connection i's ``channels`` channel names: bench/idle_memory.py's cuts (N - 1
    shared channels of ``size`` members, each a different cut, and one of its own)."""
    shape = argparse.Namespace(channels_per_user=channels, channel_size=size)
    phases = [names for _, _, names in idle_memory.join_phases(shape, users)]
    return lambda index: [name for names in phases for name in names(index)]


def idle_process(peer: str, port: int, count: int, setup_timeout: float, channels: int,
                 channel_size: int, conn) -> None:
    """A client process: open ``count`` idle connections and report, then hold them
    until told to stop. With ``channels`` 0, zim's log in and the others subscribe to
    the bench channel; else every connection (zim's once logged in) subscribes to
    ``channels`` channels (``idle_channel_names``), at most
    ``IDLE_REQUESTS_IN_FLIGHT`` subscriptions in flight."""
    benchlib.raise_open_files(count + 100)
    deadline = time.monotonic() + setup_timeout
    names = idle_channel_names(channels, channel_size, count) if channels else None
    confirmed = 0       # subscriptions the server confirmed (zim: joins answered, no error)
    if peer == "zim":
        clients = idle_memory.IdleClients(port, 0, count, websocket=False, sources=1,
                                          inflight=IDLE_REQUESTS_IN_FLIGHT)
        clients.run(deadline)
        sockets = [c.sock for c in clients.done]
        failures = clients.failures + ["setup timed out"] * (count - len(sockets) - clients.failed)
        failed = count - len(sockets)
        if names is not None and sockets:
            join_failures = clients.join_phase(names, channels, deadline)
            confirmed = len(sockets) * channels - join_failures
            if join_failures:
                failures.append(f"{join_failures} join(s) failed: {clients.failures[-1:]}")
                failed += -(-join_failures // channels)     # connections short of a join
    else:
        inflight = 500 if names is None else max(1, IDLE_REQUESTS_IN_FLIGHT // channels)
        sockets, failures = open_subscribers(WIRES[peer], port, count, inflight, deadline,
                                             names)
        failed = len(failures)
        if names is not None:       # open_subscribers keeps only the confirmed ones
            confirmed = len(sockets) * channels
    conn.send(("ready", len(sockets), failures[:5], failed, confirmed))
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
