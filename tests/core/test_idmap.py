"""The C id table (zim._idmap) against a dict, under random operations."""
from __future__ import annotations

import copy

from hypothesis import given, settings, strategies as st

from zim._idmap import IdMap

ids = st.integers(1, 2**64 - 1) | st.integers(1, 300)       # wide and colliding keys
ops = st.lists(st.tuples(st.sampled_from(["set", "delete", "set_bits", "clear_bits", "clear_all"]),
                         ids, st.integers(0, 2**64 - 1)), max_size=400)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_idmap_matches_a_dict(operations):
    table, model = IdMap(), {}
    for op, key, value in operations:
        if op == "set":
            table.set(key, value)
            model[key] = value
        elif op == "delete":
            assert table.delete(key) == (key in model)
            model.pop(key, None)
        elif op == "set_bits":
            table.set_bits(key, value)
            model[key] = model.get(key, 0) | value
        elif op == "clear_bits":
            table.clear_bits(key, value)
            if key in model:
                model[key] &= ~value
                if not model[key]:
                    del model[key]
        else:
            emptied = table.clear_bits_everywhere(value)
            # entries holding a cleared bit lose it, and go when nothing is left (and are named)
            assert sorted(emptied) == sorted(k for k, v in model.items() if v and not v & ~value)
            model = {k: v & ~value for k, v in model.items() if not (v & value and not v & ~value)}
        assert len(table) == len(model)
    for key, value in model.items():
        assert table.get(key, 12345) == value


def test_idmap_grows_and_shrinks():
    table = IdMap()
    for key in range(1, 100_001):
        table.set(key, key * 3)
    assert len(table) == 100_000
    for key in range(1, 100_001, 2):
        assert table.delete(key)
    assert len(table) == 50_000
    assert all(table.get(key) == key * 3 for key in range(2, 100_001, 2))
    assert table.get(1, -1 & (2**64 - 1)) == 2**64 - 1


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
