"""The server API (--api) of one server, single-process and with 3 workers, over
real HTTP: every endpoint, the key, bad requests, and pushes reaching member
connections on every worker. Every answer is checked against
docs/api.openapi.json (tests/api/helpers.py)."""
from __future__ import annotations

import time
import urllib.request

import pytest
from tests.api.helpers import (
    KEY, ApiClient, api_flags, channel_path, logged_in, operations, raw_exchange, user_path, wait_for_port,
)
from tests.support.client import unique
from tests.support.servers import free_port

from zim.client import Closed

CONNECTIONS = 4     # per user: with 3 workers, the kernel spreads them over the workers


@pytest.fixture(scope="module", params=["1", "3"], ids=["1-worker", "3-workers"])
def served(request, start_module_server, tmp_path_factory):
    """(server, API port, operations that succeeded in this module, metrics port)."""
    flags, port = api_flags(tmp_path_factory.mktemp("api-key"))
    metrics = free_port()
    srv = start_module_server(["--workers", request.param, "--channel-rate", "0", *flags,
                               "--metrics", f"127.0.0.1:{metrics}"])
    wait_for_port(port)
    succeeded: set = set()
    yield srv, port, succeeded, metrics


@pytest.fixture
def api(served):
    client = ApiClient(served[1], succeeded=served[2])
    yield client
    client.close()


def connections(srv, name: str | None = None, count: int = CONNECTIONS) -> list:
    return logged_in(srv, name, count)


def new_channel(api: ApiClient, *members, channel: str | None = None) -> str:
    channel = channel or unique("c")
    api.ok("POST", "/api/v1/channels", {"name": channel, "members": [m.user_id for m in members]}, status=201)
    return channel


# -- the key and bad requests ---------------------------------------------------------------


def test_a_missing_or_wrong_key_is_401_and_counted(served, api):
    before = api.ok("GET", "/api/v1/stats")["api"].get("401", 0)
    assert api.error("GET", "/api/v1/stats", key=None) == (401, "unauthorized")
    assert api.error("GET", "/api/v1/stats", key=KEY[:-1] + "x") == (401, "unauthorized")
    assert api.error("GET", "/api/v1/stats", key="") == (401, "unauthorized")
    status, _, headers = api.request("POST", channel_path("any", "messages"), {"content": "x"}, key=None,
                                     headers={"Authorization": f"Basic {KEY}"})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert api.ok("GET", "/api/v1/stats")["api"]["401"] == before + 4
    with urllib.request.urlopen(f"http://127.0.0.1:{served[3]}/metrics", timeout=5) as scraped:
        text = scraped.read().decode()
    assert f'zim_api_requests_total{{status="401"}} {before + 4}.0' in text


def test_unknown_paths_and_methods(api):
    assert api.error("GET", "/api/v1/nothing") == (404, "not_found")
    assert api.error("GET", "/elsewhere") == (404, "not_found")
    assert api.error("GET", "/api/v1/channels/a/b/c/d/e") == (404, "not_found")
    status, _, headers = api.request("PUT", "/api/v1/stats")
    assert status == 405 and headers["Allow"] == "GET"
    status, _, headers = api.request("GET", channel_path("x"))
    assert status == 405 and headers["Allow"] == "DELETE"
    assert api.error("PATCH", user_path("1", "messages"))[0] == 405


def test_bad_json_and_bad_fields_are_400(served, api):
    srv = served[0]
    [alice] = connections(srv, count=1)
    path = user_path(alice.user_id, "messages")
    assert api.error("POST", path, raw=b"{not json") == (400, "bad_request")
    assert api.error("POST", path, raw=b"\xff\xfe") == (400, "bad_request")
    assert api.error("POST", path, raw=b"[1, 2]") == (400, "bad_request")
    assert api.error("POST", path, {"content": 5}) == (400, "bad_request")
    assert api.error("POST", path, {}) == (400, "bad_request")
    assert api.error("POST", path, {"content": "hi", "senderId": 7}) == (400, "bad_request")
    assert api.error("GET", channel_path("x", "messages") + "?limit=many")[0] in (400, 404)


