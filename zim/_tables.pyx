# cython: language_level=3
"""Users, channels and memberships in compact C tables (see _tables.pxd), and
``Tables`` for Python (tables/python_api.pxi)."""
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove

DEF FIRST_ARENA = 256           # bytes of the first name arena


# -- hashing -----------------------------------------------------------------

cdef inline uint32_t _id_hash(uint64_t key) noexcept nogil:
    key ^= key >> 33
    key *= 0xff51afd7ed558ccdULL
    key ^= key >> 33
    return <uint32_t>key


cdef inline uint32_t _name_hash(const char* name, size_t length) noexcept nogil:
    """31 bits (the channel record keeps its private flag in the 32nd)."""
    cdef uint64_t h = 0xcbf29ce484222325ULL          # FNV-1a, then mixed
    cdef size_t i
    for i in range(length):
        h = (h ^ <unsigned char>name[i]) * 0x100000001b3ULL
    return _id_hash(h) & TAB_HASH_MASK


cdef inline uint32_t _home_hash(tables_t* t, tab_index_t* ix, uint32_t record) noexcept nogil:
    if ix == &t.user_index:
        return _id_hash(t.users[record].id)
    return t.channels[record].hash & TAB_HASH_MASK


# -- the name arena: a varint of (length << 1 | freed), then the UTF-8 bytes --------

cdef inline size_t _varint_size(size_t value) noexcept nogil:
    cdef size_t size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


cdef inline const unsigned char* _arena_entry(tab_arena_t* arena, size_t offset, size_t* header) noexcept nogil:
    """The bytes of the name at offset; header gets its varint (length << 1 | freed)."""
    cdef const unsigned char* p = arena.bytes + offset
    cdef size_t value = 0, shift = 0
    while p[0] & 0x80:
        value |= <size_t>(p[0] & 0x7F) << shift
        shift += 7
        p += 1
    header[0] = value | (<size_t>p[0] << shift)
    return p + 1


cdef inline const char* _channel_name(tables_t* t, uint32_t c, size_t* length) noexcept nogil:
    cdef const unsigned char* name = _arena_entry(&t.names, t.channels[c].name, length)
    length[0] >>= 1
    return <const char*>name


cdef int64_t _arena_add(tab_arena_t* arena, const char* name, size_t length) noexcept nogil:
    """Append a name: its offset, or -1 (no memory, or the arena would pass 4 GiB)."""
    cdef size_t header = length << 1, size = _varint_size(header) + length, wanted
    cdef unsigned char* grown
    cdef unsigned char* p
    if length > TAB_NONE or arena.used + size >= TAB_NONE:
        return -1
    if arena.used + size > arena.capacity:
        wanted = arena.capacity + arena.capacity // 2 if arena.capacity else FIRST_ARENA
        if wanted < arena.used + size:
            wanted = arena.used + size
        grown = <unsigned char*>realloc(arena.bytes, wanted)
        if grown == NULL:
            return -1
        arena.bytes = grown
        arena.capacity = wanted
    p = arena.bytes + arena.used
    while header >= 0x80:
        p[0] = <unsigned char>(header | 0x80)
        header >>= 7
        p += 1
    p[0] = <unsigned char>header
    memcpy(p + 1, name, length)
    arena.used += size
    return arena.used - size


