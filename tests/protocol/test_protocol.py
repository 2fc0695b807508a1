"""docs/protocol.md across actions: users of both transports talking, rate limiting,
connections coming and going, JSON edge cases. (Action by action:
test_login.py, test_direct_messages.py, test_channels.py, test_history.py.)

Over both transports (the ``transport`` fixture), on the shared server: every
test uses fresh users and channel names, so they do not see each other's data.
The helpers they share are in tests/protocol/helpers.py.
"""
from __future__ import annotations

from tests.protocol.helpers import history, second_device
from tests.support.client import error_code, unique


# ----------------------------------------------------------- cross-transport


def test_tcp_and_ws_users_talk_both_ways(connect):
    tcp_user = connect("tcp")
    tcp_user.login(unique("tcp"))
    ws_user = connect("ws")
    ws_user.login(unique("ws"))
    tcp_user.ok(2, {"receiverId": ws_user.user_id, "content": "tcp->ws"})
    action, msg = ws_user.recv_push()
    assert action == 101 and msg["content"] == "tcp->ws" and msg["sender"]["id"] == tcp_user.user_id
    ws_user.ok(2, {"receiverId": tcp_user.user_id, "content": "ws->tcp"})
    action, msg = tcp_user.recv_push()
    assert action == 101 and msg["content"] == "ws->tcp" and msg["sender"]["id"] == ws_user.user_id
    channel = unique("mixed")
    tcp_user.ok(3, {"name": channel})
    ws_user.ok(3, {"name": channel})
    # a user on both transports at once; its new device first gets the unacked mailbox
    ws_device = second_device(connect, tcp_user, "ws")
    action, msg = ws_device.recv_push()
    assert action == 101 and msg["content"] == "ws->tcp"
    tcp_user.ok(4, {"channel": channel, "content": "from tcp"})
    assert ws_user.recv_push()[1]["content"] == "from tcp"
    assert ws_device.recv_push()[1]["content"] == "from tcp"
    ws_user.ok(4, {"channel": channel, "content": "from ws"})
    assert tcp_user.recv_push()[1]["content"] == "from ws"
    assert ws_device.recv_push()[1]["content"] == "from ws"
    ws_user.assert_no_push()
    tcp_user.assert_no_push()


# ------------------------------------------------------------ rate limiting


def test_only_sends_are_rate_limited(connect):
    client = connect()
    client.login(unique("busy"))
    channel = unique("busy")
    seqs = [client.send(9, {}) for _ in range(500)]
    seqs += [client.send(3, {"name": channel}) for _ in range(100)]
    seqs += [client.send(5, {"channel": channel}) for _ in range(100)]
    seqs += [client.send(7, {}) for _ in range(100)]
    for seq in seqs:
        _, _, body = client.wait_response(seq, timeout=20)
        assert error_code(body) is None, body


def test_rate_limited_sends_leave_no_seq_gap(connect):
    client = connect()
    client.login(unique("flood"))
    peer = connect()
    peer.login(unique("peer"))
    seqs = [client.send(2, {"receiverId": peer.user_id, "content": str(i)}) for i in range(400)]
    stored = []
    for seq in seqs:
        _, _, body = client.wait_response(seq, timeout=20)
        code = error_code(body)
        assert code in (None, "rate_limited"), body
        if code is None:
            stored.append(body["seq"])
    assert stored == list(range(1, len(stored) + 1))
    client.sync()                           # still open after rate_limited


# ------------------------------------------------- connections come and go


def test_presence_survives_other_devices_closing(connect):
    """A user's remaining connections keep receiving when others close (FIN or reset)."""
    sender = connect()
    sender.login(unique("sender"))
    first = connect()
    first.login(unique("multi"))
    devices = [first] + [second_device(connect, first) for _ in range(4)]
    channel = unique("presence")
    first.ok(3, {"name": channel})
    sender.ok(3, {"name": channel})
    devices[1].close()
    devices[3].close()
    alive = [devices[0], devices[2], devices[4]]
    for round_, content in enumerate(["after two closed", "after the first closed too"]):
        result = sender.ok(2, {"receiverId": first.user_id, "content": content})
        sender.ok(4, {"channel": channel, "content": content})
        for device in alive:
            got = device.recv_pushes(2)
            assert [(a, m["content"]) for a, m in got] == [(101, content), (102, content)]
            assert got[0][1]["id"] == result["id"]
        if round_ == 0:
            alive[0].close()
            alive = alive[1:]
    # a new device still joins the set
    late = second_device(connect, first)
    late.recv_pushes(2)                     # the two unacked direct messages
    sender.ok(4, {"channel": channel, "content": "late"})
    assert late.recv_push()[1]["content"] == "late"


def test_reused_descriptor_gets_nothing_of_its_previous_owner(connect):
    """A closed connection's slot (often the same fd) must not deliver its old pushes."""
    channel = unique("reuse")
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    for _ in range(5):
        owner = connect()
        owner.login(unique("owner"))
        owner.ok(3, {"name": channel})
        owner_id = owner.user_id
        owner.close()
        sender.sync()
        newcomer = connect()
        newcomer.login(unique("newcomer"))
        sender.ok(4, {"channel": channel, "content": "for members only"})
        sender.ok(2, {"receiverId": owner_id, "content": "for the owner only"})
        newcomer.assert_no_push()


def test_huge_json_integers(connect):
    """Valid JSON integers beyond 64 bits: a limit above 100 counts as 100."""
    client = connect()
    client.login(unique("big"))
    channel = unique("bigint")
    client.ok(3, {"name": channel})
    client.ok(4, {"channel": channel, "content": "only"})
    page = client.ok(5, b'{"channel": "%s", "limit": 100000000000000000000000000000}' % channel.encode())
    assert [m["content"] for m in page["messages"]] == ["only"]
    page = client.ok(5, b'{"channel": "%s", "beforeSeq": 100000000000000000000000000000}' % channel.encode())
    assert [m["content"] for m in page["messages"]] == ["only"]
    assert len(client.ok(7, b'{"limit": 100000000000000000000000000000}')["messages"]) == 0


def test_long_channel_name(connect):
    """Channel names up to 256 characters work; longer ones are a clear bad_request."""
    longest = unique("long") + "-"
    longest += "n" * (256 - len(longest))
    client = connect()
    client.login(unique("long"))
    client.ok(3, {"name": longest})
    assert client.ok(4, {"channel": longest, "content": "x"})["seq"] == 1
    assert history(client, channel=longest)["messages"][0]["channel"] == longest
    body = client.request(3, {"name": longest + "x"})[2]
    assert error_code(body) == "bad_request"
    assert "256" in body["error"]["message"]

