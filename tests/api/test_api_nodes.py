"""The server API on two nodes sharing one Redis (two workers each): what a
backend asks of node A reaches users connected to node B (a publish, a
disconnect, presence, a deleted channel)."""
from __future__ import annotations

import time

import pytest
from tests.api.helpers import ApiClient, api_flags, channel_path, logged_in, user_path, wait_for_port
from tests.support import wait_for
from tests.support.node_servers import backend_fixture
from tests.support.redis_servers import requires_redis_server
from tests.support.client import unique

pytestmark = requires_redis_server


@pytest.fixture(scope="module")
def backend():
    yield from backend_fixture("redis")


@pytest.fixture(scope="module")
def nodes(backend, start_module_server, tmp_path_factory):
    """[(node, its API client)] for nodes A and B."""
    served = []
    for _ in range(2):
        flags, port = api_flags(tmp_path_factory.mktemp("api-key"))
        node = start_module_server(["--workers", "2", "--channel-rate", "0", "--redis", backend.url, *flags])
        wait_for_port(port)
        served.append((node, ApiClient(port)))
    yield served
    for _, api in served:
        api.close()


def test_a_publish_on_node_a_reaches_members_on_node_b(nodes):
    (a, api_a), (b, api_b) = nodes
    on_a, on_b = logged_in(a), logged_in(b)
    channel = unique("c")
    followed = api_a.ok("GET", "/api/v1/stats")["followedChannels"]
    api_b.ok("POST", "/api/v1/channels", {"name": channel, "members": [on_b[0].user_id, on_a[0].user_id]},
             status=201)
    # node A learns of a membership made on B over the feed, a moment later: its user then follows
    assert wait_for(lambda: api_a.ok("GET", "/api/v1/stats")["followedChannels"] == followed + 1, 5.0), \
        "node A never followed the channel made on node B"
    stored = api_a.ok("POST", channel_path(channel, "messages"), {"content": "to every node"})
    for client in on_a + on_b:
        action, pushed = client.recv_push()
        assert (action, pushed["id"], pushed["seq"]) == (102, stored["id"], 1)
    assert api_b.ok("GET", channel_path(channel, "presence")) == {"channel": channel, "members": 2, "online": 2}
    # a member added on A is followed on B at once
    late = logged_in(b)
    api_a.ok("PUT", channel_path(channel, "members", late[0].user_id))
    api_a.ok("POST", channel_path(channel, "messages"), {"content": "late"})
    for client in on_a + on_b + late:
        assert client.recv_push()[1]["content"] == "late"
    # deleted on A: B's connections stop following it
    assert api_a.ok("DELETE", channel_path(channel))["members"] == 3
    assert api_b.error("GET", channel_path(channel, "messages")) == (404, "not_found")
    assert on_a[0].error(4, {"channel": channel, "content": "x"}) == "not_found"
    api_b.ok("POST", "/api/v1/channels", {"name": channel, "members": [on_a[0].user_id]}, status=201)
    api_a.ok("POST", channel_path(channel, "messages"), {"content": "new channel"})
    assert on_a[0].recv_push()[1]["content"] == "new channel"
    for client in on_b + late:
        client.assert_no_push()


def test_a_channel_made_on_node_a_with_users_only_node_b_knows(nodes):
    (a, api_a), (b, _) = nodes
    users = [logged_in(b, count=1)[0] for _ in range(4)]      # node A's cache has never seen them
    channel = unique("c")
    created = api_a.ok("POST", "/api/v1/channels", {"name": channel, "members": [u.user_id for u in users]},
                       status=201)
    assert created == {"name": channel, "members": 4, "private": False}
    api_a.ok("POST", channel_path(channel, "messages"), {"content": "hello all"})
    for user in users:
        assert user.recv_push()[1]["content"] == "hello all"


def test_a_message_to_a_user_on_node_b_sent_on_node_a(nodes):
    (a, api_a), (b, _) = nodes
    bob = logged_in(b)
    stored = api_a.ok("POST", user_path(bob[0].user_id, "messages"), {"content": "hello"})
    for client in bob:
        assert client.recv_push()[1]["id"] == stored["id"]


def test_disconnect_on_node_a_closes_the_user_on_node_b(nodes):
    (a, api_a), (b, api_b) = nodes
    carol_b, carol_a = logged_in(b, "carol"), None
    carol_a = a.tcp_client()
    carol_a.login("carol", token=carol_b[0].token)
    user = carol_b[0].user_id
    presence = api_a.ok("GET", user_path(user, "presence"))
    assert presence["online"] is True and presence["connections"] == 1      # A's own connections
    api_a.ok("POST", user_path(user, "disconnect"))
    for client in [*carol_b, carol_a]:
        client.wait_closed()
        client.close()
    deadline = time.monotonic() + 5
    while api_a.ok("GET", user_path(user, "presence"))["online"]:
        assert time.monotonic() < deadline, "B's connections were never seen closed"
        time.sleep(0.05)


def test_revoke_on_node_a_closes_the_user_on_node_b(nodes):
    (a, api_a), (b, _) = nodes
    dave = logged_in(b)
    api_a.ok("POST", user_path(dave[0].user_id, "revoke-tokens"))
    for client in dave:
        client.wait_closed()
    assert b.tcp_client().error(1, {"name": "dave", "token": dave[0].token}) == "unauthorized"
