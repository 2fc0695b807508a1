"""What ``--archive``, ``--archive-kinds`` and ``--archive-batch`` accept (no psycopg needed to check them).

The archive is optional (the ``archive`` extra, psycopg 3): the options are
read without it, and a DSN is checked with libpq only when psycopg is installed
(else the server refuses ``--archive`` saying which extra to install).
"""
from __future__ import annotations

ARCHIVE_KINDS = ("private", "channel", "large")     # the retention tiers (zim.storage.retention)
DEFAULT_ARCHIVE_KINDS = "private"
DEFAULT_ARCHIVE_BATCH = 1000
MAX_ARCHIVE_BATCH = 50_000


def parse_archive_kinds(text: str) -> str:
    """The canonical form (in ARCHIVE_KINDS's order) of a comma-separated list of kinds."""
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    unknown = wanted - set(ARCHIVE_KINDS)
    if unknown or not wanted:
        raise ValueError(f"archive kinds are a comma-separated list of {', '.join(ARCHIVE_KINDS)}, "
                         f"not {text!r}")
    return ",".join(kind for kind in ARCHIVE_KINDS if kind in wanted)


def archive_kinds(text: str) -> frozenset[str]:
    """The set of kinds of a canonical ``--archive-kinds`` value."""
    return frozenset(parse_archive_kinds(text).split(","))


def check_dsn(dsn: str) -> str:
    """``dsn`` if libpq can parse it (a ``postgresql://`` URI or ``key=value`` pairs);
    ValueError saying why not otherwise. Reachability is the link's business."""
    if not isinstance(dsn, str) or not dsn:
        raise ValueError("the archive needs a PostgreSQL DSN, e.g. postgresql://user@127.0.0.1:5432/zim")
    try:
        from psycopg import OperationalError, pq
    except ImportError:
        raise ValueError("--archive needs psycopg 3: pip install 'zim[archive]'") from None
    try:
        pq.Conninfo.parse(dsn.encode())
    except OperationalError as exc:
        raise ValueError(f"bad PostgreSQL DSN {dsn!r}: {str(exc).strip()}") from None
    return dsn
