# Time on the loop (core/timers.pyx): the timing wheel of connection deadlines, and the
# timers the reactor's owner sets (Reactor.timer).
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef enum:
    WHEEL_SLOTS = 1024          # timing wheel: one slot per second, lazily re-armed

cdef class Timer

cdef class Timers(Connections):
    # liveness: a hashed timing wheel of connections, one slot per second
    cdef int32_t wheel[WHEEL_SLOTS]
    cdef uint32_t wheel_now
    cdef uint32_t login_timeout, idle_timeout
    # the owner's timers: armed ones in a binary heap, the nearest deadline first
    cdef list timer_heap
    cdef uint64_t timers_set        # set() calls so far: equal deadlines fire in the order set
    cdef int64_t next_deadline      # timer_heap[0]'s (NO_TIMER: none): bounds the loop's wait

    cdef uint32_t _deadline(self, int fd) noexcept
    cdef void _wheel_insert(self, int fd) noexcept
    cdef void _wheel_unlink(self, int fd) noexcept
    cdef void _expire_idle(self) noexcept
    cdef void _arm(self, Timer timer, int64_t deadline) noexcept
    cdef void _disarm(self, Timer timer) noexcept
    cdef void _run_timers(self, int64_t now_ns) noexcept

cdef class Timer:
    cdef Timers loop                # None once closed
    cdef object callback
    cdef int64_t at                 # its deadline (time.monotonic_ns() clock), while armed
    cdef uint64_t order             # Timers.timers_set when it was set
    cdef Py_ssize_t index           # its place in the heap; -1: not armed
    cdef bint due                   # taken out of the heap this pass: runs unless cancelled first
