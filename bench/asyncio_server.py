#!/usr/bin/env python3
"""A minimal asyncio pub/sub server: the baseline a Python user would write.

One ``asyncio.Protocol`` object per connection, a dict of channel -> set of
subscribers, and one ``transport.write`` per message per subscriber. It runs on
uvloop when it is installed (``--loop auto``, the default), else on asyncio's
own loop; the first line it prints says which.

The protocol is line-based (a line ends with ``\\n`` and must not contain one):

    SUB <channel>            -> OK           (subscribe this connection)
    UNSUB <channel>          -> OK
    PUB <channel> <payload>  -> OK           (and every other subscriber of the
                                              channel gets  MSG <payload>)
    anything else            -> ERR unknown command

It is used by bench/peers.py as a peer of zim, redis and NATS; it serves loopback
only unless told otherwise.

Example: ``python bench/asyncio_server.py --port 9100``
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

MAX_LINE = 65536        # a client sending a longer line is disconnected


class PubSubProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, channels: dict[bytes, set]) -> None:
        self.channels = channels
        self.subscriptions: set[bytes] = set()
        self.transport: asyncio.Transport | None = None
        self.pending = b""          # a partial line waiting for its end

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_LINE:
            self.transport.close()
            return
        for line in lines:
            self.handle(line)

    def handle(self, line: bytes) -> None:
        command, _, rest = line.partition(b" ")
        if command == b"PUB":
            channel, _, payload = rest.partition(b" ")
            message = b"MSG " + payload + b"\n"
            for subscriber in self.channels.get(channel, ()):
                if subscriber is not self:
                    subscriber.transport.write(message)
            self.transport.write(b"OK\n")
        elif command == b"SUB":
            self.channels.setdefault(rest, set()).add(self)
            self.subscriptions.add(rest)
            self.transport.write(b"OK\n")
        elif command == b"UNSUB":
            self.unsubscribe(rest)
            self.transport.write(b"OK\n")
        else:
            self.transport.write(b"ERR unknown command\n")

    def unsubscribe(self, channel: bytes) -> None:
        self.subscriptions.discard(channel)
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self.channels[channel]

    def connection_lost(self, exc: Exception | None) -> None:
        for channel in list(self.subscriptions):
            self.unsubscribe(channel)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    channels: dict[bytes, set] = {}
    server = await loop.create_server(lambda: PubSubProtocol(channels), host, port,
                                      backlog=4096, reuse_address=True)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="listen port")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop: uvloop, asyncio's default, or uvloop if installed")
    args = parser.parse_args(argv)

    # Many idle connections: take the whole open-files allowance.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    run, loop_name = asyncio.run, "asyncio default loop"
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                print("error: uvloop is not installed", file=sys.stderr)
                return 2
        else:
            run, loop_name = uvloop.run, f"uvloop {uvloop.__version__}"
    print(f"asyncio_server: loop {loop_name}, listening on {args.host}:{args.port}", flush=True)
    run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
