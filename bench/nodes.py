#!/usr/bin/env python3
"""Multi-node mode: cross-node private messages and channel fan-out, one node vs two.

For each node count N of ``--setups`` (default ``1,2``) this starts a fresh Redis
(``zim.testing.redis.LocalRedis``, a free loopback port, a temporary directory,
``--appendonly yes --appendfsync always``: the setting docs/redis.md asks for
when nothing acknowledged may be lost; ``--cluster``: a 3-master Redis
Cluster formed with ``redis-cli --cluster create`` instead) and N zim servers
on it (``python -m zim --redis URL --workers W``, ``--workers`` W, default 1),
then measures two things, exactly as ``workers.py`` does (its code is reused):

(a) Private messages. 2P clients (``--pairs`` P, default 100) log in as new
users, spread evenly over the nodes by port: with two nodes, every pair has one
user on node A and its partner on node B, so every message crosses nodes (the
sender's node publishes it to the partner's node inbox); with one node both are
on it. Every client sends ``--dm-messages`` private messages to its partner,
pipelined with up to ``--dm-window`` unanswered. Counted over the wall time
(first send -> last packet): acked DMs/s, pushes received/s, loss (every message
must reach the partner exactly once; pushes across nodes are at-most-once if
Redis hiccups, so it is reported, expected 0), send-to-receipt latency p50/p99
(the content starts with the send time, CLOCK_MONOTONIC ns, system-wide), and
DMs per server-CPU-second.

(b) Channel fan-out (``broadcast.py``'s members, publisher and run): ``--members``
K (default 2,000) subscribe to one channel, split evenly over the nodes; one
publisher on node A sends ``--messages`` M (default 200) with at most
``--window`` unanswered. Every node with members fans each message out locally
(SPUBLISH once per message). Deliveries/s (wall), loss (M x K expected),
latency p50/p99 and deliveries per server-CPU-second.

Server CPU = user + system of every node's process tree plus the redis-server
process(es) (with their reaped helpers), read over the send phase only;
redis-server's share is printed separately. Then the ratio last setup / first
setup of each figure. ``--runs`` (default 3) runs per phase, medians printed.
The exit code reflects correctness only: no loss, no error answers, no node
restarted or failing to stop cleanly.

The clients, the nodes and Redis share the machine's cores: wall-clock rates
depend on them, per-CPU-second figures much less.

Example: ``python bench/nodes.py --json``; small: ``--pairs 20 --members 200 --runs 1``
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import psutil

import benchlib
import broadcast  # the fan-out members, publisher and one run
import workers  # the private-message clients, pairing and run summary
from zim.testing.redis import DURABLE_ARGS, LocalCluster, LocalRedis

CLUSTER_MASTERS = 3
MIN_CLIENT_PROCESSES = 2              # the same number of client processes whatever N is
NODE_NAMES = "ABCDEFGH"               # node A, B, ... (--setups allows up to 8)
MIN_PRECISE_CPU_S = 1.0               # below this, CPU read in 10 ms ticks is rough

FIGURES = (   # (phase, key, label) of the table and the ratios
    ("dm", "responses_per_second", "dm acked/s (wall)"),
    ("dm", "pushes_per_second", "dm pushes received/s (wall)"),
    ("dm", "responses_per_cpu_second", "dm per server-CPU-s (nodes+redis)"),
    ("dm", "node_rate_per_cpu_second", "dm per node-CPU-s (redis excluded)"),
    ("dm", "redis_cpu_share", "dm redis share of server CPU"),
    ("dm", "latency_p50_ms", "dm latency p50 ms"),
    ("dm", "latency_p99_ms", "dm latency p99 ms"),
    ("broadcast", "deliveries_per_second", "fan-out deliveries/s (wall)"),
    ("broadcast", "deliveries_per_cpu_second", "fan-out per server-CPU-s (nodes+redis)"),
    ("broadcast", "node_rate_per_cpu_second", "fan-out per node-CPU-s (redis excluded)"),
    ("broadcast", "redis_cpu_share", "fan-out redis share of server CPU"),
    ("broadcast", "latency_p50_ms", "fan-out latency p50 ms"),
    ("broadcast", "latency_p99_ms", "fan-out latency p99 ms"),
)


# -- Redis -------------------------------------------------------------------------
class RedisService:
    """A fresh redis-server (or ``--cluster``: 3 masters, no replicas) with the AOF on,
    on free loopback ports; ``url`` is what the nodes get, ``stop()`` removes it all."""

    def __init__(self, cluster: bool) -> None:
        self.cluster = cluster
        self.servers: list[LocalRedis] = []

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> "RedisService":
        if self.cluster:
            self.servers = LocalCluster(CLUSTER_MASTERS, DURABLE_ARGS).start().servers
        else:
            self.servers = [LocalRedis(extra_args=DURABLE_ARGS).start()]
        return self

    def persistence(self) -> dict:
        """AOF rewrites done so far and the AOF's size, summed over the servers
        (INFO persistence): a rewrite forks redis-server and competes for the cores."""
        import redis as redis_py

        totals = {"aof_rewrites": 0, "aof_current_size": 0, "aof_rewrite_in_progress": 0}
        for server in self.servers:
            client = redis_py.Redis(host=server.host, port=server.port, socket_timeout=5)
            try:
                info = client.info("persistence")
            finally:
                client.close()
            for key in totals:
                totals[key] += int(info.get(key, 0))
        return totals

    def trees(self) -> list[benchlib.ForkingProcess]:
        return [benchlib.ForkingProcess(psutil.Process(server.pid())) for server in self.servers]

    def describe(self) -> str:
        kind = f"{len(self.servers)}-master cluster" if self.cluster else "redis-server"
        return f"{kind} {self.url} {' '.join(DURABLE_ARGS)}"

    def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []


# -- spreading clients over the nodes --------------------------------------------------
def spread(total: int, nodes: int, per_process: int) -> list[tuple[int, int, int]]:
    """Client processes for ``total`` clients split evenly over ``nodes``:
    (node, first client number, count) each; every node gets at least one process,
    all get ``MIN_CLIENT_PROCESSES`` at least, none more than ``per_process`` clients."""
    processes = []
    first = 0
    for node in range(nodes):
        on_node = total // nodes + (1 if node < total % nodes else 0)
        count = max(1, -(-MIN_CLIENT_PROCESSES // nodes), -(-on_node // per_process))
        for index in range(count):
            share = on_node // count + (1 if index < on_node % count else 0)
            processes.append((node, first, share))
            first += share
    return processes


def with_cpu_split(run: dict, group: benchlib.ProcessGroup, redis: RedisService, phase: str,
                   count: int) -> dict:
    """Add to a run the server CPU of the last interval by part (redis's share, the
    rate per node-CPU-second, redis excluded) and Redis's AOF rewrites so far."""
    parts = group.last_interval()
    total = sum(parts.values())
    run["node_cpu_seconds"] = round(parts["nodes"], 4)
    run["redis_cpu_seconds"] = round(parts["redis"], 4)
    run["redis_cpu_share"] = round(parts["redis"] / total, 3) if total > 0 else None
    run["node_rate_per_cpu_second"] = round(count / parts["nodes"]) if parts["nodes"] > 0 else None
    run["redis_persistence"] = redis.persistence()
    print(f"  {phase}: server CPU {total:.3f} s = nodes {parts['nodes']:.3f} s + redis-server "
          f"{parts['redis']:.3f} s (redis share {run['redis_cpu_share']}); per node-CPU-s (redis "
          f"excluded) {workers._rate(run['node_rate_per_cpu_second'])}; AOF rewrites so far "
          f"{run['redis_persistence']['aof_rewrites']}, AOF "
          f"{run['redis_persistence']['aof_current_size'] / 2**20:.0f} MiB")
    if total < MIN_PRECISE_CPU_S:
        print(f"  note: only {total:.2f} s of server CPU, read in 10 ms ticks per process: this "
              f"run's per-CPU figures are rough (more --messages / --dm-messages make them firmer)")
    sys.stdout.flush()
    return run


