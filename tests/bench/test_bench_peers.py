"""bench/peers.py runs end to end at a small size: every server it could start
delivered everything, with positive figures (the figures themselves are not checked)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
SUBSCRIBERS = 100
IDLE_CONNECTIONS = 100
BINARIES = {"redis": "redis-server", "nats": "nats-server"}


@pytest.fixture(scope="module")
def peers_result() -> dict:
    # 300,000 deliveries per server: enough server CPU time for psutil to see.
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peers.py"),
         "--subscribers-list", str(SUBSCRIBERS), "--messages", "3000",
         "--idle-connections", str(IDLE_CONNECTIONS), "--settle", "1", "--runs", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, result
    return result


@pytest.mark.parametrize("server", ["zim", "redis", "nats", "asyncio"])
def test_peer_delivers_everything(peers_result: dict, server: str) -> None:
    entry = peers_result["servers"][server]
    if server in BINARIES and shutil.which(BINARIES[server]) is None:
        assert entry["available"] is False and entry["skipped"]
        pytest.skip(f"{BINARIES[server]} is not installed")
    assert entry["available"] is True and entry["ok"] is True, entry
    fanout = entry["fanout"][str(SUBSCRIBERS)]
    assert fanout["loss"] == 0
    assert fanout["runs"][0]["delivered"] == SUBSCRIBERS * 3000
    assert fanout["deliveries_per_second"] > 0
    assert fanout["deliveries_per_cpu_second"] > 0
    idle = entry["idle"]
    assert idle["connections"] == IDLE_CONNECTIONS and idle["failed"] == 0
    assert idle["rss_after"] > 0
    # Every idle connection was still open when the memory was read.
    assert idle["server_fds_after"] - idle["server_fds_before"] >= IDLE_CONNECTIONS


def test_idle_channels_subscribe_every_connection_to_n_channels() -> None:
    """``--idle-channels 3``: every server's idle connections each hold 3 subscriptions
    (zim: joins after the login), no fan-out test; a failed subscription fails the run."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peers.py"), "--subscribers-list", "",
         "--idle-connections", "60", "--idle-channels", "3", "--idle-channel-size", "20",
         "--idle-runs", "1", "--settle", "0.5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["idle_channels"] == 3, result
    for server, entry in result["servers"].items():
        if not entry["available"]:
            continue
        assert entry["fanout"] == {}
        idle = entry["idle"]
        assert idle["channels"] == 3 and idle["connections"] == 60 and idle["failed"] == 0, server
        assert idle["subscriptions"] == 60 * 3, server     # confirmed by the server
        assert idle["server_fds_after"] - idle["server_fds_before"] >= 60
