"""The Redis data layout of multi-node zim: key names, Lua scripts, commands.

Everything here builds plain command tuples (``("XREVRANGE", key, ...)``) and
parses replies; nothing talks to Redis. A node sends the commands through
``zim.nodes.link.RedisLink`` (or, in tests and tools, a synchronous redis-py
client via ``execute``). docs/redis.md explains the layout and why.

Hash tags. Every key of one conversation carries the same hash tag, so a Lua
script touching them runs on one Redis Cluster node:

- a channel: ``{c:<name>}``: ``zim:{c:<name>}:seq``, ``:log``, ``:members``;
- a user pair: ``{u:<low id>:<high id>}``: ``:seq``, ``:log``;
- a user: ``{m:<id>}``: ``:user`` (name), ``:channels``, ``:box`` and ``:mail``
  (the mailbox), ``:held`` and ``:bytes`` (the mailbox's quota), ``:created``
  (the channels the user created, for its quota), ``:presence``.

A conversation's history is a Redis Stream whose entry ids are
``<seq>-<createdAt ms>``: ids grow with seq, so ``XREVRANGE log <seq> -`` pages
by seq in one command, and the creation time needed for the TTL rides in the id.

Operations that touch two hash tags (a direct message: the pair's history, then
the receiver's mailbox; subscribe; presence) are returned as
``steps``: commands to send one after the other, each once the one before it
succeeded, and to acknowledge to the client only after the last.

Quotas (zim.storage.store.Quotas). A direct message first *holds* room in the
receiver's mailbox (``MAILBOX_HOLD``, in the receiver's slot: atomic with every
other send to that mailbox), then is appended to the pair's history (which
takes its seq), then its copy takes the held room (``MAILBOX_ADD``); a full
mailbox refuses the hold, so nothing is stored and no seq is taken. A subscribe
to a channel that does not exist first claims one of the user's channel
creations (``CHANNEL_CLAIM``, the user's ``created`` set), then creates it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple, Sequence

import orjson

from zim.storage.retention import Retention, Tier
from zim.storage.store import Message, Quotas, StoreRefusal, pair_key

Command = tuple
PREFIX = "zim"
SECRET_KEY = f"{PREFIX}:secret"        # the token-signing secret, one for all nodes (without --secret-file)
SECRET_ID_KEY = f"{PREFIX}:secret-id"  # a fingerprint of the secret the nodes sign with (zim.tokens.secret_id)
TOKENS_V2_KEY = f"{PREFIX}:tokens-v2-since"    # Unix ms: version 1 tokens count for one lifetime from then
NODES_KEY = f"{PREFIX}:nodes"          # sorted set: node id -> heartbeat deadline (ms)
HOLD_MS = 60_000                       # a hold of mailbox room lasts this long if its send never ends
MAX_SEQ = (1 << 63) - 1                # (the most digits a seq can add to a mailbox copy)
# MAILBOX_HOLD's answers
HELD, FULL_BY_COUNT, FULL_BY_BYTES = 0, 1, 2
# CHANNEL_CLAIM's answers
CLAIM_REFUSED, CLAIMED, CLAIMED_BEFORE = 0, 1, 2
# CHANNEL_JOIN's and CHANNEL_CREATE's answer for a join meant for a new public
# channel that found a private one (made meanwhile on another node): nothing done
FOUND_PRIVATE = 2
ACK_CHUNK = 1000                       # ids per ZREM/HDEL inside the ack script (Lua's unpack limit)


# ---------------------------------------------------------------- keys


class ConversationKeys(NamedTuple):
    """The keys of one conversation; ``members`` is None for a user pair."""

    seq: str          # string: the last seq given (never expires, so seq never restarts)
    log: str          # stream: the history, entry id "<seq>-<createdAt ms>", field "m" the message
    members: str | None   # hash: user id -> "1" (push) or "0" (channels only)


class UserKeys(NamedTuple):
    """The keys of one user, all in the user's hash slot."""

    user: str         # hash: "name", and "epoch" (token generation; absent: 0) once bumped
    channels: str     # hash: channel -> "1"/"0" (push); an index of the channels' members hashes
    box: str          # sorted set: message id, scored by arrival (the mailbox's order)
    mail: str         # hash: message id -> the message as JSON (a copy, with seq)
    presence: str     # hash: node id -> 1, for each node holding connections of the user
    held: str         # sorted set: "<bytes>:<message id>" -> deadline ms: room held by sends under way
    bytes: str        # string: bytes of the copies in ``mail`` plus the room held
    created: str      # set: the channels the user created (its channel quota)


