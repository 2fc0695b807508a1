# Channel groups and the broadcast path: who is in a group, and how one push reaches
# every member in one C loop.
#
# A broadcast is framed once per framing (TCP, WebSocket, each plain or compressed) into the
# group's pass buffer (pass_out_t, core/groups.pxd). A member with nothing else queued is
# given a slice of it by reference (F_SHARED) and written straight from it at the flush,
# so a message is not copied into a thousand connection buffers; the kernel not taking
# it all, or anything else queued to the member, turns the slice into a copy of its own.
# The pass buffer lives while the pass is open and any member still points into it.


cdef inline uint64_t* group_members(group_t* g) noexcept nogil:
    """A group's member handles: the inline one, or its array."""
    return &g.members.one if g.capacity == 0 else g.members.array


cdef inline ssize_t member_index(group_t* g, uint64_t conn) noexcept nogil:
    """Where ``conn`` is in a group's member array (a scan), -1 if not there."""
    cdef uint64_t* members = group_members(g)
    cdef size_t i
    for i in range(g.length):
        if members[i] == conn:
            return <ssize_t>i
    return -1


cdef inline void group_drop(group_t* g, size_t i) noexcept nogil:
    """Remove member ``i`` (the last takes its place); down to one member, the
    array goes and the member is kept inline again."""
    cdef uint64_t* members = group_members(g)
    cdef uint64_t* array
    g.length -= 1
    members[i] = members[g.length]
    if g.capacity and g.length <= 1:
        array = g.members.array
        g.members.one = array[0] if g.length else 0
        g.capacity = 0
        free(array)


cdef inline size_t group_slot(size_t group, size_t mask) noexcept nogil:
    """Where a group's pass buffer is looked for first in the pass table."""
    return <size_t>((<uint64_t>group * 0x9E3779B97F4A7C15ULL) >> 32) & mask


cdef inline bint is_excluded(uint64_t handle, const uint64_t* excluded, size_t n,
                             uint8_t* found) noexcept nogil:
    """Binary search of a sorted handle array; marks found[k] when it is there."""
    cdef size_t low = 0, high = n, middle
    while low < high:
        middle = (low + high) // 2
        if excluded[middle] < handle:
            low = middle + 1
        elif excluded[middle] > handle:
            high = middle
        else:
            if found != NULL:
                found[middle] = 1
            return True
    return False


cdef inline int slice_framing(const conn_t* c) noexcept nogil:
    """Which of its pass buffer's framings a sharing member's slice is in."""
    if c.flags & F_SHARED_DEFLATE:
        return FRAMING_DEFLATE if c.state == S_WS else FRAMING_TCP_DEFLATE
    return FRAMING_WS if c.state == S_WS else FRAMING_TCP


cdef inline bint takes_deflated(const conn_t* c, size_t length) noexcept nogil:
    """Whether a member gets a push of ``length`` body bytes compressed, if it shrinks:
    a WebSocket that agreed on deflate (and whose window fits), or a TCP client that
    asked at login."""
    if c.state == S_WS:
        return ws_deflate_fits(c.deflate_bits, length + WS_PACKET_HEADER)
    return (c.flags & F_TCP_DEFLATE) != 0


cdef void pass_out_unref(pass_out_t* p) noexcept nogil:
    """Drop one reference to a pass buffer (a member's slice, or its open pass)."""
    cdef int framing
    p.refs -= 1
    if p.refs == 0:
        for framing in range(FRAMINGS):
            free(p.framed[framing].data)
        free(p)


