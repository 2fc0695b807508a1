# The address table: a client's address key (what --max-conns-per-address counts under)
# and the counters of connections per key, shared by every worker of a server. Nearly
# standalone: the accept path (core/conns.pyx) calls peer_key, address_admit and
# address_release; the router makes the shared table with the Python functions below.
#
# A client's address key (conn_t.peer), set at accept from the address accept4 gives:
# - IPv4: the address itself, as a host-order int (127.0.0.5 is 0x7F000005);
# - an IPv4-mapped IPv6 address (a dual-stack listener): that IPv4 address, the same key;
# - any other IPv6 address: its /64 prefix (what one subscriber or host is given) through
#   SipHash-2-4 under a secret key into 32 bits, never 0: one client holding a whole /64
#   is one address. The key is random per server start and the same in every worker (the
#   router writes it into the address table's header), so an address has one key
#   everywhere in a server. A hashed key may equal an IPv4 key or another prefix's
#   (a chance of 2**-32 a pair): the two then count together, which can only overcount;
# - anything else: 0, not counted.
# Worker mode forwards a request of a connection not logged in with PEER_MARK | peer in
# its user field (core/wire.pxd), so the router (Server.serve) tells a user id from an address.

# The address table (--max-conns-per-address): connections per address over the whole
# server. A 4 KiB header (address_header_t: the keys) and one region per serving process
# (a worker, or the single process) of ADDRESS_SLOTS uint32 counters. A connection counts
# in slot SipHash(key, peer) mod ADDRESS_SLOTS of its own process's region: each process
# writes only its own region (one writer: no atomics); at accept it adds the slot up over
# every region (<= 64 reads) against the limit. The slot is keyed, so nobody can aim at
# another address's slot; addresses that share a slot count together (a collision only
# overcounts: a client may be refused a little early, never let past). Workers accepting
# the same address in the same instant may each see the count under the limit, so it can
# pass the limit by workers - 1 at most (each admits one at a time). With workers the router makes the table in
# shared memory (a memfd) and passes it on; a restarted worker clears its region (its
# connections are gone), as the router does when a worker dies. In one process it is one
# region of local memory. Memory: 256 KiB of address space a region, touched only where used.
cdef uint64_t ADDRESS_MAGIC = 0x5a494d4144445231ULL     # "ZIMADDR1"
ADDRESS_REGION_BYTES = ADDRESS_SLOTS * 4


cdef inline uint64_t rotl64(uint64_t x, int bits) noexcept nogil:
    return (x << bits) | (x >> (64 - bits))


