"""What the tests share: a client (``client``), server processes (``servers``),
Redis, cluster, node and Prometheus fixtures."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]     # the checkout the tests run from
