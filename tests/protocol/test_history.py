"""docs/protocol.md: history (action 5) of channels and of direct conversations,
paging and pages bounded by bytes,
over both transports (the ``transport`` fixture), on the shared server: every
test uses fresh users and channel names, so they do not see each other's data.
The helpers they share are in tests/protocol/helpers.py.
"""
from __future__ import annotations

import pytest

from tests.protocol.helpers import check_message, history, offline_user, send_many
from tests.support.client import unique


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
