#!/usr/bin/env python3
"""Server API publish against a WebSocket publisher, to one channel of K members.

Starts a real server (``python -m zim``, one worker by default, ``--api`` on a
loopback port with a key file in a temporary directory). K members (default
10,000), in client processes of at most ``--per-process`` sockets each, log in
over TCP and join the channel: bench/broadcast.py's members, unchanged (they
count every member's bytes and parse one sample connection fully). Then each
run publishes M messages of ``--content-size`` bytes twice, one publisher after
the other, to the same members:

- **api**: ``POST /api/v1/channels/bench/messages`` (a message from the
  system), over ``--api-connections`` keep-alive HTTP connections (default:
  as many as ``--window``) with one request in flight each (the API answers a
  connection's requests one at a time, each once its message is stored);
- **ws**: one logged-in member (joined with push off, so it reads nothing)
  sending action 4 over WebSocket, pipelined with up to ``--window``
  unanswered requests.

Each message is pushed (102) to all K members; loss (expected deliveries minus
complete ones) must be 0. Measured per publisher and run, from the first send
to the last byte received: requests per second (acknowledged publishes over
the publish time), deliveries per second of wall time, and deliveries per
server-CPU-second (user + system of the server and its children: the store's
writer, the workers). Reported: the medians over ``--runs``, and the ratio
api / ws of each figure, both measured in the same runs.

Example: ``python bench/api_publish.py --json``; small: ``--members 200 --messages 200 --runs 1``
"""
from __future__ import annotations

import argparse
import os
import select
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections import namedtuple

import orjson
import psutil

import benchlib
import broadcast  # the members, one run's measure, the channel, the stamp format

from zim.client.blocking import WsClient
from zim.protocol import LOGIN, SEND_CHANNEL, SUBSCRIBE
from zim.testing.ports import free_loopback_port

CHANNEL = broadcast.CHANNEL
STAMP_DIGITS = broadcast.STAMP_DIGITS
API_KEY = "bench-api-key-" + "0123456789abcdef"
CPU = namedtuple("CPU", "user system")


class ServerTree:
    """CPU times of the server and its children (the store writer, workers), as
    ``psutil.Process.cpu_times`` gives them for one process (broadcast.one_run reads it)."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process

    def cpu_times(self) -> CPU:
        user = system = 0.0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            user += times.user
            system += times.system
        return CPU(user, system)


class ApiPublisher:
    """Publishes through the server API over ``connections`` keep-alive connections,
    one request in flight on each."""

    def __init__(self, port: int, content_size: int, connections: int) -> None:
        self.padding = b"x" * max(0, content_size - STAMP_DIGITS)
        self.head = (f"POST /api/v1/channels/{CHANNEL}/messages HTTP/1.1\r\nHost: bench\r\n"
                     f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n").encode()
        self.socks = [socket.create_connection((benchlib.LOOPBACK, port), timeout=30) for _ in range(connections)]
        for sock in self.socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _request(self) -> bytes:
        body = b'{"content":"%020d%s"}' % (time.monotonic_ns(), self.padding)
        return self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def publish(self, messages: int, deadline: float) -> tuple[int, int, list[str]]:
        """Send ``messages`` publishes; returns (answered, errors, first error texts)."""
        epoll = select.epoll()
        buffers = {sock.fileno(): bytearray() for sock in self.socks}
        by_fd = {sock.fileno(): sock for sock in self.socks}
        sent = answered = errors = 0
        error_texts: list[str] = []
        for sock in self.socks:
            epoll.register(sock.fileno(), select.EPOLLIN)
            if sent < messages:
                sock.sendall(self._request())
                sent += 1
        try:
            while answered < messages:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"API publishing timed out after {answered}/{messages} answers")
                for fd, _ in epoll.poll(1.0):
                    data = by_fd[fd].recv(65536)
                    if not data:
                        raise RuntimeError("the server closed an API connection")
                    buf = buffers[fd]
                    buf += data
                    while (answer := _take_response(buf)) is not None:
                        status, body = answer
                        answered += 1
                        if status != 200:
                            errors += 1
                            if len(error_texts) < 3:
                                error_texts.append(f"{status} {body[:200]!r}")
                        if sent < messages:
                            by_fd[fd].sendall(self._request())
                            sent += 1
        finally:
            epoll.close()
        return answered, errors, error_texts

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _take_response(buf: bytearray) -> tuple[int, bytes] | None:
    """One complete HTTP response (status, body) taken from ``buf``, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).split(b"\r\n")
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return int(head[0].split()[1]), body


