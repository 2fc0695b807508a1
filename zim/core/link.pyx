# Where a complete packet goes, and the router <-> worker link.
#
# A packet goes to ``on_packet`` (Python, once per request), unless the link takes it in
# C: in worker mode (forward_to) a client's request is checked and forwarded up the link,
# and the router's REPLY, PUSH_USER and BROADCAST commands are carried out here; in router
# mode a worker's forwarded request goes straight to ``on_request``. Requests handed
# elsewhere are counted in flight (conn_t.inflight): a close waits for their answers, and
# a connection with too many waiting is not read. Single-process mode does the same with
# hold() and answer(). The wire format is core/wire.pxd.

# core/wire.pxd's 64-bit values, for Python: a handle's connection bits (the worker index
# sits above them), and the marks of a forwarded user field that is an address key
LINK_HANDLE_MASK = (<uint64_t>1 << HANDLE_BITS) - 1
PEER_MARK = <uint64_t>1 << PEER_BIT
PEER_WS = <uint64_t>1 << PEER_WS_BIT
PEER_KEY_MASK = <uint64_t>0xFFFFFFFF     # the address key itself (core/addresses.pyx: 32 bits)

# Canned refusals the worker sends from C
_NOT_LOGGED_IN_BODY = b'{"error":{"code":"not_logged_in","message":"log in first (action 1)"}}'
_INTERNAL_BODY = b'{"error":{"code":"internal","message":"the router is not reachable"}}'



def link_packet_limit(size_t max_packet):
    """The largest packet a link between zim processes carries (both ends use it):
    far above anything sent on one, so no client can make a link hit it. A link
    carries a client's request (at most ``max_packet``) after a REQUEST_HEAD, a
    store operation holding one message, an answer to a client or a push (one
    message, or a page kept under 1 MiB), a page of the store (bounded by bytes:
    about 1 MB and two messages at most). So max(64 MiB, 4 x max packet + 1 MiB),
    and a TCP length fits 32 bits."""
    return min(max(<size_t>LINK_PACKET_FLOOR, 4 * max_packet + (1 << 20)), <size_t>0xFFFFFFFF)


