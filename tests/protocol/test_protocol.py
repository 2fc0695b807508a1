"""docs/protocol.md, action by action, over both transports (the ``transport`` fixture).

All tests share one server process; every test uses fresh users and channel
names, so they do not see each other's data.
"""
from __future__ import annotations

import time

import pytest

from tests.support.client import ZimClient, error_code, unique

# ------------------------------------------------------------------ helpers


def check_message(msg: dict, *, content: str | None = None, sender: ZimClient | None = None,
                  channel: str | None = None, receiver_id: str | None = None) -> None:
    """A Message as docs/protocol.md defines it."""
    assert isinstance(msg.get("id"), str) and msg["id"].isdigit(), msg
    assert 0 < int(msg["id"]) < 1 << 64, msg
    assert type(msg.get("seq")) is int and msg["seq"] >= 1, msg
    assert type(msg.get("createdAt")) is int, msg
    assert abs(msg["createdAt"] - time.time() * 1000) < 60_000, f"createdAt is not server ms now: {msg}"
    assert isinstance(msg.get("content"), str), msg
    assert isinstance(msg.get("sender"), dict), msg
    assert isinstance(msg["sender"].get("id"), str) and isinstance(msg["sender"].get("name"), str), msg
    if content is not None:
        assert msg["content"] == content, msg
    if sender is not None:
        assert (msg["sender"]["id"], msg["sender"]["name"]) == (sender.user_id, sender.name), msg
    if channel is not None:
        assert msg.get("channel") == channel, msg
    if receiver_id is not None:
        assert msg.get("receiverId") == receiver_id, msg


def second_device(connect, first: ZimClient, kind: str | None = None) -> ZimClient:
    """Another connection of the same user (logged in with its token)."""
    other = connect(kind)
    result = other.login(first.name, token=first.token)
    assert result["id"] == first.user_id
    return other


def offline_user(connect, name: str | None = None) -> tuple[str, str, str]:
    """A user that exists but has no connection: (id, token, name)."""
    client = connect()
    client.login(name or unique("off"))
    ident = (client.user_id, client.token, client.name)
    client.close()
    return ident


def send_many(client: ZimClient, action: int, bodies: list[dict]) -> list[dict]:
    """Pipeline requests, then collect their responses in order (all must succeed)."""
    seqs = [client.send(action, body) for body in bodies]
    results = []
    for seq in seqs:
        got_action, _, result = client.wait_response(seq, timeout=20)
        assert got_action == action
        assert error_code(result) is None, result
        results.append(result)
    return results


def history(client: ZimClient, **query) -> dict:
    result = client.ok(5, query)
    assert isinstance(result.get("messages"), list), result
    assert type(result.get("hasMore")) is bool, result
    return result


# -------------------------------------------------------------------- login


def test_login_returns_id_and_token(connect):
    client = connect()
    result = client.login(unique("alice"))
    assert set(result) >= {"id", "token"}
    other = connect()
    assert other.login(unique("bob"))["id"] != result["id"]
    # the first thing a fresh user receives is the login response (no mailbox yet)
    assert client.received[0][0] == 1 and len(client.received) == 1


@pytest.mark.parametrize("name", ["a", "x" * 64, "é" * 64, "😀" * 64, "名字", " spaced name "])
def test_login_name_accepted(connect, name):
    connect().login(name)


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x" * 65}, {"name": "é" * 65}, {"name": 5}, {"name": None},
    {"name": ["a"]}, {"name": {"a": 1}}, {"name": True},
    {"name": "ok", "token": 5}, {"name": "ok", "token": None}, {"name": "ok", "token": ["t"]},
    {"name": "ok", "token": {"t": 1}},
    {"token": "whatever"},
])
def test_login_bad_request(connect, body):
    client = connect()
    assert client.error(1, body) == "bad_request"
    assert client.error(2, {"receiverId": "1", "content": "x"}) == "not_logged_in"
    client.login(unique("after"))


@pytest.mark.parametrize("raw", [
    b"not json", b"[1,2]", b"null", b'"name"', b"42", b"\xff\xfe{}", b'{"name":"a"} trailing',
    b'{"name":"\xff"}', b"{", b"[" * 5000 + b"]" * 5000,
])
def test_login_body_not_an_object(connect, raw):
    client = connect()
    assert client.error(1, raw) == "bad_request"
    client.login(unique("after"))


