"""The server API (``--api HOST:PORT``): HTTP and JSON for the application's backend.

Served on the reactor's loop by ``zim.httpserve`` (h11, no thread), in the
process that runs the handlers (the single process, or the router of
``--workers N``), so that it reaches the same store, fabric and pushes as the
IM actions, and goes through the same code (``zim.im``): a publish is stored
with its seq and pushed like action 4, a message to a user like action 2,
a revocation like action 11. On a node of several (``--redis``) its actions
reach users on every node through the node fabric.

Every request carries ``Authorization: Bearer KEY``, the key of
``--api-key-file``, compared in constant time; a missing or wrong one is 401.
The backend is trusted: no user's rate limit applies to it. Bounds: bodies of
at most ``--api-max-body`` bytes (413), at most ``--api-max-clients``
connections. The endpoints, their bodies and answers: docs/api.openapi.json
(the tests check the server against it) and docs/api.md.
"""
from __future__ import annotations

import hmac
import logging
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

import orjson

from zim import im
from zim.datadir import read_private_file
from zim.handler import DEFERRED, STORE_FAILED, Ctx, Error, Runtime
from zim.httpserve import Answer, HttpServer, Request, split_host_port
from zim.fields import (
    bad_request, channel_name, limit_param, optional_bool, optional_int, optional_str, required_str, str_list,
)
from zim.im import Unsure, known_user
from zim.names import check_channel_name
from zim.pending import Pending, gather
from zim.storage.store import CHANNEL, StoreRefusal
from zim.tokens import parse_user_id

log = logging.getLogger("zim.api")

PREFIX = "/api/v1/"
KEY_MIN_BYTES = 16
KEY_MAX_BYTES = 4096
JSON = [("Content-Type", "application/json")]
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

# error code -> HTTP status (docs/protocol.md's codes, and the API's own)
STATUS = {
    "bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
    "method_not_allowed": 405, "conflict": 409, "mailbox_full": 409, "too_many_channels": 409,
    "payload_too_large": 413, "rate_limited": 429, "internal": 500,
}
# what the HTTP server answers on its own (a malformed request, a body too large ...)
_CODE_OF_STATUS = {405: "method_not_allowed", 413: "payload_too_large", 500: "internal"}


def read_api_key(path: str) -> bytes:
    """The key in ``path`` (a private file: ``zim.datadir.read_private_file``),
    surrounding whitespace stripped; RuntimeError if it is too short or too long."""
    key = read_private_file(path, "API key file", KEY_MAX_BYTES + 2).strip()
    if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
        raise RuntimeError(f"the API key file {path} must hold {KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes "
                           f"of key, not {len(key)}: make one with "
                           f"head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}")
    return key


