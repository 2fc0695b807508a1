"""The benchmarks run end to end at a small size (their figures are not checked here)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT
from zim.testing.postgres import postgres_bin_dir

ROOT = REPO_ROOT
NEEDS_POSTGRES = pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed (CI installs it)")
NEEDS_POSTGRES_AND_REDIS = pytest.mark.skipif(
    postgres_bin_dir() is None or shutil.which("redis-server") is None,
    reason="PostgreSQL or redis-server is not installed (CI installs them)")


@pytest.mark.parametrize("script, args", [
    ("idle_memory.py", ["--connections", "300", "--settle", "1"]),
    ("idle_memory.py", ["--connections", "300", "--settle", "1", "--ws"]),
    ("idle_memory.py", ["--connections", "300", "--settle", "1", "--channels-per-user", "4",
                        "--channel-size", "50", "--workers", "2"]),
    ("tables_memory.py", ["--users", "2000", "--runs", "1"]),
    ("tables_memory.py", ["--users", "2000", "--runs", "1", "--spread", "5"]),
    ("broadcast.py", ["--members", "100", "--messages", "300", "--runs", "1"]),
    ("api_publish.py", ["--members", "100", "--messages", "200", "--runs", "1"]),
    ("workers.py", ["--members", "200", "--pairs", "20", "--runs", "1"]),
    ("store.py", ["--messages", "400", "--senders-list", "1,4", "--runs", "1", "--rate", "500",
                  "--rate-seconds", "0.5", "--engine-messages", "2000"]),
    ("hugegroup.py", ["--members-list", "500", "--workers", "2", "--runs", "1", "--sources", "2"]),
    ("wire_bytes.py", ["--messages", "50", "--cpu-members", "100", "--cpu-messages", "50", "--cpu-runs", "1"]),
    ("jwt_logins.py", ["--users", "10", "--logins", "100", "--runs", "1", "--algorithms", "HS256,ES256"]),
    pytest.param("redis_link.py", ["--ops", "300", "--runs", "1", "--depths", "1,16"],
                 marks=pytest.mark.skipif(shutil.which("redis-server") is None,
                                          reason="redis-server is not installed (CI installs it)")),
    pytest.param("archive.py", ["--messages", "300", "--runs", "1", "--batches", "1,100", "--depths", "1,4",
                                "--reads", "20"], marks=NEEDS_POSTGRES),
    pytest.param("history_tiers.py", ["--messages", "120", "--reads", "10", "--runs", "1"],
                 marks=NEEDS_POSTGRES_AND_REDIS),
    pytest.param("first_message.py", ["--pairs", "20", "--runs", "1"], marks=NEEDS_POSTGRES_AND_REDIS),
    pytest.param("archive_single.py", ["--senders", "2", "--messages", "300", "--runs", "1", "--rate", "200",
                                       "--rate-seconds", "1"], marks=NEEDS_POSTGRES),
    ("million.py", ["--connections", "3000", "--workers", "2", "--processes", "2", "--hold", "3",
                    "--probe-sample", "100"]),
])
def test_bench_runs(script: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, result
