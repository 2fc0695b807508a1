"""Compression on TCP, asked for at login (docs/protocol.md, "Compression on TCP").

Against real servers (the shared one, 1 and 3 workers, and two of their own:
``--tcp-deflate off`` and a high ``--tcp-deflate-min``), with a TCP client that
keeps every packet as it came over the wire, so each test sees both what was
compressed and what it inflates to. The codec's compressor gets hypothesis
properties at the end.
"""
from __future__ import annotations

import socket
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.test_ws_deflate import prose
from tests.support.client import TcpClient, decode_body, tcp_packet, unique
from tests.support.servers import HOST
from zim._codec import deflate_tcp_body
from zim.client import SEQ_DEFLATED, ProtocolError, connect, inflate_body, split_tcp, take_tcp_packet
from zim.client.codec import SEQ_MASK
from zim.protocol import HEARTBEAT, HISTORY, LOGIN, PULL, SEND_CHANNEL, SEND_USER, SUBSCRIBE

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULT_MIN = 64                # --tcp-deflate-min's default
HIGH_MIN = 700                  # the module server's --tcp-deflate-min


class WireTcp(TcpClient):
    """The tests' TCP client (``compress``: asking at login), keeping in ``wire``
    every packet as it came, (action, seq, body) before inflating."""

    def __init__(self, port: int, compress: bool = True, timeout: float = 5.0) -> None:
        super().__init__(HOST, port, timeout, None, compress)
        self.wire: list[tuple[int, int, bytes]] = []

    def _recv_packet(self, deadline: float) -> tuple[int, int, bytes]:
        while (packet := take_tcp_packet(self._buf, self.max_packet)) is None:
            self._buf += self._read(deadline)
        self.wire.append(packet)
        action, seq, body = packet
        if self.compress and seq & SEQ_DEFLATED:
            return action, seq & SEQ_MASK, inflate_body(body)
        return packet

    def came_compressed(self, action: int) -> list[bool]:
        """For each packet of ``action`` so far, whether it came compressed."""
        return [bool(seq & SEQ_DEFLATED) for got, seq, _ in self.wire if got == action]


@pytest.fixture
def wire(server):
    """``wire(compress=True, name=...)``: a logged-in WireTcp on the shared server."""
    opened: list[WireTcp] = []

    def make(compress: bool = True, name: str | None = None, login: bool = True) -> WireTcp:
        client = WireTcp(server.tcp_port, compress)
        opened.append(client)
        if login:
            client.login(name or unique("u"))
        return client

    yield make
    for client in opened:
        client.close()
    server.assert_alive()


@pytest.fixture(scope="module")
def off_server(start_module_server):
    return start_module_server(flags=("--tcp-deflate", "off", "--channel-rate", "0"))


@pytest.fixture(scope="module")
def high_min_server(start_module_server):
    return start_module_server(flags=("--tcp-deflate-min", str(HIGH_MIN), "--channel-rate", "0"))


def join_all(room: str, *clients) -> None:
    for client in clients:
        client.ok(SUBSCRIBE, {"name": room})


def assert_nothing_compressed(client: WireTcp) -> None:
    """A large message sent and read back: nothing so far, nor these, came compressed."""
    room = unique("room")
    join_all(room, client)
    client.ok(SEND_CHANNEL, {"channel": room, "content": prose(2000)})
    client.ok(HISTORY, {"channel": room})
    assert all(not seq & SEQ_DEFLATED for _, seq, _ in client.wire)