cdef inline void sip_round(uint64_t* v) noexcept nogil:
    v[0] += v[1]; v[1] = rotl64(v[1], 13); v[1] ^= v[0]; v[0] = rotl64(v[0], 32)
    v[2] += v[3]; v[3] = rotl64(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = rotl64(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = rotl64(v[1], 17); v[1] ^= v[2]; v[2] = rotl64(v[2], 32)


cdef uint64_t siphash_u64(uint64_t k0, uint64_t k1, uint64_t m) noexcept nogil:
    """SipHash-2-4 of one 8-byte message (``m``'s bytes, little-endian)."""
    cdef uint64_t v[4]
    cdef uint64_t b = (<uint64_t>8) << 56     # the message length (8 bytes) in the top byte
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    v[3] ^= m
    sip_round(v)
    sip_round(v)
    v[0] ^= m
    v[3] ^= b
    sip_round(v)
    sip_round(v)
    v[0] ^= b
    v[2] ^= 0xff
    sip_round(v)
    sip_round(v)
    sip_round(v)
    sip_round(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef uint32_t ipv6_key(const unsigned char* a, const uint64_t* key) noexcept nogil:
    """The peer key of a 16-byte IPv6 address (see the top of this file)."""
    cdef int i
    cdef uint32_t hashed
    for i in range(10):
        if a[i]:
            break
    else:
        if a[10] == 0xff and a[11] == 0xff:        # ::ffff:a.b.c.d
            return get32(<const char*>a + 12)
    hashed = <uint32_t>siphash_u64(key[0], key[1], get64(<const char*>a))
    return hashed if hashed else 1


cdef uint32_t peer_key(const sockaddr_storage* addr, socklen_t length, const uint64_t* key) noexcept nogil:
    """The address key of what accept4 gave (see the top of this file); 0: none."""
    if addr.ss_family == AF_INET and length >= sizeof(sockaddr_in):
        return ntohl((<const sockaddr_in*>addr).sin_addr.s_addr)
    if addr.ss_family == AF_INET6 and length >= sizeof(sockaddr_in6):
        return ipv6_key((<const sockaddr_in6*>addr).sin6_addr.s6_addr, key)
    return 0


cdef inline size_t address_slot(const address_table_t* t, uint32_t peer) noexcept nogil:
    return <size_t>(siphash_u64(t.key[2], t.key[3], peer) & (ADDRESS_SLOTS - 1))


cdef uint64_t slot_total(const address_table_t* t, size_t slot) noexcept nogil:
    """Connections counted in a slot over every region (every worker)."""
    cdef uint64_t total = 0
    cdef uint32_t region
    for region in range(t.regions):
        total += t.counts[<size_t>region * ADDRESS_SLOTS + slot]
    return total


cdef uint64_t address_count(const address_table_t* t, uint32_t peer) noexcept nogil:
    """Connections counted in peer's slot over every region (every worker)."""
    return slot_total(t, address_slot(t, peer))


cdef bint address_admit(address_table_t* t, uint32_t peer, uint64_t limit) noexcept nogil:
    """Count one more connection of peer in this process's region, unless its slot
    holds ``limit`` already (then False: refuse it)."""
    cdef size_t slot = address_slot(t, peer)
    if slot_total(t, slot) >= limit:
        return False
    t.own[slot] += 1
    return True


cdef void address_release(address_table_t* t, uint32_t peer) noexcept nogil:
    cdef size_t slot = address_slot(t, peer)
    if t.own[slot]:
        t.own[slot] -= 1


cdef void random_keys(uint64_t* key) noexcept:
    """Four new secret 64-bit keys (address_header_t.key, address_table_t.key)."""
    cdef bytes raw = os.urandom(32)
    cdef int i
    for i in range(4):
        key[i] = get64(PyBytes_AS_STRING(raw) + 8 * i)


def address_table_bytes(uint32_t regions):
    """The size of an address table of ``regions`` regions (one per worker)."""
    return ADDRESS_HEADER_BYTES + <size_t>regions * ADDRESS_REGION_BYTES


def init_address_table(buffer, uint32_t regions):
    """Write the header of a new address table (zeroed memory of address_table_bytes
    (regions)): new random keys, for every process of one server start."""
    cdef unsigned char[::1] view = memoryview(buffer).cast("B")
    cdef address_header_t* header
    if regions < 1 or <size_t>view.shape[0] < address_table_bytes(regions):
        raise ValueError("address table too small")
    header = <address_header_t*>&view[0]
    header.slots = ADDRESS_SLOTS
    header.regions = regions
    random_keys(header.key)
    header.magic = ADDRESS_MAGIC


cdef void clear_region(uint32_t* region) noexcept nogil:
    """Zero one region, giving its pages back when it is shared memory."""
    if madvise(<void*>region, ADDRESS_SLOTS * sizeof(uint32_t), MADV_REMOVE) < 0:
        memset(region, 0, ADDRESS_SLOTS * sizeof(uint32_t))


cdef int local_address_table(address_table_t* t) except -1:
    """One region of local memory (a single process, or until a shared table is given):
    calloc, so pages never used cost nothing."""
    t.counts = <uint32_t*>calloc(ADDRESS_SLOTS, sizeof(uint32_t))
    if t.counts == NULL:
        raise MemoryError("reactor setup failed")
    t.own = t.counts
    t.regions = 1
    return 0


cdef tuple address_refusals(uint32_t limit):
    """What a connection over the limit is told, for TCP and for WebSocket, one write each."""
    cdef bytes body = (b'{"error":{"code":"too_many_connections","message":"at most %d connections per address"}}'
                       % limit)
    cdef bytes tcp = PyBytes_FromStringAndSize(NULL, TCP_HEADER + len(body))
    tcp_header(PyBytes_AS_STRING(tcp), len(body), 0, 0)
    memcpy(PyBytes_AS_STRING(tcp) + TCP_HEADER, PyBytes_AS_STRING(body), len(body))
    body = b"at most %d connections per address\n" % limit
    return tcp, (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\n"
                 b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


cdef int open_address_table(object buffer, uint32_t index, address_table_t* t) except -1:
    """Point ``t`` at a shared table's counters (index: this process's region)."""
    cdef unsigned char[::1] view = memoryview(buffer).cast("B")
    cdef address_header_t* header
    if <size_t>view.shape[0] < ADDRESS_HEADER_BYTES:
        raise ValueError("not an address table")
    header = <address_header_t*>&view[0]
    if header.magic != ADDRESS_MAGIC or header.slots != ADDRESS_SLOTS:
        raise ValueError("not an address table")
    if index >= header.regions or <size_t>view.shape[0] < address_table_bytes(header.regions):
        raise ValueError(f"no region {index} in this address table")
    t.counts = <uint32_t*>(&view[0] + ADDRESS_HEADER_BYTES)
    t.own = t.counts + <size_t>index * ADDRESS_SLOTS
    t.regions = header.regions
    memcpy(t.key, header.key, sizeof(t.key))
    return 0


def clear_address_region(buffer, uint32_t index):
    """Zero region ``index`` of a shared address table (its worker died: the
    connections it counted are gone)."""
    cdef address_table_t t
    open_address_table(buffer, index, &t)
    clear_region(t.own)


def _debug_siphash(uint64_t k0, uint64_t k1, uint64_t m):
    """Tests: the SipHash-2-4 the address keys and slots use."""
    return siphash_u64(k0, k1, m)


def _debug_ipv6_key(bytes address, uint64_t k0, uint64_t k1):
    """Tests: the peer key of a packed 16-byte IPv6 address under key (k0, k1)."""
    cdef uint64_t key[2]
    if len(address) != 16:
        raise ValueError("an IPv6 address is 16 bytes")
    key[0] = k0
    key[1] = k1
    return ipv6_key(<const unsigned char*>PyBytes_AS_STRING(address), key)


cdef class _DebugAddressTable:
    """Tests: one process's view of a shared address table (the functions accept and
    close use), to check the accounting without sockets."""
    cdef address_table_t t
    cdef object view

    def __init__(self, buffer, uint32_t index):
        open_address_table(buffer, index, &self.t)
        self.view = memoryview(buffer)

    def admit(self, uint32_t peer, uint64_t limit):
        return address_admit(&self.t, peer, limit)

    def release(self, uint32_t peer):
        address_release(&self.t, peer)

    def count(self, uint32_t peer):
        return address_count(&self.t, peer)

    def slot(self, uint32_t peer):
        return address_slot(&self.t, peer)

    def clear(self):
        clear_region(self.t.own)