def test_login_forged_tokens_unauthorized(connect):
    real = connect()
    real.login(unique("real"))
    token = real.token
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    client = connect()
    for forged in ["forged", "x" * 200, tampered, token[::-1], token + "x", "0." + token]:
        assert client.error(1, {"name": "mallory", "token": forged}) == "unauthorized", forged
        # still not logged in, and the connection is still usable
        assert client.error(3, {"name": unique("c")}) == "not_logged_in"
    assert client.error(1, {"name": "mallory", "token": ""}) in ("unauthorized", "bad_request")
    client.login(unique("later"))


def test_token_resumes_same_user_and_updates_name(connect):
    first = connect()
    first.login(unique("old-name"))
    user_id, token = first.user_id, first.token
    first.close()
    again = connect()
    new_name = unique("new-name")
    result = again.login(new_name, token=token)
    assert result["id"] == user_id
    # the returned token is valid too
    third = connect()
    assert third.login(new_name, token=result["token"])["id"] == user_id
    # the display name is the new one on what the user sends
    peer = connect()
    peer.login(unique("peer"))
    again.ok(2, {"receiverId": peer.user_id, "content": "who am I"})
    _, push = peer.recv_push()
    assert (push["sender"]["id"], push["sender"]["name"]) == (user_id, new_name)


def test_second_login_is_bad_request(connect):
    client = connect()
    client.login(unique("once"))
    user_id = client.user_id
    assert client.error(1, {"name": unique("twice")}) == "bad_request"
    assert client.error(1, {"name": "x", "token": client.token}) == "bad_request"
    # still logged in as the first user
    peer = connect()
    peer.login(unique("peer"))
    client.ok(2, {"receiverId": peer.user_id, "content": "still me"})
    _, push = peer.recv_push()
    assert push["sender"]["id"] == user_id


@pytest.mark.parametrize("action", [2, 3, 4, 5, 6, 7, 8, 10, 11])
def test_actions_need_login(connect, action):
    client = connect()
    valid = {2: {"receiverId": "1", "content": "x"}, 3: {"name": "c"}, 4: {"channel": "c", "content": "x"},
             5: {"channel": "c"}, 6: {"name": "c"}, 7: {}, 8: {"ids": []}, 10: {}, 11: {}}[action]
    assert client.error(action, valid) == "not_logged_in"
    # login is checked before the body's shape
    assert client.error(action, b"not json") == "not_logged_in"
    assert client.error(action, b"[]") == "not_logged_in"
    assert client.error(action, {}) == "not_logged_in"


@pytest.mark.parametrize("action", [0, 12, 50, 99, 100, 101, 102, 103, 1000, 32767, 0x8000, 0xFFFF])
def test_unknown_action_checked_first(connect, action):
    client = connect()
    # before login, and with a body that is not even JSON: unknown_action wins
    got, _, body = client.request(action, b"\xff garbage")
    assert got == action and error_code(body) == "unknown_action"
    client.login(unique("u"))
    got, _, body = client.request(action, {})
    assert got == action and error_code(body) == "unknown_action"


def test_heartbeat_before_and_after_login(connect):
    client = connect()
    for logged_in in (False, True):
        if logged_in:
            client.login(unique("hb"))
        result = client.ok(9)
        assert type(result.get("time")) is int
        assert abs(result["time"] - time.time() * 1000) < 60_000
        assert client.ok(9, {})["time"] >= result["time"]


@pytest.mark.parametrize("seq", [1, 2, 255, 256, 32767, 32768, 40000, 65535])
def test_seq_echoed_unchanged(connect, seq):
    client = connect()
    action, got_seq, body = client.request(9, {}, seq=seq)
    assert (action, got_seq) == (9, seq) and error_code(body) is None
    action, got_seq, body = client.request(2, {}, seq=seq)
    assert (action, got_seq) == (2, seq) and error_code(body) == "not_logged_in"


def test_every_request_exactly_one_response(connect):
    client = connect()
    requests = [(9, {}), (2, {}), (77, {}), (1, b"nope"), (1, {"name": unique("p")}), (1, {"name": "x"}),
                (3, {"name": unique("c")}), (5, {}), (7, {}), (8, {"ids": []}), (9, {})]
    seqs = [client.send(action, body) for action, body in requests]
    codes = []
    for (action, _), seq in zip(requests, seqs):
        got_action, _, body = client.wait_response(seq)
        assert got_action == action
        codes.append(error_code(body))
    assert codes == [None, "not_logged_in", "unknown_action", "bad_request", None, "bad_request",
                     None, "bad_request", None, None, None]
    client.sync()
    assert not client._responses, f"unexpected extra responses: {client._responses}"
    assert len([r for r in client.received if r[1] != 0]) == len(requests) + 1


