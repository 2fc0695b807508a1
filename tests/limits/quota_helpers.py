"""What the store quota tests (test_store_quotas.py, test_store_quotas_servers.py,
test_store_quotas_redis.py) share: direct messages shaped as zim.im makes them
and their stored size, a client's requests against a server, and the checks of
a full mailbox and of the channel quota run on one server or across two.
"""
from __future__ import annotations

import orjson

from tests.support.client import ZimClient, error_code, unique

BIG = "x" * 1000


def message(number: int, content: str = "hi", sender: int = 1) -> dict:
    """A direct message shaped as zim.im makes it (seq 0 until stored)."""
    return {"id": str(10**15 + number), "seq": 0, "content": content,
            "sender": {"id": str(sender), "name": "alice"}, "createdAt": 1_700_000_000_000 + number}


def stored_size(msg: dict) -> int:
    """What the mailbox quota counts for a message: its JSON as stored."""
    return len(orjson.dumps(msg))


def login(srv, name: str | None = None, token: str | None = None, timeout: float = 10.0) -> ZimClient:
    client = srv.tcp_client(timeout=timeout)
    client.login(name or unique("u"), token=token)
    return client


def dm(sender: ZimClient, receiver: ZimClient, content: str = "hi") -> dict:
    return sender.call(2, {"receiverId": receiver.user_id, "content": content})


def pipelined(client: ZimClient, requests: list[tuple[int, dict]], timeout: float = 30.0) -> list[dict]:
    """Send every request at once, then read every answer (in request order)."""
    seqs = [client.send(action, body) for action, body in requests]
    return [client.wait_response(seq, timeout=timeout)[2] for seq in seqs]


def pull_all(client: ZimClient) -> list[dict]:
    page = client.ok(7, {"limit": 100})
    assert page["hasMore"] is False
    return page["messages"]


def pair_history(client: ZimClient, other: ZimClient) -> list[dict]:
    page = client.ok(5, {"userId": other.user_id, "limit": 100})
    assert page["hasMore"] is False
    return page["messages"]


def check_mailbox_full(srv, other_srv=None, max_mailbox: int = 5) -> None:
    """Fill a mailbox of ``max_mailbox``; the next DM is refused and nothing of it
    stored; the receiver finds exactly what was accepted; acks free room; seq has
    no hole. ``other_srv``: the receiver reads there (another node)."""
    other_srv = other_srv or srv
    alice, bob, carol = login(srv, "alice"), login(other_srv, "bob"), login(srv, "carol")
    sent = [alice.ok(2, {"receiverId": bob.user_id, "content": f"m{i}"}) for i in range(max_mailbox)]
    assert [answer["seq"] for answer in sent] == list(range(1, max_mailbox + 1))
    pushed = bob.recv_pushes(max_mailbox, timeout=10)   # (pushes cross nodes in their own time)
    assert [body["id"] for _, body in pushed] == [answer["id"] for answer in sent]
    for sender in (alice, carol, alice):
        result = dm(sender, bob, "one too many")
        assert error_code(result) == "mailbox_full", result
        assert "mailbox" in result["error"]["message"]
    bob.assert_no_push(0.3)                            # nothing of it pushed
    # the receiver logs in again (its mailbox is pushed at login) and pulls: exactly those
    again = login(other_srv, "bob", token=bob.token)
    again.sync()
    at_login = [body for action, body in again.pushes if action == 101]
    assert [m["id"] for m in at_login] == [answer["id"] for answer in sent]
    box = pull_all(again)
    assert [m["id"] for m in box] == [answer["id"] for answer in sent]
    assert [m["content"] for m in box] == [f"m{i}" for i in range(max_mailbox)]
    assert pull_all(carol) == []                        # carol's own mailbox: nothing bounced there
    # acks free room: two acked, two more accepted, then full again
    again.ok(8, {"ids": [box[0]["id"], box[1]["id"]]})
    more = [alice.ok(2, {"receiverId": bob.user_id, "content": f"more{i}"}) for i in range(2)]
    assert [answer["seq"] for answer in more] == [max_mailbox + 1, max_mailbox + 2]   # no seq was taken
    assert error_code(dm(carol, bob)) == "mailbox_full"
    assert [m["id"] for m in pull_all(again)] == [m["id"] for m in box[2:]] + [a["id"] for a in more]
    history = pair_history(alice, bob)
    assert [m["seq"] for m in history] == list(range(1, max_mailbox + 3))
    assert all(m["content"] != "one too many" for m in history)
    assert pair_history(carol, bob) == []
    # a DM to oneself counts against oneself
    for number in range(max_mailbox):
        carol.ok(2, {"receiverId": carol.user_id, "content": f"self{number}"})
    assert error_code(dm(carol, carol)) == "mailbox_full"
    assert [m["seq"] for m in pair_history(carol, carol)] == list(range(1, max_mailbox + 1))


def check_channel_quota(srv, other_srv=None, limit: int = 3) -> tuple[ZimClient, ZimClient, list[str]]:
    """``limit`` channels created, the next refused and not created; joining an
    existing one is fine; someone else may create the refused name; a pipelined
    pair of subscribes to one new channel creates nothing past the limit."""
    other_srv = other_srv or srv
    alice, bob = login(srv, "alice"), login(other_srv, "bob")
    names = [unique("ch") for _ in range(limit + 3)]
    for name in names[:limit]:
        alice.ok(3, {"name": name})
    refused = alice.call(3, {"name": names[limit]})
    assert error_code(refused) == "too_many_channels", refused
    assert "channels" in refused["error"]["message"]
    assert alice.error(4, {"channel": names[limit], "content": "x"}) == "not_found"     # nothing stored
    assert [error_code(r) for r in pipelined(alice, [(3, {"name": names[limit + 1]})] * 2)] \
        == ["too_many_channels"] * 2
    assert bob.error(4, {"channel": names[limit + 1], "content": "x"}) == "not_found"
    alice.ok(3, {"name": names[0], "push": False})          # a flag change on her own channel
    alice.ok(6, {"name": names[1]})                         # leaving does not give a creation back
    assert alice.error(3, {"name": names[limit + 2]}) == "too_many_channels"
    # another user may still create channels, the refused name too; then anyone joins it
    bob.ok(3, {"name": names[limit]})
    alice.ok(3, {"name": names[limit]})
    sent = bob.ok(4, {"channel": names[limit], "content": "hello"})
    assert sent["seq"] == 1
    alice.ok(3, {"name": names[1]})                         # joining her own again: it exists
    return alice, bob, names
