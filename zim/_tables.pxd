# Compact C tables of users, channels and memberships (issue 18).
#
# Users (u64 ids) and channels (UTF-8 names) are interned to dense u32 indexes by
# open-addressing hashes whose slots hold index + 1 (0: empty); freed indexes are
# reused. A channel holds its member words, u32 user indexes (push flag in the top
# bit): up to TAB_INLINE of them inside its record, more in a malloc'd array; a user
# holds (channel index, position in that member array) pairs, so a membership costs
# 4 bytes on the channel side and 8 on the user side, and a leave swaps the channel's
# last member into the hole in O(1) plus a scan of that member's (short) list. A user
# also counts the existing channels it created (the quota of created channels); a user
# with neither membership nor created channel is not held at all. Channel names live
# in one arena of bytes (see tab_arena_t), not one malloc each.
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    TAB_PUSH = 0x80000000u          # member word: push flag
    TAB_USER_MASK = 0x7FFFFFFFu     # member word: user index
    TAB_NONE = 0xFFFFFFFFu          # no index (end of a free list); a free channel record's name
    TAB_PRIVATE = 0x80000000u       # channel hash word: private flag
    TAB_HASH_MASK = 0x7FFFFFFFu     # channel hash word: the name's hash (31 bits)
    TAB_INLINE = 2                  # member words a channel holds in its record (members.local)

cdef struct tab_entry_t:            # one membership, on the user's side
    uint32_t channel
    uint32_t position               # of the user in the channel's member words

cdef struct tab_user_t:             # 32 bytes
    uint64_t id                     # 0: a free record
    tab_entry_t* joined             # NULL while count is 0
    uint32_t count
    uint32_t capacity               # a free record: the next free index
    uint32_t created                # existing channels whose creator is this user

cdef union tab_members_t:
    uint32_t* heap                  # capacity > 0 (then count > TAB_INLINE)
    uint32_t local[2]               # capacity 0: up to TAB_INLINE words, no malloc

cdef struct tab_channel_t:          # 32 bytes
    uint32_t name                   # offset of its name in the arena; TAB_NONE: a free record
    uint32_t hash                   # the name's hash | TAB_PRIVATE
    uint32_t count
    uint32_t capacity               # of members.heap, 0 while inline; a free record: the next free index
    tab_members_t members
    uint64_t creator                # the user whose join made it; 0: not known

cdef struct tab_arena_t:            # channel names, each a varint of (length << 1 | freed) then its bytes
    unsigned char* bytes
    size_t used                     # names and holes, below 4 GiB (offsets are u32)
    size_t capacity
    size_t holes                    # bytes of freed names; compacted away when over half of used

cdef struct tab_index_t:            # open addressing, linear probing, backward-shift delete
    uint32_t* slots                 # record index + 1; 0: empty
    size_t capacity                 # a power of two
    size_t count

cdef struct tables_t:
    tab_index_t user_index
    tab_user_t* users
    uint32_t user_records           # records in use or free
    uint32_t user_capacity
    uint32_t user_free
    tab_index_t channel_index
    tab_channel_t* channels
    uint32_t channel_records
    uint32_t channel_capacity
    uint32_t channel_free
    tab_arena_t names
    size_t memberships

cdef int tables_init(tables_t* t, size_t initial) noexcept nogil
cdef void tables_free(tables_t* t) noexcept nogil
cdef int tables_copy(tables_t* t, tables_t* source) noexcept nogil   # -1: no memory (t empty)
# for C callers (the broadcast path): a channel's index (-1: none), its members, a user's id.
# The member words may lie inside the channel's record: they are valid until the tables next change.
cdef int64_t tables_channel(tables_t* t, const char* name, size_t length) noexcept nogil
cdef const uint32_t* tables_members(tables_t* t, uint32_t channel, uint32_t* count) noexcept nogil
cdef uint64_t tables_user_id(tables_t* t, uint32_t user) noexcept nogil
