#!/usr/bin/env python3
"""Bytes on the wire: TCP and WebSocket, each with and without compression.

Starts a real server (``python -m zim``, one worker). Three parts:

1. **Channel pushes.** Four members subscribe to one channel: a TCP connection,
   a TCP connection that asked for compression at login (``"compress":
   "deflate"``: bodies of 64 bytes or more as raw DEFLATE, seq bit 15), a plain
   WebSocket and a WebSocket that negotiated permessage-deflate (RFC 7692, no
   context takeover). A TCP publisher sends ``--messages`` M channel messages of
   English-like text (a Zipf-weighted vocabulary, sentences and punctuation:
   chat, not random bytes) for each content size of ``--sizes``; ``mix`` draws
   each message's length from a chat-like spread (most short, a tail of long
   ones: MIX below). Each member counts the bytes it reads while receiving the
   M pushes (102) and checks every one (order, content; a compressed one must
   inflate on its own). Then the two TCP members read the channel's whole
   history back in pages of 50 (action 5), counting the bytes of the pages.
2. **Mailbox at login.** ``--mailbox`` K direct messages (``mix`` lengths) wait
   for a user who is away; the user logs in again with its token, plain or
   asking for compression, and counts the bytes from its login to the K-th
   mailbox push (101) that follows the answer.
3. **Server CPU.** ``--cpu-members`` N TCP members on one channel, all plain,
   and N on another, all asking for compression; the publisher sends
   ``--cpu-messages`` messages of ``--cpu-size`` characters (pipelined) to each
   channel in turn, ``--cpu-runs`` times: deliveries per server-CPU-second
   (the server process's CPU time, from the first send to the last push read:
   the scheduler's nanosecond count of every server thread) for each,
   and their ratio, medians over the runs. The server's CPU includes handling
   the sends (the same in both), not only the fan-out.

Bytes are TCP payload bytes as the client reads them (the framing included; IP
and TCP headers are not). Also reported: the CPU time the codec's compressor
spends per push of each size (the reactor's deflater in this process, one reset
stream reused: zim compresses a channel push once for all its deflate members).

Example: ``python bench/wire_bytes.py --sizes 100,1000,mix --messages 200 --json``
"""
from __future__ import annotations

import argparse
import os
import random
import select
import shlex
import socket
import statistics
import sys
import time
import zlib

import orjson

import benchlib

from zim.client import OP_BINARY, SEQ_DEFLATED, inflate_body, login_compress, parse_ws_message, split_frames
from zim.protocol import HISTORY, LOGIN, PUSH_USER_MESSAGE, SEND_CHANNEL, SEND_USER, SUBSCRIBE
from zim.protocol import PUSH_CHANNEL_MESSAGE as PUSH_CHANNEL
CHANNEL = "wire"
KINDS = ("tcp", "tcp+deflate", "ws", "ws+deflate")
# Chat message lengths for ``mix``, in characters, and how often each comes: a guess
# after public chat datasets (most messages a few words, some paragraphs, a few pastes)
MIX = ((12, 20), (30, 25), (60, 20), (120, 15), (250, 10), (600, 7), (1500, 3))
HISTORY_PAGE = 50
DEFLATE_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
TAIL = b"\x00\x00\xff\xff"

# Common English words, most frequent first (Zipf weights below).
_VOCABULARY = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into time "
    "has look two more write go see number no way could people my than first water been call who oil "
    "its now find long down day did get come made may part over new sound take only little work know "
    "place year live me back give most very after thing our just name good sentence man think say "
    "great where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such because "
    "turn here why ask went men read need land different home us move try kind hand picture again "
    "change off play spell air away animal house point page letter mother answer found study still "
    "learn should meeting tomorrow team project deadline review lunch thanks sure tonight weekend"
).split()
_WEIGHTS = [1 / (rank + 1) for rank in range(len(_VOCABULARY))]


def chat_length(size: str, rng: random.Random) -> int:
    """A content length: ``size`` characters, or for ``mix`` one drawn from MIX."""
    if size != "mix":
        return int(size)
    return rng.choices([length for length, _ in MIX], [weight for _, weight in MIX])[0]


def english(length: int, rng: random.Random) -> str:
    """English-like chat text of exactly ``length`` characters."""
    out: list[str] = []
    size = 0
    while size < length:
        words = rng.choices(_VOCABULARY, _WEIGHTS, k=rng.randint(4, 14))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ","])
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)[:length]


# -- connections ---------------------------------------------------------------
def _recv_exact(sock: socket.socket, buffer: bytearray, deadline: float) -> int:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = sock.recv(1 << 16)
    if not chunk:
        raise RuntimeError("the server closed a connection")
    buffer += chunk
    return len(chunk)


class Member:
    """One subscribed connection that counts the bytes it receives and decodes them."""

    def __init__(self, kind: str, port: int, name: str, deadline: float, channel: str = CHANNEL) -> None:
        self.kind = kind
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.bytes = 0
        self.pushes: list[bytes] = []
        self.compressed = 0
        self.answer: dict = {}
        if kind.startswith("ws"):
            self._upgrade(port, deadline)
        if name:
            self.login(name, None, deadline)
            self.request(SUBSCRIBE, {"name": channel}, deadline)
        self.bytes = self.compressed = 0       # from here on: the pushes only

    def login(self, name: str, token: str | None, deadline: float) -> dict:
        body = {"name": name} if token is None else {"name": name, "token": token}
        self.answer = self.request(LOGIN, login_compress(body) if self.kind == "tcp+deflate" else body, deadline)
        if (self.answer.get("compress") == "deflate") != (self.kind == "tcp+deflate"):
            raise RuntimeError(f"compression on TCP {'not ' if self.kind == 'tcp+deflate' else ''}agreed")
        return self.answer

    def _upgrade(self, port: int, deadline: float) -> None:
        request, accept = benchlib.ws_handshake_request(port)
        if self.kind == "ws+deflate":
            request = request[:-2] + DEFLATE_OFFER + b"\r\n"
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            _recv_exact(self.sock, self.buffer, deadline)
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        if not benchlib.ws_handshake_ok(head, accept):
            raise RuntimeError(f"WebSocket upgrade refused: {head[:80]!r}")
        agreed = b"permessage-deflate" in head.lower()
        if agreed != (self.kind == "ws+deflate"):
            raise RuntimeError(f"permessage-deflate {'not ' if not agreed else ''}negotiated: {head!r}")

    def send(self, action: int, seq: int, body: dict) -> None:
        payload = orjson.dumps(body)
        self.sock.sendall(benchlib.tcp_packet(action, seq, payload) if self.kind.startswith("tcp")
                          else benchlib.ws_packet(action, seq, payload))

    def request(self, action: int, body: dict, deadline: float) -> dict:
        self.send(action, 1, body)
        answer = None
        while answer is None:
            for got_action, seq, payload in self.take():
                if (got_action, seq) == (action, 1):
                    answer = orjson.loads(payload) if payload else {}
                    if "error" in answer:
                        raise RuntimeError(f"action {action} failed: {answer}")
                elif got_action in (PUSH_CHANNEL, PUSH_USER_MESSAGE) and seq == 0:
                    self.pushes.append(payload)     # came with the answer (mailbox pushes)
            if answer is None:
                self.bytes += _recv_exact(self.sock, self.buffer, deadline)
        return answer

    def take(self) -> list[tuple[int, int, bytes]]:
        """Every complete packet in the buffer, inflated where compressed."""
        if self.kind.startswith("tcp"):
            packets = benchlib.tcp_split(self.buffer)
            if self.kind == "tcp":
                return packets
            self.compressed += sum(1 for _, seq, _ in packets if seq & SEQ_DEFLATED)
            return [(action, seq & ~SEQ_DEFLATED, inflate_body(body)) if seq & SEQ_DEFLATED else (action, seq, body)
                    for action, seq, body in packets]
        packets = []
        for fin, rsv, opcode, payload in split_frames(self.buffer):
            if opcode != OP_BINARY or not fin:
                raise RuntimeError(f"unexpected WebSocket frame: opcode {opcode}, fin {fin}")
            if rsv & 4:                 # RSV1: compressed, on its own (no context takeover)
                self.compressed += 1
                payload = zlib.decompressobj(-15).decompress(payload + TAIL)
            packets.append(parse_ws_message(payload))
        return packets

    def receive(self) -> bool:
        """Read what is waiting; False when the connection closed."""
        try:
            chunk = self.sock.recv(1 << 18)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.bytes += len(chunk)
        self.buffer += chunk
        for action, seq, payload in self.take():
            if action in (PUSH_CHANNEL, PUSH_USER_MESSAGE) and seq == 0:
                self.pushes.append(payload)
        return True

    def close(self) -> None:
        self.sock.close()


