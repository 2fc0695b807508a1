#!/usr/bin/env python3
"""zim against its peers: channel fan-out and idle memory of zim, redis, NATS and asyncio.

The servers a user would pick instead of zim for pushing messages to many
connections, measured the same way, one after the other, on this machine and on
loopback only:

- zim: ``python -m zim`` with its default flags under ``benchlib.Server`` (one
  worker, the durable SQLite store: every channel message is stored, that is the
  product);
- redis: ``redis-server --save "" --appendonly no`` (nothing stored), pub/sub;
- nats: ``nats-server`` core pub/sub (no JetStream, nothing stored);
- asyncio: ``bench/asyncio_server.py``, the server a Python user would write
  (asyncio.Protocol, one ``transport.write`` per message per subscriber), on
  uvloop when it is installed.

(a) Fan-out. For each N in ``--subscribers-list`` (default 1,000 and 10,000) a
fresh server gets N subscribers of one channel, spread over client processes of
at most ``--per-process`` sockets, and one publisher (in this process) sends M
messages of 100 bytes, with at most ``--window`` unanswered (zim and redis answer
every publish, the asyncio server says OK; NATS answers nothing, so the publisher
sends a PING after every half window and counts the PONGs). M × N deliveries are
expected; the subscribers read big chunks and count bytes (every delivery of a
peer has one exact size; zim's are measured by bench/broadcast.py's sample
connection), and one connection per client process checks its whole stream byte
for byte. Measured over the send phase (first send → last delivery): server CPU
(user + system of the server's process tree, psutil), deliveries per
server-CPU-second, deliveries per second (wall) and loss, which must be 0. The
median of ``--runs`` runs is reported. zim's part is bench/broadcast.py's code.

(b) Idle memory. A fresh server gets ``--idle-connections`` K connections (default
19,000, from one client process: the open-files limit is 20,000 per process),
each doing what is natural for it (zim: log in as a new user; redis: SUBSCRIBE;
NATS: CONNECT and SUB; asyncio: SUB), then ``--settle`` seconds of quiet:
(server RSS after - RSS before) / K. The RSS is summed over the server's process
tree (zim: the server and its store's writer process). Not the same work: zim's
connections join no channel, the peers' subscribe to one. With ``--idle-channels N``
every side does the same work: each connection subscribes to N channels, N - 1
shared ones of ``--idle-channel-size`` members and one of its own (the cuts of
bench/idle_memory.py ``--channels-per-user``; zim logs in, then joins them with
action 3; redis: one SUBSCRIBE; NATS: SUBs; asyncio: SUB lines), at most 1,000
subscriptions in flight. ``--idle-runs`` R repeats the idle test on fresh servers
and reports the median. An empty ``--subscribers-list`` skips the fan-out test.

The clients share the two cores with the servers, so wall rates depend on them;
deliveries per server-CPU-second much less. A peer whose binary is missing is
skipped with a line saying so. ``--write-docs`` writes docs/benchmarks.md and
docs/benchmarks.png (matplotlib).

Example: ``python bench/peers.py --write-docs``;
small: ``--subscribers-list 50 --messages 20 --idle-connections 100 --settle 1 --runs 1``;
idle memory in 12 channels: ``--subscribers-list "" --idle-connections 15000
--idle-channels 12 --idle-runs 3``
"""
from __future__ import annotations

import argparse
import importlib.util
import resource
import shlex
import statistics
import sys
import time

import benchlib
import broadcast  # zim's fan-out: members, publisher, one run
from peers_clients import PeerPublisher, idle_process, peer_run, subscriber_process
from peers_report import millions, ratios, table, write_docs
from peers_servers import PeerServer
from peers_wire import PAYLOAD_SIZE, PEERS, WIRES


