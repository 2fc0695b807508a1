"""What the protocol tests (tests/protocol/test_login.py, test_direct_messages.py,
test_channels.py, test_history.py, test_protocol.py) share: checking a Message
as docs/protocol.md defines it, a second device of a user, an offline user,
pipelined requests and history pages."""
from __future__ import annotations

import time

from tests.support.client import ZimClient, error_code, unique


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
