"""``zim-server``: run the IM server.

The flags are the server options of ``zim.options`` (one entry each: flag, type,
default, help), with three of the command line's own: ``--config`` (a TOML file
of them, ``zim.config``), ``--log-level``, and ``--help``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from zim.app import App
from zim.config import ConfigError, load_config
from zim.options import OPTIONS, Options, address_text

# the --tcp/--ws/--metrics flags' type, for parsers built on this one
_address = address_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zim-server",
        description="zim instant-messaging server (TCP and WebSocket, one wire format).",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="read settings from a TOML file: its keys are these flags without the "
                             "leading dashes (workers = 4, max-outbuf = \"8MiB\", channel-push = false); "
                             "a flag given on the command line overrides the file")
    for option in OPTIONS:
        parser.add_argument(option.flag, type=option.parse, choices=option.choices, metavar=option.metavar,
                            default=option.flag_default_value(), help=option.help)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def read_command_line(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    """The settings from the command line (``sys.argv[1:]`` if None) and the
    ``--config`` file it names: built-in default < file < flag given; and the
    server options they make. A usage error (bad flag, bad file, options that do
    not go together) prints the usage and a message and exits with status 2."""
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
        options = Options.from_flags(args)
    except ValueError as exc:
        parser.error(str(exc))          # exit status 2, like every other bad flag
    return args, options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags as parsed (``read_command_line``'s first half)."""
    return read_command_line(argv)[0]


def main(argv: list[str] | None = None) -> int:
    args, options = read_command_line(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        App().run_with(options)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"zim-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
