"""docs/protocol.md: direct messages (action 2) and the mailbox (pushed at login,
pulled with action 7, acknowledged with action 8),
over both transports (the ``transport`` fixture), on the shared server: every
test uses fresh users and channel names, so they do not see each other's data.
The helpers they share are in tests/protocol/helpers.py.
"""
from __future__ import annotations

import pytest

from tests.protocol.helpers import check_message, history, offline_user, second_device, send_many
from tests.support.client import unique


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
