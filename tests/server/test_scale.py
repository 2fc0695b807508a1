"""Many concurrent connections: 2,000 logins at once, then a channel fan-out to all of them."""
from __future__ import annotations

import base64
import os
import selectors
import socket
import time

from tests.support.client import RawWs, decode_body, error_code, tcp_packet, unique, ws_frame, ws_message
from zim.client import OP_BINARY, split_tcp, split_ws

CONNECTIONS = 2000          # 3 in 20 of them WebSocket, the rest TCP
TIME_LIMIT = 60.0


class Peer:
    """One non-blocking connection and the packets parsed from it so far."""

    def __init__(self, kind: str, address: tuple[str, int]) -> None:
        self.kind = kind
        self.sock = socket.create_connection(address, timeout=5)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.upgraded = kind == "tcp"
        self.packets: list[tuple[int, int, dict]] = []
        self.closed = False
        self.user_id = ""

    def send(self, action: int, seq: int, body: dict, prefix: bytes = b"") -> None:
        data = prefix + (tcp_packet(action, seq, body) if self.kind == "tcp" else ws_frame(2, ws_message(action, seq, body)))
        sent = self.sock.send(data)
        assert sent == len(data), "a small request did not fit the socket buffer"

    def on_readable(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.buf += chunk
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self.buf.startswith(b"HTTP/1.1 101"), bytes(self.buf[:60])
            del self.buf[:end + 4]
            self.upgraded = True
        if self.kind == "tcp":
            packets = split_tcp(self.buf)
        else:
            packets = []
            for opcode, action, seq, body in split_ws(self.buf):
                assert opcode == OP_BINARY, f"unexpected frame opcode {opcode}"
                packets.append((action, seq, body))
        for action, seq, body in packets:
            self.packets.append((action, seq, decode_body(body)))


def pump_until(selector: selectors.BaseSelector, peers: list[Peer], done, deadline: float, what: str) -> None:
    """Read from every peer until done(peer) holds for all of them."""
    waiting = {id(p) for p in peers if not done(p)}
    while waiting:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(waiting)} of {len(peers)} connections still waiting for {what}"
        for key, _ in selector.select(min(remaining, 1.0)):
            peer = key.data
            peer.on_readable()
            if peer.closed and not done(peer):
                raise AssertionError(f"server closed a {peer.kind} connection while waiting for {what}")
            if id(peer) in waiting and done(peer):
                waiting.discard(id(peer))


def test_2000_concurrent_logins_and_fanout(server):
    start = time.monotonic()
    deadline = start + TIME_LIMIT
    selector = selectors.DefaultSelector()
    peers: list[Peer] = []
    try:
        for i in range(CONNECTIONS):
            kind = "ws" if i % 20 < 3 else "tcp"
            peer = Peer(kind, server.ws if kind == "ws" else server.tcp)
            selector.register(peer.sock, selectors.EVENT_READ, peer)
            peers.append(peer)
        # every peer logs in at once (WebSocket peers send the upgrade and the login together)
        for i, peer in enumerate(peers):
            prefix = b""
            if peer.kind == "ws":
                key = base64.b64encode(os.urandom(16)).decode()
                prefix = RawWs.upgrade_request(key)
            peer.send(1, 1, {"name": f"scale{i}"}, prefix)
        pump_until(selector, peers, lambda p: len(p.packets) >= 1, deadline, "the login response")
        ids, tokens = set(), set()
        for peer in peers:
            action, seq, body = peer.packets.pop(0)
            assert (action, seq) == (1, 1) and error_code(body) is None, body
            peer.user_id = body["id"]
            ids.add(body["id"])
            tokens.add(body["token"])
        assert len(ids) == len(peers) and len(tokens) == len(peers)
        login_seconds = time.monotonic() - start

        channel = unique("everyone")
        for peer in peers:
            peer.send(3, 2, {"name": channel})
        pump_until(selector, peers, lambda p: len(p.packets) >= 1, deadline, "the subscribe response")
        for peer in peers:
            assert peer.packets.pop(0)[:2] == (3, 2)

        sender = peers[0]
        sender.send(4, 3, {"channel": channel, "content": "to all"})
        pump_until(selector, peers, lambda p: len(p.packets) >= 1, deadline, "the channel push")
        response = sender.packets.pop(0)
        assert response[:2] == (4, 3) and error_code(response[2]) is None
        for peer in peers[1:]:
            action, seq, body = peer.packets.pop(0)
            assert (action, seq) == (102, 0) and body["content"] == "to all" and body["channel"] == channel
        # ten members send two messages each: everybody gets the others' 20 - own, in seq order
        senders = peers[1:11]
        for i, peer in enumerate(senders):
            for j in range(2):
                peer.send(4, 10 + j, {"channel": channel, "content": f"s{i}-{j}"})
        # a sender gets 18 pushes and its 2 responses, everyone else 20 pushes
        pump_until(selector, peers, lambda p: len(p.packets) >= 20, deadline, "20 channel packets")
        for peer in peers:
            pushes = [(a, b) for a, s, b in peer.packets if s == 0]
            responses = [(a, s) for a, s, b in peer.packets if s != 0]
            assert responses == ([(4, 10), (4, 11)] if peer in senders else [])
            assert all(a == 102 for a, _ in pushes)
            seqs = [b["seq"] for _, b in pushes]
            assert seqs == sorted(seqs) and len(seqs) == (18 if peer in senders else 20)
            assert seqs[-1] <= 21 and seqs[0] >= 2
        total = time.monotonic() - start
        assert total < TIME_LIMIT
        print(f"\n{len(peers)} logins in {login_seconds:.2f}s, whole scenario {total:.2f}s")
    finally:
        for peer in peers:
            selector.unregister(peer.sock)
            peer.sock.close()
        selector.close()
    server.assert_alive()
    client = server.tcp_client()
    client.ok(9)
