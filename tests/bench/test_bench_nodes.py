"""bench/nodes.py runs end to end at a tiny size, one node then two on one Redis:
it exits 0 and its JSON has every figure (the figures themselves are not checked)."""
from __future__ import annotations

import json

from tests.support import REPO_ROOT
import subprocess
import sys

from tests.support.redis_servers import requires_redis_server

ROOT = REPO_ROOT
PAIRS, DM_MESSAGES, MEMBERS, MESSAGES = 5, 20, 40, 20

FIGURES = ("latency_p50_ms", "latency_p99_ms", "redis_cpu_share", "node_rate_per_cpu_second")
DM_FIGURES = ("responses_per_second", "pushes_per_second", "responses_per_cpu_second", *FIGURES)
BROADCAST_FIGURES = ("deliveries_per_second", "deliveries_per_cpu_second", *FIGURES)


@requires_redis_server
def test_bench_nodes_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "nodes.py"), "--pairs", str(PAIRS),
         "--dm-messages", str(DM_MESSAGES), "--members", str(MEMBERS), "--messages", str(MESSAGES),
         "--runs", "1", "--run-timeout", "10", "--setup-timeout", "10", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "nodes" and result["ok"] is True, result
    assert result["setups"] == [1, 2] and set(result["results"]) == {"1", "2"}
    for nodes, entry in result["results"].items():
        assert entry["server_exit_codes"] == [0] * int(nodes)
        dm, fanout = entry["dm"], entry["broadcast"]
        assert dm["loss"] == 0 and dm["per_node"] == [2 * PAIRS // int(nodes)] * int(nodes)
        assert dm["cross_node_pairs"] == (PAIRS if nodes == "2" else 0)
        assert fanout["loss"] == 0 and fanout["per_node"] == [MEMBERS // int(nodes)] * int(nodes)
        assert fanout["runs"][0]["delivered"] == MEMBERS * MESSAGES
        for phase, keys in ((dm, DM_FIGURES), (fanout, BROADCAST_FIGURES)):
            assert all(key in phase for key in keys), sorted(phase)
            assert phase["latency_p50_ms"] is not None and phase["runs"][0]["redis_cpu_seconds"] >= 0
    assert set(result["ratios"]["2"]) >= {f"dm_{key}" for key in DM_FIGURES}
    assert set(result["ratios"]["2"]) >= {f"broadcast_{key}" for key in BROADCAST_FIGURES}