def test_connection_stays_open_after_each_error(connect):
    client = connect()
    client.login(unique("err"))
    stranger_channel = unique("ch")
    owner = connect()
    owner.login(unique("owner"))
    owner.ok(3, {"name": stranger_channel})
    expected = [
        (1, {"name": "again"}, "bad_request"),
        (1234, {}, "unknown_action"),
        (2, {"receiverId": "999999999999", "content": "x"}, "not_found"),
        (4, {"channel": stranger_channel, "content": "x"}, "forbidden"),
        (5, {"channel": stranger_channel}, "forbidden"),
        (6, {"name": unique("nochannel")}, "not_found"),
        (2, b"{bad", "bad_request"),
    ]
    for action, body, code in expected:
        assert client.error(action, body) == code, (action, body)
        client.sync()


# ------------------------------------------------------ send user message


def test_direct_message_delivery(connect):
    alice = connect()
    alice.login(unique("alice"))
    alice_phone = second_device(connect, alice)
    bob = connect()
    bob.login(unique("bob"))
    bob_phone = second_device(connect, bob)
    result = alice.ok(2, {"receiverId": bob.user_id, "content": "hello bob"})
    assert isinstance(result.get("id"), str) and result["id"].isdigit()
    assert result.get("seq") == 1
    for device in (bob, bob_phone, alice_phone):
        action, msg = device.recv_push()
        assert action == 101
        check_message(msg, content="hello bob", sender=alice, receiver_id=bob.user_id)
        assert (msg["id"], msg["seq"]) == (result["id"], result["seq"])
    # not echoed to the connection that sent it
    alice.assert_no_push()
    for device in (bob, bob_phone, alice_phone):
        device.assert_no_push(0)


@pytest.mark.parametrize("body", [
    {}, {"content": "x"}, {"receiverId": "1"}, {"receiverId": "", "content": "x"},
    {"receiverId": 5, "content": "x"}, {"receiverId": None, "content": "x"},
    {"receiverId": "RECEIVER", "content": ""}, {"receiverId": "RECEIVER", "content": 5},
    {"receiverId": "RECEIVER", "content": None}, {"receiverId": "RECEIVER", "content": ["x"]},
    {"receiverId": ["RECEIVER"], "content": "x"},
])
def test_direct_message_bad_request(connect, body):
    client = connect()
    client.login(unique("s"))
    receiver = connect()
    receiver.login(unique("r"))
    body = {k: (receiver.user_id if v == "RECEIVER" else [receiver.user_id] if v == ["RECEIVER"] else v)
            for k, v in body.items()}
    assert client.error(2, body) == "bad_request"
    receiver.assert_no_push()


@pytest.mark.parametrize("receiver", ["999999999999", "abc", "0", "-5", "1" * 40, "1.5", " 1", "😀"])
def test_direct_message_unknown_receiver(connect, receiver):
    client = connect()
    client.login(unique("s"))
    assert client.error(2, {"receiverId": receiver, "content": "x"}) == "not_found"


def test_body_shape_checked_before_receiver(connect):
    client = connect()
    client.login(unique("s"))
    assert client.error(2, {"receiverId": "999999999999", "content": ""}) == "bad_request"
    assert client.error(2, {"receiverId": "999999999999"}) == "bad_request"


def test_send_to_self(connect):
    me = connect()
    me.login(unique("me"))
    my_phone = second_device(connect, me)
    result = me.ok(2, {"receiverId": me.user_id, "content": "note to self"})
    action, msg = my_phone.recv_push()
    assert action == 101
    check_message(msg, content="note to self", sender=me, receiver_id=me.user_id)
    assert msg["id"] == result["id"]
    me.assert_no_push()
    pulled = me.ok(7)["messages"]
    assert [m["id"] for m in pulled] == [result["id"]]
    assert [m["id"] for m in history(me, userId=me.user_id)["messages"]] == [result["id"]]


def test_offline_receiver_gets_mailbox_pushed_after_login(connect):
    bob_id, bob_token, bob_name = offline_user(connect)
    alice = connect()
    alice.login(unique("alice"))
    results = send_many(alice, 2, [{"receiverId": bob_id, "content": f"m{i}"} for i in range(3)])
    bob = connect()
    bob.login(bob_name, token=bob_token)
    # the login response comes first, then the mailbox
    assert bob.received[0][0] == 1 and bob.received[0][1] != 0
    pushes = bob.recv_pushes(3)
    assert [a for a, _ in pushes] == [101, 101, 101]
    assert [m["content"] for _, m in pushes] == ["m0", "m1", "m2"]
    assert [m["id"] for _, m in pushes] == [r["id"] for r in results]
    for _, msg in pushes:
        check_message(msg, sender=alice, receiver_id=bob_id)
    bob.assert_no_push()


