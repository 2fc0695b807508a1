#!/usr/bin/env python3
"""Channel fan-out: deliveries per server-CPU-second.

Starts a real server (``python -m zim``, one worker). K members, spread over a few
client processes (at most ``--per-process`` sockets each), log in as new users and
subscribe to one channel. One publisher connection (in this process) then sends M
channel messages (action 4) of ``--content-size`` bytes, pipelined with up to
``--window`` unanswered requests so the server is never idle. Every message is
pushed (102) to all K members: M × K deliveries are expected, and any shortfall is
reported as loss.

Measured during the send phase only (first send → last byte received):
server CPU seconds (user + system of the server process), wall time, deliveries,
and send-to-receipt latency. Receivers do no per-packet Python work: they read
big chunks and add up byte counts. One *sample* connection per client process
parses every packet: it gives the packet sizes (so byte counts convert exactly
to packet counts, every member receiving the same TCP stream) and the latency
(each message's content starts with its send time, CLOCK_MONOTONIC ns, which is
system-wide).

The publisher and the receivers share the machine's cores with the server, so
wall-clock rates depend on the client too; deliveries per server-CPU-second is
the figure to compare across runs and with peers (bench/peers.py).

Example: ``python bench/broadcast.py --members 1000 --json``
"""
from __future__ import annotations

import argparse
import bisect
import multiprocessing
import os
import select
import shlex
import socket
import statistics
import sys
import time

import orjson

import benchlib

from zim.protocol import LOGIN, SEND_CHANNEL, SUBSCRIBE, PUSH_CHANNEL_MESSAGE as PUSH_CHANNEL
CHANNEL = "bench"
STAMP_DIGITS = 20   # the content starts with the send time, zero-padded ns


# -- members (client processes) ----------------------------------------------
def open_members(port: int, first: int, count: int, inflight: int, deadline: float,
                 sources: int = 1) -> tuple[list[socket.socket], bytearray, list[str]]:
    """Connect ``count`` sockets (clients ``first``... spread over ``sources`` source
    addresses), log each in and subscribe it; returns the ready ones.

    Also returns what was read past the subscribe response of the first ready
    socket (the sample connection): it belongs to the push stream (normally empty).
    """
    epoll = select.epoll()
    pending: dict[int, list] = {}       # fd → [socket, buffer, connected]
    ready: list[socket.socket] = []
    failures: list[str] = []
    sample_rest = bytearray()
    opened = 0
    subscribe = benchlib.tcp_packet(SUBSCRIBE, 2, orjson.dumps({"name": CHANNEL}))

    def fail(fd: int, reason: str) -> None:
        entry = pending.pop(fd)
        epoll.unregister(fd)
        entry[0].close()
        failures.append(reason)

    while len(ready) + len(failures) < count and time.monotonic() < deadline:
        while opened < count and len(pending) < inflight:
            source = benchlib.source_address(first + opened, sources)
            sock, code = benchlib.start_connect(epoll, port, source)
            pending[sock.fileno()] = [sock, bytearray(), False]
            opened += 1
            if code:
                fail(sock.fileno(), f"connect: {os.strerror(code)}")
        for fd, _ in epoll.poll(0.2, 4096):
            entry = pending.get(fd)
            if entry is None:
                continue
            sock, buf, connected = entry
            if not connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(fd, f"connect: {os.strerror(code)}")
                    continue
                # Log in and subscribe at once: one connection's requests are answered in order.
                login = orjson.dumps({"name": f"member-{first}-{opened}-{fd}"})
                sock.send(benchlib.tcp_packet(LOGIN, 1, login) + subscribe)
                entry[2] = True
                epoll.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                fail(fd, f"recv: {exc}")
                continue
            if not data:
                fail(fd, "closed by the server during setup")
                continue
            buf += data
            try:
                packets = benchlib.tcp_split(buf)
            except ValueError as exc:
                fail(fd, str(exc))
                continue
            subscribed = False
            error = None
            for action, seq, body in packets:
                reply = orjson.loads(body) if body else {}
                if "error" in reply:
                    error = f"action {action}: {reply['error']}"
                    break
                if action == SUBSCRIBE and seq == 2:
                    subscribed = True
            if error is not None:
                fail(fd, error)
            elif subscribed:
                del pending[fd]
                epoll.unregister(fd)
                if not ready:
                    sample_rest = buf
                ready.append(sock)
    for entry in pending.values():
        entry[0].close()
        failures.append("setup timed out")
    epoll.close()
    return ready, sample_rest, failures


