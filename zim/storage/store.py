"""Where the IM keeps users, channels, messages and mailboxes: the interface.

``Store`` is the interface zim.im talks to: one call per fact. Reads of users,
channels and memberships answer at once. Writes, message appends and the reads
of messages (history, mailbox) answer either at once (``MemoryStore``) or with a
``Pending`` (``zim.pending``) that settles once the change is stored (``zim.storage.durable``);
handlers wait on either with ``ctx.later``. Results settle in the order of the
calls, and one settles successfully only if every earlier call was stored.
``MemoryStore`` keeps everything in this process's memory.

A store whose reads of users and memberships come from a cache that may lag
(``zim.nodes.store.RedisStore``: one node of several) also has
``confirm_user(user_id)`` and ``confirm_member(channel, user_id)``: each
returns a ``Pending`` that settles once the cache holds the shared store's
answer (or None when the cached answer is certain). zim.im asks before it
answers a "no" (``zim.im.rechecking``). It also has
``confirm_token_epoch(user_id)``, a ``Pending`` of the user's token epoch as
the shared store holds it (a revocation on another node must count at once):
zim.im asks it at every token login and refresh.

Quotas (``Quotas``, given with ``set_quotas(quotas)`` before the first call;
until then the defaults apply): a store refuses a direct message to a full
mailbox (``mailbox_full``) and a subscribe that would create a channel for a
user who has created ``max_channels_per_user`` already (``too_many_channels``).
A refused call stores nothing: a synchronous store (``MemoryStore``) raises
``StoreRefusal(code, message)``; one that answers with a ``Pending`` settles it
with ``settle(False, StoreRefusal(...))``. The framework answers the client
that error (zim.server).

Messages are plain dicts shaped as on the wire (docs/protocol.md "Message"). A store
keeps the dict it is given (setting its ``"seq"``) and hands the same dicts back:
callers must not mutate what they get.

Conversations: a channel's history is keyed by the channel name; a direct
conversation by the unordered pair of its two users (a user may write to itself:
the pair is then (id, id)). ``seq`` counts 1, 2, 3 ... per conversation, no gaps.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Literal, Protocol, Union, runtime_checkable

import orjson

from zim._tables import Tables

Message = dict
ChannelKey = str
PairKey = tuple[int, int]
HistoryKind = Literal["channel", "user"]

CHANNEL: HistoryKind = "channel"
USER: HistoryKind = "user"

# The store's quotas (``Quotas``): what one user may hold, so that nothing one
# user does (or has done to it) hurts another. 0 turns one off.
DEFAULT_MAX_MAILBOX = 10_000            # direct messages waiting in one user's mailbox
DEFAULT_MAX_MAILBOX_BYTES = 64 << 20    # bytes of them (each: its JSON as stored, seq included)
DEFAULT_MAX_CHANNELS_PER_USER = 1_000   # channels one user has created (that still exist)

MAILBOX_FULL = "mailbox_full"
TOO_MANY_CHANNELS = "too_many_channels"


class StoreRefusal(Exception):
    """A call refused by a store limit: nothing was stored; the client gets ``code``.

    A synchronous store (``MemoryStore``) raises it; a store answering with a
    ``Pending`` settles it with ``settle(False, StoreRefusal(code, message))``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Quotas:
    """What a store lets one user hold; 0 turns a quota off. A store takes them
    with ``set_quotas`` (before its first call); until then these defaults apply.

    - ``max_mailbox``: direct messages waiting (unacknowledged) in one user's
      mailbox; a DM to a full mailbox is refused ``mailbox_full``, nothing of it
      stored (no seq consumed). Acks free room; nothing accepted is dropped.
    - ``max_mailbox_bytes``: the same for their size, each message counted as
      the length of its JSON as stored (the copy a pull returns, seq included).
    - ``max_channels_per_user``: channels one user has created (a subscribe to a
      channel that did not exist); the next creation is refused
      ``too_many_channels``. Joining an existing channel is never refused.
    """

    max_mailbox: int = DEFAULT_MAX_MAILBOX
    max_mailbox_bytes: int = DEFAULT_MAX_MAILBOX_BYTES
    max_channels_per_user: int = DEFAULT_MAX_CHANNELS_PER_USER

    def __post_init__(self) -> None:
        for field in ("max_mailbox", "max_mailbox_bytes", "max_channels_per_user"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be an integer >= 0 (0: no limit), not {value!r}")

    def mailbox_refusal(self, count: int, size: int, adding: int) -> StoreRefusal | None:
        """The refusal for one more message of ``adding`` bytes to a mailbox holding
        ``count`` messages of ``size`` bytes in all, or None if it fits."""
        if self.max_mailbox and count >= self.max_mailbox:
            return self.full_by_count()
        if self.max_mailbox_bytes and size + adding > self.max_mailbox_bytes:
            return self.full_by_bytes()
        return None

    def full_by_count(self) -> StoreRefusal:
        return StoreRefusal(MAILBOX_FULL, f"the receiver's mailbox holds {self.max_mailbox} "
                                          "unacknowledged messages, its limit")

    def full_by_bytes(self) -> StoreRefusal:
        return StoreRefusal(MAILBOX_FULL, f"the message would take the receiver's mailbox past its "
                                          f"limit of {self.max_mailbox_bytes} bytes")

    def channels_refusal(self, created: int) -> StoreRefusal | None:
        """The refusal for a user who has created ``created`` channels creating one more."""
        if self.max_channels_per_user and created >= self.max_channels_per_user:
            return self.too_many_channels()
        return None

    def too_many_channels(self) -> StoreRefusal:
        return StoreRefusal(TOO_MANY_CHANNELS, f"a user may create at most "
                                               f"{self.max_channels_per_user} channels")


NO_QUOTAS = Quotas(0, 0, 0)


@runtime_checkable
class Store(Protocol):
    """What zim.im needs from storage. User ids are positive 64-bit ints."""

    # -- users -------------------------------------------------------------
    def create_user(self, user_id: int, name: str) -> None:
        """Record a new user with its display name."""

    def user_exists(self, user_id: int) -> bool:
        """Whether a user has ever been created with this id."""

    def user_name(self, user_id: int) -> str | None:
        """The user's display name (None: no such user)."""

    def set_user_name(self, user_id: int, name: str) -> None:
        """Change an existing user's display name."""

    def token_epoch(self, user_id: int) -> int:
        """The user's token generation (0 until the first revocation): only tokens
        of this epoch are valid (zim.tokens). A store with a cache answers from it;
        ``confirm_token_epoch`` (below) reads the shared store."""

    def revoke_tokens(self, user_id: int) -> int:
        """Bump the user's token generation (log out everywhere): every token issued
        before is invalid from now on. Returns the new epoch."""

    # -- channels ----------------------------------------------------------
    def channel_exists(self, channel: str) -> bool:
        """Whether anyone ever subscribed to the channel (it stays when members leave)."""

    def subscribe(self, channel: str, user_id: int, push: bool) -> None:
        """Make the user a member (creating the channel), or update its push flag.
        Creating a channel may be refused by a quota (``StoreRefusal``
        ``too_many_channels``; see the module docstring)."""

    def unsubscribe(self, channel: str, user_id: int) -> bool:
        """Remove a member; False if the user was not one."""

    def membership(self, channel: str, user_id: int) -> bool | None:
        """None if the user is not a member, else the member's push flag."""

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        """The channels the user is a member of, with the push flag of each."""

    # -- private channels (docs/protocol.md, "Private channels") -------------
    def create_channel(self, channel: str, creator: int | None, private: bool) -> bool:
        """Make a channel exist, without members: True, or False (nothing changed)
        if it exists already. ``creator`` (None: the server API) counts it against
        its quota (``StoreRefusal`` ``too_many_channels``) and, for a private
        channel, gets a grant with the invite right. Whether a channel is private
        is decided here, once."""

    def channel_private(self, channel: str) -> bool:
        """Whether the channel is private (joined only with a grant); False for an unknown one."""

    def grant(self, channel: str, user_id: int, can_invite: bool) -> None:
        """Let the user join a private channel (an invitation, the server API);
        ``can_invite``: it may invite others. Replaces the user's grant. The
        channel must exist (KeyError otherwise: check ``channel_exists`` first)."""

    def revoke_grant(self, channel: str, user_id: int) -> bool:
        """Take the user's grant back (membership stays); False if it had none."""

    def grant_of(self, channel: str, user_id: int) -> bool | None:
        """None: the user has no grant on the channel; else its ``can_invite``."""
    def delete_channel(self, channel: str) -> list[int] | None:
        """Delete a channel: its memberships, its history, the channel itself (a
        later subscribe creates a new one, seq from 1). Returns the ids of the users
        who were members, or None if there was no such channel."""

    # -- messages ----------------------------------------------------------
    def append_channel_message(self, channel: str, msg: Message) -> int:
        """Store a message in an existing channel's history; sets and returns its seq."""

    def append_user_message(self, sender_id: int, receiver_id: int, msg: Message) -> int:
        """Store a direct message in the pair's history and the receiver's mailbox;
        sets and returns its seq. Refused by a quota when the receiver's mailbox
        is full (``StoreRefusal`` ``mailbox_full``: nothing stored, no seq taken)."""

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> tuple[list[Message], bool]:
        """Up to ``limit`` messages, oldest first: the newest ones, or those with
        seq < ``before_seq``. The flag tells whether older messages exist before the
        first one returned. ``kind`` is "channel" (key: name) or "user" (key: the two
        user ids, any order). An unknown conversation is an empty one."""

    # -- mailboxes ---------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> list[Message]:
        """Up to ``limit`` unacknowledged messages to the user, oldest first."""

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> None:
        """Remove these message ids from the user's mailbox (unknown ids are ignored)."""

    def close(self) -> None:
        """Release resources (flush, close files)."""


def pair_key(user_a: int, user_b: int) -> PairKey:
    """The key of the conversation between two users, the same from either side."""
    return (user_a, user_b) if user_a <= user_b else (user_b, user_a)


MAX_USER_ID = (1 << 64) - 1
MAX_NAME_BYTES = 0xFFFF


class UserNames:
    """user id -> display name, in about 20 bytes plus the name per user.

    Every login without a token creates a user, and an idle logged-in connection
    must cost only a few hundred bytes in all, so users are not Python objects or
    dict entries (a dict entry with its int key and bytes value is ~130 bytes):
    the ids sit in a sorted ``array('Q')``, a parallel array holds each name's
    offset in one ``bytearray`` of length-prefixed UTF-8 names. New ids come from
    a Snowflake and so arrive in increasing order: adding is an append; an older
    id is inserted in place (a memmove). A changed name goes to a dict, so only
    users who rename cost a dict entry; renaming back removes it.
    """

    __slots__ = ("_ids", "_offsets", "_heap", "_renamed")

    def __init__(self) -> None:
        self._ids = array("Q")
        self._offsets = array("Q")
        self._heap = bytearray()
        self._renamed: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, int) and self._index(user_id) >= 0

    def _index(self, user_id: int) -> int:
        ids = self._ids
        i = bisect_left(ids, user_id)
        return i if i < len(ids) and ids[i] == user_id else -1

    def _original(self, index: int) -> bytes:
        offset = self._offsets[index]
        length = int.from_bytes(self._heap[offset:offset + 2], "big")
        return bytes(self._heap[offset + 2:offset + 2 + length])

    def add(self, user_id: int, name: str) -> None:
        """Add a new user; ValueError if the id exists or is out of range."""
        if not isinstance(user_id, int) or not 0 < user_id <= MAX_USER_ID:
            raise ValueError(f"user id {user_id!r} is not in 1..2**64-1")
        encoded = _encode_name(name)
        ids = self._ids
        if ids and user_id <= ids[-1]:
            index = bisect_left(ids, user_id)
            if ids[index] == user_id:
                raise ValueError(f"user {user_id} exists already")
        else:
            index = len(ids)
        offset = len(self._heap)
        self._heap += len(encoded).to_bytes(2, "big")
        self._heap += encoded
        if index == len(ids):
            ids.append(user_id)
            self._offsets.append(offset)
        else:
            ids.insert(index, user_id)
            self._offsets.insert(index, offset)

    def get(self, user_id: int) -> bytes | None:
        """The UTF-8 name, or None for an unknown user."""
        renamed = self._renamed.get(user_id)
        if renamed is not None:
            return renamed
        index = self._index(user_id)
        return None if index < 0 else self._original(index)

    def remove(self, user_id: int) -> None:
        """Forget a user (undoing an ``add`` whose write failed); rare, so O(n)."""
        index = self._index(user_id) if isinstance(user_id, int) else -1
        if index >= 0:
            del self._ids[index]
            del self._offsets[index]      # its name stays in the heap, unreferenced
            self._renamed.pop(user_id, None)

    def rename(self, user_id: int, name: str) -> None:
        """Change an existing user's name; KeyError if there is no such user."""
        index = self._index(user_id) if isinstance(user_id, int) else -1
        if index < 0:
            raise KeyError(f"no user {user_id}")
        encoded = _encode_name(name)
        if encoded == self._original(index):
            self._renamed.pop(user_id, None)
        else:
            self._renamed[user_id] = encoded