def test_mailbox_push_cap_pull_and_ack(connect):
    bob_id, bob_token, bob_name = offline_user(connect)
    alice = connect()
    alice.login(unique("alice"))
    total = 130
    sent = send_many(alice, 2, [{"receiverId": bob_id, "content": f"n{i}"} for i in range(total)])
    assert [r["seq"] for r in sent] == list(range(1, total + 1))
    bob = connect()
    bob.login(bob_name, token=bob_token)
    pushes = bob.recv_pushes(100, timeout=10)
    assert [m["content"] for _, m in pushes] == [f"n{i}" for i in range(100)]
    bob.assert_no_push(0.3)
    # pulled: unacked, oldest first, default limit 100, never more than 100
    pulled = bob.ok(7)["messages"]
    assert [m["content"] for m in pulled] == [f"n{i}" for i in range(100)]
    assert len(bob.ok(7, {"limit": 1000})["messages"]) == 100
    assert [m["content"] for m in bob.ok(7, {"limit": 5})["messages"]] == [f"n{i}" for i in range(5)]
    for msg in pulled:
        check_message(msg, sender=alice, receiver_id=bob_id)
    assert bob.ok(8, {"ids": [m["id"] for m in pulled]}) == {}
    rest = bob.ok(7)["messages"]
    assert [m["content"] for m in rest] == [f"n{i}" for i in range(100, total)]
    bob.ok(8, {"ids": [m["id"] for m in rest]})
    assert bob.ok(7)["messages"] == []
    # an emptied mailbox pushes nothing at the next login
    again = connect()
    again.login(bob_name, token=bob_token)
    again.assert_no_push()


def test_mailbox_kept_until_ack(connect):
    bob = connect()
    bob.login(unique("bob"))
    alice = connect()
    alice.login(unique("alice"))
    first = alice.ok(2, {"receiverId": bob.user_id, "content": "one"})
    second = alice.ok(2, {"receiverId": bob.user_id, "content": "two"})
    assert [m["id"] for _, m in bob.recv_pushes(2)] == [first["id"], second["id"]]
    # received but not acked: pushed again on the next login
    laptop = connect()
    laptop.login(bob.name, token=bob.token)
    assert [m["id"] for _, m in laptop.recv_pushes(2)] == [first["id"], second["id"]]
    laptop.ok(8, {"ids": [first["id"]]})
    tablet = connect()
    tablet.login(bob.name, token=bob.token)
    assert [m["id"] for _, m in tablet.recv_pushes(1)] == [second["id"]]
    tablet.assert_no_push()
    assert [m["id"] for m in bob.ok(7)["messages"]] == [second["id"]]


def test_ack_ignores_unknown_and_foreign_ids(connect):
    bob = connect()
    bob.login(unique("bob"))
    carol = connect()
    carol.login(unique("carol"))
    alice = connect()
    alice.login(unique("alice"))
    to_bob = alice.ok(2, {"receiverId": bob.user_id, "content": "for bob"})
    to_carol = alice.ok(2, {"receiverId": carol.user_id, "content": "for carol"})
    # carol acks bob's message and junk: nothing of bob's goes away
    assert carol.ok(8, {"ids": [to_bob["id"], "12345", "nope", "", "9" * 30]}) == {}
    assert [m["id"] for m in bob.ok(7)["messages"]] == [to_bob["id"]]
    assert [m["id"] for m in carol.ok(7)["messages"]] == [to_carol["id"]]
    assert bob.ok(8, {"ids": []}) == {}
    assert bob.ok(8, {"ids": [to_bob["id"], to_bob["id"]]}) == {}
    assert bob.ok(7)["messages"] == []
    # acking twice is harmless
    assert bob.ok(8, {"ids": [to_bob["id"]]}) == {}
    # acked means out of the mailbox, not out of the conversation
    assert [m["id"] for m in history(bob, userId=alice.user_id)["messages"]] == [to_bob["id"]]


@pytest.mark.parametrize("body", [{}, {"ids": "1"}, {"ids": None}, {"ids": [1]}, {"ids": {"a": "b"}},
                                  {"ids": [None]}])
