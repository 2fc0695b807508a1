"""A channel's creator kept in its C record and each creator's count of the channels
it created in its user record (zim._tables): what MemoryStore's quota of created
channels reads."""
from __future__ import annotations

import copy

from zim._tables import Tables
import pytest

from zim.storage.store import TOO_MANY_CHANNELS, MemoryStore, Quotas, StoreRefusal


def test_the_creator_goes_with_the_channel_record():
    tables = Tables()
    tables.subscribe("a", 7, True)
    assert tables.creator("a") is None
    tables.set_creator("a", 2**63 + 5)
    assert tables.creator("a") == 2**63 + 5 and tables.creator("nope") is None
    tables.unsubscribe("a", 7)
    tables.drop_channel("a")
    tables.add_channel("b")                 # reuses the freed record: no creator inherited
    assert tables.creator("b") is None
    tables.set_creator("b", 9)
    assert copy.deepcopy(tables).creator("b") == 9


def test_a_creator_without_memberships_is_held_until_its_last_channel_goes():
    tables = Tables()
    empty = tables.memory_bytes()
    for name in ("x", "y"):
        tables.add_channel(name)
        tables.set_creator(name, 5)
    assert tables.created(5) == 2 and tables.user_count() == 1 and tables.user_channels(5) == []
    twin = copy.deepcopy(tables)            # (a creator with no pairs array copies too)
    tables.subscribe("x", 5, True)
    tables.delete_channel("x")              # its member and creator go: it still counts "y"
    assert tables.created(5) == 1 and tables.user_count() == 1
    tables.set_creator("y", 6)              # the count moves to the new creator
    assert tables.created(5) == 0 and tables.created(6) == 1 and tables.user_count() == 1
    tables.drop_channel("y")
    assert tables.created(6) == 0 and tables.user_count() == 0
    assert tables.memory_bytes() == empty   # nothing left behind
    assert twin.created(5) == 2 and twin.user_count() == 1
    twin.check()
    tables.check()


def test_store_counts_created_channels_through_leaves_and_deletes():
    store = MemoryStore()
    store.subscribe("mine", 1, True)
    store.create_channel("made", 1, private=True)
    store.subscribe("theirs", 2, True)
    store.subscribe("mine", 2, True)
    assert store.channels_created(1) == 2 and store.creator_of("mine") == 1
    assert store.delete_channel("mine") is not None
    assert store.channels_created(1) == 1 and store.creator_of("mine") is None
    store.unsubscribe("made", 1)            # (a private channel's creator is its member)
    store.drop_channel("made")
    assert store.channels_created(1) == 0 and store.channels_created(2) == 1


def test_the_quota_counts_channels_made_without_joining():
    """create_channel (a private channel) does not make its creator a member: its
    count is kept all the same, and the quota refuses the next creation."""
    store = MemoryStore()
    store.set_quotas(Quotas(max_channels_per_user=2))
    assert store.create_channel("p1", 9, private=True) and store.create_channel("p2", 9, private=True)
    assert store.channels_created(9) == 2 and store.user_channels(9) == []
    with pytest.raises(StoreRefusal) as refused:
        store.subscribe("p3", 9, True)
    assert refused.value.code == TOO_MANY_CHANNELS and not store.channel_exists("p3")
    store.drop_channel("p1")
    store.subscribe("p3", 9, True)
    assert store.channels_created(9) == 2 and store.creator_of("p3") == 9
