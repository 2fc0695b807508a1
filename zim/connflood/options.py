"""connflood's command line, and the constants its processes share."""
from __future__ import annotations

import argparse
import ipaddress
import socket

PER_PROCESS_MAX = 19_000
IP_BIND_ADDRESS_NO_PORT = 24
PROBE_CHANNEL = "connflood-probe"
STAMP_DIGITS = 20
REPORT_EVERY = 0.5          # seconds between a client process's running totals
PROBE_GRACE = 60.0          # seconds the probe may outlast --hold
AFTER_PROBE = 1.0           # seconds held at least after the probe ends

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNACCOUNTED = 0, 1, 2, 3
DESCRIPTION = "connflood: open, log in and hold many zim connections (C10M-style load)."


def fault(text: str) -> tuple[int, int, str]:
    index, count, action = text.split(":", 2)
    if action not in ("kill", "stop", "hold-stop") and not action.startswith("pause:"):
        raise argparse.ArgumentTypeError(f"unknown fault action {action!r}")
    return int(index), int(count), action


def channel_sizes(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        sizes = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MIN:MAX members, not {text!r}") from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, not {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="connflood", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--processes", type=int, default=0, help="default: connections / 19,000, rounded up")
    parser.add_argument("--ws", action="store_true", help="WebSocket (the port is zim's WebSocket port)")
    parser.add_argument("--login", action="store_true", help="log every connection in (action 1)")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to hold the connections")
    parser.add_argument("--rate", type=float, default=0.0, help="new connections per second in all (0: no limit)")
    parser.add_argument("--inflight", type=int, default=500, help="unfinished connects+logins per process")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between a connection's heartbeats")
    parser.add_argument("--connect-timeout", type=float, default=600.0,
                        help="seconds a process may take to set up its connections")
    parser.add_argument("--report-timeout", type=float, default=60.0,
                        help="seconds a client process may stay silent (no report) before it counts as hung")
    parser.add_argument("--channels-per-user", type=int, default=0,
                        help="channels each connection joins after its login (needs --login)")
    parser.add_argument("--channel-sizes", type=channel_sizes, default=(50, 5000), metavar="MIN:MAX",
                        help="members of the smallest and the largest of those channels (default 50:5000)")
    parser.add_argument("--probe", action="store_true", help="measure DM round trips and a broadcast while holding")
    parser.add_argument("--probe-sample", type=int, default=1000)
    parser.add_argument("--probe-round-trips", type=int, default=200)
    parser.add_argument("--probe-messages", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    # tests: make client process K fail once M of its connections are set up
    parser.add_argument("--test-fault", type=fault, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    address = ipaddress.ip_address(socket.gethostbyname(args.host))
    if not address.is_loopback:
        parser.error("only loopback targets (127.0.0.0/8) are allowed")
    if args.connections < 1 or args.hold < 0 or args.rate < 0 or args.inflight < 1 or args.report_timeout <= 0:
        parser.error("connections and inflight must be >= 1, hold and rate >= 0, report-timeout > 0")
    if args.channels_per_user < 0 or (args.channels_per_user and not args.login):
        parser.error("--channels-per-user must be >= 0, and needs --login")
    if not args.processes:
        args.processes = -(-args.connections // PER_PROCESS_MAX)
    if args.processes < 1:
        parser.error("processes must be >= 1")
    if args.connections / args.processes > PER_PROCESS_MAX:
        parser.error(f"at most {PER_PROCESS_MAX} connections per process: use --processes "
                     f"{-(-args.connections // PER_PROCESS_MAX)} or more")
    if not args.probe:
        args.probe_sample = 0
    return args

