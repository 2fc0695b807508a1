# The loop: the Reactor as Python sees it, the last of the chain of classes
#   Connections -> Timers -> Users -> Groups -> Link -> Reactor
# (core/conns.pyx first). Here are its constructor (every keyword, given to its layer),
# its loop (one edge-triggered epoll_wait a pass, then the pass's work in a fixed order:
# due timers, events, one flush, the end of the pass's broadcasts, the memory budget,
# the once-a-second sweep (now and then giving freed heap back), the reports of users
# who left), the descriptors it serves (listeners, watches) and its figures (the metric
# counters).

DEF_OUTBUF_LIMIT = 8 * 1024 * 1024
DEF_MAX_INFLIGHT = 128
DEF_MEMORY_RELEASE_INTERVAL = 10


cdef class Reactor(Link):
    """An edge-triggered epoll loop serving TCP and WebSocket connections.

    ``on_packet(conn, action, seq, body)`` is called once per complete request;
    ``conn`` is an int handle, valid until the connection closes. The other
    callbacks, given here or never (None: not told): ``on_tick()`` once a second,
    ``on_link_closed(conn)``, ``on_user_gone(user_id)``, ``on_users_closed(ids)``
    and, in router mode, ``on_request(conn, user, action, seq, body)``.
    ``memory_release_interval``: seconds between giving the heap's free pages back
    to the kernel (0: never; see _release_free_memory).
    """

    def __cinit__(self, size_t max_packet, object on_packet, size_t outbuf_limit=DEF_OUTBUF_LIMIT,
                  uint32_t login_timeout=10, uint32_t idle_timeout=300, bint ws_deflate=True,
                  uint32_t max_inflight=DEF_MAX_INFLIGHT, size_t memory_budget=0, object ws_origins=None,
                  uint32_t max_conns_per_address=0, size_t tcp_deflate_min=WS_DEFLATE_MIN,
                  dict static_pages=None, uint32_t memory_release_interval=DEF_MEMORY_RELEASE_INTERVAL, *,
                  object on_tick=None, object on_link_closed=None, object on_user_gone=None,
                  object on_users_closed=None, object on_request=None):
        # What the owner is told, given here once (see the attributes' declarations)
        self.on_tick = on_tick
        self.on_link_closed = on_link_closed
        self.on_user_gone = on_user_gone
        self.on_users_closed = on_users_closed
        self.on_request = on_request
        # Connections
        self._limit_addresses(max_conns_per_address)
        self.max_packet = max_packet
        self.link_max_packet = link_packet_limit(max_packet)
        # room for a whole maximal WebSocket frame plus a read's worth more
        # (address space: pages are touched only as far as reads reach)
        self.scratch_cap = max(max_packet, self.link_max_packet) + WS_MAX_FRAME_HEADER + 256 * 1024
        self.scratch = <char*>malloc(self.scratch_cap)
        if self.scratch == NULL:
            raise MemoryError("reactor setup failed")
        self.outbuf_limit = outbuf_limit
        self.memory_budget = memory_budget
        self.ws_deflate = ws_deflate
        self.tcp_deflate_min = tcp_deflate_min
        self.ws_origins = ws_origins
        self.static_pages = static_pages or {}
        self.static_responses = static_table_set(&self.static_paths, self.static_pages)
        # Timers
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        # Link
        self.on_packet = on_packet
        self.max_inflight = max(1, min(max_inflight, 0xFFFF))
        # Reactor
        self.memory_release_interval = memory_release_interval
        self.next_release = self.now + memory_release_interval
        self.listeners = []
        self.watches = {}
        self.running = True             # until stop(), which may come before run()

    def __dealloc__(self):
        # First, while every layer is whole: the pass's broadcasts end, every slot is released.
        # Then each layer's __dealloc__ frees its own memory, this one's first.
        cdef size_t i
        self._end_pass()
        if self.conns != NULL:
            for i in range(<size_t>self.max_fds):
                if self.conns[i].state != S_FREE:
                    self._release(<int>i)

    # ------------------------------------------------------------ listen --
    def listen(self, str host, int port, bint websocket=False, int backlog=4096):
        """Bind a listener (SO_REUSEPORT, so several workers may share the port)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        fd = sock.detach()
        self._claim_or_raise(fd, S_LISTEN_WS if websocket else S_LISTEN_TCP, 0, EPOLLIN | EPOLLET)
        self.listeners.append(fd)

    def watch(self, int fd, object callback):
        """Call ``callback()`` from the loop whenever ``fd`` becomes readable.

        For wake-ups from other threads or processes (an eventfd, a pipe): the
        callback must drain the descriptor (edge-triggered). The fd stays the
        caller's to close, after unwatch().
        """
        if fd < 0 or fd >= self.max_fds or self.conns[fd].state != S_FREE:
            raise ValueError("bad descriptor to watch")
        self._claim_or_raise(fd, S_WATCH, 0, EPOLLIN | EPOLLET)
        self.watches[fd] = callback

    def unwatch(self, int fd):
        """Stop watching fd (it is not closed)."""
        cdef epoll_event ev
        if 0 <= fd < self.max_fds and self.conns[fd].state == S_WATCH:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
            self.conns[fd].state = S_FREE
            del self.watches[fd]

    cdef void _on_watch(self, int fd) noexcept:
        try:
            self.watches[fd]()
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.running = False
            log.exception("watch callback failed")

    # ------------------------------------------------------------- loop --
    def run(self):
        """Run until stop(). Signals interrupt epoll_wait and run Python handlers."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, fd, timeout
        cdef int64_t now_ns
        cdef uint64_t handle
        cdef uint32_t ev, last_sweep
        last_sweep = self.now
        while self.running:
            timeout = 0 if self.again.length else 1000
            if timeout and self.next_deadline != NO_TIMER:
                timeout = wait_ms(self.next_deadline, timeout)      # an owner's timer comes sooner
            # Other threads (a store writer, a Redis client) run while we wait.
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout)
            if n < 0:
                if errno != EINTR:
                    raise OSError(errno, "epoll_wait failed")
                n = 0
            # A signal may land while the loop is busy, not only inside
            # epoll_wait: run Python's handlers (a flag check) every pass.
            PyErr_CheckSignals()
            now_ns = monotonic_ns()
            self.now = <uint32_t>(now_ns // 1000000000)
            if self.next_deadline <= now_ns:
                self._run_timers(now_ns)        # set in an earlier pass; what they queue goes out below
            self._resume_reads()
            for i in range(n):
                handle = events[i].data.u64
                fd = handle_fd(handle)
                if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state == S_FREE:
                    continue            # closed (and maybe reused) earlier in this iteration
                ev = events[i].events
                if self.conns[fd].state == S_LISTEN_TCP or self.conns[fd].state == S_LISTEN_WS:
                    self._accept(fd)
                    continue
                if self.conns[fd].state == S_WATCH:
                    self._on_watch(fd)
                    continue
                if ev & EPOLLERR:
                    self._close(fd)
                    continue
                if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
                    self._on_readable(fd)
                    if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state == S_FREE:
                        continue
                if ev & EPOLLOUT:
                    self._mark_pending(fd)
            self._flush_all()
            self._end_pass()
            if self.backlog.length and self.memory_budget:
                self._keep_to_budget()
            if self.now != last_sweep:
                last_sweep = self.now
                self._every_second()
            if self.closed_users.length:
                self._report_closed_users()     # before the gone users: a count drops, then goes
            if self.gone_users.length:
                self._report_gone_users()

    cdef void _every_second(self) noexcept:
        self._sweep_draining()
        self._expire_idle()
        self._refresh_gauges()
        if self.memory_release_interval and self.now >= self.next_release:
            self._release_free_memory()
        if self.on_tick is not None:
            try:
                self.on_tick()
            except BaseException:
                log.exception("tick handler failed")

    cdef void _release_free_memory(self) noexcept:
        """Give the heap's free pages back to the kernel. The allocator keeps up to
        32 MiB of freed output buffers for the next burst (Connections.__cinit__), and the
        old arrays of grown tables leave holes: after a burst of logins or joins both stay
        resident until a release (as jemalloc's decay does, here every
        --memory-release-interval seconds)."""
        cdef int64_t start = monotonic_ns()
        cdef int64_t took
        malloc_trim(0)
        took = monotonic_ns() - start
        self.counters[C_MEMORY_RELEASES] += 1
        self.counters[C_MEMORY_RELEASE_NS] += <uint64_t>took
        self.next_release = self.now + max(self.memory_release_interval,
                                           <uint32_t>(took * RELEASE_SPACING // 1000000000))

    def stop(self):
        """Leave run() after the current iteration (safe from a signal handler,
        also before run() has started)."""
        self.running = False

    def close_all(self):
        """Stop listening, flush what is queued (one try), close every connection."""
        cdef int fd
        for fd in self.listeners:
            if self.conns[fd].state != S_FREE:
                close(fd)
                self.conns[fd].state = S_FREE
        self.listeners = []
        self._flush_all()
        self._end_pass()
        for fd in range(self.max_fds):
            if self.conns[fd].state >= S_TCP:
                self._close_for(fd, R_SHUTDOWN)

    # ----------------------------------------------------------- figures --
    def stats(self):
        """This reactor's figures (its counters by name, and a few sizes)."""
        cdef dict result = self.counters_dict()
        result["connections"] = (self.counters[C_CONNECTIONS_TCP] + self.counters[C_CONNECTIONS_WS]
                                 + self.counters[C_LINKS])
        result["users_online"] = self.presence.count
        result["conn_slot_bytes"] = sizeof(conn_t)
        return result

    def counters_dict(self):
        """The metric counters (COUNTER_NAMES) by name, gauges refreshed first."""
        cdef int i
        self._refresh_gauges()
        return {COUNTER_NAMES[i]: self.counters[i] for i in range(N_COUNTERS)}

    @property
    def refused(self):
        """Connections refused at the open-file limit so far."""
        return self.counters[C_CLOSED + R_FD_LIMIT]

    def share_counters(self, buffer):
        """Keep the counters in ``buffer`` (writable, COUNTER_BYTES long, e.g. a shared
        mmap) from now on, so another process can read them without asking. Totals
        already there are added to (a restarted worker goes on from its predecessor's);
        gauges are replaced by this reactor's."""
        cdef uint64_t[::1] region = memoryview(buffer).cast("B").cast("Q")
        cdef int i
        if region.shape[0] < N_COUNTERS:
            raise ValueError(f"the counters need {COUNTER_BYTES} bytes")
        for i in range(N_COUNTERS):
            if i < FIRST_GAUGE:
                region[i] += self.counters[i]
            else:
                region[i] = self.counters[i]
        self.shared_counters = region
        self.counters = &region[0]

    cdef void _refresh_gauges(self) noexcept:
        """Output queued: a scan of the table (once a second and per scrape, never per packet)."""
        cdef uint64_t total = 0, largest = 0, links = 0
        cdef int fd
        cdef conn_t* c
        for fd in range(self.high_fd + 1):
            c = &self.conns[fd]
            if c.state < S_TCP or c.outlen == 0:
                continue
            if c.flags & F_LINK:
                links += c.outlen
            else:
                total += c.outlen
                if c.outlen > largest:
                    largest = c.outlen
        self.counters[C_OUTBUF_BYTES] = total
        self.counters[C_OUTBUF_MAX_BYTES] = largest
        self.counters[C_LINK_QUEUE_BYTES] = links
