"""Private channels (action 3 ``"private": true``, action 12 invite, push 104)
against real servers: one process on the memory store, and 3 workers on SQLite
(handlers in the router); grants surviving a restart; a database of schema
version 4 upgraded. The JWT ``channels`` claim: tests/identity/test_jwt_login.py
makes the tokens the same way."""
from __future__ import annotations

import sqlite3
import time

import jwt
import pytest

from tests.identity.test_jwtauth import SECRET, write
from tests.support.client import unique
from zim.storage.sqlite import SQLiteStore

SUBSCRIBE, SEND_CHANNEL, HISTORY, UNSUBSCRIBE, INVITE = 3, 4, 5, 6, 12
PUSH_INVITED = 104


@pytest.fixture(scope="module", params=[["--store", "memory", "--workers", "1"], ["--workers", "3"]],
                ids=["memory", "3-workers"])
def srv(request, start_module_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    keys.chmod(0o700)
    return start_module_server([*request.param, "--jwt-key", write(keys / "secret", SECRET)])


def user(srv, name: str = "u"):
    client = srv.tcp_client()
    client.login(unique(name))
    return client


def private_channel(owner) -> str:
    channel = unique("secret")
    owner.ok(SUBSCRIBE, {"name": channel, "private": True})
    return channel


def test_a_private_channel_is_joined_only_with_a_grant(srv):
    owner, stranger = user(srv, "owner"), user(srv, "stranger")
    channel = private_channel(owner)
    owner.ok(SEND_CHANNEL, {"channel": channel, "content": "for members"})
    assert stranger.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    assert stranger.error(SUBSCRIBE, {"name": channel, "private": True}) == "forbidden"
    assert stranger.error(HISTORY, {"channel": channel}) == "forbidden"
    assert stranger.error(SEND_CHANNEL, {"channel": channel, "content": "x"}) == "forbidden"
    assert [m["content"] for m in owner.ok(HISTORY, {"channel": channel})["messages"]] == ["for members"]


def test_an_invitation_lets_one_join(srv):
    owner, bob, carol = user(srv, "owner"), user(srv, "bob"), user(srv, "carol")
    channel = private_channel(owner)
    owner.ok(INVITE, {"channel": channel, "userId": bob.user_id})
    action, pushed = bob.recv_push()
    assert action == PUSH_INVITED and pushed == {"channel": channel, "by": {"id": owner.user_id, "name": owner.name}}
    bob.ok(SUBSCRIBE, {"name": channel})
    owner.ok(SEND_CHANNEL, {"channel": channel, "content": "welcome"})
    assert bob.recv_push()[1]["content"] == "welcome"
    # an invitee may not invite in turn; the one it names still may not join
    assert bob.error(INVITE, {"channel": channel, "userId": carol.user_id}) == "forbidden"
    assert carol.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    carol.assert_no_push()


def test_leaving_gives_the_grant_back(srv):
    owner, bob = user(srv, "owner"), user(srv, "bob")
    channel = private_channel(owner)
    owner.ok(INVITE, {"channel": channel, "userId": bob.user_id})
    bob.ok(SUBSCRIBE, {"name": channel})
    bob.ok(UNSUBSCRIBE, {"name": channel})
    assert bob.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    assert bob.error(HISTORY, {"channel": channel}) == "forbidden"


def test_invite_errors(srv):
    owner, bob, outsider = user(srv, "owner"), user(srv, "bob"), user(srv, "outsider")
    channel = private_channel(owner)
    assert owner.error(INVITE, {"channel": unique("none"), "userId": bob.user_id}) == "not_found"
    assert owner.error(INVITE, {"channel": channel, "userId": "12345"}) == "not_found"
    assert owner.error(INVITE, {"channel": channel}) == "bad_request"
    assert outsider.error(INVITE, {"channel": channel, "userId": bob.user_id}) == "forbidden"
    public = unique("public")
    owner.ok(SUBSCRIBE, {"name": public})
    assert owner.error(INVITE, {"channel": public, "userId": bob.user_id}) == "bad_request"
    # "private" on a public channel's name: refused, not a silent public join
    assert bob.error(SUBSCRIBE, {"name": public, "private": True}) == "forbidden"
    bob.ok(SUBSCRIBE, {"name": public})


def test_the_jwt_channels_claim_grants_while_the_user_is_connected(srv):
    owner = user(srv, "owner")
    channel, other = private_channel(owner), private_channel(owner)
    sub = str(int(time.time() * 1000) % (1 << 40) + 1000)
    claims = {"sub": sub, "exp": int(time.time()) + 600, "channels": [channel]}
    member = srv.tcp_client()
    member.login("Jay", jwt=jwt.encode(claims, SECRET, "HS256"))
    assert member.error(SUBSCRIBE, {"name": other}) == "forbidden"       # not in its claim
    # the claim counts for the user, on every connection, not only the one that logged in
    second = srv.tcp_client()
    second.login("Jay", token=member.token)
    member.close()
    second.ok(SUBSCRIBE, {"name": channel})
    second.ok(UNSUBSCRIBE, {"name": channel})
    second.close()
    # the user's last connection gone, so is its claim: a token login does not bring it back
    deadline = time.monotonic() + 5
    while True:
        again = srv.tcp_client()
        again.login("Jay", token=second.token)
        if again.call(SUBSCRIBE, {"name": channel}).get("error", {}).get("code") == "forbidden":
            break
        again.ok(UNSUBSCRIBE, {"name": channel})
        again.close()
        assert time.monotonic() < deadline, "the claim outlived the user's connections"
        time.sleep(0.2)


def test_grants_survive_a_restart(start_server, tmp_path):
    flags = ["--workers", "1"]
    first = start_server(flags, data_dir=tmp_path)
    owner, bob = user(first, "owner"), user(first, "bob")
    channel = private_channel(owner)
    owner.ok(INVITE, {"channel": channel, "userId": bob.user_id})
    ids = (owner.token, bob.token, bob.name)
    first.stop()
    second = start_server(flags, data_dir=tmp_path)
    bob_again, stranger = second.tcp_client(), user(second, "stranger")
    bob_again.login(ids[2], token=ids[1])
    bob_again.ok(SUBSCRIBE, {"name": channel})
    assert stranger.error(SUBSCRIBE, {"name": channel}) == "forbidden"
    owner_again = second.tcp_client()
    owner_again.login("owner", token=ids[0])
    owner_again.ok(INVITE, {"channel": channel, "userId": stranger.user_id})     # its invite right kept
    stranger.ok(SUBSCRIBE, {"name": channel})


def test_a_version_4_database_is_upgraded(tmp_path):
    path = str(tmp_path / "zim.db")
    store = SQLiteStore(path)
    store.create_user(5, "five")
    store.subscribe("old", 5, True)
    store.close()
    conn = sqlite3.connect(path)      # back to schema version 4: no private flag, no grants (nor version 6's queue)
    conn.executescript("ALTER TABLE channels DROP COLUMN private; DROP TABLE grants; DROP TABLE archive_queue; "
                       "PRAGMA user_version = 4;")
    conn.close()
    store = SQLiteStore(path)
    try:
        assert not store.channel_private("old") and store.grant_of("old", 5) is None
        assert store.create_channel("new", 5, True) and not store.create_channel("new", 5, True)
        assert store.channel_private("new") and store.grant_of("new", 5) is True
        store.grant("new", 6, False)
        assert list(store.all_grants()) == [("new", 5, True), ("new", 6, False)]
        assert store.revoke_grant("new", 6) and store.grant_of("new", 6) is None
    finally:
        store.close()
