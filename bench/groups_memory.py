#!/usr/bin/env python3
"""Memory of a worker's channel groups: bytes per (worker, channel), in one process.

What a worker holds for each channel it has members of (issue 18): the group in
its reactor's C table (``zim/core/groups.pyx``: its slot and its member handles).
On 56 workers with ~92,000 channels every worker holds most channels, so this is
paid ~4.5 times per user. The channel's name is interned once per server, by the
process that owns ``zim.fabric.Groups`` (``zim._names``: the router, or the one
process); workers know groups by id.

A fresh child process (this script with ``--child SIZE``) interns ``--channels``
names (default 90,000, ``channel-<n>``), then makes a reactor with a few
connections (``adopt_link`` on socket pairs) and a group of SIZE members for each,
and reports the RSS growth of each phase per channel (psutil, after a
``gc.collect()``). Sizes 1, 2, 3 and 8 by default; medians over ``--runs`` runs
(default 3), the sizes alternating.

Example: ``python bench/groups_memory.py --json``
"""
from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import subprocess
import sys

import psutil

import benchlib


def child(size: int, channels: int) -> dict:
    from zim._core import Reactor
    from zim.fabric import Groups

    reactor = Reactor(1024, lambda *args: None)
    pairs = [socket.socketpair() for _ in range(max(size, 8))]
    handles = [reactor.adopt_link(ours.detach()) for ours, _ in pairs]
    groups = Groups()
    process = psutil.Process()
    gc.collect()
    start = process.memory_info().rss
    for n in range(channels):
        groups.id_of(f"channel-{n}")
    gc.collect()
    named = process.memory_info().rss
    for n in range(channels):
        group = n + 1                   # ids are dense from 1, in order of first use
        for k in range(size):
            if not reactor.group_add(group, handles[(n + k) % len(handles)], False):
                raise SystemExit("a member was refused")
    gc.collect()
    grouped = process.memory_info().rss
    return {"size": size, "bytes_per_group": (grouped - named) / channels,
            "name_bytes_per_channel": (named - start) / channels,
            "name_c_bytes_per_channel": groups.names.memory_bytes() / channels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=90_000, metavar="G")
    parser.add_argument("--sizes", default="1,2,3,8", help="members per group, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.channels)))
        return 0
    benchlib.print_header("worker channel groups: bytes per (worker, channel)")
    sizes = [int(size) for size in args.sizes.split(",")]
    results: dict[int, list[dict]] = {size: [] for size in sizes}
    for _ in range(args.runs):
        for size in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(size), "--channels", str(args.channels)],
                                 check=True, capture_output=True, text=True, cwd=benchlib.REPO_ROOT).stdout
            results[size].append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for size in sizes:
        rss = statistics.median(r["bytes_per_group"] for r in results[size])
        names = statistics.median(r["name_bytes_per_channel"] for r in results[size])
        c_names = statistics.median(r["name_c_bytes_per_channel"] for r in results[size])
        summary[size] = {"bytes_per_group": round(rss, 1), "name_bytes_per_channel": round(names, 1),
                         "name_c_bytes_per_channel": round(c_names, 1)}
        print(f"{size} member(s) a group, {args.channels:,} groups: {rss:.1f} B RSS per group on a worker "
              f"(runs {[round(r['bytes_per_group'], 1) for r in results[size]]}); the name, once per server: "
              f"{names:.1f} B RSS ({c_names:.1f} B of C memory)")
    if args.json:
        print(json.dumps({"channels": args.channels, "runs": args.runs, "sizes": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
