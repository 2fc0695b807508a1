# Included by zim/_tables.pyx: the C tables seen from Python.

cdef class Tables:
    """Channels, their members (user ids, each with a push flag) and each user's
    channels, in C: about 12 bytes per membership, about 50 per channel (a 32-byte
    record holding up to two members, its name in a shared arena, a hash slot) and
    a few dozen per member user, and no Python object per user, channel or membership.

    A channel exists from ``add_channel`` or its first ``subscribe`` until
    ``drop_channel`` (when empty) or ``delete_channel``, members or not. A channel's
    creator (``set_creator``) counts it among the channels it created (``created``)
    until the channel goes; a user is held only while it is a member somewhere or
    counts a created channel (32 bytes). Orders are not kept: a leave moves
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
        if length > 0x7FFFFFFF:
            raise ValueError("a channel name is at most 2 GiB")     # (all names: 4 GiB)
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
            u = _members(ch)[ch.count - 1] & TAB_USER_MASK
            former.append(self.t.users[u].id)
            _leave(&self.t, u, <uint32_t>_entry_of(&self.t, u, <uint32_t>c))
        _free_channel(&self.t, <uint32_t>c)
        former.reverse()            # in the member array's order, as channel_members lists them
        return former

    def subscribe(self, str channel, uint64_t user_id, bint push):
        """Make the user a member (creating the channel) or set its push flag:
        the previous push flag, or None if it was not a member."""
        cdef bint new_channel, new_user
        cdef int64_t c, u, entry
        cdef uint32_t* word
        cdef tab_channel_t* ch
        cdef tab_user_t* us
        cdef bint previous
        if user_id == 0:
            raise ValueError("user id 0 is not allowed")
        c = self._intern_channel(channel, &new_channel)
        u = _intern_user(&self.t, user_id, &new_user)
        if u >= 0 and not new_user:
            entry = _entry_of(&self.t, <uint32_t>u, <uint32_t>c)
            if entry >= 0:
                word = &_members(&self.t.channels[c])[self.t.users[u].joined[entry].position]
                previous = word[0] & TAB_PUSH
                word[0] = (word[0] & TAB_USER_MASK) | (TAB_PUSH if push else 0)
                return previous
        if u < 0 or _room_for_one(&self.t, <uint32_t>c, <uint32_t>u) < 0:
            if new_user:
                _free_user(&self.t, <uint32_t>u)
            if new_channel:
                _free_channel(&self.t, <uint32_t>c)
            raise MemoryError()
        ch = &self.t.channels[c]
        us = &self.t.users[u]
        _members(ch)[ch.count] = <uint32_t>u | (TAB_PUSH if push else 0)
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
        push = _members(&self.t.channels[c])[self.t.users[u].joined[entry].position] & TAB_PUSH
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
        return bool(_members(&self.t.channels[c])[self.t.users[u].joined[entry].position] & TAB_PUSH)

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
        cdef size_t length
        cdef const char* name = _channel_name(&self.t, c, &length)
        return name[:length].decode("utf-8", "surrogatepass")

    def channel_members(self, str channel) -> list:
        """The ids of the channel's members (none for an unknown channel), in no set order."""
        cdef int64_t c = self._channel(channel)
        cdef uint32_t i
        cdef tab_channel_t* ch
        if c < 0:
            return []
        ch = &self.t.channels[c]
        return [self.t.users[_members(ch)[i] & TAB_USER_MASK].id for i in range(ch.count)]

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
                 bool(_members(&self.t.channels[us.joined[i].channel])[us.joined[i].position] & TAB_PUSH))
                for i in range(us.count)]

    def channel_names(self) -> list:
        """The names of every channel, in no set order."""
        cdef uint32_t c
        return [self._name(c) for c in range(self.t.channel_records) if self.t.channels[c].name != TAB_NONE]

    def channel_count(self) -> int:
        return self.t.channel_index.count

    def user_count(self) -> int:
        """How many users are held: a member somewhere, or the creator of an existing channel."""
        return self.t.user_index.count

    def membership_count(self) -> int:
        return self.t.memberships

    def set_private(self, str channel, bint private):
        """Mark an existing channel private or not; KeyError for an unknown one."""
        cdef int64_t c = self._channel(channel)
        if c < 0:
            raise KeyError(f"no channel {channel!r}")
        if private:
            self.t.channels[c].hash |= TAB_PRIVATE
        else:
            self.t.channels[c].hash &= TAB_HASH_MASK

    def private(self, str channel) -> bool:
        """Whether the channel is private (False for an unknown one)."""
        cdef int64_t c = self._channel(channel)
        return c >= 0 and (self.t.channels[c].hash & TAB_PRIVATE) != 0

    def set_creator(self, str channel, uint64_t creator):
        """Record who created an existing channel (0: not known); KeyError for an
        unknown one. The channel then counts for that user (``created``), no longer
        for its previous creator."""
        cdef int64_t c = self._channel(channel)
        if c < 0:
            raise KeyError(f"no channel {channel!r}")
        if _set_creator(&self.t, <uint32_t>c, creator) < 0:
            raise MemoryError()

    def created(self, uint64_t user_id) -> int:
        """How many of the existing channels the user created (``set_creator``)."""
        cdef int64_t u = _find_user(&self.t, user_id)
        return self.t.users[u].created if u >= 0 else 0

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
        total += self.t.names.capacity
        for i in range(self.t.user_records):
            total += self.t.users[i].capacity * sizeof(tab_entry_t) if self.t.users[i].id else 0
        for i in range(self.t.channel_records):
            if self.t.channels[i].name != TAB_NONE:
                total += self.t.channels[i].capacity * sizeof(uint32_t)
        return total

    def check(self):
        """Verify that both sides of every membership agree, every count is right
        (created channels too: a user is held exactly while it has a membership or
        counts one), member words are inline exactly while at most TAB_INLINE, and
        the name arena is sound and at most half holes (AssertionError otherwise):
        for tests."""
        cdef uint32_t i, j, live = 0, word
        cdef size_t memberships = 0, offset = 0, header, length, freed = 0
        cdef const unsigned char* name
        cdef const char* channel_name
        cdef tab_user_t* us
        cdef tab_channel_t* ch
        cdef set live_names = set()
        cdef dict created = {}          # user index -> channels it created, from the channels' side
        cdef int64_t creator
        for i in range(self.t.channel_records):
            if self.t.channels[i].name != TAB_NONE and self.t.channels[i].creator:
                creator = _find_user(&self.t, self.t.channels[i].creator)
                assert creator >= 0, ("a creator without its record", self.t.channels[i].creator)
                created[creator] = created.get(creator, 0) + 1
        for i in range(self.t.user_records):
            us = &self.t.users[i]
            if us.id == 0:
                continue
            live += 1
            assert us.created == created.pop(i, 0), (us.id, us.created)
            if us.count == 0:
                assert us.created > 0 and us.capacity == 0 and us.joined == NULL, (us.id, us.capacity)
            assert us.count <= us.capacity, (us.id, us.count, us.capacity)
            assert _find_user(&self.t, us.id) == i
            for j in range(us.count):
                ch = &self.t.channels[us.joined[j].channel]
                assert ch.name != TAB_NONE and us.joined[j].position < ch.count
                assert _members(ch)[us.joined[j].position] & TAB_USER_MASK == i
            memberships += us.count
        assert live == self.t.user_index.count and memberships == self.t.memberships
        while offset < self.t.names.used:       # the arena: entries end to end
            name = _arena_entry(&self.t.names, offset, &header)
            if header & 1:
                freed += <size_t>(name - (self.t.names.bytes + offset)) + (header >> 1)
            else:
                live_names.add(offset)
            offset = <size_t>(name - self.t.names.bytes) + (header >> 1)
        assert offset == self.t.names.used <= self.t.names.capacity and freed == self.t.names.holes
        assert self.t.names.holes * 2 <= self.t.names.used, (self.t.names.holes, self.t.names.used)
        live = 0
        memberships = 0
        for i in range(self.t.channel_records):
            ch = &self.t.channels[i]
            if ch.name == TAB_NONE:
                continue
            live += 1
            live_names.remove(ch.name)
            if ch.capacity:
                assert TAB_INLINE < ch.count <= ch.capacity, (ch.count, ch.capacity)
            else:
                assert ch.count <= TAB_INLINE, ch.count
            channel_name = _channel_name(&self.t, i, &length)
            assert _name_hash(channel_name, length) == ch.hash & TAB_HASH_MASK
            assert tables_channel(&self.t, channel_name, length) == i
            for j in range(ch.count):
                word = _members(ch)[j] & TAB_USER_MASK
                assert self.t.users[word].id != 0 and _entry_of(&self.t, word, i) >= 0
            memberships += ch.count
        assert not live_names, "names in the arena that no channel holds"
        assert live == self.t.channel_index.count and memberships == self.t.memberships