def over_runs(runs: list[dict], *rates: str) -> dict:
    """workers.py's medians, loss and ok, plus the medians of the CPU split."""
    return {**workers._over_runs(runs, *rates, "node_rate_per_cpu_second"),
            "redis_cpu_share": workers._median(runs, "redis_cpu_share")}


# -- the two phases ---------------------------------------------------------------------
def dm_phase(args, servers: list[benchlib.Server], group: benchlib.ProcessGroup,
             redis: RedisService) -> dict:
    plan = spread(2 * args.pairs, len(servers), max(1, -(-2 * args.pairs // args.dm_processes)))
    with benchlib.ClientProcesses() as clients:
        clients.start(workers.dm_process, [(servers[node].tcp_port, first, count, args.setup_timeout)
                                           for node, first, count in plan])
        ready = clients.receive_all(args.setup_timeout + 30, "log its clients in")
        located = []          # (local port, user id, node)
        for (node, _, _), (_, logged_in, failures, failed) in zip(plan, ready):
            located += [(port, user, node) for port, user in logged_in]
            for reason in failures:
                print(f"  dm setup failure: {reason}")
            if failed:
                print(f"  {failed} dm client(s) of one process failed to log in")
        if len(located) != 2 * args.pairs:
            raise RuntimeError(f"only {len(located)}/{2 * args.pairs} dm clients logged in")
        partners, cross = workers.pair_across_workers(located)
        for pipe, (_, logged_in, _, _) in zip(clients.pipes, ready):
            pipe.send(("partners", [partners[user] for _, user in logged_in]))
        split = [sum(1 for c in located if c[2] == node) for node in range(len(servers))]
        print(f"dm: {len(located)} clients in {len(plan)} process(es), per node {split}; "
              f"{args.pairs} pairs, {cross} cross-node; {args.dm_messages} messages of "
              f"{args.content_size} B per client per run, window {args.dm_window}")
        sys.stdout.flush()
        runs = []
        for number in range(1, args.runs + 1):
            clients.send_all(("run", args.dm_messages, args.dm_window, args.content_size, args.run_timeout))
            if any(message[0] != "armed" for message in clients.receive_all(30, "arm its dm run")):
                raise RuntimeError("a dm process did not arm its run")
            before = group.cpu_times()
            start_ns = time.monotonic_ns()
            clients.send_all(("go",))
            results = [m[1] for m in clients.receive_all(args.run_timeout + 30, "finish its dm run")]
            after = group.cpu_times()
            if group.changed():
                raise RuntimeError("a node or redis-server ended or restarted during the dm run")
            run = workers._dm_summary(number, args, results, start_ns, before, after, cross)
            runs.append(with_cpu_split(run, group, redis, "dm", run["responses"]))
    return {"clients": len(located), "pairs": args.pairs, "cross_node_pairs": cross,
            "per_node": split, "client_processes": len(plan),
            "messages_per_client": args.dm_messages, "window": args.dm_window, "runs": runs,
            **over_runs(runs, "responses_per_second", "pushes_per_second", "responses_per_cpu_second")}


def broadcast_phase(args, servers: list[benchlib.Server], group: benchlib.ProcessGroup,
                    redis: RedisService) -> dict:
    plan = spread(args.members, len(servers), args.per_process)
    publisher = None
    with benchlib.ClientProcesses() as members:
        setup_start = time.monotonic()
        members.start(broadcast.member_process, [(servers[node].tcp_port, first, count, 500,
                                                  args.setup_timeout) for node, first, count in plan])
        ready = 0
        split = [0] * len(servers)
        for (node, _, _), (_, count, failures, failed) in zip(
                plan, members.receive_all(args.setup_timeout + 30, "subscribe its members")):
            ready += count
            split[node] += count
            for reason in failures:
                print(f"  setup failure: {reason}")
            if failed:
                print(f"  {failed} member(s) of one process failed to set up")
        print(f"broadcast: {ready}/{args.members} members in {len(plan)} client processes "
              f"subscribed in {time.monotonic() - setup_start:.1f} s, per node {split}; publisher "
              f"on node A; {args.messages} messages of {args.content_size} B per run, window {args.window}")
        sys.stdout.flush()
        if ready != args.members:
            raise RuntimeError("not every member could subscribe")
        runs = []
        try:
            publisher = broadcast.Publisher(servers[0].tcp_port, args.content_size, args.window)
            for number in range(1, args.runs + 1):
                run = broadcast.one_run(number, args, group, publisher, members.pipes)
                if group.changed():
                    raise RuntimeError("a node or redis-server ended or restarted during the broadcast run")
                run["ok"] = (run["loss"] == 0 and run["publish_errors"] == 0
                             and run["over_members"] == 0 and run["unexpected_packets"] == 0)
                runs.append(with_cpu_split(run, group, redis, "broadcast", run["delivered"]))
        finally:
            if publisher is not None:
                publisher.close()
    return {"members": args.members, "per_node": split, "client_processes": len(plan),
            "messages": args.messages, "window": args.window, "runs": runs,
            **over_runs(runs, "deliveries_per_second", "deliveries_per_cpu_second")}


# -- one setup ----------------------------------------------------------------------------
def measure(args, nodes: int) -> dict:
    redis = RedisService(args.cluster)
    servers = [benchlib.Server(extra_args=shlex.split(args.server_args), workers=args.workers)
               for _ in range(nodes)]
    codes: list[int | None] = []
    failed = True           # until both phases ran without loss or error
    try:
        redis.start()
        for server in servers:
            server.redis = redis.url
        roots = [server.start() for server in servers]
        group = benchlib.ProcessGroup({"nodes": [benchlib.ProcessTree(root) for root in roots],
                                       "redis": redis.trees()})
        print(f"== nodes={nodes}: {redis.describe()}")
        for name, server, root in zip(NODE_NAMES, servers, roots):
            print(f"   node {name}: pid {root.pid}: {shlex.join(server.command)}")
        sys.stdout.flush()
        dm = dm_phase(args, servers, group, redis)
        fanout = broadcast_phase(args, servers, group, redis)
        rss = group.rss()
        if not all(server.alive() for server in servers):
            raise RuntimeError("a node died")
        failed = not (dm["ok"] and fanout["ok"])
    finally:
        if failed:      # what the nodes said, before stop() removes their logs
            for name, server in zip(NODE_NAMES, servers):
                if server.process is not None:
                    print(f"-- node {name} log tail:\n{server.log_tail(2000)}")
            sys.stdout.flush()
        codes = [server.stop() for server in servers]
        redis.stop()
    result = {"nodes": nodes, "workers": args.workers, "dm": dm, "broadcast": fanout,
              "server_exit_codes": codes, "server_rss_after": rss,
              "server_commands": [server.command for server in servers]}
    result["ok"] = dm["ok"] and fanout["ok"] and all(code == 0 for code in codes)
    print(f"RESULT nodes N={nodes} W={args.workers} "
          + " ".join(f"{phase}_{key}={value(result[phase][key])}" for phase, key, _ in FIGURES)
          + f" dm_loss={dm['loss']} broadcast_loss={fanout['loss']} "
          f"server_exit_codes={codes} {'OK' if result['ok'] else 'FAILED'}")
    sys.stdout.flush()
    return result


def value(number: float | None) -> str:
    if number is None:
        return "n/a"
    return f"{number:.3f}" if abs(number) < 100 else f"{number:.0f}"


def ratio(top: float | None, bottom: float | None) -> float | None:
    return workers._round(top / bottom) if top is not None and bottom else None


def table(measured: list[dict]) -> dict[str, dict[str, float | None]]:
    """Print the medians of every setup and the ratios to the first; returns the ratios."""
    base = measured[0]
    heads = [f"N={m['nodes']}" for m in measured] + [f"N={m['nodes']}/N={base['nodes']}"
                                                     for m in measured[1:]]
    print(f"{'median of ' + str(len(base['dm']['runs'])) + ' run(s)':<42}"
          + "".join(f"{head:>14}" for head in heads))
    ratios: dict[str, dict[str, float | None]] = {str(m["nodes"]): {} for m in measured[1:]}
    for phase, key, label in FIGURES:
        cells = [value(m[phase][key]) for m in measured]
        for m in measured[1:]:
            ratios[str(m["nodes"])][f"{phase}_{key}"] = ratio(m[phase][key], base[phase][key])
            cells.append(value(ratios[str(m["nodes"])][f"{phase}_{key}"]))
        print(f"{label:<42}" + "".join(f"{cell:>14}" for cell in cells))
    print("server CPU = every node's process tree + redis-server (with its reaped helpers), "
          "over the send phase")
    sys.stdout.flush()
    return ratios


# -- orchestration -------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="1,2", metavar="N,N",
                        help="node counts to measure, comma-separated; the first is the baseline "
                             "of the ratios (default 1,2)")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="--workers of every node (default 1)")
    parser.add_argument("--cluster", action="store_true",
                        help="a 3-master Redis Cluster instead of one redis-server")
    workers.add_dm_args(parser, 200)
    broadcast.add_fanout_args(parser, 2000)
    for action in parser._actions:
        if action.dest == "messages":
            action.default, action.help = 200, "channel messages per run (default 200)"
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help="extra zim-server flags for every node, one string")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args(argv)
    try:
        args.node_counts = [int(n) for n in args.setups.split(",") if n.strip()]
    except ValueError:
        parser.error("--setups takes comma-separated integers, e.g. 1,2")
    if not args.node_counts or not all(1 <= n <= 8 for n in args.node_counts):
        parser.error("--setups needs node counts from 1 to 8")
    if len(set(args.node_counts)) != len(args.node_counts):
        parser.error("--setups names a node count twice")
    if min(args.workers, args.pairs, args.dm_messages, args.dm_window, args.dm_processes,
           args.members, args.messages, args.window, args.runs, args.per_process) < 1:
        parser.error("counts, windows and --runs must be at least 1")
    if not broadcast.STAMP_DIGITS <= args.content_size <= 60000:
        parser.error(f"--content-size must be in {broadcast.STAMP_DIGITS}..60000")
    if args.per_process > 19000 or 2 * args.pairs > 19000 * args.dm_processes:
        parser.error("too many sockets per client process for the open-files limit")
    return args


def run(args: argparse.Namespace, info: dict) -> int:
    print(f"node counts {args.node_counts}, {args.workers} worker(s) each, "
          f"{'a 3-master cluster' if args.cluster else 'one redis-server'} per setup; dm: {args.pairs} "
          f"pairs; broadcast: {args.members} members; {args.runs} run(s) each")
    sys.stdout.flush()
    measured = [measure(args, nodes) for nodes in args.node_counts]
    ratios = table(measured)
    ok = all(m["ok"] for m in measured)
    if args.json:
        benchlib.print_json({
            "bench": "nodes", "ok": ok, "setups": args.node_counts, "workers": args.workers,
            "cluster": args.cluster, "redis_args": list(DURABLE_ARGS),
            "baseline_nodes": measured[0]["nodes"], "results": {str(m["nodes"]): m for m in measured},
            "ratios": ratios, "pairs": args.pairs, "dm_messages": args.dm_messages,
            "dm_window": args.dm_window, "members": args.members, "messages": args.messages,
            "window": args.window, "content_size": args.content_size, "runs": args.runs,
            "machine": info,
        })
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return benchlib.run_main("nodes", "zim multi-node: cross-node private messages and channel "
                             "fan-out, one node vs two", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
