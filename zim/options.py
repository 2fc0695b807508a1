"""Every server option, defined once: its name, flag, default, check and help.

``OPTIONS`` is the table. Each ``Option`` says:

- ``name``: the keyword of ``App.run`` and the attribute of ``Options``
  (``max_outbuf``); ``flag`` the command-line flag (``--max-outbuf``), whose
  dashes a ``--config`` file's keys take too;
- ``default``: the value ``App.run`` and ``Options`` take when it is not given;
  ``flag_default`` the flag's, when the command line spells it otherwise
  (``"auto"``, ``"on"``) or differs (``--workers``: the number of cores);
- ``parse``: command-line text -> the flag's value (argparse's ``type``, whose
  ``ArgumentTypeError`` says what is wrong); ``from_flag``: that value -> the
  option's value (``"off"`` -> None);
- ``check``: the option's value -> its canonical value, or ValueError; checks of
  several options together are in ``Options.check_together``;
- ``reactor``: the keyword of ``zim._core.Reactor`` it feeds, through
  ``to_reactor``; ``worker``: the workers of ``--workers N`` need it (every
  reactor option does, and the listening addresses);
- ``group``: the object ``App.run`` takes it in (``client_limits``: a
  ``ClientLimits``, whose attribute ``field`` it is), if not on its own.

``zim.cli`` builds its parser from the table, ``App.run`` its ``Options`` from
its keywords, and the router hands the workers their part as JSON
(``Options.worker_json``), which ``Options.from_json`` rebuilds: one parser, one
check. Adding a reactor option is one entry here and its keyword in the Reactor.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import psutil

from zim import limits as L
from zim.archive.config import (ARCHIVE_KINDS, DEFAULT_ARCHIVE_BATCH, DEFAULT_ARCHIVE_KINDS, MAX_ARCHIVE_BATCH, check_dsn,
                                parse_archive_kinds)
from zim.demo import reactor_pages
from zim._core import Reactor
from zim.limits import ClientLimits, check_count, check_rate
from zim.origins import DEFAULT as DEFAULT_WS_ORIGINS, origin_check, parse_origins
from zim.pushmerge import DEFAULT_PUSH_MAX, MAX_PUSH_MAX, MAX_PUSH_WINDOW_MS, check_push_settings
from zim.storage.retention import Retention, Tier, format_duration, parse_duration, parse_tier
from zim.storage.store import (
    DEFAULT_MAX_CHANNELS_PER_USER, DEFAULT_MAX_MAILBOX, DEFAULT_MAX_MAILBOX_BYTES, Quotas,
)

MAX_WORKERS = 64    # presence keeps one bit per worker in a 64-bit mask
DEFAULT_MAX_PACKET = 65536
DEFAULT_USER_RATE = 20          # messages a second per user, DMs and channel messages together
DEFAULT_CHANNEL_RATE = 40       # messages per second per channel, the article's figure
DEFAULT_MAX_OUTBUF = 8 * 1024 * 1024    # bytes queued for one connection before it is cut (Redis's
                                        # pub/sub soft limit); --max-client-memory bounds them all
MIN_OUTBUF = 2 * 1024 * 1024    # above the largest server packet (< 1 MiB) with room to spare
MAX_OUTBUF = 1024 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 128      # requests of one connection waiting for answers before it is not read
DEFAULT_MAX_STORE_BACKLOG = 2048    # store calls waiting for the writer before the workers are not read
CLIENT_MEMORY_SHARE = 4         # auto --max-client-memory: a quarter of the machine over the serving processes
DEFAULT_TOKEN_TTL = 30 * 86400  # seconds a login token is valid (renewed by every login and action 10)
MAX_TOKEN_TTL = 100 * 365 * 86400
DEFAULT_PORTS = {"tcp": 8081, "ws": 8082}
MAX_JWT_LEEWAY = 3600           # seconds: clocks further apart than an hour are a fault to fix
MIN_JWT_BYTES, MAX_JWT_BYTES = 256, 1 << 20
DEFAULT_API_MAX_BODY = 64 * 1024    # bytes of one server API request body (a message is at most --max-packet)
MAX_API_MAX_BODY = 16 * 1024 * 1024
DEFAULT_API_MAX_CLIENTS = 64        # the application's backend: a pool of connections, not its users
MAX_API_MAX_CLIENTS = 10_000
# TCP bodies shorter than this go out plain: as permessage-deflate's 64-byte floor, deflate
# rarely shrinks them (a block's header and codes cost ~10 bytes; they hold little to repeat)
DEFAULT_TCP_DEFLATE_MIN = 64
MAX_TCP_DEFLATE_MIN = 16 * 1024 * 1024


# ---------------------------------------------------------------- values from text

def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` or ``"HOST"`` -> (host, port); empty host = all interfaces."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in address {text!r}")
    return host, int(port)


def _flag_value(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError becomes the flag's usage error."""
    def flag(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    flag.__name__ = parse.__name__
    return flag


@_flag_value
def address_text(text: str) -> str:
    """A listening address as given (``off`` kept), checked."""
    if text != "off":
        parse_address(text, 1)
    return text


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


_SIZE = re.compile(r"(\d+)\s*(?:([kKmMgG])(?:iB)?)?")
_UNIT_BYTES = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(low: int, high: int) -> Callable[[str], int]:
    """Bytes: an integer, or one with a binary unit (``8M``, ``8MiB``, ``512k``)."""
    def parse(text: str) -> int:
        match = _SIZE.fullmatch(text.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 8388608 or 8MiB)")
        unit = match[2].lower() if match[2] else None
        value = int(match[1]) * _UNIT_BYTES[unit]
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high} bytes")
        return value

    return parse


def _client_memory(text: str) -> int | str:
    """``auto``, ``0`` (off), or a size (at least 2 MiB; checked against --max-outbuf later)."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip() == "0":
        return 0
    return size(MIN_OUTBUF, 1 << 50)(text)


@_flag_value
def _origins(text: str) -> str:
    """--ws-origins: '*', or a comma-separated list of origins (zim.origins); canonical form."""
    return str(parse_origins(text))


@_flag_value
def _rate(text: str) -> float:
    """Messages per second, >= 0 (0: off)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    return check_rate("the rate", value)


@_flag_value
def _token_ttl(text: str) -> float:
    """A token lifetime (30d, 12h, 90s ...) in seconds: 1 s to 100 years."""
    ms = parse_duration(text)
    if ms < 1000:
        raise ValueError(f"{text!r} is shorter than a second (tokens must expire, "
                         "but not before a client can use them)")
    return ms / 1000


_tier = _flag_value(parse_tier)


def _off_is_none(text: str) -> str | None:
    return None if text == "off" else text


def _on(text: str) -> bool:
    return text == "on"


# ---------------------------------------------------------------- checks of values

def _check_archive_dsn(value: Any) -> str | None:
    return None if value is None else check_dsn(value)


def _check_archive_kinds(value: Any) -> str:
    return parse_archive_kinds(value) if isinstance(value, str) else _not_kinds(value)


def _not_kinds(value: Any) -> str:
    raise ValueError(f"archive_kinds is a comma-separated list of {', '.join(ARCHIVE_KINDS)}, not {value!r}")


def _check_int(name: str, low: int, high: int, what: str = "") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}{what}")
        return value

    return check