def channel_keys(channel: str) -> ConversationKeys:
    """The keys of a channel's conversation (hash tag ``{c:<name>}``)."""
    base = f"{PREFIX}:{{c:{channel}}}"
    return ConversationKeys(f"{base}:seq", f"{base}:log", f"{base}:members")


class ChannelAccessKeys(NamedTuple):
    """Who may join a private channel: keys of the channel's hash tag."""

    private: str      # string "1": the channel is private (set at its creation, with seq; never changed)
    grants: str       # hash: user id -> "1" (may invite others) or "0": who may join


def channel_access_keys(channel: str) -> ChannelAccessKeys:
    """The private flag and grants of a channel (hash tag ``{c:<name>}``)."""
    base = f"{PREFIX}:{{c:{channel}}}"
    return ChannelAccessKeys(f"{base}:private", f"{base}:grants")


def pair_keys(user_a: int, user_b: int) -> ConversationKeys:
    """The keys of the direct conversation of two users, either order
    (hash tag ``{u:<low>:<high>}``)."""
    low, high = pair_key(user_a, user_b)
    base = f"{PREFIX}:{{u:{low}:{high}}}"
    return ConversationKeys(f"{base}:seq", f"{base}:log", None)


def user_keys(user_id: int) -> UserKeys:
    """The keys of one user (hash tag ``{m:<id>}``)."""
    base = f"{PREFIX}:{{m:{user_id}}}"
    return UserKeys(f"{base}:user", f"{base}:channels", f"{base}:box", f"{base}:mail",
                    f"{base}:presence", f"{base}:held", f"{base}:bytes", f"{base}:created")


def node_users_key(node: str) -> str:
    """The set of users with connections on a node, so a sweeper can clear a dead
    node's presence fields without scanning every user."""
    return f"{PREFIX}:{{node:{node}}}:users"


# ---------------------------------------------------------------- scripts


class Script:
    """A Lua script sent as EVALSHA, with EVAL as the fallback on NOSCRIPT (a
    restarted or new cluster node has an empty script cache)."""

    registry: dict[str, "Script"] = {}

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        Script.registry[self.sha] = self

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> Command:
        """The EVALSHA command running this script on ``keys`` with ``args``."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def load_command(self) -> Command:
        """SCRIPT LOAD, to send to every master at start (then EVALSHA finds it)."""
        return ("SCRIPT", "LOAD", self.source)


def eval_fallback(command: Command) -> Command:
    """The EVAL form of an EVALSHA command built here: what to send after NOSCRIPT."""
    return ("EVAL", Script.registry[command[1]].source, *command[2:])


def is_noscript(error: object) -> bool:
    """Whether an error (a link's failure reason or a client's exception) says
    that the script is not in the server's cache. redis-py drops the NOSCRIPT
    prefix from the message, so the text is checked too."""
    text = str(error)
    return text.startswith("NOSCRIPT") or "No matching script" in text


def execute(client: Any, command: Command) -> Any:
    """Run one command on a synchronous redis-py client (``Redis`` or
    ``RedisCluster``), retrying an EVALSHA as EVAL on NOSCRIPT. For tests and
    tools; a node sends the same commands through its link."""
    try:
        return client.execute_command(*command)
    except Exception as exc:  # noqa: BLE001 -- only NOSCRIPT is retried; the rest re-raised
        if command[0] == "EVALSHA" and is_noscript(exc):
            return client.execute_command(*eval_fallback(command))
        raise


# KEYS: seq, log, [members]. ARGV: message, createdAt ms, now ms, ttl ms, cap,
# large_members (0: no large tier), large ttl ms, large cap.
APPEND = Script("append", """
local seq = redis.call('INCR', KEYS[1])
local ttl, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
if KEYS[3] and tonumber(ARGV[6]) > 0 and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[6]) then
  ttl, cap = tonumber(ARGV[7]), tonumber(ARGV[8])
