"""The writer's batch figures, kept in memory the server process maps too.

The writer process records each committed batch (how many operations, how long it
took to apply and commit); the server reads the figures when it is scraped
(``--metrics``), without a message on the link and without a cost per store call.
The memory is a flat array of unsigned 64-bit numbers:

    [batches, operations, microseconds,
     batch-size bucket counts (len(SIZE_BUCKETS) + 1, the last one: larger),
     commit-time bucket counts (len(SECONDS_BUCKETS) + 1)]
"""
from __future__ import annotations

import bisect
import mmap
import os

from prometheus_client.core import HistogramMetricFamily

SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_BATCHES, _OPERATIONS, _MICROSECONDS = 0, 1, 2
_SIZES = 3
_SECONDS = _SIZES + len(SIZE_BUCKETS) + 1
SLOTS = _SECONDS + len(SECONDS_BUCKETS) + 1
SIZE = SLOTS * 8


class BatchStats:
    """The figures over a shared mapping (``create`` in the server, ``attach`` in the writer)."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.slots = memoryview(memory).cast("Q")

    @classmethod
    def create(cls) -> tuple["BatchStats", int]:
        """New zeroed figures and the descriptor to hand to the writer (inheritable)."""
        fd = os.memfd_create("zim-writer-stats", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(mmap.mmap(fd, SIZE)), fd

    @classmethod
    def attach(cls, fd: int) -> "BatchStats":
        """The writer's side: map the server's figures (the descriptor is closed)."""
        try:
            return cls(mmap.mmap(fd, SIZE))
        finally:
            os.close(fd)

    def record(self, operations: int, seconds: float) -> None:
        """One batch committed (or failed): its operations and its time."""
        slots = self.slots
        slots[_BATCHES] += 1
        slots[_OPERATIONS] += operations
        slots[_MICROSECONDS] += int(seconds * 1e6)
        slots[_SIZES + bisect.bisect_left(SIZE_BUCKETS, operations)] += 1
        slots[_SECONDS + bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1

    @property
    def batches(self) -> int:
        return self.slots[_BATCHES]

    def families(self) -> list[HistogramMetricFamily]:
        """``zim_store_batch_operations`` and ``zim_store_commit_seconds``, for a scrape."""
        slots = self.slots
        sizes = HistogramMetricFamily("zim_store_batch_operations",
                                      "Store operations per writer batch (group commit).")
        sizes.add_metric([], _cumulative(slots[_SIZES:_SECONDS], SIZE_BUCKETS), slots[_OPERATIONS])
        seconds = HistogramMetricFamily("zim_store_commit_seconds",
                                        "Time the writer took to apply and commit one batch, in seconds.")
        seconds.add_metric([], _cumulative(slots[_SECONDS:SLOTS], SECONDS_BUCKETS),
                           slots[_MICROSECONDS] / 1e6)
        return [sizes, seconds]

    def close(self) -> None:
        self.slots.release()
        self.memory.close()


def _cumulative(counts, bounds) -> list[tuple[str, int]]:
    """Prometheus buckets: (upper bound, count at or below it), ending with +Inf."""
    total = 0
    buckets = []
    for bound, count in zip((*bounds, float("inf")), counts):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets
