#!/usr/bin/env python3
"""JWT logins against token logins, on one worker (``--workers 1``).

For each algorithm asked for (HS256, RS256, ES256) it starts a server with
that key (``--jwt-key``, the memory store), makes ``--users`` users with a
first JWT login each (keeping their zim tokens), then alternates runs of
``--logins`` token logins and ``--logins`` JWT logins of those users: a fresh
connection per login, ``--concurrency`` at a time, each closed once answered.
Both kinds pay the same connection setup, so the difference is the login
itself. Per run: logins per second (wall) and per server-CPU-second; the
medians of ``--runs`` runs each, and the ratio JWT / token of those medians,
are reported per algorithm.

    python bench/jwt_logins.py                    # HS256, RS256, ES256; 5 runs of 3000 each
    python bench/jwt_logins.py --algorithms HS256 --logins 1000 --runs 3 --json
"""
from __future__ import annotations

import argparse
import os
import secrets
import selectors
import socket
import statistics
import sys
import tempfile
import time

import jwt
import orjson
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from benchlib import LOOPBACK, Server, print_json, run_main, tcp_packet, tcp_split
from zim.protocol import LOGIN

ALGORITHMS = ("HS256", "RS256", "ES256")


def make_key(algorithm: str, directory: str) -> tuple[object, str]:
    """The signing key and the key file the server verifies with."""
    path = os.path.join(directory, algorithm.lower())
    if algorithm == "HS256":
        secret = os.urandom(32)
        data, mode, signing = secret, 0o600, secret
    else:
        signing = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if algorithm == "RS256"
                   else ec.generate_private_key(ec.SECP256R1()))
        data = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        mode = 0o644
    with open(path, "wb") as file:
        file.write(data)
    os.chmod(path, mode)
    return signing, path


def login_bodies(users: list[int], count: int, make) -> list[bytes]:
    return [tcp_packet(LOGIN, 1, orjson.dumps(make(users[i % len(users)]))) for i in range(count)]


def run_logins(port: int, packets: list[bytes], concurrency: int, timeout: float) -> int:
    """Each packet on a fresh connection, ``concurrency`` at a time; the logins answered
    without an error (RuntimeError if one is refused or the run overstays)."""
    selector = selectors.DefaultSelector()
    pending = iter(packets)
    open_count = done = 0
    deadline = time.monotonic() + timeout

    def open_one() -> bool:
        packet = next(pending, None)
        if packet is None:
            return False
        sock = socket.create_connection((LOOPBACK, port))
        sock.sendall(packet)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, bytearray())
        return True

    for _ in range(concurrency):
        open_count += open_one()
    while open_count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {len(packets)} logins answered in {timeout:g} s")
        for key, _ in selector.select(1.0):
            sock, buffer = key.fileobj, key.data
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed a connection before answering its login")
            buffer += chunk
            for action, _, body in tcp_split(buffer):
                if action != LOGIN or b'"error"' in body:
                    raise RuntimeError(f"login refused: {bytes(body[:300])!r}")
                done += 1
                selector.unregister(sock)
                sock.close()
                open_count -= 1
                open_count += open_one()
                break
    selector.close()
    return done


def measure(port: int, process: psutil.Process, packets: list[bytes], args) -> dict:
    cpu_before = sum(process.cpu_times()[:2])
    start = time.perf_counter()
    done = run_logins(port, packets, args.concurrency, args.run_timeout)
    wall = time.perf_counter() - start
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    return {"logins": done, "per_second": done / wall, "per_cpu_second": done / cpu if cpu > 0 else None}


