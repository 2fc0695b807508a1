"""bench/archive_nodes.py runs end to end at a tiny size, a node without then with
--archive: it exits 0, every acknowledged DM is archived, and its JSON has every
figure (the figures themselves are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO_ROOT
from tests.support.postgres_servers import requires_postgres
from tests.support.redis_servers import requires_redis_server

PAIRS, MESSAGES = 5, 20
ARCHIVE_FIGURES = ("messages_acked", "messages_archived", "archive_messages_per_second", "lag_median_s",
                   "lag_max_s", "drain_after_load_s", "postgres_cpu_s_per_1000_messages", "failures")


@requires_redis_server
@requires_postgres
def test_bench_archive_nodes_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "archive_nodes.py"), "--pairs", str(PAIRS),
         "--dm-messages", str(MESSAGES), "--runs", "1", "--run-timeout", "10", "--setup-timeout", "10", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "archive_nodes" and result["ok"] is True, result
    archive = result["with_archive"]["archive"]
    assert all(key in archive for key in ARCHIVE_FIGURES), sorted(archive)
    assert archive["messages_acked"] == archive["messages_archived"] == 2 * PAIRS * MESSAGES
    for setup in ("without", "with_archive"):
        assert result[setup]["dm"]["loss"] == 0 and "phase_dms_per_cpu_second" in result[setup]
    assert "ratio_per_cpu_second" in result and "ratio_phase_per_cpu_second" in result
