"""The framework: route actions to handlers on top of the Cython reactor.

A handler is ``handler(ctx, body: dict) -> dict``. It runs once per complete
request packet; everything per byte or per member happens in ``zim._core``.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Callable, Iterable

import orjson

from zim._core import Reactor

log = logging.getLogger("zim")

Handler = Callable[["Ctx", dict], dict]

DEFAULT_MAX_PACKET = 65536


class Error(Exception):
    """Raise from a handler to answer ``{"error": {"code", "message"}}``.

    The connection stays open. Codes are those of the protocol
    (``bad_request``, ``not_found``, ``forbidden`` ...) or your own.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` or ``"HOST"`` -> (host, port); empty host = all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in address {text!r}")
    return host, int(port)


class Ctx:
    """What a handler sees of the connection it serves.

    ``ctx.user_id`` is the logged-in user's id (a decimal string) or None.
    ``ctx.app`` is the App (``ctx.app.store`` the store).
    """

    __slots__ = ("app", "conn", "user_id", "action", "seq", "_after")

    def __init__(self, app: "App", conn: int, user_id: str | None, action: int, seq: int) -> None:
        self.app = app
        self.conn = conn
        self.user_id = user_id
        self.action = action
        self.seq = seq
        self._after: list[bytes] | None = None

    # -- this connection ---------------------------------------------------
    def login(self, user_id: str, channels: Iterable[str] = ()) -> None:
        """Bind this connection to ``user_id``; it receives the pushes of ``channels``."""
        self.app.reactor.set_user(self.conn, int(user_id))
        self.user_id = user_id
        for channel in channels:
            self.app.reactor.group_add(self.app.group_id(channel), self.conn)

    def send(self, action: int, body: dict) -> None:
        """Push a packet (seq 0) to this connection, queued after this request's response."""
        if self._after is None:
            self._after = []
        self._after.append(action.to_bytes(2, "big") + orjson.dumps(body))

    # -- other connections -------------------------------------------------
    def push_user(self, user_id: str, action: int, body: dict, exclude_self: bool = False) -> int:
        """Push to every connection of ``user_id``; returns how many were queued."""
        exclude = self.conn if exclude_self else 0
        return self.app.reactor.push_user(int(user_id), action, orjson.dumps(body), exclude)

    def push_channel(self, channel: str, action: int, body: dict, exclude_self: bool = True) -> int:
        """Push to every connection following ``channel`` (encoded once, fanned out in C)."""
        group = self.app.groups.get(channel)
        if group is None:
            return 0
        exclude = self.conn if exclude_self else 0
        return self.app.reactor.broadcast(group, action, orjson.dumps(body), exclude)

    def follow(self, channel: str, user_id: str | None = None) -> None:
        """Every connection of the user (default: this one's) receives ``channel``'s pushes."""
        self.app.follow(channel, user_id or self.user_id)

    def unfollow(self, channel: str, user_id: str | None = None) -> None:
        """Stop ``channel``'s pushes to every connection of the user."""
        self.app.unfollow(channel, user_id or self.user_id)


class App:
    """A zim server: the IM actions plus any handlers you register.

    >>> app = App()
    >>> @app.route(100)
    ... def echo(ctx, body):
    ...     return {"echo": body}
    >>> app.run(tcp=":8081", ws=":8082")          # doctest: +SKIP
    """

    def __init__(self, im: bool = True, store=None) -> None:
        self.routes: dict[int, tuple[Handler, bool]] = {}
        self.groups: dict[str, int] = {}
        self.store = store
        self.reactor: Reactor | None = None
        self.max_packet = DEFAULT_MAX_PACKET
        self.data_dir: str | None = None
        self.secret: bytes = b""
        if im:
            from zim import im as im_module

            im_module.register(self)

    def route(self, action: int, login: bool = True) -> Callable[[Handler], Handler]:
        """Register ``handler(ctx, body) -> dict`` for ``action`` (1..32767).

        ``login=False`` lets connections that have not logged in call it.
        """
        if not 0 < action < 32768:
            raise ValueError("action must be in 1..32767")

        def register(handler: Handler) -> Handler:
            self.routes[action] = (handler, login)
            return handler

        return register

    # -- channel groups (this worker's connections per channel) ------------
    def group_id(self, channel: str) -> int:
        group = self.groups.get(channel)
        if group is None:
            group = self.groups[channel] = len(self.groups) + 1
        return group

    def follow(self, channel: str, user_id: str) -> None:
        reactor = self.reactor
        group = self.group_id(channel)
        for conn in reactor.user_conns(int(user_id)):
            reactor.group_add(group, conn)

    def unfollow(self, channel: str, user_id: str) -> None:
        group = self.groups.get(channel)
        if group is None:
            return
        reactor = self.reactor
        for conn in reactor.user_conns(int(user_id)):
            reactor.group_remove(group, conn)

    # -- the reactor's callback --------------------------------------------
    def _on_packet(self, conn: int, action: int, seq: int, payload: bytes) -> None:
        reactor = self.reactor
        route = self.routes.get(action)
        ctx = None
        if route is None:
            body = error_body("unknown_action", f"unknown action {action}")
        else:
            handler, needs_login = route
            user = reactor.conn_user(conn)
            if needs_login and not user:
                body = error_body("not_logged_in", "log in first (action 1)")
            else:
                ctx = Ctx(self, conn, str(user) if user else None, action, seq)
                body = self._call(handler, ctx, payload)
        reactor.reply(conn, action, seq, body)
        if ctx is not None and ctx._after:
            for packet in ctx._after:
                reactor.reply(conn, int.from_bytes(packet[:2], "big"), 0, packet[2:])

    def _call(self, handler: Handler, ctx: Ctx, payload: bytes) -> bytes:
        try:
            request = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            return error_body("bad_request", "body is not valid UTF-8 JSON")
        if not isinstance(request, dict):
            return error_body("bad_request", "body must be a JSON object")
        try:
            result = handler(ctx, request)
            return orjson.dumps(result if result is not None else {})
        except Error as exc:
            return error_body(exc.code, exc.message)
        except Exception:
            log.exception("handler for action %d failed", ctx.action)
            return error_body("internal", "internal server error")

    # -- running -----------------------------------------------------------
    def run(
        self,
        tcp: str | None = ":8081",
        ws: str | None = ":8082",
        workers: int = 1,
        data: str = "./zim-data",
        max_packet: int = DEFAULT_MAX_PACKET,
        login_timeout: int = 10,
        idle_timeout: int = 300,
    ) -> None:
        """Serve until SIGTERM or SIGINT. ``tcp``/``ws`` are ``"HOST:PORT"`` (None: off).

        ``login_timeout``: seconds a connection may stay without logging in;
        ``idle_timeout``: seconds without a byte received (0 turns either off).
        """
        if workers != 1:
            raise ValueError("this version runs one worker")
        if max_packet < 8 or max_packet > 16 * 1024 * 1024:
            raise ValueError("max_packet must be between 8 and 16 MiB")
        for name, value in (("login_timeout", login_timeout), ("idle_timeout", idle_timeout)):
            if not 0 <= value <= 86400:
                raise ValueError(f"{name} must be between 0 and 86400 seconds")
        from zim import tokens  # noqa
        from zim.store import MemoryStore

        os.makedirs(data, exist_ok=True)
        self.data_dir = data
        self.secret = tokens.load_or_create_secret(data)
        if self.store is None:
            self.store = MemoryStore()
        self.max_packet = max_packet
        self.reactor = reactor = Reactor(
            max_packet, self._on_packet, login_timeout=login_timeout, idle_timeout=idle_timeout
        )
        # handlers first: a signal that comes as soon as the ports accept must stop us
        stop = lambda signum, frame: reactor.stop()  # noqa: E731
        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if tcp:
                reactor.listen(*parse_address(tcp, 8081), False)
            if ws:
                reactor.listen(*parse_address(ws, 8082), True)
            log.info("zim serving tcp=%s ws=%s", tcp, ws)
            reactor.run()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            reactor.close_all()
