"""What a handler is given and may raise: ``Ctx`` and ``Error``.

A handler is ``handler(ctx, body: dict) -> dict``, registered on a ``zim.App``
(``zim.app``, which re-exports these two). It runs once per complete request;
everything per byte or per member happens in ``zim._core``. This module sits
below both the framework and the IM rules (``zim.im``), and knows the server
that runs them only through ``Runtime``: what a ``Ctx`` asks of it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol

import orjson

from zim.pending import Pending
from zim.storage.store import StoreRefusal

log = logging.getLogger("zim")

Handler = Callable[["Ctx", dict], Any]

STORE_FAILED = "the store failed; nothing was stored"


class Error(Exception):
    """Raise from a handler to answer ``{"error": {"code", "message"}}``.

    The connection stays open. Codes are those of the protocol
    (``bad_request``, ``not_found``, ``forbidden`` ...) or your own.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Deferred:
    """What a handler returns (via ``ctx.later``) when its answer comes later."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = _Deferred()


def error_body(code: str, message: str) -> bytes:
    """The encoded body of an error answer."""
    return orjson.dumps({"error": {"code": code, "message": message}})


class RouteTable(Protocol):
    """What registers handlers: ``zim.App.route``."""

    def route(self, action: int, login: bool = True) -> Callable[[Handler], Handler]: ...


class Runtime(Protocol):
    """What a ``Ctx`` and the IM handlers (``zim.im``) need of the server running
    the app (``zim.server.Server``): its parts, its rules, its counts, and the
    calls ``Ctx`` makes."""

    app: Any
    store: Any                  # zim.storage.store.Store
    ids: Any                    # zim.ids.Snowflake
    fabric: Any                 # zim.fabric.Fabric
    secret: bytes               # the token-signing secret
    token_ttl_ms: int
    tokens_v1_until: int        # Unix ms: version 1 tokens (no expiry) are accepted until then
    limits: Any                 # zim.limits.SendLimits
    client_limits: Any          # zim.limits.ClientLimits
    client_buckets: Any         # zim.limits.ClientBuckets
    store_line: Any             # zim.limits.PacedLine
    channel_push: bool          # a subscribe without "push" gets pushes
    jwt: Any                    # zim.access.JwtLogins, or None: no JWT keys
    anonymous_login: bool       # a login with a name only creates a user
    tcp_deflate: bool           # a TCP login may ask for compressed packets
    logins: int
    users_created: int

    def bind_user(self, conn: int, user_id: int, channels: Iterable[str]) -> None: ...

    def push_user(self, user_id: int, action: int, payload: bytes, exclude_conn: int) -> int: ...

    def push_channel(self, channel: str, action: int, payload: bytes, exclude_conn: int) -> int: ...

    def follow(self, channel: str, user_id: str) -> None: ...

    def unfollow(self, channel: str, user_id: str) -> None: ...

    def finish_later(self, ctx: "Ctx", then: Callable[[Any], Any], ok: bool, value: Any) -> None: ...


class Ctx:
    """What a handler sees of the connection it serves.

    ``ctx.user_id`` is the logged-in user's id (a decimal string) or None.
    ``ctx.peer``: for a connection not logged in, its source address as a key
    (an IPv4 address as an int; an IPv6 client's /64, hashed), else None.
    ``ctx.websocket``: for a connection not logged in, whether it speaks WebSocket
    (else TCP); False once logged in (the transport is not sent along then).
    ``ctx.app`` is the App (``ctx.app.store`` the store); ``ctx.server`` the
    server running it (``zim.server.Server``: store, ids, limits, fabric).
    """

    __slots__ = ("server", "app", "conn", "user_id", "peer", "websocket", "action", "seq", "rechecked",
                 "deflate_asked", "deflate_granted", "_after")

    def __init__(self, server: Runtime, conn: int, user_id: str | None, action: int, seq: int,
                 peer: int | None = None, websocket: bool = False) -> None:
        self.server = server
        self.app = server.app
        self.conn = conn
        self.user_id = user_id
        self.peer = peer
        self.websocket = websocket
        self.action = action
        self.seq = seq
        self.rechecked: tuple = ()  # the "no"s the store was asked to confirm (zim.im.rechecking)
        self.deflate_asked = False      # a login's "compress": "deflate" (zim.im)
        self.deflate_granted = False    # packets after this answer may be compressed (grant_deflate)
        self._after: list[bytes] | None = None

    # -- this connection ---------------------------------------------------
    def login(self, user_id: str, channels: Iterable[str] = ()) -> None:
        """Bind this connection to ``user_id``; it receives the pushes of ``channels``."""
        self.server.bind_user(self.conn, int(user_id), channels)
        self.user_id = user_id

    def grant_deflate(self) -> bool:
        """A login that succeeds: True if it asked for compression (``"compress":
        "deflate"``, ``deflate_asked``) and the server agrees (``--tcp-deflate on``,
        and the connection is TCP, not WebSocket, which has permessage-deflate).
        Then this request's answer goes plain and, from the packet after it on,
        the server may compress bodies to this connection (docs/protocol.md,
        "Compression on TCP")."""
        self.deflate_granted = self.deflate_asked and self.server.tcp_deflate and not self.websocket
        return self.deflate_granted

    def send(self, action: int, body: dict) -> None:
        """Push a packet (seq 0) to this connection, queued after this request's response."""
        if self._after is None:
            self._after = []
        self._after.append(action.to_bytes(2, "big") + orjson.dumps(body))

    def take_after(self) -> list[bytes]:
        """The packets ``send`` queued (action, then body), emptied."""
        after, self._after = self._after, None
        return after or []

    def later(self, result: Any, then: Callable[[Any], Any]) -> Any:
        """Continue with ``then(value)`` once a store result is ready, and return
        what to return from the handler: ``then``'s answer now if ``result`` is a
        plain value, else ``DEFERRED`` (the answer, and whatever ``then`` pushes,
        go out once the store has committed; a store failure answers ``internal``)."""
        if not isinstance(result, Pending):
            return then(result)
        if result.outcome is not None:
            ok, value = result.outcome
            if not ok:
                if isinstance(value, StoreRefusal):     # a store limit: nothing was stored
                    raise Error(value.code, value.message)
                log.error("action %d: %s", self.action, value)
                raise Error("internal", STORE_FAILED)
            return then(value)
        result.wait(self.server.finish_later, self, then)
        return DEFERRED

    # -- other connections -------------------------------------------------
    def push_user(self, user_id: str, action: int, body: dict | bytes, exclude_self: bool = False) -> int:
        """Push to every connection of ``user_id``; returns how many were queued.
        ``body`` is a dict, or its JSON already encoded (bytes)."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.server.push_user(int(user_id), action, payload, self.conn if exclude_self else 0)

    def push_channel(self, channel: str, action: int, body: dict | bytes, exclude_self: bool = True) -> int:
        """Push to every connection following ``channel`` (encoded once, fanned out in C).

        With merged pushes on (``App.run(push_window_ms=...)``) a channel message
        (action 102) joins the channel's time slice instead and goes out with it as
        one 103 (``zim.pushmerge``); 0 is returned then."""
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.server.push_channel(channel, action, payload, self.conn if exclude_self else 0)

    def follow(self, channel: str, user_id: str | None = None) -> None:
        """Every connection of the user (default: this one's) receives ``channel``'s pushes."""
        self.server.follow(channel, user_id or self.user_id)

    def unfollow(self, channel: str, user_id: str | None = None) -> None:
        """Stop ``channel``'s pushes to every connection of the user."""
        self.server.unfollow(channel, user_id or self.user_id)
