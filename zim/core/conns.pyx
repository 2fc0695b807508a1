# A connection's life: its slot in the table, accept, read, frame, queue, flush, close.
#
# Per connection there is one fixed-size C struct (conn_t, core/conns.pxd) in a table
# indexed by fd: no Python object. Input is read into one per-worker scratch buffer and
# parsed in place; only a trailing partial packet is kept, in a malloc'd buffer freed as
# soon as it is consumed. Output is appended to a per-connection buffer and flushed once
# per loop pass with a single write carrying everything queued (the kernel charges per
# call, not per byte: docs/architecture.md). Closing is a sequence: no more requests,
# the answers still owed, the last words (too_large, a WebSocket close), a half-close,
# a drain until EOF or DRAIN_SECONDS, the close.
#
# The layers above define what a connection's life calls on (declared in conns.pxd):
# its deadline (Timers), its user (Users), a broadcast slice it shares (Groups), and
# where a complete packet goes (Link).

# Canned answers (C-side: sent without a Python call)
_TOO_LARGE_BODY = b'{"error":{"code":"too_large","message":"packet exceeds the server\'s max packet size"}}'
_HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


cdef inline size_t held_bytes(const conn_t* c) noexcept nogil:
    """Bytes of memory a connection's output holds (a shared slice: its length)."""
    return c.outlen if c.flags & F_SHARED else c.outcap


cdef int by_size_descending(const void* a, const void* b) noexcept nogil:
    """qsort order for (bytes << 32 | fd) keys: the largest first."""
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return -1 if x > y else (1 if x < y else 0)