# -- negotiation -------------------------------------------------------------------
def test_login_agrees_then_answers_after_it_come_compressed(wire):
    alice = wire(login=False)
    answer = alice.login(unique("alice"))
    assert answer["compress"] == "deflate" and alice.compressed
    action, seq, body = alice.wire[-1]
    assert (action, seq) == (LOGIN, 1) and decode_body(body) == answer    # the answer itself: plain
    room = unique("room")
    join_all(room, alice)
    for i in range(3):
        alice.ok(SEND_CHANNEL, {"channel": room, "content": prose(300, i)})
    page = alice.ok(HISTORY, {"channel": room})
    assert [m["content"] for m in page["messages"]] == [prose(300, i) for i in range(3)]
    action, seq, body = alice.wire[-1]
    assert (action, seq & SEQ_MASK) == (HISTORY, alice._seq) and seq & SEQ_DEFLATED
    assert len(body) < len(inflate_body(body)) // 2
    alice.ok(HEARTBEAT)                 # {"time": ...}: under the floor, plain
    assert not alice.wire[-1][1] & SEQ_DEFLATED


def test_without_asking_nothing_changes(wire):
    """A client of before (znet's) never asks: no field, no compressed packet."""
    bob = wire(compress=False, login=False)
    answer = bob.login(unique("bob"))
    assert "compress" not in answer and not bob.compressed
    assert_nothing_compressed(bob)


@pytest.mark.parametrize("asked", ["gzip", "DEFLATE", ""])
def test_another_algorithm_is_refused_without_an_error(wire, asked):
    carol = wire(compress=False, login=False)
    answer = carol.ok(LOGIN, {"name": unique("carol"), "compress": asked})
    assert "compress" not in answer
    assert_nothing_compressed(carol)


def test_a_compress_field_that_is_not_a_string_is_a_bad_request(wire):
    dave = wire(compress=False, login=False)
    assert dave.error(LOGIN, {"name": unique("dave"), "compress": True}) == "bad_request"
    assert "compress" not in dave.ok(LOGIN, {"name": unique("dave")})    # and the connection goes on


def test_websocket_login_asking_is_refused(server):
    """WebSocket has permessage-deflate; asking there gets an answer without the field."""
    client = server.ws_client()
    answer = client.ok(LOGIN, {"name": unique("ws"), "compress": "deflate"})
    assert "compress" not in answer
    client.ok(HEARTBEAT)


def test_the_public_blocking_client_asks_and_inflates(server):
    with pytest.raises(ValueError, match="tcp://"):
        connect(f"ws://{HOST}:{server.ws_port}/", compress=True)
    with connect(f"tcp://{HOST}:{server.tcp_port}", compress=True) as client:
        assert client.login(unique("pub"))["compress"] == "deflate" and client.compressed
        room = unique("room")
        client.ok(SUBSCRIBE, {"name": room})
        client.ok(SEND_CHANNEL, {"channel": room, "content": prose(1000)})
        assert client.ok(HISTORY, {"channel": room})["messages"][0]["content"] == prose(1000)


def test_tcp_deflate_off_refuses(off_server):
    client = WireTcp(off_server.tcp_port)
    try:
        answer = client.login(unique("off"))
        assert "compress" not in answer and not client.compressed
        assert_nothing_compressed(client)
    finally:
        client.close()


# -- what comes compressed decodes to what comes plain ---------------------------------
def test_answers_pushes_and_broadcasts_decode_as_the_plain_ones(wire, server):
    """One channel of a compressed TCP member, a plain TCP one and a WebSocket one with
    permessage-deflate: every member gets the same bodies; the sender's DMs too."""
    packed, plain = wire(), wire(compress=False)
    ws = server.ws_client(compression="deflate")
    ws.login(unique("ws"))
    sender = wire(compress=False)
    room = unique("mixed")
    join_all(room, packed, plain, ws, sender)
    contents = [prose(length, length) for length in (10, 100, 1000, 5000)]
    for content in contents:
        sender.ok(SEND_CHANNEL, {"channel": room, "content": content})
        sender.ok(SEND_USER, {"receiverId": packed.user_id, "content": content})
        sender.ok(SEND_USER, {"receiverId": plain.user_id, "content": content})
    got = {name: client.recv_pushes(2 * len(contents) if name != "ws" else len(contents))
           for name, client in (("packed", packed), ("plain", plain), ("ws", ws))}
    channel = {name: [body for action, body in pushes if action == 102] for name, pushes in got.items()}
    assert channel["packed"] == channel["plain"] == channel["ws"]
    assert [body["content"] for body in channel["packed"]] == contents
    direct = {name: [body["content"] for action, body in got[name] if action == 101]
              for name in ("packed", "plain")}
    assert direct["packed"] == direct["plain"] == contents
    # every push of the compressed member came compressed (each body is over 64 bytes)
    assert packed.came_compressed(102) == [True] * 4 and packed.came_compressed(101) == [True] * 4
    assert plain.came_compressed(102) == [False] * 4
    # answers: a history page and a mailbox pull, the same inflated as plain
    assert packed.ok(HISTORY, {"channel": room}) == plain.ok(HISTORY, {"channel": room})
    pulled = {name: client.ok(PULL, {}) for name, client in (("packed", packed), ("plain", plain))}
    assert [m["content"] for m in pulled["packed"]["messages"]] == \
        [m["content"] for m in pulled["plain"]["messages"]] == contents
    assert packed.came_compressed(HISTORY) == packed.came_compressed(PULL) == [True]
    assert plain.came_compressed(HISTORY) == plain.came_compressed(PULL) == [False]


