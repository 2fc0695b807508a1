# cython: language_level=3
"""Users, channels and memberships in compact C tables (see _tables.pxd), and
``Tables`` for Python."""
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy

DEF MIN_ARRAY = 4               # first capacity of a member or membership array


# -- hashing -----------------------------------------------------------------

cdef inline uint32_t _id_hash(uint64_t key) noexcept nogil:
    key ^= key >> 33
    key *= 0xff51afd7ed558ccdULL
    key ^= key >> 33
    return <uint32_t>key


cdef inline uint32_t _name_hash(const char* name, size_t length) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325ULL          # FNV-1a, then mixed
    cdef size_t i
    for i in range(length):
        h = (h ^ <unsigned char>name[i]) * 0x100000001b3ULL
    return _id_hash(h)


cdef inline uint32_t _home_hash(tables_t* t, tab_index_t* ix, uint32_t record) noexcept nogil:
    if ix == &t.user_index:
        return _id_hash(t.users[record].id)
    return t.channels[record].hash


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
    cdef size_t i = h & mask
    cdef uint32_t s
    cdef tab_channel_t* c
    while True:
        s = t.channel_index.slots[i]
        if s == 0:
            return i
        c = &t.channels[s - 1]
        if c.hash == h and c.name_len == length and memcmp(c.name, name, length) == 0:
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
    t.users[u].count = t.users[u].capacity = 0
    t.user_index.slots[slot] = u + 1
    t.user_index.count += 1
    return u


cdef void _free_user(tables_t* t, uint32_t u) noexcept nogil:
    """Forget a user that has no membership left; its index is reused."""
    _index_delete(t, &t.user_index, _user_slot(t, t.users[u].id))
    free(t.users[u].joined)
    t.users[u].joined = NULL
    t.users[u].id = 0
    t.users[u].count = 0
    t.users[u].capacity = t.user_free
    t.user_free = u


cdef int64_t _new_channel(tables_t* t, const char* name, size_t length, uint32_t h,
                          size_t slot) noexcept nogil:
    cdef uint32_t c
    cdef tab_channel_t* grown
    cdef char* copy = <char*>malloc(length + 1)
    if copy == NULL:
        return -1
    if t.channel_free != TAB_NONE:
        c = t.channel_free
        t.channel_free = t.channels[c].capacity
    else:
        if t.channel_records == TAB_NONE:
            free(copy)
            return -1
        if t.channel_records == t.channel_capacity:
            grown = <tab_channel_t*>realloc(t.channels, t.channel_capacity * 2 * sizeof(tab_channel_t))
            if grown == NULL:
                free(copy)
                return -1
            t.channels = grown
            t.channel_capacity *= 2
        c = t.channel_records
        t.channel_records += 1
    memcpy(copy, name, length)
    copy[length] = 0
    t.channels[c].name = copy
    t.channels[c].name_len = <uint32_t>length
    t.channels[c].hash = h
    t.channels[c].members = NULL
    t.channels[c].count = t.channels[c].capacity = 0
    t.channels[c].flags = 0
    t.channels[c].creator = 0
    t.channel_index.slots[slot] = c + 1
    t.channel_index.count += 1
    return c


cdef void _free_channel(tables_t* t, uint32_t c) noexcept nogil:
    """Forget a channel that has no member left; its index is reused."""
    cdef tab_channel_t* ch = &t.channels[c]
    _index_delete(t, &t.channel_index, _channel_slot(t, ch.name, ch.name_len, ch.hash))
    free(ch.name)
    free(ch.members)
    ch.name = NULL
    ch.members = NULL
    ch.count = 0
    ch.capacity = t.channel_free
    t.channel_free = c


cdef int64_t _find_user(tables_t* t, uint64_t user_id) noexcept nogil:
    cdef uint32_t s = t.user_index.slots[_user_slot(t, user_id)] if user_id else 0
    return <int64_t>s - 1


cdef int64_t tables_channel(tables_t* t, const char* name, size_t length) noexcept nogil:
    cdef uint32_t s = t.channel_index.slots[_channel_slot(t, name, length, _name_hash(name, length))]
    return <int64_t>s - 1


cdef const uint32_t* tables_members(tables_t* t, uint32_t channel, uint32_t* count) noexcept nogil:
    count[0] = t.channels[channel].count
    return t.channels[channel].members


