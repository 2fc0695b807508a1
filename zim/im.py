"""The IM actions 1..12 of docs/protocol.md, as zim.App handlers.

They reach the server that runs them (its store, ids, limits) through
``ctx.server`` (``zim.handler.Runtime``), never by importing it.

Every handler checks the body's shape first (``bad_request``), then the action's
own rules (``not_found``, ``forbidden`` ...), then, for sends, the rate limits
(``rate_limited``), then stores, then pushes. The
framework has already answered unknown actions, callers not logged in and bodies
that are not JSON objects.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import orjson

from zim.fields import (
    PAGE_MAX, bad_request, channel_name, limit_param, optional_bool, optional_int, optional_str, required_str,
    str_list,
)
from zim.grants import check_may_join
from zim.handler import Error
from zim.ids import timestamp_ms, wall_clock_ms
from zim.names import check_channel_name, display_name
from zim.protocol import (
    ACK, HEARTBEAT, HISTORY, INVITE, LOG_OUT_EVERYWHERE, LOGIN, PULL, PUSH_CHANNEL_MESSAGE, PUSH_INVITED,
    PUSH_USER_MESSAGE, REFRESH_TOKEN, SEND_CHANNEL, SEND_USER, SUBSCRIBE, UNSUBSCRIBE,
)
from zim.storage.store import CHANNEL, USER
from zim.tokens import Claims, make_token, parse_user_id, verify_token

if TYPE_CHECKING:
    from zim.handler import Ctx, Handler, RouteTable, Runtime


HISTORY_DEFAULT_LIMIT = 20
MAILBOX_DEFAULT_LIMIT = 100
MAX_SEQ = (1 << 63) - 1
# Server packets stay under 1 MiB (docs/protocol.md); this leaves room for framing.
# The SQLite store bounds its pages by the same figure (zim.storage.sqlite.PAGE_BYTES).
RESPONSE_BUDGET = 1_000_000
# Upper bound of a message's encoded size apart from its strings (content, sender
# name, channel: <= 6 bytes per char, for \u00XX escapes): ids and numbers (<= 20
# digits each), keys and punctuation.
_MESSAGE_FIXED_BOUND = 400
_PAGE_OVERHEAD = 64          # {"messages":[...],"hasMore":false}
_MESSAGE_OVERHEAD = 200      # about what a message's JSON adds to its content (ids, names, keys)


class Unsure(Exception):
    """A store that keeps only a cache of users and memberships (one node of
    several: ``zim.nodes.store.RedisStore``) answered "no", which may be stale:
    ``pending`` settles once it has asked the shared store; the handler then runs
    again (``rechecking``), each question (``asked``) asked once per request."""

    def __init__(self, pending: object, asked: tuple) -> None:
        super().__init__("the store confirms a negative answer")
        self.pending = pending
        self.asked = asked


def ask_store(ctx: "Ctx", confirm_name: str, *args: object) -> None:
    """Raise ``Unsure`` if the store can confirm a "no" (it has the method
    ``confirm_name`` and answers a Pending) and this request has not asked it yet."""
    confirm = getattr(ctx.server.store, confirm_name, None)
    asked = (confirm_name, *args)
    if confirm is None or asked in ctx.rechecked:
        return
    pending = confirm(*args)
    if pending is not None:
        raise Unsure(pending, asked)


def rechecking(handler: "Handler") -> "Handler":
    """``handler``, run again once the store has confirmed what it was unsure of."""
    def run(ctx: "Ctx", body: dict) -> dict:
        try:
            return handler(ctx, body)
        except Unsure as unsure:
            ctx.rechecked = (*ctx.rechecked, unsure.asked)
            return ctx.later(unsure.pending, lambda _: run(ctx, body))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def known_user(ctx: "Ctx", text: str) -> int:
    """The id of an existing user named by a decimal string, else ``not_found``."""
    store = ctx.server.store
    user_id = parse_user_id(text)
    if user_id is not None and not store.user_exists(user_id):
        ask_store(ctx, "confirm_user", user_id)
    if user_id is None or not store.user_exists(user_id):
        raise Error("not_found", f"no user {text}")
    return user_id


def member_of(ctx: "Ctx", channel: str, user_id: int) -> bool | None:
    """The user's membership of an existing channel (None: not a member; see
    ``Store.membership``), else ``not_found``."""
    store = ctx.server.store
    membership = store.membership(channel, user_id)
    if membership is None:      # a member implies the channel: only a "no" needs more
        ask_store(ctx, "confirm_member", channel, user_id)
        if not store.channel_exists(channel):
            raise Error("not_found", f"no channel {channel}")
    return membership


def check_member(ctx: "Ctx", channel: str, user_id: int) -> None:
    """``not_found`` for an unknown channel, ``forbidden`` for a non-member."""
    if member_of(ctx, channel, user_id) is None:
        raise Error("forbidden", f"not a member of {channel}")


def in_line(ctx: "Ctx", start: Callable[[], object], cost: Callable[[object], int]) -> object:
    """A page read (up to 1 MB) behind the caller's earlier reads and acks: one
    user's reach the store one at a time, at most ``--read-rate`` bytes a second
    (``cost(page)``, zim.limits.PacedLine), so a client pipelining them delays
    others by one page at most and costs the server little. A read whose user has
    no connection left by its turn is not made."""
    user_id, fabric = int(ctx.user_id), ctx.server.fabric
    return ctx.server.store_line.call(user_id, start, "read", cost=cost,
                                   wanted=lambda: fabric.user_connections(user_id) > 0)


def page_bytes(messages: list[dict]) -> int:
    """About the bytes of a page of messages: their contents plus a fixed part each."""
    return sum(len(msg["content"]) + _MESSAGE_OVERHEAD for msg in messages)


def history_page_bytes(found: tuple[list[dict], bool]) -> int:
    """``page_bytes`` of a history page, (messages, has_more)."""
    return page_bytes(found[0])


def check_rate_limits(ctx: "Ctx", channel: str | None = None) -> None:
    """``rate_limited`` if the sender (or the channel) has no token left; the last
    check before a send is stored, so a refused send is neither stored nor counted."""
    reason = ctx.server.limits.refusal(ctx.user_id, channel)
    if reason is not None:
        raise Error("rate_limited", reason)


# ------------------------------------------------------------ page size


def _fits_without_measuring(messages: list[dict]) -> bool:
    """True if the page is certainly under the budget (the common case: no encoding)."""
    bound = _PAGE_OVERHEAD
    try:
        for msg in messages:
            text = len(msg["content"]) + len(msg["sender"]["name"]) + len(msg.get("channel", ""))
            bound += 6 * text + _MESSAGE_FIXED_BOUND
            if bound > RESPONSE_BUDGET:
                return False
    except (KeyError, TypeError):
        return False        # not shaped as zim.im makes messages (a custom handler's): measure
    return True


def _take_within_budget(messages: list[dict]) -> int:
    """How many of ``messages``, taken in order, fit the budget (at least one, so a
    client paging on always makes progress)."""
    total = _PAGE_OVERHEAD
    for count, msg in enumerate(messages):
        total += len(orjson.dumps(msg)) + 1
        if total > RESPONSE_BUDGET:
            return max(count, 1)
    return len(messages)


def newest_that_fit(messages: list[dict]) -> tuple[list[dict], bool]:
    """Drop the oldest messages of an oldest-first page until it fits; True if cut."""
    if _fits_without_measuring(messages):
        return messages, False
    keep = _take_within_budget(messages[::-1])
    return messages[len(messages) - keep:], keep < len(messages)


def oldest_that_fit(messages: list[dict]) -> list[dict]:
    """Drop the newest messages of an oldest-first page until it fits."""
    if _fits_without_measuring(messages):
        return messages
    return messages[:_take_within_budget(messages)]


# ------------------------------------------------------------ messages


SYSTEM_SENDER = {"id": "0", "name": "system"}     # the sender of the server API's own messages


def _new_message(ctx: "Ctx", sender_id: int | None, content: str) -> dict:
    """A message from ``sender_id`` (None: the system, for the server API)."""
    message_id = ctx.server.ids.next()
    return {
        "id": str(message_id),
        "seq": 0,                          # set by the store
        "content": content,
        "sender": SYSTEM_SENDER if sender_id is None else
        {"id": str(sender_id), "name": ctx.server.store.user_name(sender_id)},
        "createdAt": timestamp_ms(message_id),   # the id's own time: ids and times sort alike
    }


# ------------------------------------------------------------ actions


def login(ctx: "Ctx", body: dict) -> dict:
    """1: log in as a new user (``--anonymous-login``), with a JWT of the
    application (its ``sub`` is the user, created at its first login), or resume
    a user with its token (genuine, not expired, of the user's current epoch:
    else ``unauthorized``). Attempts, new users and failed token checks are
    rate-limited per source address (``rate_limited``), connections per user
    (``too_many_connections``)."""
    token = optional_str(body, "token")
    jwt = optional_str(body, "jwt")
    if token is not None and jwt is not None:
        raise bad_request("give at most one of token and jwt")
    name = None
    if jwt is None or "name" in body:       # a JWT login may keep the user's name
        try:
            name = display_name(body.get("name"))   # NFC, stripped, bounded, nothing invisible (zim.names)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
    ctx.deflate_asked = optional_str(body, "compress") == "deflate"    # another algorithm: refused
    if ctx.user_id is not None:
        raise bad_request("this connection is logged in already")
    server = ctx.server
    store = server.store
    anonymous = token is None and jwt is None
    if anonymous and not server.anonymous_login:
        raise Error("unauthorized", "anonymous logins are off on this server: log in with a jwt "
                                    "from the application, or a token")
    if not ctx.rechecked:       # a login run again after the store confirmed a user took its tokens
        refusal = server.client_buckets.login_refusal(ctx.peer, new_user=anonymous)
        if refusal is not None:
            raise Error("rate_limited", refusal)
    if jwt is not None:
        return jwt_login(ctx, jwt, name)
    if token is None:
        user_id = server.ids.next()
        store.create_user(user_id, name)
        # answered in order: the mailbox comes once the user is stored
        return ctx.later(store.mailbox_pull(user_id, PAGE_MAX), _LoggedIn(ctx, user_id, True, 0))
    claims = verify_token(server.secret, token)
    user_id = claims.user_id if claims is not None else None
    if user_id is not None and not store.user_exists(user_id):
        ask_store(ctx, "confirm_user", user_id)
    if user_id is None or not store.user_exists(user_id):
        server.client_buckets.auth_failed(ctx.peer)
        raise Error("unauthorized", "invalid token")
    if not token_in_time(server, claims):
        raise Error("unauthorized", "token expired: log in with a newer one, or as a new user")
    return ctx.later(current_epoch(store, user_id), _Resume(ctx, user_id, claims.epoch, name))


def jwt_login(ctx: "Ctx", token: str, name: str | None) -> dict:
    """A login with the application's JWT (zim.access): verified before anything
    of it is used; a refusal counts as a failed token check of the address. The
    first login of its ``sub`` creates the user (named ``name``, else the sub),
    later ones resume it; its ``channels`` claim grants those private channels
    while the user stays connected."""
    server = ctx.server
    if server.jwt is None:
        raise Error("unauthorized", "this server takes no JWT (it runs without --jwt-key or --jwt-jwks)")
    try:
        user_id, claims = server.jwt.verify(token)
    except Error:
        server.client_buckets.auth_failed(ctx.peer)
        raise
    store = server.store
    if not store.user_exists(user_id):
        ask_store(ctx, "confirm_user", user_id)     # another node may have made it
    if store.user_exists(user_id):
        return ctx.later(current_epoch(store, user_id), _Resume(ctx, user_id, None, name, claims.channels))
    store.create_user(user_id, name or claims.subject)
    return ctx.later(store.mailbox_pull(user_id, PAGE_MAX), _LoggedIn(ctx, user_id, True, 0, claims.channels))


def token_in_time(server: "Runtime", claims: Claims) -> bool:
    """Not expired: a version 2 token before its ``expires``; a version 1 token
    (which has none) until ``server.tokens_v1_until`` (zim.tokens)."""
    now = wall_clock_ms()
    if claims.version == 1:
        return now < server.tokens_v1_until
    return claims.valid_at(now)


def current_epoch(store: object, user_id: int) -> object:
    """The user's token epoch: from the shared store when the store has only a
    cache (a revocation on another node counts at once), a Pending then."""
    confirm = getattr(store, "confirm_token_epoch", None)
    return confirm(user_id) if confirm is not None else store.token_epoch(user_id)


def issue_token(server: "Runtime", user_id: int, epoch: int) -> dict:
    """A new token for the user, of ``epoch``, valid for ``server.token_ttl_ms``."""
    expires = wall_clock_ms() + server.token_ttl_ms
    return {"token": make_token(server.secret, user_id, epoch, expires), "expiresAt": expires}


class _Resume:
    """A token or JWT login of an existing user, once its current epoch is known:
    a token of an older epoch was revoked (log out everywhere)."""

    __slots__ = ("ctx", "user_id", "token_epoch", "name", "channels")

    def __init__(self, ctx: "Ctx", user_id: int, token_epoch: int | None, name: str | None,
                 channels: tuple[str, ...] | None = None) -> None:
        self.ctx = ctx
        self.user_id = user_id
        self.token_epoch = token_epoch  # the token's (None: a JWT login, of the current epoch)
        self.name = name                # None: keep the name
        self.channels = channels        # a JWT login's channels claim

    def __call__(self, epoch: int) -> dict:
        ctx, user_id = self.ctx, self.user_id
        if self.token_epoch is not None and self.token_epoch != epoch:
            raise Error("unauthorized", "token revoked (the user logged out everywhere)")
        store = ctx.server.store
        if self.name is not None and store.user_name(user_id) != self.name:
            store.set_user_name(user_id, self.name)
        # answered in order: the mailbox comes once the new name is stored
        return ctx.later(store.mailbox_pull(user_id, PAGE_MAX), _LoggedIn(ctx, user_id, False, epoch, self.channels))


class _LoggedIn:
    """The end of a login, once stored: bind the connection, push the mailbox, answer.
    (A small object rather than a closure: a login storm keeps thousands waiting.)"""

    __slots__ = ("ctx", "user_id", "created", "epoch", "channels")

    def __init__(self, ctx: "Ctx", user_id: int, created: bool, epoch: int,
                 channels: tuple[str, ...] | None = None) -> None:
        self.ctx = ctx
        self.user_id = user_id
        self.created = created      # a new user: counted once it is stored
        self.epoch = epoch          # the token's: revoked meanwhile, the login fails
        self.channels = channels    # a JWT login's channels claim (None: not a JWT login)

    def __call__(self, mailbox: list[dict]) -> dict:
        ctx, user_id = self.ctx, self.user_id
        server = ctx.server
        if server.store.token_epoch(user_id) != self.epoch:
            raise Error("unauthorized", "token revoked (the user logged out everywhere)")
        most = server.client_limits.max_conns_per_user
        if most and server.fabric.user_connections(user_id) >= most:
            raise Error("too_many_connections", f"at most {most} connections per user: close one first")
        channels = [channel for channel, push in server.store.user_channels(user_id) if push]
        ctx.login(str(user_id), channels=channels)
        if self.channels is not None:
            server.jwt.remember(user_id, self.channels)
        for msg in oldest_that_fit(mailbox):       # about 1 MB in all: pull for the rest
            ctx.send(PUSH_USER_MESSAGE, msg)
        server.logins += 1
        if self.created:
            server.users_created += 1
        answer = {"id": str(user_id), **issue_token(server, user_id, self.epoch)}
        if self.channels is not None:   # a JWT login: the name to resume with the token
            answer["name"] = server.store.user_name(user_id)
        if ctx.grant_deflate():
            answer["compress"] = "deflate"
        return answer


def send_user_message(ctx: "Ctx", body: dict) -> dict:
    """2: store in the pair's history and the receiver's mailbox, then push (101)."""
    receiver_text = required_str(body, "receiverId")
    content = required_str(body, "content")
    receiver_id = known_user(ctx, receiver_text)
    check_rate_limits(ctx)
    return store_user_message(ctx, int(ctx.user_id), receiver_id, content)


def store_user_message(ctx: "Ctx", sender_id: int | None, receiver_id: int, content: str) -> dict:
    """Store a direct message (``sender_id`` None: from the system, kept in the
    receiver's conversation with itself) in the pair's history and the
    receiver's mailbox, then push it (101) to the receiver and to the sender's
    other connections. Action 2 and the server API."""
    msg = _new_message(ctx, sender_id, content)
    msg["receiverId"] = str(receiver_id)
    from_self = sender_id is None or receiver_id == sender_id

    def stored(seq: int) -> dict:
        msg["seq"] = seq
        pushed = orjson.dumps(msg)
        # to oneself: the sender's other connections are the receiver's
        ctx.push_user(msg["receiverId"], PUSH_USER_MESSAGE, pushed, exclude_self=from_self)
        if not from_self:
            ctx.push_user(str(sender_id), PUSH_USER_MESSAGE, pushed, exclude_self=True)
        return {"id": msg["id"], "seq": seq}

    stored_by = receiver_id if sender_id is None else sender_id
    return ctx.later(ctx.server.store.append_user_message(stored_by, receiver_id, msg), stored)


def subscribe(ctx: "Ctx", body: dict) -> dict:
    """3: join a channel (creating it: rate-limited per user, and the store may
    refuse ``too_many_channels``; ``"private": true`` creates a private one), or
    update the push flag of a membership. A private channel is joined only with
    a grant (``may_join``), else ``forbidden``. Without a ``push`` field the
    server's policy decides (``App.run(channel_push=...)``)."""
    channel = channel_name(body, "name")
    try:
        check_channel_name(channel)     # no controls, bidi or invisible names (zim.names); not normalised
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    push = optional_bool(body, "push", ctx.server.channel_push)
    private = optional_bool(body, "private", False)
    server = ctx.server
    store = server.store
    me = int(ctx.user_id)
    if store.membership(channel, me) is None:
        ask_store(ctx, "confirm_join", channel, me)     # a node's cache may not know it, its flag or grants
        if store.channel_exists(channel):
            check_may_join(ctx, channel, me, private)
        else:
            refusal = server.client_buckets.create_refusal(me)
            if refusal is not None:
                raise Error("rate_limited", refusal)
            if private:     # made first (the creator's grant with it), then joined
                return ctx.later(store.create_channel(channel, me, True),
                                 lambda created: _join_created(ctx, channel, me, push))
    return ctx.later(store.subscribe(channel, me, push), _Followed(ctx, channel, push))


def _join_created(ctx: "Ctx", channel: str, user_id: int, push: bool) -> dict:
    """After a private channel's creation (or the discovery that it existed: then
    the join rules apply), join it."""
    check_may_join(ctx, channel, user_id, True)
    return ctx.later(ctx.server.store.subscribe(channel, user_id, push), _Followed(ctx, channel, push))


class _Followed:
    """A join stored: this user's connections follow the channel's pushes, or not."""

    __slots__ = ("ctx", "channel", "push")

    def __init__(self, ctx: "Ctx", channel: str, push: bool) -> None:
        self.ctx = ctx
        self.channel = channel
        self.push = push

    def __call__(self, _: object) -> dict:
        if self.push:
            self.ctx.follow(self.channel)
        else:
            self.ctx.unfollow(self.channel)
        return {}


def send_channel_message(ctx: "Ctx", body: dict) -> dict:
    """4: members only; pushed (102) to every member connection but the sending one."""
    channel = channel_name(body, "channel")
    content = required_str(body, "content")
    sender_id = int(ctx.user_id)
    check_member(ctx, channel, sender_id)
    check_rate_limits(ctx, channel)
    return store_channel_message(ctx, channel, sender_id, content)


def store_channel_message(ctx: "Ctx", channel: str, sender_id: int | None, content: str) -> dict:
    """Store a message (``sender_id`` None: from the system) in an existing
    channel's history, then push it (102, or merged) to every member connection
    but the requesting one. Action 4 and the server API."""
    msg = _new_message(ctx, sender_id, content)
    msg["channel"] = channel

    def stored(seq: int) -> dict:
        msg["seq"] = seq
        ctx.push_channel(channel, PUSH_CHANNEL_MESSAGE, msg)
        return {"id": msg["id"], "seq": seq}

    return ctx.later(ctx.server.store.append_channel_message(channel, msg), stored)


def query_history(ctx: "Ctx", body: dict) -> dict:
    """5: a page of a channel's (members only) or of the caller's conversation with a user."""
    if ("channel" in body) == ("userId" in body):
        raise bad_request("give exactly one of channel and userId")
    channel = channel_name(body, "channel") if "channel" in body else None
    other_text = required_str(body, "userId") if channel is None else None
    before_seq = optional_int(body, "beforeSeq")
    if before_seq is not None:
        # same meaning ("seq < beforeSeq"), and a range any store can bind
        before_seq = min(max(before_seq, 0), MAX_SEQ)
    limit = limit_param(body, HISTORY_DEFAULT_LIMIT)
    store = ctx.server.store
    me = int(ctx.user_id)
    if channel is not None:
        check_member(ctx, channel, me)
        page = in_line(ctx, lambda: store.history(CHANNEL, channel, before_seq, limit), history_page_bytes)
    else:
        other = known_user(ctx, other_text)
        page = in_line(ctx, lambda: store.history(USER, (me, other), before_seq, limit), history_page_bytes)

    return ctx.later(page, history_answer)


def history_answer(found: tuple[list[dict], bool]) -> dict:
    """The answer to a history read: the newest messages of the store's page that
    fit under 1 MB, and whether older ones exist (action 5 and the server API)."""
    messages, cut = newest_that_fit(found[0])
    return {"messages": messages, "hasMore": found[1] or cut}


def unsubscribe(ctx: "Ctx", body: dict) -> dict:
    """6: leave a channel; leaving one you are not in is fine, an unknown one is
    not_found. Leaving a private channel gives its grant back: joining again
    takes a new one."""
    channel = channel_name(body, "name")
    store = ctx.server.store
    me = int(ctx.user_id)
    if member_of(ctx, channel, me) is None:
        return {}

    def stored(_: object) -> dict:
        ctx.unfollow(channel)
        return {}

    left = store.unsubscribe(channel, me)
    if store.grant_of(channel, me) is None and not store.channel_private(channel):
        return ctx.later(left, stored)
    revoked = store.revoke_grant(channel, me)
    return ctx.later(left, lambda _: ctx.later(revoked, stored))


def invite(ctx: "Ctx", body: dict) -> dict:
    """12: let a user join a private channel the caller is a member of with the
    invite right (else ``forbidden``; an unknown channel or user ``not_found``);
    the invitee is pushed 104 on every connection. Counts as a message for the
    caller's ``--user-rate``."""
    channel = channel_name(body, "channel")
    target_text = required_str(body, "userId")
    store = ctx.server.store
    me = int(ctx.user_id)
    target = known_user(ctx, target_text)
    ask_store(ctx, "confirm_join", channel, me)     # a node's cache: the caller's grant may be news
    membership = member_of(ctx, channel, me)
    if not store.channel_private(channel):
        raise bad_request(f"{channel} is public: anyone may join it")
    if membership is None or not store.grant_of(channel, me):
        raise Error("forbidden", f"you may not invite to {channel} (members with the invite right may)")
    ask_store(ctx, "confirm_join", channel, target)
    check_rate_limits(ctx)

    def stored(_: object) -> dict:
        ctx.push_user(str(target), PUSH_INVITED, {"channel": channel, "by": {"id": ctx.user_id,
                                                                         "name": store.user_name(me)}})
        return {}

    if store.grant_of(channel, target) is not None:     # granted already (maybe with the invite right)
        return stored(None)
    return ctx.later(store.grant(channel, target, False), stored)


def pull_mailbox(ctx: "Ctx", body: dict) -> dict:
    """7: the oldest unacknowledged direct messages; ``hasMore`` when others wait
    behind them (the page was full, or cut short to stay under 1 MiB)."""
    limit = limit_param(body, MAILBOX_DEFAULT_LIMIT)

    def fit(messages: list[dict]) -> dict:
        # one more than asked for says whether more wait; a store bounded by bytes
        # (zim.storage.sqlite.PAGE_BYTES) gives a page that passes the budget when it
        # stopped short, so what is trimmed here says it too
        page = oldest_that_fit(messages[:limit])
        return {"messages": page, "hasMore": len(page) < len(messages)}

    user_id, store = int(ctx.user_id), ctx.server.store
    return ctx.later(in_line(ctx, lambda: store.mailbox_pull(user_id, limit + 1), page_bytes), fit)


def ack_mailbox(ctx: "Ctx", body: dict) -> dict:
    """8: drop messages from the caller's mailbox; unknown or foreign ids are ignored.
    At most ``--max-ack-ids`` ids, freeing at most ``--ack-rate`` ids a second;
    one user's acks and reads reach the store one at a time (``in_line``)."""
    ids = str_list(body, "ids")
    server = ctx.server
    most = server.client_limits.max_ack_ids
    if most and len(ids) > most:
        raise bad_request(f"ids must hold at most {most} ids (ack in several requests)")
    user_id, store = int(ctx.user_id), server.store
    return ctx.later(server.store_line.call(user_id, lambda: store.mailbox_ack(user_id, ids), "ack", len(ids)),
                     lambda _: {})


def heartbeat(ctx: "Ctx", body: dict) -> dict:
    """9: keeps an idle connection open; answers the server time (ms)."""
    return {"time": wall_clock_ms()}


def refresh_token(ctx: "Ctx", body: dict) -> dict:
    """10: a new token for the logged-in user (current epoch, a full lifetime)."""
    user_id = int(ctx.user_id)
    server = ctx.server
    return ctx.later(current_epoch(server.store, user_id), lambda epoch: issue_token(server, user_id, epoch))


def log_out_everywhere(ctx: "Ctx", body: dict) -> dict:
    """11: revoke every token of the caller (bump its epoch) and close its other
    connections, on every worker and node; answers a new token for this one."""
    user_id = int(ctx.user_id)
    server = ctx.server
    return revoke_tokens(ctx, user_id, lambda epoch: issue_token(server, user_id, epoch))


def revoke_tokens(ctx: "Ctx", user_id: int, answer: Callable[[int], dict]) -> dict:
    """Revoke every token of the user (bump its epoch), close its connections on
    every worker and node but the requesting one, then ``answer(epoch)``
    (action 11 and the server API)."""
    server = ctx.server

    def revoked(epoch: int) -> dict:
        close_user = getattr(server.fabric, "close_user", None)
        if close_user is not None:
            close_user(user_id, ctx.conn)
        return answer(epoch)

    return ctx.later(server.store.revoke_tokens(user_id), revoked)


def register(app: "RouteTable") -> None:
    """Register actions 1..12 on ``app`` (a ``zim.App``)."""
    app.route(LOGIN, login=False)(rechecking(login))
    app.route(SEND_USER)(rechecking(send_user_message))
    app.route(SUBSCRIBE)(rechecking(subscribe))
    app.route(SEND_CHANNEL)(rechecking(send_channel_message))
    app.route(HISTORY)(rechecking(query_history))
    app.route(UNSUBSCRIBE)(rechecking(unsubscribe))
    app.route(PULL)(pull_mailbox)
    app.route(ACK)(ack_mailbox)
    app.route(HEARTBEAT, login=False)(heartbeat)
    app.route(REFRESH_TOKEN)(refresh_token)
    app.route(LOG_OUT_EVERYWHERE)(log_out_everywhere)
    app.route(INVITE)(rechecking(invite))