cdef void _arena_compact(tables_t* t) noexcept nogil:
    """Slide the live names down over the holes, in place, and give memory back. Each
    live name's record is found through the channel index (by its hash, then its offset:
    a moved name's new offset lies below the unmoved ones)."""
    cdef tab_arena_t* arena = &t.names
    cdef size_t read = 0, write = 0, header, size, mask = t.channel_index.capacity - 1, i
    cdef const unsigned char* name
    cdef uint32_t s
    cdef unsigned char* shrunk
    while read < arena.used:
        name = _arena_entry(arena, read, &header)
        size = <size_t>(name - (arena.bytes + read)) + (header >> 1)
        if not header & 1:
            i = _name_hash(<const char*>name, header >> 1) & mask
            while True:
                s = t.channel_index.slots[i]
                if t.channels[s - 1].name == read:     # s > 0: a live name is indexed
                    break
                i = (i + 1) & mask
            memmove(arena.bytes + write, arena.bytes + read, size)
            t.channels[s - 1].name = <uint32_t>write
            write += size
        read += size
    arena.used = write
    arena.holes = 0
    if arena.capacity > FIRST_ARENA and write < arena.capacity // 2:
        size = write + write // 2 if write + write // 2 > FIRST_ARENA else FIRST_ARENA
        shrunk = <unsigned char*>realloc(arena.bytes, size)
        if shrunk != NULL:
            arena.bytes = shrunk
            arena.capacity = size


cdef void _arena_release(tables_t* t, uint32_t offset) noexcept nogil:
    """Free the name at offset: the arena's end moves back if it was the last, else it
    becomes a hole; the holes are compacted away once they pass half of the arena."""
    cdef tab_arena_t* arena = &t.names
    cdef size_t header
    cdef const unsigned char* name = _arena_entry(arena, offset, &header)
    cdef size_t size = <size_t>(name - (arena.bytes + offset)) + (header >> 1)
    if offset + size == arena.used:
        arena.used = offset
    else:
        arena.bytes[offset] |= 1            # the freed bit: the varint's lowest bit
        arena.holes += size
    if arena.holes * 2 > arena.used:
        _arena_compact(t)
    if arena.used == 0:                     # no name left: no arena
        free(arena.bytes)
        arena.bytes = NULL
        arena.capacity = 0


# -- the two indexes -----------------------------------------------------------

cdef int _index_init(tab_index_t* ix, size_t capacity) noexcept nogil:
    ix.capacity = capacity
    ix.count = 0
    ix.slots = <uint32_t*>calloc(capacity, sizeof(uint32_t))
    return 0 if ix.slots != NULL else -1


cdef size_t _user_slot(tables_t* t, uint64_t user_id) noexcept nogil:
    cdef size_t mask = t.user_index.capacity - 1
    cdef size_t i = _id_hash(user_id) & mask
    cdef uint32_t s
    while True:
        s = t.user_index.slots[i]
        if s == 0 or t.users[s - 1].id == user_id:
            return i
        i = (i + 1) & mask


cdef size_t _channel_slot(tables_t* t, const char* name, size_t length, uint32_t h) noexcept nogil:
    cdef size_t mask = t.channel_index.capacity - 1
    cdef size_t i = h & mask, other_length
    cdef uint32_t s
    cdef const char* other
    while True:
        s = t.channel_index.slots[i]
        if s == 0:
            return i
        if t.channels[s - 1].hash & TAB_HASH_MASK == h:
            other = _channel_name(t, s - 1, &other_length)
            if other_length == length and memcmp(other, name, length) == 0:
                return i
        i = (i + 1) & mask


cdef int _index_grow(tables_t* t, tab_index_t* ix) noexcept nogil:
    """Double the slots when one more entry would pass 70% full."""
    cdef tab_index_t old = ix[0]
    cdef size_t i, j, mask
    cdef uint32_t s
    if (ix.count + 1) * 10 <= ix.capacity * 7:
        return 0
    if _index_init(ix, old.capacity * 2) < 0:
        ix[0] = old
        return -1
    ix.count = old.count
    mask = ix.capacity - 1
    for i in range(old.capacity):
        s = old.slots[i]
        if s:
            j = _home_hash(t, ix, s - 1) & mask
            while ix.slots[j]:
                j = (j + 1) & mask
            ix.slots[j] = s
    free(old.slots)
    return 0


