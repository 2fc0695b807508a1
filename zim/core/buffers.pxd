# Growable memory every layer of the core uses: lists of connection handles (work for
# later in the pass, or the next one) and byte buffers that double as they fill.
from libc.stdint cimport uint32_t, uint64_t


# A growable list of connection handles; entries may go stale (checked on use).
cdef struct handle_list_t:
    uint64_t* items
    size_t length
    size_t capacity