def read_until(members: list[Member], done, deadline: float) -> None:
    """Read every member (non-blocking) until ``done()``."""
    poller = select.epoll()
    waiting = {member.sock.fileno(): member for member in members}
    for member in members:
        member.sock.setblocking(False)
        poller.register(member.sock.fileno(), select.EPOLLIN)
    try:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("timed out waiting for the pushes: "
                                   + ", ".join(f"{m.kind} {len(m.pushes)}" for m in members))
            for fd, _ in poller.poll(min(left, 1.0)):
                if not waiting[fd].receive():
                    raise RuntimeError(f"the server closed the {waiting[fd].kind} member")
    finally:
        poller.close()
        for member in members:
            member.sock.settimeout(10)


def publish(publisher: Member, action: int, bodies: list[dict], deadline: float) -> None:
    """Send every request pipelined, then wait for all their answers (none an error)."""
    for seq, body in enumerate(bodies, start=1):
        publisher.send(action, seq % 32767 or 1, body)
    answered = 0
    while answered < len(bodies):
        for got, _, payload in publisher.take():
            if got == action:
                if b'"error"' in payload:
                    raise RuntimeError(f"request failed: {payload[:200]!r}")
                answered += 1
        if answered < len(bodies):
            _recv_exact(publisher.sock, publisher.buffer, deadline)


def history_bytes(member: Member, channel: str, deadline: float) -> tuple[int, int, list[str]]:
    """Page through the channel's whole history, newest first: (bytes read, pages, contents)."""
    member.bytes = 0
    pages, contents, before = 0, [], None
    while True:
        body = {"channel": channel, "limit": HISTORY_PAGE, **({"beforeSeq": before} if before else {})}
        before_bytes = member.bytes
        member.send(HISTORY, 1, body)
        page = None
        while page is None:
            chunk = member.sock.recv(1 << 18)
            if not chunk:
                raise RuntimeError("the server closed a history reader")
            member.bytes += len(chunk)
            member.buffer += chunk
            for action, _, payload in member.take():
                if action == HISTORY:
                    page = orjson.loads(payload)
        if member.bytes == before_bytes:
            raise RuntimeError("no bytes counted for a page")
        pages += 1
        contents[:0] = [m["content"] for m in page["messages"]]
        if not page["hasMore"]:
            return member.bytes, pages, contents
        before = page["messages"][0]["seq"]


def measure_size(server: benchlib.Server, size: str, messages: int, seed: int, timeout: float) -> dict:
    """Fresh members on a fresh channel; M messages of ``size``: bytes per message per
    transport, then the TCP members' bytes for the whole history."""
    deadline = time.monotonic() + timeout
    rng = random.Random(seed)
    tag = f"{size}-{seed}"
    channel = f"{CHANNEL}-{tag}"
    members = [Member(kind, server.ws_port if kind.startswith("ws") else server.tcp_port, f"{kind}-{tag}",
                      deadline, channel) for kind in KINDS]
    publisher = Member("tcp", server.tcp_port, f"publisher-{tag}", deadline, channel)
    contents = [english(chat_length(size, rng), rng) for _ in range(messages)]
    try:
        publish(publisher, SEND_CHANNEL, [{"channel": channel, "content": c} for c in contents], deadline)
        read_until(members, lambda: all(len(m.pushes) >= messages for m in members), deadline)
        bodies = [orjson.loads(p) for p in members[0].pushes]
        correct = all(len(m.pushes) == messages and [orjson.loads(p)["content"] for p in m.pushes] == contents
                      for m in members)
        result = {
            "content": size,
            "messages": messages,
            "body_bytes": statistics.mean(len(orjson.dumps(b)) for b in bodies),
            **{kind.replace("+", "_"): m.bytes / messages for kind, m in zip(KINDS, members)},
            "tcp_compressed_fraction": members[1].compressed / messages,
            "ws_compressed_fraction": members[3].compressed / messages,
            "sample_body": members[0].pushes[0],
        }
        for member in members[:2]:
            read, pages, history = history_bytes(member, channel, deadline)
            result[f"history_{member.kind.replace('+', '_')}"] = read
            correct = correct and history == contents
        result["history_pages"] = pages
        result["correct"] = correct
        return result
    finally:
        for member in (*members, publisher):
            member.close()