cdef void _index_delete(tables_t* t, tab_index_t* ix, size_t i) noexcept nogil:
    """Empty slot i, shifting back the entries that probed past it (no tombstones)."""
    cdef size_t mask = ix.capacity - 1, j = i, k
    ix.slots[i] = 0
    ix.count -= 1
    while True:
        j = (j + 1) & mask
        if ix.slots[j] == 0:
            return
        k = _home_hash(t, ix, ix.slots[j] - 1) & mask
        if (j > i and (k <= i or k > j)) or (j < i and (k <= i and k > j)):
            ix.slots[i] = ix.slots[j]
            ix.slots[j] = 0
            i = j


# -- records -------------------------------------------------------------------

cdef int64_t _new_user(tables_t* t, uint64_t user_id, size_t slot) noexcept nogil:
    """Intern user_id at its (empty) slot: the new user index, or -1 (no memory)."""
    cdef uint32_t u
    cdef tab_user_t* grown
    if t.user_free != TAB_NONE:
        u = t.user_free
        t.user_free = t.users[u].capacity
    else:
        if t.user_records > TAB_USER_MASK:
            return -1
        if t.user_records == t.user_capacity:
            grown = <tab_user_t*>realloc(t.users, t.user_capacity * 2 * sizeof(tab_user_t))
            if grown == NULL:
                return -1
            t.users = grown
            t.user_capacity *= 2
        u = t.user_records
        t.user_records += 1
    t.users[u].id = user_id
    t.users[u].joined = NULL
    t.users[u].count = t.users[u].capacity = t.users[u].created = 0
    t.user_index.slots[slot] = u + 1
    t.user_index.count += 1
    return u


cdef void _free_user(tables_t* t, uint32_t u) noexcept nogil:
    """Forget a user that has no membership and no created channel left; its index is reused."""
    _index_delete(t, &t.user_index, _user_slot(t, t.users[u].id))
    free(t.users[u].joined)
    t.users[u].joined = NULL
    t.users[u].id = 0
    t.users[u].count = 0
    t.users[u].capacity = t.user_free
    t.user_free = u


cdef int64_t _intern_user(tables_t* t, uint64_t user_id, bint* created) noexcept nogil:
    """The user's index, a new record if it had none (created[0] tells): -1 (no memory)."""
    cdef int64_t u = _find_user(t, user_id)
    created[0] = False
    if u >= 0:
        return u
    if _index_grow(t, &t.user_index) < 0:
        return -1
    u = _new_user(t, user_id, _user_slot(t, user_id))
    created[0] = u >= 0
    return u


cdef inline void _forget_if_idle(tables_t* t, uint32_t u) noexcept nogil:
    """Free user u once it has neither a membership nor a created channel."""
    if t.users[u].count == 0 and t.users[u].created == 0:
        _free_user(t, u)


cdef void _release_creator(tables_t* t, uint32_t c) noexcept nogil:
    """Channel c no longer counts for its creator (it goes, or changes creator)."""
    cdef uint64_t creator = t.channels[c].creator
    cdef int64_t u
    t.channels[c].creator = 0
    u = _find_user(t, creator)      # (-1 for 0: not known) a creator is held while it counts
    if u >= 0:
        t.users[u].created -= 1
        _forget_if_idle(t, <uint32_t>u)


cdef int _set_creator(tables_t* t, uint32_t c, uint64_t creator) noexcept nogil:
    """Make ``creator`` (0: not known) channel c's creator, counted in its user record
    (made if it had none): -1 if memory ran out (nothing changed)."""
    cdef int64_t u
    cdef bint new_user
    if t.channels[c].creator == creator:
        return 0
    if creator:
        u = _intern_user(t, creator, &new_user)
        if u < 0:
            return -1
        t.users[u].created += 1     # below 2^32: channel indexes are u32
    _release_creator(t, c)
    t.channels[c].creator = creator
    return 0