def _encode_name(name: str) -> bytes:
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError("a name is at most 65535 bytes of UTF-8")
    return encoded


class MemoryStore:
    """A Store in this process's memory; everything is lost when it exits.

    Per-user memory is kept tiny, because every login without a token creates a
    user and an idle logged-in connection must cost only a few hundred bytes in
    all: a user who has only logged in is an id and a name in ``UserNames``
    (no Python object of its own). Channels, their private flag and creator,
    memberships and each user's count of created channels (the quota) sit in
    compact C tables (``zim._tables``: about 12 bytes a membership, no Python
    object per channel or membership). Every other per-user structure
    (mailbox) is created on first use and dropped when it empties.
    """

    def __init__(self) -> None:
        self._names = UserNames()                              # user id -> name (UTF-8)
        self._tables = Tables()                                # channels (private flag), memberships
        self._channel_log: dict[str, list[Message]] = {}       # channel -> messages, seq i at [i-1]
        self._pair_log: dict[PairKey, list[Message]] = {}      # user pair -> messages
        self._mailboxes: dict[int, dict[str, Message]] = {}    # user id -> {message id: msg}, oldest first
        self._mailbox_bytes: dict[int, int] = {}               # user id -> bytes of its mailbox (not empty)
        self._epochs: dict[int, int] = {}                      # user id -> token epoch, when not 0 (rare)
        self._grants: dict[str, dict[int, bool]] = {}          # private channel -> {user id: can invite}
        self.quotas = Quotas()

    def set_quotas(self, quotas: Quotas) -> None:
        """The limits to enforce from now on (``Quotas``; NO_QUOTAS: none)."""
        self.quotas = quotas

    # -- users -------------------------------------------------------------
    def create_user(self, user_id: int, name: str) -> None:
        self._names.add(user_id, name)

    def user_exists(self, user_id: int) -> bool:
        return user_id in self._names

    def user_name(self, user_id: int) -> str | None:
        name = self._names.get(user_id)
        return None if name is None else name.decode("utf-8")

    def set_user_name(self, user_id: int, name: str) -> None:
        self._names.rename(user_id, name)

    def remove_user(self, user_id: int) -> None:
        """Forget a user that has no memberships (undo of ``create_user``)."""
        self._names.remove(user_id)
        self._epochs.pop(user_id, None)

    def token_epoch(self, user_id: int) -> int:
        return self._epochs.get(user_id, 0)

    def set_token_epoch(self, user_id: int, epoch: int) -> None:
        """Set the user's token epoch (loading a stored one, an undo, or news from another node)."""
        if epoch:
            self._epochs[user_id] = epoch
        else:
            self._epochs.pop(user_id, None)

    def revoke_tokens(self, user_id: int) -> int:
        if user_id not in self._names:
            raise KeyError(f"no user {user_id}")
        epoch = self._epochs.get(user_id, 0) + 1
        self._epochs[user_id] = epoch
        return epoch

    # -- channels ----------------------------------------------------------
    def channel_exists(self, channel: str) -> bool:
        return self._tables.channel_exists(channel)

    def add_channel(self, channel: str, creator: int | None = None, private: bool = False) -> None:
        """Make a channel exist without members (loading a stored one), created by
        ``creator`` (None: not known, as for a channel made before creators were
        recorded; it then counts for nobody). ``private`` marks it private, even
        if it exists already (a cache learning what another node made)."""
        created = self._tables.add_channel(channel)
        if private:
            self._tables.set_private(channel, True)
        if created and creator is not None:
            self._tables.set_creator(channel, creator)   # counted for the creator there

    def drop_channel(self, channel: str) -> None:
        """Forget a channel that has no members (undo of its creation); it no
        longer counts for its creator."""
        if self._tables.drop_channel(channel):      # (the tables count its creator's channels)
            self._grants.pop(channel, None)

    def channel_members(self, channel: str) -> list[int]:
        """The ids of the channel's members (none for an unknown channel); a leave
        moves the last member into the leaver's place."""
        return self._tables.channel_members(channel)

    def member_count(self, channel: str) -> int:
        """How many members the channel has (0 for an unknown channel), without listing them."""
        return self._tables.member_count(channel)

    def channel_count(self) -> int:
        """How many channels exist."""
        return self._tables.channel_count()

    def creator_of(self, channel: str) -> int | None:
        """The user whose subscribe created the channel, if known."""
        return self._tables.creator(channel)

    def delete_channel(self, channel: str) -> list[int] | None:
        member_ids = self._tables.delete_channel(channel)   # it no longer counts for its creator
        if member_ids is None:
            return None
        self._grants.pop(channel, None)
        self._channel_log.pop(channel, None)
        return member_ids

    def channels_created(self, user_id: int) -> int:
        """How many of the existing channels the user created."""
        return self._tables.created(user_id)

    def subscribe(self, channel: str, user_id: int, push: bool) -> None:
        """Join, or change the push flag. Joining a channel that does not exist
        creates it, the user its creator: refused (``StoreRefusal``
        ``too_many_channels``, nothing changed) past ``max_channels_per_user``.
        With that quota off, creators are not counted."""
        tables = self._tables
        if self.quotas.max_channels_per_user and not tables.channel_exists(channel):
            # (quota off: creators are not kept, nothing to count)
            refusal = self.quotas.channels_refusal(tables.created(user_id))
            if refusal is not None:
                raise refusal
            tables.subscribe(channel, user_id, push)
            tables.set_creator(channel, user_id)
            return
        tables.subscribe(channel, user_id, push)

    def create_channel(self, channel: str, creator: int | None, private: bool) -> bool:
        """See ``Store.create_channel``; the quota as for ``subscribe``."""
        if self._tables.channel_exists(channel):
            return False
        if creator is not None and self.quotas.max_channels_per_user:
            refusal = self.quotas.channels_refusal(self._tables.created(creator))
            if refusal is not None:
                raise refusal
        self._tables.add_channel(channel)
        if creator is not None and self.quotas.max_channels_per_user:
            self._tables.set_creator(channel, creator)   # counted for the creator there
        if private:
            self._tables.set_private(channel, True)
            if creator is not None:
                self.grant(channel, creator, True)
        return True

    def channel_private(self, channel: str) -> bool:
        return self._tables.private(channel)

    def grant(self, channel: str, user_id: int, can_invite: bool) -> None:
        if not self._tables.channel_exists(channel):
            raise KeyError(f"no channel {channel!r}")
        grants = self._grants.get(channel)
        if grants is None:
            grants = self._grants[channel] = {}
        grants[user_id] = bool(can_invite)

    def revoke_grant(self, channel: str, user_id: int) -> bool:
        grants = self._grants.get(channel)
        if grants is None or grants.pop(user_id, None) is None:
            return False
        if not grants:
            del self._grants[channel]
        return True

    def grant_of(self, channel: str, user_id: int) -> bool | None:
        grants = self._grants.get(channel)
        return None if grants is None else grants.get(user_id)

    def channel_grants(self, channel: str) -> dict[int, bool]:
        """The channel's grants: user id -> can invite (a copy)."""
        return dict(self._grants.get(channel, {}))

    def set_grant(self, channel: str, user_id: int, can_invite: bool | None) -> None:
        """Give or take a grant back as it was (an undo, or news from another node)."""
        if can_invite is None:
            self.revoke_grant(channel, user_id)
        else:
            self.grant(channel, user_id, can_invite)

    def unsubscribe(self, channel: str, user_id: int) -> bool:
        return self._tables.unsubscribe(channel, user_id) is not None

    def membership(self, channel: str, user_id: int) -> bool | None:
        return self._tables.membership(channel, user_id)

    def user_channels(self, user_id: int) -> list[tuple[str, bool]]:
        """The user's channels with its push flags: in the order joined, except
        that a leave moves the user's last joined channel into the left one's place."""
        return self._tables.user_channels(user_id)

    # -- messages ----------------------------------------------------------
    def append_channel_message(self, channel: str, msg: Message) -> int:
        if not self._tables.channel_exists(channel):
            raise KeyError(f"no channel {channel!r}")
        log = self._channel_log.get(channel)
        if log is None:
            log = self._channel_log[channel] = []
        return _append(log, msg)

    def append_user_message(self, sender_id: int, receiver_id: int, msg: Message) -> int:
        """Refused (``StoreRefusal`` ``mailbox_full``, nothing stored, no seq
        taken) when the receiver's mailbox is full (``Quotas``)."""
        key = pair_key(sender_id, receiver_id)
        log = self._pair_log.get(key)
        box = self._mailboxes.get(receiver_id)
        message_id = msg["id"]
        # the size as stored: the JSON with the seq it is about to get
        seq = len(log) + 1 if log is not None else 1
        had_seq, old_seq = "seq" in msg, msg.get("seq")
        msg["seq"] = seq
        size = _size(msg)
        used = self._mailbox_bytes.get(receiver_id, 0)
        if box is None:
            refusal = self.quotas.mailbox_refusal(0, 0, size)
        elif message_id in box:     # a retry of the same id takes its place: no new message
            used -= _size(box[message_id])
            refusal = self.quotas.mailbox_refusal(0, used, size)
        else:
            refusal = self.quotas.mailbox_refusal(len(box), used, size)
        if refusal is not None:
            if had_seq:
                msg["seq"] = old_seq
            else:
                del msg["seq"]
            raise refusal
        if log is None:
            log = self._pair_log[key] = []
        seq = _append(log, msg)
        if box is None:
            box = self._mailboxes[receiver_id] = {}
        box[message_id] = msg
        self._mailbox_bytes[receiver_id] = used + size
        return seq

    def mailbox_usage(self, user_id: int) -> tuple[int, int]:
        """(messages, bytes) waiting in the user's mailbox (see ``Quotas``)."""
        box = self._mailboxes.get(user_id)
        return (len(box), self._mailbox_bytes.get(user_id, 0)) if box else (0, 0)

    def history(self, kind: HistoryKind, key: Union[ChannelKey, PairKey],
                before_seq: int | None, limit: int) -> tuple[list[Message], bool]:
        if kind == CHANNEL:
            log = self._channel_log.get(key)  # type: ignore[arg-type]
        elif kind == USER:
            log = self._pair_log.get(pair_key(*key))  # type: ignore[misc]
        else:
            raise ValueError(f"unknown history kind {kind!r}")
        return page(log or [], before_seq, limit)

    # -- mailboxes ---------------------------------------------------------
    def mailbox_pull(self, user_id: int, limit: int) -> list[Message]:
        box = self._mailboxes.get(user_id)
        if not box or limit < 1:
            return []
        return list(islice(box.values(), limit))

    def mailbox_ack(self, user_id: int, ids: Iterable[str]) -> None:
        box = self._mailboxes.get(user_id)
        if not box:
            return
        freed = 0
        for message_id in ids:
            msg = box.pop(message_id, None) if isinstance(message_id, str) else None
            if msg is not None:
                freed += _size(msg)
        if not box:
            del self._mailboxes[user_id]
            self._mailbox_bytes.pop(user_id, None)
        elif freed:
            self._mailbox_bytes[user_id] = max(0, self._mailbox_bytes.get(user_id, 0) - freed)

    def close(self) -> None:
        pass


def _size(msg: Message) -> int:
    """A message's size for the mailbox quota: its JSON as stored (``Quotas``)."""
    return len(orjson.dumps(msg))


def _append(log: list[Message], msg: Message) -> int:
    seq = len(log) + 1   # seq n lives at log[n - 1]: gap-free by construction
    msg["seq"] = seq
    log.append(msg)
    return seq


def page(log: list[Message], before_seq: int | None, limit: int) -> tuple[list[Message], bool]:
    """One history page from a log whose seq n is at index n - 1 (see Store.history)."""
    end = len(log) if before_seq is None else max(0, min(len(log), before_seq - 1))
    start = max(0, end - max(limit, 0))
    return log[start:end], start > 0
