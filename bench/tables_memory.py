#!/usr/bin/env python3
"""Memory of memberships: the C tables (zim._tables) against the dicts MemoryStore held before.

U users (``--users``, default 100,000) each get 12 memberships (by default), in three phases,
as in issue 18's figures:

1. one shared channel (every user in it): bytes per member;
2. 10 more shared channels each (``--group-channels``; channels of ``--group``
   members, 1,000 by default): bytes per membership;
3. a channel of its own, one member: bytes per channel, with its membership (the
   user's 12th: its array of (channel, position) pairs grows then, from 11 to 13;
   ``--group-channels 11`` makes it the 13th, which fits).

``--spread N`` measures instead issue 18's realistic million in small: each user
joins N channels (about N, duplicates dropped) whose sizes run from 50 to 5,000
members (log-uniform), every join in a shuffled order (fixed seed): bytes per
membership and per user all in.

Each kind runs in a fresh child process (this script with ``--child KIND``) that
builds the phases and reports its RSS growth per phase (psutil, after a
``gc.collect()``). ``tables`` drives ``zim._tables.Tables`` and also reports the C
memory it holds (``memory_bytes()``, malloc's overhead not counted); ``store``
drives ``zim.storage.store.MemoryStore.subscribe`` with its quotas off (on the
tables since issue 18); ``dicts`` fills the two dicts MemoryStore held before
(channel -> {user id: push}, user id -> {channel: push}). Medians over ``--runs``
runs (default 3), the kinds alternating.

Example: ``python bench/tables_memory.py --users 100000 --json``
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys

import psutil

import benchlib

PHASES = ("shared", "groups", "own")
SPREAD_SIZES = (50, 5_000)      # --spread: smallest and largest channel


def spread(users: int, per_user: int) -> list[tuple[str, str, int]]:
    """--spread: about per_user memberships per user in channels of 50-5,000, shuffled."""
    rng = random.Random(18)
    smallest, largest = SPREAD_SIZES
    seats: list[int] = []
    while len(seats) < users * per_user:
        channel = len(seats) and seats[-1] + 1
        seats.extend([channel] * int(smallest * (largest / smallest) ** rng.random()))
    del seats[users * per_user:]
    rng.shuffle(seats)
    joins = [(f"c{channel}", user) for user in range(1, users + 1)
             for channel in set(seats[(user - 1) * per_user:user * per_user])]
    rng.shuffle(joins)
    return [("spread", channel, user) for channel, user in joins]


def memberships(users: int, group: int, group_channels: int):
    """The (phase, channel, user id) of every membership, phase by phase."""
    yield from (("shared", "shared", user) for user in range(1, users + 1))
    yield from (("groups", f"g{k}:{user // group}", user)
                for user in range(1, users + 1) for k in range(group_channels))
    yield from (("own", f"own:{user}", user) for user in range(1, users + 1))


def child(kind: str, users: int, group: int, group_channels: int, spread_per_user: int) -> dict:
    """Build the phases in this process: RSS growth (and C bytes) after each."""
    if kind == "tables":
        from zim._tables import Tables
        holder = Tables()
        subscribe = holder.subscribe
    elif kind == "store":
        from zim.storage.store import NO_QUOTAS, MemoryStore
        holder = MemoryStore()
        holder.set_quotas(NO_QUOTAS)
        subscribe = holder.subscribe
    else:
        members: dict[str, dict[int, bool]] = {}
        joined: dict[int, dict[str, bool]] = {}

        def subscribe(channel: str, user: int, push: bool) -> None:
            members.setdefault(channel, {})[user] = push
            joined.setdefault(user, {})[channel] = push
    plan = spread(users, spread_per_user) if spread_per_user else memberships(users, group, group_channels)
    process = psutil.Process()
    gc.collect()
    rss = {"start": process.memory_info().rss}
    c_bytes = {"start": holder.memory_bytes() if kind == "tables" else 0}
    current, counts = None, {}
    for phase, channel, user in plan:
        if phase != current and current is not None:
            gc.collect()
            rss[current] = process.memory_info().rss
            c_bytes[current] = holder.memory_bytes() if kind == "tables" else 0
        current = phase
        counts[phase] = counts.get(phase, 0) + 1
        subscribe(channel, user, True)
    gc.collect()
    rss[current] = process.memory_info().rss
    c_bytes[current] = holder.memory_bytes() if kind == "tables" else 0
    return {"rss": rss, "c_bytes": c_bytes, "counts": counts}


def per_item(sample: dict, key: str, users: int) -> dict:
    """Bytes per member (shared), per membership (groups, spread), per channel (own),
    and all in per user."""
    marks, phases = sample[key], list(sample["counts"])
    figures, before = {}, marks["start"]
    for phase in phases:
        figures[phase] = (marks[phase] - before) / sample["counts"][phase]
        before = marks[phase]
    figures["all_in"] = (marks[phases[-1]] - marks["start"]) / users
    return figures


def run(args, info) -> int:
    samples: dict[str, list[dict]] = {"tables": [], "store": [], "dicts": []}
    for _ in range(args.runs):
        for kind in samples:
            done = subprocess.run([sys.executable, __file__, "--child", kind, "--users", str(args.users),
                                   "--group", str(args.group), "--group-channels", str(args.group_channels),
                                   "--spread", str(args.spread)],
                                  capture_output=True, text=True, check=True)
            samples[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"bench": "tables_memory", "ok": True, "users": args.users, "group": args.group,
              "group_channels": args.group_channels, "spread": args.spread, "runs": args.runs, "machine": info}
    rows = [("tables RSS", "tables", "rss"), ("tables C memory", "tables", "c_bytes"),
            ("MemoryStore RSS", "store", "rss"), ("dicts RSS", "dicts", "rss")]
    columns = [("spread", "per membership")] if args.spread else [
        ("shared", "per member"), ("groups", "per membership"), ("own", "per channel")]
    columns.append(("all_in", "user all in"))
    print(f"{'bytes':>18}" + "".join(f" {title:>15}" for _, title in columns))
    for label, kind, key in rows:
        figures = [per_item(sample, key, args.users) for sample in samples[kind]]
        medians = {name: statistics.median(f[name] for f in figures) for name in figures[0]}
        result[f"{kind}_{key}"] = medians
        print(f"{label:>18}" + "".join(f" {medians[phase]:15.1f}" for phase, _ in columns))
    tables, dicts = result["tables_rss"], result["dicts_rss"]
    if args.spread:
        print(f"RESULT tables_memory users={args.users} spread={args.spread}: {tables['spread']:.1f} B per "
              f"membership in the C tables against {dicts['spread']:.1f} B in dicts, {tables['all_in']:.0f} B "
              f"per user all in against {dicts['all_in']:.0f} (RSS, medians of {args.runs})")
        if args.json:
            benchlib.print_json(result)
        return 0
    print(f"RESULT tables_memory users={args.users}: {args.group_channels + 2} memberships per user take "
          f"{tables['all_in']:.0f} B in the C tables against {dicts['all_in']:.0f} B in dicts "
          f"(per extra membership {tables['groups']:.1f} against {dicts['groups']:.1f}, "
          f"per own channel {tables['own']:.1f} against {dicts['own']:.1f}; RSS, medians of {args.runs})")
    if args.json:
        benchlib.print_json(result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=1_000, help="members of each group channel")
    parser.add_argument("--group-channels", type=int, default=10, help="group channels of each user")
    parser.add_argument("--spread", type=int, default=0,
                        help="instead: memberships of each user in channels of 50-5,000 members, shuffled")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=("tables", "store", "dicts"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.users, args.group, args.group_channels, args.spread)))
        return 0
    return benchlib.run_main("tables_memory", "memberships: C tables against dicts", args, run)


if __name__ == "__main__":
    sys.exit(main())
