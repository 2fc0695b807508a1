"""A channel's creator kept in its C record (zim._tables) and the creators' counts in
an IdMap (zim._idmap): what MemoryStore's quota of created channels reads."""
from __future__ import annotations

import copy

from zim._idmap import IdMap
from zim._tables import Tables
from zim.storage.store import MemoryStore


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


def test_idmap_counts_down_and_copies():
    counts = IdMap()
    counts.add_one(3)
    counts.add_one(3)
    twin = copy.deepcopy(counts)
    counts.sub_one(3)
    assert counts.get(3) == 1 and twin.get(3) == 2
    counts.sub_one(3)
    counts.sub_one(4)                       # absent stays absent
    assert len(counts) == 0 and counts.get(4) == 0


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
