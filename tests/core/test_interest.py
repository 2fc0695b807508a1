"""zim.router.Interest: channel group -> bitmask of interested workers, in words as
wide as the worker count needs (issue 18: no more bytes per channel than that)."""
from __future__ import annotations

import pytest

from zim.router import Interest, worker_bit


@pytest.mark.parametrize("workers, width", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4), (33, 8), (64, 8)])
def test_every_worker_bit_is_kept_in_the_narrowest_word(workers, width):
    interest = Interest(workers)
    assert interest.words.itemsize == width
    for index in range(workers):
        interest.add(1000 + index, worker_bit(index))
        interest.add(5, worker_bit(index))
    assert interest.get(5) == (1 << workers) - 1
    assert [interest.get(1000 + index) for index in range(workers)] == [worker_bit(i) for i in range(workers)]
    assert interest.get(999) == 0 and interest.get(10**6) == 0
    interest.clear_bit(worker_bit(workers - 1))     # the widest bit: a worker gone
    assert interest.get(5) == (1 << (workers - 1)) - 1
    assert interest.get(1000 + workers - 1) == 0
    assert len(interest.words) * interest.words.itemsize <= (1000 + workers) * width * 1.2
