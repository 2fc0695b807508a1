# The loop (core/loop.pyx): the Reactor, the last of the chain of classes, as Python
# sees it: its constructor, its loop, its descriptors and its figures.
cimport cython
from libc.stdint cimport uint32_t

cdef enum:
    MAX_EVENTS = 1024
    # A release walks the allocator's free lists, long on a big fragmented heap: the
    # next one waits at least this many times as long as the last took.
    RELEASE_SPACING = 1000

@cython.final
cdef class Reactor(Link):
    cdef list listeners
    cdef dict watches                   # fd -> callback, for S_WATCH slots
    cdef readonly object on_tick          # callable(): once a second, from the loop
    cdef uint32_t memory_release_interval  # seconds between malloc_trim calls (0: never)
    cdef uint32_t next_release            # self.now of the next one

    cdef void _on_watch(self, int fd) noexcept
    cdef void _every_second(self) noexcept
    cdef void _refresh_gauges(self) noexcept
    cdef void _release_free_memory(self) noexcept