def measure_mailbox(server: benchlib.Server, count: int, seed: int, timeout: float) -> dict:
    """Bytes a user reads logging in to ``count`` waiting DMs (``mix`` lengths),
    from its login request to the last mailbox push: plain TCP and compressed."""
    deadline = time.monotonic() + timeout
    rng = random.Random(seed)
    result: dict = {"messages": count}
    publisher = Member("tcp", server.tcp_port, f"mail-publisher-{seed}", deadline)
    try:
        for kind in ("tcp", "tcp+deflate"):
            away = Member("tcp", server.tcp_port, "", deadline)
            answer = away.login(f"mail-{kind}-{seed}", None, deadline)
            away.close()
            contents = [english(chat_length("mix", rng), rng) for _ in range(count)]
            publish(publisher, SEND_USER, [{"receiverId": answer["id"], "content": c} for c in contents], deadline)
            back = Member(kind, server.tcp_port, "", deadline)
            try:
                back.login(f"mail-{kind}-{seed}", answer["token"], deadline)
                read_until([back], lambda: len(back.pushes) >= count, deadline)
                result[kind.replace("+", "_")] = back.bytes
                got = [orjson.loads(p)["content"] for p in back.pushes]
                result.setdefault("correct", True)
                result["correct"] = result["correct"] and got == contents
            finally:
                back.close()
    finally:
        publisher.close()
    return result


