"""The Lua scripts and commands of the archive tier's write side on nodes (``--archive``).

Pure builders, like ``zim.nodes.schema``: command tuples and reply parsers,
nothing that talks to Redis. The keys are ``zim.nodes.archive_schema``'s;
docs/redis.md, "The archive tier", explains them.

- ``APPEND_KEPT`` replaces ``schema.APPEND`` when ``--archive`` is on: a
  conversation whose ``seq`` key is missing (Redis lost it) answers
  ``NEEDS_SEQ`` and appends nothing, so seq is first restored from PostgreSQL
  (``zim.nodes.archiving.restore_conversation``) and never starts again at 1;
  and in a kind the archive keeps, the cap and the TTL never trim above the
  ``archived`` watermark, and the log gets its TTL only once all of it is archived.
  On a single Redis a pair's append also takes the generation marker: while
  Redis holds the archive's, a missing ``seq`` means a new pair (seq 1 at
  once, no PostgreSQL read); ``KNOWN_HERE`` is the same test for the refill.
- ``MARK`` records that an entry changed (its shard's ``changed``/``since``/``clock``).
- ``TAKE`` takes or renews a shard's lease and reads its oldest entries;
  ``READ_CONVERSATION`` reads what of a conversation is not archived yet;
  ``ARCHIVED`` raises the watermark once PostgreSQL committed and trims up to
  it; ``DONE`` removes the entries whose version is still the one read.
"""
from __future__ import annotations

from typing import Any, Iterable

from zim.nodes.archive_schema import GENERATION_KEY, archive_keys, shard_keys, shard_of
from zim.nodes.schema import ConversationKeys, Script, channel_access_keys, encode_message
from zim.storage.retention import Retention
from zim.storage.store import Message

Command = tuple
NEEDS_SEQ = -1          # APPEND_KEPT's answer: the conversation's seq is missing, nothing appended
LOST = -1               # ARCHIVED's answer: the conversation is gone from Redis, nothing changed
TTL_SCAN_APPEND = 8     # expired messages an append may drop (more than arrive: one)
TTL_SCAN_ARCHIVED = 1000    # ... and a confirmation of the archive (the backlog of an outage)

# trim_kept(log, seq, archived, ttl, cap, now, kept, scan): the cap and TTL trims of
# zim.nodes.schema.APPEND, except that with ``kept`` nothing above ``archived`` goes
# and the log expires only once everything in it is archived (else it is PERSISTed).
_TRIM_KEPT = """
local function trim_kept(log, seq, archived, ttl, cap, now, kept, scan)
  local limit = nil
  if kept then limit = archived + 1 end
  if cap > 0 and seq > cap then
    local minid = seq - cap + 1
    if limit and minid > limit then minid = limit end
    redis.call('XTRIM', log, 'MINID', string.format('%d', minid))
  end
  if ttl > 0 then
    local horizon = now - ttl
    local function stays(entry)
      local s, created = string.match(entry[1], '^(%d+)-(%d+)$')
      return tonumber(created) >= horizon or (limit and tonumber(s) >= limit), tonumber(s)
    end
    -- the head alone first: a live log's head stays, and reading ``scan`` entries costs
    local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
    if head and not stays(head) then
      local keep = nil
      for _, entry in ipairs(redis.call('XRANGE', log, '-', '+', 'COUNT', scan)) do
        local stop, s = stays(entry)
        keep = s
        if stop then break end
        keep = keep + 1
      end
      redis.call('XTRIM', log, 'MINID', string.format('%d', keep))
    end
    if limit and archived < seq then redis.call('PERSIST', log) else redis.call('PEXPIRE', log, ttl) end
  end
end
-- the tier of the conversation: ttl, cap, kept (ARGV from ``first``: ttl, cap,
-- large members, large ttl, large cap, kept, large kept)
local function tier(members, first)
  local ttl, cap, kept = tonumber(ARGV[first]), tonumber(ARGV[first + 1]), ARGV[first + 5] == '1'
  local large = tonumber(ARGV[first + 2])
  if members and large > 0 and redis.call('HLEN', members) >= large then
    ttl, cap, kept = tonumber(ARGV[first + 3]), tonumber(ARGV[first + 4]), ARGV[first + 6] == '1'
  end
  return ttl, cap, kept
end
"""

