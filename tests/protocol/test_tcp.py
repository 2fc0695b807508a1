"""TCP framing against the real server: limits, pipelining, partial packets."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.support.client import Closed, error_code, tcp_packet, unique
from zim.client import split_tcp, tcp_header

MAX_PACKET = 65536      # the server's default


def read_packets_until_eof(sock: socket.socket, timeout: float = 5.0) -> list[tuple[int, int, dict]]:
    """Every packet the server sends until it ends the stream (EOF; a reset fails the test)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        assert time.monotonic() < deadline, "server did not close the connection in time"
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            raise AssertionError(f"connection reset; got so far {buf[:100]!r}") from None
        except socket.timeout:
            raise AssertionError(f"server did not close the connection; got {buf[:100]!r}") from None
        if not chunk:
            break
        buf += chunk
    buffer = bytearray(buf)
    packets = [(action, seq, json.loads(body) if body else {}) for action, seq, body in split_tcp(buffer)]
    assert not buffer, f"truncated packet {bytes(buffer[:40])!r}"
    return packets


def test_packet_of_exactly_max_size_is_accepted(server):
    client = server.tcp_client()
    body = b"{" + b" " * (MAX_PACKET - 8 - 2) + b"}"
    assert len(tcp_packet(9, 1, body)) == MAX_PACKET
    action, seq, result = client.request(9, body)
    assert (action, error_code(result)) == (9, None)


def test_too_large_answered_then_closed(server):
    sock = server.raw_tcp()
    body = b"{" + b" " * (MAX_PACKET - 8 - 1) + b"}"
    assert len(tcp_packet(4, 77, body)) == MAX_PACKET + 1
    sock.sendall(tcp_packet(9, 1, {}) + tcp_packet(4, 77, body))
    packets = read_packets_until_eof(sock)
    assert [(a, s) for a, s, _ in packets] == [(9, 1), (4, 77)]
    assert error_code(packets[0][2]) is None
    assert error_code(packets[1][2]) == "too_large"
    assert isinstance(packets[1][2]["error"]["message"], str)


def test_too_large_from_header_alone(server):
    """A length far over the limit is refused at once: the server never waits for the body."""
    sock = server.raw_tcp()
    sock.sendall(tcp_header(100 * 1024 * 1024, 2, 4321))
    packets = read_packets_until_eof(sock)
    assert [(a, s, error_code(b)) for a, s, b in packets] == [(2, 4321, "too_large")]


def test_too_large_response_not_lost_to_a_reset(server):
    """The client keeps sending the oversized body; the server must drain, not reset."""
    sock = server.raw_tcp(timeout=10)
    total = 3 * 1024 * 1024
    sock.sendall(tcp_header(total, 3, 99))
    sent = {"bytes": 0, "error": None}

    def stream_body() -> None:
        chunk = b"z" * 65536
        try:
            while sent["bytes"] < total - 8:
                sock.sendall(chunk)
                sent["bytes"] += len(chunk)
        except OSError as exc:   # the server may finish draining and close: fine
            sent["error"] = exc

    sender = threading.Thread(target=stream_body, daemon=True)
    sender.start()
    packets = read_packets_until_eof(sock, timeout=10)
    sender.join(10)
    assert [(a, s, error_code(b)) for a, s, b in packets] == [(3, 99, "too_large")]


def test_pipelined_requests_all_answered_in_order(server):
    client = server.tcp_client()
    stream = b"".join(tcp_packet(9, seq, {}) for seq in range(1, 301))
    client.send_raw(stream)
    for seq in range(1, 301):
        action, got_seq, body = client._pump(time.monotonic() + 10)
        assert (action, got_seq, error_code(body)) == (9, seq, None)


def test_packet_dribbled_byte_by_byte(server):
    client = server.tcp_client()
    packet = tcp_packet(1, 5, {"name": unique("slow")}) + tcp_packet(9, 6, {})
    for i in range(len(packet)):
        client.send_raw(packet[i:i + 1])
        time.sleep(0.001)
    _, _, login = client.wait_response(5)
    assert error_code(login) is None and login["id"]
    assert error_code(client.wait_response(6)[2]) is None


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, 9, 20])
def test_packet_split_across_writes(server, cut):
    client = server.tcp_client()
    stream = tcp_packet(9, 1, {}) + tcp_packet(1, 2, {"name": unique("split")}) + tcp_packet(9, 3, {})
    client.send_raw(stream[:cut])
    time.sleep(0.02)
    client.send_raw(stream[cut:])
    for seq in (1, 2, 3):
        assert error_code(client.wait_response(seq)[2]) is None


def test_response_wire_format(server):
    """Raw bytes: length counts the whole packet, action and seq echoed, body UTF-8 JSON."""
    sock = server.raw_tcp()
    sock.sendall(tcp_packet(0xFFFF, 0xFFFE, b"") + tcp_packet(9, 0x1234, b""))
    buffer = bytearray()
    packets = []
    sock.settimeout(5)
    while len(packets) < 2:
        chunk = sock.recv(65536)
        assert chunk, "EOF"
        buffer += chunk
        packets += split_tcp(buffer)
    (action, seq, body), (action2, seq2, body2) = packets
    assert (action, seq) == (0xFFFF, 0xFFFE)
    assert json.loads(body.decode("utf-8"))["error"]["code"] == "unknown_action"
    assert (action2, seq2) == (9, 0x1234)
    assert isinstance(json.loads(body2)["time"], int)


def test_eof_after_request_still_answered(server):
    """A peer that sends a request and half-closes still gets its answer, then EOF."""
    sock = server.raw_tcp()
    sock.sendall(tcp_packet(9, 8, {}))
    sock.shutdown(socket.SHUT_WR)
    packets = read_packets_until_eof(sock)
    assert [(a, s, error_code(b)) for a, s, b in packets] == [(9, 8, None)]


def test_max_packet_flag(start_server):
    srv = start_server(["--max-packet", "200"])
    client = srv.tcp_client()
    assert error_code(client.request(9, b"{" + b" " * (200 - 10) + b"}")[2]) is None
    client.send(1, {"name": "x" * 300})
    action, seq, body = client._pump(time.monotonic() + 5)
    assert (action, error_code(body)) == (1, "too_large")
    with pytest.raises(Closed):
        client._pump(time.monotonic() + 5)