cdef int64_t _new_channel(tables_t* t, const char* name, size_t length, uint32_t h,
                          size_t slot) noexcept nogil:
    cdef uint32_t c
    cdef tab_channel_t* grown
    cdef int64_t offset = _arena_add(&t.names, name, length)
    if offset < 0:
        return -1
    if t.channel_free != TAB_NONE:
        c = t.channel_free
        t.channel_free = t.channels[c].capacity
    else:
        if t.channel_records == t.channel_capacity:
            grown = NULL
            if t.channel_capacity < TAB_NONE // 2:
                grown = <tab_channel_t*>realloc(t.channels, t.channel_capacity * 2 * sizeof(tab_channel_t))
            if grown == NULL:
                t.names.used = <size_t>offset       # the name just appended goes again
                return -1
            t.channels = grown
            t.channel_capacity *= 2
        c = t.channel_records
        t.channel_records += 1
    t.channels[c].name = <uint32_t>offset
    t.channels[c].hash = h
    t.channels[c].count = t.channels[c].capacity = 0
    t.channels[c].creator = 0
    t.channel_index.slots[slot] = c + 1
    t.channel_index.count += 1
    return c


cdef void _free_channel(tables_t* t, uint32_t c) noexcept nogil:
    """Forget a channel that has no member left (it no longer counts for its creator);
    its index is reused."""
    cdef tab_channel_t* ch = &t.channels[c]
    cdef size_t length
    cdef const char* name = _channel_name(t, c, &length)
    cdef uint32_t offset = ch.name
    _index_delete(t, &t.channel_index, _channel_slot(t, name, length, ch.hash & TAB_HASH_MASK))
    _release_creator(t, c)
    if ch.capacity:
        free(ch.members.heap)
    ch.name = TAB_NONE
    ch.count = 0
    ch.capacity = t.channel_free
    t.channel_free = c
    _arena_release(t, offset)       # after the record is freed: compaction walks live ones


cdef int64_t _find_user(tables_t* t, uint64_t user_id) noexcept nogil:
    cdef uint32_t s = t.user_index.slots[_user_slot(t, user_id)] if user_id else 0
    return <int64_t>s - 1


cdef int64_t tables_channel(tables_t* t, const char* name, size_t length) noexcept nogil:
    cdef uint32_t s = t.channel_index.slots[_channel_slot(t, name, length, _name_hash(name, length))]
    return <int64_t>s - 1


cdef inline uint32_t* _members(tab_channel_t* ch) noexcept nogil:
    """The channel's member words: in its record while it has at most TAB_INLINE."""
    return ch.members.heap if ch.capacity else ch.members.local


cdef const uint32_t* tables_members(tables_t* t, uint32_t channel, uint32_t* count) noexcept nogil:
    count[0] = t.channels[channel].count
    return _members(&t.channels[channel])


cdef uint64_t tables_user_id(tables_t* t, uint32_t user) noexcept nogil:
    return t.users[user].id


# -- arrays grow by an eighth and shrink when a quarter full ----------------------