def test_ack_bad_request(connect, body):
    client = connect()
    client.login(unique("acker"))
    assert client.error(8, body) == "bad_request"


@pytest.mark.parametrize("body", [{"limit": "5"}, {"limit": None}, {"limit": [5]}, {"limit": 1.5},
                                  {"limit": True}])
def test_pull_bad_request(connect, body):
    client = connect()
    client.login(unique("puller"))
    assert client.error(7, body) == "bad_request"


# ---------------------------------------------------------------- channels


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": 1}, {"name": None}, {"name": ["c"]},
                                  {"name": "CHANNEL", "push": "yes"}, {"name": "CHANNEL", "push": 1},
                                  {"name": "CHANNEL", "push": None}, {"channel": "CHANNEL"}])
def test_subscribe_bad_request(connect, body):
    client = connect()
    client.login(unique("sub"))
    channel = unique("ch")
    body = {k: (channel if v == "CHANNEL" else v) for k, v in body.items()}
    assert client.error(3, body) == "bad_request"
    # nothing was created or joined
    assert client.error(6, {"name": channel}) == "not_found"


def test_subscribe_idempotent_creates_channel(connect):
    client = connect()
    client.login(unique("sub"))
    channel = unique("ch")
    assert client.ok(3, {"name": channel}) == {}
    assert client.ok(3, {"name": channel}) == {}
    assert client.ok(3, {"name": channel, "push": True}) == {}
    result = client.ok(4, {"channel": channel, "content": "first"})
    assert result["seq"] == 1
    page = history(client, channel=channel)
    assert [m["content"] for m in page["messages"]] == ["first"]


def test_channel_fanout(connect):
    channel = unique("room")
    alice = connect()
    alice.login(unique("alice"))
    alice_phone = second_device(connect, alice)
    alice.ok(3, {"name": channel})          # the phone was online already: it follows too
    bob = connect()
    bob.login(unique("bob"))
    bob.ok(3, {"name": channel})
    bob_phone = second_device(connect, bob)  # logs in after joining: follows at login
    quiet = connect()
    quiet.login(unique("quiet"))
    quiet.ok(3, {"name": channel, "push": False})
    outsider = connect()
    outsider.login(unique("outsider"))
    result = alice.ok(4, {"channel": channel, "content": "hi all"})
    assert result["seq"] == 1 and result["id"].isdigit()
    for device in (alice_phone, bob, bob_phone):
        action, msg = device.recv_push()
        assert action == 102
        check_message(msg, content="hi all", sender=alice, channel=channel)
        assert (msg["id"], msg["seq"]) == (result["id"], result["seq"])
    alice.assert_no_push()
    quiet.assert_no_push()
    outsider.assert_no_push(0)
    # the push:false member reads it from history and may send
    assert [m["id"] for m in history(quiet, channel=channel)["messages"]] == [result["id"]]
    reply = quiet.ok(4, {"channel": channel, "content": "read it"})
    assert reply["seq"] == 2
    for device in (alice, alice_phone, bob, bob_phone):
        action, msg = device.recv_push()
        assert action == 102 and msg["content"] == "read it"
    quiet.assert_no_push()


def test_repeated_subscribe_pushes_once(connect):
    """Subscribing again (from any of the user's connections) never doubles the pushes."""
    channel = unique("once")
    member = connect()
    member.login(unique("member"))
    phone = second_device(connect, member)
    for device in (member, phone, member, phone):
        device.ok(3, {"name": channel})
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    sender.ok(4, {"channel": channel, "content": "one"})
    for device in (member, phone):
        assert device.recv_push()[1]["content"] == "one"
        device.assert_no_push()


def test_subscribe_again_updates_push(connect):
    channel = unique("toggle")
    member = connect()
    member.login(unique("member"))
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    member.ok(3, {"name": channel, "push": False})
    sender.ok(4, {"channel": channel, "content": "1"})
    member.assert_no_push()
    member.ok(3, {"name": channel, "push": True})
    sender.ok(4, {"channel": channel, "content": "2"})
    assert member.recv_push()[1]["content"] == "2"
    member.ok(3, {"name": channel, "push": False})
    sender.ok(4, {"channel": channel, "content": "3"})
    member.assert_no_push()
    # a later login of a push:false member does not follow the channel either
    other = second_device(connect, member)
    sender.ok(4, {"channel": channel, "content": "4"})
    other.assert_no_push()
    member.assert_no_push(0)
    # subscribing without "push" means push on
    member.ok(3, {"name": channel})
    sender.ok(4, {"channel": channel, "content": "5"})
    assert member.recv_push()[1]["content"] == "5"
    assert other.recv_push()[1]["content"] == "5"