# KEYS: seq, log, archived, then members (a channel) or the generation marker (a
# pair on a single Redis). ARGV: message, createdAt ms, now ms, the tier (ttl, cap,
# large members, large ttl, large cap, kept, large kept), the marker's expected
# value ('': none). A missing seq is NEEDS_SEQ, unless the marker is Redis's: then
# Redis lost nothing since it was set, and the pair is new (it starts at seq 1).
APPEND_KEPT = Script("append_kept", _TRIM_KEPT + f"""
local members, generation = KEYS[4], nil
if ARGV[11] ~= '' then members, generation = nil, KEYS[4] end
if redis.call('EXISTS', KEYS[1]) == 0 and not (generation and redis.call('GET', generation) == ARGV[11]) then
  return -1
end
local seq = redis.call('INCR', KEYS[1])
local ttl, cap, kept = tier(members, 4)
redis.call('XADD', KEYS[2], string.format('%d-%s', seq, ARGV[2]), 'm', ARGV[1])
trim_kept(KEYS[2], seq, tonumber(redis.call('GET', KEYS[3]) or '0'), ttl, cap, tonumber(ARGV[3]), kept, {TTL_SCAN_APPEND})
return seq
""")

# KEYS: seq, log, archived, [members]. ARGV: archived seq, now ms, then the tier.
# PostgreSQL committed everything up to the seq: the watermark rises (never falls),
# then the trims it held back apply. LOST if the conversation is gone.
ARCHIVED = Script("archived", _TRIM_KEPT + f"""
local seq = redis.call('GET', KEYS[1])
if not seq then return -1 end
local archived = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[1]))
redis.call('SET', KEYS[3], string.format('%d', archived))
local ttl, cap, kept = tier(KEYS[4], 3)
if redis.call('EXISTS', KEYS[2]) == 1 then
  trim_kept(KEYS[2], tonumber(seq), archived, ttl, cap, tonumber(ARGV[2]), kept, {TTL_SCAN_ARCHIVED})
end
return archived
""")

# KEYS: changed, since, clock. ARGV: entry, now ms. The entry's new version.
MARK = Script("archive_mark", """
local version = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], version, ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
return version
""")

# KEYS: lease, since, changed. ARGV: node id, lease ms, entries. Takes the shard's
# lease (or renews it); nil if another node holds it. Else: the number of entries,
# then entry, since, version for the oldest ``entries`` of them.
TAKE = Script("archive_take", """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return false
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1, 'WITHSCORES')
local reply = {redis.call('ZCARD', KEYS[2])}
for i = 1, #oldest, 2 do
  reply[#reply + 1] = oldest[i]
  reply[#reply + 1] = oldest[i + 1]
  reply[#reply + 1] = redis.call('ZSCORE', KEYS[3], oldest[i]) or ''
end
return reply
""")

# KEYS: changed, since. ARGV: taken ms, then entry, version, entry, version...
# Each entry goes only if its version is still the one the archiver read. One
# changed since stays, its ``since`` moved up to the moment the pass took it:
# what it held before then is archived (else a conversation that never stops
# changing would show the lag of its first change for ever).
DONE = Script("archive_done", """
local done = 0
for i = 2, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    done = done + 1
  else
    redis.call('ZADD', KEYS[2], 'XX', 'GT', ARGV[1], ARGV[i])
  end
end
return done
""")

# KEYS: seq, log, archived, [members, private]. ARGV: count. nil if the
# conversation is gone; else {seq, archived, members, private, entries above archived}.
READ_CONVERSATION = Script("archive_read", """
local seq = redis.call('GET', KEYS[1])
if not seq then return false end
local archived = tonumber(redis.call('GET', KEYS[3]) or '0')
local entries = {}
if tonumber(seq) > archived then
  entries = redis.call('XRANGE', KEYS[2], string.format('%d', archived + 1), '+', 'COUNT', ARGV[1])
end
local members, private = 0, 0
if KEYS[4] then
  members = redis.call('HLEN', KEYS[4])
  private = redis.call('EXISTS', KEYS[5])
end
return {seq, string.format('%d', archived), members, private, entries}
""")

# KEYS: seq, archived, generation marker. ARGV: the marker's expected value, '1'
# for a pair. Whether Redis can answer for a conversation without PostgreSQL:
# HERE (it has its seq), NEW (no seq, and Redis lost nothing since the marker
# was set: a pair is started at seq 0, a channel does not exist) or NEEDS_SEQ
# (the marker is not Redis's: only PostgreSQL knows).
KNOWN_HERE = Script("archive_known_here", """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], 0, 'NX')
  redis.call('SET', KEYS[1], 0, 'NX')
end
return 0
""")
HERE, NEW = 1, 0        # KNOWN_HERE's other answers