end
redis.call('XADD', KEYS[2], string.format('%d-%s', seq, ARGV[2]), 'm', ARGV[1])
if cap > 0 and seq > cap then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', seq - cap + 1))
end
if ttl > 0 then
  -- drop expired messages from the head, at most 8 per append: more than arrive
  -- (one), so an active conversation's head keeps up; a quiet one expires whole.
  -- The head alone is read first: in a live log it has not expired (reading 8 costs)
  local horizon = tonumber(ARGV[3]) - ttl
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  if head and tonumber(string.match(head[1], '^%d+-(%d+)$')) < horizon then
    local keep = nil
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 8)) do
      local s, created = string.match(entry[1], '^(%d+)-(%d+)$')
      keep = tonumber(s)
      if tonumber(created) >= horizon then break end
      keep = keep + 1
    end
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', keep))
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return seq
""")

# The mailbox's bytes (``bytes``): a counter kept by MAILBOX_HOLD, MAILBOX_ADD,
# MAILBOX_RELEASE and MAILBOX_ACK; a mailbox made before it existed gets it
# counted once (one HSTRLEN per copy) by the first of them to run.
_BOX_BYTES = """
local function box_bytes(mail, counter)
  local value = redis.call('GET', counter)
  if value then return tonumber(value) end
  local total = 0
  for _, id in ipairs(redis.call('HKEYS', mail)) do total = total + redis.call('HSTRLEN', mail, id) end
  redis.call('SET', counter, total)
  return total
end
"""

# KEYS: box, mail, held, bytes. ARGV: hold ("<bytes>:<id>"), bytes, now ms,
# deadline ms, max messages (0: none), max bytes (0: none). Holds room for one
# message in the mailbox, atomically with every other send to it: HELD, or
# FULL_BY_COUNT / FULL_BY_BYTES (nothing changed). Holds whose deadline passed
# (a node died between the steps of a send) are dropped first.
MAILBOX_HOLD = Script("mailbox_hold", _BOX_BYTES + """
local used = box_bytes(KEYS[2], KEYS[4])
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[3])
if #stale > 0 then
  for _, hold in ipairs(stale) do used = used - tonumber(string.match(hold, '^(%d+):')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[3])
  redis.call('SET', KEYS[4], used)
end
local size, max_count, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
if max_count > 0 and redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[3]) >= max_count then
  return 1
end
if max_bytes > 0 and used + size > max_bytes then return 2 end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('INCRBY', KEYS[4], size)
return 0
""")

# KEYS: held, bytes. ARGV: hold. A send that held room failed before its copy
# was added: the room goes back (a hold already dropped changes nothing).
MAILBOX_RELEASE = Script("mailbox_release", """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(string.match(ARGV[1], '^(%d+):')))
end
return 0
""")

# KEYS: box, mail, held, bytes. ARGV: message id, message JSON, hold ("": none).
# A retry of the same id keeps its place and replaces the copy (as MemoryStore
# and SQLiteStore do). The copy takes its hold's room: ``bytes`` then counts its
# exact length (a hold is an upper bound: the seq was not known yet).
MAILBOX_ADD = Script("mailbox_add", _BOX_BYTES + """
local used = box_bytes(KEYS[2], KEYS[4])
local held = 0
if ARGV[3] ~= '' and redis.call('ZREM', KEYS[3], ARGV[3]) == 1 then
  held = tonumber(string.match(ARGV[3], '^(%d+):'))
