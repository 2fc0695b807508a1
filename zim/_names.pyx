# cython: language_level=3
"""``Names``: strings interned to dense ids 0, 1, 2 ... that are never given back,
held in C (issue 18): the UTF-8 bytes of every name end to end in one heap, an
array of where each starts, and an open-addressing hash of ids. A name costs its
bytes, a 4-byte offset and a few bytes of hash slots: no Python object per name.
Every worker interns the channels it has members of, so on many workers this is
paid once per (worker, channel); the names' bytes may add up to 4 GiB.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy


cdef inline uint32_t _hash(const char* name, size_t length) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325ULL          # FNV-1a, then mixed
    cdef size_t i
    for i in range(length):
        h = (h ^ <unsigned char>name[i]) * 0x100000001b3ULL
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    return <uint32_t>h


cdef class Names:
    """Names interned to dense ids (``intern``), each kept until the object goes."""

    cdef char* heap                 # every name's UTF-8 bytes, end to end
    cdef size_t heap_len, heap_cap
    cdef uint32_t* starts           # starts[i]: where name i begins; starts[count]: heap_len
    cdef size_t count, starts_cap
    cdef uint32_t* slots            # id + 1; 0: empty (linear probing, at most 70% full)
    cdef size_t slots_cap           # a power of two

    def __cinit__(self):
        self.starts = <uint32_t*>calloc(8, sizeof(uint32_t))
        self.starts_cap = 8
        self.slots = <uint32_t*>calloc(16, sizeof(uint32_t))
        self.slots_cap = 16
        if self.starts == NULL or self.slots == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.heap)
        free(self.starts)
        free(self.slots)

    cdef inline size_t _slot(self, const char* name, size_t length, uint32_t h) noexcept nogil:
        """The slot holding ``name``, or the empty one where it would go."""
        cdef size_t mask = self.slots_cap - 1, i = h & mask
        cdef uint32_t s
        while True:
            s = self.slots[i]
            if s == 0:
                return i
            s -= 1
            if self.starts[s + 1] - self.starts[s] == length and \
                    memcmp(self.heap + self.starts[s], name, length) == 0:
                return i
            i = (i + 1) & mask

    cdef int _grow_slots(self) noexcept nogil:
        cdef size_t capacity = self.slots_cap * 2, mask = capacity - 1, i, n
        cdef uint32_t* slots = <uint32_t*>calloc(capacity, sizeof(uint32_t))
        if slots == NULL:
            return -1
        for n in range(self.count):
            i = _hash(self.heap + self.starts[n], self.starts[n + 1] - self.starts[n]) & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = <uint32_t>(n + 1)
        free(self.slots)
        self.slots = slots
        self.slots_cap = capacity
        return 0

    def get(self, str name) -> int:
        """The name's id, or -1 if it was never interned."""
        cdef bytes data = name.encode("utf-8", "surrogatepass")
        cdef size_t length = len(data)
        cdef uint32_t s = self.slots[self._slot(data, length, _hash(data, length))]
        return <long>s - 1

    def intern(self, str name) -> int:
        """The name's id, given now if it has none (the next one: ``len(self)``)."""
        cdef bytes data = name.encode("utf-8", "surrogatepass")
        cdef size_t length = len(data), slot, capacity
        cdef uint32_t h = _hash(data, length)
        cdef void* grown
        slot = self._slot(data, length, h)
        if self.slots[slot]:
            return self.slots[slot] - 1
        if self.count >= 0xFFFFFFFE:
            raise MemoryError("too many names")
        if (self.count + 1) * 10 > self.slots_cap * 7:
            if self._grow_slots() < 0:
                raise MemoryError()
            slot = self._slot(data, length, h)
        if self.heap_len + length > 0xFFFFFFFF:
            raise MemoryError("names past 4 GiB")
        # grown by half: at 90,000 names a doubling's slack would be ~40% of what they hold
        if self.count + 2 > self.starts_cap:
            capacity = self.starts_cap + self.starts_cap // 2
            grown = realloc(self.starts, capacity * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self.starts = <uint32_t*>grown
            self.starts_cap = capacity
        if self.heap_len + length > self.heap_cap:
            capacity = min(max(self.heap_cap + self.heap_cap // 2, self.heap_len + length, 256), 0xFFFFFFFF)
            grown = realloc(self.heap, capacity)
            if grown == NULL:
                raise MemoryError()
            self.heap = <char*>grown
            self.heap_cap = capacity
        memcpy(self.heap + self.heap_len, <const char*>data, length)
        self.heap_len += length
        self.count += 1
        self.starts[self.count] = <uint32_t>self.heap_len
        self.slots[slot] = <uint32_t>self.count
        return self.count - 1

    def name(self, size_t index) -> str:
        """The name of an id (IndexError if none has it)."""
        if index >= self.count:
            raise IndexError(index)
        return self.heap[self.starts[index]:self.starts[index + 1]].decode("utf-8", "surrogatepass")

    def __len__(self) -> int:
        return self.count

    def memory_bytes(self) -> int:
        """The C memory held (heap, offsets and slots as allocated)."""
        return self.heap_cap + self.starts_cap * sizeof(uint32_t) + self.slots_cap * sizeof(uint32_t)