class StopRun(Exception):
    """The parent ended the benchmark while a run was going on."""


def receive_run(sockets: list[socket.socket], sample_buf: bytearray, messages: int,
                deadline: float, conn) -> dict:
    """Count the bytes of one run on every member; parse the sample connection fully."""
    epoll = select.epoll()
    fds = [s.fileno() for s in sockets]
    for fd in fds:
        epoll.register(fd, select.EPOLLIN)
    totals = [0] * (max(fds) + 1)
    sample_fd = fds[0]
    sample_packets: list[int] = []         # cumulative byte offsets of the push stream
    latencies_ns: list[int] = []
    unexpected = 0
    remaining: set[int] | None = None      # members still short of the full stream
    target = 0
    closed = 0
    last_ns = 0
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    read_some = benchlib.read_some
    bufs = [chunk]
    monotonic_ns = time.monotonic_ns
    conn.send(("armed",))

    def parse_sample(now: int) -> None:
        nonlocal unexpected
        for action, _seq, body in benchlib.tcp_split(sample_buf):
            if action != PUSH_CHANNEL:
                unexpected += 1
                continue
            offset = (sample_packets[-1] if sample_packets else 0) + benchlib.HEADER_SIZE + len(body)
            sample_packets.append(offset)
            content = orjson.loads(body).get("content", "")
            if content[:STAMP_DIGITS].isdigit():
                latencies_ns.append(now - int(content[:STAMP_DIGITS]))

    # Bytes the sample connection had buffered before this run (normally none).
    totals[sample_fd] = len(sample_buf)
    parse_sample(monotonic_ns())
    while time.monotonic() < deadline:
        events = epoll.poll(0.2, 8192)
        if not events:
            # Quiet: the parent may have said how many messages were really accepted
            # (fewer than asked when the server refused some); nothing more will come.
            if conn.poll():
                order = conn.recv()
                if order[0] != "accepted":
                    raise StopRun()         # the parent gave up on this run
                messages = min(messages, order[1])
                if remaining is None and len(sample_packets) >= messages:
                    target = sample_packets[-1] if sample_packets else 0
                    remaining = {fd for fd in fds if totals[fd] < target}
            if remaining is not None and not remaining:
                break
            continue
        now = monotonic_ns()
        for fd, _ in events:
            n = read_some(fd, bufs)
            if n < 0:
                continue
            if n == 0:
                closed += 1
                epoll.unregister(fd)
                if remaining is not None:
                    remaining.discard(fd)
                continue
            totals[fd] += n
            if fd == sample_fd:
                sample_buf += view[:n]
                parse_sample(now)
            if remaining is not None and fd in remaining and totals[fd] >= target:
                remaining.discard(fd)
        last_ns = now
        if remaining is None and len(sample_packets) >= messages:
            # The sample saw every message: now the full stream's length is known.
            target = sample_packets[-1]
            remaining = {fd for fd in fds if totals[fd] < target}
        if remaining is not None and not remaining:
            break
    epoll.close()
    delivered = 0
    short = over = 0
    stream_end = sample_packets[-1] if sample_packets else 0
    for fd in fds:
        got = totals[fd]
        count = bisect.bisect_right(sample_packets, got)
        delivered += count
        if got > stream_end:
            over += 1        # bytes the sample connection never saw
        elif count < messages:
            short += 1
    return {
        "members": len(fds), "delivered": delivered, "short": short, "over": over,
        "closed": closed, "unexpected": unexpected, "last_ns": last_ns,
        "sample_packets": len(sample_packets), "latencies_ns": latencies_ns,
        "stream_bytes": stream_end,
    }


