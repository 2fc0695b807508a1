"""docs/protocol.md: logging in (action 1) and what every request gets, before and
after login (one answer each, its seq echoed, unknown actions, heartbeats),
over both transports (the ``transport`` fixture), on the shared server: every
test uses fresh users and channel names, so they do not see each other's data.
The helpers they share are in tests/protocol/helpers.py.
"""
from __future__ import annotations

import time

import pytest

from tests.support.client import error_code, unique


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


@pytest.mark.parametrize("action", [0, 13, 50, 99, 100, 101, 102, 103, 104, 1000, 32767, 0x8000, 0xFFFF])
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