def bench_algorithm(algorithm: str, args, directory: str) -> dict:
    signing, key_path = make_key(algorithm, directory)
    server = Server(workers=1, extra_args=["--store", "memory", "--jwt-key", key_path])
    process = server.start()
    try:
        base = secrets.randbits(32) << 20
        users = [base + i for i in range(1, args.users + 1)]

        def a_jwt(user: int) -> dict:
            return {"jwt": jwt.encode({"sub": str(user), "exp": int(time.time()) + 3600}, signing, algorithm)}

        # the users, made by a first JWT login each; their tokens for the token logins
        tokens: dict[int, str] = {}
        for user in users:
            with socket.create_connection((LOOPBACK, server.tcp_port)) as sock:
                sock.sendall(tcp_packet(LOGIN, 1, orjson.dumps({**a_jwt(user), "name": f"u{user}"})))
                buffer = bytearray()
                while not (answers := tcp_split(buffer)):
                    buffer += sock.recv(65536)
                tokens[user] = orjson.loads(answers[0][2])["token"]
        # the tokens are signed before the runs: only the server's side is measured
        kinds = {
            "token": lambda: login_bodies(users, args.logins, lambda u: {"name": f"u{u}", "token": tokens[u]}),
            "jwt": lambda: login_bodies(users, args.logins, a_jwt),
        }
        runs: dict[str, list[dict]] = {"token": [], "jwt": []}
        for _ in range(args.runs):
            for kind in ("token", "jwt"):     # alternating, so drifts of the machine hit both alike
                runs[kind].append(measure(server.tcp_port, process, kinds[kind](), args))
        if server.stop() != 0:
            raise RuntimeError(f"the {algorithm} server did not exit cleanly")
    finally:
        server.stop()
    result: dict = {"runs": runs}
    for kind in runs:
        result[f"{kind}_per_second"] = statistics.median(run["per_second"] for run in runs[kind])
        result[f"{kind}_per_cpu_second"] = statistics.median(run["per_cpu_second"] or 0 for run in runs[kind])
    result["jwt_over_token"] = result["jwt_per_second"] / result["token_per_second"]
    result["jwt_over_token_cpu"] = (result["jwt_per_cpu_second"] / result["token_per_cpu_second"]
                                    if result["token_per_cpu_second"] else None)
    return result


def run(args, info: dict) -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="zim-jwt-bench-") as directory:
        os.chmod(directory, 0o700)
        for algorithm in args.algorithms.split(","):
            entry = results[algorithm] = bench_algorithm(algorithm, args, directory)
            print(f"{algorithm}: token logins {entry['token_per_second']:.0f}/s "
                  f"({entry['token_per_cpu_second']:.0f} per server-CPU-s), JWT logins "
                  f"{entry['jwt_per_second']:.0f}/s ({entry['jwt_per_cpu_second']:.0f} per server-CPU-s): "
                  f"JWT/token {entry['jwt_over_token']:.2f} (wall), "
                  f"{entry['jwt_over_token_cpu'] or 0:.2f} (CPU); medians of {args.runs} runs")
    summary = ", ".join(f"{alg} {entry['jwt_per_second']:.0f}/s = {entry['jwt_over_token']:.2f}x token"
                        for alg, entry in results.items())
    print(f"RESULT jwt_logins {summary}")
    if args.json:
        print_json({"bench": "jwt_logins", "ok": True, "machine": info, "args": vars(args), "results": results})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: HS256,RS256,ES256")
    parser.add_argument("--users", type=int, default=200, help="users logging in (default 200)")
    parser.add_argument("--logins", type=int, default=3000, help="logins per run (default 3000)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind, alternating (default 5)")
    parser.add_argument("--concurrency", type=int, default=50, help="connections at a time (default 50)")
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds a run may take (default 120)")
    parser.add_argument("--json", action="store_true", help="end with a JSON line of the figures")
    args = parser.parse_args()
    bad = set(args.algorithms.split(",")) - set(ALGORITHMS)
    if bad or args.users < 1 or args.logins < 1 or args.runs < 1 or args.concurrency < 1:
        parser.error(f"unknown algorithm(s) {sorted(bad)}" if bad else "counts must be at least 1")
    return run_main("jwt_logins", "zim: JWT logins against token logins, one worker", args, run)


if __name__ == "__main__":
    sys.exit(main())
