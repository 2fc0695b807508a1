#!/usr/bin/env python3
"""Bytes on the wire per channel message: TCP, WebSocket, WebSocket + permessage-deflate.

Starts a real server (``python -m zim``, one worker). Three members subscribe to
one channel: a TCP connection, a plain WebSocket and a WebSocket that negotiated
permessage-deflate (RFC 7692; the server answers with no context takeover either
way, so every push is compressed on its own). A TCP publisher then sends
``--messages`` M channel messages of English-like text (a Zipf-weighted English
vocabulary, sentences and punctuation: chat, not random bytes) for each content
size of ``--sizes``. Each member counts the bytes it reads while receiving the M
pushes (102) and checks every push: order, content, and on the deflate
connection that each compressed message inflates on its own. Reported per size:
the average JSON body of a push and the bytes per message on each transport
(TCP payload bytes, the framing included; IP and TCP headers are not), the
saving of deflate against plain WebSocket, and the CPU time the server's
compressor spends per push of that size (the codec's deflater in this process,
one reset stream reused, as a reactor does it: zim compresses a channel push
once for all its deflate members).

Example: ``python bench/wire_bytes.py --sizes 100,1000 --messages 200 --json``
"""
from __future__ import annotations

import argparse
import random
import select
import shlex
import socket
import statistics
import struct
import sys
import time
import zlib

import orjson

import benchlib

from zim.protocol import LOGIN, SEND_CHANNEL, SUBSCRIBE, PUSH_CHANNEL_MESSAGE as PUSH_CHANNEL
CHANNEL = "wire"
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
def _recv_exact(sock: socket.socket, buffer: bytearray, deadline: float) -> None:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = sock.recv(1 << 16)
    if not chunk:
        raise RuntimeError("the server closed a connection")
    buffer += chunk


