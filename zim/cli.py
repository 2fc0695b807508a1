"""``zim-server``: run the IM server."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from zim.app import DEFAULT_MAX_PACKET, MAX_WORKERS, App, parse_address
from zim.storage.retention import Retention, Tier, parse_tier
from zim.storage.store import MemoryStore


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
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tcp = None if args.tcp == "off" else args.tcp
    ws = None if args.ws == "off" else args.ws
    try:
        retention = Retention(args.retain_private, args.retain_channel, args.retain_large,
                              args.large_channel, args.prune_every)
        App(store=MemoryStore() if args.store == "memory" else None).run(
            tcp=tcp, ws=ws, workers=args.workers, data=args.data, max_packet=args.max_packet,
            login_timeout=args.login_timeout, idle_timeout=args.idle_timeout, retention=retention)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"zim-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