@pytest.mark.parametrize("body", [{}, {"channel": "CHANNEL"}, {"content": "x"}, {"channel": "", "content": "x"},
                                  {"channel": 5, "content": "x"}, {"channel": "CHANNEL", "content": ""},
                                  {"channel": "CHANNEL", "content": 7}, {"channel": "CHANNEL", "content": None},
                                  {"name": "CHANNEL", "content": "x"}])
def test_send_channel_bad_request(connect, body):
    client = connect()
    client.login(unique("s"))
    channel = unique("ch")
    client.ok(3, {"name": channel})
    body = {k: (channel if v == "CHANNEL" else v) for k, v in body.items()}
    assert client.error(4, body) == "bad_request"
    assert history(client, channel=channel)["messages"] == []


def test_send_channel_not_found_and_forbidden(connect):
    client = connect()
    client.login(unique("s"))
    assert client.error(4, {"channel": unique("nochannel"), "content": "x"}) == "not_found"
    channel = unique("private")
    owner = connect()
    owner.login(unique("owner"))
    owner.ok(3, {"name": channel})
    assert client.error(4, {"channel": channel, "content": "x"}) == "forbidden"
    owner.assert_no_push()
    # body shape comes before the channel's rules
    assert client.error(4, {"channel": unique("nochannel"), "content": ""}) == "bad_request"
    assert client.error(4, {"channel": channel, "content": ""}) == "bad_request"


def test_unsubscribe(connect):
    channel = unique("leave")
    member = connect()
    member.login(unique("member"))
    member_phone = second_device(connect, member)
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel})
    assert member.error(6, {"name": unique("nochannel")}) == "not_found"
    assert member.ok(6, {"name": channel}) == {}            # not a member: {}
    member.ok(3, {"name": channel})
    sender.ok(4, {"channel": channel, "content": "before"})
    assert member.recv_push()[1]["content"] == "before"
    assert member_phone.recv_push()[1]["content"] == "before"
    assert member_phone.ok(6, {"name": channel}) == {}
    sender.ok(4, {"channel": channel, "content": "after"})
    member.assert_no_push()
    member_phone.assert_no_push(0)
    assert member.error(4, {"channel": channel, "content": "x"}) == "forbidden"
    assert member.error(5, {"channel": channel}) == "forbidden"
    assert member.ok(6, {"name": channel}) == {}            # again: still {}
    member.ok(3, {"name": channel})
    assert [m["content"] for m in history(member, channel=channel)["messages"]] == ["before", "after"]


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": 3}, {"name": None}, {"channel": "x"}])
def test_unsubscribe_bad_request(connect, body):
    client = connect()
    client.login(unique("u"))
    assert client.error(6, body) == "bad_request"


def test_channel_seq_gap_free_and_ids_increasing(connect):
    channel = unique("seq")
    a = connect()
    a.login(unique("a"))
    b = connect()
    b.login(unique("b"))
    a.ok(3, {"name": channel})
    b.ok(3, {"name": channel})
    results = []
    for i in range(15):
        results += send_many(a, 4, [{"channel": channel, "content": f"a{i}"}])
        results += send_many(b, 4, [{"channel": channel, "content": f"b{i}"}])
    assert [r["seq"] for r in results] == list(range(1, 31))
    ids = [int(r["id"]) for r in results]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    page = history(a, channel=channel, limit=100)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 31))
    assert [m["id"] for m in page["messages"]] == [r["id"] for r in results]
    # another channel counts from 1
    other = unique("seq2")
    a.ok(3, {"name": other})
    assert a.ok(4, {"channel": other, "content": "x"})["seq"] == 1


def test_direct_seq_per_pair(connect):
    a = connect()
    a.login(unique("a"))
    b = connect()
    b.login(unique("b"))
    c = connect()
    c.login(unique("c"))
    assert a.ok(2, {"receiverId": b.user_id, "content": "1"})["seq"] == 1
    assert b.ok(2, {"receiverId": a.user_id, "content": "2"})["seq"] == 2
    assert a.ok(2, {"receiverId": b.user_id, "content": "3"})["seq"] == 3
    assert a.ok(2, {"receiverId": c.user_id, "content": "x"})["seq"] == 1
    assert c.ok(2, {"receiverId": b.user_id, "content": "y"})["seq"] == 1
    assert a.ok(2, {"receiverId": a.user_id, "content": "self"})["seq"] == 1
    pipelined = send_many(a, 2, [{"receiverId": b.user_id, "content": str(i)} for i in range(4, 20)])
    assert [r["seq"] for r in pipelined] == list(range(4, 20))


