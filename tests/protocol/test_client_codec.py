"""zim.client's codec: round trips against the server's own C codec (zim._codec),
arbitrary bodies and split points (hypothesis), clear errors on bad input, and
the blocking client against a real server over TCP and WebSocket."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.client import unique
from zim import _codec as server_codec
from zim.client import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ProtocolError, TcpDecoder,
                        WsDecoder, ZimError, apply_mask, check_ws_upgrade, close_payload, connect, decode_body,
                        encode_body, new_ws_key, parse_frame, parse_ws_message, split_frames, split_tcp, split_ws,
                        take_tcp_packet, tcp_header, tcp_packet, ws_accept, ws_close, ws_close_payload, ws_frame,
                        ws_header, ws_message, ws_packet, ws_upgrade_accepted, ws_upgrade_request)

actions = st.integers(0, 0xFFFF)
seqs = st.integers(0, 0xFFFF)
bodies = st.binary(max_size=3000)
packets = st.lists(st.tuples(actions, seqs, bodies), max_size=8)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4),
                           max_leaves=12)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at these offsets (any order, any repeats)."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# -- bodies ----------------------------------------------------------------------------
@given(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6))
def test_a_body_round_trips(body):
    raw = encode_body(body)
    assert raw == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert decode_body(raw) == body


def test_body_edges():
    assert encode_body(None) == b"" and decode_body(b"") == {}
    assert encode_body(b'{"raw":1}') == b'{"raw":1}'
    for bad in (b"[1]", b'"text"', b"{", b"\xff\xfe"):
        with pytest.raises(ProtocolError):
            decode_body(bad)


# -- TCP -------------------------------------------------------------------------------
@given(packets)
def test_tcp_packets_are_what_the_server_decodes(sent):
    decoder = server_codec.TcpDecoder(1 << 20)
    events = decoder.feed(b"".join(tcp_packet(a, s, b) for a, s, b in sent))
    assert events == [("packet", a, s, b) for a, s, b in sent]


@given(packets, st.lists(st.integers(0, 1 << 20), max_size=10))
def test_server_tcp_packets_split_anywhere(sent, cuts):
    stream = b"".join(server_codec.encode_tcp(a, s, b) for a, s, b in sent)
    decoder = TcpDecoder()
    got = [packet for piece in chunks(stream, cuts) for packet in decoder.feed(piece)]
    assert got == sent and not decoder.buffer
    buffer = bytearray(stream)
    assert split_tcp(buffer) == sent and not buffer
    buffer = bytearray(stream)
    assert [take_tcp_packet(buffer) for _ in sent] == sent and take_tcp_packet(buffer) is None


def test_tcp_packet_layout():
    """docs/protocol.md's worked example."""
    assert tcp_packet(1, 1, {"name": "alice"}).hex(" ") == \
        "00 00 00 18 00 01 00 01 7b 22 6e 61 6d 65 22 3a 22 61 6c 69 63 65 22 7d"
    assert tcp_packet(9, 2) == b"\x00\x00\x00\x08\x00\x09\x00\x02"


def test_tcp_header_takes_any_fields_unchecked():
    """What a correct client never sends, for tests and tools: lengths that lie."""
    assert tcp_header(3, 9, 2) == b"\x00\x00\x00\x03\x00\x09\x00\x02"
    assert tcp_header(0xFFFFFFFF, -1, 0x10001) == b"\xff\xff\xff\xff\xff\xff\x00\x01"   # 16 bits each
    assert tcp_header(8 + 2, 9, 1) + b"{}" == tcp_packet(9, 1, b"{}")
    with pytest.raises(struct.error):
        tcp_header(1 << 32, 9, 1)


def test_parse_ws_message_inverts_ws_message():
    assert parse_ws_message(b"\x00\x09\xff\xfe{}") == (9, 0xFFFE, b"{}")
    assert parse_ws_message(bytearray(ws_message(1, 2, {"a": 1}))) == (1, 2, b'{"a":1}')
    with pytest.raises(ProtocolError):
        parse_ws_message(b"\x00\x09\x00")


def test_a_partial_tcp_packet_waits():
    buffer = bytearray(tcp_packet(9, 1, b"{}") + tcp_packet(9, 2, b"{}")[:9])
    assert split_tcp(buffer) == [(9, 1, b"{}")]
    assert bytes(buffer) == tcp_packet(9, 2, b"{}")[:9]


@pytest.mark.parametrize("length", [0, 7, 101])
def test_a_bad_tcp_length_is_an_error(length):
    stream = bytearray(tcp_packet(9, 1, b"{}") + tcp_header(length, 9, 2) + b"x" * 200)
    with pytest.raises(ProtocolError, match=f"length {length} "):
        split_tcp(stream, max_packet=100)
    assert stream.startswith(tcp_packet(9, 1, b"{}"))      # left as it was
    with pytest.raises(ProtocolError):
        TcpDecoder(100).feed(bytes(stream))