end
local change = string.len(ARGV[2]) - held - redis.call('HSTRLEN', KEYS[2], ARGV[1])
if change ~= 0 then redis.call('SET', KEYS[4], used + change) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('ZADD', KEYS[1], last[2] and (tonumber(last[2]) + 1) or 1, ARGV[1])
return 1
""")

# KEYS: box, mail. ARGV: limit. The copies of the oldest ``limit`` messages.
MAILBOX_PULL = Script("mailbox_pull", """
local limit = tonumber(ARGV[1])
if limit < 1 then return {} end  -- ZRANGE 0 -1 would be the whole mailbox
local ids = redis.call('ZRANGE', KEYS[1], 0, limit - 1)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
""")

# KEYS: box, mail, held, bytes. ARGV: message ids (unknown ones are ignored).
# Atomic, so an entry never loses its copy or the other way round; the bytes
# counter loses their copies' lengths, and goes once nothing is left.
MAILBOX_ACK = Script("mailbox_ack", _BOX_BYTES + f"""
local used = box_bytes(KEYS[2], KEYS[4])
local removed = 0
for first = 1, #ARGV, {ACK_CHUNK} do
  local chunk = {{unpack(ARGV, first, math.min(first + {ACK_CHUNK} - 1, #ARGV))}}
  for _, id in ipairs(chunk) do
    local size = redis.call('HSTRLEN', KEYS[2], id)
    if size > 0 then
      redis.call('HDEL', KEYS[2], id)
      used = used - size
    end
  end
  removed = removed + redis.call('ZREM', KEYS[1], unpack(chunk))
end
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4])
else
  redis.call('SET', KEYS[4], math.max(used, 0))
end
return removed
""")

# KEYS: seq, members, private. ARGV: user id, push flag, public only ("1": the
# joiner saw no channel, so it may join only a public one). Join a channel that
# exists: 1; 0 if it does not (nothing changed: creating it is CHANNEL_CLAIM's,
# then CHANNEL_CREATE's); FOUND_PRIVATE if it is private and the join was public only.
CHANNEL_JOIN = Script("channel_join", """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")

# KEYS: created (the user's). ARGV: channel, max channels (0: none). One of the
# user's channel creations: CLAIMED, CLAIMED_BEFORE (this channel was claimed
# already: a retry), or CLAIM_REFUSED (the user created the maximum).
CHANNEL_CLAIM = Script("channel_claim", """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 2 end
local max = tonumber(ARGV[2])
if max > 0 and redis.call('SCARD', KEYS[1]) >= max then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
""")

# KEYS: seq, members, private. ARGV: user id, push flag. Create the channel (seq
# at 0) and join it: 1; 0 if someone created it meanwhile (joined all the same),
# unless they made it private: FOUND_PRIVATE, nothing done.
CHANNEL_CREATE = Script("channel_create", """
local made = redis.call('SET', KEYS[1], 0, 'NX')
if not made and redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if made then return 1 end
return 0
""")

# KEYS: seq, private, grants. ARGV: private flag, creator (or ""). Make a channel
# without members, private or not, the creator of a private one with the invite
# right: 1; 0 if it exists (nothing changed). The flag is set with seq: a node
# that sees the channel can read whether it is private.
CHANNEL_MAKE = Script("channel_make", """
if not redis.call('SET', KEYS[1], 0, 'NX') then return 0 end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[2], 1)
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], 1) end
end
return 1
""")

# KEYS: seq, log, members, private, grants. Delete the channel (the server API): its members' ids,
# or nil if it did not exist. One script, so that no join slips in between.
CHANNEL_DELETE = Script("channel_delete", """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local members = redis.call('HKEYS', KEYS[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return members
""")

SCRIPTS = (APPEND, MAILBOX_HOLD, MAILBOX_RELEASE, MAILBOX_ADD, MAILBOX_PULL, MAILBOX_ACK,
           CHANNEL_JOIN, CHANNEL_CLAIM, CHANNEL_CREATE, CHANNEL_MAKE, CHANNEL_DELETE)


# ---------------------------------------------------------------- messages


def encode_message(msg: Message) -> bytes:
    """A message as stored in a history stream: JSON without its seq (the entry id
    carries it)."""
    return orjson.dumps({field: value for field, value in msg.items() if field != "seq"})


def _tier_args(tier: Tier) -> list[int]:
    return [tier.ttl_ms, tier.cap]


def append_channel_command(channel: str, msg: Message, now_ms: int, retention: Retention) -> Command:
    """Append a message to a channel's history; the reply is its seq. The
    script picks the channel or large tier by the member count, atomically."""
    keys = channel_keys(channel)
    return APPEND.command(keys, [encode_message(msg), int(msg.get("createdAt", now_ms)), now_ms,
                                 *_tier_args(retention.channel), retention.large_members,
                                 *_tier_args(retention.large)])


def append_pair_command(sender_id: int, receiver_id: int, msg: Message, now_ms: int,
                        retention: Retention) -> Command:
    """Append a direct message to the pair's history; the reply is its seq.
    Only the first step of a send: see ``mailbox_add_command``."""
    keys = pair_keys(sender_id, receiver_id)
    return APPEND.command(keys[:2], [encode_message(msg), int(msg.get("createdAt", now_ms)), now_ms,
                                     *_tier_args(retention.private), 0, 0, 0])


def history_command(keys: ConversationKeys, before_seq: int | None, limit: int) -> Command:
    """One page of history: up to ``limit`` messages with seq < ``before_seq``
    (the newest when None), plus one more to tell whether older ones exist."""
    end = "+" if before_seq is None else str(max(0, before_seq - 1))
    return ("XREVRANGE", keys.log, end, "-", "COUNT", max(0, limit) + 1)


def parse_history(reply: list, limit: int) -> tuple[list[Message], bool]:
    """The (messages oldest first, hasMore) of a ``history_command`` reply."""
    limit = max(0, limit)
    newest_first = reply[:limit]
    messages = []
    for entry_id, fields in reversed(newest_first):
        msg = orjson.loads(_field(fields, b"m"))
        msg["seq"] = int(entry_id.split(b"-", 1)[0])
        messages.append(msg)
    return messages, len(reply) > limit


def _field(fields: Any, name: bytes) -> bytes:
    # redis-py hands stream fields back as a dict, hiredis (the link) as a flat list
    if isinstance(fields, dict):
        return fields[name]
    return fields[fields.index(name) + 1]


# ---------------------------------------------------------------- mailboxes


def hold_size(msg: Message) -> int:
    """The room a direct message's copy will take, before its seq is known: its
    JSON with the longest seq there is (an upper bound; MAILBOX_ADD counts the
    exact length)."""
    return len(orjson.dumps({**msg, "seq": MAX_SEQ}))


def hold_of(msg: Message, size: int) -> str:
    """The held room's name: its bytes and the message's id."""
    return f"{size}:{msg['id']}"


def mailbox_hold_command(receiver_id: int, hold: str, size: int, now_ms: int,
                         max_mailbox: int, max_mailbox_bytes: int) -> Command:
    """Hold room for one message in the receiver's mailbox: the first step of a
    direct message when a mailbox quota is on. The reply: HELD, else FULL_BY_COUNT
    or FULL_BY_BYTES and nothing changed (see ``mailbox_refusal``)."""
    keys = user_keys(receiver_id)
    return MAILBOX_HOLD.command((keys.box, keys.mail, keys.held, keys.bytes),
                                [hold, size, now_ms, now_ms + HOLD_MS, max_mailbox, max_mailbox_bytes])


def mailbox_release_command(receiver_id: int, hold: str) -> Command:
    """Give back the room a send held (its history append failed)."""
    keys = user_keys(receiver_id)
    return MAILBOX_RELEASE.command((keys.held, keys.bytes), [hold])


def mailbox_refusal(reply: Any, quotas: Quotas) -> StoreRefusal | None:
    """The StoreRefusal of a ``mailbox_hold_command`` reply (None: held)."""
    reply = int(reply)
    if reply == HELD:
        return None
    if reply == FULL_BY_COUNT:
        return quotas.full_by_count()
    if reply == FULL_BY_BYTES:
        return quotas.full_by_bytes()
    raise ValueError(f"unexpected mailbox_hold reply {reply!r}")


def mailbox_add_command(receiver_id: int, msg: Message, hold: str = "") -> Command:
    """Put a copy of a direct message (seq set) into the receiver's mailbox, in
    the room ``hold`` held for it (none: counted all the same). The last step
    of a send, after ``append_pair_command``; idempotent by id."""
    keys = user_keys(receiver_id)
    return MAILBOX_ADD.command((keys.box, keys.mail, keys.held, keys.bytes),
                               [msg["id"], orjson.dumps(msg), hold])


def mailbox_pull_command(user_id: int, limit: int) -> Command:
    """The oldest ``limit`` unacknowledged messages; parse with ``parse_mailbox``."""
    keys = user_keys(user_id)
    return MAILBOX_PULL.command((keys.box, keys.mail), [max(0, limit)])


def parse_mailbox(reply: list) -> list[Message]:
    """The messages of a ``mailbox_pull_command`` reply, oldest first."""
    return [orjson.loads(body) for body in reply if body is not None]


def mailbox_ack_command(user_id: int, ids: Iterable[str]) -> Command | None:
    """Remove these ids from the mailbox (unknown ones ignored); None when there
    is nothing to send. Only strings can be ids (as in the other stores)."""
    wanted = [message_id for message_id in ids if isinstance(message_id, str)]
    if not wanted:
        return None
    keys = user_keys(user_id)
    return MAILBOX_ACK.command((keys.box, keys.mail, keys.held, keys.bytes), wanted)


# ---------------------------------------------------------------- users, channels, presence


def user_record_command(user_id: int, name: str) -> Command:
    """Create a user, or change its name (users are never deleted)."""
    return ("HSET", user_keys(user_id).user, "name", name)


def token_epoch_command(user_id: int) -> Command:
    """The user's token generation (nil: 0)."""
    return ("HGET", user_keys(user_id).user, "epoch")


def revoke_tokens_command(user_id: int) -> Command:
    """Bump the user's token generation (log out everywhere); the reply is the new one.
    Only for a user that exists (a logged-in one): HINCRBY would create the hash."""
    return ("HINCRBY", user_keys(user_id).user, "epoch", 1)


def subscribe_steps(channel: str, user_id: int, push: bool) -> list[Command]:
    """Join (or change the push flag): the channel's side, then the user's index,
    so the index never names a channel the user is not a member of. ``seq`` is
    created at 0 on the first join: the channel exists from then on, members or not.
    Without the channel quota (tests and tools); a node subscribes with
    ``channel_join_command`` and the commands after it (RedisStore.subscribe)."""
    keys = channel_keys(channel)
    flag = "1" if push else "0"
    return [("SET", keys.seq, 0, "NX"), ("HSET", keys.members, user_id, flag),
            ("HSET", user_keys(user_id).channels, channel, flag)]


def channel_join_command(channel: str, user_id: int, push: bool, public_only: bool = False) -> Command:
    """Join a channel if it exists (reply 1), else nothing (0): the first step
    of a subscribe; then ``channel_index_command``, or, for a new channel,
    ``channel_claim_command`` and ``channel_create_command`` before it.
    ``public_only``: a private channel is not joined (FOUND_PRIVATE)."""
    keys = channel_keys(channel)
    return CHANNEL_JOIN.command((keys.seq, keys.members, channel_access_keys(channel).private),
                                [user_id, "1" if push else "0", "1" if public_only else "0"])


def channel_claim_command(user_id: int, channel: str, max_channels: int) -> Command:
    """Count a channel the user is about to create (CLAIMED, CLAIMED_BEFORE), or
    CLAIM_REFUSED when it has created ``max_channels`` (0: no limit)."""
    return CHANNEL_CLAIM.command((user_keys(user_id).created,), [channel, max_channels])


def channel_create_command(channel: str, user_id: int, push: bool) -> Command:
    """Create the channel and join it; reply 0 if it existed meanwhile (joined),
    FOUND_PRIVATE if it was made private meanwhile (not joined)."""
    keys = channel_keys(channel)
    return CHANNEL_CREATE.command((keys.seq, keys.members, channel_access_keys(channel).private),
                                  [user_id, "1" if push else "0"])


def channel_index_commands(channel: str, user_id: int, push: bool, unclaim: bool = False) -> list[Command]:
    """The last step of a subscribe, in the user's slot: the user's index, and
    (``unclaim``) the creation it claimed given back, as someone else created the channel."""
    keys = user_keys(user_id)
    commands = [("HSET", keys.channels, channel, "1" if push else "0")]
    if unclaim:
        commands.append(("SREM", keys.created, channel))
    return commands


def channel_make_command(channel: str, creator: int | None, private: bool) -> Command:
    """Make a channel without members (reply 1), or nothing if it exists (0)."""
    keys, access = channel_keys(channel), channel_access_keys(channel)
    return CHANNEL_MAKE.command((keys.seq, access.private, access.grants),
                                ["1" if private else "0", "" if creator is None else creator])


def channel_join_reads(channel: str, user_id: int) -> list[Command]:
    """What a join decides on, in the channel's slot: whether the channel exists
    (1/0), its private flag (nil: public), the user's membership (nil, "1", "0")
    and grant (nil, "1": may invite, "0")."""
    keys, access = channel_keys(channel), channel_access_keys(channel)
    return [("EXISTS", keys.seq), ("GET", access.private), ("HGET", keys.members, user_id),
            ("HGET", access.grants, user_id)]


def unclaim_command(user_id: int, channel: str) -> Command:
    """Give back a channel creation the user claimed for a channel someone else made."""
    return ("SREM", user_keys(user_id).created, channel)


def grant_command(channel: str, user_id: int, can_invite: bool) -> Command:
    return ("HSET", channel_access_keys(channel).grants, user_id, "1" if can_invite else "0")


def revoke_grant_command(channel: str, user_id: int) -> Command:
    """Reply 1 if the user had a grant, else 0."""
    return ("HDEL", channel_access_keys(channel).grants, user_id)


def grant_of_command(channel: str, user_id: int) -> Command:
    """The user's grant: nil (none), "1" (may invite) or "0"."""
    return ("HGET", channel_access_keys(channel).grants, user_id)


def unsubscribe_steps(channel: str, user_id: int) -> list[Command]:
    """Leave: the user's index first, then the channel's side (whose reply, 1 or
    0, says whether the user was a member)."""
    return [("HDEL", user_keys(user_id).channels, channel),
            ("HDEL", channel_keys(channel).members, user_id)]


def channel_delete_command(channel: str) -> Command:
    """Delete a channel's seq, history, members, private flag and grants; the reply lists the members
    (None: no such channel). Their indexes next: ``channel_unindex_commands``.
    The channel still counts for its creator's quota (the creator is not kept
    with the channel)."""
    keys = channel_keys(channel)
    access = channel_access_keys(channel)
    return CHANNEL_DELETE.command((keys.seq, keys.log, keys.members, access.private, access.grants), [])


def channel_unindex_commands(channel: str, members: Iterable[int]) -> list[Command]:
    """The deleted channel out of each former member's index (each in its slot)."""
    return [("HDEL", user_keys(user_id).channels, channel) for user_id in members]


def secret_steps(candidate: bytes) -> list[Command]:
    """The shared token secret: every node offers a fresh one with SET NX and
    reads back the winner, so all nodes sign with the same secret."""
    return [("SET", SECRET_KEY, candidate, "NX"), ("GET", SECRET_KEY)]


def secret_id_steps(fingerprint: str) -> list[Command]:
    """The fingerprint of the secret the nodes sign with: the first node sets it,
    every node reads it back and refuses to start if its own differs."""
    return [("SET", SECRET_ID_KEY, fingerprint, "NX"), ("GET", SECRET_ID_KEY)]


def tokens_v2_steps(now_ms: int) -> list[Command]:
    """When the service first ran with version 2 tokens (set once, read back)."""
    return [("SET", TOKENS_V2_KEY, now_ms, "NX"), ("GET", TOKENS_V2_KEY)]


def heartbeat_command(node: str, now_ms: int, lifetime_ms: int) -> Command:
    """A node's heartbeat: it counts as alive until ``now + lifetime``. A node id
    names one run of a node (host, pid, start time), never reused by a restart."""
    return ("ZADD", NODES_KEY, now_ms + lifetime_ms, node)


def dead_nodes_command(now_ms: int) -> Command:
    """The nodes whose heartbeat has run out: presence fields of theirs are stale."""
    return ("ZRANGEBYSCORE", NODES_KEY, "-inf", f"({now_ms}")


def presence_in_commands(user_id: int, node: str) -> list[Command]:
    """The user has connections on the node. The node's set of users first, so
    that a node that dies leaves no field the sweeper cannot find."""
    return [("SADD", node_users_key(node), user_id), ("HSET", user_keys(user_id).presence, node, 1)]


def presence_out_commands(user_id: int, node: str) -> list[Command]:
    """The user's last connection on the node closed."""
    return [("HDEL", user_keys(user_id).presence, node), ("SREM", node_users_key(node), user_id)]


SWEEP_BATCH = 500       # users of a dead node cleared per step of the sweep


def sweep_step_command(node: str) -> Command:
    """Take up to SWEEP_BATCH users from a dead node's set (SPOP: sweeping nodes
    share the work without overlap); the sweeper then HDELs each one's field,
    and forgets the node (``forget_node_command``) once the set is empty."""
    return ("SPOP", node_users_key(node), SWEEP_BATCH)


def forget_node_command(node: str) -> Command:
    return ("ZREM", NODES_KEY, node)