def member_process(port: int, first: int, count: int, inflight: int, setup_timeout: float,
                   conn) -> None:
    """A client process: hold ``count`` members and report each run to the parent."""
    benchlib.raise_open_files(count + 100)
    sockets, sample_buf, failures = open_members(
        port, first, count, inflight, time.monotonic() + setup_timeout)
    conn.send(("ready", len(sockets), failures[:5], len(failures)))
    try:
        while conn.poll(900):     # bounded: the parent gives orders well within this
            order = conn.recv()
            if order[0] == "accepted":
                continue      # a finished run's note, not read during the run
            if order[0] != "run" or not sockets:
                break
            _, messages, run_timeout = order
            result = receive_run(sockets, sample_buf, messages,
                                 time.monotonic() + run_timeout, conn)
            conn.send(("result", result))
    except StopRun:
        pass
    finally:
        for sock in sockets:
            sock.close()


# -- publisher (this process) ------------------------------------------------
class Publisher:
    def __init__(self, port: int, content_size: int, window: int) -> None:
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.content_size = content_size
        self.window = window
        self.buf = bytearray()
        self.seq = 0
        self._request(LOGIN, {"name": "publisher"})
        self._request(SUBSCRIBE, {"name": CHANNEL})

    def _next_seq(self) -> int:
        self.seq = self.seq % 32767 + 1
        return self.seq

    def _request(self, action: int, body: dict) -> dict:
        seq = self._next_seq()
        self.sock.sendall(benchlib.tcp_packet(action, seq, orjson.dumps(body)))
        while True:
            for got_action, got_seq, reply in benchlib.tcp_split(self.buf):
                if got_action == action and got_seq == seq:
                    result = orjson.loads(reply) if reply else {}
                    if "error" in result:
                        raise RuntimeError(f"publisher action {action}: {result['error']}")
                    return result
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the server closed the publisher connection")
            self.buf += data

    def publish(self, messages: int, deadline: float) -> tuple[int, int, list[str]]:
        """Send ``messages`` channel messages, at most ``window`` unanswered; returns
        (acknowledged, errors, first error texts)."""
        padding = b"x" * max(0, self.content_size - STAMP_DIGITS)
        prefix = orjson.dumps({"channel": CHANNEL, "content": ""})[:-2]  # ...,"content":"
        sent = acked = errors = 0
        error_texts: list[str] = []
        outstanding = 0
        monotonic_ns = time.monotonic_ns
        pack = benchlib.tcp_packet
        while acked < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"publishing timed out after {acked}/{messages} answers")
            if sent < messages and outstanding < self.window:
                batch = []
                while sent < messages and outstanding < self.window:
                    body = b'%s%020d%s"}' % (prefix, monotonic_ns(), padding)
                    batch.append(pack(SEND_CHANNEL, self._next_seq(), body))
                    sent += 1
                    outstanding += 1
                self.sock.sendall(b"".join(batch))
            data = self.sock.recv(1 << 18)
            if not data:
                raise RuntimeError("the server closed the publisher connection")
            self.buf += data
            for action, _seq, reply in benchlib.tcp_split(self.buf):
                if action != SEND_CHANNEL:
                    continue
                acked += 1
                outstanding -= 1
                if reply.startswith(b'{"error"'):
                    errors += 1
                    if len(error_texts) < 3:
                        error_texts.append(reply.decode("utf-8", "replace"))
        return acked, errors, error_texts

    def close(self) -> None:
        self.sock.close()