# ------------------------------------------------------------------ history


def test_history_default_limit_paging_and_has_more(connect):
    channel = unique("hist")
    client = connect()
    client.login(unique("h"))
    client.ok(3, {"name": channel})
    send_many(client, 4, [{"channel": channel, "content": f"c{i}"} for i in range(1, 26)])
    page = history(client, channel=channel)
    assert [m["seq"] for m in page["messages"]] == list(range(6, 26))
    assert page["hasMore"] is True
    for msg in page["messages"]:
        check_message(msg, content=f"c{msg['seq']}", sender=client)
    page = history(client, channel=channel, beforeSeq=6, limit=3)
    assert [m["seq"] for m in page["messages"]] == [3, 4, 5] and page["hasMore"] is True
    page = history(client, channel=channel, beforeSeq=3)
    assert [m["seq"] for m in page["messages"]] == [1, 2] and page["hasMore"] is False
    for before in (1, 0, -5):
        page = history(client, channel=channel, beforeSeq=before)
        assert page["messages"] == [] and page["hasMore"] is False, f"beforeSeq={before}: {page}"
    page = history(client, channel=channel, limit=25)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 26)) and page["hasMore"] is False
    page = history(client, channel=channel, limit=24)
    assert [m["seq"] for m in page["messages"]] == list(range(2, 26)) and page["hasMore"] is True
    page = history(client, channel=channel, beforeSeq=1000, limit=2)
    assert [m["seq"] for m in page["messages"]] == [24, 25] and page["hasMore"] is True
    page = history(client, channel=channel, limit=1)
    assert [m["seq"] for m in page["messages"]] == [25]


def test_history_limit_capped_at_100(connect):
    channel = unique("cap")
    client = connect()
    client.login(unique("h"))
    client.ok(3, {"name": channel})
    send_many(client, 4, [{"channel": channel, "content": str(i)} for i in range(105)])
    page = history(client, channel=channel, limit=1000)
    assert [m["seq"] for m in page["messages"]] == list(range(6, 106)) and page["hasMore"] is True
    page = history(client, channel=channel, limit=101)
    assert len(page["messages"]) == 100
    page = history(client, channel=channel, limit=100, beforeSeq=6)
    assert [m["seq"] for m in page["messages"]] == list(range(1, 6)) and page["hasMore"] is False


@pytest.mark.parametrize("query", [
    {}, {"channel": "CHANNEL", "userId": "SELF"}, {"channel": "CHANNEL", "limit": 0},
    {"channel": "CHANNEL", "limit": -1}, {"channel": "CHANNEL", "limit": "5"}, {"channel": "CHANNEL", "limit": 1.5},
    {"channel": "CHANNEL", "limit": True}, {"channel": "CHANNEL", "limit": None},
    {"channel": "CHANNEL", "beforeSeq": "3"}, {"channel": "CHANNEL", "beforeSeq": None},
    {"channel": "CHANNEL", "beforeSeq": 2.5}, {"channel": ""}, {"channel": 5}, {"userId": ""}, {"userId": 5},
    {"userId": "SELF", "limit": 0}, {"limit": 5},
])
def test_history_bad_request(connect, query):
    client = connect()
    client.login(unique("h"))
    channel = unique("ch")
    client.ok(3, {"name": channel})
    query = {k: (channel if v == "CHANNEL" else client.user_id if v == "SELF" else v) for k, v in query.items()}
    assert client.error(5, query) == "bad_request"


def test_history_includes_messages_before_join(connect):
    channel = unique("late")
    early = connect()
    early.login(unique("early"))
    early.ok(3, {"name": channel})
    send_many(early, 4, [{"channel": channel, "content": f"old{i}"} for i in range(3)])
    late = connect()
    late.login(unique("late"))
    assert late.error(5, {"channel": channel}) == "forbidden"
    late.ok(3, {"name": channel, "push": False})
    assert [m["content"] for m in history(late, channel=channel)["messages"]] == ["old0", "old1", "old2"]
    for msg in history(late, channel=channel)["messages"]:
        check_message(msg, sender=early)


