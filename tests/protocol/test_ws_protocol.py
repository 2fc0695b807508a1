"""RFC 6455 edge cases with hand-built frames over a raw socket."""
from __future__ import annotations

import base64
import os
import socket
import struct
import time
import zlib

import pytest

from tests.support.client import RawWs, error_code, unique, ws_accept, ws_frame, ws_message
from zim.client import OP_BINARY, apply_mask, parse_ws_message, ws_close_payload, ws_header

BIG_MAX_PACKET = 200_000


@pytest.fixture(scope="module")
def big_server(start_module_server):
    """A server with a max packet above 64 KiB, for 64-bit frame lengths."""
    return start_module_server(["--max-packet", str(BIG_MAX_PACKET)])


def heartbeat_frame(seq: int, **kwargs) -> bytes:
    return ws_frame(2, ws_message(9, seq, {}), **kwargs)


def expect_heartbeat(ws: RawWs, seq: int) -> None:
    action, got_seq, body = ws.read_packet()
    assert (action, got_seq) == (9, seq) and error_code(body) is None and isinstance(body["time"], int)


def expect_close(ws: RawWs, code: int) -> None:
    got, before = ws.read_close()
    assert got == code, f"close code {got}, expected {code}; frames before: {before}"
    assert ws.expect_eof() == b"", "data after the close frame"


# --------------------------------------------------------------- handshake


def test_handshake_accept_key(server):
    ws = server.raw_ws()
    ws.handshake(path="/chat?room=1")      # asserts 101 and Sec-WebSocket-Accept
    assert ws.status.split(" ", 2)[1] == "101"
    ws.send(heartbeat_frame(1))
    expect_heartbeat(ws, 1)


def test_handshake_rfc_sample_key(server):
    ws = server.raw_ws()
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    ws.send(RawWs.upgrade_request(key))
    status, headers = ws.read_http_head()
    assert status.startswith("HTTP/1.1 101")
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" == ws_accept(key)


def test_handshake_and_first_frames_in_one_write(server):
    ws = server.raw_ws()
    ws.handshake(then=heartbeat_frame(1) + heartbeat_frame(2))
    expect_heartbeat(ws, 1)
    expect_heartbeat(ws, 2)


def test_handshake_in_pieces(server):
    ws = server.raw_ws()
    key = base64.b64encode(os.urandom(16)).decode()
    request = RawWs.upgrade_request(key)
    for i in range(0, len(request), 7):
        ws.send(request[i:i + 7])
        time.sleep(0.002)
    status, headers = ws.read_http_head()
    assert status.startswith("HTTP/1.1 101") and headers["sec-websocket-accept"] == ws_accept(key)


# (a plain GET without Upgrade is not an upgrade: --demo answers it, tests/demo/test_pages.py)
@pytest.mark.parametrize("request_head", [
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",   # a TLS hello
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n" + b"X-Filler: " + b"a" * 9000 + b"\r\n\r\n",  # head too long
    b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000,                          # never ends
])
def test_bad_upgrade_gets_400_or_close(server, request_head):
    ws = server.raw_ws()
    try:
        ws.send(request_head)
    except OSError:
        pass                        # the server may close before reading it all
    try:
        data = ws.expect_eof(timeout=5)
    except OSError:
        data = b""
    assert not data.startswith(b"HTTP/1.1 101"), data[:100]
    assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:100]
    healthy = server.raw_ws().handshake()
    healthy.send(heartbeat_frame(3))
    expect_heartbeat(healthy, 3)


