"""permessage-deflate (RFC 7692) on WebSocket: negotiation, compressed sessions, limits.

Against real servers: the third-party ``websockets`` client offering the
extension, and ``RawWs`` for the frames and offers a library would not send.
The codec functions behind it get hypothesis properties at the end.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.core.test_reactor_broadcast as broadcast_harness
from zim._codec import WsDecoder, deflate_message, encode_ws_deflated, negotiate_deflate
from zim.client import parse_ws_message
from tests.support.client import RawWs, WsClient, decode_body, error_code, parse_server_frame, unique, ws_frame, ws_message

AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
RSV1 = 4                                # the rsv field of ws_frame / read_frame: RSV1 is its top bit
MAX_PACKET = 65536
TAIL = b"\x00\x00\xff\xff"

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_WORDS = ("the meeting is moved to thursday because half of the team will be at the conference "
          "and we still need to review the budget before anyone books flights so please send "
          "your notes by tomorrow morning").split()


def prose(length: int, seed: int = 0) -> str:
    """English-like text of exactly ``length`` characters (compresses like chat does)."""
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) <= length:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:length]


def compress(message: bytes) -> bytes:
    """A client's compressed message, as RFC 7692 puts it on the wire (tail dropped)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(TAIL)
    return data[:-4]


def inflate(payload: bytes) -> bytes:
    """A fresh inflater per message: the server promised no context takeover."""
    return zlib.decompressobj(-15).decompress(payload + TAIL)


def raw_deflate(server, offer: str = OFFER) -> RawWs:
    ws = server.raw_ws()
    ws.handshake(extra=offer)
    return ws


def read_message(ws: RawWs) -> tuple[int, int, int, dict]:
    """(rsv, action, seq, body) of the next binary message, inflated if compressed."""
    fin, rsv, opcode, payload = ws.read_frame()
    assert fin and opcode == 2, (fin, opcode, payload[:40])
    assert rsv in (0, RSV1), rsv
    if rsv:
        payload = inflate(payload)
    action, seq, body = parse_ws_message(payload)
    return rsv, action, seq, decode_body(body)


def send_compressed(ws: RawWs, action: int, seq: int, body: dict | bytes) -> None:
    ws.send(ws_frame(2, compress(ws_message(action, seq, body)), rsv=RSV1))


def raw_login(ws: RawWs, name: str) -> str:
    send_compressed(ws, 1, 1, {"name": name})
    rsv, action, seq, body = read_message(ws)
    assert (action, seq, error_code(body)) == (1, 1, None), body
    return body["id"]


def expect_close(ws: RawWs, code: int) -> list:
    got, before = ws.read_close()
    assert got == code, f"close code {got}, expected {code}; frames before: {before}"
    ws.expect_eof()
    return before


# ------------------------------------------------------ a real client library


def test_websockets_client_session(server):
    """Login, DM, channel fan-out to deflate / plain WS / TCP members, history, large messages."""
    alice = server.ws_client(compression="deflate")
    bob = server.ws_client(compression="deflate")
    plain = server.ws_client()
    tcp = server.tcp_client()
    assert alice.ws.response.headers["Sec-WebSocket-Extensions"] == AGREED
    assert "Sec-WebSocket-Extensions" not in plain.ws.response.headers
    [extension] = alice.ws.protocol.extensions
    assert extension.name == "permessage-deflate" and extension.local_no_context_takeover
    for client in (alice, bob, plain, tcp):
        client.login(unique("deflate"))

    for content in ("hi", prose(100), prose(1000, 1), prose(60_000, 2)):
        alice.ok(2, {"receiverId": bob.user_id, "content": content})
        action, msg = bob.recv_push()
        assert action == 101 and msg["content"] == content
    assert bob.ok(5, {"userId": alice.user_id, "limit": 1})["messages"][0]["content"] == prose(60_000, 2)

    channel = unique("mixed")
    for client in (alice, bob, plain, tcp):
        client.ok(3, {"name": channel})
    sent = [prose(size, size) for size in (5, 100, 1000, 30_000)]
    for content in sent:
        alice.ok(4, {"channel": channel, "content": content})
    for member in (bob, plain, tcp):
        got = [member.recv_push() for _ in sent]
        assert [(a, m["content"]) for a, m in got] == [(102, c) for c in sent]
    alice.assert_no_push()
    page = tcp.ok(5, {"channel": channel})
    assert sorted(m["content"] for m in page["messages"]) == sorted(sent)