cdef class Link(Groups):
    """Where packets go: on_packet, or the link between router and workers (the
    Reactor's fifth layer)."""

    def __dealloc__(self):
        free(self.route_table)

    cdef void _dispatch(self, int fd, packet_t* pkt) noexcept:
        cdef object body
        if self.link:
            if not (self.conns[fd].flags & F_LINK):
                self._forward(fd, pkt)
                return
            if self._run_command(pkt):
                return
        elif self.on_request is not None and self.conns[fd].flags & F_LINK and self.conns[fd].user \
                and pkt.action and pkt.body_len >= REQUEST_HEAD:   # from a worker link (set_link_index)
            self._route_request(fd, pkt)
            return
        body = PyBytes_FromStringAndSize(pkt.body, pkt.body_len)
        try:
            self.on_packet(make_handle(self.conns[fd].gen, fd), pkt.action, pkt.seq, body)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.running = False
            log.exception("packet handler failed")

    def adopt_link(self, int fd):
        """Serve an already connected socket as a trusted link to another zim
        process (TCP framing, packets up to ``link_max_packet`` either way, no
        timeouts or output cap). A frame over that limit, or a broken one, closes
        it at once, writing nothing into it."""
        if fd < 0 or fd >= self.max_fds or self.conns[fd].state != S_FREE:
            raise ValueError("bad link descriptor")
        os.set_blocking(fd, False)      # edge-triggered reads must never block
        self._claim_or_raise(fd, S_TCP, F_LINK, EPOLLIN | EPOLLRDHUP | EPOLLET)
        self.counters[C_LINKS] += 1
        return make_handle(self.conns[fd].gen, fd)

    def hold(self, uint64_t conn):
        """Single-process mode: this request is answered later, by ``answer()``
        (e.g. once the store has committed it). A close waits for the answer, and
        a connection not logged in has its next requests held until then, so a
        login pipelined with a send is decided first. False if the connection is gone."""
        cdef int fd = self._conn_fd(conn)
        cdef conn_t* c
        if fd < 0:
            return False
        c = &self.conns[fd]
        if c.inflight < 0xFFFF:
            c.inflight += 1
        if c.user == 0 or c.inflight >= self.max_inflight:
            c.flags |= F_PAUSED
        return True

    def answer(self, uint64_t conn, int action, int seq, bytes payload):
        """Queue the answer to a request held by ``hold()`` and resume the connection."""
        cdef int fd = self._conn_fd(conn)
        cdef bint queued
        if fd < 0:
            return False
        queued = self._queue_packet(fd, action, seq, PyBytes_AS_STRING(payload),
                                              PyBytes_GET_SIZE(payload))
        if self._conn_fd(conn) == fd:       # a full output buffer may have dropped it
            self._answered(fd)
            if self.conns[fd].inflight < self.max_inflight:
                self._resume(fd)
        return queued

    def pause_reading(self, uint64_t conn):
        """Read no more requests from a connection (those already read are done; the
        rest wait in its buffer and the kernel) until ``resume_reading``. For the
        router's worker links while the store's writer is behind. False if it is gone."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0:
            return False
        self.conns[fd].flags |= F_PAUSED
        return True

    def resume_reading(self, uint64_t conn):
        """Undo ``pause_reading``: what is buffered is read in the next pass."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0:
            return False
        self._resume(fd)
        return True

    cdef void _answered(self, int fd) noexcept:
        if self.conns[fd].inflight:
            self.conns[fd].inflight -= 1
            if self.conns[fd].flags & (F_CLOSING | F_PEER_EOF):
                self._mark_pending(fd)          # may be free to close now
            elif self.conns[fd].inflight == 0 and self.conns[fd].flags & F_LOGGING_IN:
                self.conns[fd].flags &= ~F_LOGGING_IN
                if self.conns[fd].user == 0 and self.login_timeout:
                    # the login failed: its deadline applies again
                    self._wheel_unlink(fd)
                    self._wheel_insert(fd)

    cdef void _resume(self, int fd) noexcept:
        """Release a paused connection: its buffered requests are read next pass."""
        if self.conns[fd].flags & F_PAUSED:
            self.conns[fd].flags &= ~F_PAUSED
            self.conns[fd].flags |= F_READ_AGAIN
            handles_push(&self.again, make_handle(self.conns[fd].gen, fd))

    # ------------------------------------------------ worker fast path --
    def forward_to(self, uint64_t link, bytes routes):
        """Worker mode: client requests go to ``link`` from C, and the router's
        reply, push and broadcast commands on it are carried out in C.

        ``routes`` has one byte per action: 0 unknown, 1 open, 2 login needed.
        Anything else on the link still goes to ``on_packet``.
        """
        if len(routes) != 65536:
            raise ValueError("routes must have 65536 bytes")
        free(self.route_table)
        self.route_table = <uint8_t*>malloc(65536)
        if self.route_table == NULL:
            raise MemoryError()
        memcpy(self.route_table, PyBytes_AS_STRING(routes), 65536)
        self.link = link

    cdef void _forward(self, int fd, packet_t* pkt) noexcept:
        """A client request, checked and sent up the link: a REQUEST head (core/wire.pxd), its body."""
        cdef conn_t* c = &self.conns[fd]
        cdef uint8_t route = self.route_table[pkt.action]
        cdef int link_fd = self._conn_fd(self.link)
        cdef char* out
        cdef char* head
        cdef char text[160]
        cdef int n
        if route == 0:
            n = snprintf(text, sizeof(text),
                         b'{"error":{"code":"unknown_action","message":"unknown action %d"}}', pkt.action)
            self._queue_packet(fd, pkt.action, pkt.seq, text, n)
            self.counters[C_ERR_UNKNOWN_ACTION] += 1
            return
        if route == 2 and c.user == 0:
            self._queue_packet(fd, pkt.action, pkt.seq, _NOT_LOGGED_IN_BODY, len(_NOT_LOGGED_IN_BODY))
            self.counters[C_ERR_NOT_LOGGED_IN] += 1
            return
        if link_fd < 0:
            self._queue_packet(fd, pkt.action, pkt.seq, _INTERNAL_BODY, len(_INTERNAL_BODY))
            self.counters[C_ERR_NO_ROUTER] += 1
            return
        out = self._reserve(link_fd, TCP_HEADER + REQUEST_HEAD + pkt.body_len)
        if out == NULL:
            return
        head = out + tcp_header(out, REQUEST_HEAD + pkt.body_len, pkt.action, pkt.seq)
        put64(head + REQUEST_CONN, make_handle(c.gen, fd))
        # not logged in: the address key instead, marked (Server.serve tells them apart)
        put64(head + REQUEST_USER, c.user if c.user else peer_field(c.peer, c.state == S_WS))
        memcpy(head + REQUEST_HEAD, pkt.body, pkt.body_len)
        self.conns[link_fd].outlen += <uint32_t>(TCP_HEADER + REQUEST_HEAD + pkt.body_len)
        if c.inflight < 0xFFFF:
            c.inflight += 1             # a close waits for the answer
        if c.user == 0 or c.inflight >= self.max_inflight:
            # it may be logging in: hold its next requests until this answer; or it has
            # enough waiting already: read no more of it (its requests stay in the kernel)
            c.flags |= F_PAUSED

    cdef void _route_request(self, int fd, packet_t* pkt) noexcept:
        """Router mode: a worker's forwarded request, straight to ``on_request``.

        The link slot's ``user`` field holds the worker index + 1 (set_link_index),
        which goes into the top 8 bits of the connection id.
        """
        cdef uint64_t conn = router_conn(self.conns[fd].user - 1, get64(pkt.body + REQUEST_CONN))
        try:
            self.on_request(conn, get64(pkt.body + REQUEST_USER), pkt.action, pkt.seq,
                            PyBytes_FromStringAndSize(pkt.body + REQUEST_HEAD, pkt.body_len - REQUEST_HEAD))
        except BaseException:
            log.exception("request handler failed")

    # Router mode: the commands a worker runs in C (_run_command), packed here.
    cdef char* _command(self, uint64_t link, int command, size_t head, bytes payload) noexcept:
        """Queue a command packet carrying payload after a head of fixed fields;
        returns where the caller writes the head (NULL: the link is gone, or the
        packet would be over the links' limit)."""
        cdef int fd = self._conn_fd(link)
        cdef size_t length = PyBytes_GET_SIZE(payload)
        cdef char* out
        if fd < 0:
            return NULL
        if TCP_HEADER + head + length > self.link_max_packet:
            self._refuse_link_packet(command, TCP_HEADER + head + length)
            return NULL
        out = self._reserve(fd, TCP_HEADER + head + length)
        if out == NULL:
            return NULL
        tcp_header(out, head + length, command, 0)
        memcpy(out + TCP_HEADER + head, PyBytes_AS_STRING(payload), length)
        self.conns[fd].outlen += <uint32_t>(TCP_HEADER + head + length)
        return out + TCP_HEADER

    def command_reply(self, uint64_t link, uint64_t conn, int action, int seq, bint response,
                      bytes payload):
        """Tell a worker to queue a packet to one of its connections."""
        cdef char* out = self._command(link, CMD_REPLY, REPLY_HEAD, payload)
        if out != NULL:
            put64(out + REPLY_CONN, conn)
            put16(out + REPLY_ACTION, action)
            put16(out + REPLY_SEQ, seq)
            out[REPLY_RESPONSE] = <char>response
        return out != NULL

    def command_push_user(self, uint64_t link, uint64_t user, uint64_t exclude, int action,
                          bytes payload):
        """Tell a worker to push to its connections of a user."""
        cdef char* out = self._command(link, CMD_PUSH_USER, PUSH_USER_HEAD, payload)
        if out != NULL:
            put64(out + PUSH_USER_USER, user)
            put64(out + PUSH_USER_EXCLUDE, exclude)
            put16(out + PUSH_USER_ACTION, action)
        return out != NULL

    def command_broadcast(self, uint64_t link, uint32_t group, uint64_t exclude, int action,
                          bytes payload):
        """Tell a worker to push to its members of a channel group."""
        cdef char* out = self._command(link, CMD_BROADCAST, BROADCAST_HEAD, payload)
        if out != NULL:
            put32(out + BROADCAST_GROUP, group)
            put64(out + BROADCAST_EXCLUDE, exclude)
            put16(out + BROADCAST_ACTION, action)
        return out != NULL

    def set_link_index(self, uint64_t link, uint32_t index):
        """Router mode: which worker a link leads to (0..255)."""
        cdef int fd = self._conn_fd(link)
        if fd >= 0 and self.conns[fd].flags & F_LINK and index < 256:
            self.conns[fd].user = index + 1

    cdef bint _run_command(self, packet_t* pkt) noexcept:
        """Carry out a router command in C; False: leave it to Python."""
        cdef const char* b = pkt.body
        cdef size_t n = pkt.body_len
        cdef uint64_t handle
        cdef int fd
        if pkt.action == CMD_REPLY and n >= REPLY_HEAD:
            fd = self._conn_fd(get64(b + REPLY_CONN))
            if fd >= 0:
                self._queue_packet(fd, get16(b + REPLY_ACTION), get16(b + REPLY_SEQ), b + REPLY_HEAD,
                                   n - REPLY_HEAD)
                if b[REPLY_RESPONSE]:
                    self._answered(fd)
                    if self.conns[fd].inflight < self.max_inflight:
                        self._resume(fd)
            return True
        if pkt.action == CMD_PUSH_USER and n >= PUSH_USER_HEAD:
            self._push_user(get64(b + PUSH_USER_USER), get16(b + PUSH_USER_ACTION), b + PUSH_USER_HEAD,
                            n - PUSH_USER_HEAD, get64(b + PUSH_USER_EXCLUDE))
            return True
        if pkt.action == CMD_BROADCAST and n >= BROADCAST_HEAD:
            handle = get64(b + BROADCAST_EXCLUDE)
            self._broadcast(get32(b + BROADCAST_GROUP), get16(b + BROADCAST_ACTION), b + BROADCAST_HEAD,
                            n - BROADCAST_HEAD, &handle, 1 if handle else 0, NULL)
            return True
        return False
