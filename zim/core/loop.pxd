# The loop (core/loop.pyx): the Reactor, the last of the chain of classes, as Python
# sees it: its constructor, its loop, its descriptors and its figures.
cimport cython

cdef enum:
    MAX_EVENTS = 1024

@cython.final
cdef class Reactor(Link):
    cdef list listeners
    cdef dict watches                   # fd -> callback, for S_WATCH slots
    cdef readonly object on_tick          # callable(): once a second, from the loop

    cdef void _on_watch(self, int fd) noexcept
    cdef void _every_second(self) noexcept
    cdef void _refresh_gauges(self) noexcept
