"""Reactor(memory_release_interval=S): every S seconds the loop gives the heap's free
pages back to the kernel (malloc_trim), in process.

The heap is fragmented here on purpose (libc malloc through ctypes: thousands of small
blocks, most freed, every 64th kept so the holes cannot merge into the heap's top and
be trimmed by free() itself). Those freed pages stay resident until a release.
"""
from __future__ import annotations

import ctypes

import psutil

from tests.core.test_timers import run_until
from zim._core import Reactor

BLOCK = 256
BLOCKS = 120_000                # 30 MiB: under the 32 MiB the reactor lets the heap keep
KEEP_EVERY = 64

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def rss() -> int:
    return psutil.Process().memory_info().rss


def fragment_heap() -> list[int]:
    """Allocate BLOCKS blocks, touch them, free all but every KEEP_EVERY-th; the kept ones."""
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    assert all(blocks)
    for address in blocks:
        ctypes.memset(address, 1, BLOCK)
    for i, address in enumerate(blocks):
        if i % KEEP_EVERY:
            libc.free(address)
    return blocks[::KEEP_EVERY]


def freed_and_kept(interval: int) -> tuple[int, int, dict]:
    """RSS freed by fragment_heap's frees alone, and what the loop then gave back
    in 2.5 s with this interval; the reactor's counters."""
    reactor = Reactor(65536, lambda *args: None, memory_release_interval=interval)
    before = rss()
    kept = fragment_heap()
    after_frees = rss()
    try:
        run_until(reactor, 2.5)
        released = after_frees - rss()
        return after_frees - before, released, reactor.counters_dict()
    finally:
        for address in kept:
            libc.free(address)


def test_the_loop_gives_freed_heap_pages_back_and_counts_it():
    grown, released, counters = freed_and_kept(1)
    assert grown > 20 << 20, grown                  # the holes stayed resident after free()
    assert released > grown // 2, (grown, released)
    assert counters["memory_releases"] >= 1
    assert counters["memory_release_ns"] > 0


def test_interval_zero_never_releases():
    grown, released, counters = freed_and_kept(0)
    assert grown > 20 << 20, grown
    assert released < grown // 4, (grown, released)
    assert counters["memory_releases"] == 0 == counters["memory_release_ns"]
