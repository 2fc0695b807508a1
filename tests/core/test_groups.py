"""The reactor's channel groups (zim/core/groups.pyx) against a Python model: one
member kept inline, an array from the second, inline again when one is left
(issue 18). Any order of adds and removes must leave exactly the model's members,
as ``group_has`` and a broadcast see them."""
from __future__ import annotations

import itertools
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zim._core import Reactor

CONNECTIONS = 6
next_group = itertools.count(1)


@pytest.fixture(scope="module")
def reactor_and_handles():
    reactor = Reactor(1024, lambda *args: None)
    pairs = [socket.socketpair() for _ in range(CONNECTIONS)]
    handles = [reactor.adopt_link(ours.detach()) for ours, _ in pairs]
    yield reactor, handles
    for _, theirs in pairs:
        theirs.close()


def members_seen(reactor: Reactor, group: int, handles: list[int]) -> set[int]:
    """The group's members as a broadcast finds them (every connection left out,
    so nothing is queued) and as group_has says; both must agree."""
    count, found = reactor.broadcast_except(group, 102, b"{}", handles)
    assert count == 0
    has = {handle for handle in handles if reactor.group_has(group, handle)}
    assert set(found) == has
    return has


operation = st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 2), st.integers(0, CONNECTIONS - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, max_size=40))
def test_groups_match_a_model(reactor_and_handles, operations):
    reactor, handles = reactor_and_handles
    groups = [next(next_group) for _ in range(3)]       # fresh groups each example
    model: dict[int, set[int]] = {group: set() for group in groups}
    for op, which, member in operations:
        group, handle = groups[which], handles[member]
        if op == "add":
            assert reactor.group_add(group, handle) == (handle not in model[group])
            model[group].add(handle)
        else:
            assert reactor.group_remove(group, handle) == (handle in model[group])
            model[group].discard(handle)
        for other in groups:
            assert members_seen(reactor, other, handles) == model[other]
    for group in groups:        # a broadcast reaches each member once
        assert reactor.broadcast(group, 102, b"{}") == len(model[group])
        for handle in model[group]:
            reactor.group_remove(group, handle)
        assert members_seen(reactor, group, handles) == set()
