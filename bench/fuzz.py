#!/usr/bin/env python3
"""A fuzz campaign against a real multi-worker server: random and mutated frames.

Starts a real server (``python -m zim --workers 2`` on loopback ports, a
temporary data directory; ``--workers`` and ``--server-args`` change it), takes
a baseline of it (the process ids of the whole tree: supervisor/router, workers,
store writer; the resident memory of the tree; the open descriptors of every one
of its processes, from /proc/PID/fd), then runs ``--processes`` fuzzing client
processes until they have written ``--frames`` frames (or ``--seconds`` passed),
while one honest client process does real work all along.

One **frame** is one unit written to the server: a TCP packet, a WebSocket
frame, a handshake attempt or a chunk of random bytes; it is counted once all
its bytes were accepted by the kernel (frames left unwritten because the server
had already closed the connection are not counted). Many frames go in one
``send`` and connections carry many frames, so that 10^6 frames take well under
a minute on 2 cores; every fuzzer keeps ``--connections`` connections going at once
(non-blocking, one epoll loop) and reads and discards everything the server
sends (a fuzzer that stops reading would only test ``--max-outbuf``).

What the fuzzers send (each connection is one *session*, chosen at random):

- **TCP streams**: often a valid login first (a token of the fuzzer's own users),
  then 1..200 requests in batches of up to 128: valid ones; one field of a valid request
  of action 1..9 replaced by a value of the wrong type or an edge value (null,
  booleans, floats, 2^63, 2^64, 400-digit numbers, 1e999, empty, 300 characters,
  lone surrogates, arrays, objects, deep nesting ...) or removed; bodies mutated
  byte-wise (bits flipped, bytes inserted, deleted, replaced); action and seq edge
  values (0, 32767, 32768, 65535, 100..103, 200); unknown actions; invalid UTF-8;
  bodies that are not objects; nesting 100..30,000 deep; huge numbers; random
  bytes behind a correct length; bodies right at the size limit. A stream may end
  with a breaking packet: length off by ±k, a huge length, a length below 8, a
  truncated packet, garbage after a packet, a mutated header, one byte over the
  limit, random bytes, HTTP or a WebSocket upgrade on the TCP port.
- **Random bytes** on the TCP port (1..70,000 bytes a write).
- **WebSocket handshakes**: missing, repeated or bad headers (Upgrade,
  Connection, Sec-WebSocket-Key not base64 or not 16 bytes, versions other than
  13), other methods and HTTP versions, headers without a colon, folded lines,
  NUL and high bytes, 500 headers, a head over 8 KiB, bare LF, partial heads
  (then a pause, then the rest or nothing), byte-wise mutated heads, malformed
  permessage-deflate offers, zim TCP packets and random bytes on the WS port.
- **WebSocket streams**: a good handshake (half of them negotiating
  permessage-deflate), often a login, then batches of masked frames: the
  requests above as binary messages (compressed or not when deflate was agreed),
  pings and unsolicited pongs, messages fragmented in 2..5 pieces with pings and
  pongs between the pieces (compressed ones too), empty continuations, zero and
  random masks. A stream may end with a breaking frame: unmasked, a reserved
  opcode, RSV1/RSV2/RSV3 where not allowed (RSV1 without deflate, on a control
  frame, on a continuation), a continuation with no message, a new message in
  the middle of a fragmented one, control frames over 125 bytes or fragmented,
  a text frame (valid or invalid UTF-8), close frames with bad codes, bad
  UTF-8 reasons or a 1-byte payload, 64-bit lengths (2^63, 2^64-1, 2^32,
  non-minimal), a message under 4 bytes, an oversize message (whole or
  fragmented), corrupt or truncated compressed data, zip bombs (200 KB and 60 MB
  of zeros), a message that refers back into the previous one (context
  takeover), or a byte-wise mutated frame; else a valid close or just an end.
- Every process starts with a **sweep**: each field of each action 1..9 set to
  each of the edge values, once, on a logged-in connection.

The mix of sessions: TCP streams 15%, short TCP sessions (0..3 requests) that
end with a breaking packet 20%, random bytes 10%, WebSocket streams 15%, short
WebSocket sessions that end with a breaking frame 20%, handshakes 20%; so most
frames are requests in streams and most connections end in a broken frame.

A session ends with a half-close and waits (at most ``--drain`` s) for the server
to close, so the server has read everything counted; 5% end with a reset
instead. All randomness comes from ``--seed`` (printed): session N of fuzzer P
uses ``random.Random(f"{seed}:{P}:{N}")`` and ``--replay P:N,...`` runs only
those sessions, one at a time, against a fresh server.

The honest client (a TCP user and a WebSocket user, one channel) loops the whole
time: a private message (answer, and the push to the receiver), a channel
message (answer and push), a history read (must hold the message just sent), a
mailbox pull and ack, a heartbeat, and every 20 rounds a fresh connection that
logs in with a token. Each request's latency is recorded; an error answer, a
missing push or anything slower than ``--honest-timeout`` is an error.

Checks at the end (after the fuzzers, then ``--settle`` seconds, all clients
closed), each one failing the run (exit status 1):

- **no crash**: the same server processes as at the baseline, all alive; no
  ``restarting``, ``ended (``, ``link to worker ... closed``, ``ERROR``,
  ``CRITICAL`` or ``Traceback`` in the server's log; exit status 0 on SIGTERM;
- **no descriptor leak**: every server process back to its baseline count of
  open descriptors, within ``--fd-slack`` (default 2; waits up to 20 s);
- **memory back near the baseline**: RSS of the tree after ≤ baseline ×
  ``--rss-factor`` (1.5) + ``--rss-slack-mib`` (32 MiB). Users, channels and
  memberships the fuzzers create legitimately are kept in memory by design, so
  "near" is not "equal"; the peak (sampled twice a second) is reported too;
- **honest client served throughout**: 0 errors, and it ran from before the
  first fuzz frame to after the last;
- **no ``internal`` answer** read by a fuzzer (uncompressed answers are scanned);
- **the campaign is complete**: at least ``--frames`` frames were written.

When a server process dies, the fuzzers are stopped at once and the sessions that
were open at the moment the log gives for the death are printed, with the
``--replay`` command that runs them again.

Example: ``python bench/fuzz.py --frames 1000000 --json``;
small: ``python bench/fuzz.py --frames 20000 --seconds 60``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import shlex
import sys
import time
from collections import Counter

import psutil

import benchlib
from fuzz_frames import MIB, zip_bombs
from fuzz_honest import honest, new_user
from fuzz_process import fuzzer
from fuzz_server import (
    CLOSES, LOG_PROBLEMS, fd_counts, first_death_in_log, is_alive, role, rss_of, stop_server, tree,
)


def parse_replay(text: str) -> dict[int, list[int]]:
    sessions: dict[int, list[int]] = {}
    for item in text.split(","):
        proc, _, number = item.strip().partition(":")
        sessions.setdefault(int(proc), []).append(int(number))
    return sessions


# -- the campaign ---------------------------------------------------------------------------
def run(args, info: dict) -> int:
    extra = shlex.split(args.server_args)
    max_packet = 65536
    if "--max-packet" in extra:
        max_packet = int(extra[extra.index("--max-packet") + 1])
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    replay = parse_replay(args.replay) if args.replay else None
    processes = len(replay) if replay else args.processes
    what = f"sessions {args.replay} only, one at a time" if replay else \
        f"{args.frames:,} frames, {processes} fuzzer processes x {args.connections} connections"
    print(f"# seed {seed} (repeat with --seed {seed}); {what}, --workers {args.workers}, at most {args.seconds:g} s")
    sys.stdout.flush()
    bombs = zip_bombs()
    server = benchlib.Server(workers=args.workers, extra_args=extra)
    root = server.start()
    result: dict = {"bench": "fuzz", "seed": seed, "frames_wanted": args.frames, "workers": args.workers,
                    "processes": processes, "connections": args.connections, "machine": info,
                    "server_command": server.command}
    failures: list[str] = []
    fuzzers = benchlib.ClientProcesses()
    honest_proc = benchlib.ClientProcesses()
    code: int | None = None
    log = ""
    try:
        sink_id = new_user(server.tcp_port)
        time.sleep(1.0)
        processes_before = tree(root)
        pids = sorted(p.pid for p in processes_before)
        roles = {p.pid: role(p) for p in processes_before}
        fds_before = fd_counts(pids)
        rss_before = rss_of(pids)
        baseline = sum(rss_before.values())
        print("# server tree: " + ", ".join(f"{roles[p]} {p} (fds {fds_before[p]}, rss {rss_before[p] / MIB:.1f} MiB)"
                                             for p in pids))
        run_id = f"{seed:x}"
        options = {"tcp_port": server.tcp_port, "ws_port": server.ws_port, "sink_id": sink_id,
                   "users": args.users, "channels": args.channels, "run_id": run_id, "max_packet": max_packet,
                   "bombs": bombs, "seed": seed, "seconds": args.seconds, "connections": args.connections,
                   "drain": args.drain, "honest_timeout": args.honest_timeout,
                   "honest_interval": args.honest_interval}
        honest_proc.start(honest, [(options,)])
        message = honest_proc.receive_all(60, "complete a first honest round")[0]
        if message[0] != "ready":
            raise RuntimeError(message[1])
        counters = multiprocessing.get_context("fork").Array("q", processes, lock=False)
        per_process = -(-args.frames // processes)
        arguments = []
        for index in range(processes):
            these = dict(options, frames=per_process)
            proc = index
            if replay:
                proc = sorted(replay)[index]
                these.update(replay=replay[proc], frames=1 << 40)
            arguments.append((proc, these, counters))
        fuzzers.start(fuzzer, arguments)
        for message in fuzzers.receive_all(60, "set up its users"):
            if message[0] != "ready":
                raise RuntimeError(message[1])
        start = time.monotonic()
        fuzz_started_at = time.time()
        fuzzers.send_all(("go",))
        peak = baseline
        last_print = start
        dead_at = None
        reports: list = [None] * processes
        while any(r is None for r in reports):
            now = time.monotonic()
            if now - start > args.seconds + args.drain + 60:
                raise RuntimeError("the fuzzers did not finish in time")
            for i, pipe in enumerate(fuzzers.pipes):
                if reports[i] is None and pipe.poll():
                    reports[i] = pipe.recv()[1]
            rss_now = sum(rss_of(pids).values())
            peak = max(peak, rss_now)
            if dead_at is None and not all(is_alive(p) for p in pids):
                dead_at = round(time.time(), 3)
                print(f"# a server process ended at {time.strftime('%H:%M:%S')}: stopping the fuzzers",
                      file=sys.stderr)
                for pipe in fuzzers.pipes:      # their last sessions are the suspects
                    pipe.send(("stop",))
            if now - last_print >= 10:
                sent = sum(counters)
                print(f"# {now - start:5.0f} s: {sent:,} frames ({sent / (now - start):,.0f}/s), "
                      f"server RSS {rss_now / MIB:.1f} MiB", file=sys.stderr)
                last_print = now
            time.sleep(0.5)
        fuzz_seconds = time.monotonic() - start
        fuzz_ended_at = time.time()
        time.sleep(min(2.0, args.settle))   # the honest client goes on a little after the last frame
        honest_proc.send_all(("stop",))
        honest_report = honest_proc.receive_all(args.honest_timeout * 3 + 30, "report")[0]
        if honest_report[0] != "done":
            raise RuntimeError(honest_report[1])
        honest_report = honest_report[1]
        fuzzers.stop()
        honest_proc.stop()

        # -- the checks -------------------------------------------------------------------
        time.sleep(args.settle)
        deadline = time.monotonic() + 20
        while True:
            fds_after = fd_counts(pids)
            leaks = {p: (fds_after[p] - fds_before[p]) if fds_after[p] is not None else None for p in pids}
            if all(v is not None and abs(v) <= args.fd_slack for v in leaks.values()) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rss_after_each = rss_of(pids)
        rss_after = sum(rss_after_each.values())
        now_pids = sorted(p.pid for p in tree(root)) if psutil.pid_exists(root.pid) else []
        alive = [p for p in pids if is_alive(p)]
        code, log = stop_server(server)
        problems = [line for line in log.splitlines() if LOG_PROBLEMS.search(line)]
        closes: dict[str, int] = {}
        for line in log.splitlines():
            match = CLOSES.match(line)
            if match:
                closes[f"{match.group(1)} {match.group(2)}"] = int(match.group(3))
        # one crash: a process of the baseline gone (and perhaps restarted), or a restart in the log
        crashes = max(len(pids) - len(alive), sum(1 for line in problems if "restarting" in line))
        frames = sum(r["frames"] for r in reports)
        by_kind: Counter = Counter()
        stats: Counter = Counter()
        for r in reports:
            by_kind.update(r["by_kind"])
            stats.update(r["stats"])
        leaked = {roles[p]: v for p, v in leaks.items() if v is None or abs(v) > args.fd_slack}
        rss_limit = baseline * args.rss_factor + args.rss_slack_mib * MIB

        if crashes or len(alive) != len(pids):
            failures.append(f"crashes: {crashes} (alive {len(alive)} of {len(pids)} server processes, "
                            f"now {now_pids} vs {pids})")
        if problems:
            failures.append(f"{len(problems)} problem lines in the server log, first: {problems[0][:300]}")
        if code != 0:
            failures.append(f"server exit status on SIGTERM: {code}")
        if leaked:
            failures.append(f"descriptors not back to the baseline (±{args.fd_slack}): {leaked}")
        if rss_after > rss_limit:
            failures.append(f"RSS after {rss_after / MIB:.1f} MiB > baseline {baseline / MIB:.1f} MiB x "
                            f"{args.rss_factor:g} + {args.rss_slack_mib:g} MiB")
        if honest_report["errors"]:
            failures.append(f"honest client: {honest_report['errors']} errors: {honest_report['error_samples'][:3]}")
        if not honest_report["first_round_at"] or honest_report["first_round_at"] > fuzz_started_at \
                or honest_report["last_round_at"] < fuzz_ended_at:
            failures.append("the honest client did not complete rounds from before the first fuzz frame "
                            "to after the last")
        if not replay and frames < args.frames:
            failures.append(f"only {frames:,} of {args.frames:,} frames within {args.seconds:g} s")
        if stats.get("internal_answers"):
            failures.append(f"{stats['internal_answers']} answers with the error code internal (a server bug)")
        if stats.get("connect_errors"):
            failures.append(f"{stats['connect_errors']} connections refused")
        ok = not failures
        groups: Counter = Counter()
        for kind, n in by_kind.items():
            groups[kind.split(":")[0]] += n
        print("# frames by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(groups.items())))
        print(f"# sessions {stats['sessions']:,}: " + ", ".join(
            f"{k[8:]} {v:,}" for k, v in sorted(stats.items()) if k.startswith("session_")))
        print(f"# ends: drained {stats['drained']:,}, closed by the server {stats['closed_by_server']:,}, "
              f"reset {stats['closed_reset']:,}, drain timeouts {stats['drain_timeouts']:,}; "
              f"frames unsent (server had closed) {stats['frames_unsent']:,}; "
              f"'internal' answers seen {stats['internal_answers']:,}")
        if closes:
            print("# server closes (log): " + ", ".join(f"{k} {v:,}" for k, v in sorted(closes.items())))
        print("# descriptors before/after: " + ", ".join(
            f"{roles[p]} {fds_before[p]}/{fds_after[p]}" for p in pids))
        print("# RSS before/after by process (MiB): " + ", ".join(
            f"{roles[p]} {rss_before[p] / MIB:.1f}/{rss_after_each[p] / MIB:.1f}" for p in pids))
        print(f"# honest: {honest_report['requests']:,} requests in {honest_report['rounds']:,} rounds, "
              f"errors {honest_report['errors']}, p50 {honest_report['p50_ms']} ms, p99 {honest_report['p99_ms']} ms,"
              f" max {honest_report['max_ms']} ms; push p50 {honest_report['push_p50_ms']} ms, "
              f"p99 {honest_report['push_p99_ms']} ms")
        for failure in failures:
            print(f"# FAILED: {failure}")
        suspects = []
        death = first_death_in_log(problems) or dead_at
        if not ok:
            # the sessions open during the 3 s before a death was seen (else the last 20 of each fuzzer)
            for index, r in enumerate(reports):
                proc = sorted(replay)[index] if replay else index
                sessions = r["recent_sessions"]
                if death:
                    chosen = [x for x in sessions if x[2] <= death + 0.05 and x[3] >= death - 0.25]
                else:
                    chosen = sessions[-20:]
                suspects.extend((proc, *x) for x in chosen)
            if death:
                print(f"# a server process died at {death:.3f} ({time.strftime('%H:%M:%S', time.localtime(death))}"
                      f"{'' if death != dead_at else ', when this bench saw it'}); the sessions open then:")
            else:
                print("# the last sessions of each fuzzer:")
            print(f"#   {len(suspects)} sessions: " + " ".join(f"{p}:{n}:{k}" for p, n, k, _, _ in suspects[:60]))
            if suspects:
                print(f"#   replay them: python bench/fuzz.py --seed {seed} --replay "
                      + ",".join(f"{p}:{n}" for p, n, *_ in suspects))
        print(f"RESULT fuzz frames={frames} seconds={fuzz_seconds:.1f} rate={frames / fuzz_seconds:,.0f}/s "
              f"crashes={crashes} fd_leaks={len(leaked)} rss_before_mib={baseline / MIB:.1f} "
              f"rss_peak_mib={peak / MIB:.1f} rss_after_mib={rss_after / MIB:.1f} "
              f"ratio={rss_after / baseline:.2f} (limit {rss_limit / MIB:.1f}) honest_requests="
              f"{honest_report['requests']} honest_errors={honest_report['errors']} "
              f"honest_p50_ms={honest_report['p50_ms']} honest_p99_ms={honest_report['p99_ms']} "
              f"{'OK' if ok else 'FAILED'}")
        result.update({
            "ok": ok, "failures": failures, "frames": frames, "seconds": round(fuzz_seconds, 2),
            "frames_per_second": round(frames / fuzz_seconds), "frames_by_group": dict(groups),
            "frames_by_kind": dict(by_kind), "client_stats": dict(stats), "crashes": crashes,
            "server_pids_before": pids, "server_pids_after": now_pids, "server_roles": {str(p): roles[p] for p in pids},
            "log_problems": problems[:20], "server_exit_code": code, "server_closes": closes,
            "fds_before": {roles[p]: fds_before[p] for p in pids}, "fds_after": {roles[p]: fds_after[p] for p in pids},
            "fd_leaks": len(leaked), "fd_slack": args.fd_slack,
            "rss_before": baseline, "rss_peak": peak, "rss_after": rss_after,
            "rss_ratio": round(rss_after / baseline, 3), "rss_limit": int(rss_limit),
            "rss_rule": f"after <= before x {args.rss_factor:g} + {args.rss_slack_mib:g} MiB",
            "honest": honest_report,
            "suspect_sessions": [f"{p}:{n}" for p, n, *_ in suspects] or None,
            "first_death_at": death,
        })
    finally:
        fuzzers.stop()
        honest_proc.stop()
        if server.process is not None and server._log is not None:
            stop_server(server)
    if args.json:
        benchlib.print_json(result)
    return 0 if result.get("ok") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000, metavar="N",
                        help="frames to write, over all fuzzers (default 1,000,000)")
    parser.add_argument("--seconds", type=float, default=900.0, metavar="S",
                        help="stop the fuzzers after S seconds even if N frames were not written (a failure)")
    parser.add_argument("--processes", type=int, default=2, metavar="P", help="fuzzer processes (default 2)")
    parser.add_argument("--connections", type=int, default=32, metavar="K",
                        help="connections each fuzzer keeps going at once (default 32)")
    parser.add_argument("--workers", type=int, default=2, metavar="W", help="server --workers (default 2)")
    parser.add_argument("--server-args", default="", metavar="FLAGS",
                        help='more server flags, e.g. "--ws-deflate off --max-packet 4096"')
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    parser.add_argument("--replay", default="", metavar="P:N,...",
                        help="run only these sessions (fuzzer P's session N), one at a time, with --seed")
    parser.add_argument("--users", type=int, default=8, metavar="N", help="users per fuzzer (default 8)")
    parser.add_argument("--channels", type=int, default=16, metavar="N", help="channels per fuzzer (default 16)")
    parser.add_argument("--drain", type=float, default=5.0, metavar="S",
                        help="wait at most S s for the server to close a finished session (default 5)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="S",
                        help="seconds between the last client and the checks (default 3)")
    parser.add_argument("--honest-timeout", type=float, default=5.0, metavar="S",
                        help="an honest request slower than S s is an error (default 5)")
    parser.add_argument("--honest-interval", type=float, default=0.01, metavar="S",
                        help="pause between the honest client's rounds (default 0.01)")
    parser.add_argument("--fd-slack", type=int, default=2, metavar="N",
                        help="descriptors a server process may differ from its baseline by (default 2)")
    parser.add_argument("--rss-factor", type=float, default=1.5, metavar="F")
    parser.add_argument("--rss-slack-mib", type=float, default=32.0, metavar="MIB",
                        help="RSS after must be <= before x F + MIB (defaults 1.5 and 32)")
    parser.add_argument("--json", action="store_true", help="print a JSON result as the last line")
    args = parser.parse_args()
    if args.frames < 1 or args.processes < 1 or args.connections < 1 or args.seconds <= 0:
        parser.error("--frames, --processes, --connections and --seconds must be positive")
    return benchlib.run_main("fuzz", f"fuzz campaign: {args.frames:,} frames against --workers {args.workers}",
                             args, run)


if __name__ == "__main__":
    sys.exit(main())