def test_permessage_deflate_offer(server):
    """The server may decline the extension; either way the session works."""
    ws = server.raw_ws()
    ws.handshake(extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
    extensions = ws.headers.get("sec-websocket-extensions", "")
    if "permessage-deflate" in extensions:
        compressor = zlib.compressobj(wbits=-15)
        data = compressor.compress(ws_message(9, 4, {})) + compressor.flush(zlib.Z_SYNC_FLUSH)
        ws.send(ws_frame(2, data[:-4], rsv=4))
        fin, rsv, opcode, payload = ws.read_frame()
        assert opcode == 2
        if rsv & 4:
            payload = zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")
        assert parse_ws_message(payload)[:2] == (9, 4)
    else:
        assert extensions == "", extensions
        ws.send(heartbeat_frame(4))
        expect_heartbeat(ws, 4)


# ------------------------------------------------------------------- frames


def test_server_frames_unmasked_binary(server):
    ws = server.raw_ws().handshake()
    ws.send_packet(1, 1, {"name": unique("raw")})
    fin, rsv, opcode, payload = ws.read_frame()    # read_frame asserts the mask bit is clear
    assert fin and rsv == 0 and opcode == 2
    assert parse_ws_message(payload)[:2] == (1, 1)


def test_fragmented_message_reassembled(server):
    ws = server.raw_ws().handshake()
    message = ws_message(1, 7, {"name": unique("frag")})
    pieces = [message[:1], message[1:3], b"", message[3:10], message[10:]]
    frames = b"".join(ws_frame(2 if i == 0 else 0, piece, fin=i == len(pieces) - 1)
                      for i, piece in enumerate(pieces))
    ws.send(frames)
    action, seq, body = ws.read_packet()
    assert (action, seq) == (1, 7) and error_code(body) is None and body["id"]


def test_control_frames_inside_fragmented_message(server):
    ws = server.raw_ws().handshake()
    message = ws_message(9, 12, {})
    ws.send(ws_frame(2, message[:2], fin=False) + ws_frame(9, b"mid-ping")
            + ws_frame(0, message[2:3], fin=False) + ws_frame(10, b"unsolicited pong")
            + ws_frame(0, message[3:]))
    fin, rsv, opcode, payload = ws.read_frame()
    assert (opcode, payload) == (10, b"mid-ping")
    expect_heartbeat(ws, 12)


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_ping_answered_with_same_payload(server, payload):
    ws = server.raw_ws().handshake()
    ws.send(ws_frame(9, payload))
    fin, rsv, opcode, got = ws.read_frame()
    assert fin and rsv == 0 and opcode == 10 and got == payload


@pytest.mark.parametrize("close_payload,code", [
    (ws_close_payload(1000, b"bye"), 1000), (ws_close_payload(1001), 1001), (b"", None),
])
def test_close_handshake_echoed(server, close_payload, code):
    ws = server.raw_ws().handshake()
    ws.send(heartbeat_frame(1) + ws_frame(8, close_payload))
    expect_heartbeat(ws, 1)
    got, before = ws.read_close()
    assert before == []
    if code is not None:
        assert got == code
    else:
        assert got in (None, 1000)
    assert ws.expect_eof() == b""


def test_text_message_closes_1003(server):
    ws = server.raw_ws().handshake()
    ws.send(heartbeat_frame(1) + ws_frame(1, b'{"name":"text"}') + heartbeat_frame(2))
    expect_heartbeat(ws, 1)
    expect_close(ws, 1003)


PROTOCOL_ERRORS = {
    "unmasked": ws_frame(2, ws_message(9, 2, {}), mask=False),
    "rsv1": ws_frame(2, ws_message(9, 2, {}), rsv=4),
    "rsv2": ws_frame(2, ws_message(9, 2, {}), rsv=2),
    "rsv3": ws_frame(2, ws_message(9, 2, {}), rsv=1),
    "opcode3": ws_frame(3, ws_message(9, 2, {})),
    "opcode6": ws_frame(6, ws_message(9, 2, {})),
    "opcode11": ws_frame(11, b""),
    "opcode15": ws_frame(15, b"x"),
    "continuation_first": ws_frame(0, ws_message(9, 2, {})),
    "binary_inside_fragmented": ws_frame(2, b"\x00\x09", fin=False) + ws_frame(2, b"\x00\x02"),
    "fragmented_ping": ws_frame(9, b"p", fin=False),
    "ping_over_125": ws_frame(9, b"p" * 126),
    "close_one_byte": ws_frame(8, b"\x03"),
    "empty_message": ws_frame(2, b""),
    "message_2_bytes": ws_frame(2, b"\x00\x09"),
    "message_3_bytes": ws_frame(2, b"\x00\x09\x00"),
    "fragments_totalling_3": ws_frame(2, b"\x00", fin=False) + ws_frame(0, b"\x09\x00"),
    "nonminimal_16bit_length": ws_frame(2, ws_message(9, 2, {}), length_bytes=2),
    "nonminimal_64bit_length": ws_frame(2, ws_message(9, 2, {}), length_bytes=8),
    "64bit_length_msb": ws_header(OP_BINARY, 1 << 63, length_bytes=8) + b"\x00\x00\x00\x00",   # + zero key
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ERRORS))
def test_protocol_error_closes_1002_after_answering_earlier_requests(server, name):
    ws = server.raw_ws().handshake()
    ws.send(heartbeat_frame(1) + PROTOCOL_ERRORS[name] + heartbeat_frame(3))
    expect_heartbeat(ws, 1)
    expect_close(ws, 1002)


def test_too_large_then_1009(server):
    ws = server.raw_ws().handshake()
    big = ws_message(4, 66, b"{" + b" " * (65536 - 8 - 1) + b"}")
    assert len(big) + 4 == 65537
    ws.send(heartbeat_frame(1) + ws_frame(2, big))
    expect_heartbeat(ws, 1)
    action, seq, body = ws.read_packet()
    assert (action, seq, error_code(body)) == (4, 66, "too_large")
    expect_close(ws, 1009)


def test_too_large_declared_length_without_body(server):
    ws = server.raw_ws().handshake()
    key = b"\x01\x02\x03\x04"
    head = ws_header(OP_BINARY, 1 << 33) + key
    ws.send(head + apply_mask(ws_message(5, 55), key))      # the packet head, then nothing
    action, seq, body = ws.read_packet()
    assert (action, seq, error_code(body)) == (5, 55, "too_large")
    expect_close(ws, 1009)


