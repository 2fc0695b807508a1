"""zim._names.Names (the fabric's channel groups) against a Python model: ids dense
from 0 in order of first intern, stable through the hash's growth, never given back."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from zim._names import Names

NAMES = st.text(min_size=0, max_size=12)    # lone surrogates included: surrogatepass


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES, max_size=300))
def test_names_match_a_dict(sequence):
    names, model = Names(), {}
    for name in sequence:
        assert names.get(name) == model.get(name, -1)
        assert names.intern(name) == model.setdefault(name, len(model))
    assert len(names) == len(model)
    for name, index in model.items():
        assert names.get(name) == index
        assert names.name(index) == name


def test_many_names_survive_growth():
    names = Names()
    for i in range(50_000):
        assert names.intern(f"channel-{i}") == i
    assert names.get("channel-49999") == 49_999 and names.get("channel-50000") == -1
    assert names.name(12_345) == "channel-12345"
    # its 13 bytes, a 4-byte offset and hash slots (growth slack included), not a Python
    # object: every worker holds one per channel it has members of (issue 18)
    assert names.memory_bytes() < 50_000 * 36