def test_mailbox_pushes_at_login_come_compressed_after_the_plain_answer(wire):
    sender = wire(compress=False)
    name = unique("away")
    first = wire(name=name)
    token, receiver_id = first.token, first.user_id
    first.close()
    for i in range(3):
        sender.ok(SEND_USER, {"receiverId": receiver_id, "content": prose(400, i)})
    back = wire(login=False)
    answer = back.login(name, token)
    assert answer["compress"] == "deflate"
    pushes = back.recv_pushes(3)
    assert [body["content"] for _, body in pushes] == [prose(400, i) for i in range(3)]
    assert [(action, bool(seq & SEQ_DEFLATED)) for action, seq, _ in back.wire[:4]] == \
        [(LOGIN, False)] + [(101, True)] * 3


def test_bodies_under_the_floor_go_plain(high_min_server):
    """--tcp-deflate-min 700: a push of 600-odd bytes goes plain, one of 1,000-odd compressed."""
    clients = [WireTcp(high_min_server.tcp_port, compress) for compress in (True, False)]
    try:
        packed, sender = clients
        packed.login(unique("packed"))
        sender.login(unique("sender"))
        room = unique("room")
        join_all(room, packed, sender)
        for content in (prose(400), prose(800), prose(200)):
            sender.ok(SEND_CHANNEL, {"channel": room, "content": content})
        pushes = packed.recv_pushes(3)
        assert [body["content"] for _, body in pushes] == [prose(400), prose(800), prose(200)]
        sizes = [(len(body) if not seq & SEQ_DEFLATED else len(inflate_body(body)), bool(seq & SEQ_DEFLATED))
                 for action, seq, body in packed.wire if action == 102]
        assert [compressed for _, compressed in sizes] == [False, True, False]
        assert sizes[0][0] < HIGH_MIN <= sizes[1][0]
    finally:
        for client in clients:
            client.close()


def test_a_burst_of_large_pushes_to_many_compressed_members(wire, server):
    """40 compressed members and 5 plain ones, 30 pushes of 2,000 characters sent
    back to back: every member gets every one, in order, intact."""
    members = [wire() for _ in range(40)] + [wire(compress=False) for _ in range(5)]
    sender = wire(compress=False)
    room = unique("burst")
    join_all(room, sender, *members)
    contents = [prose(2000, i) for i in range(30)]
    for content in contents:
        sender.send(SEND_CHANNEL, {"channel": room, "content": content})
    for member in members:
        pushes = member.recv_pushes(len(contents), timeout=20)
        assert [body["content"] for _, body in pushes] == contents
        assert [body["seq"] for _, body in pushes] == list(range(1, 31))
    assert all(members[0].came_compressed(102)) and not any(members[-1].came_compressed(102))
    wire_bytes = sum(len(body) for action, _, body in members[0].wire if action == 102)
    plain_bytes = sum(len(body) for action, _, body in members[-1].wire if action == 102)
    assert wire_bytes < plain_bytes / 2