def test_out_of_range_head_fields_are_refused():
    with pytest.raises(struct.error):
        tcp_packet(0x10000, 1)
    with pytest.raises(struct.error):
        ws_message(1, -1)


# -- WebSocket frames ----------------------------------------------------------------------
@given(packets)
def test_client_frames_are_what_the_server_decodes(sent):
    decoder = server_codec.WsDecoder(1 << 20)
    events = decoder.feed(b"".join(ws_packet(a, s, b) for a, s, b in sent))
    assert events == [("packet", a, s, b) for a, s, b in sent]


@given(st.binary(max_size=70000), st.binary(min_size=4, max_size=4))
@settings(max_examples=50)
def test_masking_round_trips(payload, key):
    frame = ws_frame(OP_BINARY, payload, key=key)
    assert frame.index(key) in (2, 4, 10) and len(frame) - len(payload) in (6, 8, 14)
    assert apply_mask(frame[-len(payload):] if payload else b"", key) == payload


@given(packets, st.lists(st.integers(0, 1 << 20), max_size=10))
def test_server_frames_split_anywhere(sent, cuts):
    stream = b"".join(server_codec.encode_ws(a, s, b) for a, s, b in sent)
    decoder = WsDecoder()
    events = [event for piece in chunks(stream, cuts) for event in decoder.feed(piece)]
    assert events == [("packet", a, s, b) for a, s, b in sent]
    buffer = bytearray(stream)
    assert split_ws(buffer) == [(OP_BINARY, a, s, b) for a, s, b in sent] and not buffer
    buffer = bytearray(stream)
    frames = split_frames(buffer)
    assert [(fin, rsv, opcode) for fin, rsv, opcode, _ in frames] == [(True, 0, OP_BINARY)] * len(sent)


@given(st.tuples(actions, seqs, bodies), st.lists(st.integers(1, 3000), min_size=1, max_size=5),
       st.lists(st.integers(0, 1 << 20), max_size=6))
def test_fragmented_messages_are_joined(packet, sizes, cuts):
    """A message in several frames (as a server may send it), with a ping between
    two of them, comes out whole, after the ping."""
    message = ws_message(*packet)
    pieces, rest = [], message
    for size in sizes:
        pieces.append(rest[:size])
        rest = rest[size:]
    pieces.append(rest)
    frames = [ws_frame(OP_BINARY if i == 0 else OP_CONTINUATION, piece, fin=i == len(pieces) - 1, mask=False)
              for i, piece in enumerate(pieces)]
    frames.insert(1, ws_frame(OP_PING, b"still there?", mask=False))
    decoder = WsDecoder()
    events = [event for piece in chunks(b"".join(frames), cuts) for event in decoder.feed(piece)]
    assert events == [("ping", b"still there?"), ("packet", *packet)]


def test_control_frames_from_the_server():
    stream = (server_codec.encode_ws_control(OP_PING, b"p") + server_codec.encode_ws_control(OP_PONG, b"")
              + server_codec.encode_ws(9, 1, b"{}") + server_codec.encode_ws_control(OP_CLOSE, b"\x03\xe9bye")
              + server_codec.encode_ws(9, 2, b"{}"))
    decoder = WsDecoder()
    assert decoder.feed(stream) == [("ping", b"p"), ("pong", b""), ("packet", 9, 1, b"{}"), ("close", 1001, "bye")]
    assert decoder.closed and decoder.feed(server_codec.encode_ws(9, 3, b"{}")) == []
    assert WsDecoder().feed(server_codec.encode_ws_control(OP_CLOSE, b"")) == [("close", None, "")]
    assert split_ws(bytearray(server_codec.encode_ws_control(OP_PING, b"x"))) == [(OP_PING, 0, 0, b"x")]


def test_parse_frame_reports_where_the_frame_ends():
    frame = server_codec.encode_ws(4, 7, b"x" * 300)
    assert parse_frame(frame[:-1]) is None and parse_frame(frame[:3]) is None
    end, fin, rsv, opcode, payload = parse_frame(frame + b"more")
    assert (end, fin, rsv, opcode, payload) == (len(frame), True, 0, OP_BINARY, ws_message(4, 7, b"x" * 300))
    assert parse_frame(frame + frame, len(frame))[0] == 2 * len(frame)


