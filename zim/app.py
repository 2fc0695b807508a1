"""The framework: an ``App`` routes actions to handlers, and runs.

A handler is ``handler(ctx, body: dict) -> dict`` (``zim.handler``: ``Ctx``,
``Error``). The App is made at import time, before any server exists: it holds
the routes (and a store, if given one). ``App.run`` checks its options
(``zim.options``) and hands the App to a ``zim.server.Server``, the runtime that
assembles the store, the reactor and the fabric, and serves until stopped.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from zim.handler import Ctx, Error, Handler
from zim.limits import ClientLimits
from zim.options import (
    DEFAULT_CHANNEL_RATE, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_OUTBUF, DEFAULT_MAX_PACKET, DEFAULT_PUSH_MAX,
    DEFAULT_TOKEN_TTL, DEFAULT_USER_RATE, DEFAULT_WS_ORIGINS, Options,
)
from zim.storage.retention import Retention
from zim.storage.store import Quotas

__all__ = ["App", "Ctx", "Error", "Handler"]


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
        self.given_store = store        # None: the server opens one (zim.server)
        self.server = None              # the zim.server.Server running this App, once run
        if im:
            from zim import im as im_module     # zim.im registers on an App: it cannot import this module

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

    def refusal(self, action: int, logged_in: bool) -> Error | None:
        """Why a request is refused before its handler runs, else None.

        Checks run in the protocol's order: unknown action, then login.
        """
        route = self.routes.get(action)
        if route is None:
            return Error("unknown_action", f"unknown action {action}")
        if route[1] and not logged_in:
            return Error("not_logged_in", "log in first (action 1)")
        return None

    def route_logins(self) -> dict[int, bool]:
        """Each action and whether it needs a logged-in connection (the workers' table)."""
        return {action: login for action, (_, login) in self.routes.items()}

    # -- what handlers reach through ``ctx.app`` while it runs ------------------------
    @property
    def store(self) -> Any:
        """The store: the running server's, else the one given (None: not running yet)."""
        return self.server.store if self.server is not None else self.given_store

    @property
    def ids(self) -> Any:
        """The running server's id generator (``zim.ids.Snowflake``)."""
        return self.server.ids

    @property
    def secret(self) -> bytes:
        """The running server's token-signing secret (32 bytes, for HMACs)."""
        return self.server.secret

    @property
    def data_dir(self) -> str | None:
        """The running server's data directory (None: a node on Redis)."""
        return self.server.data_dir

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
        retention: Retention = Retention(),
        user_rate: float = DEFAULT_USER_RATE,
        channel_rate: float = DEFAULT_CHANNEL_RATE,
        max_outbuf: int = DEFAULT_MAX_OUTBUF,
        channel_push: bool = True,
        push_window_ms: int = 0,
        push_max: int = DEFAULT_PUSH_MAX,
        ws_deflate: bool = True,
        redis: str | None = None,
        metrics: str | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_client_memory: int | None = None,
        ws_origins: str | Iterable[str] = DEFAULT_WS_ORIGINS,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        secret_file: str | None = None,
        client_limits: ClientLimits = ClientLimits(),
        quotas: Quotas = Quotas(),
        **more: Any,
    ) -> None:
        """Serve until SIGTERM or SIGINT. ``tcp``/``ws`` are ``"HOST:PORT"`` (None: off).

        The keywords are the server options of ``zim.options`` (``more``: any other
        option of its table by name); the defaults are the table's
        (tests/test_options.py keeps them equal).

        ``data`` holds the token secret and, unless the App was given a store, the
        database (``zim.storage.durable.DurableStore``, pruned by ``retention``).

        ``workers``: 1 serves from this process; N > 1 makes this process the
        supervisor and router of N worker processes sharing the ports.
        ``login_timeout``: seconds a connection may stay without logging in;
        ``idle_timeout``: seconds without a byte received (0 turns either off).
        ``user_rate``: messages a second one user may send (actions 2 and 4
        together, default 20); ``channel_rate``: messages a second per channel (action 4);
        a token bucket each, burst one second's worth; excess is answered
        ``rate_limited`` and not stored; 0 turns a limit off.
        ``max_outbuf``: bytes queued for one connection (a client that stopped
        reading) before the server closes it.
        ``max_inflight``: requests of one connection waiting for their answers
        before the server stops reading it (its next requests wait in the kernel).
        ``max_client_memory``: bytes of output queued for all the clients of one
        serving process (a worker, or the single process); past it the largest
        queues are cut first. None: a quarter of the machine's memory shared
        between the serving processes; 0: no budget.
        ``channel_push``: whether a subscribe without a ``"push"`` field gets pushes
        (False: members read by history unless they ask for ``"push": true``).
        ``push_window_ms``: merge a channel's message pushes into one 103 per member
        connection per slice of this many ms, the first message held until the slice
        ends (0: off, one 102 per message); ``push_max``: the newest messages a 103
        carries, older ones counted in its ``skipped``.
        ``ws_deflate``: accept permessage-deflate from WebSocket clients that offer
        it (no context takeover either way; docs/protocol.md).
        ``ws_origins``: the web origins whose pages may open a WebSocket, as
        ``--ws-origins`` (``"https://chat.example.com,https://app.example.com"``,
        or a list of them; ``"*"``: any; ``null``, ``require-origin``: see
        zim.origins); another Origin gets HTTP 403.
        ``redis``: ``"redis://HOST:PORT/DB"``: this server is one node of several
        sharing that Redis (or Redis Cluster) for users, messages, mailboxes,
        presence and pushes (``zim.nodes``); ``data`` and the App's store are then
        not used. None: a server on its own.
        ``metrics``: ``"HOST:PORT"`` to serve ``/metrics`` (Prometheus), ``/healthz``
        and ``/readyz`` over HTTP from the server's loop (docs/deploy.md); None: off.
        ``token_ttl``: seconds a login token is valid (default 30 days); every
        login answers a new one, and action 10 renews it (zim.tokens).
        ``secret_file``: read the token secret from this file (32 bytes, ours,
        mode 0600) instead of ``DATA/secret`` or, for a node, the Redis key
        ``zim:secret``; every node of a service needs the same one.
        ``client_limits``: connections per address and per user, login, new-user
        and failed-token rates per address, channel creation rate, ack length
        (``zim.limits.ClientLimits``); ``quotas``: mailbox size per user and
        channels a user may create, kept by the store (``zim.storage.store.Quotas``).
        Bad values raise ValueError before anything starts; a data directory,
        secret or database that others may write, or that is not ours, raises
        RuntimeError (zim.datadir).
        """
        self.run_with(Options.from_run(dict(
            tcp=tcp, ws=ws, workers=workers, data=data, max_packet=max_packet, login_timeout=login_timeout,
            idle_timeout=idle_timeout, retention=retention, user_rate=user_rate, channel_rate=channel_rate,
            max_outbuf=max_outbuf, channel_push=channel_push, push_window_ms=push_window_ms, push_max=push_max,
            ws_deflate=ws_deflate, redis=redis, metrics=metrics, max_inflight=max_inflight,
            max_client_memory=max_client_memory, ws_origins=ws_origins, token_ttl=token_ttl,
            secret_file=secret_file, client_limits=client_limits, quotas=quotas, **more)))

    def run_with(self, options: Options) -> None:
        """Serve with options already checked (``zim.options.Options``), as ``run`` does."""
        # imported here: the runtime (router, stores, metrics) is not loaded by an
        # ``import zim``, which every worker process makes
        from zim.server import Server

        self.server = Server(self, options)
        self.server.run()
