"""Hostile and broken peers: whatever one connection sends, the others keep being served.

These tests run against a private server (module scope) so its descriptor count
can be checked at the end.
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time

import psutil
import pytest

from tests.support.client import RawWs, TcpClient, error_code, tcp_packet, unique, ws_frame, ws_message
from zim.client import split_tcp, tcp_header

HEALTHY_LATENCY = 1.0     # seconds a healthy client may wait for an answer meanwhile


@pytest.fixture(scope="module")
def junk_server(start_module_server):
    return start_module_server()


@pytest.fixture
def healthy(junk_server):
    """A logged-in client whose round trips must stay fast; checked after the test too."""
    client = junk_server.tcp_client()
    client.login(unique("healthy"))
    yield client
    assert_healthy(junk_server, client)


def assert_healthy(srv, client: TcpClient) -> None:
    srv.assert_alive()
    start = time.monotonic()
    client.ok(9, timeout=HEALTHY_LATENCY + 2)
    assert time.monotonic() - start < HEALTHY_LATENCY, "a healthy client was stalled"
    # and a brand-new connection is accepted and served
    fresh = srv.tcp_client()
    fresh.ok(9, timeout=HEALTHY_LATENCY + 2)
    fresh.close()


def whole_packets(data: bytes) -> list[tuple[int, int, bytes]]:
    """The packets in ``data``, which must hold nothing else."""
    buffer = bytearray(data)
    packets = split_tcp(buffer)
    assert not buffer, f"a partial packet after the whole ones: {bytes(buffer[:40])!r}"
    return packets


def read_until_eof(sock: socket.socket, timeout: float = 7.0) -> bytes:
    """What the server sends before ending the connection (EOF or reset)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"server kept the connection open; got {data[:80]!r}"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_on_tcp(junk_server, healthy, seed):
    rng = random.Random(seed)
    sock = junk_server.raw_tcp()
    for _ in range(rng.randint(1, 5)):
        try:
            sock.sendall(rng.randbytes(rng.randint(1, 20000)))
        except OSError:
            break
        assert_healthy(junk_server, healthy)
    if seed % 2:
        rst_close(sock)
    else:
        sock.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_on_websocket(junk_server, healthy, seed):
    rng = random.Random(100 + seed)
    before_handshake = junk_server.raw_ws()
    after_handshake = junk_server.raw_ws().handshake()
    for sock in (before_handshake.sock, after_handshake.sock):
        try:
            sock.sendall(rng.randbytes(rng.randint(1, 20000)))
        except OSError:
            pass
    assert_healthy(junk_server, healthy)
    # a random frame is a protocol error: the upgraded peer is closed
    read_until_eof(after_handshake.sock)


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_tcp_length_below_8(junk_server, healthy, length):
    sock = junk_server.raw_tcp()
    sock.sendall(tcp_packet(9, 1, {}) + tcp_packet(1, 2, {"name": unique("j")})
                 + tcp_header(length, 9, 3) + tcp_packet(9, 4, {}))
    seqs = [(action, seq) for action, seq, _ in whole_packets(read_until_eof(sock))]
    assert seqs == [(9, 1), (1, 2)], "earlier requests answered; nothing for the broken packet or after"


def test_tcp_huge_length(junk_server, healthy):
    sock = junk_server.raw_tcp()
    sock.sendall(tcp_packet(9, 1, {}) + tcp_header(0xFFFFFFFF, 9, 2) + b"x" * 1000)
    packets = whole_packets(read_until_eof(sock))
    assert [(a, s) for a, s, _ in packets] == [(9, 1), (9, 2)]
    assert b"too_large" in packets[1][2]


def test_http_request_on_tcp_port(junk_server, healthy):
    sock = junk_server.raw_tcp()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n")
    data = read_until_eof(sock)
    # "GET " read as a length is far over the limit: too_large with the bytes after it as action/seq
    if data:
        [(action, seq, body)] = whole_packets(data)
        assert (action, seq) == (0x2F20, 0x4854) and b"too_large" in body


def test_websocket_upgrade_on_tcp_port(junk_server, healthy):
    sock = junk_server.raw_tcp()
    sock.sendall(RawWs.upgrade_request("dGhlIHNhbXBsZSBub25jZQ=="))
    read_until_eof(sock)


def test_zim_tcp_packets_on_ws_port(junk_server, healthy):
    sock = socket.create_connection(junk_server.ws, timeout=5)
    junk_server.clients.append(sock)
    sock.sendall(tcp_packet(1, 1, {"name": "wrong port"}) + b"\r\n\r\n")
    data = read_until_eof(sock)
    assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:80]


def test_half_open_peers(junk_server, healthy):
    """Peers that shut down their write side: answered, then closed; nothing else disturbed."""
    socks = []
    for i in range(20):
        sock = junk_server.raw_tcp()
        sock.sendall(tcp_packet(9, i + 1, {}) + (tcp_packet(9, 100, b"{")[:5] if i % 2 else b""))
        sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    assert_healthy(junk_server, healthy)
    for i, sock in enumerate(socks):
        action, seq, _ = whole_packets(read_until_eof(sock))[0]
        assert (action, seq) == (9, i + 1)
    # the same on WebSocket
    ws = junk_server.raw_ws().handshake()
    ws.send(ws_frame(2, ws_message(9, 7, {})))
    ws.sock.shutdown(socket.SHUT_WR)
    assert ws.read_packet()[:2] == (9, 7)
    read_until_eof(ws.sock)