cdef uint64_t tables_user_id(tables_t* t, uint32_t user) noexcept nogil:
    return t.users[user].id


# -- arrays grow by half and shrink when a quarter full ----------------------

cdef int _resize(void** array, uint32_t* capacity, uint32_t count, size_t item) noexcept nogil:
    """Make room for one more item, or give memory back when mostly empty (-1: no memory)."""
    cdef uint32_t wanted = capacity[0]
    cdef void* moved
    if count == 0:
        free(array[0])
        array[0] = NULL
        capacity[0] = 0
        return 0
    if count >= wanted:
        wanted = MIN_ARRAY if wanted < MIN_ARRAY else wanted + wanted // 2
    elif wanted > MIN_ARRAY and count <= wanted // 4:
        wanted //= 2
    else:
        return 0
    moved = realloc(array[0], wanted * item)
    if moved == NULL:
        return -1 if count >= capacity[0] else 0     # a failed shrink keeps the old array
    array[0] = moved
    capacity[0] = wanted
    return 0


cdef int _room_for_one(tables_t* t, uint32_t c, uint32_t u) noexcept nogil:
    cdef tab_channel_t* ch = &t.channels[c]
    cdef tab_user_t* us = &t.users[u]
    if ch.count == ch.capacity and _resize(<void**>&ch.members, &ch.capacity,
                                           ch.count + 1, sizeof(uint32_t)) < 0:
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
    the user is freed when it was its last; both arrays shrink when mostly empty."""
    cdef tab_user_t* us = &t.users[u]
    cdef uint32_t c = us.joined[entry].channel
    cdef uint32_t position = us.joined[entry].position
    cdef tab_channel_t* ch = &t.channels[c]
    cdef uint32_t last = ch.count - 1, moved
    cdef int64_t moved_entry
    if position != last:
        moved = ch.members[last]
        ch.members[position] = moved
        moved_entry = _entry_of(t, moved & TAB_USER_MASK, c)
        t.users[moved & TAB_USER_MASK].joined[moved_entry].position = position
    ch.count = last
    _resize(<void**>&ch.members, &ch.capacity, ch.count, sizeof(uint32_t))
    us.count -= 1
    us.joined[entry] = us.joined[us.count]
    t.memberships -= 1
    if us.count == 0:
        _free_user(t, u)
    else:
        _resize(<void**>&us.joined, &us.capacity, us.count, sizeof(tab_entry_t))


cdef int tables_init(tables_t* t, size_t initial) noexcept nogil:
    cdef size_t capacity = 1
    while capacity < initial:
        capacity *= 2
    t.users = <tab_user_t*>malloc(capacity * sizeof(tab_user_t))
    t.channels = <tab_channel_t*>malloc(capacity * sizeof(tab_channel_t))
    t.user_capacity = t.channel_capacity = <uint32_t>capacity
    t.user_records = t.channel_records = 0
    t.user_free = t.channel_free = TAB_NONE
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
    cdef tab_user_t* us
    cdef tab_channel_t* ch
    tables_free(t)
    t[0] = source[0]
    t.users = <tab_user_t*>_duplicate(source.users, source.user_capacity * sizeof(tab_user_t))
    t.channels = <tab_channel_t*>_duplicate(source.channels, source.channel_capacity * sizeof(tab_channel_t))
    t.user_index.slots = <uint32_t*>_duplicate(source.user_index.slots,
                                               source.user_index.capacity * sizeof(uint32_t))
    t.channel_index.slots = <uint32_t*>_duplicate(source.channel_index.slots,
                                                  source.channel_index.capacity * sizeof(uint32_t))
    if t.users == NULL or t.channels == NULL or t.user_index.slots == NULL or t.channel_index.slots == NULL:
        t.user_records = t.channel_records = 0
        tables_free(t)
        tables_init(t, 1)
        return -1
    for i in range(t.user_records):         # first the pointers all become t's own (or NULL)
        if t.users[i].id:
            t.users[i].joined = <tab_entry_t*>_duplicate(source.users[i].joined,
                                                         source.users[i].capacity * sizeof(tab_entry_t))
    for i in range(t.channel_records):
        ch = &t.channels[i]
        if ch.name != NULL:
            ch.name = <char*>_duplicate(source.channels[i].name, ch.name_len + 1)
            ch.members = <uint32_t*>_duplicate(source.channels[i].members, ch.capacity * sizeof(uint32_t))
    for i in range(t.user_records):         # then any copy that failed empties the whole
        us = &t.users[i]
        if us.id and us.joined == NULL:
            break
    else:
        for i in range(t.channel_records):
            ch = &t.channels[i]
            if source.channels[i].name != NULL and (ch.name == NULL or ch.capacity and ch.members == NULL):
                break
        else:
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
            if t.channels[i].name != NULL:
                free(t.channels[i].name)
                free(t.channels[i].members)
    free(t.users)
    free(t.channels)
    free(t.user_index.slots)
    free(t.channel_index.slots)
    t.users = NULL
    t.channels = NULL
    t.user_index.slots = t.channel_index.slots = NULL


# -- Python ----------------------------------------------------------------------

cdef class Tables:
    """Channels, their members (user ids, each with a push flag) and each user's
    channels, in C: about 12 bytes per membership, a few dozen per channel and
    per member user, and no Python object per user, channel or membership.

    A channel exists from ``add_channel`` or its first ``subscribe`` until
    ``drop_channel`` (when empty) or ``delete_channel``, members or not; a user is
    held only while it is a member somewhere. Orders are not kept: a leave moves
    the channel's last member into the hole. ``initial`` (a power of two) sizes the
    first arrays: tests make it tiny to exercise growth. A channel name is any str
    (kept as UTF-8, lone surrogates passed through).
    """
    cdef tables_t t

    def __cinit__(self, size_t initial=64):
        if tables_init(&self.t, initial if initial > 0 else 1) < 0:
            tables_free(&self.t)
            raise MemoryError()

    def __dealloc__(self):
        tables_free(&self.t)

    cdef int64_t _channel(self, str channel):
        cdef bytes name = channel.encode("utf-8", "surrogatepass")
        return tables_channel(&self.t, name, len(name))

    cdef int64_t _intern_channel(self, str channel, bint* created) except -2:
        cdef bytes name = channel.encode("utf-8", "surrogatepass")
        cdef size_t length = len(name)
        cdef uint32_t h = _name_hash(name, length)
        cdef size_t slot = _channel_slot(&self.t, name, length, h)
        cdef int64_t c
        created[0] = False
        if self.t.channel_index.slots[slot]:
            return self.t.channel_index.slots[slot] - 1
        if length > 0xFFFFFFFE:
            raise ValueError("a channel name is at most 4 GiB")
        if _index_grow(&self.t, &self.t.channel_index) < 0:
            raise MemoryError()
        c = _new_channel(&self.t, name, length, h, _channel_slot(&self.t, name, length, h))
        if c < 0:
            raise MemoryError()
        created[0] = True
        return c

    def __copy__(self):
        """An exact copy (same indexes, same orders), made in C."""
        cdef Tables other = Tables.__new__(Tables, 1)
        if tables_copy(&other.t, &self.t) < 0:
            raise MemoryError()
        return other

    def __deepcopy__(self, memo):
        return self.__copy__()

    def channel_exists(self, str channel) -> bool:
        return self._channel(channel) >= 0

    def add_channel(self, str channel) -> bool:
        """Make a channel exist without members: True, or False if it existed."""
        cdef bint created
        self._intern_channel(channel, &created)
        return created

    def drop_channel(self, str channel) -> bool:
        """Forget a channel that has no members: True, or False (unknown, or has members)."""
        cdef int64_t c = self._channel(channel)
        if c < 0 or self.t.channels[c].count:
            return False
        _free_channel(&self.t, <uint32_t>c)
        return True

    def delete_channel(self, str channel):
        """Forget a channel and its memberships: the former members' ids, or None
        if there was no such channel."""
        cdef int64_t c = self._channel(channel)
        cdef tab_channel_t* ch
        cdef uint32_t u
        cdef list former = []
        if c < 0:
            return None
        ch = &self.t.channels[c]
        while ch.count:             # from the end: no member moves
            u = ch.members[ch.count - 1] & TAB_USER_MASK
            former.append(self.t.users[u].id)
            _leave(&self.t, u, <uint32_t>_entry_of(&self.t, u, <uint32_t>c))
        _free_channel(&self.t, <uint32_t>c)
        former.reverse()            # in the member array's order, as channel_members lists them
        return former

    def subscribe(self, str channel, uint64_t user_id, bint push):
        """Make the user a member (creating the channel) or set its push flag:
        the previous push flag, or None if it was not a member."""
        cdef bint new_channel, new_user = False
        cdef int64_t c, u, entry
        cdef size_t slot
        cdef uint32_t* word
        cdef tab_channel_t* ch
        cdef tab_user_t* us
        cdef bint previous
        if user_id == 0:
            raise ValueError("user id 0 is not allowed")
        c = self._intern_channel(channel, &new_channel)
        u = _find_user(&self.t, user_id)
        if u >= 0:
            entry = _entry_of(&self.t, <uint32_t>u, <uint32_t>c)
            if entry >= 0:
                word = &self.t.channels[c].members[self.t.users[u].joined[entry].position]
                previous = word[0] & TAB_PUSH
                word[0] = (word[0] & TAB_USER_MASK) | (TAB_PUSH if push else 0)
                return previous
        else:
            if _index_grow(&self.t, &self.t.user_index) == 0:
                slot = _user_slot(&self.t, user_id)
                u = _new_user(&self.t, user_id, slot)
            new_user = u >= 0
        if u < 0 or _room_for_one(&self.t, <uint32_t>c, <uint32_t>u) < 0:
            if new_user:
                _free_user(&self.t, <uint32_t>u)
            if new_channel:
                _free_channel(&self.t, <uint32_t>c)
            raise MemoryError()
        ch = &self.t.channels[c]
        us = &self.t.users[u]
        ch.members[ch.count] = <uint32_t>u | (TAB_PUSH if push else 0)
        us.joined[us.count].channel = <uint32_t>c
        us.joined[us.count].position = ch.count
        ch.count += 1
        us.count += 1
        self.t.memberships += 1
        return None

    def unsubscribe(self, str channel, uint64_t user_id):
        """Remove a member: its push flag, or None if it was not a member."""
        cdef int64_t c = self._channel(channel), u = _find_user(&self.t, user_id), entry
        cdef bint push
        if c < 0 or u < 0:
            return None
        entry = _entry_of(&self.t, <uint32_t>u, <uint32_t>c)
        if entry < 0:
            return None
        push = self.t.channels[c].members[self.t.users[u].joined[entry].position] & TAB_PUSH
        _leave(&self.t, <uint32_t>u, <uint32_t>entry)
        return push

    def membership(self, str channel, uint64_t user_id):
        """None if the user is not a member, else its push flag."""
        cdef int64_t c = self._channel(channel), u = _find_user(&self.t, user_id), entry
        if c < 0 or u < 0:
            return None
        entry = _entry_of(&self.t, <uint32_t>u, <uint32_t>c)
        if entry < 0:
            return None
        return bool(self.t.channels[c].members[self.t.users[u].joined[entry].position] & TAB_PUSH)

    def remove_user(self, uint64_t user_id) -> list:
        """Take the user out of every channel: the names of the channels it left."""
        cdef int64_t u = _find_user(&self.t, user_id)
        cdef list left = []
        cdef uint32_t n
        if u < 0:
            return left
        n = self.t.users[u].count
        while n:                    # from the end: no entry moves
            n -= 1
            left.append(self._name(self.t.users[u].joined[n].channel))
            _leave(&self.t, <uint32_t>u, n)
        return left

    cdef str _name(self, uint32_t c):
        return self.t.channels[c].name[:self.t.channels[c].name_len].decode("utf-8", "surrogatepass")

    def channel_members(self, str channel) -> list:
        """The ids of the channel's members (none for an unknown channel), in no set order."""
        cdef int64_t c = self._channel(channel)
        cdef uint32_t i
        cdef tab_channel_t* ch
        if c < 0:
            return []
        ch = &self.t.channels[c]
        return [self.t.users[ch.members[i] & TAB_USER_MASK].id for i in range(ch.count)]

    def member_count(self, str channel) -> int:
        cdef int64_t c = self._channel(channel)
        return self.t.channels[c].count if c >= 0 else 0

    def user_channels(self, uint64_t user_id) -> list:
        """[(channel name, push flag)] of the user's memberships, in no set order."""
        cdef int64_t u = _find_user(&self.t, user_id)
        cdef tab_user_t* us
        cdef uint32_t i
        if u < 0:
            return []
        us = &self.t.users[u]
        return [(self._name(us.joined[i].channel),
                 bool(self.t.channels[us.joined[i].channel].members[us.joined[i].position] & TAB_PUSH))
                for i in range(us.count)]

    def channel_names(self) -> list:
        """The names of every channel, in no set order."""
        cdef uint32_t c
        return [self._name(c) for c in range(self.t.channel_records) if self.t.channels[c].name != NULL]

    def channel_count(self) -> int:
        return self.t.channel_index.count

    def user_count(self) -> int:
        """How many users are a member somewhere."""
        return self.t.user_index.count

    def membership_count(self) -> int:
        return self.t.memberships

    def set_private(self, str channel, bint private):
        """Mark an existing channel private or not; KeyError for an unknown one."""
        cdef int64_t c = self._channel(channel)
        if c < 0:
            raise KeyError(f"no channel {channel!r}")
        if private:
            self.t.channels[c].flags |= TAB_PRIVATE
        else:
            self.t.channels[c].flags &= ~TAB_PRIVATE

    def private(self, str channel) -> bool:
        """Whether the channel is private (False for an unknown one)."""
        cdef int64_t c = self._channel(channel)
        return c >= 0 and (self.t.channels[c].flags & TAB_PRIVATE) != 0

    def set_creator(self, str channel, uint64_t creator):
        """Record who created an existing channel (0: not known); KeyError for an unknown one."""
        cdef int64_t c = self._channel(channel)
        if c < 0:
            raise KeyError(f"no channel {channel!r}")
        self.t.channels[c].creator = creator

    def creator(self, str channel):
        """Who created the channel: a user id, or None (not known, or no such channel)."""
        cdef int64_t c = self._channel(channel)
        if c < 0 or self.t.channels[c].creator == 0:
            return None
        return self.t.channels[c].creator

    def memory_bytes(self) -> int:
        """The bytes of C memory the tables hold (malloc's own overhead not counted)."""
        cdef size_t total = (self.t.user_index.capacity + self.t.channel_index.capacity) * sizeof(uint32_t)
        cdef uint32_t i
        total += self.t.user_capacity * sizeof(tab_user_t) + self.t.channel_capacity * sizeof(tab_channel_t)
        for i in range(self.t.user_records):
            total += self.t.users[i].capacity * sizeof(tab_entry_t) if self.t.users[i].id else 0
        for i in range(self.t.channel_records):
            if self.t.channels[i].name != NULL:
                total += self.t.channels[i].capacity * sizeof(uint32_t) + self.t.channels[i].name_len + 1
        return total

    def check(self):
        """Verify that both sides of every membership agree and every count is
        right (AssertionError otherwise): for tests."""
        cdef uint32_t i, j, live = 0, word
        cdef size_t memberships = 0
        cdef tab_user_t* us
        cdef tab_channel_t* ch
        for i in range(self.t.user_records):
            us = &self.t.users[i]
            if us.id == 0:
                continue
            live += 1
            assert us.count > 0 and us.count <= us.capacity, (us.id, us.count, us.capacity)
            assert _find_user(&self.t, us.id) == i
            for j in range(us.count):
                ch = &self.t.channels[us.joined[j].channel]
                assert ch.name != NULL and us.joined[j].position < ch.count
                assert ch.members[us.joined[j].position] & TAB_USER_MASK == i
            memberships += us.count
        assert live == self.t.user_index.count and memberships == self.t.memberships
        live = 0
        memberships = 0
        for i in range(self.t.channel_records):
            ch = &self.t.channels[i]
            if ch.name == NULL:
                continue
            live += 1
            assert ch.count <= ch.capacity and (ch.members != NULL) == (ch.capacity > 0)
            assert tables_channel(&self.t, ch.name, ch.name_len) == i
            for j in range(ch.count):
                word = ch.members[j] & TAB_USER_MASK
                assert self.t.users[word].id != 0 and _entry_of(&self.t, word, i) >= 0
            memberships += ch.count
        assert live == self.t.channel_index.count and memberships == self.t.memberships
