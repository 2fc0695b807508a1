"""A small slice of the fuzz campaign (bench/fuzz.py): random and mutated frames on
TCP and WebSocket against a two-worker server, with an honest client meanwhile.

It fails if a server process died or was restarted, if the server's log has a
traceback or an error, if it did not exit 0 on SIGTERM, if a server process
kept descriptors, if its memory did not come back near the baseline, or if the
honest client saw one error or timeout.
"""
from __future__ import annotations

import json

from tests.support import REPO_ROOT
import subprocess
import sys

ROOT = REPO_ROOT
FRAMES = 50_000


def test_fuzz_slice() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz.py"), "--frames", str(FRAMES), "--seconds", "90",
         "--seed", "14", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, output
    assert done.returncode == 0, output
    assert result["failures"] == [], output
    # the checks looked at the whole server: router, writer and both workers
    assert sorted(result["server_roles"].values()) == ["router", "worker0", "worker1", "writer"], result
    assert result["server_pids_after"] == result["server_pids_before"]
    assert result["crashes"] == 0 and result["log_problems"] == [] and result["server_exit_code"] == 0
    assert result["fd_leaks"] == 0 and set(result["fds_after"]) == set(result["fds_before"]) and \
        all(abs(result["fds_after"][k] - v) <= result["fd_slack"] for k, v in result["fds_before"].items())
    assert result["rss_after"] <= result["rss_limit"]
    assert result["frames"] >= FRAMES
    honest = result["honest"]
    assert honest["errors"] == 0 and honest["requests"] > 100, honest
    # every part of the campaign was exercised
    groups = result["frames_by_group"]
    for group in ("tcp", "tcp_login", "tcp_random_bytes", "ws_handshake", "ws_login", "ws_message", "ws_deflated",
                  "ws_fragmented", "ws_fragmented_deflated", "ws_ping"):
        assert groups.get(group, 0) > 0, (group, groups)
    kinds = result["frames_by_kind"]
    assert kinds.get("tcp:sweep", 0) + kinds.get("ws_message:sweep", 0) > 1000, "the field sweep did not run"
    assert sum(n for k, n in groups.items() if k.startswith("hs_")) > 100, groups
    assert sum(n for k, n in groups.items() if k.startswith("tcp_") and k != "tcp_login") > 100, groups