def test_websockets_client_sends_compressed_and_max_packet_holds(server):
    """The library compresses what it sends; a message whose inflated packet is
    exactly --max-packet passes, one byte more is too_large and close 1009."""
    client = server.ws_client(compression="deflate")
    body = b"{" + b" " * (MAX_PACKET - 4 - 4 - 2) + b"}"     # packet = max: compresses to ~100 bytes
    assert error_code(client.request(9, body)[2]) is None
    client.send(9, b"{" + b" " * (MAX_PACKET - 4 - 4 - 1) + b"}", seq=77)
    assert client.wait_closed().code == 1009
    assert [(a, s, error_code(b)) for a, s, b in client.received][-1] == (9, 77, "too_large")


# ------------------------------------------------------ on the wire, by hand


def test_handshake_answer_and_frames_on_the_wire(server):
    alice = raw_deflate(server)
    assert alice.headers["sec-websocket-extensions"] == AGREED
    plain = server.raw_ws().handshake()
    assert "sec-websocket-extensions" not in plain.headers
    alice_id = raw_login(alice, unique("wire"))
    plain.send_packet(1, 1, {"name": unique("wire")})
    assert error_code(plain.read_packet()[2]) is None

    channel = unique("wire")
    for ws in (alice, plain):
        send_compressed(ws, 3, 2, {"name": channel}) if ws is alice else ws.send_packet(3, 2, {"name": channel})
        assert error_code(read_message(ws)[3]) is None
    long_text, short_text = prose(500), "ok"
    plain.send_packet(4, 3, {"channel": channel, "content": long_text})
    assert error_code(plain.read_packet()[2]) is None
    rsv, action, seq, msg = read_message(alice)
    assert (rsv, action, seq, msg["content"], msg["channel"]) == (RSV1, 102, 0, long_text, channel)
    plain.send_packet(4, 4, {"channel": channel, "content": short_text})
    assert error_code(plain.read_packet()[2]) is None
    rsv, action, _, msg = read_message(alice)
    assert (action, msg["content"]) == (102, short_text)
    assert rsv == RSV1      # the push's JSON is over the threshold even with 2 bytes of content

    send_compressed(alice, 9, 5, {})                          # the answer is tiny: sent as is
    assert read_message(alice)[:3] == (0, 9, 5)
    alice.send_packet(9, 6, {})                               # uncompressed requests still work
    assert read_message(alice)[:3] == (0, 9, 6)
    plain.send_packet(2, 7, {"receiverId": alice_id, "content": long_text})
    assert error_code(plain.read_packet()[2]) is None
    rsv, action, _, msg = read_message(alice)
    assert (rsv, action, msg["content"]) == (RSV1, 101, long_text)


def test_server_max_window_bits_honoured(server):
    """A client that allows the server a 512-byte window gets longer messages uncompressed."""
    ws = raw_deflate(server, "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n")
    assert ws.headers["sec-websocket-extensions"] == AGREED + "; server_max_window_bits=9"
    me = raw_login(ws, unique("window"))
    sender = server.tcp_client()
    sender.login(unique("sender"))
    for content, compressed in ((prose(200), True), (prose(2000), False)):
        sender.ok(2, {"receiverId": me, "content": content})
        rsv, action, _, body = read_message(ws)
        assert (action, body["content"]) == (101, content)
        assert rsv == (RSV1 if compressed else 0)


def test_fragmented_compressed_message(server):
    ws = raw_deflate(server)
    data = compress(ws_message(9, 8, {"pad": prose(300)}))
    ws.send(ws_frame(2, data[:3], fin=False, rsv=RSV1) + ws_frame(9, b"mid") + ws_frame(0, data[3:20], fin=False)
            + ws_frame(0, data[20:]))
    assert ws.read_frame() == (True, 0, 10, b"mid")
    rsv, action, seq, body = read_message(ws)
    assert (action, seq, error_code(body)) == (9, 8, None)


def test_compressed_frame_without_negotiation_closes_1002(server):
    ws = server.raw_ws().handshake()
    ws.send(ws_frame(2, compress(ws_message(9, 1, {})), rsv=RSV1))
    expect_close(ws, 1002)
    server.assert_alive()


@pytest.mark.parametrize("frames", [
    [ws_frame(9, b"x", rsv=RSV1)],                                          # a control frame
    [ws_frame(2, compress(ws_message(9, 1, {}))[:2], fin=False, rsv=RSV1),   # a continuation
     ws_frame(0, compress(ws_message(9, 1, {}))[2:], rsv=RSV1)],
    [ws_frame(2, compress(ws_message(9, 1, {})), rsv=RSV1 | 2)],            # RSV2 with RSV1
], ids=["control", "continuation", "rsv2"])
def test_rsv_misuse_with_deflate_closes_1002(server, frames):
    ws = raw_deflate(server)
    ws.send(b"".join(frames))
    expect_close(ws, 1002)


