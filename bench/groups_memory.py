#!/usr/bin/env python3
"""Memory of a worker's channel groups: bytes per (worker, channel), in one process.

What a worker holds for each channel it has members of (issue 18): the channel's
name interned in ``zim.fabric.Groups`` (``zim._names``) and the group in the
reactor's C table (``zim/core/groups.pyx``: its slot and its member handles). On
56 workers with ~92,000 channels every worker holds most channels, so this is
paid ~4.5 times per user.

A fresh child process (this script with ``--child SIZE``) makes a reactor with a
few connections (``adopt_link`` on socket pairs), then ``--channels`` groups
(default 90,000) of SIZE members each, interning each name (``channel-<n>``) as
the worker does, and reports its RSS growth per group (psutil, after a
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
    gc.collect()
    before = psutil.Process().memory_info().rss
    for n in range(channels):
        group = groups.id_of(f"channel-{n}")
        for k in range(size):
            if not reactor.group_add(group, handles[(n + k) % len(handles)], False):
                raise SystemExit("a member was refused")
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    return {"size": size, "bytes_per_group": grown / channels,
            "names_bytes_per_group": groups.names.memory_bytes() / channels}


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
        names = statistics.median(r["names_bytes_per_group"] for r in results[size])
        summary[size] = {"bytes_per_group": round(rss, 1), "names_bytes_per_group": round(names, 1)}
        print(f"{size} member(s) a group, {args.channels:,} groups: {rss:.1f} B RSS per group "
              f"(of which the interned name {names:.1f} B of C memory); runs {[round(r['bytes_per_group'], 1) for r in results[size]]}")
    if args.json:
        print(json.dumps({"channels": args.channels, "runs": args.runs, "sizes": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