BAD_SERVER_FRAMES = {
    "masked": ws_frame(OP_BINARY, ws_message(9, 1, b"{}")),
    "nonminimal_16bit": ws_frame(OP_BINARY, ws_message(9, 1, b"{}"), mask=False, length_bytes=2),
    "nonminimal_64bit": ws_frame(OP_BINARY, ws_message(9, 1, b"{}"), mask=False, length_bytes=8),
    "ping_over_125": ws_frame(OP_PING, b"p" * 126, mask=False),
    "fragmented_ping": ws_frame(OP_PING, b"p", fin=False, mask=False),
}
BAD_SERVER_MESSAGES = {
    **BAD_SERVER_FRAMES,
    "text": ws_frame(OP_TEXT, b'{"a":1}', mask=False),
    "rsv1": ws_frame(OP_BINARY, ws_message(9, 1, b"{}"), mask=False, rsv=4),
    "continuation_first": ws_frame(OP_CONTINUATION, ws_message(9, 1, b"{}"), mask=False),
    "binary_inside_fragmented": (ws_frame(OP_BINARY, b"\x00\x09", fin=False, mask=False)
                                 + ws_frame(OP_BINARY, b"\x00\x01", mask=False)),
    "under_4_bytes": ws_frame(OP_BINARY, b"\x00\x09\x00", mask=False),
    "close_one_byte": ws_frame(OP_CLOSE, b"\x03", mask=False),
    "over_max_packet": ws_frame(OP_BINARY, ws_message(9, 1, b"x" * 200), mask=False),
}


@pytest.mark.parametrize("frame", BAD_SERVER_FRAMES.values(), ids=BAD_SERVER_FRAMES.keys())
def test_a_bad_server_frame_is_an_error(frame):
    with pytest.raises(ProtocolError):
        parse_frame(frame)
    buffer = bytearray(frame)
    with pytest.raises(ProtocolError):
        split_frames(buffer)
    assert buffer == frame


@pytest.mark.parametrize("stream", BAD_SERVER_MESSAGES.values(), ids=BAD_SERVER_MESSAGES.keys())
def test_a_bad_server_message_is_an_error(stream):
    with pytest.raises(ProtocolError):
        WsDecoder(max_packet=100).feed(stream)


def test_ws_header_declares_any_length_unchecked():
    assert ws_header(OP_BINARY, 5) == b"\x82\x85"
    assert ws_header(OP_CLOSE, 2, mask=False) == b"\x88\x02"
    assert ws_header(OP_BINARY, 1 << 33) == b"\x82\xff\x00\x00\x00\x02\x00\x00\x00\x00"
    assert ws_header(OP_BINARY, 1 << 63, length_bytes=8) == b"\x82\xff\x80" + b"\x00" * 7   # the top bit set
    assert ws_header(OP_BINARY, 4, length_bytes=2, fin=False, rsv=4) == b"\x42\xfe\x00\x04"  # non-minimal
    key = b"\x01\x02\x03\x04"
    assert ws_header(OP_BINARY, 4) + key + apply_mask(b"ping", key) == ws_frame(OP_BINARY, b"ping", key=key)


def test_ws_close_payload_takes_any_code_and_reason():
    assert ws_close_payload(1000, b"bye") == b"\x03\xe8bye"
    assert ws_close_payload(5000, b"\xff\xfe") == b"\x13\x88\xff\xfe"     # invalid code, not UTF-8
    assert close_payload(ws_close_payload(1001)) == (1001, "")


def test_ws_close_frame():
    decoder = server_codec.WsDecoder(1 << 20)
    assert decoder.feed(ws_close(1000, "done")) == [("close", 1000, b"done")]


# -- the opening handshake ---------------------------------------------------------------
def test_accept_value_of_rfc_6455():
    assert ws_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_the_servers_answer_to_our_upgrade_checks_out():
    key = new_ws_key()
    request = ws_upgrade_request(key, "127.0.0.1:8082", "/chat", "Origin: https://chat.example.com\r\n")
    assert request.startswith(b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:8082\r\n") and request.endswith(b"\r\n\r\n")
    answer = server_codec.handshake_response(request, False)
    headers = check_ws_upgrade(answer, key)
    assert headers["sec-websocket-accept"] == ws_accept(key)
    assert ws_upgrade_accepted(answer, key) and not ws_upgrade_accepted(answer, new_ws_key())
    with pytest.raises(ProtocolError, match="Sec-WebSocket-Accept"):
        check_ws_upgrade(answer, new_ws_key())
    with pytest.raises(ProtocolError, match="refused"):
        check_ws_upgrade(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", key)


# -- the blocking client, against a real server --------------------------------------------
@pytest.mark.parametrize("kind", ["tcp", "ws"])
def test_blocking_client_requests_and_pushes(server, kind):
    url = f"tcp://{server.host}:{server.tcp_port}" if kind == "tcp" else f"ws://{server.host}:{server.ws_port}/"
    channel = unique("room")
    with connect(url) as alice, connect(url) as bob:
        alice.login(unique("alice"))
        bob.login(unique("bob"))
        assert alice.ok(3, {"name": channel}) == {} and bob.ok(3, {"name": channel}) == {}
        sent = alice.ok(4, {"channel": channel, "content": "hi"})
        action, push = bob.recv_push()
        assert action == 102 and push["id"] == sent["id"] and push["content"] == "hi"
        with pytest.raises(ZimError) as error:
            alice.ok(6, {"name": unique("nowhere")})
        assert error.value.code == "not_found"
        again = connect(url)
        with again:
            assert again.login(bob.name, bob.token)["id"] == bob.user_id
        bob.sync()
        assert not bob.pushes
