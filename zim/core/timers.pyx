# Time on the loop: when connections time out, and the owner's timers.
#
# Connection deadlines (login, idle) sit in a hashed timing wheel of one slot per second,
# visited once a second: O(due connections), nothing per packet (a connection active
# since it was slotted is re-slotted when its slot comes round). The owner's timers
# (Reactor.timer: merged pushes, Redis reconnects and reply deadlines) are few and
# sub-second: a binary heap of Timer objects whose nearest deadline bounds the loop's
# epoll_wait, so they cost no descriptor and no system call, and nothing per pass
# while none is armed. Due timers run first in a pass, before its events, so one set
# during a pass runs in a later one (a deadline already past: the next), and what a
# callback queues goes out with that pass's flush.

cdef uint32_t NO_DEADLINE = <uint32_t>-1
cdef int64_t NO_TIMER = INT64_MAX


cdef inline int64_t monotonic_ns() noexcept nogil:
    """time.monotonic_ns()'s clock (CLOCK_MONOTONIC)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uint32_t now_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint32_t>ts.tv_sec


cdef int wait_ms(int64_t deadline, int longest) noexcept nogil:
    """How long the loop may wait for events, at most ``longest`` ms, without passing
    ``deadline``: rounded up, as a timer must not fire before its deadline."""
    cdef int64_t left = deadline - monotonic_ns()
    if left <= 0:
        return 0
    return <int>min(<int64_t>longest, (left + 999999) // 1000000)


cdef inline bint fires_before(Timer a, Timer b) noexcept:
    return a.at < b.at or (a.at == b.at and a.order < b.order)


cdef void sift_up(list heap, Py_ssize_t i) noexcept:
    cdef Timer timer = heap[i], parent
    while i > 0:
        parent = heap[(i - 1) >> 1]
        if not fires_before(timer, parent):
            break
        heap[i] = parent
        parent.index = i
        i = (i - 1) >> 1
    heap[i] = timer
    timer.index = i


cdef void sift_down(list heap, Py_ssize_t i) noexcept:
    cdef Timer timer = heap[i], child
    cdef Py_ssize_t n = len(heap), c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and fires_before(heap[c + 1], heap[c]):
            c += 1
        child = heap[c]
        if not fires_before(child, timer):
            break
        heap[i] = child
        child.index = i
        i = c
    heap[i] = timer
    timer.index = i


cdef class Timers(Connections):
    """Connection deadlines and the owner's timers (the Reactor's second layer)."""

    def __cinit__(self):
        cdef int i
        for i in range(WHEEL_SLOTS):
            self.wheel[i] = NO_CONN
        self.wheel_now = self.now
        self.timer_heap = []
        self.next_deadline = NO_TIMER

    # --------------------------------------------------------- liveness --
    cdef uint32_t _deadline(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef uint32_t deadline = c.last_active + self.idle_timeout if self.idle_timeout else NO_DEADLINE
        # A login that arrived in time and waits on a busy server is not cut: while it is in
        # flight, only the idle timeout applies (other requests, heartbeats, do not count).
        if c.user == 0 and not (c.flags & F_LOGGING_IN) and self.login_timeout \
                and c.born + self.login_timeout < deadline:
            deadline = c.born + self.login_timeout
        return deadline

    cdef void _wheel_insert(self, int fd) noexcept:
        cdef uint32_t deadline = self._deadline(fd)
        cdef size_t slot
        if deadline == NO_DEADLINE:
            self.conns[fd].wheel_prev = self.conns[fd].wheel_next = NO_CONN - 1   # not in the wheel
            return
        if deadline <= self.wheel_now:
            deadline = self.wheel_now + 1
        slot = deadline % WHEEL_SLOTS
        self.conns[fd].wheel_slot = <uint16_t>slot
        self.conns[fd].wheel_prev = NO_CONN
        self.conns[fd].wheel_next = self.wheel[slot]
        if self.wheel[slot] != NO_CONN:
            self.conns[self.wheel[slot]].wheel_prev = fd
        self.wheel[slot] = fd

    cdef void _wheel_unlink(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if c.wheel_next == NO_CONN - 1:
            return
        if c.wheel_prev != NO_CONN:
            self.conns[c.wheel_prev].wheel_next = c.wheel_next
        else:
            self.wheel[c.wheel_slot] = c.wheel_next
        if c.wheel_next != NO_CONN:
            self.conns[c.wheel_next].wheel_prev = c.wheel_prev
        c.wheel_prev = c.wheel_next = NO_CONN - 1

    cdef void _expire_idle(self) noexcept:
        """Visit the wheel slots of the seconds that passed: O(due connections).

        A connection that was active since it was slotted is re-slotted at its
        new deadline instead of being moved on every packet.
        """
        cdef int32_t fd, nxt
        cdef size_t slot
        cdef conn_t* c
        while self.wheel_now < self.now:
            self.wheel_now += 1
            slot = self.wheel_now % WHEEL_SLOTS
            fd = self.wheel[slot]
            self.wheel[slot] = NO_CONN
            while fd != NO_CONN:
                c = &self.conns[fd]
                nxt = c.wheel_next
                c.wheel_prev = c.wheel_next = NO_CONN - 1
                if self._deadline(fd) <= self.wheel_now:
                    set_reason(c, R_LOGIN_TIMEOUT if c.user == 0 and self.login_timeout and
                               c.born + self.login_timeout <= self.wheel_now else R_IDLE_TIMEOUT)
                    if c.state == S_WS:
                        self._ws_close(fd, 1001)
                    else:
                        self._begin_close(fd)
                else:
                    self._wheel_insert(fd)
                fd = nxt

    # ----------------------------------------------------- owner's timers --
    def timer(self, callback):
        """A new Timer that calls ``callback()`` from the loop once the deadline given
        to its ``set`` has passed (one-shot: ``set`` it again for another)."""
        return Timer(self, callback)

    cdef void _arm(self, Timer timer, int64_t deadline) noexcept:
        if timer.index >= 0:
            self._disarm(timer)
        timer.at = deadline
        timer.order = self.timers_set
        self.timers_set += 1
        self.timer_heap.append(timer)
        sift_up(self.timer_heap, len(self.timer_heap) - 1)
        self.next_deadline = (<Timer>self.timer_heap[0]).at

    cdef void _disarm(self, Timer timer) noexcept:
        cdef list heap = self.timer_heap
        cdef Py_ssize_t i = timer.index
        cdef Timer last
        timer.due = False
        if i < 0:
            return
        timer.index = -1
        last = heap.pop()
        if i < len(heap):           # the last one fills the hole, then finds its place
            heap[i] = last
            last.index = i
            sift_up(heap, i)
            sift_down(heap, last.index)
        self.next_deadline = (<Timer>heap[0]).at if heap else NO_TIMER

    cdef void _run_timers(self, int64_t now_ns) noexcept:
        """Run the timers due at ``now_ns``, nearest deadline first. They are all taken
        out before any runs: one a callback sets again in the past runs on the next
        pass, not in a loop here; one it cancels does not run."""
        cdef list due = []
        cdef Timer timer
        while self.timer_heap and (<Timer>self.timer_heap[0]).at <= now_ns:
            timer = self.timer_heap[0]
            self._disarm(timer)
            timer.due = True
            due.append(timer)
        for timer in due:
            if not timer.due:
                continue
            timer.due = False
            try:
                timer.callback()
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    self.running = False
                log.exception("timer callback failed")


cdef class Timer:
    """A one-shot timer on a reactor's loop (``Reactor.timer(callback)``).

    ``set(deadline_ns)`` arms it for ``deadline_ns`` on ``time.monotonic_ns()``'s
    clock, replacing any deadline set before; ``callback()`` then runs from the loop
    once, on the first pass at or after the deadline (a deadline already past: the next
    pass). An exception from the callback is logged and the loop goes on (a
    KeyboardInterrupt or SystemExit stops it). ``cancel()`` disarms it; ``close()``
    also lets go of the callback and the reactor, and ``set`` then raises.
    """

    def __cinit__(self, Timers loop not None, callback):
        if not callable(callback):
            raise TypeError("a timer's callback must be callable")
        self.loop = loop
        self.callback = callback
        self.index = -1

    def set(self, int64_t deadline_ns):
        """Run the callback once ``deadline_ns`` (time.monotonic_ns()) has passed."""
        if self.loop is None:
            raise ValueError("the timer is closed")
        self.loop._arm(self, deadline_ns)

    def cancel(self):
        """Disarm it: the callback does not run (until the next ``set``)."""
        if self.loop is not None:
            self.loop._disarm(self)

    def close(self):
        """Disarm it for good and drop the callback (closing twice is harmless)."""
        self.cancel()
        self.loop = None
        self.callback = None

    @property
    def deadline(self):
        """The deadline it is armed for (time.monotonic_ns()), or None."""
        return self.at if self.index >= 0 else None
