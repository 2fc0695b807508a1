"""connflood --channels-per-user: the plan of channels (zim/connflood/channels.py), and
a run against a real server whose channels then hold exactly the plan's members; with
a small --max-store-backlog, so the supervisor's pause of its workers is taken and
given back under that burst of pipelined joins."""
from __future__ import annotations

from collections import Counter
from urllib.parse import quote

from hypothesis import given, settings, strategies as st

from tests.api.helpers import ApiClient, api_flags
from tests.bench.test_connflood import assert_counted, connflood, last_json
from tests.server.test_metrics import start_with_metrics
from zim.connflood.channels import ChannelPlan


def members_by_channel(plan: ChannelPlan) -> Counter:
    return Counter(name for user in range(plan.users) for name in plan.names(user))


@settings(max_examples=60, deadline=None)
@given(users=st.integers(1, 3000), per_user=st.integers(1, 6), smallest=st.integers(1, 60),
       spread=st.integers(1, 40))
def test_the_plan_gives_every_user_distinct_channels_of_the_slot_sizes(users, per_user, smallest, spread):
    plan = ChannelPlan(users, per_user, smallest, smallest * spread)
    assert len(plan.sizes) == per_user and plan.sizes == sorted(plan.sizes)
    largest = smallest * spread if per_user > 1 else smallest     # one slot: the smallest size
    assert plan.sizes[0] == min(smallest, users) and plan.sizes[-1] == min(largest, users)
    for user in range(users):
        names = plan.names(user)
        assert len(set(names)) == per_user and names == plan.names(user)
    counts = members_by_channel(plan)
    for slot, size in enumerate(plan.sizes):
        sizes = sorted(count for name, count in counts.items() if name.startswith(f"c{slot}-"))
        # every channel of a slot has the slot's size, but the last one (the rest)
        assert all(count == size for count in sizes[1:]) and 0 < sizes[0] <= size
        assert sum(sizes) == users
    assert plan.summary()["channels"] == len(counts)
    assert plan.summary()["memberships"] == users * per_user
    assert counts[plan.largest()] == max(counts.values())


def test_connflood_joins_the_plan_and_the_server_holds_it(start_server, tmp_path):
    flags, api_port = api_flags(tmp_path)
    srv, scraper = start_with_metrics(start_server, "--workers", "2", "--max-store-backlog", "16",
                                      "--channel-create-rate", "0", *flags)
    connections = 400
    done = connflood("--port", str(srv.tcp_port), "--connections", str(connections), "--processes", "2",
                     "--login", "--channels-per-user", "3", "--channel-sizes", "20:200", "--hold", "0.5",
                     "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = last_json(done)
    assert_counted(result, connections)
    plan = ChannelPlan(connections, 3, 20, 200)
    assert result["channels"]["joined"] == result["channels"]["memberships"] == 3 * connections
    assert result["channels"]["sizes"] == plan.sizes
    api = ApiClient(api_port)
    for channel, members in members_by_channel(plan).items():
        presence = api.ok("GET", f"/api/v1/channels/{quote(channel, safe='')}/presence")
        assert presence["members"] == members, channel
    # 1,200 pipelined joins against a backlog of 16: the workers were paused, and read again
    assert scraper.value("zim_store_backlog_pauses_total") >= 1
    srv.assert_alive()
