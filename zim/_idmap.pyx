# cython: language_level=3
"""A compact id -> value hash table in C (see _idmap.pxd), and ``IdMap`` for Python."""
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free


cdef inline size_t _hash(uint64_t key) noexcept nogil:
    key ^= key >> 33
    key *= 0xff51afd7ed558ccdULL
    key ^= key >> 33
    return <size_t>key


cdef inline size_t _slot(idmap_t* m, uint64_t key) noexcept nogil:
    cdef size_t mask = m.capacity - 1
    cdef size_t i = _hash(key) & mask
    while m.keys[i] != 0 and m.keys[i] != key:
        i = (i + 1) & mask
    return i


cdef int idmap_init(idmap_t* m) noexcept nogil:
    m.capacity = 1024
    m.count = 0
    m.keys = <uint64_t*>calloc(m.capacity, sizeof(uint64_t))
    m.values = <uint64_t*>calloc(m.capacity, sizeof(uint64_t))
    return 0 if m.keys != NULL and m.values != NULL else -1


cdef void idmap_free(idmap_t* m) noexcept nogil:
    free(m.keys)
    free(m.values)
    m.keys = m.values = NULL
    m.capacity = m.count = 0


cdef bint _grow(idmap_t* m) noexcept nogil:
    cdef idmap_t old = m[0]
    cdef size_t i, j
    m.keys = <uint64_t*>calloc(old.capacity * 2, sizeof(uint64_t))
    m.values = <uint64_t*>calloc(old.capacity * 2, sizeof(uint64_t))
    if m.keys == NULL or m.values == NULL:
        free(m.keys)
        free(m.values)
        m[0] = old
        return False
    m.capacity = old.capacity * 2
    for i in range(old.capacity):
        if old.keys[i]:
            j = _slot(m, old.keys[i])
            m.keys[j] = old.keys[i]
            m.values[j] = old.values[i]
    free(old.keys)
    free(old.values)
    return True


cdef uint64_t* idmap_find(idmap_t* m, uint64_t key) noexcept nogil:
    cdef size_t i
    if key == 0:
        return NULL
    i = _slot(m, key)
    return &m.values[i] if m.keys[i] == key else NULL


cdef uint64_t* idmap_insert(idmap_t* m, uint64_t key, uint64_t initial) noexcept nogil:
    """The value slot of key, added with ``initial`` if it was absent."""
    cdef size_t i
    if key == 0:
        return NULL
    if (m.count + 1) * 10 > m.capacity * 7 and not _grow(m):
        return NULL
    i = _slot(m, key)
    if m.keys[i] != key:
        m.keys[i] = key
        m.values[i] = initial
        m.count += 1
    return &m.values[i]


cdef bint idmap_delete(idmap_t* m, uint64_t key) noexcept nogil:
    cdef size_t mask = m.capacity - 1, i, j, k
    if key == 0:
        return False
    i = _slot(m, key)
    if m.keys[i] != key:
        return False
    m.keys[i] = 0
    m.count -= 1
    j = i
    while True:                     # shift back entries that probed past i
        j = (j + 1) & mask
        if m.keys[j] == 0:
            return True
        k = _hash(m.keys[j]) & mask
        if (j > i and (k <= i or k > j)) or (j < i and (k <= i and k > j)):
            m.keys[i] = m.keys[j]
            m.values[i] = m.values[j]
            m.keys[j] = 0
            i = j


cdef class IdMap:
    """id (int > 0) -> int value, in C: about 23 bytes per entry.

    Used for presence bitmasks in the router: ``set_bits``/``clear_bits`` on one
    id, ``clear_bits_everywhere`` when a worker dies; and for counts (each user's
    connections on a worker): ``add_one``, ``release``.
    """
    cdef idmap_t m

    def __cinit__(self):
        if idmap_init(&self.m) < 0:
            raise MemoryError()

    def __dealloc__(self):
        idmap_free(&self.m)

    def __len__(self):
        return self.m.count

    def __copy__(self):
        """An independent copy (a store's state kept to compare against, in tests)."""
        cdef IdMap other = IdMap()
        cdef size_t i
        cdef uint64_t* v
        for i in range(self.m.capacity):
            if self.m.keys[i]:
                v = idmap_insert(&other.m, self.m.keys[i], self.m.values[i])
                if v == NULL:
                    raise MemoryError()
                v[0] = self.m.values[i]
        return other

    def __deepcopy__(self, memo):
        return self.__copy__()

    def get(self, uint64_t key, uint64_t default=0):
        cdef uint64_t* v = idmap_find(&self.m, key)
        return v[0] if v != NULL else default

    def set(self, uint64_t key, uint64_t value):
        cdef uint64_t* v = idmap_insert(&self.m, key, value)
        if v == NULL:
            raise MemoryError() if key else ValueError("id 0 is not allowed")
        v[0] = value

    def delete(self, uint64_t key):
        return idmap_delete(&self.m, key)

    def set_bits(self, uint64_t key, uint64_t bits):
        """value |= bits (the entry is created if absent)."""
        cdef uint64_t* v = idmap_insert(&self.m, key, 0)
        if v == NULL:
            raise MemoryError() if key else ValueError("id 0 is not allowed")
        v[0] |= bits

    def clear_bits(self, uint64_t key, uint64_t bits):
        """value &= ~bits; the entry goes when no bit is left."""
        cdef uint64_t* v = idmap_find(&self.m, key)
        if v != NULL:
            v[0] &= ~bits
            if v[0] == 0:
                idmap_delete(&self.m, key)

    def clear_bits_everywhere(self, uint64_t bits):
        """Clear bits in every entry (one C pass), dropping emptied entries;
        returns the ids whose entries were dropped (e.g. the users a dead worker
        held and no other worker does)."""
        cdef size_t i = 0
        cdef uint64_t key
        cdef list emptied = []
        while i < self.m.capacity:
            key = self.m.keys[i]
            if key and self.m.values[i] & bits:
                self.m.values[i] &= ~bits
                if self.m.values[i] == 0:
                    idmap_delete(&self.m, key)
                    emptied.append(key)
                    continue        # a shifted entry may now sit at i
            i += 1
        return emptied

    def add_one(self, uint64_t key):
        """value += 1 (the entry is created at 0 if absent)."""
        cdef uint64_t* v = idmap_insert(&self.m, key, 0)
        if v == NULL:
            raise MemoryError() if key else ValueError("id 0 is not allowed")
        v[0] += 1

    def sub_one(self, uint64_t key):
        """value -= 1; the entry goes at 0 (an absent one stays absent)."""
        cdef uint64_t* v = idmap_find(&self.m, key)
        if v != NULL:
            if v[0] <= 1:
                idmap_delete(&self.m, key)
            else:
                v[0] -= 1

    def release(self, bytes keys):
        """value -= 1 for each 8-byte big-endian id in ``keys`` (a worker's list of
        closed connections' users); an entry at 0 goes; never below 0."""
        cdef const unsigned char* p = keys
        cdef size_t i, j, n = len(keys) // 8
        cdef uint64_t key
        cdef uint64_t* v
        for i in range(n):
            key = 0
            for j in range(8):
                key = (key << 8) | p[8 * i + j]
            v = idmap_find(&self.m, key)
            if v == NULL:
                continue
            if v[0] <= 1:
                idmap_delete(&self.m, key)
            else:
                v[0] -= 1
