# Who is connected: each user's connections on this reactor (presence: a user id ->
# the first of its connections in an IdMap, then a list through conn_t.next_dev, so a
# push to a user is a walk of its few connections, in C), what the owner is told when
# users leave (once per pass, after it), and the clients' addresses as Python asks them.


cdef class Users(Timers):
    """Users' connections and clients' addresses (the Reactor's third layer)."""

    def __cinit__(self):
        if idmap_init(&self.presence) < 0:
            raise MemoryError("reactor setup failed")

    def __dealloc__(self):
        free(self.gone_users.items)
        free(self.closed_users.items)
        idmap_free(&self.presence)

    cdef void _unbind(self, int fd) noexcept:
        """Take a logged-in connection out of its user's list (it closes, or is bound anew)."""
        self._presence_unlink(self.conns[fd].user, fd)
        self.counters[C_LOGGED_IN] -= 1

    cdef void _user_closed(self, uint64_t user) noexcept:
        """A logged-in client connection closed: its user is reported after the pass
        (and as gone when that was its last connection here)."""
        if self.on_users_closed is not None:
            handles_push(&self.closed_users, user)
        if self.on_user_gone is not None and not self._has_user(user):
            handles_push(&self.gone_users, user)

    # --------------------------------------------------------- presence --
    cdef void _presence_unlink(self, uint64_t user, int fd) noexcept:
        cdef uint64_t* head = idmap_find(&self.presence, user)
        cdef int32_t cur, prev = NO_CONN
        if head == NULL:
            return
        cur = <int32_t>head[0]
        while cur != NO_CONN and cur != fd:
            prev = cur
            cur = self.conns[cur].next_dev
        if cur == NO_CONN:
            return
        if prev == NO_CONN:
            head[0] = <uint64_t><uint32_t>self.conns[fd].next_dev
        else:
            self.conns[prev].next_dev = self.conns[fd].next_dev
        self.conns[fd].next_dev = NO_CONN
        if <int32_t>head[0] == NO_CONN:
            idmap_delete(&self.presence, user)      # the user's last connection here

    cdef int32_t _first_conn(self, uint64_t user) noexcept:
        cdef uint64_t* head = idmap_find(&self.presence, user)
        return <int32_t>head[0] if head != NULL else NO_CONN

    cdef bint _has_user(self, uint64_t user) noexcept:
        return idmap_find(&self.presence, user) != NULL

    def set_user(self, uint64_t conn, uint64_t user_id):
        """Bind a connection to a user (presence on this worker)."""
        cdef int fd = self._conn_fd(conn)
        cdef uint64_t* head
        if fd < 0 or user_id == 0:
            return False
        if self.conns[fd].user:
            if self.on_users_closed is not None:
                handles_push(&self.closed_users, self.conns[fd].user)   # its count moves
            self._unbind(fd)
            self.conns[fd].user = 0
        head = idmap_insert(&self.presence, user_id, <uint64_t><uint32_t>NO_CONN)
        if head == NULL:
            raise MemoryError()
        self.counters[C_LOGGED_IN] += 1
        self.conns[fd].next_dev = <int32_t>head[0]
        head[0] = <uint64_t><uint32_t>fd
        self.conns[fd].user = user_id
        return True

    def conn_user(self, uint64_t conn):
        """The user id bound to a connection (0: none, or the connection is gone)."""
        cdef int fd = self._conn_fd(conn)
        return self.conns[fd].user if fd >= 0 else 0

    def user_conn_count(self, uint64_t user_id):
        """How many connections the user has on this reactor (a walk of its list)."""
        cdef int32_t cur = self._first_conn(user_id)
        cdef size_t count = 0
        while cur != NO_CONN:
            count += 1
            cur = self.conns[cur].next_dev
        return count

    def user_conns(self, uint64_t user_id):
        """Handles of the user's connections on this worker."""
        cdef int32_t cur = self._first_conn(user_id)
        cdef list result = []
        while cur != NO_CONN:
            result.append(make_handle(self.conns[cur].gen, cur))
            cur = self.conns[cur].next_dev
        return result

    def push_user(self, uint64_t user_id, int action, bytes payload, uint64_t exclude_conn=0):
        """Queue a push (seq 0) to every connection of a user; returns how many."""
        return self._push_user(user_id, action, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                               exclude_conn)

    cdef int _push_user(self, uint64_t user_id, int action, const char* body, size_t length,
                        uint64_t exclude_conn) noexcept:
        cdef int32_t cur = self._first_conn(user_id), nxt
        cdef int count = 0
        while cur != NO_CONN:
            nxt = self.conns[cur].next_dev   # _queue_packet may drop cur
            if make_handle(self.conns[cur].gen, cur) != exclude_conn:
                count += self._queue_packet(cur, action, 0, body, length)
            cur = nxt
        self.counters[C_DELIVERIES_USER] += <uint64_t>count
        return count

    # ----------------------------------------------------------- reports --
    cdef void _report_gone_users(self) noexcept:
        cdef handle_list_t batch = handles_take(&self.gone_users)
        cdef size_t i
        try:
            for i in range(batch.length):
                if not self._has_user(batch.items[i]):      # not back meanwhile
                    self.on_user_gone(batch.items[i])
        except BaseException:
            log.exception("user-gone handler failed")
        free(batch.items)

    cdef void _report_closed_users(self) noexcept:
        """Hand ``on_users_closed`` the user ids of the logged-in connections closed (or
        bound to another user) this pass, 8 bytes big-endian each, one per connection
        (a user closing three here is there three times); a long list in parts."""
        cdef handle_list_t batch = handles_take(&self.closed_users)
        cdef size_t i, start, n
        cdef bytes part
        try:
            for start in range(0, batch.length, CLOSED_USERS_PART):
                n = min(batch.length - start, <size_t>CLOSED_USERS_PART)
                part = PyBytes_FromStringAndSize(NULL, n * USERS_CLOSED_ENTRY)
                for i in range(n):
                    put64(PyBytes_AS_STRING(part) + USERS_CLOSED_ENTRY * i, batch.items[start + i])
                self.on_users_closed(part)
        except BaseException:
            log.exception("users-closed handler failed")
        free(batch.items)

    def request_user(self, uint64_t conn):
        """The user field a request of ``conn`` is served with, as worker mode forwards
        it (core/wire.pxd): the user id, or for a connection not logged in its address
        key with PEER_MARK (and PEER_WS on WebSocket); 0: the connection is gone."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0:
            return 0
        if self.conns[fd].user:
            return self.conns[fd].user
        return peer_field(self.conns[fd].peer, self.conns[fd].state == S_WS)

    def set_tcp_deflate(self, uint64_t conn):
        """From the next packet queued on, compress what goes to this TCP client
        (bodies of --tcp-deflate-min bytes or more: seq bit 15 set, raw DEFLATE);
        it asked at login. False: not a TCP client connection, or gone."""
        cdef int fd = self._conn_fd(conn)
        if fd < 0 or self.conns[fd].state != S_TCP or self.conns[fd].flags & F_LINK:
            return False
        self.conns[fd].flags |= F_TCP_DEFLATE
        return True

    # ---------------------------------------------------------- addresses --
    def conn_peer(self, uint64_t conn):
        """The connection's address key (core/addresses.pyx: an IPv4 client's is its
        address as an int); 0: none, or the connection is gone."""
        cdef int fd = self._conn_fd(conn)
        return self.conns[fd].peer if fd >= 0 else 0

    def address_count(self, uint32_t peer):
        """Connections counted under an address key, over every region of the address
        table (every worker; an overcount when keys share a slot); 0 when not counting."""
        if self.addresses.counts == NULL:
            return 0
        return address_count(&self.addresses, peer)

    def share_address_table(self, buffer, uint32_t index):
        """Worker mode: count connections per address in region ``index`` of a table
        the router made (shared memory, ``init_address_table``), and take its keys, so
        every worker gives an address the same key. Before any client connection;
        the region is cleared first (a restarted worker's predecessor's are gone)."""
        cdef address_table_t table
        cdef int fd
        for fd in range(self.high_fd + 1):
            if self.conns[fd].state >= S_TCP and not (self.conns[fd].flags & F_LINK):
                raise ValueError("share the address table before accepting clients")
        open_address_table(buffer, index, &table)
        clear_region(table.own)
        if self.addresses_local:
            free(self.addresses.counts)
            self.addresses_local = False
        self.addresses = table
        self.shared_addresses = memoryview(buffer)