# -- the two measurements ---------------------------------------------------------------
def messages_for(subscribers: int, args) -> int:
    """M: ``--messages``, or about 10,000,000 deliveries per run: a second or more of
    server CPU for the fastest peers, so psutil's 10 ms ticks do not matter."""
    return args.messages or max(100, min(20_000, 10_000_000 // subscribers))


def fanout(server: PeerServer, subscribers: int, args) -> dict:
    """The runs of one server with ``subscribers`` subscribers; medians of the runs."""
    messages = messages_for(subscribers, args)
    processes = -(-subscribers // args.per_process)
    base, extra = divmod(subscribers, processes)
    counts = [base + (1 if index < extra else 0) for index in range(processes)]
    tree = server.start()
    publisher = None
    runs: list[dict] = []
    try:
        print(f"== {server.name}: {subscribers:,} subscribers in {processes} client "
              f"process(es), {messages:,} messages of {PAYLOAD_SIZE} B per run, window "
              f"{args.window}; server pid {tree.root.pid}: {shlex.join(server.command())}")
        sys.stdout.flush()
        with benchlib.ClientProcesses() as group:
            setup_start = time.monotonic()
            if server.name == "zim":
                group.start(broadcast.member_process, [
                    (server.port, index * (base + 1), count, 500, args.setup_timeout)
                    for index, count in enumerate(counts)])
            else:
                group.start(subscriber_process, [
                    (server.name, server.port, count, args.setup_timeout) for count in counts])
            ready = 0
            for _, count, failures, failed in group.receive_all(args.setup_timeout + 30,
                                                                "subscribe its connections"):
                ready += count
                for reason in failures:
                    print(f"  setup failure: {reason}")
                if failed:
                    print(f"  {failed} subscriber(s) of one process failed to set up")
            print(f"setup: {ready:,}/{subscribers:,} subscribed in "
                  f"{time.monotonic() - setup_start:.1f} s")
            sys.stdout.flush()
            if ready != subscribers:
                raise RuntimeError(f"{server.name}: not every subscriber could subscribe")
            if server.name == "zim":
                publisher = broadcast.Publisher(server.port, PAYLOAD_SIZE, args.window)
                run_args = argparse.Namespace(messages=messages, run_timeout=args.run_timeout)
            else:
                publisher = PeerPublisher(WIRES[server.name], server.port, args.window,
                                          subscribers)
            for number in range(1, args.runs + 1):
                if server.name == "zim":
                    run = broadcast.one_run(number, run_args, tree, publisher, group.pipes)
                    run["ok"] = (run["loss"] == 0 and run["publish_errors"] == 0
                                 and run["over_members"] == 0 and run["unexpected_packets"] == 0)
                else:
                    run = peer_run(number, server.name, messages, args.run_timeout, tree,
                                   publisher, group.pipes)
                runs.append(run)
                if not server.alive():
                    raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
                if tree.changed():
                    raise RuntimeError(f"a {server.name} process ended or started during a run")
            publisher.close()
            publisher = None
    finally:
        if publisher is not None:
            publisher.close()
        code = server.stop()
    # Bytes of one delivery on the wire: zim's push packet (measured), the peers' frame.
    delivery_bytes = (runs[0]["push_bytes"] if server.name == "zim"
                      else WIRES[server.name].delivery_size) if runs else None
    return {
        "subscribers": subscribers, "messages": messages, "client_processes": processes,
        "delivery_bytes": delivery_bytes,
        "ok": all(r["ok"] for r in runs) and len(runs) == args.runs,
        "loss": sum(r["loss"] for r in runs),
        "deliveries_per_cpu_second": _median(runs, "deliveries_per_cpu_second"),
        "deliveries_per_second": _median(runs, "deliveries_per_second"),
        "server_cpu_seconds": _median(runs, "server_cpu_seconds"),
        "wall_seconds": _median(runs, "wall_seconds"),
        "server_exit_code": code, "runs": runs,
    }


def idle(server: PeerServer, connections: int, args) -> dict:
    """Server RSS growth per idle connection: the median of ``--idle-runs`` runs, each
    on a fresh server (the median run's figures, and every run's)."""
    runs = [idle_run(server, connections, args) for _ in range(args.idle_runs)]
    if len(runs) == 1:
        return runs[0]
    middle = sorted(runs, key=lambda r: r["bytes_per_connection"])[len(runs) // 2]
    return {**middle, "ok": all(r["ok"] for r in runs),
            "bytes_per_connection": statistics.median(r["bytes_per_connection"] for r in runs),
            "runs": runs}


def idle_run(server: PeerServer, connections: int, args) -> dict:
    """One fresh server's RSS growth per idle connection, after ``--settle`` seconds."""
    tree = server.start()
    try:
        time.sleep(0.5)     # let the server finish starting before the baseline
        rss_before = tree.rss()
        fds_before = tree.root.num_fds()
        print(f"== {server.name}: idle memory, {connections:,} connections, "
              f"{args.idle_channels or 'login/one shared'} channel(s) each; server pid "
              f"{tree.root.pid}: {shlex.join(server.command())}; baseline rss "
              f"{rss_before / 2**20:.1f} MiB, {fds_before} fds")
        sys.stdout.flush()
        with benchlib.ClientProcesses() as group:
            started = time.monotonic()
            group.start(idle_process, [(server.name, server.port, connections,
                                        args.setup_timeout, args.idle_channels,
                                        args.idle_channel_size)])
            _, ready, failures, failed, subscriptions = group.receive_all(args.setup_timeout + 30,
                                                           "open its idle connections")[0]
            setup_seconds = time.monotonic() - started
            for reason in failures:
                print(f"  setup failure: {reason}")
            settle_end = time.monotonic() + args.settle
            while server.alive() and time.monotonic() < settle_end:
                time.sleep(min(0.5, max(0.0, settle_end - time.monotonic())))
            if not server.alive():
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
            if tree.changed():
                raise RuntimeError(f"a {server.name} process ended or started during the settle")
            rss_after = tree.rss()
            fds_after = tree.root.num_fds()
    finally:
        code = server.stop()
    per_connection = (rss_after - rss_before) / max(1, ready)
    # Every connection must still be open at the measurement: the server holds its fd.
    ok = (ready == connections and failed == 0 and fds_after - fds_before >= ready
          and subscriptions == ready * args.idle_channels)
    print(f"idle: {ready:,}/{connections:,} connections ({failed} failed) "
          f"in {setup_seconds:.1f} s; "
          f"after {args.settle:g} s: rss {rss_after / 2**20:.1f} MiB "
          f"(+{(rss_after - rss_before) / 2**20:.1f} MiB), fds +{fds_after - fds_before} "
          f"= {per_connection:,.0f} bytes per connection")
    sys.stdout.flush()
    return {
        "ok": ok, "connections": ready, "connections_wanted": connections, "failed": failed,
        "setup_seconds": round(setup_seconds, 2), "settle_seconds": args.settle,
        "rss_before": rss_before, "rss_after": rss_after,
        "bytes_per_connection": round(per_connection, 1),
        "server_fds_before": fds_before, "server_fds_after": fds_after,
        "channels": args.idle_channels, "subscriptions": subscriptions,
        "server_exit_code": code,
    }


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# -- orchestration -------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(PEERS), metavar="A,B",
                        help=f"servers to measure, comma-separated (default {','.join(PEERS)})")
    parser.add_argument("--subscribers-list", default="1000,10000", metavar="N,N",
                        help="fan-out subscriber counts (default 1000,10000)")
    parser.add_argument("--messages", type=int, default=0, metavar="M",
                        help="messages per run (default: about 10,000,000 / N, in 100..20,000)")
    parser.add_argument("--window", type=int, default=64, metavar="N",
                        help="publisher messages in flight (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="fan-out runs; the median is reported")
    parser.add_argument("--per-process", type=int, default=5000, metavar="N",
                        help="subscriber sockets per client process (default 5000)")
    parser.add_argument("--idle-connections", type=int, default=19_000, metavar="K",
                        help="idle connections per server, one client process (default 19000; "
                             "0 skips the idle test)")
    parser.add_argument("--idle-channels", type=int, default=0, metavar="N",
                        help="each idle connection subscribes to N channels (zim: after logging "
                             "in, joins through action 3): N - 1 shared ones of "
                             "--idle-channel-size members and one of its own, as "
                             "bench/idle_memory.py --channels-per-user (default 0: zim logs in "
                             "only, the peers subscribe to one channel shared by all)")
    parser.add_argument("--idle-channel-size", type=int, default=100, metavar="M",
                        help="members of each shared channel of --idle-channels (default 100)")
    parser.add_argument("--idle-runs", type=int, default=1, metavar="R",
                        help="idle runs per server, each on a fresh server; the median is "
                             "reported (default 1)")
    parser.add_argument("--settle", type=float, default=10.0, metavar="S",
                        help="seconds idle before measuring memory (default 10)")
    parser.add_argument("--setup-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed to connect and subscribe (default 120)")
    parser.add_argument("--run-timeout", type=float, default=120.0, metavar="S",
                        help="seconds allowed per run (default 120)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write docs/benchmarks.md and docs/benchmarks.png")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    args.server_names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.server_names) - set(PEERS))
    if unknown or not args.server_names:
        parser.error(f"--servers takes names among {','.join(PEERS)}")
    try:
        args.subscriber_counts = [int(n) for n in args.subscribers_list.split(",") if n.strip()]
    except ValueError:
        parser.error("--subscribers-list takes comma-separated integers, e.g. 1000,10000 "
                     "(empty: no fan-out test)")
    if args.subscriber_counts and min(args.subscriber_counts) < 1:
        parser.error("--subscribers-list needs counts of at least 1")
    if args.idle_channels < 0 or args.idle_channel_size < 1 or args.idle_runs < 1:
        parser.error("--idle-channels must be >= 0, --idle-channel-size and --idle-runs >= 1")
    if min(args.window, args.runs, args.per_process) < 1 or args.messages < 0:
        parser.error("--window, --runs and --per-process must be at least 1, --messages >= 0")
    if args.per_process > 19000 or args.idle_connections > 19000 or args.idle_connections < 0:
        parser.error("--per-process and --idle-connections must fit the open-files limit (19000)")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    return args


def asyncio_loop() -> str:
    """The asyncio server's event loop: uvloop when installed."""
    if importlib.util.find_spec("uvloop") is None:
        return "asyncio default loop (uvloop not installed)"
    import uvloop
    return f"uvloop {uvloop.__version__}"


def run(args: argparse.Namespace, info: dict) -> int:
    benchlib.raise_open_files(resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # servers inherit it
    loop = asyncio_loop()
    print(f"servers {','.join(args.server_names)}; subscribers {args.subscriber_counts}; "
          f"{args.runs} run(s); idle connections {args.idle_connections:,} "
          f"({args.idle_channels} channels each, {args.idle_runs} run(s)); "
          f"asyncio server on {loop}")
    sys.stdout.flush()
    result: dict = {
        "bench": "peers", "subscribers": args.subscriber_counts,
        "messages": {str(n): messages_for(n, args) for n in args.subscriber_counts},
        "runs": args.runs, "window": args.window, "per_process": args.per_process,
        "idle_connections": args.idle_connections, "settle": args.settle,
        "idle_channels": args.idle_channels, "idle_channel_size": args.idle_channel_size,
        "idle_runs": args.idle_runs,
        "payload_bytes": PAYLOAD_SIZE, "machine": info,
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "servers": {},
    }
    ok = True
    for name in args.server_names:
        server = PeerServer(name, loop)
        reason = server.missing()
        if reason is not None:
            print(f"== {name}: SKIPPED: {reason}")
            result["servers"][name] = {"available": False, "skipped": reason}
            continue
        entry = {"available": True, "version": server.version(),
                 "command": server.command(template=True), "fanout": {}, "ok": True}
        result["servers"][name] = entry
        try:
            for count in args.subscriber_counts:
                part = fanout(server, count, args)
                entry["fanout"][str(count)] = part
                print(f"{name} {count:,} subscribers: median "
                      f"{millions(part['deliveries_per_cpu_second'])} deliveries/CPU-s, "
                      f"{millions(part['deliveries_per_second'])} deliveries/s, "
                      f"loss {part['loss']:,} {'OK' if part['ok'] else 'FAILED'}")
                entry["ok"] = entry["ok"] and part["ok"]
            if args.idle_connections:
                entry["idle"] = idle(server, args.idle_connections, args)
                entry["ok"] = entry["ok"] and entry["idle"]["ok"]
        except (RuntimeError, OSError) as exc:
            print(f"== {name}: FAILED: {exc}")
            entry.update(ok=False, error=str(exc))
            server.stop()
        ok = ok and entry["ok"]
    result["ok"] = ok
    lines = table(result)
    print()
    for line in [*lines, "", *ratios(result)]:
        print(line)
    figures = []
    for name, entry in result["servers"].items():
        if not entry["available"]:
            figures.append(f"{name}=skipped")
            continue
        for count, part in entry["fanout"].items():
            rate = part["deliveries_per_cpu_second"]
            figures.append(f"{name}_deliveries_per_cpu_second_{count}="
                           + ("n/a" if rate is None else f"{rate:,.0f}"))
        if entry.get("idle"):
            figures.append(f"{name}_bytes_per_idle_connection="
                           f"{entry['idle']['bytes_per_connection']:,.0f}")
    print(f"RESULT peers {' '.join(figures)} {'OK' if ok else 'FAILED'}")
    sys.stdout.flush()
    if args.write_docs:
        write_docs(result, lines)
    if args.json:
        benchlib.print_json(result)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("peers", "zim against redis, NATS and asyncio: fan-out and "
                             "idle memory", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
