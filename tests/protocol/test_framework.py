"""zim as a framework: a user's app script with its own routes next to the IM actions."""
from __future__ import annotations

import pytest

import zim
from tests.support.client import error_code, unique

APP_SCRIPT = '''
import sys

import zim

app = zim.App()


class DeliberateFailure(Exception):
    """Raised on purpose by action 120."""


@app.route(100)
def echo(ctx, body):
    return {"echo": body, "user": ctx.user_id}


@app.route(110, login=False)
def public(ctx, body):
    return {"public": True, "user": ctx.user_id}


@app.route(120, login=False)
def boom(ctx, body):
    raise DeliberateFailure("this handler always fails")


@app.route(130)
def poke(ctx, body):
    queued = ctx.push_user(body["to"], 140, {"from": ctx.user_id, "text": body["text"]})
    return {"queued": queued}


@app.route(150)
def refuse(ctx, body):
    raise zim.Error("custom_code", "refused on purpose")


@app.route(160)
def with_followup(ctx, body):
    ctx.send(161, {"followup": body.get("n")})
    return {"ok": True}


@app.route(170)
def returns_none(ctx, body):
    return None


@app.route(180)
def note_to_self(ctx, body):
    # docs/framework.md's ctx.later example: answered once the message is committed
    me = int(ctx.user_id)
    msg = {"id": str(ctx.app.ids.next()), "seq": 0, "content": str(body.get("text", "")),
           "sender": {"id": ctx.user_id, "name": ctx.app.store.user_name(me)}}
    stored = ctx.app.store.append_user_message(me, me, msg)

    def done(seq):
        ctx.send(101, msg)
        return {"id": msg["id"], "seq": seq}

    return ctx.later(stored, done)


@app.route(190)
def later_fails(ctx, body):
    def done(_):
        raise zim.Error("custom_code", "refused after the store answered")

    return ctx.later(ctx.app.store.mailbox_pull(int(ctx.user_id), 1), done)


app.run(tcp=sys.argv[1], ws=sys.argv[2], data=sys.argv[3])
'''


@pytest.fixture(scope="module")
def app_server(start_module_server):
    return start_module_server(app_script=APP_SCRIPT, allowed_tracebacks=["DeliberateFailure"])


@pytest.fixture(params=["tcp", "ws"])
def kind(request) -> str:
    return request.param


def test_custom_action_answered(app_server, kind):
    client = app_server.client(kind)
    client.login(unique("fw"))
    result = client.ok(100, {"hello": [1, 2, {"x": None}]})
    assert result == {"echo": {"hello": [1, 2, {"x": None}]}, "user": client.user_id}


def test_custom_route_requires_login_by_default(app_server, kind):
    client = app_server.client(kind)
    assert client.error(100, {"a": 1}) == "not_logged_in"
    assert client.error(100, b"not json") == "not_logged_in"
    client.login(unique("fw"))
    assert client.ok(100, {})["user"] == client.user_id


def test_login_false_route(app_server, kind):
    client = app_server.client(kind)
    assert client.ok(110) == {"public": True, "user": None}
    client.login(unique("fw"))
    assert client.ok(110) == {"public": True, "user": client.user_id}


def test_handler_exception_is_internal_and_connection_survives(app_server, kind):
    client = app_server.client(kind)
    for _ in range(3):
        assert client.error(120) == "internal"
        client.sync()
    client.login(unique("fw"))
    assert client.ok(100, {"still": "here"})["echo"] == {"still": "here"}
    app_server.assert_alive()
    assert "DeliberateFailure" in app_server.stderr(), "the failure should be logged"


def test_custom_error_code(app_server, kind):
    client = app_server.client(kind)
    client.login(unique("fw"))
    result = client.call(150)
    assert result == {"error": {"code": "custom_code", "message": "refused on purpose"}}


def test_body_checks_apply_to_custom_routes(app_server, kind):
    client = app_server.client(kind)
    client.login(unique("fw"))
    assert client.error(100, b"[1]") == "bad_request"
    assert client.error(100, b"{oops") == "bad_request"
    assert client.ok(170) == {}
    assert client.error(999) == "unknown_action"


def test_ctx_send_follows_the_response(app_server, kind):
    client = app_server.client(kind)
    client.login(unique("fw"))
    seq = client.send(160, {"n": 7})
    client.wait_response(seq)
    response_index = next(i for i, (_, s, _) in enumerate(client.received) if s == seq)
    push = client.recv_push()
    assert push == (161, {"followup": 7})
    push_index = next(i for i, (a, s, _) in enumerate(client.received) if a == 161 and s == 0)
    assert push_index > response_index


def test_push_user_reaches_another_client(app_server, kind):
    sender = app_server.client(kind)
    sender.login(unique("poker"))
    other_kind = "ws" if kind == "tcp" else "tcp"
    target = app_server.client(other_kind)
    target.login(unique("target"))
    target_phone = app_server.client(kind)
    target_phone.login(target.name, token=target.token)
    result = sender.ok(130, {"to": target.user_id, "text": "psst"})
    assert result == {"queued": 2}
    for device in (target, target_phone):
        assert device.recv_push() == (140, {"from": sender.user_id, "text": "psst"})
    sender.assert_no_push()
    # a user with no connection: nothing queued, no error
    assert sender.ok(130, {"to": "987654321", "text": "nobody"}) == {"queued": 0}


def test_im_served_side_by_side(app_server, kind):
    alice = app_server.client(kind)
    alice.login(unique("alice"))
    bob = app_server.client("tcp")
    bob.login(unique("bob"))
    channel = unique("fw")
    alice.ok(3, {"name": channel})
    bob.ok(3, {"name": channel})
    alice.ok(4, {"channel": channel, "content": "framework + im"})
    action, msg = bob.recv_push()
    assert action == 102 and msg["content"] == "framework + im"
    alice.ok(2, {"receiverId": bob.user_id, "content": "dm"})
    assert bob.recv_push()[1]["content"] == "dm"
    assert alice.ok(100, {"mixed": True})["echo"] == {"mixed": True}
    assert error_code(bob.call(120)) == "internal"
    assert bob.ok(5, {"channel": channel})["messages"][0]["content"] == "framework + im"


def test_ctx_later_answers_once_stored_then_pushes(app_server, kind):
    client = app_server.client(kind)
    client.login(unique("noter"))
    first = client.ok(180, {"text": "remember"})
    assert first["seq"] == 1
    push = client.recv_push()
    assert push[0] == 101 and push[1]["id"] == first["id"] and push[1]["seq"] == 1
    assert client.ok(180, {"text": "again"})["seq"] == 2
    client.recv_push()
    history = client.ok(5, {"userId": client.user_id})["messages"]
    assert [m["content"] for m in history] == ["remember", "again"]
    assert [m["id"] for m in client.ok(7)["messages"]] == [first["id"], history[1]["id"]]
    assert error_code(client.request(190, {})[2]) == "custom_code"


@pytest.mark.parametrize("action", [0, -1, 32768, 70000])
def test_route_rejects_bad_action_numbers(action):
    app = zim.App(im=False)
    with pytest.raises(ValueError):
        app.route(action)