def test_reset_peers(junk_server, healthy):
    """RST in every state: idle, mid-packet, with answers queued, after login, mid-handshake."""
    for i in range(30):
        sock = junk_server.raw_tcp()
        kind = i % 5
        if kind == 1:
            sock.sendall(tcp_packet(9, 1, b"{" + b" " * 3000 + b"}")[:1000])
        elif kind == 2:
            sock.sendall(b"".join(tcp_packet(9, s, {}) for s in range(1, 2000)))
        elif kind == 3:
            sock.sendall(tcp_packet(1, 1, {"name": unique("rst")}) + tcp_packet(5, 2, {"channel": "x"}))
            time.sleep(0.01)
        elif kind == 4:
            ws = socket.create_connection(junk_server.ws, timeout=5)
            ws.sendall(RawWs.upgrade_request("dGhlIHNhbXBsZSBub25jZQ==")[:30])
            rst_close(ws)
        rst_close(sock)
    assert_healthy(junk_server, healthy)


def test_logged_in_user_resets_while_pushes_flow(junk_server, healthy):
    channel = unique("rst")
    sender = junk_server.tcp_client()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    victims = []
    for _ in range(10):
        victim = junk_server.tcp_client()
        victim.login(unique("victim"))
        victim.ok(3, {"name": channel})
        victims.append(victim)
    seqs = []
    for i in range(50):
        seqs.append(sender.send(4, {"channel": channel, "content": f"m{i}"}))
        if i % 5 == 0 and victims:
            rst_close(victims.pop().sock)
    for seq in seqs:
        assert error_code(sender.wait_response(seq)[2]) in (None, "rate_limited")
    assert_healthy(junk_server, healthy)


def test_slow_reader_does_not_stall_others(junk_server, healthy):
    """A member that never reads while its channel floods; sender and others stay fast."""
    channel = unique("flood")
    slow = junk_server.tcp_client()
    slow.login(unique("slow"))
    slow.ok(3, {"name": channel})
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener = junk_server.tcp_client()
    listener.login(unique("listener"))
    listener.ok(3, {"name": channel})
    sender = junk_server.tcp_client()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    content = "z" * 2000
    start = time.monotonic()
    for _ in range(10):
        seqs = [sender.send(4, {"channel": channel, "content": content}) for _ in range(100)]
        stored = 0
        for seq in seqs:
            code = error_code(sender.wait_response(seq, timeout=10)[2])
            assert code in (None, "rate_limited")
            stored += code is None
        assert_healthy(junk_server, healthy)
        # a member that reads gets everything, however far behind the slow one is
        pushes = listener.recv_pushes(stored, timeout=10)
        assert all(action == 102 for action, _ in pushes)
    assert time.monotonic() - start < 30
    listener.assert_no_push(0)


def test_request_flood_without_reading(junk_server, healthy):
    """A peer that pipelines many requests and never reads its answers."""
    sock = junk_server.raw_tcp()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = b"".join(tcp_packet(9, (i % 32767) + 1, {}) for i in range(20000))
    stop = time.monotonic() + 5
    sock.settimeout(0.5)
    sent = 0
    while time.monotonic() < stop and sent < 5:
        try:
            sock.sendall(burst)
            sent += 1
        except (socket.timeout, OSError):
            break
        assert_healthy(junk_server, healthy)
    rst_close(sock)


def test_many_connections_open_and_close_without_leaking(junk_server, healthy):
    proc = psutil.Process(junk_server.proc.pid)
    baseline = proc.num_fds()
    for round_ in range(3):
        socks = [junk_server.raw_tcp() for _ in range(100)]
        wss = [RawWs(*junk_server.ws).handshake() for _ in range(20)]
        for i, sock in enumerate(socks):
            if i % 3 == 0:
                sock.sendall(tcp_packet(9, 1, {}))
            if i % 3 == 1:
                sock.sendall(b"\x00\x00")
        for sock in socks[::2]:
            sock.close()
        for sock in socks[1::2]:
            rst_close(sock)
        for ws in wss:
            ws.close()
    assert_healthy(junk_server, healthy)
    deadline = time.monotonic() + 10
    while proc.num_fds() > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.num_fds() <= baseline + 5, f"server descriptors {proc.num_fds()} vs {baseline} before"


def test_concurrent_junk_while_healthy_traffic(junk_server, healthy):
    """Threads send junk while a healthy client keeps a steady conversation going."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def vandal(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                port = junk_server.tcp_port if rng.random() < 0.6 else junk_server.ws_port
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                try:
                    sock.sendall(rng.randbytes(rng.randint(1, 3000)))
                except OSError:
                    pass
                if rng.random() < 0.5:
                    rst_close(sock)
                else:
                    sock.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=vandal, args=(seed,), daemon=True) for seed in range(3)]
    for thread in threads:
        thread.start()
    peer = junk_server.tcp_client()
    peer.login(unique("peer"))
    try:
        for i in range(100):
            start = time.monotonic()
            healthy.ok(2, {"receiverId": peer.user_id, "content": f"steady {i}"})
            action, msg = peer.recv_push(HEALTHY_LATENCY + 2)
            assert msg["content"] == f"steady {i}"
            assert time.monotonic() - start < HEALTHY_LATENCY
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert not errors, errors
