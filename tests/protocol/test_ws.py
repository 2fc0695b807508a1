"""WebSocket transport through a real client library (``websockets``)."""
from __future__ import annotations

import time

import pytest

from tests.support.client import Closed, error_code, unique

MAX_PACKET = 65536


def test_message_of_exactly_max_packet_is_accepted(server):
    client = server.ws_client()
    body = b"{" + b" " * (MAX_PACKET - 4 - 4 - 2) + b"}"     # message = 4 + body = max - 4
    assert error_code(client.request(9, body)[2]) is None


def test_too_large_answered_then_close_1009(server):
    client = server.ws_client()
    client.send(9, {}, seq=1)
    body = b"{" + b" " * (MAX_PACKET - 4 - 4 - 1) + b"}"     # packet measured as on TCP: max + 1
    client.send(4, body, seq=31)
    closed = client.wait_closed()
    assert closed.code == 1009
    responses = [(a, s, error_code(b)) for a, s, b in client.received]
    assert responses == [(9, 1, None), (4, 31, "too_large")]


def test_text_message_closed_with_1003(server):
    client = server.ws_client()
    client.ok(9)
    client.send_text('{"name": "text"}')
    closed = client.wait_closed()
    assert closed.code == 1003


def test_any_path_works(server):
    client = server.ws_client(path="/some/deep/path?x=1&y=2")
    client.login(unique("path"))


def test_ping_answered_by_pong(server):
    client = server.ws_client()
    waiter = client.ws.ping(b"are you there")
    assert waiter.wait(5), "no pong for a ping"
    client.ok(9)


def test_permessage_deflate_offered(server):
    """A client offering permessage-deflate still works (the server may decline)."""
    alice = server.ws_client(compression="deflate")
    alice.login(unique("deflate"))
    bob = server.ws_client(compression="deflate")
    bob.login(unique("deflate"))
    text = "compress me " * 2000
    alice.ok(2, {"receiverId": bob.user_id, "content": text})
    action, msg = bob.recv_push()
    assert action == 101 and msg["content"] == text
    page = bob.ok(5, {"userId": alice.user_id})
    assert page["messages"][0]["content"] == text


def test_many_small_messages_in_a_burst(server):
    client = server.ws_client()
    seqs = [client.send(9, {}) for _ in range(300)]
    for seq in seqs:
        assert error_code(client.wait_response(seq)[2]) is None


def test_message_shorter_than_4_bytes_closes_1002(server):
    client = server.ws_client()
    client.ok(9)
    client.send_raw(b"\x00\x09\x00")
    assert client.wait_closed().code == 1002


def test_close_handshake_from_client(server):
    client = server.ws_client()
    client.login(unique("bye"))
    client.ws.close(1000, "done")
    assert client.ws.close_code == 1000, f"server answered the close with {client.ws.close_code}"
    with pytest.raises(Closed):
        client.request(9)


def test_max_packet_flag_applies_to_websocket(start_server):
    srv = start_server(["--max-packet", "100"])
    client = srv.ws_client()
    assert error_code(client.request(9, b"{" + b" " * (100 - 8 - 2) + b"}")[2]) is None
    client.send(9, b"{" + b" " * (100 - 8 - 1) + b"}", seq=5)
    closed = client.wait_closed()
    assert closed.code == 1009
    assert [(a, s, error_code(b)) for a, s, b in client.received][-1] == (9, 5, "too_large")


def test_ws_and_tcp_share_users(server):
    ws = server.ws_client()
    ws.login(unique("both"))
    tcp = server.tcp_client()
    assert tcp.login("both again", token=ws.token)["id"] == ws.user_id
    tcp.ok(2, {"receiverId": ws.user_id, "content": "to my other device"})
    action, msg = ws.recv_push()
    assert action == 101 and msg["content"] == "to my other device"
    # raw timing sanity: a round trip on loopback is fast
    start = time.monotonic()
    for _ in range(20):
        ws.ok(9)
    assert time.monotonic() - start < 2
