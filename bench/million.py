#!/usr/bin/env python3
"""Hold N logged-in connections on one zim server and measure what it costs.

Starts ``python -m zim --workers W --metrics 127.0.0.1:PORT`` (otherwise the
default server flags; loopback ports, a temporary data directory, the default
durable store), measures the idle baseline (RSS of the whole process tree:
supervisor, workers, writer; and ``Slab`` in /proc/meminfo), then runs
connflood (``python -m zim.connflood``, what ``tools/connflood`` runs)
``--login --hold S --probe`` with N connections from P processes and samples
the tree's RSS and Slab every 2 s while it runs. During the hold it scrapes the
server's ``/metrics`` (Prometheus text): the connections it holds by
transport, how many are logged in, and every close by reason since connflood
started. Reported:

- server RSS per connection = (peak tree RSS - baseline) / connections logged in;
- kernel Slab per connection (both ends of each loopback connection are on this
  machine, so it counts two sockets), from the peak Slab;
- connflood's connect rate, its accounting (connected + failed + unaccounted =
  N), failures by kind, and its probe: the round trip of a private message
  between two extra clients and a channel message to a sample of the held
  connections, measured during the hold;
- what the server holds during the hold next to connflood's figures: they must
  match (connections and logins = connflood's open connections), and the
  server must have closed none (closes other than ``peer``); a mismatch is
  printed as such and fails the run;
- the CPU time the server tree and connflood's processes spent while the
  connections were being opened (sampled every 2 s): which side the connect
  rate was waiting on.

``--channels-per-user N`` makes it a realistic million: every connection, once
logged in, joins N channels of mixed sizes (connflood's ``--channels-per-user``
and ``--channel-sizes``, 50 to 5,000 members by default: see
zim/connflood/channels.py), all N joins pipelined. The RSS per connection then
counts the user all in: connection, login and memberships; the run fails unless
every join was answered OK. Example: ``python bench/million.py --connections
1000000 --workers 56 --processes 56 --hold 60 --channels-per-user 20``.

The ephemeral port range is left as it is (printed): connflood binds each
socket to its own 127.x.y.z source address and lets the kernel pick the port,
so the stock ``32768 60999`` serves a million connections (see
zim/connflood.py). It needs N / 19,000 workers and client processes at least
(20,000 open files per process), and a server with ``--metrics``. Example:
``python bench/million.py --connections 1000000 --workers 64 --processes 56
--hold 60``; small: ``--connections 20000 --workers 4 --processes 2 --hold 5``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

import benchlib

PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
SCRAPE_EVERY = 2.0      # seconds between /metrics scrapes during the hold
CLIENT_CLOSE = "peer"   # the one close reason that is not the server's doing


def port_range() -> str:
    try:
        with open(PORT_RANGE) as ports:
            return " ".join(ports.read().split())
    except OSError as exc:
        return f"unknown ({exc})"


def flood_cpu(pid: int) -> benchlib.CPUTimes:
    """CPU of connflood and its client processes so far (0 once gone)."""
    try:
        return benchlib.ProcessTree(psutil.Process(pid)).cpu_times()
    except psutil.Error:
        return benchlib.CPUTimes(0.0, 0.0)


# -- the server's /metrics ------------------------------------------------------------
def parse_metrics(text: str) -> dict:
    """The few families million.py reads, summed over whatever other labels they carry:
    {"connections": {transport: n}, "logged_in": n, "closed": {reason: n}}."""
    figures: dict = {"connections": {}, "logged_in": 0, "closed": {}}
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = int(sample.value)
            if sample.name == "zim_connections":
                transport = sample.labels.get("transport", "")
                figures["connections"][transport] = figures["connections"].get(transport, 0) + value
            elif sample.name == "zim_connections_logged_in":
                figures["logged_in"] += value
            elif sample.name == "zim_connections_closed_total":
                reason = sample.labels.get("reason", "")
                figures["closed"][reason] = figures["closed"].get(reason, 0) + value
            else:
                continue
            seen.add(sample.name)
    missing = {"zim_connections", "zim_connections_logged_in"} - seen
    if missing:
        raise RuntimeError(f"the server's /metrics has no {', '.join(sorted(missing))}")
    return figures


def scrape(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=15) as answer:
            return parse_metrics(answer.read().decode())
    except OSError as exc:
        raise RuntimeError(f"cannot scrape {url}: {exc}") from None


def closed_since(now: dict, before: dict) -> dict:
    closed = {reason: count - before["closed"].get(reason, 0) for reason, count in now["closed"].items()}
    return {reason: count for reason, count in sorted(closed.items()) if count}


def start_server(args, metrics_port: int) -> tuple[benchlib.Server, psutil.Process]:
    server = benchlib.Server(extra_args=["--metrics", f"{benchlib.LOOPBACK}:{metrics_port}",
                                         *args.server_args.split()], workers=args.workers)
    try:
        return server, server.start(timeout=120)
    except RuntimeError as exc:
        log = server.log_tail()
        server.stop()
        if "--metrics" in log and ("unrecognized" in log or "invalid" in log):
            raise RuntimeError("this zim server does not accept --metrics: million.py compares connflood's "
                               "figures with what the server holds, read from its /metrics, and cannot run "
                               f"without it. The server said:\n{log[-1500:]}") from None
        raise exc


class StderrWatch:
    """Passes connflood's stderr through and notes when it says ``holding:`` (all
    connected, the probe done) and ``stopping:`` (the hold is over)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.holding: float | None = None
        self.stopping: float | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        tail = ""
        while True:
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                return
            text = chunk.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-4096:]
            if self.holding is None and "holding:" in tail:
                self.holding = time.monotonic()
            if self.stopping is None and "stopping:" in tail:
                self.stopping = time.monotonic()

    @property
    def in_hold(self) -> bool:
        return self.holding is not None and self.stopping is None