class Flock:
    """``count`` TCP members of one channel, on sockets of this process, logged in
    (``compress``: asking for compression) and subscribed with pipelined requests.
    ``read_pushes`` counts the packets each reads, split but not decoded (no
    JSON), so the client stays cheap next to the server it measures."""

    def __init__(self, port: int, channel: str, count: int, compress: bool, deadline: float) -> None:
        self.socks: list[socket.socket] = []
        login = {"name": f"{channel}-member"}
        hello = (benchlib.tcp_packet(LOGIN, 1, orjson.dumps(login_compress(login) if compress else login))
                 + benchlib.tcp_packet(SUBSCRIBE, 2, orjson.dumps({"name": channel})))
        for _ in range(count):
            sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=10)
            sock.sendall(hello)
            self.socks.append(sock)
        for sock in self.socks:         # the subscribe's answer (seq 2) ends the setup
            buffer = bytearray()
            while not any(action == SUBSCRIBE for action, _, _ in benchlib.tcp_split(buffer)):
                _recv_exact(sock, buffer, deadline)
            sock.setblocking(False)

    def read_pushes(self, messages: int, deadline: float) -> int:
        """Read until every member has ``messages`` more packets; how many were read."""
        poller = select.epoll()
        by_fd = {sock.fileno(): sock for sock in self.socks}
        left = {fd: messages for fd in by_fd}
        rest = {fd: bytearray() for fd in by_fd}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        try:
            while left:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out: {len(left)} members short of their pushes")
                for fd, _ in poller.poll(1.0):
                    buffer = rest[fd]
                    try:
                        buffer += by_fd[fd].recv(1 << 18)
                    except BlockingIOError:
                        continue
                    left[fd] -= len(benchlib.tcp_split(buffer))
                    if left[fd] <= 0:
                        del left[fd]
                        poller.unregister(fd)
        finally:
            poller.close()
        return messages * len(by_fd)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, from the scheduler's own count
    (/proc/PID/task/*/schedstat, nanoseconds): user and system time in ticks of
    10 ms would blur a run of a few tenths of a second."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total / 1e9


def measure_cpu(server: benchlib.Server, proc, args: argparse.Namespace) -> dict:
    """Deliveries per server-CPU-second of a broadcast to ``--cpu-members`` plain TCP
    members, and to as many asking for compression, alternated ``--cpu-runs`` times."""
    deadline = time.monotonic() + args.timeout * (1 + args.cpu_runs)
    rng = random.Random(args.seed)
    flocks = {kind: Flock(server.tcp_port, f"cpu-{kind}", args.cpu_members, kind == "tcp+deflate", deadline)
              for kind in ("tcp", "tcp+deflate")}
    publisher = Member("tcp", server.tcp_port, "cpu-publisher", deadline, "cpu-tcp")
    publisher.request(SUBSCRIBE, {"name": "cpu-tcp+deflate"}, deadline)
    rates: dict[str, list[float]] = {kind: [] for kind in flocks}
    try:
        for _ in range(args.cpu_runs):
            for kind, flock in flocks.items():
                contents = [english(args.cpu_size, rng) for _ in range(args.cpu_messages)]
                cpu = cpu_seconds(proc.pid)
                publish(publisher, SEND_CHANNEL, [{"channel": f"cpu-{kind}", "content": c} for c in contents],
                        deadline)
                delivered = flock.read_pushes(args.cpu_messages, deadline)
                spent = cpu_seconds(proc.pid) - cpu
                if spent > 0:
                    rates[kind].append(delivered / spent)
    finally:
        publisher.close()
        for flock in flocks.values():
            flock.close()
    plain, packed = (round(statistics.median(rates[kind])) if rates[kind] else None for kind in flocks)
    return {"members": args.cpu_members, "messages": args.cpu_messages, "content_bytes": args.cpu_size,
            "runs": {kind: [round(r) for r in values] for kind, values in rates.items()},
            "tcp_per_cpu_second": plain, "tcp_deflate_per_cpu_second": packed,
            "ratio": packed / plain if plain and packed else None}


def compress_cost(body: bytes, seconds: float = 0.2) -> float:
    """Microseconds the codec's deflater spends on one push of this body."""
    from zim._codec import deflate_repeat

    count = 64
    while True:
        start = time.perf_counter()
        deflate_repeat(body, count)
        spent = time.perf_counter() - start
        if spent >= seconds or count >= 1 << 22:
            return spent / count * 1e6
        count *= 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,mix", metavar="B,B",
                        help="message content sizes in characters, or mix (default 100,1000,mix)")
    parser.add_argument("--messages", type=int, default=200, metavar="M",
                        help="channel messages per size (default 200)")
    parser.add_argument("--mailbox", type=int, default=100, metavar="K",
                        help="direct messages waiting at a login (default 100, what a login pushes)")
    parser.add_argument("--cpu-members", type=int, default=1000, metavar="N",
                        help="members of each channel of the CPU part (default 1000; 0: skip it)")
    parser.add_argument("--cpu-messages", type=int, default=2000, metavar="M",
                        help="messages per channel and run of the CPU part (default 2000)")
    parser.add_argument("--cpu-size", type=int, default=200, metavar="B",
                        help="content characters of the CPU part's messages (default 200)")
    parser.add_argument("--cpu-runs", type=int, default=5, help="runs of the CPU part, medians (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="text generator seed (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds allowed per size (default 60)")
    parser.add_argument("--server-args", default="", metavar="FLAGS", help="extra zim-server flags, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not args.size_list or any(s != "mix" and not (s.isdigit() and 1 <= int(s) <= 60_000)
                                 for s in args.size_list):
        parser.error("--sizes must list sizes of 1 to 60000 characters (the max packet is 64 KiB), or mix")
    if not 1 <= args.messages <= 100_000 or not 1 <= args.mailbox <= 100:
        parser.error("--messages must be between 1 and 100000, --mailbox between 1 and 100")
    if not 0 <= args.cpu_members <= 8000 or args.cpu_messages < 1 or args.cpu_runs < 1 or args.cpu_size < 1:
        parser.error("--cpu-members must be between 0 and 8000; --cpu-messages, --cpu-runs, --cpu-size at least 1")
    return args


def saved(plain: float, packed: float) -> str:
    return f"{1 - packed / plain:>6.1%}"


def run(args: argparse.Namespace, info: dict) -> int:
    server = benchlib.Server(extra_args=["--store", "memory", *shlex.split(args.server_args)])
    results, history, mailbox, cpu = [], [], {}, {}
    try:
        proc = server.start()
        print(f"server: pid {proc.pid}: {' '.join(server.command)}")
        print(f"channel pushes: {args.messages} messages per size, bytes per message read by each member")
        print(f"{'content':>8} {'json body':>10} {'tcp':>9} {'tcp+deflate':>12} {'saved':>7} {'ws':>9} "
              f"{'ws+deflate':>11} {'saved':>7} {'deflate cpu':>12}")
        for number, size in enumerate(args.size_list):
            result = measure_size(server, size, args.messages, args.seed + 1000 * number, args.timeout)
            result["deflate_us"] = compress_cost(result.pop("sample_body"))
            result["saved_vs_tcp"] = 1 - result["tcp_deflate"] / result["tcp"]
            result["saved_vs_ws"] = 1 - result["ws_deflate"] / result["ws"]
            results.append(result)
            print(f"{size:>8} {result['body_bytes']:>9.1f}B {result['tcp']:>8.1f}B {result['tcp_deflate']:>11.1f}B "
                  f"{saved(result['tcp'], result['tcp_deflate'])} {result['ws']:>8.1f}B "
                  f"{result['ws_deflate']:>10.1f}B {saved(result['ws'], result['ws_deflate'])} "
                  f"{result['deflate_us']:>9.2f} µs" + ("" if result["correct"] else "  WRONG CONTENT"))
            sys.stdout.flush()
        print(f"history: the {args.messages} messages read back in pages of {HISTORY_PAGE}, bytes per page")
        for result in results:
            pages = result["history_pages"]
            print(f"{result['content']:>8} tcp {result['history_tcp'] / pages:>9.0f}B  tcp+deflate "
                  f"{result['history_tcp_deflate'] / pages:>9.0f}B  "
                  f"{saved(result['history_tcp'], result['history_tcp_deflate'])}")
        mailbox = measure_mailbox(server, args.mailbox, args.seed, args.timeout)
        print(f"mailbox at login: {args.mailbox} waiting direct messages (mix), bytes from login to the last push: "
              f"tcp {mailbox['tcp']}, tcp+deflate {mailbox['tcp_deflate']} "
              f"({saved(mailbox['tcp'], mailbox['tcp_deflate']).strip()} saved)"
              + ("" if mailbox["correct"] else "  WRONG CONTENT"))
        if args.cpu_members:
            cpu = measure_cpu(server, proc, args)
            ratio = "n/a (too short to time)" if cpu["ratio"] is None else f"{cpu['ratio']:.2f}"
            print(f"server CPU: {args.cpu_members} members, {args.cpu_messages} messages of {args.cpu_size} "
                  f"characters, {args.cpu_runs} runs: deliveries per server-CPU-second, median: "
                  f"tcp {cpu['tcp_per_cpu_second']}, tcp+deflate {cpu['tcp_deflate_per_cpu_second']} "
                  f"(ratio {ratio}); runs {cpu['runs']}")
        if not server.alive():
            raise RuntimeError(f"the server died:\n{server.log_tail()}")
    finally:
        server.stop()
    ok = all(r["correct"] for r in results) and mailbox.get("correct", False)
    summary = "; ".join(f"{r['content']} content: tcp {r['tcp']:.0f}, tcp+deflate {r['tcp_deflate']:.0f}, "
                        f"ws {r['ws']:.0f}, ws+deflate {r['ws_deflate']:.0f} B/message" for r in results)
    if cpu and cpu["ratio"] is not None:
        summary += f"; deliveries/CPU-s tcp+deflate / tcp = {cpu['ratio']:.2f}"
    print(f"RESULT wire_bytes {'ok' if ok else 'WRONG CONTENT'}: {summary}")
    if args.json:
        benchlib.print_json({"bench": "wire_bytes", "ok": ok, "results": results, "mailbox": mailbox,
                             "cpu": cpu, "machine": info})
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("wire_bytes", "zim bytes on the wire per message", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