class Member:
    """One subscribed connection that counts the bytes it receives and decodes them."""

    def __init__(self, kind: str, port: int, name: str, deadline: float) -> None:
        self.kind = kind
        self.sock = socket.create_connection((benchlib.LOOPBACK, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.bytes = 0
        self.pushes: list[bytes] = []
        self.compressed = 0
        if kind != "tcp":
            self._upgrade(port, deadline)
        self.request(LOGIN, {"name": name}, deadline)
        self.request(SUBSCRIBE, {"name": CHANNEL}, deadline)
        self.bytes = self.compressed = 0       # from here on: the pushes only

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
        self.sock.sendall(benchlib.tcp_packet(action, seq, payload) if self.kind == "tcp"
                          else benchlib.ws_packet(action, seq, payload))

    def request(self, action: int, body: dict, deadline: float) -> dict:
        self.send(action, 1, body)
        while True:
            for got_action, seq, payload in self.take():
                if (got_action, seq) == (action, 1):
                    answer = orjson.loads(payload) if payload else {}
                    if "error" in answer:
                        raise RuntimeError(f"action {action} failed: {answer}")
                    return answer
            _recv_exact(self.sock, self.buffer, deadline)

    def take(self) -> list[tuple[int, int, bytes]]:
        """Every complete packet in the buffer, inflated where compressed."""
        if self.kind == "tcp":
            return benchlib.tcp_split(self.buffer)
        packets = []
        offset = 0
        while len(self.buffer) - offset >= 2:
            first, second = self.buffer[offset], self.buffer[offset + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if len(self.buffer) - offset < 4:
                    break
                length, head = struct.unpack_from(">H", self.buffer, offset + 2)[0], 4
            elif length == 127:
                if len(self.buffer) - offset < 10:
                    break
                length, head = struct.unpack_from(">Q", self.buffer, offset + 2)[0], 10
            if len(self.buffer) - offset < head + length:
                break
            payload = bytes(self.buffer[offset + head:offset + head + length])
            offset += head + length
            if first & 0x0F != 2:
                raise RuntimeError(f"unexpected WebSocket opcode {first & 0x0F}")
            if first & 0x40:            # RSV1: compressed, on its own (no context takeover)
                self.compressed += 1
                payload = zlib.decompressobj(-15).decompress(payload + TAIL)
            action, seq = struct.unpack_from(">HH", payload)
            packets.append((action, seq, payload[4:]))
        del self.buffer[:offset]
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
            if action == PUSH_CHANNEL and seq == 0:
                self.pushes.append(payload)
        return True

    def close(self) -> None:
        self.sock.close()


def measure_size(server: benchlib.Server, size: int, messages: int, seed: int, timeout: float) -> dict:
    """Fresh members; M messages of ``size`` characters; bytes per message per transport."""
    deadline = time.monotonic() + timeout
    rng = random.Random(seed)
    tag = f"{size}-{seed}"
    members = [Member(kind, server.tcp_port if kind == "tcp" else server.ws_port, f"{kind}-{tag}", deadline)
               for kind in ("tcp", "ws", "ws+deflate")]
    publisher = Member("tcp", server.tcp_port, f"publisher-{tag}", deadline)
    contents = [english(size, rng) for _ in range(messages)]
    try:
        for member in members:
            member.sock.setblocking(False)
        for seq, content in enumerate(contents, start=1):
            publisher.send(SEND_CHANNEL, seq & 0xFFFF or 1, {"channel": CHANNEL, "content": content})
        answered = 0
        while answered < messages:
            for action, _, payload in publisher.take():
                if action == SEND_CHANNEL:
                    if b'"error"' in payload:
                        raise RuntimeError(f"send failed: {payload[:200]!r}")
                    answered += 1
            if answered < messages:
                _recv_exact(publisher.sock, publisher.buffer, deadline)
        poller = select.epoll()
        for member in members:
            poller.register(member.sock.fileno(), select.EPOLLIN)
        waiting = {member.sock.fileno(): member for member in members}
        while any(len(m.pushes) < messages for m in members):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("timed out waiting for the pushes: "
                                   + ", ".join(f"{m.kind} {len(m.pushes)}/{messages}" for m in members))
            for fd, _ in poller.poll(min(left, 1.0)):
                if not waiting[fd].receive():
                    raise RuntimeError(f"the server closed the {waiting[fd].kind} member")
        poller.close()
        bodies = [orjson.loads(p) for p in members[0].pushes]
        correct = all(len(m.pushes) == messages and [orjson.loads(p)["content"] for p in m.pushes] == contents
                      for m in members)
        deflate = members[2]
        return {
            "content_bytes": size,
            "messages": messages,
            "body_bytes": statistics.mean(len(orjson.dumps(b)) for b in bodies),
            "tcp": members[0].bytes / messages,
            "ws": members[1].bytes / messages,
            "ws_deflate": deflate.bytes / messages,
            "compressed_fraction": deflate.compressed / messages,
            "correct": correct,
            "sample_body": members[0].pushes[0],
        }
    finally:
        for member in (*members, publisher):
            member.close()


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
    parser.add_argument("--sizes", default="100,1000", metavar="B,B",
                        help="message content sizes in characters (default 100,1000)")
    parser.add_argument("--messages", type=int, default=200, metavar="M",
                        help="channel messages per size (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="text generator seed (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds allowed per size (default 60)")
    parser.add_argument("--server-args", default="", metavar="FLAGS", help="extra zim-server flags, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be a comma-separated list of integers")
    if not args.size_list or any(not 1 <= s <= 60_000 for s in args.size_list):
        parser.error("--sizes must be between 1 and 60000 characters (the max packet is 64 KiB)")
    if not 1 <= args.messages <= 100_000:
        parser.error("--messages must be between 1 and 100000")
    return args


def run(args: argparse.Namespace, info: dict) -> int:
    server = benchlib.Server(extra_args=["--store", "memory", *shlex.split(args.server_args)])
    results = []
    try:
        proc = server.start()
        print(f"server: pid {proc.pid}: {' '.join(server.command)}")
        print(f"{args.messages} channel messages per size, members: tcp, ws, ws+deflate")
        print(f"{'content':>8} {'json body':>10} {'tcp':>9} {'ws':>9} {'ws+deflate':>11} {'saved':>7} "
              f"{'compressed':>10} {'deflate cpu':>12}")
        for size in args.size_list:
            result = measure_size(server, size, args.messages, args.seed + size, args.timeout)
            result["deflate_us"] = compress_cost(result.pop("sample_body"))
            result["saved_vs_ws"] = 1 - result["ws_deflate"] / result["ws"]
            results.append(result)
            print(f"{size:>7}B {result['body_bytes']:>9.1f}B {result['tcp']:>8.1f}B {result['ws']:>8.1f}B "
                  f"{result['ws_deflate']:>10.1f}B {result['saved_vs_ws']:>6.1%} "
                  f"{result['compressed_fraction']:>10.0%} {result['deflate_us']:>9.2f} µs"
                  + ("" if result["correct"] else "  WRONG CONTENT"))
            sys.stdout.flush()
            if not server.alive():
                raise RuntimeError(f"the server died:\n{server.log_tail()}")
    finally:
        server.stop()
    ok = all(r["correct"] for r in results)
    summary = "; ".join(f"{r['content_bytes']} B content: tcp {r['tcp']:.0f}, ws {r['ws']:.0f}, "
                        f"ws+deflate {r['ws_deflate']:.0f} B/message ({r['saved_vs_ws']:.0%} saved, "
                        f"{r['deflate_us']:.1f} µs to compress)" for r in results)
    print(f"RESULT wire_bytes {'ok' if ok else 'WRONG CONTENT'}: {summary}")
    if args.json:
        benchlib.print_json({"bench": "wire_bytes", "ok": ok, "results": results, "machine": info})
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("wire_bytes", "zim bytes on the wire per message", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