def test_a_body_over_the_bound_is_413_and_the_connection_closes(served, api):
    port = served[1]
    big = b'{"content": "' + b"x" * (64 * 1024) + b'"}'
    head = (f"POST /api/v1/users/1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(big)}\r\n\r\n").encode()
    answer = raw_exchange(port, head + big)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"payload_too_large"' in answer
    chunked = (f"POST /api/v1/users/1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
        b"%x\r\n%s\r\n" % (8192, b"y" * 8192) for _ in range(9)) + b"0\r\n\r\n"
    answer = raw_exchange(port, chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert api.ok("GET", "/api/v1/stats")["connections"] >= 0     # the API still serves


def test_unknown_users_and_channels_are_404(served, api):
    [alice] = connections(served[0], count=1)
    nobody, nowhere = "123456789", unique("none")
    assert api.error("POST", user_path(nobody, "messages"), {"content": "x"}) == (404, "not_found")
    assert api.error("POST", user_path("not-a-number", "disconnect")) == (404, "not_found")
    for path in (user_path(nobody, "disconnect"), user_path(nobody, "revoke-tokens")):
        assert api.error("POST", path) == (404, "not_found")
    assert api.error("GET", user_path(nobody, "presence")) == (404, "not_found")
    assert api.error("POST", channel_path(nowhere, "messages"), {"content": "x"}) == (404, "not_found")
    assert api.error("GET", channel_path(nowhere, "messages")) == (404, "not_found")
    assert api.error("GET", channel_path(nowhere, "presence")) == (404, "not_found")
    assert api.error("DELETE", channel_path(nowhere)) == (404, "not_found")
    assert api.error("PUT", channel_path(nowhere, "members", alice.user_id)) == (404, "not_found")
    assert api.error("DELETE", channel_path(nowhere, "members", alice.user_id)) == (404, "not_found")
    channel = new_channel(api, alice)
    assert api.error("PUT", channel_path(channel, "members", nobody)) == (404, "not_found")
    assert api.error("POST", channel_path(channel, "messages"), {"content": "x", "senderId": nobody}) \
        == (404, "not_found")
    assert api.error("POST", "/api/v1/channels", {"name": unique("c"), "members": [nobody]}) == (404, "not_found")


# -- channels ---------------------------------------------------------------------------------


def test_publish_reaches_every_member_connection_on_every_worker(served, api):
    srv = served[0]
    alice, bob = connections(srv, "alice"), connections(srv, "bob")
    channel = new_channel(api, alice[0], bob[0])
    stored = api.ok("POST", channel_path(channel, "messages"), {"content": "from the system"})
    assert stored["seq"] == 1
    for client in alice + bob:
        action, pushed = client.recv_push()
        assert action == 102 and pushed["id"] == stored["id"] and pushed["seq"] == 1
        assert pushed["sender"] == {"id": "0", "name": "system"} and pushed["channel"] == channel
    stored = api.ok("POST", channel_path(channel, "messages"), {"content": "as alice", "senderId": alice[0].user_id})
    for client in alice + bob:
        action, pushed = client.recv_push()
        assert pushed["seq"] == 2 and pushed["sender"] == {"id": alice[0].user_id, "name": "alice"}
    # the same channel as action 4's: a member's send takes the next seq
    assert bob[0].ok(4, {"channel": channel, "content": "bob here"})["seq"] == 3
    page = api.ok("GET", channel_path(channel, "messages") + "?limit=2")
    assert [m["seq"] for m in page["messages"]] == [2, 3] and page["hasMore"] is True
    page = api.ok("GET", channel_path(channel, "messages") + "?beforeSeq=2")
    assert [m["content"] for m in page["messages"]] == ["from the system"] and page["hasMore"] is False


def test_members_added_and_removed_follow_at_once(served, api):
    srv = served[0]
    alice, carol = connections(srv), connections(srv)
    channel = new_channel(api, alice[0])
    assert api.ok("PUT", channel_path(channel, "members", carol[0].user_id)) == \
        {"channel": channel, "userId": carol[0].user_id, "push": True}
    api.ok("POST", channel_path(channel, "messages"), {"content": "welcome"})
    for client in carol:
        assert client.recv_push()[1]["content"] == "welcome"
    assert carol[0].ok(5, {"channel": channel})["messages"][0]["content"] == "welcome"
    removed = api.ok("DELETE", channel_path(channel, "members", carol[0].user_id))
    assert removed["removed"] is True
    assert api.ok("DELETE", channel_path(channel, "members", carol[0].user_id))["removed"] is False
    api.ok("POST", channel_path(channel, "messages"), {"content": "after"})
    for client in alice:
        assert client.recv_pushes(2)[1][1]["content"] == "after"
    for client in carol:
        client.assert_no_push()
    assert carol[0].error(5, {"channel": channel}) == "forbidden"
    # push off: a member that reads by history
    api.ok("PUT", channel_path(channel, "members", carol[0].user_id), {"push": False})
    api.ok("POST", channel_path(channel, "messages"), {"content": "quiet"})
    for client in carol:
        client.assert_no_push()


def test_create_channel_refusals(served, api):
    [alice] = connections(served[0], count=1)
    channel = new_channel(api, alice)
    assert api.error("POST", "/api/v1/channels", {"name": channel, "members": [alice.user_id]}) == (409, "conflict")
    assert api.error("POST", "/api/v1/channels", {"name": unique("c"), "members": []}) == (400, "bad_request")
    assert api.error("POST", "/api/v1/channels", {"name": "bad\u202ename", "members": [alice.user_id]}) \
        == (400, "bad_request")
    # a channel made by the API is an ordinary one: members reach it with the protocol
    assert alice.ok(4, {"channel": channel, "content": "hi"})["seq"] == 1


def test_private_channels_by_the_api(served, api):
    """A private channel made by the API: its first member may invite, the others
    are granted it; a user added later is granted it; one removed loses the grant;
    nobody else may join."""
    srv = served[0]
    [alice], [bob], [carol], [dave] = (connections(srv, count=1) for _ in range(4))
    channel = unique("private")
    made = api.ok("POST", "/api/v1/channels", {"name": channel, "members": [alice.user_id, bob.user_id],
                                               "private": True}, status=201)
    assert made == {"name": channel, "members": 2, "private": True}
    assert api.error("POST", "/api/v1/channels", {"name": channel, "members": [carol.user_id],
                                                  "private": True}) == (409, "conflict")
    assert dave.error(3, {"name": channel}) == "forbidden"
    assert bob.error(12, {"channel": channel, "userId": dave.user_id}) == "forbidden"   # no invite right
    alice.ok(12, {"channel": channel, "userId": dave.user_id})                          # the creator has it
    assert dave.recv_push()[0] == 104
    dave.ok(3, {"name": channel})
    api.ok("PUT", channel_path(channel, "members", carol.user_id), {"canInvite": True})
    api.ok("POST", channel_path(channel, "messages"), {"content": "to the few"})
    for client in (alice, bob, carol, dave):
        assert client.recv_push()[1]["content"] == "to the few"
    carol.ok(12, {"channel": channel, "userId": dave.user_id})    # granted with the invite right
    assert api.ok("DELETE", channel_path(channel, "members", bob.user_id))["removed"] is True
    assert bob.error(3, {"name": channel}) == "forbidden"         # the grant went with the membership


def test_delete_channel_drops_members_history_and_pushes(served, api):
    srv = served[0]
    alice, bob = connections(srv), connections(srv)
    channel = new_channel(api, alice[0], bob[0])
    api.ok("POST", channel_path(channel, "messages"), {"content": "one"})
    for client in alice + bob:
        client.recv_push()
    assert api.ok("DELETE", channel_path(channel)) == {"name": channel, "members": 2}
    assert api.error("GET", channel_path(channel, "messages")) == (404, "not_found")
    assert alice[0].error(4, {"channel": channel, "content": "x"}) == "not_found"
    # made again, it is a new channel: seq from 1, no history, and only its new members get pushes
    new = api.ok("POST", "/api/v1/channels", {"name": channel, "members": [bob[0].user_id]}, status=201)
    assert new == {"name": channel, "members": 1, "private": False}
    assert api.ok("GET", channel_path(channel, "messages"))["messages"] == []
    assert api.ok("POST", channel_path(channel, "messages"), {"content": "two"})["seq"] == 1
    for client in bob:
        assert client.recv_push()[1]["content"] == "two"
    for client in alice:
        client.assert_no_push()


def test_channel_presence_counts_members_online(served, api):
    srv = served[0]
    alice, bob = connections(srv, count=2), connections(srv, count=1)
    channel = new_channel(api, alice[0], bob[0])
    assert api.ok("GET", channel_path(channel, "presence")) == {"channel": channel, "members": 2, "online": 2}
    bob[0].close()
    deadline = time.monotonic() + 5
    while api.ok("GET", channel_path(channel, "presence"))["online"] != 1:
        assert time.monotonic() < deadline, "bob's close was never seen"
        time.sleep(0.05)


# -- users ------------------------------------------------------------------------------------------


def test_send_to_user_is_stored_in_the_mailbox_and_pushed(served, api):
    srv = served[0]
    dave, erin = connections(srv, "dave"), connections(srv, "erin", count=1)
    stored = api.ok("POST", user_path(dave[0].user_id, "messages"), {"content": "system notice"})
    for client in dave:
        action, pushed = client.recv_push()
        assert action == 101 and pushed["id"] == stored["id"] and pushed["sender"]["id"] == "0"
    assert [m["id"] for m in dave[0].ok(7)["messages"]] == [stored["id"]]
    # from a given user: in the pair's conversation, pushed to the sender's connections too
    stored = api.ok("POST", user_path(dave[0].user_id, "messages"), {"content": "hi", "senderId": erin[0].user_id})
    assert erin[0].recv_push()[1]["id"] == stored["id"]
    page = dave[0].ok(5, {"userId": erin[0].user_id})["messages"]
    assert [(m["id"], m["sender"]["name"]) for m in page] == [(stored["id"], "erin")]


def test_user_presence_and_disconnect_on_every_worker(served, api):
    srv = served[0]
    frank = connections(srv)
    user = frank[0].user_id
    assert api.ok("GET", user_path(user, "presence")) == {"userId": user, "online": True, "connections": CONNECTIONS}
    assert api.ok("POST", user_path(user, "disconnect")) == {"userId": user, "connections": CONNECTIONS}
    for client in frank:
        assert isinstance(client.wait_closed(), Closed)
        client.close()      # a worker reports a close once the socket is gone (it drains until then)
    deadline = time.monotonic() + 5
    while api.ok("GET", user_path(user, "presence"))["online"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the token still works: disconnect is not revoke
    again = srv.tcp_client()
    again.login("frank", token=frank[0].token)


def test_revoke_tokens_closes_connections_and_refuses_old_tokens(served, api):
    srv = served[0]
    gina = connections(srv)
    answer = api.ok("POST", user_path(gina[0].user_id, "revoke-tokens"))
    assert answer["userId"] == gina[0].user_id and answer["epoch"] >= 1
    for client in gina:
        client.wait_closed()
    late = srv.tcp_client()
    assert late.error(1, {"name": "gina", "token": gina[0].token}) == "unauthorized"


def test_stats(served, api):
    srv = served[0]
    clients = connections(srv)
    stats = api.ok("GET", "/api/v1/stats")
    assert stats["connections"] >= len(clients) and stats["usersOnline"] >= 1
    assert stats["logins"] >= len(clients) and stats["counters"]["requests_action_1"] >= len(clients)
    assert stats["channels"] >= 0 and stats["api"]["200"] >= 1


def test_the_api_answers_while_a_client_holds_a_request(served, api):
    """One HTTP client that sends half a request does not stall the others."""
    import socket
    port = served[1]
    with socket.create_connection(("127.0.0.1", port)) as stuck:
        stuck.sendall(b"POST /api/v1/stats HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        assert api.ok("GET", "/api/v1/stats")["connections"] >= 0


def test_every_operation_of_the_file_was_served(served):
    """Last of the tests on ``served`` (pytest keeps a module's order): each path
    and method of docs/api.openapi.json answered 2xx to one of them."""
    missing = set(operations()) - served[2]
    assert not missing, f"operations never answered 2xx by a test: {sorted(missing)}"


def test_a_deleted_channel_stays_deleted_after_a_restart(start_server, tmp_path):
    flags, port = api_flags(tmp_path)
    first = start_server(["--workers", "1", *flags])
    wait_for_port(port)
    api = ApiClient(port)
    [alice] = logged_in(first, count=1)
    kept, deleted = new_channel(api, alice), new_channel(api, alice)
    for channel in (kept, deleted):
        api.ok("POST", channel_path(channel, "messages"), {"content": "stored"})
    api.ok("DELETE", channel_path(deleted))
    api.close()
    first.stop()
    again = start_server(["--workers", "1", *flags], data_dir=first.data_dir)
    wait_for_port(port)
    api = ApiClient(port)
    assert [m["content"] for m in api.ok("GET", channel_path(kept, "messages"))["messages"]] == ["stored"]
    assert api.error("GET", channel_path(deleted, "messages")) == (404, "not_found")
    [bob] = logged_in(again, count=1)
    new_channel(api, bob, channel=deleted)
    assert api.ok("POST", channel_path(deleted, "messages"), {"content": "new"})["seq"] == 1
    api.close()