# -- what a client sends --------------------------------------------------------------
def test_a_client_seq_with_bit_15_is_echoed_and_nothing_breaks(server):
    """Clients never send compressed packets: seq bit 15 from a client is a seq like
    any other, echoed in its answer (so a client must keep to 1..32767)."""
    sock = socket.create_connection(server.tcp, timeout=5)
    try:
        sock.sendall(tcp_packet(LOGIN, 1, {"name": unique("odd"), "compress": "deflate"})
                     + tcp_packet(HEARTBEAT, 0x8005, b"{}")
                     + tcp_packet(HISTORY, 0x8006, b"x" * 200))     # not JSON, bit 15 set
        buffer, packets = bytearray(), []
        while len(packets) < 3:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            buffer += chunk
            packets += split_tcp(buffer)
    finally:
        sock.close()
    (login, one, answer), (heartbeat, odd, time_body), (history, odd2, error) = packets
    assert (login, one, decode_body(answer)["compress"]) == (LOGIN, 1, "deflate")
    assert (heartbeat, odd, set(decode_body(time_body))) == (HEARTBEAT, 0x8005, {"time"})
    assert (history, odd2) == (HISTORY, 0x8006)
    try:                # plain or compressed: the seq cannot tell (the client broke the rule)
        body = decode_body(error)
    except ProtocolError:
        body = decode_body(inflate_body(error))
    assert body["error"]["code"] == "bad_request"
    server.assert_alive()


# -- the codec ---------------------------------------------------------------------
@PROPERTY
@given(st.binary(max_size=20000), st.integers(0, 300))
def test_tcp_deflate_inflates_to_the_body_as_one_final_stream(body, floor):
    compressed = deflate_tcp_body(body, floor)
    if len(body) < floor or not body:
        assert compressed is None
        return
    if compressed is None:      # it would not shrink: data that deflate barely helps
        assert len(zlib.compress(body)) > 0.9 * len(body)
        return
    assert len(body) >= floor and len(compressed) < len(body)
    inflater = zlib.decompressobj(-15)
    assert inflater.decompress(compressed) == body
    assert inflater.eof and not inflater.unused_data    # ends in a final block, nothing after
    assert inflate_body(compressed) == body


@PROPERTY
@given(st.text(max_size=3000))
def test_chat_text_at_the_floor_and_above_shrinks(text):
    body = ('{"content":"' + text + " " + prose(200) + '"}').encode()
    compressed = deflate_tcp_body(body)
    assert compressed is not None and inflate_body(compressed) == body


def test_short_bodies_go_plain_at_the_default_floor():
    assert deflate_tcp_body(b"a" * (DEFAULT_MIN - 1)) is None
    assert deflate_tcp_body(b"a" * DEFAULT_MIN) is not None
    assert deflate_tcp_body(b"") is None and deflate_tcp_body(b"", 0) is None


def test_the_splitter_inflates_and_refuses_what_does_not():
    body = b'{"content":"' + prose(500).encode() + b'"}'
    packed = deflate_tcp_body(body)
    stream = bytearray(tcp_packet(102, SEQ_DEFLATED | 7, packed)
                       + tcp_packet(9, 3, b"{}"))
    assert split_tcp(bytearray(stream), inflate=True) == [(102, 7, body), (9, 3, b"{}")]
    assert split_tcp(bytearray(stream))[0] == (102, SEQ_DEFLATED | 7, packed)     # not asked: as it came
    for bad in (b"\xff" * 20, packed[:-3], packed + b"x", zlib.compress(body)):
        with pytest.raises(ProtocolError):
            split_tcp(bytearray(tcp_packet(102, SEQ_DEFLATED, bad)), inflate=True)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = bomb.compress(b"\0" * (1 << 22)) + bomb.flush()
    with pytest.raises(ProtocolError, match="past"):
        inflate_body(bomb, 1 << 20)