def error_json(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def http_error(status: int, message: str) -> tuple[list[tuple[str, str]], bytes]:
    """The HTTP server's own errors (``HttpServer(error_answer=...)``), as the API's JSON."""
    return JSON, error_json(_CODE_OF_STATUS.get(status, "bad_request"), message)


class ApiCtx(Ctx):
    """A request of the server API, seen by ``zim.im``'s code as a Ctx with no
    connection (``conn`` 0: nothing is left out of pushes and closes) and no
    user; ``params`` holds the path's parts, ``request`` the HTTP request."""

    __slots__ = ("api", "request", "params", "status")

    def __init__(self, api: "ServerApi", request: Request, params: dict[str, str], status: int) -> None:
        super().__init__(api.server, 0, None, 0, 0)
        self.api = api
        self.request = request
        self.params = params
        self.status = status        # the answer's status on success

    def later(self, result: Any, then: Callable[[Any], Any]) -> Any:
        if isinstance(result, Pending) and result.outcome is None:
            result.wait(self.api.finish, self, then)
            return DEFERRED
        return super().later(result, then)


Endpoint = Callable[[ApiCtx, dict], Any]

class ServerApi:
    """The endpoints, served on ``server``'s reactor; see the module docstring.
    ``stats()`` gives the figures of ``GET /api/v1/stats``; ``counts`` the
    answers by status (metrics)."""

    def __init__(self, server: Runtime, key: bytes, stats: Callable[[], dict]) -> None:
        self.server = server
        self.key = key
        self.stats = stats
        self.counts: dict[str, int] = {}        # HTTP status -> answers (zim_api_requests_total)
        self.http: HttpServer | None = None
        # (method, path pattern, endpoint, status on success); "{x}" parts are parameters
        self.routes: list[tuple[str, tuple[str, ...], Endpoint, int]] = [
            ("POST", ("channels",), create_channel, 201),
            ("DELETE", ("channels", "{channel}"), delete_channel, 200),
            ("POST", ("channels", "{channel}", "messages"), publish, 200),
            ("GET", ("channels", "{channel}", "messages"), channel_history, 200),
            ("GET", ("channels", "{channel}", "presence"), channel_presence, 200),
            ("PUT", ("channels", "{channel}", "members", "{user}"), add_member, 200),
            ("DELETE", ("channels", "{channel}", "members", "{user}"), remove_member, 200),
            ("POST", ("users", "{user}", "messages"), send_to_user, 200),
            ("POST", ("users", "{user}", "disconnect"), disconnect, 200),
            ("POST", ("users", "{user}", "revoke-tokens"), revoke, 200),
            ("GET", ("users", "{user}", "presence"), user_presence, 200),
            ("GET", ("stats",), stats_endpoint, 200),
        ]

    def serve(self, reactor: Any, address: str, max_body: int, max_clients: int) -> HttpServer:
        host, port = split_host_port(address)
        self.http = HttpServer(reactor, host, port, self.handle, methods=HTTP_METHODS,
                               max_body_size=max_body, max_clients=max_clients, error_answer=http_error)
        return self.http

    def tick(self) -> None:
        if self.http is not None:
            self.http.tick()

    def close(self) -> None:
        http, self.http = self.http, None
        if http is not None:
            http.close()

    # -- one request ---------------------------------------------------------------
    def handle(self, request: Request) -> Answer | None:
        """An ``HttpServer`` handler: authenticate, route, run the endpoint."""
        if not self._authorized(request.headers.get("authorization", "")):
            return self._error(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)",
                               [("WWW-Authenticate", "Bearer")])
        route = self._route(request)
        if isinstance(route[0], int):
            return route            # an error answer
        endpoint, params, status = route
        try:
            body = self._body(request)
        except Error as exc:
            return self._error(STATUS.get(exc.code, 400), exc.code, exc.message)
        ctx = ApiCtx(self, request, params, status)
        return self._run(ctx, im.rechecking(endpoint), ctx, body)     # a node's cache confirms its "no"s

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not say how much of a guess was right
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.key)

    def _route(self, request: Request) -> tuple:
        """(endpoint, path parameters, status), or the error answer (404, 405)."""
        path = request.path
        if not path.startswith(PREFIX):
            return self._error(404, "not_found", f"no endpoint {path}")
        try:
            parts = [unquote(part, errors="strict") for part in path[len(PREFIX):].split("/")]
        except UnicodeDecodeError:
            return self._error(400, "bad_request", "the path's %-escapes are not UTF-8")
        method = "GET" if request.method == "HEAD" else request.method
        allowed = []
        for route_method, pattern, endpoint, status in self.routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            if route_method == method:
                return endpoint, params, status
            allowed.append(route_method)
        if allowed:
            return self._error(405, "method_not_allowed", f"{path} takes {', '.join(allowed)}",
                               [("Allow", ", ".join(allowed))])
        return self._error(404, "not_found", f"no endpoint {path}")

    def _body(self, request: Request) -> dict:
        """The JSON object of the body ({} if empty) or, for a GET, the query string."""
        if request.method in ("GET", "HEAD"):
            _, _, query = request.target.partition("?")
            return dict(parse_qsl(query))
        if not request.body.strip():
            return {}
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise bad_request("the body is not valid UTF-8 JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    def _run(self, ctx: ApiCtx, step: Callable[..., Any], *args: Any) -> Answer | None:
        """``step(*args)``: an endpoint or a ``later`` continuation; its answer, or
        None when it waits on the store (``finish`` answers then)."""
        try:
            result = step(*args)
        except (Error, StoreRefusal) as exc:
            return self._error(STATUS.get(exc.code, 400), exc.code, exc.message)
        except Exception:
            log.exception("server API %s %s failed", ctx.request.method, ctx.request.path)
            return self._error(500, "internal", "internal server error")
        if result is DEFERRED:
            return None
        return self._answer(ctx.status, orjson.dumps(result))

    def finish(self, ctx: ApiCtx, then: Callable[[Any], Any], ok: bool, value: Any) -> None:
        """A store result an endpoint waited on is ready: continue, and answer."""
        if ok:
            answer = self._run(ctx, then, value)
            if answer is None:
                return                  # ``then`` waits on another result
        elif isinstance(value, StoreRefusal):
            answer = self._error(STATUS.get(value.code, 409), value.code, value.message)
        else:
            log.error("server API %s %s: %s", ctx.request.method, ctx.request.path, value)
            answer = self._error(500, "internal", STORE_FAILED)
        ctx.request.respond(*answer)

    def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Answer:
        key = str(status)
        self.counts[key] = self.counts.get(key, 0) + 1
        return status, JSON + (headers or []), body

    def _error(self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Answer:
        return self._answer(status, error_json(code, message), headers)


def _match(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params = {}
    for want, part in zip(pattern, parts):
        if want.startswith("{"):
            if not part:
                return None
            params[want[1:-1]] = part
        elif want != part:
            return None
    return params


# ---------------------------------------------------------------- what the path names


def path_channel(ctx: ApiCtx) -> str:
    """The channel named by the path, well formed (``bad_request`` otherwise)."""
    channel = channel_name(ctx.params, "channel")
    try:
        check_channel_name(channel)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return channel


def known_channel(ctx: ApiCtx) -> str:
    """The channel named by the path, which exists, else ``not_found``."""
    channel = path_channel(ctx)
    store = ctx.server.store
    if not store.channel_exists(channel):
        im.ask_store(ctx, "confirm_member", channel, 0)     # a node's cache may not know it yet
        if not store.channel_exists(channel):
            raise Error("not_found", f"no channel {channel}")
    return channel


def path_user(ctx: ApiCtx) -> int:
    return known_user(ctx, ctx.params["user"])


def confirm_users(ctx: ApiCtx, names: list[str]) -> None:
    """Have a node's cache confirm every user of ``names`` it does not know, in
    one round (``Unsure``), rather than one per user."""
    store = ctx.server.store
    confirm = getattr(store, "confirm_user", None)
    if confirm is None:
        return
    unknown = sorted({user_id for user_id in map(parse_user_id, names) if user_id is not None and
                      not store.user_exists(user_id)})
    asked = ("confirm_users", *unknown)
    if unknown and asked not in ctx.rechecked:
        raise Unsure(gather([confirm(user_id) for user_id in unknown]), asked)


def sender(ctx: ApiCtx, body: dict) -> int | None:
    """``senderId``: a user the message comes from; absent, it comes from the system."""
    text = optional_str(body, "senderId")
    return None if text is None else known_user(ctx, text)


# ---------------------------------------------------------------- endpoints


def publish(ctx: ApiCtx, body: dict) -> dict:
    """Store a message in a channel and push it to its members (as action 4)."""
    channel = known_channel(ctx)
    content = required_str(body, "content")
    return im.store_channel_message(ctx, channel, sender(ctx, body), content)


def send_to_user(ctx: ApiCtx, body: dict) -> dict:
    """Store a direct message in the user's mailbox and history and push it (as action 2)."""
    receiver = path_user(ctx)
    content = required_str(body, "content")
    return im.store_user_message(ctx, sender(ctx, body), receiver, content)


def channel_history(ctx: ApiCtx, query: dict) -> dict:
    """A page of a channel's history, as action 5 (``beforeSeq``, ``limit``)."""
    channel = known_channel(ctx)
    numbers = {}
    for field in ("beforeSeq", "limit"):
        if field in query:
            try:
                numbers[field] = int(query[field])
            except ValueError:
                raise bad_request(f"{field} must be an integer") from None
    before_seq = optional_int(numbers, "beforeSeq")
    if before_seq is not None:
        before_seq = min(max(before_seq, 0), im.MAX_SEQ)
    limit = limit_param(numbers, im.HISTORY_DEFAULT_LIMIT)
    return ctx.later(ctx.server.store.history(CHANNEL, channel, before_seq, limit), im.history_answer)


def create_channel(ctx: ApiCtx, body: dict) -> dict:
    """Create a channel, public or private, with its first members (the first is
    its creator: in a private channel, the one member with the invite right; the
    others are granted the channel without it)."""
    ctx.params["channel"] = channel_name(body, "name")
    channel = path_channel(ctx)
    private = optional_bool(body, "private", False)
    names = str_list(body, "members")
    if not names:
        raise bad_request("members must name at least one user (the first is the channel's creator)")
    confirm_users(ctx, names)
    members = list(dict.fromkeys(known_user(ctx, text) for text in names))
    push = optional_bool(body, "push", ctx.server.channel_push)
    store = ctx.server.store
    if not store.channel_exists(channel):
        im.ask_store(ctx, "confirm_member", channel, members[0])
    if store.channel_exists(channel):
        raise Error("conflict", f"the channel {channel} exists")

    def joined(_: object) -> dict:
        for user_id in members:
            follow(ctx, channel, user_id, push)
        return {"name": channel, "members": len(members), "private": private}

    def join_all(_: object) -> Any:
        return ctx.later(gather([store.subscribe(channel, user_id, push) for user_id in members]), joined)

    if not private:     # the creator's subscribe makes the channel; the others join it
        return ctx.later(store.subscribe(channel, members[0], push),
                         lambda _: ctx.later(gather([store.subscribe(channel, user_id, push)
                                                     for user_id in members[1:]]), joined))

    def made(created: bool) -> Any:
        if not created:
            raise Error("conflict", f"the channel {channel} exists")
        grants = [store.grant(channel, user_id, index == 0) for index, user_id in enumerate(members)]
        return ctx.later(gather(grants), join_all)

    return ctx.later(store.create_channel(channel, None, True), made)


def delete_channel(ctx: ApiCtx, body: dict) -> dict:
    """Delete a channel, its memberships and history; members' connections stop following it."""
    channel = known_channel(ctx)

    def deleted(members: list[int] | None) -> dict:
        if members is None:
            raise Error("not_found", f"no channel {channel}")
        for user_id in members:
            ctx.unfollow(channel, str(user_id))
        return {"name": channel, "members": len(members)}

    return ctx.later(ctx.server.store.delete_channel(channel), deleted)


def add_member(ctx: ApiCtx, body: dict) -> dict:
    """Make a user a member (or set its push flag); its connections follow at once.
    In a private channel the user is granted it first (``canInvite``: it may
    invite others; default false)."""
    channel = known_channel(ctx)
    user_id = path_user(ctx)
    push = optional_bool(body, "push", ctx.server.channel_push)
    can_invite = optional_bool(body, "canInvite", False)
    store = ctx.server.store
    im.ask_store(ctx, "confirm_join", channel, user_id)     # a node's cache: the private flag, the grant

    def stored(_: object) -> dict:
        follow(ctx, channel, user_id, push)
        return {"channel": channel, "userId": str(user_id), "push": push}

    def subscribe(_: object) -> Any:
        return ctx.later(store.subscribe(channel, user_id, push), stored)

    if store.channel_private(channel):
        return ctx.later(store.grant(channel, user_id, can_invite), subscribe)
    return subscribe(None)


def remove_member(ctx: ApiCtx, body: dict) -> dict:
    """Remove a member; its connections stop following at once. ``removed``:
    false if the user was not a member."""
    channel = known_channel(ctx)
    user_id = path_user(ctx)
    if im.member_of(ctx, channel, user_id) is None:
        return {"channel": channel, "userId": str(user_id), "removed": False}

    def stored(_: object) -> dict:
        ctx.unfollow(channel, str(user_id))
        return {"channel": channel, "userId": str(user_id), "removed": True}

    store = ctx.server.store
    left = store.unsubscribe(channel, user_id)
    if store.grant_of(channel, user_id) is None:
        return ctx.later(left, stored)
    # as a member who leaves: the grant goes too, rejoining takes a new one
    return ctx.later(left, lambda _: ctx.later(store.revoke_grant(channel, user_id), stored))


def follow(ctx: ApiCtx, channel: str, user_id: int, push: bool) -> None:
    if push:
        ctx.follow(channel, str(user_id))
    else:
        ctx.unfollow(channel, str(user_id))


def disconnect(ctx: ApiCtx, body: dict) -> dict:
    """Close every connection of the user, on every worker and node; its tokens stay valid."""
    user_id = path_user(ctx)
    fabric = ctx.server.fabric
    connections = fabric.user_connections(user_id)
    everywhere = getattr(fabric, "close_user_everywhere", None)
    if everywhere is not None:
        everywhere(user_id)
    else:
        fabric.close_user(user_id, 0)
    return {"userId": str(user_id), "connections": connections}


def revoke(ctx: ApiCtx, body: dict) -> dict:
    """Revoke every token of the user and close its connections (as action 11)."""
    user_id = path_user(ctx)
    return im.revoke_tokens(ctx, user_id, lambda epoch: {"userId": str(user_id), "epoch": epoch})


def user_presence(ctx: ApiCtx, query: dict) -> dict:
    """Whether the user is online (on any node), and on how many connections here."""
    user_id = path_user(ctx)
    fabric = ctx.server.fabric
    connections = fabric.user_connections(user_id)
    answer = {"userId": str(user_id), "online": connections > 0, "connections": connections}
    user_nodes = getattr(fabric, "user_nodes", None)
    if user_nodes is None:
        return answer
    return ctx.later(user_nodes(user_id), lambda nodes: {**answer, "online": connections > 0 or nodes > 0})


def channel_presence(ctx: ApiCtx, query: dict) -> dict:
    """How many members the channel has, and how many of them are online."""
    channel = known_channel(ctx)
    fabric = ctx.server.fabric
    online_among = getattr(fabric, "online_among", None)

    def count(members: list[int]) -> Any:
        answer = {"channel": channel, "members": len(members)}
        if online_among is None:
            return {**answer, "online": sum(1 for user_id in members if fabric.has_user(user_id))}
        return ctx.later(online_among(members), lambda online: {**answer, "online": online})

    return ctx.later(ctx.server.store.channel_members(channel), count)


def stats_endpoint(ctx: ApiCtx, query: dict) -> dict:
    """This server's figures (``ServerApi.stats``)."""
    return ctx.api.stats()