cdef class Groups(Users):
    """Channel groups and broadcasts (the Reactor's fourth layer)."""

    def __dealloc__(self):
        cdef size_t i
        if self.groups != NULL:
            for i in range(self.groups_cap):
                if self.groups[i].capacity:
                    free(self.groups[i].members.array)
            free(self.groups)
        free(self.pass_outs.items)
        free(self.pass_table)

    cdef group_t* _group(self, size_t group, bint create) noexcept:
        cdef group_t* grown
        cdef size_t cap
        if group >= self.groups_cap:
            if not create:
                return NULL
            # ids are dense and handed out one by one: grow by a quarter, so that
            # at 90,000 groups the slack is ~12% of 16 B, not up to a half
            cap = self.groups_cap + self.groups_cap // 4 if self.groups_cap else 64
            if cap <= group:
                cap = group + 1 + group // 4
            grown = <group_t*>realloc(self.groups, cap * sizeof(group_t))
            if grown == NULL:
                return NULL
            memset(grown + self.groups_cap, 0, (cap - self.groups_cap) * sizeof(group_t))
            self.groups = grown
            self.groups_cap = cap
        return &self.groups[group]

    def group_add(self, size_t group, uint64_t conn, bint check_duplicate=True):
        """Add a connection to a channel group (this worker's push list)."""
        cdef group_t* g
        cdef uint64_t* grown
        cdef size_t cap
        if self._conn_fd(conn) < 0:
            return False
        g = self._group(group, True)
        if g == NULL:
            raise MemoryError()
        if check_duplicate and member_index(g, conn) >= 0:
            return False
        if g.capacity == 0:
            if g.length == 0:           # most groups on a worker: one member, inline
                g.members.one = conn
                g.length = 1
                return True
            # 3, 5, 7, 11, 17 ... handles: an odd count fills a malloc chunk (16n + 8 B)
            grown = <uint64_t*>malloc(3 * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            grown[0] = g.members.one
            g.members.array = grown
            g.capacity = 3
        elif g.length == g.capacity:
            if g.capacity > 0xA0000000:     # half as much again must fit in 32 bits
                raise MemoryError("group too large")
            cap = (g.capacity + g.capacity // 2) | 1    # by half: a few members, little slack
            grown = <uint64_t*>realloc(g.members.array, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            g.members.array = grown
            g.capacity = <uint32_t>cap
        g.members.array[g.length] = conn
        g.length += 1
        return True

    def group_remove(self, size_t group, uint64_t conn):
        """Remove a connection from a group (closed connections drop out by themselves)."""
        cdef group_t* g = self._group(group, False)
        cdef ssize_t i = member_index(g, conn) if g != NULL else -1
        if i < 0:
            return False
        group_drop(g, i)
        return True

    def group_has(self, size_t group, uint64_t conn):
        """Whether a connection is in a group (a scan of the group)."""
        cdef group_t* g = self._group(group, False)
        return g != NULL and member_index(g, conn) >= 0

    def broadcast(self, size_t group, int action, bytes payload, uint64_t exclude_conn=0):
        """Queue one push to every live member of a group in one C loop; returns how many."""
        return self._broadcast(group, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                               &exclude_conn, 1 if exclude_conn else 0, NULL)

    def broadcast_except(self, size_t group, int action, bytes payload, excluded):
        """``broadcast`` leaving out every connection of ``excluded`` (handles);
        returns (how many were queued, the excluded connections that are members)."""
        cdef list handles = sorted(set(excluded))
        cdef size_t n = len(handles), i
        cdef uint64_t* sorted_handles = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
        cdef uint8_t* found = <uint8_t*>calloc(max(n, 1), 1)
        cdef int count
        if sorted_handles == NULL or found == NULL:
            free(sorted_handles)
            free(found)
            raise MemoryError()
        try:
            for i in range(n):
                sorted_handles[i] = handles[i]
            count = self._broadcast(group, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                                    sorted_handles, n, found)
            return count, [sorted_handles[i] for i in range(n) if found[i]]
        finally:
            free(sorted_handles)
            free(found)

    cdef int _broadcast(self, size_t group, int action, const char* body, size_t length,
                        const uint64_t* excluded, size_t n_excluded, uint8_t* found) noexcept:
        """Frame the push once per framing into the group's pass buffer; each
        member gets its slice of it (or a copy when it has other output queued).
        ``excluded``: sorted handles left out; ``found[k]`` (if not NULL) is set
        when excluded[k] is a member."""
        cdef group_t* g = self._group(group, False)
        cdef pass_out_t* p
        cdef uint64_t* members
        cdef size_t i = 0
        cdef uint32_t start[FRAMINGS]
        cdef uint32_t end[FRAMINGS]
        cdef uint64_t handle
        cdef int fd, kind, packed, count = 0
        cdef int tried[FRAMINGS]        # a compressed framing: 0 not tried yet, 1 framed, -1 none (plain)
        if g == NULL:
            return 0
        memset(start, 0, sizeof(start))
        memset(end, 0, sizeof(end))
        memset(tried, 0, sizeof(tried))
        if g.length == 0:
            return 0
        p = self._pass_out(group)
        members = group_members(g)
        while i < g.length:
            handle = members[i]
            fd = self._conn_fd(handle)
            if fd < 0:                  # closed since it joined: drop it here
                group_drop(g, i)
                members = group_members(g)  # it may be inline now
                continue
            i += 1
            if n_excluded and is_excluded(handle, excluded, n_excluded, found):
                continue
            kind = FRAMING_WS if self.conns[fd].state == S_WS else FRAMING_TCP
            if p != NULL and takes_deflated(&self.conns[fd], length):
                packed = FRAMING_DEFLATE if kind == FRAMING_WS else FRAMING_TCP_DEFLATE
                if tried[packed] == 0:  # compressed once, for every member taking that framing
                    tried[packed] = 1 if self._frame_deflated(&p.framed[packed], packed, action, body, length,
                                                              &start[packed], &end[packed]) else -1
                if tried[packed] == 1:
                    kind = packed
            if p != NULL and end[kind] == 0 and not self._frame_shared(
                    &p.framed[kind], kind, action, body, length, &start[kind], &end[kind]):
                p = NULL                # out of memory: copy into each member instead
            if p == NULL or (self.conns[fd].state != S_TCP and self.conns[fd].state != S_WS):
                count += self._queue_packet(fd, action, 0, body, length)
            else:
                count += self._queue_shared(fd, p, kind, start[kind], end[kind])
        self.counters[C_DELIVERIES_CHANNEL] += <uint64_t>count
        return count

    cdef pass_out_t* _pass_out(self, size_t group) noexcept:
        """The group's buffer for this pass (made on its first broadcast); NULL: no memory."""
        cdef pass_out_t* p
        cdef size_t mask, i
        if (self.pass_outs.length + 1) * 2 > self.pass_table_cap and not self._grow_pass_table():
            return NULL
        mask = self.pass_table_cap - 1
        i = group_slot(group, mask)
        while self.pass_table[i] != NULL:
            if self.pass_table[i].group == group:
                return self.pass_table[i]
            i = (i + 1) & mask
        p = <pass_out_t*>calloc(1, sizeof(pass_out_t))
        if p == NULL:
            return NULL
        p.refs = 1                      # the pass's own reference, dropped by _end_pass
        p.group = group
        p.slot = i
        handles_push(&self.pass_outs, <uint64_t><size_t>p)
        if self.pass_outs.length == 0 or self.pass_outs.items[self.pass_outs.length - 1] != <uint64_t><size_t>p:
            free(p)                     # could not list it for _end_pass
            return NULL
        self.pass_table[i] = p
        return p

    cdef bint _grow_pass_table(self) noexcept:
        """Double the pass table (at most half full), moving this pass's buffers over."""
        cdef size_t cap = self.pass_table_cap * 2 if self.pass_table_cap else 16, mask = cap - 1, i, n
        cdef pass_out_t** table = <pass_out_t**>calloc(cap, sizeof(pass_out_t*))
        cdef pass_out_t* p
        if table == NULL:
            return False
        for n in range(self.pass_outs.length):
            p = <pass_out_t*><size_t>self.pass_outs.items[n]
            i = group_slot(p.group, mask)
            while table[i] != NULL:
                i = (i + 1) & mask
            table[i] = p
            p.slot = i
        free(self.pass_table)
        self.pass_table = table
        self.pass_table_cap = cap
        return True

    cdef bint _frame_shared(self, shared_buf_t* buf, int kind, int action, const char* body,
                            size_t length, uint32_t* start, uint32_t* end) noexcept:
        """Append one push packet to a pass buffer; its bytes are [start, end)."""
        cdef size_t need = buf.length + WS_MAX_FRAME_HEADER + WS_PACKET_HEADER + length
        if need > buf.capacity and (need > self.outbuf_limit or not grow(&buf.data, &buf.capacity,
                                                                        need, 4096)):
            return False
        start[0] = buf.length
        if kind:
            buf.length += <uint32_t>ws_packet_header(buf.data + buf.length, length, action, 0)
        else:
            buf.length += <uint32_t>tcp_header(buf.data + buf.length, length, action, 0)
        memcpy(buf.data + buf.length, body, length)
        buf.length += <uint32_t>length
        end[0] = buf.length
        return True

    cdef bint _frame_deflated(self, shared_buf_t* buf, int kind, int action, const char* body,
                              size_t length, uint32_t* start, uint32_t* end) noexcept:
        """Append the push, compressed in framing ``kind`` (FRAMING_DEFLATE or
        FRAMING_TCP_DEFLATE), to a pass buffer; False when it goes out uncompressed
        (too short or not made smaller) or there is no memory."""
        cdef size_t deflated, need
        if kind == FRAMING_DEFLATE:
            deflated = ws_deflate(&self.z, action, 0, body, length)
        else:
            deflated = tcp_deflate(&self.z, body, length, self.tcp_deflate_min)
        need = buf.length + WS_MAX_FRAME_HEADER + deflated
        if deflated == 0:
            return False
        if need > buf.capacity and (need > self.outbuf_limit or not grow(&buf.data, &buf.capacity,
                                                                        need, 4096)):
            return False
        start[0] = buf.length
        if kind == FRAMING_DEFLATE:
            buf.length += <uint32_t>ws_deflated_header(buf.data + buf.length, deflated)
        else:
            buf.length += <uint32_t>tcp_header(buf.data + buf.length, deflated, action, SEQ_DEFLATED)
        memcpy(buf.data + buf.length, self.z.deflated, deflated)
        buf.length += <uint32_t>deflated
        end[0] = buf.length
        self.counters[C_DEFLATED_OUT if kind == FRAMING_DEFLATE else C_TCP_DEFLATED_OUT] += 1
        return True

    cdef bint _queue_shared(self, int fd, pass_out_t* p, int kind, uint32_t start,
                            uint32_t end) noexcept:
        """Give a member bytes [start, end) of a pass buffer: by reference when it
        has nothing else queued (or its slice ends at start), else as a copy."""
        cdef conn_t* c = &self.conns[fd]
        cdef char* out
        if c.flags & F_SHUT:
            return False
        if c.flags & F_SHARED and <pass_out_t*>c.outbuf == p and c.outcap + c.outlen == start \
                and slice_framing(c) == kind:
            c.outlen += end - start     # the next message of the same pass: still one slice
            return True
        if c.outlen == 0 and not (c.flags & F_SHARED):
            free(c.outbuf)              # an empty own buffer kept by a waiting close
            c.outbuf = <char*>p
            c.outcap = start
            c.outlen = end - start
            c.flags |= F_SHARED | (F_SHARED_DEFLATE if kind >= FRAMING_DEFLATE else 0)
            p.refs += 1
            self._mark_pending(fd)
            return True
        out = self._reserve(fd, end - start)
        if out == NULL:
            return False
        memcpy(out, p.framed[kind].data + start, end - start)
        c.outlen += end - start
        return True

    cdef int _write_shared(self, int fd) noexcept:
        """Write a member's slice straight from the pass buffer; what the kernel
        does not take is copied into the member's own buffer. -1: closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef pass_out_t* p = <pass_out_t*>c.outbuf
        cdef ssize_t n
        while True:
            n = write(fd, p.framed[slice_framing(c)].data + c.outcap, c.outlen)
            if n >= 0 or errno != EINTR:
                break
        if n < 0:
            if errno != EAGAIN:
                self._close(fd)         # EPIPE, ECONNRESET: the peer is gone
                return -1
            n = 0
        self.counters[C_BYTES_OUT] += <uint64_t>n
        return 0 if self._unshare(fd, n) else -1

    cdef bint _unshare(self, int fd, size_t sent) noexcept:
        """Turn a member's slice into its own buffer, minus the first ``sent``
        bytes (already written). False: out of memory, the connection was closed."""
        cdef conn_t* c = &self.conns[fd]
        cdef pass_out_t* p = <pass_out_t*>c.outbuf
        cdef size_t rest = c.outlen - sent
        cdef char* own = NULL
        if rest:
            own = <char*>malloc(rest)
            if own != NULL:
                memcpy(own, p.framed[slice_framing(c)].data + c.outcap + sent, rest)
        c.flags &= ~(F_SHARED | F_SHARED_DEFLATE)
        c.outbuf = own
        c.outlen = c.outcap = <uint32_t>(rest if own != NULL else 0)
        pass_out_unref(p)
        if rest and own == NULL:
            self._close_for(fd, R_NO_MEMORY)
            return False
        return True

    cdef void _end_pass(self) noexcept:
        """After the flush: the next broadcasts start new pass buffers. Slices
        still queued (a member the kernel did not take all from) keep theirs alive."""
        cdef handle_list_t batch = handles_take(&self.pass_outs)
        cdef pass_out_t* p
        cdef size_t i
        for i in range(batch.length):
            p = <pass_out_t*><size_t>batch.items[i]
            self.pass_table[p.slot] = NULL  # every entry goes, so no probe chain is cut
            pass_out_unref(p)
        free(batch.items)