class WsPublisher:
    """A member over WebSocket sending action 4, ``window`` requests in flight."""

    def __init__(self, port: int, content_size: int, window: int) -> None:
        self.client = WsClient(benchlib.LOOPBACK, port, timeout=30)
        self.client.ok(LOGIN, {"name": "ws-publisher"})
        self.client.ok(SUBSCRIBE, {"name": CHANNEL, "push": False})     # a member that reads nothing
        self.padding = "x" * max(0, content_size - STAMP_DIGITS)
        self.window = window

    def publish(self, messages: int, deadline: float) -> tuple[int, int, list[str]]:
        client = self.client
        waiting: list[int] = []
        sent = answered = errors = 0
        error_texts: list[str] = []
        while answered < messages:
            while sent < messages and len(waiting) < self.window:
                content = "%020d%s" % (time.monotonic_ns(), self.padding)
                waiting.append(client.send(SEND_CHANNEL, {"channel": CHANNEL, "content": content}))
                sent += 1
            _, _, reply = client.wait_response(waiting.pop(0), max(0.1, deadline - time.monotonic()))
            answered += 1
            if "error" in reply:
                errors += 1
                if len(error_texts) < 3:
                    error_texts.append(orjson.dumps(reply).decode())
        return answered, errors, error_texts

    def close(self) -> None:
        self.client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    broadcast.add_fanout_args(parser, 10_000)
    parser.add_argument("--api-connections", type=int, default=0, metavar="N",
                        help="HTTP connections of the API publisher, one request in flight each (default: "
                             "--window, as many requests in flight as the WebSocket publisher; at most "
                             "--api-max-clients, 64 by default)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    parser.add_argument("--server-args", default="", metavar="FLAGS", help="extra zim-server flags, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    args.api_connections = args.api_connections or args.window
    if min(args.members, args.runs, args.window, args.per_process, args.api_connections) < 1:
        parser.error("--members, --runs, --window, --per-process and --api-connections must be at least 1")
    if not STAMP_DIGITS <= args.content_size <= 60000:
        parser.error(f"--content-size must be in {STAMP_DIGITS}..60000")
    if args.messages <= 0:
        args.messages = max(100, min(2_000, 20_000_000 // args.members))
    return args


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("api_publish", "zim server API publish vs a WebSocket publisher", parse_args(argv), run)


def run(args: argparse.Namespace, info: dict) -> int:
    keys = tempfile.TemporaryDirectory(prefix="zim-bench-key-")
    key_file = os.path.join(keys.name, "api-key")
    with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        out.write(API_KEY)
    api_port = free_loopback_port()
    server = benchlib.Server(workers=args.workers, extra_args=[
        "--api", f"{benchlib.LOOPBACK}:{api_port}", "--api-key-file", key_file, *shlex.split(args.server_args)])
    children: list = []
    pipes: list = []
    publishers: dict = {}
    runs: dict[str, list[dict]] = {"api": [], "ws": []}
    try:
        tree = ServerTree(server.start())
        print(f"server: {' '.join(server.command)}")
        print(f"members {args.members}, {args.messages} messages of {args.content_size} B per publisher "
              f"and run, {args.runs} run(s); api: {args.api_connections} connections; ws: window {args.window}")
        sys.stdout.flush()
        ready = broadcast.start_members(args, server.tcp_port, children, pipes)
        if ready != args.members:
            raise RuntimeError(f"only {ready}/{args.members} members could join")
        publishers = {"api": ApiPublisher(api_port, args.content_size, args.api_connections),
                      "ws": WsPublisher(server.ws_port, args.content_size, args.window)}
        for number in range(1, args.runs + 1):
            for kind, publisher in publishers.items():
                print(f"{kind}: ", end="")
                result = broadcast.one_run(number, args, tree, publisher, pipes)
                result["requests_per_second"] = round(result["acked"] / max(1e-9, result["publish_seconds"]))
                print(f"    {kind}: {result['requests_per_second']:,} requests/s")
                runs[kind].append(result)
                if not server.alive():
                    raise RuntimeError(f"the server died:\n{server.log_tail()}")
    finally:
        for publisher in publishers.values():
            publisher.close()
        broadcast.stop_members(children, pipes)
        code = server.stop()
        keys.cleanup()
    return report(args, info, runs, server.command, code)


def report(args, info: dict, runs: dict[str, list[dict]], command: list[str], code: int | None) -> int:
    figures = ("requests_per_second", "deliveries_per_second", "deliveries_per_cpu_second")

    def median(done: list[dict], figure: str) -> float | None:
        values = [r[figure] for r in done if r[figure] is not None]     # None: no CPU time measured
        return statistics.median(values) if values else None

    medians = {kind: {figure: median(done, figure) for figure in figures} for kind, done in runs.items()}
    ratios = {figure: round(medians["api"][figure] / medians["ws"][figure], 3)
              if medians["api"][figure] and medians["ws"][figure] else None for figure in figures}
    ok = code == 0 and all(r["loss"] == 0 and r["publish_errors"] == 0 for done in runs.values() for r in done)
    for kind in runs:
        print(f"median {kind}: " + ", ".join(f"{figure} {_figure(medians[kind][figure])}" for figure in figures))
    print("ratio api/ws: " + ", ".join(f"{figure} {ratio}" for figure, ratio in ratios.items()))
    print(f"RESULT api_publish {'OK' if ok else 'FAILED'}: {args.members} members; " + "; ".join(
        f"{kind} {_figure(medians[kind]['requests_per_second'])} requests/s, "
        f"{_figure(medians[kind]['deliveries_per_cpu_second'])} deliveries/CPU-s" for kind in runs))
    if args.json:
        benchlib.print_json({"bench": "api_publish", "ok": ok, "members": args.members, "messages": args.messages,
                             "medians": medians, "ratios": ratios, "runs": runs, "machine": info,
                             "server_command": command, "server_exit_code": code})
    return 0 if ok else 1


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
