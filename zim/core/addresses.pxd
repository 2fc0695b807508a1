# The address table (--max-conns-per-address): connections per client address over the
# whole server, in counters every worker shares. See core/addresses.pyx.
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    ADDRESS_SLOTS = 65536
    ADDRESS_HEADER_BYTES = 4096

cdef struct address_header_t:
    uint64_t magic
    uint32_t slots
    uint32_t regions
    uint64_t key[4]         # [0], [1]: IPv6 /64 -> peer key; [2], [3]: peer key -> slot

cdef struct address_table_t:
    uint32_t* counts        # regions x ADDRESS_SLOTS; NULL: not counting
    uint32_t* own           # this process's region
    uint32_t regions
    uint64_t key[4]