def test_data_that_does_not_inflate_closes_1007(server):
    ws = raw_deflate(server)
    ws.send(ws_frame(2, b"\xff\xff\xff\xff\xff\xff", rsv=RSV1))
    expect_close(ws, 1007)


def test_context_takeover_by_the_client_is_refused(server):
    """Each message must inflate on its own (client_no_context_takeover): one that
    refers back into the previous message is not deflate data here."""
    ws = raw_deflate(server)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    message = ws_message(9, 1, b'{"x":"' + prose(400).encode() + b'"}')
    first = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
    second = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)     # mostly a back-reference
    ws.send(ws_frame(2, first[:-4], rsv=RSV1))
    assert read_message(ws)[1:3] == (9, 1)
    ws.send(ws_frame(2, second[:-4], rsv=RSV1))
    expect_close(ws, 1007)


@pytest.mark.parametrize("inflated_size", [MAX_PACKET - 3, 10_000_000, 200_000_000])
def test_zip_bomb_is_too_large(server, inflated_size):
    """The max packet size holds for the inflated size: too_large, then close 1009."""
    ws = raw_deflate(server)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = ws_message(4, 42, b'{"content":"')
    chunks = [compressor.compress(head)]
    zeros = b"0" * (1 << 20)
    left = inflated_size - len(head)
    while left > 0:
        chunks.append(compressor.compress(zeros[:min(left, len(zeros))]))
        left -= len(zeros)
    data = b"".join(chunks) + compressor.flush(zlib.Z_SYNC_FLUSH)
    ws.send(ws_frame(2, data[:-4], rsv=RSV1))
    rsv, action, seq, body = read_message(ws)
    assert (action, seq, error_code(body)) == (4, 42, "too_large")
    expect_close(ws, 1009)
    server.assert_alive()
    healthy = raw_deflate(server)
    send_compressed(healthy, 9, 1, {})
    assert read_message(healthy)[1:3] == (9, 1)


def test_compressed_frame_longer_than_allowed_is_refused_early(server):
    """A compressed frame too long to be a valid message is refused from its first bytes."""
    ws = raw_deflate(server)
    data = compress(ws_message(4, 43, os.urandom(MAX_PACKET + 10_000)))     # incompressible
    ws.send(ws_frame(2, data, rsv=RSV1)[:4096])                             # the rest never comes
    rsv, action, seq, body = read_message(ws)
    assert (action, seq, error_code(body)) == (4, 43, "too_large")
    expect_close(ws, 1009)


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_max_window_bits=7",
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=010",
    "permessage-deflate; client_max_window_bits=abc",
    "permessage-deflate; server_no_context_takeover=1",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; unknown_param",
    "permessage-deflate;",
    "permessage-deflate; ;",
    "permessage-deflate server_no_context_takeover",
    'permessage-deflate; server_max_window_bits="1 0"',
    "x-webkit-deflate-frame",
    "\x01\x02 garbage",
    "",
])
def test_unacceptable_offers_upgrade_without_extension(server, offer):
    ws = server.raw_ws()
    ws.handshake(extra=f"Sec-WebSocket-Extensions: {offer}\r\n")
    assert "sec-websocket-extensions" not in ws.headers
    ws.send_packet(9, 1, {})
    assert ws.read_packet()[:2] == (9, 1)


@pytest.mark.parametrize("headers, agreed", [
    ("Sec-WebSocket-Extensions: permessage-deflate; foo, permessage-deflate; server_max_window_bits=12\r\n",
     AGREED + "; server_max_window_bits=12"),
    ("Sec-WebSocket-Extensions: x-other\r\nSec-WebSocket-Extensions: permessage-deflate\r\n", AGREED),
    ('Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits="10"; '
     "server_no_context_takeover; client_no_context_takeover\r\n", AGREED),
], ids=["second-offer", "two-header-lines", "all-parameters"])
def test_first_acceptable_offer_wins(server, headers, agreed):
    ws = raw_deflate(server, headers)
    assert ws.headers["sec-websocket-extensions"] == agreed
    send_compressed(ws, 9, 1, {})
    assert read_message(ws)[1:3] == (9, 1)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ws_deflate_off_negotiates_nothing(start_server, workers):
    srv = start_server(["--ws-deflate", "off", "--workers", workers])
    client = srv.ws_client(compression="deflate")
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    client.login(unique("off"))
    client.ok(2, {"receiverId": client.user_id, "content": prose(2000)})
    ws = raw_deflate(srv)
    assert "sec-websocket-extensions" not in ws.headers
    ws.send(ws_frame(2, compress(ws_message(9, 1, {})), rsv=RSV1))
    expect_close(ws, 1002)