# -- the run --------------------------------------------------------------------------
def run(args, info: dict) -> int:
    print(f"ip_local_port_range: {port_range()} (left as it is)", flush=True)
    metrics_port = benchlib.free_port()
    metrics_url = f"http://{benchlib.LOOPBACK}:{metrics_port}/metrics"
    server, root = start_server(args, metrics_port)
    with server:
        tree = benchlib.ProcessTree(root)
        time.sleep(2.0)
        rss_before = tree.rss()
        each_before = {p.pid: p.memory_info().rss for p in tree.processes}
        slab_before = benchlib.meminfo_kib("Slab") * 1024
        metrics_before = scrape(metrics_url)
        print(f"server: {args.workers} workers + supervisor + writer, baseline rss "
              f"{rss_before / 2**20:.1f} MiB, slab {slab_before / 2**20:.0f} MiB; metrics at {metrics_url}",
              flush=True)
        command = [sys.executable, "-m", "zim.connflood", "--port", str(server.tcp_port), "--connections",
                   str(args.connections), "--processes", str(args.processes), "--login",
                   "--hold", str(args.hold), "--heartbeat", str(args.heartbeat), "--probe",
                   "--probe-sample", str(args.probe_sample), "--json",
                   # connecting (and joining) may take all of --timeout but the hold and the stop
                   "--connect-timeout", str(max(60.0, args.timeout - args.hold - 180.0))]
        if args.channels_per_user:
            command += ["--channels-per-user", str(args.channels_per_user), "--channel-sizes", args.channel_sizes]
        # unfinished setups per client process: with 20 pipelined joins each, 500 per process
        # would queue half a minute of the server's work, and logins behind it would pass
        # --login-timeout; 40 keeps about 2 s of joins queued on 56 processes
        command += ["--inflight", str(args.inflight or (40 if args.channels_per_user else 500))]
        print("running:", " ".join(command), flush=True)
        # from the repository root, like the server: the same zim
        flood = subprocess.Popen(command, cwd=benchlib.REPO_ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            watch = StderrWatch(flood.stderr)
            started = time.monotonic()
            # (seconds, server CPU, connflood CPU)
            cpu_samples = [(0.0, tree.cpu_times(), benchlib.CPUTimes(0.0, 0.0))]
            peak_rss, peak_slab = rss_before, slab_before
            peak_each = dict(each_before)
            held: dict | None = None            # the last scrape wholly inside the hold
            scrape_error = ""
            last_scrape = last_sample = 0.0
            deadline = time.monotonic() + args.timeout
            while flood.poll() is None and time.monotonic() < deadline:
                time.sleep(0.25)
                now = time.monotonic()
                if watch.in_hold and now - last_scrape >= SCRAPE_EVERY:
                    last_scrape = now
                    try:
                        figures = scrape(metrics_url)
                        if watch.in_hold:       # still holding once the answer is in
                            held = figures
                    except RuntimeError as exc:
                        scrape_error = str(exc)
                        print(f"warning: {exc}", flush=True)
                if now - last_sample < 2.0:
                    continue
                last_sample = now
                cpu_samples.append((now - started, tree.cpu_times(), flood_cpu(flood.pid)))
                if tree.changed():
                    raise RuntimeError(f"a server process ended during the run:\n{server.log_tail()}")
                rss_now = tree.rss()
                if rss_now > peak_rss:
                    peak_rss = rss_now
                    peak_each = {p.pid: p.memory_info().rss for p in tree.processes}
                peak_slab = max(peak_slab, benchlib.meminfo_kib("Slab") * 1024)
            if flood.poll() is None:
                raise RuntimeError("connflood did not finish in time")
        except BaseException:
            if flood.poll() is None:
                flood.kill()        # its client processes see the pipe close and stop
                flood.wait(30)
            raise
        output = flood.stdout.read()
        watch.thread.join(5)
        print(output, end="")
        lines = output.strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            raise RuntimeError(f"connflood ended ({flood.returncode}) without its summary")
        result = json.loads(lines[-1])
        return report(args, info, result, flood.returncode, held, scrape_error, metrics_before, tree,
                      cpu_samples, rss_before, peak_rss, each_before, peak_each, slab_before, peak_slab)


def report(args, info, result, flood_code, held, scrape_error, metrics_before, tree, cpu_samples, rss_before,
           peak_rss, each_before, peak_each, slab_before, peak_slab) -> int:
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

    # connflood against the server
    problems = []
    if result.get("unaccounted", 0) or result.get("lost_processes"):
        problems.append(f"connflood could not account for {result.get('unaccounted', 0):,} connections "
                        f"(lost client processes: {result.get('lost_processes')})")
    if result["failed"]:
        problems.append(f"{result['failed']:,} connections failed: {result['errors']}")
    plan = result.get("channels")
    if args.channels_per_user and (plan is None or plan["joined"] != plan["memberships"]):
        problems.append(f"joins: {plan['joined']:,} of {plan['memberships']:,} answered"
                        if plan else "connflood did not report its joins")
    if flood_code != 0 and not problems:
        problems.append(f"connflood exited with {flood_code}")
    server_side: dict = {}
    if held is None:
        problems.append("no /metrics scrape fell inside the hold (is --hold long enough?)"
                        + (f"; the last scrape failed: {scrape_error}" if scrape_error else ""))
    else:
        open_at_end = result["open_at_end"]
        held_total = sum(held["connections"].values())
        closed = closed_since(held, metrics_before)
        by_server = {reason: count for reason, count in closed.items() if reason != CLIENT_CLOSE}
        server_side = {"connections": held["connections"], "connections_total": held_total,
                       "logged_in": held["logged_in"], "closed": closed, "closed_by_server": by_server}
        transports = ", ".join(f"{transport} {count:,}" for transport, count in sorted(held["connections"].items()))
        print(f"server during the hold: {held_total:,} connections ({transports}), "
              f"{held['logged_in']:,} logged in; closed since connflood started: {closed or 'none'}")
        print(f"connflood: {result['connected']:,} connected, {result['failed']:,} failed, "
              f"{result.get('unaccounted', 0):,} unaccounted of {args.connections:,}; "
              f"open at the end of the hold {open_at_end:,}, closed later {result.get('closed') or 'none'}")
        if held_total != open_at_end:
            problems.append(f"MISMATCH: the server holds {held_total:,} connections, connflood "
                            f"{open_at_end:,}")
        if held["logged_in"] != open_at_end:
            problems.append(f"MISMATCH: the server has {held['logged_in']:,} logged in, connflood "
                            f"{open_at_end:,} open and logged in")
        if by_server:
            problems.append(f"the server closed connections: {by_server}")
    for problem in problems:
        print(problem)
    if not problems:
        print("match: the server holds exactly connflood's connections, all logged in, none closed by it")

    dm = result["probe"].get("dm", {})
    broadcast = result["probe"].get("broadcast", {})
    print(f"RESULT million connections={logged_in} failed={result['failed']} "
          f"unaccounted={result.get('unaccounted')} "
          f"server_connections={server_side.get('connections_total')} "
          f"server_logged_in={server_side.get('logged_in')} "
          f"server_closed={sum(server_side.get('closed_by_server', {}).values()) if server_side else None} "
          f"connect_seconds={result['seconds']} connect_rate={result['connect_rate']} "
          + (f"channels_per_user={args.channels_per_user} channels={plan['channels']} "
             f"memberships={plan['joined']} " if plan else "")
          + f"server_rss_bytes_per_connection={per_conn:.0f} (target {1024 if plan else 256}) "
          f"server_rss_total_bytes_per_connection={peak_rss / max(1, logged_in):.0f} (baseline included) "
          f"kernel_slab_bytes_per_connection={slab_per_conn:.0f} (both ends) "
          f"dm_round_trip_p50_ms={dm.get('p50_ms')} dm_round_trip_p99_ms={dm.get('p99_ms')} (target < 5) "
          f"broadcast_delivered={broadcast.get('delivered')}/{broadcast.get('expected')} "
          f"broadcast_p99_ms={broadcast.get('p99_ms')} (target < 20)"
          + ("" if not problems else " NOT OK"))
    if args.json:
        benchlib.print_json({"bench": "million", "ok": not problems, "problems": problems, "machine": info,
                             "port_range": port_range(), "workers": args.workers, "baseline_rss": rss_before,
                             "peak_rss": peak_rss, "rss_bytes_per_connection": per_conn,
                             "rss_total_bytes_per_connection": peak_rss / max(1, logged_in),
                             "channels": plan,
                             "slab_bytes_per_connection": slab_per_conn,
                             "connect_phase_cpu": phase, "server": server_side,
                             "connflood_exit_code": flood_code, "connflood": result})
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=56, help="connflood client processes")
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--heartbeat", type=float, default=100.0)
    parser.add_argument("--probe-sample", type=int, default=1000)
    parser.add_argument("--channels-per-user", type=int, default=0,
                        help="channels each user joins after its login (connflood's --channels-per-user)")
    parser.add_argument("--channel-sizes", default="50:5000", metavar="MIN:MAX",
                        help="members of the smallest and the largest of those channels")
    parser.add_argument("--inflight", type=int, default=0,
                        help="connflood's --inflight (default 500, or 40 with --channels-per-user)")
    parser.add_argument("--server-args", default="", help="more zim-server flags")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    return benchlib.run_main("million", "zim: N logged-in connections held on one machine", args, run)


if __name__ == "__main__":
    sys.exit(main())