def test_history_unknown_channel(connect):
    client = connect()
    client.login(unique("h"))
    assert client.error(5, {"channel": unique("nochannel")}) in ("not_found", "forbidden")


def test_history_shape_before_membership(connect):
    owner = connect()
    owner.login(unique("owner"))
    channel = unique("ch")
    owner.ok(3, {"name": channel})
    stranger = connect()
    stranger.login(unique("stranger"))
    assert stranger.error(5, {"channel": channel, "limit": "x"}) == "bad_request"
    assert stranger.error(5, {"channel": channel, "userId": owner.user_id}) == "bad_request"


def test_direct_history_both_parties(connect):
    a = connect()
    a.login(unique("a"))
    b = connect()
    b.login(unique("b"))
    c = connect()
    c.login(unique("c"))
    sent = []
    for i in range(5):
        sent.append(a.ok(2, {"receiverId": b.user_id, "content": f"ab{i}"}))
        sent.append(b.ok(2, {"receiverId": a.user_id, "content": f"ba{i}"}))
    c.ok(2, {"receiverId": b.user_id, "content": "from c"})
    for me, other in ((a, b), (b, a)):
        page = history(me, userId=other.user_id)
        assert [m["id"] for m in page["messages"]] == [r["id"] for r in sent]
        assert [m["seq"] for m in page["messages"]] == list(range(1, 11))
        assert page["hasMore"] is False
        for msg in page["messages"]:
            assert msg["sender"]["id"] == (a.user_id if msg["content"].startswith("ab") else b.user_id)
    page = history(a, userId=b.user_id, limit=3, beforeSeq=5)
    assert [m["seq"] for m in page["messages"]] == [2, 3, 4] and page["hasMore"] is True
    # c sees only its own conversation with b
    assert [m["content"] for m in history(c, userId=b.user_id)["messages"]] == ["from c"]
    assert history(c, userId=a.user_id)["messages"] == []
    assert c.error(5, {"userId": "999999999999"}) == "not_found"
    assert c.error(5, {"userId": "not-a-user"}) == "not_found"


def test_history_page_cut_short_under_1mib(connect):
    """Server packets stay under 1 MiB: a page of big messages is cut, hasMore says page on."""
    channel = unique("big")
    client = connect()
    client.login(unique("big"))
    client.ok(3, {"name": channel})
    count, size = 24, 60_000
    send_many(client, 4, [{"channel": channel, "content": f"{i:03d}" + "x" * size} for i in range(1, count + 1)])
    page = history(client, channel=channel, limit=100)   # the client asserts the packet is < 1 MiB
    seqs = [m["seq"] for m in page["messages"]]
    assert 0 < len(seqs) < count
    assert seqs == list(range(count - len(seqs) + 1, count + 1)), "the page must hold the newest messages"
    assert page["hasMore"] is True
    collected = seqs
    for _ in range(count):
        if not page["hasMore"]:
            break
        page = history(client, channel=channel, limit=100, beforeSeq=collected[0])
        seqs = [m["seq"] for m in page["messages"]]
        assert seqs and seqs == list(range(seqs[0], collected[0]))
        collected = seqs + collected
    assert collected == list(range(1, count + 1))
    for msg in page["messages"]:
        assert msg["content"] == f"{msg['seq']:03d}" + "x" * size


def test_mailbox_pull_cut_short_under_1mib(connect):
    bob_id, bob_token, bob_name = offline_user(connect)
    alice = connect()
    alice.login(unique("alice"))
    count, size = 24, 60_000
    send_many(alice, 2, [{"receiverId": bob_id, "content": f"{i:03d}" + "y" * size} for i in range(count)])
    bob = connect()
    bob.login(bob_name, token=bob_token)
    bob.sync()
    # the login pushes the oldest ones, about 1 MB of them (a page cut short); pull the rest
    pushed = [m["content"][:3] for action, m in bob.pushes if action == 101]
    assert 0 < len(pushed) < count and pushed == [f"{i:03d}" for i in range(len(pushed))]
    got: list[str] = []
    more = True
    for _ in range(count):
        answer = bob.ok(7, {"limit": 100})
        page = answer["messages"]
        if not page:
            assert answer["hasMore"] is False
            break
        assert more, "the previous page said there was no more"
        more = answer["hasMore"]
        assert got or (len(page) < count and more), "a mailbox page of 1.4 MB was not cut"
        got += [m["content"][:3] for m in page]
        bob.ok(8, {"ids": [m["id"] for m in page]})
    assert got == [f"{i:03d}" for i in range(count)]


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