def test_too_large_across_fragments(server):
    ws = server.raw_ws().handshake()
    message = ws_message(9, 21, b"{" + b" " * 70000 + b"}")
    ws.send(ws_frame(2, message[:40000], fin=False) + ws_frame(0, message[40000:]))
    action, seq, body = ws.read_packet()
    assert (action, seq, error_code(body)) == (9, 21, "too_large")
    expect_close(ws, 1009)


@pytest.mark.parametrize("size", [125, 126, 127, 65535, 65536, 65537, 150_000])
def test_client_length_forms(big_server, size):
    """7-, 16- and 64-bit client frame lengths; the response comes back in the matching form."""
    ws = big_server.raw_ws().handshake()
    body = b"{" + b" " * (size - 4 - 2) + b"}"
    message = ws_message(9, 9, body)
    assert len(message) == size
    ws.send(ws_frame(2, message))
    expect_heartbeat(ws, 9)


def test_large_server_frames_use_16_and_64_bit_lengths(big_server):
    alice = big_server.raw_ws().handshake()
    alice.send_packet(1, 1, {"name": unique("a")})
    _, _, me = alice.read_packet()
    for seq, size, length_marker in ((2, 300, 126), (4, 100_000, 127)):
        alice.send_packet(2, seq, {"receiverId": me["id"], "content": "c" * size})
        _, got_seq, body = alice.read_packet()
        assert got_seq == seq and error_code(body) is None
        alice.send_packet(5, seq + 1, {"userId": me["id"], "limit": 1})
        # look at the history response's frame header before parsing it
        deadline = time.monotonic() + 5
        while len(alice.buf) < 10:
            alice._recv_some(deadline)
        assert alice.buf[0] == 0x82 and alice.buf[1] == length_marker, bytes(alice.buf[:10])
        _, got_seq, body = alice.read_packet()
        assert got_seq == seq + 1 and body["messages"][0]["content"] == "c" * size


def test_requests_before_broken_frame_answered(server):
    ws = server.raw_ws().handshake()
    login = ws_frame(2, ws_message(1, 1, {"name": unique("b")}))
    ws.send(login + heartbeat_frame(2) + ws_frame(2, b"\x00\x09", mask=False))
    action, seq, body = ws.read_packet()
    assert (action, seq) == (1, 1) and error_code(body) is None
    expect_heartbeat(ws, 2)
    expect_close(ws, 1002)


def test_frame_dribbled_byte_by_byte(server):
    ws = server.raw_ws().handshake()
    frames = ws_frame(2, ws_message(1, 3, {"name": unique("drip")})) + ws_frame(9, b"pp") + heartbeat_frame(4)
    for i in range(len(frames)):
        ws.send(frames[i:i + 1])
        time.sleep(0.001)
    action, seq, body = ws.read_packet()
    assert (action, seq) == (1, 3) and error_code(body) is None
    assert ws.read_frame()[2:] == (10, b"pp")
    expect_heartbeat(ws, 4)


def test_abrupt_disconnect_mid_frame_harmless(server):
    ws = server.raw_ws().handshake()
    ws.send(ws_frame(2, ws_message(9, 1, b"{" + b" " * 5000 + b"}"))[:100])
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.sock.close()
    healthy = server.raw_ws().handshake()
    healthy.send(heartbeat_frame(5))
    expect_heartbeat(healthy, 5)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1016, 2999, 5000, 65535])
def test_close_with_invalid_code_is_1002(server, code):
    """RFC 6455 7.4: 1005/1006 and unassigned codes must not appear in a close frame."""
    ws = server.raw_ws().handshake()
    ws.send(ws_frame(8, ws_close_payload(code)))
    expect_close(ws, 1002)


def test_close_with_invalid_utf8_reason(server):
    ws = server.raw_ws().handshake()
    ws.send(ws_frame(8, ws_close_payload(1000, b"\xff\xfe")))
    got, _ = ws.read_close()
    assert got in (1002, 1007)
    assert ws.expect_eof() == b""


def test_browser_style_upgrade_headers(server):
    """Header names and tokens are case-insensitive; Firefox sends 'keep-alive, Upgrade'."""
    ws = server.raw_ws()
    key = base64.b64encode(os.urandom(16)).decode()
    ws.send((f"GET /socket HTTP/1.1\r\nhost: 127.0.0.1\r\nuser-agent: Mozilla/5.0\r\n"
             f"connection: keep-alive, Upgrade\r\nupgrade: WebSocket\r\n"
             f"sec-websocket-version: 13\r\nsec-websocket-key: {key}\r\n"
             f"origin: http://localhost\r\nsec-websocket-protocol: chat\r\n\r\n").encode())
    status, headers = ws.read_http_head()
    assert status.startswith("HTTP/1.1 101") and headers["sec-websocket-accept"] == ws_accept(key)
    assert "sec-websocket-protocol" not in headers or headers["sec-websocket-protocol"] == "chat"
    ws.send(heartbeat_frame(6))
    expect_heartbeat(ws, 6)
