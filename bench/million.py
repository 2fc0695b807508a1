#!/usr/bin/env python3
"""Hold N logged-in connections on one zim server and measure what it costs.

Starts ``python -m zim --workers W`` (loopback ports, a temporary data directory,
the default durable store), measures the idle baseline (RSS of the whole process
tree: supervisor, workers, writer; and ``Slab`` in /proc/meminfo), then runs
``tools/connflood --login --hold S --probe`` with N connections from P processes
and samples the tree's RSS and Slab every 2 s while it runs. Reported:

- server RSS per connection = (peak tree RSS - baseline) / connections logged in;
- kernel Slab per connection (both ends of each loopback connection are on this
  machine, so it counts two sockets), from the peak Slab;
- connflood's connect rate, failures by kind, and its probe: the round trip of
  a private message between two extra clients and a channel message to a
  sample of the held connections, measured during the hold;
- the CPU time the server tree and connflood's processes spent while the
  connections were being opened (sampled every 2 s): which side the connect
  rate was waiting on.

Needs ``net.ipv4.ip_local_port_range`` wide (set to 1024 65535 while it runs, as
root, and put back after) and N / 19,000 workers and client processes at least (20,000 open files per
process). Example: ``python bench/million.py --connections 1000000 --workers 64
--processes 56 --hold 60``; small: ``--connections 20000 --workers 4 --processes 2 --hold 5``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

CONNFLOOD = os.path.join(benchlib.REPO_ROOT, "tools", "connflood")


PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def set_port_range(value: str) -> str | None:
    """Set the ephemeral port range; returns the old one (None if it cannot)."""
    try:
        with open(PORT_RANGE) as ports:
            old = ports.read().strip()
        with open(PORT_RANGE, "w") as ports:
            ports.write(value)
        return old
    except OSError as exc:
        print(f"note: cannot set ip_local_port_range ({exc}); source addresses still spread the load")
        return None


def flood_cpu(pid: int) -> benchlib.CPUTimes:
    """CPU of connflood and its client processes so far (0 once gone)."""
    try:
        return benchlib.ProcessTree(psutil.Process(pid)).cpu_times()
    except psutil.Error:
        return benchlib.CPUTimes(0.0, 0.0)


def run(args, info: dict) -> int:
    # wide while the bench runs, then back: a wide range lets ephemeral ports take
    # the fixed ports other programs (and tests) listen on
    old_range = set_port_range("1024 65535")
    try:
        return measure(args, info)
    finally:
        if old_range:
            set_port_range(old_range)


def measure(args, info: dict) -> int:
    server = benchlib.Server(extra_args=["--idle-timeout", "600", *args.server_args.split()],
                             workers=args.workers)
    with server:
        root = server.start(timeout=120)
        tree = benchlib.ProcessTree(root)
        time.sleep(2.0)
        rss_before = tree.rss()
        each_before = {p.pid: p.memory_info().rss for p in tree.processes}
        slab_before = benchlib.meminfo_kib("Slab") * 1024
        print(f"server: {args.workers} workers + supervisor + writer, baseline rss "
              f"{rss_before / 2**20:.1f} MiB, slab {slab_before / 2**20:.0f} MiB", flush=True)
        command = [sys.executable, CONNFLOOD, "--port", str(server.tcp_port), "--connections",
                   str(args.connections), "--processes", str(args.processes), "--login",
                   "--hold", str(args.hold), "--heartbeat", str(args.heartbeat), "--probe",
                   "--probe-sample", str(args.probe_sample), "--json"]
        print("running:", " ".join(command), flush=True)
        flood = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        # (seconds, server CPU, connflood CPU)
        cpu_samples = [(0.0, tree.cpu_times(), benchlib.CPUTimes(0.0, 0.0))]
        peak_rss, peak_slab = rss_before, slab_before
        peak_each = dict(each_before)
        deadline = time.monotonic() + args.timeout
        while flood.poll() is None and time.monotonic() < deadline:
            time.sleep(2.0)
            cpu_samples.append((time.monotonic() - started, tree.cpu_times(), flood_cpu(flood.pid)))
            if tree.changed():
                flood.kill()
                raise RuntimeError(f"a server process ended during the run:\n{server.log_tail()}")
            rss_now = tree.rss()
            if rss_now > peak_rss:
                peak_rss = rss_now
                peak_each = {p.pid: p.memory_info().rss for p in tree.processes}
            peak_slab = max(peak_slab, benchlib.meminfo_kib("Slab") * 1024)
        if flood.poll() is None:
            flood.kill()
            raise RuntimeError("connflood did not finish in time")
        output = flood.stdout.read()
        print(output, end="")
        result = json.loads(output.strip().splitlines()[-1])
        logged_in = result["logged_in"]
        kinds: dict[str, int] = {}
        for process in tree.processes:
            command = process.cmdline()
            kind = "writer" if "zim.storage.writer" in command else "workers" if "zim.worker" in command \
                else "supervisor"
            kinds[kind] = kinds.get(kind, 0) + peak_each.get(process.pid, 0) - each_before[process.pid]
        print("rss growth per connection by part: " + ", ".join(
            f"{kind} {growth / max(1, logged_in):.0f} B" for kind, growth in sorted(kinds.items())))
        per_conn = (peak_rss - rss_before) / max(1, logged_in)
        # the last sample inside the connect phase
        until, server_end, flood_end = max((s for s in cpu_samples if s[0] <= result["seconds"] + 1.0),
                                           key=lambda s: s[0])
        server_start = cpu_samples[0][1]
        phase = {"seconds": until,
                 "server_user": server_end.user - server_start.user,
                 "server_system": server_end.system - server_start.system,
                 "connflood_user": flood_end.user, "connflood_system": flood_end.system}
        if until:
            server_cpu = phase["server_user"] + phase["server_system"]
            flood_total = flood_end.user + flood_end.system
            print(f"connect phase, first {until:.0f} s: server CPU {server_cpu:.1f} s "
                  f"({server_cpu / until:.2f} cores; user {phase['server_user']:.1f} + system "
                  f"{phase['server_system']:.1f}), connflood CPU {flood_total:.1f} s "
                  f"({flood_total / until:.2f} cores; user {flood_end.user:.1f} + system "
                  f"{flood_end.system:.1f}), of {psutil.cpu_count()} cores")
        slab_per_conn = (peak_slab - slab_before) / max(1, logged_in)
        dm = result["probe"].get("dm", {})
        broadcast = result["probe"].get("broadcast", {})
        print(f"RESULT million connections={logged_in} failed={result['failed']} "
              f"connect_seconds={result['seconds']} connect_rate={result['connect_rate']} "
              f"server_rss_bytes_per_connection={per_conn:.0f} (target 256) "
              f"kernel_slab_bytes_per_connection={slab_per_conn:.0f} (both ends) "
              f"dm_round_trip_p50_ms={dm.get('p50_ms')} dm_round_trip_p99_ms={dm.get('p99_ms')} (target < 50) "
              f"broadcast_delivered={broadcast.get('delivered')}/{broadcast.get('expected')} "
              f"broadcast_p99_ms={broadcast.get('p99_ms')}")
        if args.json:
            benchlib.print_json({"bench": "million", "ok": result["failed"] == 0, "machine": info,
                                 "workers": args.workers, "baseline_rss": rss_before, "peak_rss": peak_rss,
                                 "rss_bytes_per_connection": per_conn,
                                 "slab_bytes_per_connection": slab_per_conn,
                                 "connect_phase_cpu": phase,
                                 "connflood": result})
        return 0 if result["failed"] == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=56, help="connflood client processes")
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--heartbeat", type=float, default=100.0)
    parser.add_argument("--probe-sample", type=int, default=1000)
    parser.add_argument("--server-args", default="", help="more zim-server flags")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    return benchlib.run_main("million", "zim: N logged-in connections held on one machine", args, run)


if __name__ == "__main__":
    sys.exit(main())
