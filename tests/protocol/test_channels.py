"""docs/protocol.md: channels: subscribe (3), send (4), unsubscribe (6), fan-out
and gap-free seq,
over both transports (the ``transport`` fixture), on the shared server: every
test uses fresh users and channel names, so they do not see each other's data.
The helpers they share are in tests/protocol/helpers.py.
"""
from __future__ import annotations

import pytest

from tests.protocol.helpers import check_message, history, second_device, send_many
from tests.support.client import unique


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
