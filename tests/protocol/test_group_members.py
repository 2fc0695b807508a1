"""A channel's push list on the server (zim/core/groups.pyx) keeps one member inline
and moves to an array from the second: members joining and leaving in any order
must leave exactly the right connections receiving the channel's messages, through
every change between the inline member and the array (issue 18)."""
from __future__ import annotations

import pytest

from tests.support.client import unique

ORDERS = [(0, 1, 2), (2, 1, 0), (1, 0, 2)]


def send_and_check(sender, members, channel: str, joined: set[int], content: str) -> None:
    """``content`` reaches exactly the members in ``joined``, once each."""
    sender.ok(4, {"channel": channel, "content": content})
    for index, member in enumerate(members):
        if index in joined:
            action, push = member.recv_push()
            assert (action, push["content"]) == (102, content), (index, content)
        member.assert_no_push(0)        # a round trip first: a push would have come before it


@pytest.mark.parametrize("order", ORDERS)
def test_members_join_and_leave_in_any_order(connect, order):
    channel = unique("inline")
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel, "push": False})      # sends, never in the push list
    members = [connect() for _ in range(3)]
    for member in members:
        member.login(unique("member"))
    joined: set[int] = set()
    for index in order:                                 # 1, 2, 3 members: inline, then the array
        members[index].ok(3, {"name": channel})
        joined.add(index)
        send_and_check(sender, members, channel, joined, f"join {index}")
    for index in order:                                 # 2, 1, 0: back inline, then empty
        members[index].ok(6, {"name": channel})
        joined.discard(index)
        send_and_check(sender, members, channel, joined, f"leave {index}")
    for index in reversed(order):                       # in again, and out from the middle
        members[index].ok(3, {"name": channel})
        joined.add(index)
    send_and_check(sender, members, channel, joined, "all back")
    members[order[1]].ok(6, {"name": channel})
    members[order[0]].ok(6, {"name": channel})
    send_and_check(sender, members, channel, {order[2]}, "one left")


def test_a_closed_inline_member_drops_out(connect):
    """A closed connection leaves its groups lazily (at the next broadcast): the one
    inline member closing, then another joining, must not bring it back."""
    channel = unique("inline")
    sender = connect()
    sender.login(unique("sender"))
    sender.ok(3, {"name": channel, "push": False})
    gone, stays = connect(), connect()
    gone.login(unique("gone"))
    gone.ok(3, {"name": channel})
    stays.login(unique("stays"))
    send_and_check(sender, [gone], channel, {0}, "first")
    gone.close()
    sender.ok(4, {"channel": channel, "content": "dropped"})   # drops the closed one
    stays.ok(3, {"name": channel})
    send_and_check(sender, [stays], channel, {0}, "second")
