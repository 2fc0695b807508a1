# Growable memory every layer of the core uses (types in core/buffers.pxd).


cdef void handles_push(handle_list_t* hl, uint64_t handle) noexcept nogil:
    cdef uint64_t* grown
    if hl.length == hl.capacity:
        grown = <uint64_t*>realloc(hl.items, (hl.capacity * 2 + 64) * sizeof(uint64_t))
        if grown == NULL:
            return                      # losing a mark only delays work to the next event
        hl.items = grown
        hl.capacity = hl.capacity * 2 + 64
    hl.items[hl.length] = handle
    hl.length += 1


cdef handle_list_t handles_take(handle_list_t* hl) noexcept nogil:
    """Move the list out, leaving an empty one for work queued meanwhile."""
    cdef handle_list_t taken = hl[0]
    hl.items = NULL
    hl.length = hl.capacity = 0
    return taken


cdef bint grow(char** buf, uint32_t* capacity, size_t need, size_t first) noexcept nogil:
    """Double a buffer's capacity (from ``first``) until ``need`` fits; False: no memory."""
    cdef size_t cap = capacity[0] * 2 if capacity[0] else first
    cdef char* grown
    while cap < need:
        cap *= 2
    grown = <char*>realloc(buf[0], cap)
    if grown == NULL:
        return False
    buf[0] = grown
    capacity[0] = <uint32_t>cap
    return True