def _check_address(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value:
            parse_address(value, 1)
        return value or None

    return check


def _check_bool(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, not {value!r}")
        return value

    return check


def _check_outbuf(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"max_outbuf must be a number of bytes, not {value!r}")
    if not MIN_OUTBUF <= value <= MAX_OUTBUF:
        raise ValueError(f"max_outbuf must be between {MIN_OUTBUF} (2 MiB) and {MAX_OUTBUF} (1 GiB) bytes")
    return value


def _check_inflight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"max_inflight must be between 1 and 65535, not {value!r}")
    return value


def _check_client_memory(value: Any) -> int | None:
    if value is None:
        return None             # auto: Options works it out
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_client_memory must be 0 (off), a number of bytes or None (auto), not {value!r}")
    return value


def _check_origins(value: Any) -> str:
    try:
        return str(parse_origins(value))   # canonical: workers get it as text
    except ValueError as exc:
        raise ValueError(f"ws_origins: {exc}") from None


def _check_token_ttl(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= MAX_TOKEN_TTL:
        raise ValueError(f"token_ttl must be between 1 second and 100 years, not {value!r}")
    return value


def _check_push_window(value: Any) -> int:
    check_push_settings(value, DEFAULT_PUSH_MAX)
    return value


def _check_push_max(value: Any) -> int:
    check_push_settings(0, value)
    return value


def _check_rate(name: str) -> Callable[[Any], float]:
    return lambda value: check_rate(name, value)


def _check_count(name: str) -> Callable[[Any], int]:
    return lambda value: check_count(name, value)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Option:
    """One server option; see the module docstring."""

    name: str
    flag: str
    default: Any
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    flag_default: Any = None            # None: ``default``
    from_flag: Callable[[Any], Any] | None = None
    check: Callable[[Any], Any] | None = None
    reactor: str | None = None
    to_reactor: Callable[[Any], Any] | None = None
    worker: bool = False
    group: str | None = None
    field: str | None = None            # the group's attribute; None: ``name``
    check_last: bool = False            # checked after the others (App.run has named bad values first)

    def flag_default_value(self) -> Any:
        return self.default if self.flag_default is None else self.flag_default


_RETENTION = Retention()
_COUNT = bounded_int(0, L.MAX_COUNT_LIMIT)


def _retention_option(tier: str, flag: str, what: str) -> Option:
    default = getattr(_RETENTION, tier)
    return Option(f"retain_{tier}", flag, default, metavar="TTL:CAP", parse=_tier, group="retention",
                  field=tier, help=f"retention of {what}: messages younger than TTL (30d, 12h, 90s ...), "
                                   f"at most CAP per conversation; 0 turns either off (default {default})")


OPTIONS: tuple[Option, ...] = (
    Option("tcp", "--tcp", ":8081", metavar="HOST:PORT", parse=address_text, from_flag=_off_is_none,
           check=_check_address("tcp"), check_last=True, worker=True,
           help="TCP listen address (default :8081; 'off' to disable)"),
    Option("ws", "--ws", ":8082", metavar="HOST:PORT", parse=address_text, from_flag=_off_is_none,
           check=_check_address("ws"), check_last=True, worker=True,
           help="WebSocket listen address (default :8082; 'off' to disable)"),
    Option("workers", "--workers", 1, parse=bounded_int(1, MAX_WORKERS), flag_default=os.cpu_count() or 1,
           check=_check_int("workers", 1, MAX_WORKERS),
           help="worker processes sharing the ports (default: the number of CPU cores, "
                f"at most {MAX_WORKERS}); 1 serves from a single process"),
    Option("data", "--data", "./zim-data", metavar="DIR",
           help="data directory: token secret and store (default ./zim-data)"),
    Option("max_packet", "--max-packet", DEFAULT_MAX_PACKET, metavar="BYTES",
           parse=bounded_int(8, 16 * 1024 * 1024), reactor="max_packet", worker=True,
           check=_check_int("max_packet", 8, 16 * 1024 * 1024, " bytes"),
           help="largest client packet accepted (default 65536)"),
    Option("login_timeout", "--login-timeout", 10, metavar="S", parse=bounded_int(0, 86400),
           check=_check_int("login_timeout", 0, 86400, " seconds"), reactor="login_timeout", worker=True,
           help="close connections not logged in after S seconds (default 10; 0: off)"),
    Option("idle_timeout", "--idle-timeout", 300, metavar="S", parse=bounded_int(0, 86400),
           check=_check_int("idle_timeout", 0, 86400, " seconds"), reactor="idle_timeout", worker=True,
           help="close connections silent for S seconds (default 300; 0: off); "
                "heartbeats (action 9) and WebSocket pings count"),
    Option("memory_release_interval", "--memory-release-interval", 10, metavar="S",
           parse=bounded_int(0, 86400), check=_check_int("memory_release_interval", 0, 86400, " seconds"),
           reactor="memory_release_interval", worker=True,
           help="every S seconds each process gives its heap's free pages back to the kernel "
                "(malloc_trim: the buffers of a burst, the holes of grown tables); a release "
                "that took T waits at least 1000 T for the next (default 10; 0: never)"),
    Option("user_rate", "--user-rate", DEFAULT_USER_RATE, metavar="N", parse=_rate,
           check=_check_rate("user_rate"),
           help="messages per second one user may send, actions 2 and 4 together; "
                f"bursts of one second's worth; excess answered rate_limited (default "
                f"{DEFAULT_USER_RATE:g}; 0: off)"),
    Option("channel_rate", "--channel-rate", DEFAULT_CHANNEL_RATE, metavar="N", parse=_rate,
           check=_check_rate("channel_rate"),
           help="messages per second per channel (action 4); bursts of one second's worth; "
                f"excess answered rate_limited (default {DEFAULT_CHANNEL_RATE:g}; 0: off)"),
    Option("max_conns_per_address", "--max-conns-per-address", L.DEFAULT_MAX_CONNS_PER_ADDRESS, metavar="N",
           parse=_COUNT, check=_check_count("max_conns_per_address"), group="client_limits",
           reactor="max_conns_per_address", worker=True,
           help="connections from one source address (IPv6: one /64), over every worker; the "
                "next is refused (TCP: a too_many_connections packet, WebSocket: HTTP 429) and "
                f"closed (default {L.DEFAULT_MAX_CONNS_PER_ADDRESS}; 0: off; behind a proxy on "
                "this host every client has its address: see docs/deploy.md)"),
    Option("max_conns_per_user", "--max-conns-per-user", L.DEFAULT_MAX_CONNS_PER_USER, metavar="N",
           parse=_COUNT, check=_check_count("max_conns_per_user"), group="client_limits",
           help="logged-in connections of one user on this server; the next login is answered "
                f"too_many_connections (default {L.DEFAULT_MAX_CONNS_PER_USER}; 0: off)"),
    Option("address_login_rate", "--address-login-rate", L.DEFAULT_ADDRESS_LOGIN_RATE, metavar="N",
           parse=_rate, check=_check_rate("address_login_rate"), group="client_limits",
           help="login attempts (action 1) a second from one address, bursts of ten seconds' "
                f"worth; excess answered rate_limited (default {L.DEFAULT_ADDRESS_LOGIN_RATE:g}; "
                "0: off)"),
    Option("address_new_user_rate", "--address-new-user-rate", L.DEFAULT_ADDRESS_NEW_USER_RATE, metavar="N",
           parse=_rate, check=_check_rate("address_new_user_rate"), group="client_limits",
           help="new users (logins with a name only, not JWTs) a second from one address, bursts of ten "
                f"seconds' worth (default {L.DEFAULT_ADDRESS_NEW_USER_RATE:g}; 0: off)"),
    Option("address_auth_failure_rate", "--address-auth-failure-rate", L.DEFAULT_ADDRESS_AUTH_FAILURE_RATE,
           metavar="N", parse=_rate, check=_check_rate("address_auth_failure_rate"), group="client_limits",
           help="failed token checks a second from one address, bursts of ten seconds' worth; "
                "an address out of them may not try a token until its bucket refills (default "
                f"{L.DEFAULT_ADDRESS_AUTH_FAILURE_RATE:g}; 0: off)"),
    Option("channel_create_rate", "--channel-create-rate", L.DEFAULT_CHANNEL_CREATE_RATE, metavar="N",
           parse=_rate, check=_check_rate("channel_create_rate"), group="client_limits",
           help="channels one user creates a second, bursts of ten seconds' worth (default "
                f"{L.DEFAULT_CHANNEL_CREATE_RATE:g}; 0: off)"),
    Option("max_channels_per_user", "--max-channels-per-user", DEFAULT_MAX_CHANNELS_PER_USER, metavar="N",
           parse=_COUNT, group="quotas",
           help="channels one user may have created (too_many_channels past it; default "
                f"{DEFAULT_MAX_CHANNELS_PER_USER}; 0: off)"),
    Option("max_mailbox", "--max-mailbox", DEFAULT_MAX_MAILBOX, metavar="N", parse=_COUNT,
           group="quotas",
           help="direct messages waiting in one user's mailbox (unacknowledged); a DM past it "
                f"is refused mailbox_full and not stored (default {DEFAULT_MAX_MAILBOX}; 0: off)"),
    Option("max_mailbox_bytes", "--max-mailbox-bytes", DEFAULT_MAX_MAILBOX_BYTES, metavar="BYTES",
           parse=size(0, 1 << 50), group="quotas",
           help="bytes of the direct messages waiting in one user's mailbox (default "
                f"{DEFAULT_MAX_MAILBOX_BYTES >> 20}MiB; 0: off)"),
    Option("max_ack_ids", "--max-ack-ids", L.DEFAULT_MAX_ACK_IDS, metavar="N", parse=_COUNT,
           check=_check_count("max_ack_ids"), group="client_limits",
           help=f"ids in one ack (action 8); more is bad_request (default {L.DEFAULT_MAX_ACK_IDS}; "
                "0: off)"),
    Option("ack_rate", "--ack-rate", L.DEFAULT_ACK_RATE, metavar="N", parse=_rate,
           check=_check_rate("ack_rate"), group="client_limits",
           help="ids a second one user's acks (action 8) may free, bursts of one second's worth; "
                "acks past it wait, not refused; one user's acks reach the store one at a time "
                f"(default {L.DEFAULT_ACK_RATE:g}; 0: no rate)"),
    Option("read_rate", "--read-rate", L.DEFAULT_READ_RATE, metavar="BYTES", parse=size(0, 1 << 40),
           group="client_limits",
           help="bytes of history and mailbox pages (actions 5 and 7) one user may read a second, "
                f"bursts of {L.READ_BURST_SECONDS} seconds' worth; reads past it wait, not refused "
                f"(default {L.DEFAULT_READ_RATE >> 10}KiB; 0: no rate)"),
    Option("max_outbuf", "--max-outbuf", DEFAULT_MAX_OUTBUF, metavar="BYTES", parse=size(MIN_OUTBUF, MAX_OUTBUF),
           check=_check_outbuf, reactor="outbuf_limit", worker=True,
           help="bytes queued for one connection before the server cuts it (a client that "
                f"stopped reading); 2MiB..1GiB, at least twice --max-packet "
                f"(default {DEFAULT_MAX_OUTBUF >> 20}MiB)"),
    Option("max_inflight", "--max-inflight", DEFAULT_MAX_INFLIGHT, metavar="N", parse=bounded_int(1, 65535),
           check=_check_inflight, reactor="max_inflight", worker=True,
           help="requests of one connection waiting for their answers before the server "
                "stops reading it; its next requests wait in the kernel (default "
                f"{DEFAULT_MAX_INFLIGHT})"),
    Option("max_store_backlog", "--max-store-backlog", DEFAULT_MAX_STORE_BACKLOG, metavar="N", parse=_COUNT,
           help="store writes waiting for the writer process before the supervisor stops reading "
                "its workers' requests until half of them are done (with --workers >= 2); the requests "
                f"wait in the workers and the kernel, not as objects here (default {DEFAULT_MAX_STORE_BACKLOG}; "
                "0: no limit)"),
    Option("max_client_memory", "--max-client-memory", None, metavar="BYTES", parse=_client_memory,
           flag_default="auto", from_flag=lambda value: None if value == "auto" else value,
           check=_check_client_memory, reactor="memory_budget", worker=True,
           help="output queued for all the clients of one worker (or of the single "
                "process); past it the largest queues are cut first, as Redis's "
                "maxmemory-clients. 'auto' (default): a quarter of the machine's memory "
                "shared between the workers; 0: no budget; else at least --max-outbuf"),
    Option("channel_push", "--channel-push", True, choices=("on", "off"), flag_default="on", from_flag=_on,
           check=_check_bool("channel_push"),
           help="on (default): a subscribe without a \"push\" field gets pushes; off: "
                "members read by history unless they subscribe with \"push\": true"),
    Option("push_window_ms", "--push-window-ms", 0, metavar="MS", parse=bounded_int(0, MAX_PUSH_WINDOW_MS),
           check=_check_push_window,
           help="merge a channel's message pushes into one 103 packet per member connection "
                "per slice of MS milliseconds; a slice's first message waits until it ends "
                "(default 0: off, one 102 per message)"),
    Option("push_max", "--push-max", DEFAULT_PUSH_MAX, metavar="N", parse=bounded_int(1, MAX_PUSH_MAX),
           check=_check_push_max,
           help="the newest messages a 103 carries; the older ones of its slice are counted "
                f"in its \"skipped\" and read from history (default {DEFAULT_PUSH_MAX})"),
    Option("ws_deflate", "--ws-deflate", True, choices=("on", "off"), flag_default="on", from_flag=_on,
           check=_check_bool("ws_deflate"), reactor="ws_deflate", worker=True,
           help="on (default): compress WebSocket messages with clients that offer "
                "permessage-deflate (no context takeover: no per-connection zlib state); "
                "off: never negotiate it"),
    Option("tcp_deflate", "--tcp-deflate", True, choices=("on", "off"), flag_default="on", from_flag=_on,
           check=_check_bool("tcp_deflate"),
           help="on (default): a TCP client that asks for it at login (\"compress\": \"deflate\") "
                "gets packet bodies compressed (raw DEFLATE, each on its own: no per-connection "
                "zlib state); off: the login answer does not agree"),
    Option("tcp_deflate_min", "--tcp-deflate-min", DEFAULT_TCP_DEFLATE_MIN, metavar="BYTES",
           parse=bounded_int(0, MAX_TCP_DEFLATE_MIN),
           check=_check_int("tcp_deflate_min", 0, MAX_TCP_DEFLATE_MIN, " bytes"),
           reactor="tcp_deflate_min", worker=True,
           help="compress a body for such a TCP client only when it has at least BYTES bytes "
                f"(default {DEFAULT_TCP_DEFLATE_MIN}, the WebSocket floor: shorter ones rarely shrink)"),
    Option("ws_origins", "--ws-origins", DEFAULT_WS_ORIGINS, metavar="ORIGINS", parse=_origins,
           check=_check_origins, reactor="ws_origins", to_reactor=origin_check, worker=True,
           help="web pages that may open a WebSocket, by their Origin: a comma-separated "
                "list like https://chat.example.com,http://localhost:3000 (scheme, host, "
                "port; default ports and case do not matter), plus 'null' (file:// pages) "
                "or 'require-origin' (refuse upgrades without an Origin header, which "
                "non-browser clients otherwise may leave out); another Origin gets HTTP "
                "403. Default '*': any origin"),
    Option("demo", "--demo", True, choices=("on", "off"), flag_default="on", from_flag=_on,
           check=_check_bool("demo"), reactor="static_pages", to_reactor=reactor_pages, worker=True,
           help="on (default): a plain HTTP GET / on the WebSocket port gets a web chat page "
                "(and /zim.js, the JavaScript client); other paths get 404. off: such GETs get "
                "400 as any request that is not a WebSocket upgrade"),
    Option("store", "--store", "sqlite", choices=("sqlite", "memory"),
           help="sqlite (default): everything in DIR/zim.db, kept across restarts; "
                "memory: nothing kept (for tests and comparisons)"),
    _retention_option("private", "--retain-private", "private conversations"),
    _retention_option("channel", "--retain-channel", "channels"),
    _retention_option("large", "--retain-large", "large channels"),
    Option("large_channel", "--large-channel", _RETENTION.large_members, metavar="MEMBERS",
           parse=bounded_int(1, 1 << 31), group="retention", field="large_members",
           help=f"a channel with this many members or more is large (default {_RETENTION.large_members})"),
    Option("prune_every", "--prune-every", _RETENTION.prune_every_s, metavar="S", parse=bounded_int(1, 86400),
           group="retention", field="prune_every_s",
           help=f"start a pruning pass every S seconds (default {_RETENTION.prune_every_s})"),
    Option("token_ttl", "--token-ttl", DEFAULT_TOKEN_TTL, metavar="TTL", parse=_token_ttl,
           check=_check_token_ttl,
           help="how long a login token is valid (30d, 12h, 90s ...; at least 1s); every "
                "login answers a new one and action 10 renews it (default "
                f"{format_duration(DEFAULT_TOKEN_TTL * 1000)})"),
    Option("secret_file", "--secret-file", None, metavar="PATH",
           help="read the token-signing secret (32 bytes; ours, mode 0600, not a symlink) "
                "from PATH instead of DIR/secret or, with --redis, the Redis key "
                "zim:secret; every node of a service needs the same file. Make one with: "
                "head -c 32 /dev/urandom > PATH && chmod 600 PATH"),
    Option("jwt_key", "--jwt-key", None, metavar="FILE",
           help="accept logins with a JWT (action 1, \"jwt\") signed with this key: a PEM public "
                "key (RS256: RSA of 2048 bits or more; ES256: EC P-256) or a shared HS256 "
                "secret of 32 bytes or more (ours, mode 0600). The JWT's sub is the user id "
                "(docs/protocol.md). Read again when the file changes"),
    Option("jwt_jwks", "--jwt-jwks", None, metavar="FILE",
           help="the same with a JSON Web Key Set of public RSA and EC P-256 keys, chosen by the "
                "token's kid; read again when the file changes (key rotation)"),
    Option("jwt_audience", "--jwt-audience", None, metavar="AUD",
           help="a JWT must name this audience (aud); without it, a JWT with an aud is refused"),
    Option("jwt_issuer", "--jwt-issuer", None, metavar="ISS", help="a JWT must name this issuer (iss)"),
    Option("jwt_leeway", "--jwt-leeway", L.DEFAULT_JWT_LEEWAY, metavar="S", parse=bounded_int(0, MAX_JWT_LEEWAY),
           check=_check_int("jwt_leeway", 0, MAX_JWT_LEEWAY, " seconds"),
           help=f"seconds of leeway on a JWT's exp, nbf and iat, for clocks a little apart "
                f"(default {L.DEFAULT_JWT_LEEWAY})"),
    Option("jwt_max_bytes", "--jwt-max-bytes", L.DEFAULT_JWT_MAX_BYTES, metavar="BYTES",
           parse=bounded_int(MIN_JWT_BYTES, MAX_JWT_BYTES),
           check=_check_int("jwt_max_bytes", MIN_JWT_BYTES, MAX_JWT_BYTES, " bytes"),
           help=f"longest JWT accepted; a longer one is refused unparsed (default {L.DEFAULT_JWT_MAX_BYTES})"),
    Option("anonymous_login", "--anonymous-login", True, choices=("on", "off"), flag_default="on",
           from_flag=_on, check=_check_bool("anonymous_login"),
           help="on (default): a login with a name only creates a new user; off: refused "
                "unauthorized, users log in with a JWT (needs --jwt-key or --jwt-jwks) or a token"),
    Option("redis", "--redis", None, metavar="URL",
           help="redis://HOST:PORT/DB: be one node of a zim service sharing this Redis (or "
                "Redis Cluster) for users, messages, mailboxes, presence and pushes; --data "
                "and --store are then not used (docs/redis.md)"),
    Option("archive", "--archive", None, metavar="DSN", parse=_flag_value(check_dsn),
           check=_check_archive_dsn,
           help="postgresql://USER@HOST:PORT/DB: keep the kinds of --archive-kinds for good in "
                "PostgreSQL, a second tier behind Redis (on nodes) or SQLite (a single server); "
                "give HOST as an address (libpq resolves names blocking). Default off (docs/storage.md)"),
    Option("archive_kinds", "--archive-kinds", DEFAULT_ARCHIVE_KINDS, metavar="KINDS",
           parse=_flag_value(parse_archive_kinds), check=_check_archive_kinds,
           help="which conversations --archive keeps: a comma-separated list of private, "
                "channel (small channels) and large (large channels) (default private). Users, "
                "memberships and every conversation's seq are kept whatever the kinds"),
    Option("archive_batch", "--archive-batch", DEFAULT_ARCHIVE_BATCH, metavar="N",
           parse=bounded_int(1, MAX_ARCHIVE_BATCH), check=_check_int("archive_batch", 1, MAX_ARCHIVE_BATCH),
           help=f"messages written to the archive in one PostgreSQL transaction, at most "
                f"(default {DEFAULT_ARCHIVE_BATCH})"),
    Option("metrics", "--metrics", None, metavar="HOST:PORT", parse=address_text, flag_default="off",
           from_flag=_off_is_none, check=_check_address("metrics"),
           help="serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP on "
                "this address (default off; docs/deploy.md). Not authenticated: use a "
                "private address"),
    Option("api", "--api", None, metavar="HOST:PORT", parse=address_text, flag_default="off",
           from_flag=_off_is_none, check=_check_address("api"),
           help="serve the server API for the application's backend (HTTP and JSON: "
                "publish, send, disconnect, presence, channels ...; docs/api.md) on this "
                "address (default off); needs --api-key-file"),
    Option("api_key_file", "--api-key-file", None, metavar="FILE",
           help="the server API's key (16 to 4096 bytes of text, ours, mode 0600, not a "
                "symlink), which requests send as 'Authorization: Bearer KEY'"),
    Option("api_max_body", "--api-max-body", DEFAULT_API_MAX_BODY, metavar="BYTES",
           parse=size(1024, MAX_API_MAX_BODY), check=_check_int("api_max_body", 1024, MAX_API_MAX_BODY),
           help="largest request body the server API reads; a larger one is answered 413 "
                f"and its connection closed (default {DEFAULT_API_MAX_BODY >> 10}KiB)"),
    Option("api_max_clients", "--api-max-clients", DEFAULT_API_MAX_CLIENTS, metavar="N",
           parse=bounded_int(1, MAX_API_MAX_CLIENTS), check=_check_int("api_max_clients", 1, MAX_API_MAX_CLIENTS),
           help="connections the server API holds at once; more are closed at accept "
                f"(default {DEFAULT_API_MAX_CLIENTS})"),
)

BY_NAME = {option.name: option for option in OPTIONS}
GROUPS = {"retention": Retention, "client_limits": ClientLimits, "quotas": Quotas}


def default_client_memory(serving_processes: int) -> int:
    """--max-client-memory's default: a quarter of the machine's memory over the serving processes."""
    return psutil.virtual_memory().total // CLIENT_MEMORY_SHARE // max(1, serving_processes)


# ---------------------------------------------------------------- the values

class Options:
    """A server's settings: one attribute per ``Option`` (by name), every one checked.

    ``Options(**values)``: the named values, the others at their defaults;
    ValueError for a bad value. ``max_client_memory=None`` (auto) becomes a
    quarter of the machine's memory over the serving processes, at least
    ``max_outbuf`` (``auto_client_memory`` says it was chosen so).
    """

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(BY_NAME)
        if unknown:
            raise TypeError(f"unknown server options: {', '.join(sorted(unknown))}")
        for option in sorted(OPTIONS, key=lambda option: option.check_last):
            value = values.get(option.name, option.default)
            setattr(self, option.name, option.check(value) if option.check is not None else value)
        self.auto_client_memory = self.max_client_memory is None
        if self.auto_client_memory:
            self.max_client_memory = max(self.max_outbuf, default_client_memory(self.workers))
        self.check_together()

    def check_together(self) -> None:
        """The checks that look at several options (the grouped ones: their own class's)."""
        for group in GROUPS:
            self._group(group)
        if self.max_outbuf < 2 * self.max_packet:
            raise ValueError(f"max_outbuf ({self.max_outbuf}) must be at least twice max_packet "
                             f"({self.max_packet})")
        if self.jwt_key is not None and self.jwt_jwks is not None:
            raise ValueError("give one of --jwt-key and --jwt-jwks, not both")
        if not self.anonymous_login and self.jwt_key is None and self.jwt_jwks is None:
            raise ValueError("--anonymous-login off needs --jwt-key or --jwt-jwks: else no new user "
                             "could ever log in")
        if self.api and not self.api_key_file:
            raise ValueError("--api needs --api-key-file (the key the application's backend sends)")
        if self.archive is not None and self.redis is None and self.store == "memory":
            raise ValueError("--archive needs --store sqlite: the archive stands behind the database "
                             "(--store memory keeps nothing to archive from)")
        if self.max_client_memory and self.max_client_memory < self.max_outbuf:
            raise ValueError(f"--max-client-memory ({self.max_client_memory}) must be 0 (off) or at least "
                             f"--max-outbuf ({self.max_outbuf})")

    # -- from the command line, from App.run, to and from the workers --------------------
    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "Options":
        """The options of a parsed command line (``zim.cli``)."""
        values = {}
        for option in OPTIONS:
            value = getattr(args, option.name)
            values[option.name] = option.from_flag(value) if option.from_flag is not None else value
        return cls(**values)

    @classmethod
    def from_run(cls, values: dict[str, Any]) -> "Options":
        """The options of ``App.run``'s keywords, where the grouped ones come as their
        objects (``retention=Retention(...)``, ``client_limits=``, ``quotas=``)."""
        values = dict(values)
        for group in GROUPS:
            given = values.pop(group, None)
            if given is not None:
                for option in OPTIONS:
                    if option.group == group:
                        values[option.name] = getattr(given, option.field or option.name)
        return cls(**values)

    def worker_json(self) -> str:
        """What a worker needs of these options, as JSON (``from_json`` reads it)."""
        return orjson.dumps({option.name: getattr(self, option.name)
                             for option in OPTIONS if option.worker}).decode()

    @classmethod
    def from_json(cls, text: str) -> "Options":
        return cls(**orjson.loads(text))

    # -- grouped ---------------------------------------------------------------------------
    def _group(self, group: str) -> Any:
        return GROUPS[group](**{option.field or option.name: getattr(self, option.name)
                                for option in OPTIONS if option.group == group})

    @property
    def retention(self) -> Retention:
        return self._group("retention")

    @property
    def client_limits(self) -> ClientLimits:
        return self._group("client_limits")

    @property
    def quotas(self) -> Quotas:
        return self._group("quotas")

    # -- the reactor -------------------------------------------------------------------------
    def reactor(self, on_packet: Callable[[int, int, int, bytes], None], **callbacks: Callable) -> Reactor:
        """A reactor with these options, calling ``on_packet`` for each packet and
        the other ``callbacks`` (``on_tick=``, ``on_link_closed=`` ...: see Reactor)."""
        keywords = {}
        for option in OPTIONS:
            if option.reactor is not None:
                value = getattr(self, option.name)
                keywords[option.reactor] = option.to_reactor(value) if option.to_reactor is not None else value
        return Reactor(on_packet=on_packet, **keywords, **callbacks)

    def listen(self, reactor: Reactor) -> None:
        """Open this server's listeners on ``reactor``."""
        if self.tcp:
            reactor.listen(*parse_address(self.tcp, DEFAULT_PORTS["tcp"]), False)
        if self.ws:
            reactor.listen(*parse_address(self.ws, DEFAULT_PORTS["ws"]), True)
