"""``zim-server``: run the IM server."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from zim.app import (
    DEFAULT_CHANNEL_RATE, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_OUTBUF, DEFAULT_MAX_PACKET, DEFAULT_TOKEN_TTL,
    DEFAULT_USER_RATE, MAX_OUTBUF, MAX_WORKERS, MIN_OUTBUF, App, check_outbuf, parse_address,
)
from zim.config import ConfigError, load_config
from zim import limits as L
from zim.limits import ClientLimits, check_rate
from zim.origins import DEFAULT as DEFAULT_WS_ORIGINS, parse_origins
from zim.pushmerge import DEFAULT_PUSH_MAX, MAX_PUSH_MAX, MAX_PUSH_WINDOW_MS
from zim.storage.retention import Retention, Tier, format_duration, parse_duration, parse_tier
from zim.storage.store import (
    DEFAULT_MAX_CHANNELS_PER_USER, DEFAULT_MAX_MAILBOX, DEFAULT_MAX_MAILBOX_BYTES, MemoryStore, Quotas,
)


def _address(text: str) -> str:
    if text == "off":
        return text
    try:
        parse_address(text, 1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bounded_int(low: int, high: int):
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


def _size(low: int, high: int):
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
    return _size(MIN_OUTBUF, 1 << 50)(text)


def _origins(text: str) -> str:
    """--ws-origins: '*', or a comma-separated list of origins (zim.origins); canonical form."""
    try:
        return str(parse_origins(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    """Messages per second, >= 0 (0: off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_rate("the rate", value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token_ttl(text: str) -> float:
    """A token lifetime (30d, 12h, 90s ...) in seconds: 1 s to 100 years."""
    try:
        ms = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if ms < 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is shorter than a second (tokens must expire, "
                                         "but not before a client can use them)")
    return ms / 1000


def _tier(text: str) -> Tier:
    try:
        return parse_tier(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zim-server",
        description="zim instant-messaging server (TCP and WebSocket, one wire format).",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="read settings from a TOML file: its keys are these flags without the "
                             "leading dashes (workers = 4, max-outbuf = \"8MiB\", channel-push = false); "
                             "a flag given on the command line overrides the file")
    parser.add_argument("--tcp", type=_address, default=":8081", metavar="HOST:PORT",
                        help="TCP listen address (default :8081; 'off' to disable)")
    parser.add_argument("--ws", type=_address, default=":8082", metavar="HOST:PORT",
                        help="WebSocket listen address (default :8082; 'off' to disable)")
    parser.add_argument("--workers", type=_bounded_int(1, MAX_WORKERS), default=os.cpu_count() or 1,
                        help="worker processes sharing the ports (default: the number of CPU cores, "
                             f"at most {MAX_WORKERS}); 1 serves from a single process")
    parser.add_argument("--data", default="./zim-data", metavar="DIR",
                        help="data directory: token secret and store (default ./zim-data)")
    parser.add_argument("--max-packet", type=_bounded_int(8, 16 * 1024 * 1024),
                        default=DEFAULT_MAX_PACKET, metavar="BYTES",
                        help="largest client packet accepted (default 65536)")
    parser.add_argument("--login-timeout", type=_bounded_int(0, 86400), default=10, metavar="S",
                        help="close connections not logged in after S seconds (default 10; 0: off)")
    parser.add_argument("--idle-timeout", type=_bounded_int(0, 86400), default=300, metavar="S",
                        help="close connections silent for S seconds (default 300; 0: off); "
                             "heartbeats (action 9) and WebSocket pings count")
    parser.add_argument("--user-rate", type=_rate, default=DEFAULT_USER_RATE, metavar="N",
                        help="messages per second one user may send, actions 2 and 4 together; "
                             f"bursts of one second's worth; excess answered rate_limited (default "
                             f"{DEFAULT_USER_RATE:g}; 0: off)")
    parser.add_argument("--channel-rate", type=_rate, default=DEFAULT_CHANNEL_RATE, metavar="N",
                        help="messages per second per channel (action 4); bursts of one second's worth; "
                             f"excess answered rate_limited (default {DEFAULT_CHANNEL_RATE:g}; 0: off)")
    count = _bounded_int(0, L.MAX_COUNT_LIMIT)
    parser.add_argument("--max-conns-per-address", type=count, default=L.DEFAULT_MAX_CONNS_PER_ADDRESS,
                        metavar="N",
                        help="connections from one source address (IPv6: one /64), over every worker; the "
                             "next is refused (TCP: a too_many_connections packet, WebSocket: HTTP 429) and "
                             f"closed (default {L.DEFAULT_MAX_CONNS_PER_ADDRESS}; 0: off; behind a proxy on "
                             "this host every client has its address: see docs/deploy.md)")
    parser.add_argument("--max-conns-per-user", type=count, default=L.DEFAULT_MAX_CONNS_PER_USER, metavar="N",
                        help="logged-in connections of one user on this server; the next login is answered "
                             f"too_many_connections (default {L.DEFAULT_MAX_CONNS_PER_USER}; 0: off)")
    parser.add_argument("--address-login-rate", type=_rate, default=L.DEFAULT_ADDRESS_LOGIN_RATE, metavar="N",
                        help="login attempts (action 1) a second from one address, bursts of ten seconds' "
                             f"worth; excess answered rate_limited (default {L.DEFAULT_ADDRESS_LOGIN_RATE:g}; "
                             "0: off)")
    parser.add_argument("--address-new-user-rate", type=_rate, default=L.DEFAULT_ADDRESS_NEW_USER_RATE,
                        metavar="N",
                        help="new users (logins without a token) a second from one address, bursts of ten "
                             f"seconds' worth (default {L.DEFAULT_ADDRESS_NEW_USER_RATE:g}; 0: off)")
    parser.add_argument("--address-auth-failure-rate", type=_rate, default=L.DEFAULT_ADDRESS_AUTH_FAILURE_RATE,
                        metavar="N",
                        help="failed token checks a second from one address, bursts of ten seconds' worth; "
                             "an address out of them may not try a token until its bucket refills (default "
                             f"{L.DEFAULT_ADDRESS_AUTH_FAILURE_RATE:g}; 0: off)")
    parser.add_argument("--channel-create-rate", type=_rate, default=L.DEFAULT_CHANNEL_CREATE_RATE, metavar="N",
                        help="channels one user creates a second, bursts of ten seconds' worth (default "
                             f"{L.DEFAULT_CHANNEL_CREATE_RATE:g}; 0: off)")
    parser.add_argument("--max-channels-per-user", type=count, default=DEFAULT_MAX_CHANNELS_PER_USER,
                        metavar="N",
                        help="channels one user may have created (too_many_channels past it; default "
                             f"{DEFAULT_MAX_CHANNELS_PER_USER}; 0: off)")
    parser.add_argument("--max-mailbox", type=count, default=DEFAULT_MAX_MAILBOX, metavar="N",
                        help="direct messages waiting in one user's mailbox (unacknowledged); a DM past it "
                             f"is refused mailbox_full and not stored (default {DEFAULT_MAX_MAILBOX}; 0: off)")
    parser.add_argument("--max-mailbox-bytes", type=_size(0, 1 << 50), default=DEFAULT_MAX_MAILBOX_BYTES,
                        metavar="BYTES",
                        help="bytes of the direct messages waiting in one user's mailbox (default "
                             f"{DEFAULT_MAX_MAILBOX_BYTES >> 20}MiB; 0: off)")
    parser.add_argument("--max-ack-ids", type=count, default=L.DEFAULT_MAX_ACK_IDS, metavar="N",
                        help=f"ids in one ack (action 8); more is bad_request (default {L.DEFAULT_MAX_ACK_IDS}; "
                             "0: off)")
    parser.add_argument("--ack-rate", type=_rate, default=L.DEFAULT_ACK_RATE, metavar="N",
                        help="ids a second one user's acks (action 8) may free, bursts of one second's worth; "
                             "acks past it wait, not refused; one user's acks reach the store one at a time "
                             f"(default {L.DEFAULT_ACK_RATE:g}; 0: no rate)")
    parser.add_argument("--read-rate", type=_size(0, 1 << 40), default=L.DEFAULT_READ_RATE, metavar="BYTES",
                        help="bytes of history and mailbox pages (actions 5 and 7) one user may read a second, "
                             f"bursts of {L.READ_BURST_SECONDS} seconds' worth; reads past it wait, not refused "
                             f"(default {L.DEFAULT_READ_RATE >> 10}KiB; 0: no rate)")
    parser.add_argument("--max-outbuf", type=_size(MIN_OUTBUF, MAX_OUTBUF), default=DEFAULT_MAX_OUTBUF,
                        metavar="BYTES",
                        help="bytes queued for one connection before the server cuts it (a client that "
                             f"stopped reading); 2MiB..1GiB, at least twice --max-packet "
                             f"(default {DEFAULT_MAX_OUTBUF >> 20}MiB)")
    parser.add_argument("--max-inflight", type=_bounded_int(1, 65535), default=DEFAULT_MAX_INFLIGHT,
                        metavar="N",
                        help="requests of one connection waiting for their answers before the server "
                             "stops reading it; its next requests wait in the kernel (default "
                             f"{DEFAULT_MAX_INFLIGHT})")
    parser.add_argument("--max-client-memory", type=_client_memory, default="auto", metavar="BYTES",
                        help="output queued for all the clients of one worker (or of the single "
                             "process); past it the largest queues are cut first, as Redis's "
                             "maxmemory-clients. 'auto' (default): a quarter of the machine's memory "
                             "shared between the workers; 0: no budget; else at least --max-outbuf")
    parser.add_argument("--channel-push", choices=["on", "off"], default="on",
                        help="on (default): a subscribe without a \"push\" field gets pushes; off: "
                             "members read by history unless they subscribe with \"push\": true")
    parser.add_argument("--push-window-ms", type=_bounded_int(0, MAX_PUSH_WINDOW_MS), default=0, metavar="MS",
                        help="merge a channel's message pushes into one 103 packet per member connection "
                             "per slice of MS milliseconds; a slice's first message waits until it ends "
                             "(default 0: off, one 102 per message)")
    parser.add_argument("--push-max", type=_bounded_int(1, MAX_PUSH_MAX), default=DEFAULT_PUSH_MAX, metavar="N",
                        help="the newest messages a 103 carries; the older ones of its slice are counted "
                             f"in its \"skipped\" and read from history (default {DEFAULT_PUSH_MAX})")
    parser.add_argument("--ws-deflate", choices=["on", "off"], default="on",
                        help="on (default): compress WebSocket messages with clients that offer "
                             "permessage-deflate (no context takeover: no per-connection zlib state); "
                             "off: never negotiate it")
    parser.add_argument("--ws-origins", type=_origins, default=DEFAULT_WS_ORIGINS, metavar="ORIGINS",
                        help="web pages that may open a WebSocket, by their Origin: a comma-separated "
                             "list like https://chat.example.com,http://localhost:3000 (scheme, host, "
                             "port; default ports and case do not matter), plus 'null' (file:// pages) "
                             "or 'require-origin' (refuse upgrades without an Origin header, which "
                             "non-browser clients otherwise may leave out); another Origin gets HTTP "
                             "403. Default '*': any origin")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite",
                        help="sqlite (default): everything in DIR/zim.db, kept across restarts; "
                             "memory: nothing kept (for tests and comparisons)")
    defaults = Retention()
    for flag, tier, what in (("--retain-private", defaults.private, "private conversations"),
                             ("--retain-channel", defaults.channel, "channels"),
                             ("--retain-large", defaults.large, "large channels")):
        parser.add_argument(flag, type=_tier, default=tier, metavar="TTL:CAP",
                            help=f"retention of {what}: messages younger than TTL (30d, 12h, 90s ...), "
                                 f"at most CAP per conversation; 0 turns either off (default {tier})")
    parser.add_argument("--large-channel", type=_bounded_int(1, 1 << 31), default=defaults.large_members,
                        metavar="MEMBERS", help="a channel with this many members or more is large "
                                                f"(default {defaults.large_members})")
    parser.add_argument("--prune-every", type=_bounded_int(1, 86400), default=defaults.prune_every_s,
                        metavar="S", help=f"start a pruning pass every S seconds (default {defaults.prune_every_s})")
    parser.add_argument("--token-ttl", type=_token_ttl, default=DEFAULT_TOKEN_TTL, metavar="TTL",
                        help="how long a login token is valid (30d, 12h, 90s ...; at least 1s); every "
                             "login answers a new one and action 10 renews it (default "
                             f"{format_duration(DEFAULT_TOKEN_TTL * 1000)})")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="read the token-signing secret (32 bytes; ours, mode 0600, not a symlink) "
                             "from PATH instead of DIR/secret or, with --redis, the Redis key "
                             "zim:secret; every node of a service needs the same file. Make one with: "
                             "head -c 32 /dev/urandom > PATH && chmod 600 PATH")
    parser.add_argument("--redis", metavar="URL",
                        help="redis://HOST:PORT/DB: be one node of a zim service sharing this Redis (or "
                             "Redis Cluster) for users, messages, mailboxes, presence and pushes; --data "
                             "and --store are then not used (docs/redis.md)")
    parser.add_argument("--metrics", type=_address, default="off", metavar="HOST:PORT",
                        help="serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP on "
                             "this address (default off; docs/deploy.md). Not authenticated: use a "
                             "private address")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings from the command line (``sys.argv[1:]`` if None) and the
    ``--config`` file it names: built-in default < file < flag given. A usage error
    (bad flag, bad file) prints the usage and a message and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)          # the flags checked, and --config found
    if args.config is not None:
        try:
            from_file = load_config(args.config, parser)
        except ConfigError as exc:
            parser.error(str(exc))          # "zim-server: error: FILE: KEY: ...", exit status 2
        # Again, over a namespace holding the file's values: argparse fills in a default
        # only where the namespace has nothing, and a flag on the command line always sets
        # its value, whatever it equals.
        args = parser.parse_args(argv, namespace=argparse.Namespace(**from_file))
    try:
        check_outbuf(args.max_outbuf, args.max_packet)
        if args.max_client_memory not in ("auto", 0) and args.max_client_memory < args.max_outbuf:
            raise ValueError(f"--max-client-memory ({args.max_client_memory}) must be at least "
                             f"--max-outbuf ({args.max_outbuf})")
    except ValueError as exc:
        parser.error(str(exc))          # exit status 2, like every other bad flag
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tcp = None if args.tcp == "off" else args.tcp
    ws = None if args.ws == "off" else args.ws
    try:
        retention = Retention(args.retain_private, args.retain_channel, args.retain_large,
                              args.large_channel, args.prune_every)
        App(store=MemoryStore() if args.store == "memory" else None).run(
            tcp=tcp, ws=ws, workers=args.workers, data=args.data, max_packet=args.max_packet,
            login_timeout=args.login_timeout, idle_timeout=args.idle_timeout, retention=retention,
            user_rate=args.user_rate, channel_rate=args.channel_rate, max_outbuf=args.max_outbuf,
            channel_push=args.channel_push == "on", push_window_ms=args.push_window_ms,
            push_max=args.push_max, ws_deflate=args.ws_deflate == "on", redis=args.redis,
            metrics=None if args.metrics == "off" else args.metrics, max_inflight=args.max_inflight,
            max_client_memory=None if args.max_client_memory == "auto" else args.max_client_memory,
            ws_origins=args.ws_origins, token_ttl=args.token_ttl, secret_file=args.secret_file,
            client_limits=ClientLimits(
                max_conns_per_address=args.max_conns_per_address, max_conns_per_user=args.max_conns_per_user,
                address_login_rate=args.address_login_rate, address_new_user_rate=args.address_new_user_rate,
                address_auth_failure_rate=args.address_auth_failure_rate,
                channel_create_rate=args.channel_create_rate, max_ack_ids=args.max_ack_ids,
                ack_rate=args.ack_rate, read_rate=args.read_rate),
            quotas=Quotas(max_mailbox=args.max_mailbox, max_mailbox_bytes=args.max_mailbox_bytes,
                          max_channels_per_user=args.max_channels_per_user))
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"zim-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