cdef class Connections:
    """The connection table and each connection's I/O (the Reactor's first layer)."""

    def __cinit__(self):
        cdef rlimit lim
        self.epfd = self.reserve_fd = -1
        random_keys(self.addresses.key)     # a server of workers shares one: share_address_table
        memset(self.own_counters, 0, sizeof(self.own_counters))
        self.counters = self.own_counters
        getrlimit(RLIMIT_NOFILE, &lim)
        # Output buffers are freed as soon as the kernel takes their bytes; keep
        # up to 32 MiB of freed heap so each burst does not fault pages back in
        # (the loop gives it back every --memory-release-interval seconds).
        mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)
        self.max_fds = <int>min(lim.rlim_cur, 1 << 24)
        # calloc of a large table maps zero pages lazily: slots never used cost no RSS
        self.conns = <conn_t*>calloc(self.max_fds, sizeof(conn_t))
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        self.reserve_fd = c_open(b"/dev/null", O_RDONLY | O_CLOEXEC)
        if self.conns == NULL or self.epfd < 0:
            raise MemoryError("reactor setup failed")
        self.now = now_seconds()

    def __dealloc__(self):
        # the slots were released by Reactor.__dealloc__, while every layer was whole
        free(self.conns)
        free(self.scratch)
        free(self.pending.items)
        free(self.again.items)
        free(self.draining.items)
        free(self.backlog.items)
        if self.addresses_local:
            free(self.addresses.counts)
        zcodec_free(&self.z)
        static_table_free(&self.static_paths)
        if self.epfd >= 0:
            close(self.epfd)
        if self.reserve_fd >= 0:
            close(self.reserve_fd)

    cdef int _limit_addresses(self, uint32_t max_conns_per_address) except -1:
        """Count connections per address (0: no limit) in a table of our own, until
        share_address_table gives a shared one; word the refusal over the limit."""
        self.max_conns_per_address = max_conns_per_address
        if max_conns_per_address:
            local_address_table(&self.addresses)
            self.addresses_local = True
        self.refuse_tcp, self.refuse_ws = address_refusals(max_conns_per_address)
        return 0

    # ------------------------------------------------------------- slots --
    cdef int _claim(self, int fd, uint8_t state, uint16_t flags, uint32_t events) noexcept:
        """Take a free slot for fd under a new generation and add fd to the epoll set
        (events carry the handle); -1 (slot left free) if epoll refuses it."""
        cdef conn_t* c = &self.conns[fd]
        cdef epoll_event ev
        if fd > self.high_fd:
            self.high_fd = fd
        c.gen = next_gen(c.gen)
        c.state = state
        c.flags = flags
        c.user = 0
        c.peer = 0
        c.next_dev = NO_CONN
        c.wheel_prev = c.wheel_next = NO_CONN - 1     # not in the timing wheel
        ev.events = events
        ev.data.u64 = make_handle(c.gen, fd)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            c.state = S_FREE
            return -1
        return 0

    cdef int _claim_or_raise(self, int fd, uint8_t state, uint16_t flags, uint32_t events) except -1:
        if self._claim(fd, state, flags, events) < 0:
            raise OSError(errno, "epoll_ctl ADD failed")
        return 0

    cdef void _epoll_mod(self, int fd, uint32_t events) noexcept:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = make_handle(self.conns[fd].gen, fd)
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)

    cdef int _conn_fd(self, uint64_t handle) noexcept:
        """The fd of a live connection handle, or -1 if it is stale."""
        cdef int fd = handle_fd(handle)
        if handle == 0 or fd >= self.max_fds:
            return -1
        if self.conns[fd].gen != <uint32_t>(handle >> 32) or self.conns[fd].state < S_TCP:
            return -1
        return fd

    # ----------------------------------------------------------- accept --
    cdef void _accept(self, int lfd) noexcept:
        cdef int fd, one = 1
        cdef uint8_t kind = S_WS_HANDSHAKE if self.conns[lfd].state == S_LISTEN_WS else S_TCP
        cdef conn_t* c
        cdef sockaddr_storage addr
        cdef socklen_t addr_len
        cdef uint32_t peer
        cdef bint counted
        while True:
            addr_len = sizeof(addr)
            addr.ss_family = 0
            fd = accept4(lfd, <sockaddr*>&addr, &addr_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR:
                    continue
                if errno == EMFILE or errno == ENFILE:
                    # Out of descriptors: free the reserve, take the waiting
                    # connection and close it, so the edge is not left pending.
                    if self.reserve_fd >= 0:
                        close(self.reserve_fd)
                        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)
                        if fd >= 0:
                            close(fd)
                            self.counters[C_CLOSED + R_FD_LIMIT] += 1
                        self.reserve_fd = c_open(b"/dev/null", O_RDONLY | O_CLOEXEC)
                        if fd >= 0:
                            continue
                    return
                if errno == ENOBUFS or errno == ENOMEM:
                    return
                return                  # EAGAIN or a transient error from the peer
            if fd >= self.max_fds:      # cannot happen under RLIMIT_NOFILE; be safe
                close(fd)
                self.counters[C_CLOSED + R_FD_LIMIT] += 1
                continue
            peer = peer_key(&addr, addr_len, self.addresses.key)
            counted = self.max_conns_per_address and peer and self.addresses.counts != NULL
            if counted and not address_admit(&self.addresses, peer, self.max_conns_per_address):
                self._refuse(fd, kind)
                continue
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            if self._claim(fd, kind, F_COUNTED if counted else 0, EPOLLIN | EPOLLRDHUP | EPOLLET) < 0:
                if counted:
                    address_release(&self.addresses, peer)
                close(fd)
                continue
            c = &self.conns[fd]
            c.peer = peer
            c.last_active = self.now
            c.born = self.now
            self._wheel_insert(fd)
            self.counters[C_ACCEPTED] += 1
            self.counters[C_CONNECTIONS_TCP if kind == S_TCP else C_CONNECTIONS_WS] += 1

    cdef void _refuse(self, int fd, uint8_t kind) noexcept:
        """Over --max-conns-per-address: say so, best effort, and close, without taking a
        slot. What the client sent already is read first, so the close is a FIN after
        the answer rather than a reset that could overtake it."""
        cdef bytes answer = self.refuse_ws if kind == S_WS_HANDSHAKE else self.refuse_tcp
        cdef ssize_t n
        n = read(fd, self.scratch, min(self.scratch_cap, <size_t>MAX_HANDSHAKE))
        n = write(fd, PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer))
        close(fd)
        self.counters[C_CLOSED + R_ADDRESS_LIMIT] += 1

    # ------------------------------------------------------------- read --
    cdef void _on_readable(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef uint32_t gen = c.gen
        cdef size_t have = 0, used
        cdef ssize_t n
        cdef int reads = 0
        if c.flags & F_PAUSED:
            return                      # resume() brings it back
        if not (c.flags & F_SHUT):      # a draining peer keeps its deadline
            c.last_active = self.now
        if c.inlen:
            memcpy(self.scratch, c.inbuf, c.inlen)
            have = c.inlen
            free(c.inbuf)
            c.inbuf = NULL
            c.inlen = 0
            if not (c.flags & (F_CLOSING | F_SHUT)):
                # a resumed connection may hold whole requests already
                used = self._process(fd, gen, have)
                if c.gen != gen or c.state == S_FREE:
                    return
                memmove(self.scratch, self.scratch + used, have - used)
                have -= used
        while not (c.flags & F_PAUSED):
            if reads == READS_PER_EVENT:
                c.flags |= F_READ_AGAIN
                handles_push(&self.again, make_handle(gen, fd))
                break
            n = read(fd, self.scratch + have, self.scratch_cap - have)
            if n > 0:
                reads += 1
                self.counters[C_LINK_BYTES_IN if c.flags & F_LINK else C_BYTES_IN] += <uint64_t>n
                have += <size_t>n
                if c.flags & (F_CLOSING | F_SHUT):
                    have = 0            # draining: discard
                    continue
                used = self._process(fd, gen, have)
                if c.gen != gen or c.state == S_FREE:
                    return
                if used:
                    memmove(self.scratch, self.scratch + used, have - used)
                    have -= used
                continue                # (a pause set by a handler ends the loop)
            if n == 0:
                if c.flags & F_SHUT:
                    self._close(fd)
                    return
                c.flags |= F_PEER_EOF | F_CLOSING
                self._mark_pending(fd)  # flush answers, then close
                have = 0
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            self._close(fd)             # ECONNRESET and friends
            return
        if have and not (c.flags & (F_CLOSING | F_SHUT)):
            c.inbuf = <char*>malloc(have)
            if c.inbuf == NULL:
                self._close_for(fd, R_NO_MEMORY)
                return
            memcpy(c.inbuf, self.scratch, have)
            c.inlen = <uint32_t>have

    cdef void _resume_reads(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.again)
        cdef size_t i
        cdef int fd
        for i in range(batch.length):
            fd = self._conn_fd(batch.items[i])
            if fd >= 0 and self.conns[fd].flags & F_READ_AGAIN:
                self.conns[fd].flags &= ~F_READ_AGAIN
                self._on_readable(fd)
        free(batch.items)

    cdef size_t _process(self, int fd, uint32_t gen, size_t have) noexcept:
        """Handle every complete unit in scratch[0:have]; return bytes consumed."""
        cdef conn_t* c = &self.conns[fd]
        cdef size_t offset = 0, consumed
        cdef packet_t pkt
        cdef int ev
        cdef Py_ssize_t head_end
        while offset < have:
            if c.flags & F_PAUSED:
                return offset           # held: the bytes stay buffered until resume()
            if c.state == S_TCP:
                ev = tcp_next(self.scratch + offset, have - offset,
                              self.link_max_packet if c.flags & F_LINK else self.max_packet, &pkt, &consumed)
            elif c.state == S_WS:
                ev = ws_next(self.scratch + offset, have - offset, self.max_packet, &c.ws,
                             &self.z if c.deflate_bits else NULL, &pkt, &consumed)
            elif c.state == S_WS_HANDSHAKE:
                head_end = find_header_end(self.scratch + offset, have - offset)
                if head_end < 0:
                    if have - offset > MAX_HANDSHAKE:
                        self._queue_raw(fd, _HTTP_400)
                        self._begin_close_for(fd, R_PROTOCOL_ERROR)
                        return have
                    return offset
                if not self._handshake(fd, offset, <size_t>head_end):
                    return have
                offset += <size_t>head_end
                continue
            else:
                return have
            offset += consumed
            if ev == EV_NEED_MORE:
                return offset
            if ev == EV_PACKET:
                if not (c.flags & F_LINK):
                    self.counters[C_PACKETS_IN] += 1
                    self.counters[C_REQUESTS + (pkt.action if 0 <= pkt.action < REQUEST_ACTIONS
                                                else REQUEST_ACTIONS)] += 1
                    if c.deflate_bits and pkt.body == self.z.inflated + WS_PACKET_HEADER:
                        self.counters[C_INFLATED_IN] += 1
                    if pkt.action == ACTION_LOGIN and c.user == 0:
                        c.flags |= F_LOGGING_IN
                self._dispatch(fd, &pkt)
                if c.gen == gen and c.inflight == 0:
                    c.flags &= ~F_LOGGING_IN        # answered at once (or nothing to wait for)
                if c.state == S_WS:
                    ws_release(&c.ws)
                if c.gen != gen or c.state == S_FREE:
                    return have
                if c.flags & (F_CLOSING | F_SHUT):
                    return have
            elif ev == EV_SKIP or ev == EV_PONG:
                pass
            elif ev == EV_PING:
                self._queue_control(fd, 10, pkt.body, pkt.body_len)
            elif ev == EV_CLOSE:
                self._ws_close(fd, pkt.close_code if pkt.close_code else 1000)
                return have
            elif ev == EV_TEXT:
                set_reason(&self.conns[fd], R_PROTOCOL_ERROR)
                self._ws_close(fd, 1003)
                return have
            elif ev == EV_BAD_UTF8 or ev == EV_BAD_DEFLATE:
                set_reason(&self.conns[fd], R_PROTOCOL_ERROR)
                self._ws_close(fd, 1007)
                return have
            elif c.flags & F_LINK:      # EV_TOO_LARGE or EV_BROKEN from another zim process
                self._link_broken(fd, offset, have, ev)
                return have
            elif ev == EV_TOO_LARGE:
                set_reason(&self.conns[fd], R_TOO_LARGE)
                c.flags |= F_FINAL_TOO_LARGE
                c.final_action = <uint16_t>pkt.action
                c.final_seq = <uint16_t>pkt.seq
                if c.state == S_WS:
                    self._ws_close(fd, 1009)
                else:
                    self._begin_close(fd)
                return have
            else:                       # EV_BROKEN
                set_reason(&self.conns[fd], R_PROTOCOL_ERROR)
                if c.state == S_WS:
                    self._ws_close(fd, 1002)
                else:
                    self._begin_close(fd)
                return have
        return offset

    cdef void _link_broken(self, int fd, size_t offset, size_t have, int ev) noexcept:
        """A link sent a frame no zim process sends (over the links' limit, or
        unframeable): close it at once. Nothing is written into it: a client's
        ``too_large`` answer would be one more bad frame to the other end. Its
        owner learns of it through ``on_link_closed``, as for any link that ends."""
        cdef uint32_t length = get32(self.scratch + offset) if have - offset >= 4 else 0
        try:
            log.error("closing a link: %s frame of %d bytes (links carry up to %d)",
                      "an oversized" if ev == EV_TOO_LARGE else "a broken", length, self.link_max_packet)
        except BaseException:
            pass
        self._close(fd)

    cdef bint _handshake(self, int fd, size_t offset, size_t head_len) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef object answer
        cdef Py_ssize_t page = static_lookup(&self.static_paths, self.scratch + offset, head_len)
        if page >= 0:                   # a plain GET (--demo): its page or a 404, then close
            self._queue_raw(fd, <bytes>self.static_responses[page])
            self._begin_close(fd)
            return False
        try:
            answer = ws_handshake(PyBytes_FromStringAndSize(self.scratch + offset, head_len), self.ws_deflate,
                                  self.ws_origins)
        except BaseException:
            answer = None
        if answer is None:
            self._queue_raw(fd, _HTTP_400)
            self._begin_close_for(fd, R_PROTOCOL_ERROR)
            return False
        if answer[1] < 0:               # a valid upgrade from an Origin not in --ws-origins: 403
            self._queue_raw(fd, answer[0])
            self._begin_close_for(fd, R_ORIGIN)
            return False
        self._queue_raw(fd, answer[0])
        c.deflate_bits = <uint8_t>answer[1]
        c.state = S_WS
        return True

    # ------------------------------------------------------------ write --
    cdef char* _reserve(self, int fd, size_t extra) noexcept:
        """Room for extra more output bytes; NULL if the connection was dropped."""
        cdef conn_t* c = &self.conns[fd]
        cdef size_t need
        if c.flags & F_SHARED and not self._unshare(fd, 0):
            return NULL
        need = c.outlen + extra
        if need > c.outcap:
            if need > self.outbuf_limit and not (c.flags & F_LINK):
                self._close_for(fd, R_OUTPUT_CAP)   # a consumer that stopped reading
                return NULL
            if not grow(&c.outbuf, &c.outcap, need, 512):
                self._close_for(fd, R_NO_MEMORY)
                return NULL
        if not (c.flags & F_PENDING):
            self._mark_pending(fd)
        return c.outbuf + c.outlen

    cdef void _mark_pending(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if c.flags & F_PENDING:
            return
        c.flags |= F_PENDING
        handles_push(&self.pending, make_handle(c.gen, fd))

    cdef bint _queue_packet(self, int fd, int action, int seq, const char* body, size_t body_len) noexcept:
        cdef conn_t* c = &self.conns[fd]
        cdef char* out
        cdef size_t head, deflated
        if c.flags & F_SHUT:
            return False
        if c.flags & F_LINK and body_len + TCP_HEADER > self.link_max_packet:
            self._refuse_link_packet(action, body_len + TCP_HEADER)
            return False
        if c.state == S_WS and ws_deflate_fits(c.deflate_bits, body_len + WS_PACKET_HEADER):
            deflated = ws_deflate(&self.z, action, seq, body, body_len)
        elif c.flags & F_TCP_DEFLATE:
            deflated = tcp_deflate(&self.z, body, body_len, self.tcp_deflate_min)
        else:
            deflated = 0
        if deflated:                    # in z.deflated; its framing says it is compressed
            out = self._reserve(fd, WS_MAX_FRAME_HEADER + deflated)
            if out == NULL:
                return False
            if c.state == S_WS:
                head = ws_deflated_header(out, deflated)
            else:
                head = tcp_header(out, deflated, action, seq | SEQ_DEFLATED)
            memcpy(out + head, self.z.deflated, deflated)
            c.outlen += <uint32_t>(head + deflated)
            self.counters[C_DEFLATED_OUT if c.state == S_WS else C_TCP_DEFLATED_OUT] += 1
            return True
        out = self._reserve(fd, WS_MAX_FRAME_HEADER + WS_PACKET_HEADER + body_len)
        if out == NULL:
            return False
        if c.state == S_WS:
            head = ws_packet_header(out, body_len, action, seq)
        else:
            head = tcp_header(out, body_len, action, seq)
        memcpy(out + head, body, body_len)
        c.outlen += <uint32_t>(head + body_len)
        return True

    cdef void _refuse_link_packet(self, int action, size_t length) noexcept:
        """A packet too big for a link is not queued (the other end would close
        the link): the caller fails that one call. Nothing zim sends comes near."""
        try:
            log.error("a packet of %d bytes (action %d) is over the links' limit of %d: not sent",
                      length, action, self.link_max_packet)
        except BaseException:
            pass

    cdef void _queue_raw(self, int fd, bytes data) noexcept:
        cdef char* out = self._reserve(fd, len(data))
        if out != NULL:
            memcpy(out, PyBytes_AS_STRING(data), len(data))
            self.conns[fd].outlen += <uint32_t>len(data)

    cdef void _queue_control(self, int fd, int opcode, const char* payload, size_t length) noexcept:
        cdef char* out = self._reserve(fd, WS_MAX_FRAME_HEADER + length)
        cdef size_t head
        if out != NULL:
            head = ws_frame_header(out, length, opcode)
            memcpy(out + head, payload, length)
            self.conns[fd].outlen += <uint32_t>(head + length)

    cdef void _ws_close(self, int fd, int code) noexcept:
        """Close with a WebSocket close frame, sent after every pending answer."""
        self.conns[fd].close_code = <uint16_t>code
        self._begin_close(fd)

    cdef void _queue_final(self, int fd) noexcept:
        """The last words of a closing connection, once all its answers are out."""
        cdef conn_t* c = &self.conns[fd]
        cdef char payload[2]
        if c.flags & F_FINAL_TOO_LARGE:
            c.flags &= ~F_FINAL_TOO_LARGE
            self._queue_packet(fd, c.final_action, c.final_seq, _TOO_LARGE_BODY, len(_TOO_LARGE_BODY))
        if c.close_code and c.state == S_WS:
            put16(payload, c.close_code)
            c.close_code = 0
            self._queue_control(fd, 8, payload, 2)

    cdef void _begin_close(self, int fd) noexcept:
        """No more requests from fd: flush what is queued, half-close, drain, close."""
        if self.conns[fd].state == S_FREE:
            return
        self.conns[fd].flags |= F_CLOSING
        self._mark_pending(fd)

    cdef void _begin_close_for(self, int fd, uint8_t reason) noexcept:
        set_reason(&self.conns[fd], reason)
        self._begin_close(fd)

    cdef void _close_for(self, int fd, uint8_t reason) noexcept:
        set_reason(&self.conns[fd], reason)
        self._close(fd)

    cdef void _flush_all(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.pending)
        cdef size_t i
        cdef int fd
        for i in range(batch.length):
            fd = self._conn_fd(batch.items[i])
            if fd >= 0:
                self.conns[fd].flags &= ~F_PENDING
                self._flush(fd)
        free(batch.items)

    cdef int _write_out(self, int fd) noexcept:
        """One write of everything queued: 1 all out, 0 some left (EPOLLOUT armed), -1 closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef ssize_t n
        if c.flags & F_SHARED and self._write_shared(fd) < 0:
            return -1
        while c.outlen:
            n = write(fd, c.outbuf, c.outlen)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self._close(fd)         # EPIPE, ECONNRESET: the peer is gone
                return -1
            self.counters[C_LINK_BYTES_OUT if c.flags & F_LINK else C_BYTES_OUT] += <uint64_t>n
            if <size_t>n < c.outlen:
                memmove(c.outbuf, c.outbuf + n, c.outlen - n)
            c.outlen -= <uint32_t>n
        if c.outlen:
            if not (c.flags & F_EPOLLOUT):
                c.flags |= F_EPOLLOUT
                self._epoll_mod(fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
                if not (c.flags & F_LINK):
                    handles_push(&self.backlog, make_handle(c.gen, fd))
            return 0
        return 1

    cdef void _keep_to_budget(self) noexcept:
        """The output the kernel has not taken, over every client connection, stays
        under --max-client-memory: over it, the largest queues are cut first (Redis's
        maxmemory-clients). Only connections with a backlog are looked at."""
        cdef size_t i, kept = 0, total = 0
        cdef uint64_t handle
        cdef uint64_t* keys
        cdef int fd
        for i in range(self.backlog.length):
            handle = self.backlog.items[i]
            fd = self._conn_fd(handle)
            if fd < 0 or not (self.conns[fd].flags & F_EPOLLOUT):
                continue                # closed, or drained since
            self.backlog.items[kept] = handle
            kept += 1
            total += held_bytes(&self.conns[fd])
        self.backlog.length = kept
        if total <= self.memory_budget:
            return
        keys = <uint64_t*>malloc(kept * sizeof(uint64_t))
        if keys == NULL:
            return
        for i in range(kept):
            fd = handle_fd(self.backlog.items[i])
            keys[i] = (<uint64_t>min(held_bytes(&self.conns[fd]), 0xFFFFFFFF) << 32) | <uint32_t>fd
        qsort(keys, kept, sizeof(uint64_t), by_size_descending)
        i = 0
        while total > self.memory_budget and i < kept:
            fd = <int><uint32_t>keys[i]
            total -= held_bytes(&self.conns[fd])
            self._close_for(fd, R_MEMORY_BUDGET)
            i += 1
        free(keys)

    cdef void _flush(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        if self._write_out(fd) <= 0:
            return
        # A closing connection waits for the answers still owed to it, then
        # says its last words (too_large, the WebSocket close) after them.
        if c.flags & (F_CLOSING | F_PEER_EOF) and c.inflight:
            return
        if c.flags & F_CLOSING and (c.flags & F_FINAL_TOO_LARGE or c.close_code):
            self._queue_final(fd)
            if self._write_out(fd) <= 0:
                return
        # everything went out: give the buffer back
        free(c.outbuf)
        c.outbuf = NULL
        c.outcap = 0
        if c.flags & F_EPOLLOUT:
            c.flags &= ~F_EPOLLOUT
            self._epoll_mod(fd, EPOLLIN | EPOLLRDHUP | EPOLLET)
        if c.flags & F_PEER_EOF:
            self._close(fd)
        elif c.flags & F_CLOSING and not (c.flags & F_SHUT):
            # half-close so the last answer is not lost to a reset; then drain
            shutdown(fd, SHUT_WR)
            c.flags |= F_SHUT
            c.last_active = self.now
            handles_push(&self.draining, make_handle(c.gen, fd))

    cdef void _sweep_draining(self) noexcept:
        cdef size_t i, kept = 0
        cdef uint64_t handle
        cdef int fd
        for i in range(self.draining.length):
            handle = self.draining.items[i]
            fd = self._conn_fd(handle)
            if fd < 0:
                continue
            if self.now - self.conns[fd].last_active >= DRAIN_SECONDS:
                self._close(fd)
                continue
            self.draining.items[kept] = handle
            kept += 1
        self.draining.length = kept

    # ------------------------------------------------------------ close --
    cdef void _release(self, int fd) noexcept:
        cdef conn_t* c = &self.conns[fd]
        self._wheel_unlink(fd)
        if c.user and not (c.flags & F_LINK):
            self._unbind(fd)
        if c.flags & F_COUNTED:
            address_release(&self.addresses, c.peer)
        free(c.inbuf)
        if c.flags & F_SHARED:
            pass_out_unref(<pass_out_t*>c.outbuf)
        else:
            free(c.outbuf)
        c.ws.frag_active = 0
        ws_release(&c.ws)
        c.inbuf = NULL
        c.outbuf = NULL
        c.inlen = c.outlen = c.outcap = 0
        c.user = 0
        c.flags = 0
        c.deflate_bits = 0
        c.inflight = 0
        c.close_code = 0
        c.close_reason = R_PEER
        c.state = S_FREE

    cdef void _close(self, int fd) noexcept:
        cdef uint64_t user = self.conns[fd].user
        cdef uint64_t handle = make_handle(self.conns[fd].gen, fd)
        cdef bint link = self.conns[fd].flags & F_LINK
        if self.conns[fd].state < S_TCP:
            return
        if link:
            self.counters[C_LINKS] -= 1
        else:
            self.counters[C_CLOSED + self.conns[fd].close_reason] += 1
            self.counters[C_CONNECTIONS_TCP if self.conns[fd].state == S_TCP else C_CONNECTIONS_WS] -= 1
        self._release(fd)
        if user and not link:
            self._user_closed(user)
        if link and self.on_link_closed is not None:
            try:
                self.on_link_closed(handle)
            except BaseException:
                log.exception("link close handler failed")
        close(fd)                       # also removes it from the epoll set

    # ------------------------------------------------------- Python API --
    def reply(self, uint64_t conn, int action, int seq, bytes payload):
        """Queue one packet to one connection; False if it is gone."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0:
            return False
        return self._queue_packet(fd, action, seq, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    def close(self, uint64_t conn):
        """Close a connection after flushing what is queued for it."""
        cdef int fd = self._conn_fd(conn)
        if fd >= 0:
            self._begin_close_for(fd, R_SERVER)

    # ------------------------------------------- defined by layers above --
    cdef void _wheel_insert(self, int fd) noexcept: pass
    cdef void _wheel_unlink(self, int fd) noexcept: pass
    cdef void _unbind(self, int fd) noexcept: pass
    cdef void _user_closed(self, uint64_t user) noexcept: pass
    cdef bint _unshare(self, int fd, size_t sent) noexcept: return False
    cdef int _write_shared(self, int fd) noexcept: return -1
    cdef void _dispatch(self, int fd, packet_t* pkt) noexcept: pass
