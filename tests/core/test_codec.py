"""The wire codec (zim._codec) on its own: unit tests and hypothesis properties.

The decoders wrap the very functions the reactor runs on its read buffer, so a
stream split anywhere must give the same events as the stream fed at once.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zim._codec import TcpDecoder, WsDecoder, encode_tcp, encode_ws, encode_ws_control, handshake_response
from tests.support.client import apply_mask, parse_server_frame, ws_frame
from zim.client import OP_BINARY, tcp_header, tcp_packet, ws_close_payload, ws_header, ws_message

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.integers(min_value=0, max_value=0xFFFF)
bodies = st.binary(max_size=300)


def feed_chunks(decoder, data: bytes, cuts: list[int]) -> list[tuple]:
    """Feed data split at the given offsets; all events in order."""
    events: list[tuple] = []
    last = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        events += decoder.feed(data[last:cut])
        last = cut
    return events


def cut_points(data_len_max: int = 10_000):
    return st.lists(st.integers(min_value=0, max_value=data_len_max), max_size=20)


# ---------------------------------------------------------------- TCP ------

def test_encode_tcp_layout():
    body = b'{"a":1}'
    assert encode_tcp(1, 2, body) == tcp_packet(1, 2, body)
    assert encode_tcp(101, 0, b"") == b"\x00\x00\x00\x08\x00\x65\x00\x00"
    assert encode_tcp(0xFFFF, 0xFFFF, b"x") == b"\x00\x00\x00\x09\xff\xff\xff\xffx"


@PROPERTY
@given(packets=st.lists(st.tuples(u16, u16, bodies), max_size=12), cuts=cut_points(4000))
def test_tcp_split_anywhere_gives_same_packets(packets, cuts):
    stream = b"".join(encode_tcp(a, s, b) for a, s, b in packets)
    expected = [("packet", a, s, b) for a, s, b in packets]
    assert TcpDecoder(65536).feed(stream) == expected
    assert feed_chunks(TcpDecoder(65536), stream, cuts) == expected


@PROPERTY
@given(packets=st.lists(st.tuples(u16, u16, bodies), max_size=12))
def test_tcp_byte_by_byte(packets):
    stream = b"".join(encode_tcp(a, s, b) for a, s, b in packets)
    decoder = TcpDecoder(65536)
    events = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i:i + 1])
    assert events == [("packet", a, s, b) for a, s, b in packets]


@PROPERTY
@given(before=st.lists(st.tuples(u16, u16, bodies), max_size=5), action=u16, seq=u16,
       excess=st.integers(min_value=1, max_value=1 << 30), cuts=cut_points(2000),
       tail=st.binary(max_size=100))
def test_tcp_too_large_after_good_packets(before, action, seq, excess, cuts, tail):
    max_packet = 1000
    stream = b"".join(encode_tcp(a, s, b) for a, s, b in before)
    # only the header of the oversized packet: the decoder must not wait for its body
    stream += tcp_header(max_packet + excess, action, seq)
    decoder = TcpDecoder(max_packet)
    events = feed_chunks(decoder, stream + tail, cuts)
    assert events == [("packet", a, s, b) for a, s, b in before] + [("too_large", action, seq)]
    assert decoder.feed(encode_tcp(9, 1, b"")) == []


def test_tcp_max_packet_boundary():
    max_packet = 64
    exact = encode_tcp(9, 1, b"x" * (max_packet - 8))
    assert TcpDecoder(max_packet).feed(exact) == [("packet", 9, 1, b"x" * (max_packet - 8))]
    over = encode_tcp(9, 2, b"x" * (max_packet - 7))
    assert TcpDecoder(max_packet).feed(over) == [("too_large", 9, 2)]
    assert TcpDecoder(max_packet).feed(over[:8]) == [("too_large", 9, 2)]
    assert TcpDecoder(max_packet).feed(b"\xff\xff\xff\xff\x00\x01\x00\x02") == [("too_large", 1, 2)]


@pytest.mark.parametrize("length", range(0, 8))
def test_tcp_length_below_8_is_broken(length):
    good = encode_tcp(9, 1, b"{}")
    decoder = TcpDecoder(65536)
    length_field = tcp_header(length, 9, 2)[:4]      # broken once its 4 bytes came
    assert decoder.feed(good + length_field[:3]) == [("packet", 9, 1, b"{}")]
    assert decoder.feed(length_field[3:]) == [("broken",)]
    assert decoder.feed(good) == []


@PROPERTY
@given(prefix=st.lists(st.tuples(u16, u16, bodies), max_size=4), length=st.integers(0, 7),
       junk=st.binary(max_size=50), cuts=cut_points(2000))
def test_tcp_broken_after_good_packets(prefix, length, junk, cuts):
    stream = b"".join(encode_tcp(a, s, b) for a, s, b in prefix) + tcp_header(length, 0, 0)[:4] + junk
    decoder = TcpDecoder(65536)
    events = feed_chunks(decoder, stream, cuts)
    assert events == [("packet", a, s, b) for a, s, b in prefix] + [("broken",)]


def test_tcp_incomplete_header_waits():
    decoder = TcpDecoder(65536)
    packet = encode_tcp(5, 7, b'{"channel":"x"}')
    for i in range(len(packet) - 1):
        assert decoder.feed(packet[i:i + 1]) == []
    assert decoder.feed(packet[-1:]) == [("packet", 5, 7, b'{"channel":"x"}')]


@PROPERTY
@given(data=st.binary(max_size=3000), cuts=cut_points(3000))
def test_tcp_random_bytes_same_events_however_split(data, cuts):
    whole = TcpDecoder(1024).feed(data)
    assert feed_chunks(TcpDecoder(1024), data, cuts) == whole
    # at most one terminal event, and only at the end
    kinds = [e[0] for e in whole]
    assert all(k == "packet" for k in kinds[:-1])


# ---------------------------------------------------------- WebSocket ------

def client_message_frames(payload: bytes, splits: list[int], keys: list[bytes]) -> list[bytes]:
    """A binary message as masked client frames split at the given payload offsets."""
    points = sorted({p for p in splits if 0 <= p <= len(payload)})
    edges = [0] + points + [len(payload)]
    pieces = [payload[edges[i]:edges[i + 1]] for i in range(len(edges) - 1)]
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(ws_frame(2 if i == 0 else 0, piece, fin=i == len(pieces) - 1,
                               key=keys[i % len(keys)]))
    return frames


def masked(server_frame: bytes, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """Turn an (unmasked) server frame into the same frame sent masked by a client."""
    consumed, fin, rsv, opcode, payload = parse_server_frame(server_frame)
    assert consumed == len(server_frame)
    return ws_frame(opcode, payload, fin=fin, rsv=rsv, key=key)


# RFC 6455 7.4: codes a peer may send (1004-1006 and 1015 never appear in a close frame)
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
message_st = st.tuples(u16, u16, bodies, st.lists(st.integers(0, 400), max_size=3),
                       st.lists(st.tuples(st.sampled_from([9, 10]), st.binary(max_size=125)), max_size=2))
keys_st = st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=3)


@PROPERTY
@given(messages=st.lists(message_st, max_size=6), keys=keys_st, cuts=cut_points(6000),
       close=st.one_of(st.none(), st.tuples(st.sampled_from(VALID_CLOSE_CODES), st.text(max_size=30))))
def test_ws_split_anywhere_with_fragments_and_controls(messages, keys, cuts, close):
    stream = b""
    expected: list[tuple] = []
    for action, seq, body, splits, controls in messages:
        payload = ws_message(action, seq, body)
        frames = client_message_frames(payload, splits, keys)
        for i, frame in enumerate(frames):
            stream += frame
            # control frames go between the fragments (and after a whole message)
            if i < len(controls):
                opcode, data = controls[i]
                stream += ws_frame(opcode, data, key=keys[0])
                if i < len(frames) - 1:
                    expected.append(("ping" if opcode == 9 else "pong", data))
                else:
                    expected.append(("packet", action, seq, body))
                    expected.append(("ping" if opcode == 9 else "pong", data))
            elif i == len(frames) - 1:
                expected.append(("packet", action, seq, body))
        # controls beyond the number of fragments are not sent
    if close is not None:
        code, reason = close[0], close[1].encode()[:123]
        if reason.decode(errors="ignore").encode() != reason:
            reason = b""                    # cut inside a character: keep the close valid
        stream += ws_frame(8, ws_close_payload(code, reason), key=keys[-1])
        expected.append(("close", code, reason))
    assert WsDecoder(1 << 20).feed(stream) == expected
    decoder = WsDecoder(1 << 20)
    assert feed_chunks(decoder, stream, cuts) == expected
    if close is not None:
        assert decoder.feed(ws_frame(2, b"\x00\x09\x00\x01")) == []


@PROPERTY
@given(action=u16, seq=u16, body=bodies, key=st.binary(min_size=4, max_size=4))
def test_ws_encode_round_trip(action, seq, body, key):
    frame = encode_ws(action, seq, body)
    consumed, fin, rsv, opcode, payload = parse_server_frame(frame)
    assert (consumed, fin, rsv, opcode) == (len(frame), True, 0, 2)
    assert payload == ws_message(action, seq, body)
    assert WsDecoder(1 << 20).feed(masked(frame, key)) == [("packet", action, seq, body)]


@pytest.mark.parametrize("payload_len,header", [
    (4, b"\x82\x04"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"), (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"), (70000, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
])
def test_ws_encode_length_forms(payload_len, header):
    body = bytes(range(256)) * (payload_len // 256 + 1)
    body = body[: payload_len - 4]
    frame = encode_ws(3, 4, body)
    assert frame[: len(header)] == header
    assert frame[len(header):] == b"\x00\x03\x00\x04" + body
    # and a client sending the same sizes (7-, 16-, 64-bit lengths) is decoded
    assert WsDecoder(1 << 20).feed(masked(frame)) == [("packet", 3, 4, body)]


@pytest.mark.parametrize("sizes", [[126, 65536], [65536, 3], [0, 70000, 0], [125, 126, 127], [2, 2, 200]])
def test_ws_fragments_of_every_length_form(sizes):
    total = sum(sizes)
    body = bytes(i % 251 for i in range(total - 4))
    payload = ws_message(7, 8, body) if total >= 4 else b""
    splits, acc = [], 0
    for size in sizes[:-1]:
        acc += size
        splits.append(acc)
    frames = client_message_frames(payload, splits, [b"\x01\x02\x03\x04"])
    assert len(frames) == len(sizes)
    events = feed_chunks(WsDecoder(1 << 20), b"".join(frames), [1, 5, 130, 70000])
    assert events == [("packet", 7, 8, body)]


def test_ws_encode_control():
    assert encode_ws_control(9, b"abc") == b"\x89\x03abc"
    assert encode_ws_control(10, b"") == b"\x8a\x00"
    assert encode_ws_control(8, ws_close_payload(1009)) == b"\x88\x02\x03\xf1"


def test_ws_control_frames_decoded():
    decoder = WsDecoder(65536)
    stream = ws_frame(9, b"hello") + ws_frame(10, b"") + ws_frame(9, b"x" * 125)
    assert decoder.feed(stream) == [("ping", b"hello"), ("pong", b""), ("ping", b"x" * 125)]


@pytest.mark.parametrize("payload,expected", [
    (b"", ("close", None, b"")),
    (ws_close_payload(1000), ("close", 1000, b"")),
    (ws_close_payload(1001, b"going away"), ("close", 1001, b"going away")),
])
def test_ws_close_frame(payload, expected):
    decoder = WsDecoder(65536)
    assert decoder.feed(ws_frame(8, payload) + ws_frame(2, b"\x00\x09\x00\x01")) == [expected]
    assert decoder.feed(ws_frame(2, b"\x00\x09\x00\x01")) == []


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_ws_close_with_invalid_code_is_1002(code):
    decoder = WsDecoder(65536)
    assert decoder.feed(ws_frame(8, ws_close_payload(code))) == [("error", 1002)]


@PROPERTY
@given(reason=st.binary(max_size=123))
def test_ws_close_reason_must_be_utf8(reason):
    events = WsDecoder(65536).feed(ws_frame(8, ws_close_payload(1000, reason)))
    try:
        reason.decode("utf-8")          # strict: no overlongs, surrogates or > U+10FFFF
    except UnicodeDecodeError:
        assert events == [("error", 1007)]
    else:
        assert events == [("close", 1000, reason)]


PROTOCOL_ERRORS = {
    "unmasked": ws_frame(2, b"\x00\x09\x00\x01", mask=False),
    "rsv1": ws_frame(2, b"\x00\x09\x00\x01", rsv=4),
    "rsv2": ws_frame(2, b"\x00\x09\x00\x01", rsv=2),
    "rsv3": ws_frame(2, b"\x00\x09\x00\x01", rsv=1),
    "opcode3": ws_frame(3, b"\x00\x09\x00\x01"),
    "opcode7": ws_frame(7, b"\x00\x09\x00\x01"),
    "opcode11": ws_frame(11, b""),
    "opcode15": ws_frame(15, b""),
    "continuation_first": ws_frame(0, b"\x00\x09\x00\x01"),
    "binary_inside_fragmented": ws_frame(2, b"\x00\x09", fin=False) + ws_frame(2, b"\x00\x01"),
    "text_inside_fragmented": ws_frame(2, b"\x00\x09", fin=False) + ws_frame(1, b"hi"),
    "fragmented_ping": ws_frame(9, b"x", fin=False),
    "long_ping": ws_frame(9, b"x" * 126),
    "long_close": ws_frame(8, b"\x03\xe8" + b"x" * 124),
    "close_one_byte": ws_frame(8, b"\x03"),
    "empty_message": ws_frame(2, b""),
    "message_1_byte": ws_frame(2, b"\x00"),
    "message_3_bytes": ws_frame(2, b"\x00\x09\x00"),
    "fragmented_3_bytes": ws_frame(2, b"\x00", fin=False) + ws_frame(0, b"\x09\x00"),
    "nonminimal_16": ws_frame(2, b"\x00\x09\x00\x01", length_bytes=2),
    "nonminimal_64": ws_frame(2, b"\x00\x09\x00\x01" + b"x" * 200, length_bytes=8),
    "length_msb_set": b"\x82\xff\x80" + b"\x00" * 7 + b"\x01\x02\x03\x04",
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_ERRORS))
def test_ws_protocol_errors(name):
    good = ws_frame(2, b"\x00\x09\x00\x05{}")
    decoder = WsDecoder(1 << 20)
    events = decoder.feed(good + PROTOCOL_ERRORS[name])
    assert events == [("packet", 9, 5, b"{}"), ("error", 1002)]
    assert decoder.feed(good) == []


def test_ws_text_message_is_1003():
    decoder = WsDecoder(65536)
    assert decoder.feed(ws_frame(2, b"\x00\x09\x00\x01") + ws_frame(1, b"{}")) == [
        ("packet", 9, 1, b""), ("error", 1003)]
    assert decoder.feed(ws_frame(2, b"\x00\x09\x00\x01")) == []
    # a fragmented text message is refused at its first frame
    assert WsDecoder(65536).feed(ws_frame(1, b"{", fin=False)) == [("error", 1003)]


def test_ws_too_large_boundary():
    max_packet = 100
    body_ok = b"y" * (max_packet - 8)          # message = 4 + body = max - 4 -> packet = max
    assert WsDecoder(max_packet).feed(ws_frame(2, b"\x00\x09\x00\x01" + body_ok)) == [
        ("packet", 9, 1, body_ok)]
    too_big = ws_frame(2, b"\x00\x09\x00\x02" + body_ok + b"y")
    assert WsDecoder(max_packet).feed(too_big) == [("too_large", 9, 2)]
    # decided from the header and the first 4 payload bytes, without the rest
    decoder = WsDecoder(max_packet)
    header_len = 2 + 4
    assert decoder.feed(too_big[: header_len + 4]) == [("too_large", 9, 2)]
    assert decoder.feed(too_big[header_len + 4:]) == []


def test_ws_too_large_huge_declared_length():
    frame_head = ws_header(OP_BINARY, 1 << 40) + b"\x00\x00\x00\x00"     # a zero key: no masking
    assert WsDecoder(65536).feed(frame_head + b"\x00\x02\x00\x03") == [("too_large", 2, 3)]


@pytest.mark.parametrize("first", [0, 2, 4, 50])
def test_ws_too_large_across_fragments(first):
    max_packet = 100
    key = b"\x9a\xbc\xde\xf0"
    payload = b"\x00\x04\x00\x06" + b"z" * 150
    frames = client_message_frames(payload, [first], [key])
    decoder = WsDecoder(max_packet)
    assert feed_chunks(decoder, b"".join(frames), [3, 9, 60]) == [("too_large", 4, 6)]


def test_ws_ping_between_fragments_does_not_disturb_reassembly():
    stream = (ws_frame(2, b"\x00\x09", fin=False) + ws_frame(9, b"p1") + ws_frame(0, b"\x00\x03", fin=False)
              + ws_frame(10, b"p2") + ws_frame(0, b'{"a":1}'))
    assert WsDecoder(65536).feed(stream) == [("ping", b"p1"), ("pong", b"p2"), ("packet", 9, 3, b'{"a":1}')]


@PROPERTY
@given(data=st.binary(max_size=2000), cuts=cut_points(2000))
def test_ws_random_bytes_same_events_however_split(data, cuts):
    whole = WsDecoder(1024).feed(data)
    assert feed_chunks(WsDecoder(1024), data, cuts) == whole
    kinds = [e[0] for e in whole]
    assert all(k in ("packet", "ping", "pong") for k in kinds[:-1])


def test_ws_mask_applied_per_frame_offset():
    # a 4-byte key applied from payload offset 0 in every frame, not continued across frames
    key1, key2 = b"\x01\x02\x03\x04", b"\xf0\xe0\xd0\xc0"
    stream = ws_frame(2, b"\x00\x09\x00", fin=False, key=key1) + ws_frame(0, b"\x08abcdef", key=key2)
    assert WsDecoder(65536).feed(stream) == [("packet", 9, 8, b"abcdef")]
    assert apply_mask(apply_mask(b"hello", key1), key1) == b"hello"


def test_handshake_response_rfc_example():
    request = (b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    response = handshake_response(request)
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("request_head", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"\x00\xff garbage\r\n\r\n",
])
def test_handshake_response_refuses_bad_requests(request_head):
    assert handshake_response(request_head) is None