@pytest.mark.parametrize("value", ["maybe", "1", ""])
def test_ws_deflate_flag_rejects_bad_values(tmp_path, zim_env, value):
    result = subprocess.run([sys.executable, "-m", "zim", "--data", str(tmp_path), "--ws-deflate", value],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path, env=zim_env)
    assert result.returncode == 2
    assert "--ws-deflate" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_app_run_rejects_a_non_boolean_ws_deflate(tmp_path):
    from zim import App

    with pytest.raises(ValueError, match="ws_deflate"):
        App().run(tcp="127.0.0.1:0", ws=None, data=str(tmp_path), ws_deflate="off")


# ------------------------------------------------------ the shared broadcast buffer, in process


class DeflateHarness(broadcast_harness.Harness):
    """test_reactor_broadcast's reactor harness with members 4 and 5 (of the
    WebSocket ones 3, 4, 5) offering permessage-deflate: one pass mixes pushes in
    the TCP, plain and compressed framings of the shared pass buffer."""

    def connect(self, index: int, kind: str):
        if kind == "ws" and index in DEFLATE_MEMBERS:
            client = WsClient(broadcast_harness.HOST, self.ports[kind], timeout=10, compression="deflate")
            assert client.ws.response.headers["Sec-WebSocket-Extensions"] == AGREED
            client.send(broadcast_harness.HELLO, {"index": index}, seq=1)
            assert client._recv_packet(time.monotonic() + 10)[0] == broadcast_harness.HELLO
            return client
        return super().connect(index, kind)


DEFLATE_MEMBERS = (4, 5)


@pytest.fixture(scope="module")
def deflate_harness():
    running = DeflateHarness()
    yield running
    running.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts=st.lists(st.lists(broadcast_harness.operation, min_size=1, max_size=25), min_size=1, max_size=3))
def test_broadcast_framings_mixed_in_one_pass(deflate_harness, scripts):
    """Short pushes go plain, longer ones compressed, replies and user pushes in
    between: every member still receives exactly its packets, in order."""
    before = deflate_harness.reactor.stats()["deflated_out"]
    deflate_harness.run_scripts([[list(op) for op in script] for script in scripts])
    for index, stream in broadcast_harness.expected_streams(scripts).items():
        assert broadcast_harness.receive(deflate_harness.clients[index], len(stream)) == stream, f"member {index}"
    long_to_deflate = any(op[0] == "b" and op[4] >= 200
                          and set(broadcast_harness.GROUPS[op[1]]) & set(DEFLATE_MEMBERS) - {op[3]}
                          for script in scripts for op in script)
    if long_to_deflate:
        assert deflate_harness.reactor.stats()["deflated_out"] > before


def test_slices_of_different_framings_are_never_joined(deflate_harness):
    """A member sharing the compressed framing's [0, n) must not take the plain
    framing's [n, ...) as the rest of its slice, even where the offsets meet."""
    push, plain_ws, deflate_member = broadcast_harness.PUSH_GROUP, 3, DEFLATE_MEMBERS[0]
    first = broadcast_harness.payload(100, 3000)        # compressed for the deflate members
    compressed_frame = len(encode_ws_deflated(deflate_message(push, 0, first)))
    pad = compressed_frame - len(broadcast_harness.payload(101, 0)) - 6     # 2-byte header, action, seq
    assert 0 <= pad and len(broadcast_harness.payload(101, pad)) + 4 < 64, "sizes no longer line up"
    script = [
        ["b", 0, 100, plain_ws, 3000],          # deflate members share compressed [0, n)
        ["b", 0, 101, deflate_member, pad],     # the plain member shares plain [0, n)
        ["b", 0, 102, plain_ws, 5],             # plain [n, ...): a copy for the deflate member
    ]
    deflate_harness.run_scripts([script])
    for index, stream in broadcast_harness.expected_streams([script]).items():
        assert broadcast_harness.receive(deflate_harness.clients[index], len(stream)) == stream, f"member {index}"


# ------------------------------------------------------ codec properties