cdef inline uint32_t _fitted(size_t items, size_t item) noexcept nogil:
    """Room for 1/8 more than ``items``, rounded up to fill a glibc malloc chunk (16 n + 8
    usable bytes): a user in 20 channels holds 23 pairs (184 bytes). Growth by 1/8 keeps
    joins O(1) amortised (at most 8 copies per item); big arrays are mremap'd, not copied."""
    cdef size_t size = (items + items // 8) * item
    if size < 24:
        size = 24
    return <uint32_t>((((size - 8 + 15) & ~<size_t>15) + 8) // item)


cdef int _resize(void** array, uint32_t* capacity, uint32_t count, size_t item) noexcept nogil:
    """Make room for ``count`` items (or free the array when count is 0), or give memory
    back when at most a quarter is used (-1: no memory)."""
    cdef uint32_t wanted
    cdef void* moved
    if count == 0:
        free(array[0])
        array[0] = NULL
        capacity[0] = 0
        return 0
    if count > capacity[0] or count <= capacity[0] // 4:
        wanted = _fitted(count, item)
        if wanted >= capacity[0] and count <= capacity[0]:
            return 0                        # already as small as it gets
    else:
        return 0
    moved = realloc(array[0], wanted * item)
    if moved == NULL:
        return -1 if count > capacity[0] else 0     # a failed shrink keeps the old array
    array[0] = moved
    capacity[0] = wanted
    return 0


cdef int _channel_room(tab_channel_t* ch) noexcept nogil:
    """Room for one more member word: past TAB_INLINE the words move to the heap."""
    cdef uint32_t* heap
    cdef uint32_t capacity
    if ch.capacity == 0:
        if ch.count < TAB_INLINE:
            return 0
        capacity = _fitted(ch.count + 1, sizeof(uint32_t))
        heap = <uint32_t*>malloc(capacity * sizeof(uint32_t))
        if heap == NULL:
            return -1
        memcpy(heap, ch.members.local, ch.count * sizeof(uint32_t))
        ch.members.heap = heap
        ch.capacity = capacity
        return 0
    if ch.count < ch.capacity:
        return 0
    return _resize(<void**>&ch.members.heap, &ch.capacity, ch.count + 1, sizeof(uint32_t))


cdef void _channel_shrink(tab_channel_t* ch) noexcept nogil:
    """After a leave: back into the record at TAB_INLINE words, else maybe a smaller array."""
    cdef uint32_t* heap = ch.members.heap
    if ch.capacity == 0:
        return
    if ch.count <= TAB_INLINE:
        memcpy(ch.members.local, heap, ch.count * sizeof(uint32_t))    # overwrites the pointer
        free(heap)
        ch.capacity = 0
    else:
        _resize(<void**>&ch.members.heap, &ch.capacity, ch.count, sizeof(uint32_t))


cdef int _room_for_one(tables_t* t, uint32_t c, uint32_t u) noexcept nogil:
    cdef tab_user_t* us = &t.users[u]
    if _channel_room(&t.channels[c]) < 0:
        return -1
    if us.count == us.capacity and _resize(<void**>&us.joined, &us.capacity,
                                           us.count + 1, sizeof(tab_entry_t)) < 0:
        return -1
    return 0


cdef int64_t _entry_of(tables_t* t, uint32_t u, uint32_t c) noexcept nogil:
    """Where channel c is in user u's memberships (-1: not a member)."""
    cdef tab_user_t* us = &t.users[u]
    cdef uint32_t i
    for i in range(us.count):
        if us.joined[i].channel == c:
            return i
    return -1


cdef void _leave(tables_t* t, uint32_t u, uint32_t entry) noexcept nogil:
    """Remove user u's membership number ``entry`` from both sides (swap-remove);
    the user is freed when it was its last and it created no existing channel; both
    sides shrink when mostly empty."""
    cdef tab_user_t* us = &t.users[u]
    cdef uint32_t c = us.joined[entry].channel
    cdef uint32_t position = us.joined[entry].position
    cdef tab_channel_t* ch = &t.channels[c]
    cdef uint32_t* members = _members(ch)
    cdef uint32_t last = ch.count - 1, moved
    cdef int64_t moved_entry
    if position != last:
        moved = members[last]
        members[position] = moved
        moved_entry = _entry_of(t, moved & TAB_USER_MASK, c)
        t.users[moved & TAB_USER_MASK].joined[moved_entry].position = position
    ch.count = last
    _channel_shrink(ch)
    us.count -= 1
    us.joined[entry] = us.joined[us.count]
    t.memberships -= 1
    _resize(<void**>&us.joined, &us.capacity, us.count, sizeof(tab_entry_t))     # (count 0: freed)
    _forget_if_idle(t, u)


cdef int tables_init(tables_t* t, size_t initial) noexcept nogil:
    cdef size_t capacity = 1
    while capacity < initial:
        capacity *= 2
    t.users = <tab_user_t*>malloc(capacity * sizeof(tab_user_t))
    t.channels = <tab_channel_t*>malloc(capacity * sizeof(tab_channel_t))
    t.user_capacity = t.channel_capacity = <uint32_t>capacity
    t.user_records = t.channel_records = 0
    t.user_free = t.channel_free = TAB_NONE
    t.names.bytes = NULL
    t.names.used = t.names.capacity = t.names.holes = 0
    t.memberships = 0
    if (_index_init(&t.user_index, capacity * 2) < 0) | (_index_init(&t.channel_index, capacity * 2) < 0):
        return -1
    return 0 if t.users != NULL and t.channels != NULL else -1


cdef void* _duplicate(const void* source, size_t size) noexcept nogil:
    """A malloc'd copy of size bytes (NULL for none: size 0 or no memory)."""
    cdef void* copy
    if source == NULL or size == 0:
        return NULL
    copy = malloc(size)
    if copy != NULL:
        memcpy(copy, source, size)
    return copy


cdef int tables_copy(tables_t* t, tables_t* source) noexcept nogil:
    """Make t (initialised, emptied here) an exact copy of source: -1 if memory ran out
    (t is then empty and valid)."""
    cdef uint32_t i
    cdef bint failed = False
    cdef tab_channel_t* ch
    tables_free(t)
    t[0] = source[0]
    t.users = <tab_user_t*>_duplicate(source.users, source.user_capacity * sizeof(tab_user_t))
    t.channels = <tab_channel_t*>_duplicate(source.channels, source.channel_capacity * sizeof(tab_channel_t))
    t.user_index.slots = <uint32_t*>_duplicate(source.user_index.slots,
                                               source.user_index.capacity * sizeof(uint32_t))
    t.channel_index.slots = <uint32_t*>_duplicate(source.channel_index.slots,
                                                  source.channel_index.capacity * sizeof(uint32_t))
    t.names.bytes = <unsigned char*>_duplicate(source.names.bytes, source.names.capacity)
    if (t.users == NULL or t.channels == NULL or t.user_index.slots == NULL or t.channel_index.slots == NULL
            or (source.names.capacity and t.names.bytes == NULL)):
        t.user_records = t.channel_records = 0
        tables_free(t)
        tables_init(t, 1)
        return -1
    for i in range(t.user_records):         # every pointer becomes t's own (NULL if its copy failed)
        if t.users[i].id:
            t.users[i].joined = <tab_entry_t*>_duplicate(source.users[i].joined,
                                                         source.users[i].capacity * sizeof(tab_entry_t))
            failed |= t.users[i].joined == NULL and t.users[i].capacity > 0    # (none: only a creator)
    for i in range(t.channel_records):
        ch = &t.channels[i]
        if ch.name != TAB_NONE and ch.capacity:
            ch.members.heap = <uint32_t*>_duplicate(source.channels[i].members.heap,
                                                    ch.capacity * sizeof(uint32_t))
            if ch.members.heap == NULL:
                ch.capacity = 0             # (nothing to free) then all is emptied
                failed = True
    if not failed:
        return 0
    tables_free(t)
    tables_init(t, 1)
    return -1


cdef void tables_free(tables_t* t) noexcept nogil:
    cdef uint32_t i
    if t.users != NULL:
        for i in range(t.user_records):
            if t.users[i].id:
                free(t.users[i].joined)
    if t.channels != NULL:
        for i in range(t.channel_records):
            if t.channels[i].name != TAB_NONE and t.channels[i].capacity:
                free(t.channels[i].members.heap)
    free(t.users)
    free(t.channels)
    free(t.user_index.slots)
    free(t.channel_index.slots)
    free(t.names.bytes)
    t.users = NULL
    t.channels = NULL
    t.names.bytes = NULL
    t.user_index.slots = t.channel_index.slots = NULL


include "tables/python_api.pxi"