# -- orchestration -------------------------------------------------------------
def add_fanout_args(parser: argparse.ArgumentParser, members: int) -> None:
    """The fan-out flags, shared with bench/workers.py."""
    parser.add_argument("--members", type=int, default=members, metavar="K",
                        help=f"subscribed member connections (default {members})")
    parser.add_argument("--messages", type=int, default=0, metavar="M",
                        help="channel messages per run (default: about 20,000,000 / K, "
                             "between 100 and 20,000)")
    parser.add_argument("--content-size", type=int, default=100, metavar="BYTES",
                        help="message content size (default 100; at least 20, the timestamp)")
    parser.add_argument("--window", type=int, default=64, metavar="N",
                        help="publisher requests in flight (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--per-process", type=int, default=5000, metavar="N",
                        help="member sockets per client process (default 5000)")
    parser.add_argument("--setup-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed to connect and subscribe the members (default 120)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed per run (default 120)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fanout_args(parser, 1000)
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra zim-server flags, one string (e.g. \"--max-packet 131072\")")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    if args.members < 1 or args.runs < 1 or args.window < 1 or args.per_process < 1:
        parser.error("--members, --runs, --window and --per-process must be at least 1")
    if not STAMP_DIGITS <= args.content_size <= 60000:
        parser.error(f"--content-size must be in {STAMP_DIGITS}..60000")
    if args.per_process > 19000:
        parser.error("--per-process above 19000 does not fit the open-files limit")
    if args.messages <= 0:
        args.messages = max(100, min(20_000, 20_000_000 // args.members))
    return args


def millions(value: float) -> str:
    return f"{value / 1e6:.3f} M"


def one_run(number: int, args, proc, publisher: Publisher, pipes: list) -> dict:
    for pipe in pipes:
        pipe.send(("run", args.messages, args.run_timeout))
    deadline = time.monotonic() + args.run_timeout + 10
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())) or pipe.recv()[0] != "armed":
            raise RuntimeError("a member process did not start its run")
    cpu = proc.cpu_times()
    start_ns = time.monotonic_ns()
    acked, errors, error_texts = publisher.publish(args.messages, deadline)
    publish_seconds = (time.monotonic_ns() - start_ns) / 1e9
    for pipe in pipes:
        pipe.send(("accepted", acked - errors))
    results = []
    for pipe in pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError("a member process did not report its run in time")
        results.append(pipe.recv()[1])
    cpu_after = proc.cpu_times()
    server_user = cpu_after.user - cpu.user
    server_system = cpu_after.system - cpu.system
    server_cpu = server_user + server_system
    expected = args.messages * sum(r["members"] for r in results)
    delivered = sum(r["delivered"] for r in results)
    last_ns = max(r["last_ns"] for r in results)
    wall = max(1e-9, (last_ns - start_ns) / 1e9)
    latencies = sorted(ns / 1e6 for r in results for ns in r["latencies_ns"])
    run = {
        "run": number, "members": sum(r["members"] for r in results), "messages": args.messages,
        "expected": expected, "delivered": delivered, "loss": expected - delivered,
        "short_members": sum(r["short"] for r in results),
        "over_members": sum(r["over"] for r in results),
        "closed_members": sum(r["closed"] for r in results),
        "unexpected_packets": sum(r["unexpected"] for r in results),
        "push_bytes": results[0]["stream_bytes"] // max(1, args.messages),
        "publish_errors": errors, "publish_error_samples": error_texts, "acked": acked,
        "wall_seconds": round(wall, 4), "publish_seconds": round(publish_seconds, 4),
        "server_cpu_seconds": round(server_cpu, 4),
        "server_cpu_user_seconds": round(server_user, 4),
        "server_cpu_system_seconds": round(server_system, 4),
        "deliveries_per_second": round(delivered / wall),
        "deliveries_per_cpu_second": round(delivered / server_cpu) if server_cpu > 0 else None,
        "latency_p50_ms": _round(benchlib.percentile(latencies, 0.50)),
        "latency_p99_ms": _round(benchlib.percentile(latencies, 0.99)),
        "latency_samples": len(latencies),
    }
    print(f"run {number}: {delivered:,}/{expected:,} deliveries (loss {run['loss']:,}) "
          f"in {wall:.3f} s wall = {millions(delivered / wall)}/s; "
          f"server CPU {server_cpu:.3f} s (user {server_user:.2f} + sys {server_system:.2f}) = "
          f"{millions(delivered / server_cpu) if server_cpu > 0 else 'n/a'} deliveries/CPU-s; "
          f"latency p50 {run['latency_p50_ms']} ms p99 {run['latency_p99_ms']} ms "
          f"({len(latencies)} samples); push {run['push_bytes']} B; publish errors {errors}")
    sys.stdout.flush()
    return run


def start_members(args, port: int, children: list, pipes: list) -> int:
    """Start the member processes (``args.members`` over processes of at most
    ``args.per_process``), adding each to ``children`` and its pipe to ``pipes``
    as it starts (so a failed setup still stops them); wait until they have all
    set up; the members ready. Shared with bench/api_publish.py."""
    context = multiprocessing.get_context("fork")
    processes = -(-args.members // args.per_process)
    base = args.members // processes
    for index in range(processes):
        count = base + (1 if index < args.members % processes else 0)
        parent_end, child_end = context.Pipe()
        child = context.Process(
            target=member_process, daemon=True,
            args=(port, index * args.per_process, count, 500, args.setup_timeout, child_end))
        child.start()
        child_end.close()
        children.append(child)
        pipes.append(parent_end)
    ready = 0
    for pipe in pipes:
        if not pipe.poll(args.setup_timeout + 30):
            raise RuntimeError("a member process did not finish its setup")
        _, count, failures, failed = pipe.recv()
        ready += count
        for reason in failures:
            print(f"  setup failure: {reason}")
        if failed:
            print(f"  {failed} member(s) of one process failed to set up")
    return ready


def stop_members(children: list, pipes: list) -> None:
    """Tell the member processes to stop, and make sure they have."""
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except OSError:
            pass
    for child in children:
        child.join(15)
        if child.is_alive():
            child.terminate()
            child.join(5)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("broadcast", "zim channel fan-out", parse_args(argv), run)


def run(args: argparse.Namespace, info: dict) -> int:
    processes = -(-args.members // args.per_process)
    server = benchlib.Server(extra_args=shlex.split(args.server_args))
    children: list = []
    pipes: list = []
    publisher = None
    runs: list[dict] = []
    result: dict = {"bench": "broadcast", "ok": False}
    try:
        proc = server.start()
        print(f"server: pid {proc.pid}: {' '.join(server.command)}")
        print(f"members {args.members} in {processes} client process(es), "
              f"{args.messages} messages of {args.content_size} B per run, "
              f"window {args.window}, {args.runs} run(s)")
        sys.stdout.flush()
        setup_start = time.monotonic()
        ready = start_members(args, server.tcp_port, children, pipes)
        print(f"setup: {ready}/{args.members} members logged in and subscribed "
              f"in {time.monotonic() - setup_start:.1f} s")
        sys.stdout.flush()
        if ready != args.members:
            raise RuntimeError("not every member could subscribe")
        publisher = Publisher(server.tcp_port, args.content_size, args.window)
        for number in range(1, args.runs + 1):
            runs.append(one_run(number, args, proc, publisher, pipes))
            if not server.alive():
                raise RuntimeError(f"the server died:\n{server.log_tail()}")
        rss = proc.memory_info().rss
    finally:
        if publisher is not None:
            publisher.close()
        stop_members(children, pipes)
        code = server.stop()

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    ok = all(r["loss"] == 0 and r["publish_errors"] == 0 and r["over_members"] == 0
             and r["unexpected_packets"] == 0 for r in runs)
    result.update({
        "ok": ok, "members": args.members, "messages": args.messages,
        "content_size": args.content_size, "window": args.window, "runs": runs,
        "client_processes": processes,
        "deliveries_per_cpu_second": median("deliveries_per_cpu_second"),
        "deliveries_per_second": median("deliveries_per_second"),
        "latency_p50_ms": median("latency_p50_ms"), "latency_p99_ms": median("latency_p99_ms"),
        "loss": sum(r["loss"] for r in runs), "server_rss_after": rss,
        "server_exit_code": code, "machine": info, "server_command": server.command,
    })
    per_cpu = result["deliveries_per_cpu_second"]
    per_cpu_text = "n/a" if per_cpu is None else f"{per_cpu:,.0f}"
    print(f"RESULT broadcast members={args.members} messages={args.messages} runs={args.runs} "
          f"median deliveries_per_cpu_second={per_cpu_text} "
          f"deliveries_per_second={result['deliveries_per_second']:,.0f} "
          f"loss={result['loss']} latency_p50_ms={result['latency_p50_ms']} "
          f"latency_p99_ms={result['latency_p99_ms']} {'OK' if ok else 'FAILED'}")
    if args.json:
        benchlib.print_json(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