ARCHIVE_SCRIPTS = (APPEND_KEPT, ARCHIVED, MARK, TAKE, DONE, READ_CONVERSATION, KNOWN_HERE)


# ---------------------------------------------------------------- commands


def tier_args(retention: Retention, kinds: frozenset[str], channel: bool) -> list[Any]:
    """ttl, cap, large members, large ttl, large cap, kept, large kept: a channel's
    two tiers (by member count), or a pair's private tier."""
    if not channel:
        private = retention.private
        return [private.ttl_ms, private.cap, 0, 0, 0, int("private" in kinds), 0]
    normal, large = retention.channel, retention.large
    return [normal.ttl_ms, normal.cap, retention.large_members, large.ttl_ms, large.cap,
            int("channel" in kinds), int("large" in kinds)]


def conversation_script_keys(keys: ConversationKeys) -> list[str]:
    """seq, log, archived, [members]: the keys APPEND_KEPT and ARCHIVED run on."""
    found = [keys.seq, keys.log, archive_keys(keys).archived]
    return found if keys.members is None else [*found, keys.members]


def append_kept_command(keys: ConversationKeys, msg: Message, now_ms: int, retention: Retention,
                        kinds: frozenset[str], generation: bytes | None = None) -> Command:
    """Append a message (APPEND_KEPT); the reply is its seq, or NEEDS_SEQ.
    ``generation``: the marker's value the node read at its start, for a pair on
    a single Redis (a channel, or a cluster, where the marker is in another
    slot: None)."""
    script_keys = conversation_script_keys(keys)
    if generation is not None:
        if keys.members is not None:
            raise ValueError("the generation marker is for a pair's append, not a channel's")
        script_keys.append(GENERATION_KEY)
    return APPEND_KEPT.command(script_keys, [
        encode_message(msg), int(msg.get("createdAt", now_ms)), now_ms,
        *tier_args(retention, kinds, keys.members is not None), generation or ""])


def known_here_command(keys: ConversationKeys, generation: bytes) -> Command:
    """KNOWN_HERE: HERE, NEW (a pair then has seq 0) or NEEDS_SEQ."""
    return KNOWN_HERE.command((keys.seq, archive_keys(keys).archived, GENERATION_KEY),
                              [generation, "0" if keys.members is not None else "1"])


def archived_command(keys: ConversationKeys, archived: int, now_ms: int, retention: Retention,
                     kinds: frozenset[str]) -> Command:
    """PostgreSQL holds the conversation up to ``archived``: raise the watermark and trim."""
    return ARCHIVED.command(conversation_script_keys(keys),
                            [archived, now_ms, *tier_args(retention, kinds, keys.members is not None)])


def mark_command(entry: str, now_ms: int) -> Command:
    """The entry changed: archive it (in its shard's slot)."""
    keys = shard_keys(shard_of(entry))
    return MARK.command((keys.changed, keys.since, keys.clock), [entry, now_ms])


def take_command(shard: int, node_id: str, lease_ms: int, entries: int) -> Command:
    keys = shard_keys(shard)
    return TAKE.command((keys.lease, keys.since, keys.changed), [node_id, lease_ms, entries])


def parse_take(reply: Any) -> tuple[int, list[tuple[str, int, bytes]]] | None:
    """None (another node's lease), else (entries in the shard, [(entry, since ms, version)])."""
    if reply is None:
        return None
    taken = [(reply[i].decode(), int(float(reply[i + 1])), reply[i + 2]) for i in range(1, len(reply), 3)]
    return int(reply[0]), taken


def done_command(shard: int, done: Iterable[tuple[str, bytes]], taken_ms: int) -> Command | None:
    """DONE for the entries a pass archived whole, as read (``taken_ms``: when it took them)."""
    args = [value for entry, version in done for value in (entry, version)]
    if not args:
        return None
    keys = shard_keys(shard)
    return DONE.command((keys.changed, keys.since), [taken_ms, *args])


def read_conversation_command(keys: ConversationKeys, channel: str | None, count: int) -> Command:
    script_keys = conversation_script_keys(keys)
    if channel is not None:
        script_keys.append(channel_access_keys(channel).private)
    return READ_CONVERSATION.command(script_keys, [count])