window_bits = st.integers(min_value=8, max_value=15)
offer_params = st.lists(st.sampled_from(["server_no_context_takeover", "client_no_context_takeover",
                                         "server_max_window_bits", "client_max_window_bits"]),
                        unique=True)


@PROPERTY
@given(params=offer_params, server_bits=window_bits, client_bits=st.one_of(st.none(), window_bits),
       quote=st.booleans(), spaces=st.sampled_from(["", " ", "\t "]))
def test_negotiate_accepts_every_valid_offer(params, server_bits, client_bits, quote, spaces):
    parts = ["permessage-deflate"]
    for name in params:
        if name == "server_max_window_bits":
            parts.append(f'{name}={"%s" % server_bits if not quote else chr(34) + str(server_bits) + chr(34)}')
        elif name == "client_max_window_bits" and client_bits is not None:
            parts.append(f"{name}={client_bits}")
        else:
            parts.append(name)
    agreed, bits = negotiate_deflate(f"{spaces};{spaces}".join(parts))
    expected_bits = server_bits if "server_max_window_bits" in params else 15
    assert bits == expected_bits
    assert agreed == AGREED + (f"; server_max_window_bits={server_bits}" if "server_max_window_bits" in params
                               else "")


@PROPERTY
@given(junk=st.text(max_size=60))
def test_negotiate_never_fails_and_answers_only_what_it_may(junk):
    agreed, bits = negotiate_deflate(junk)
    assert (agreed is None and bits == 0) or (agreed.startswith(AGREED) and 8 <= bits <= 15)
    if agreed is not None and "server_max_window_bits" not in junk:
        assert bits == 15 and agreed == AGREED


@PROPERTY
@given(action=st.integers(0, 0xFFFF), seq=st.integers(0, 0xFFFF),
       body=st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(str.encode),
                      st.integers(0, 5000).map(lambda n: prose(n, n).encode())))
def test_deflate_message_round_trip(action, seq, body):
    payload = deflate_message(action, seq, body)
    message = ws_message(action, seq, body)
    if payload is None:         # short, or not made smaller: goes out as it is
        assert len(message) < 64 or len(compress(message)) >= len(message) - 16
        return
    assert len(payload) < len(message)
    assert inflate(payload) == message
    consumed, fin, rsv, opcode, framed = parse_server_frame(encode_ws_deflated(payload))
    assert (fin, rsv, opcode, framed) == (True, RSV1, 2, payload)
    # a client sending the same bytes (masked) is understood by the server's decoder
    masked = ws_frame(2, payload, rsv=RSV1)
    assert WsDecoder(1 << 20, deflate=True).feed(masked) == [("packet", action, seq, body)]


def compressed_frames(message: bytes, splits: list[int]) -> bytes:
    data = compress(message)
    points = sorted({p for p in splits if 0 < p < len(data)})
    edges = [0, *points, len(data)]
    return b"".join(ws_frame(2 if i == 0 else 0, data[edges[i]:edges[i + 1]], fin=i == len(edges) - 2,
                             rsv=RSV1 if i == 0 else 0) for i in range(len(edges) - 1))


@PROPERTY
@given(messages=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=2000),
                                   st.booleans(), st.lists(st.integers(1, 400), max_size=3)), max_size=6),
       cuts=st.lists(st.integers(0, 8000), max_size=12))
def test_decoder_mixed_compressed_and_plain_split_anywhere(messages, cuts):
    stream = b"".join(compressed_frames(ws_message(a, s, b), splits) if deflated else ws_frame(2, ws_message(a, s, b))
                      for a, s, b, deflated, splits in messages)
    expected = [("packet", a, s, b) for a, s, b, _, _ in messages]
    decoder = WsDecoder(1 << 20, deflate=True)
    events, last = [], 0
    for cut in sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]:
        events += decoder.feed(stream[last:cut])
        last = cut
    assert events == expected


@PROPERTY
@given(max_packet=st.integers(8, 5000), size=st.integers(0, 20_000), filler=st.sampled_from([b"a", b"ab c"]))
def test_decoder_limits_the_inflated_size(max_packet, size, filler):
    body = (filler * (size // len(filler) + 1))[:size]
    message = ws_message(4, 5, body)
    events = WsDecoder(max_packet, deflate=True).feed(ws_frame(2, compress(message), rsv=RSV1))
    if len(message) + 4 > max_packet:       # measured as on TCP: the 4-byte length is counted
        assert events == [("too_large", 4, 5)]
    else:
        assert events == [("packet", 4, 5, body)]
