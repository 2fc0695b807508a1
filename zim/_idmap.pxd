# A compact C hash table from 64-bit ids (never 0) to 64-bit values: open
# addressing, linear probing, backward-shift deletion (no tombstones). About
# 16 bytes per slot at most 70% full: the per-user cost of presence tables.
from libc.stdint cimport uint64_t

cdef struct idmap_t:
    uint64_t* keys
    uint64_t* values
    size_t capacity          # a power of two
    size_t count

cdef int idmap_init(idmap_t* m) noexcept nogil
cdef void idmap_free(idmap_t* m) noexcept nogil
cdef uint64_t* idmap_find(idmap_t* m, uint64_t key) noexcept nogil      # NULL if absent
cdef uint64_t* idmap_insert(idmap_t* m, uint64_t key, uint64_t initial) noexcept nogil  # NULL: no memory
cdef bint idmap_delete(idmap_t* m, uint64_t key) noexcept nogil
