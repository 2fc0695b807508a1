"""``ArchiveStats``: the archive's figures, for the log and the metrics (one object per process that archives)."""
from __future__ import annotations

import logging

from zim.metrics import COUNTER, GAUGE, FamilySpec

ARCHIVE_FAMILIES: tuple[FamilySpec, ...] = (
    ("zim_archive_link_up", GAUGE, "1 while the link to the archive (PostgreSQL, --archive) is up, else 0.", None),
    ("zim_archive_lag_seconds", GAUGE, "Age of the oldest change acknowledged to a client and not in the "
     "archive yet (0: the archive is up to date).", None),
    ("zim_archive_pending", GAUGE, "Changes acknowledged and not in the archive yet: conversations, users, "
     "memberships and grants with changes (a node's shards), or messages (a single server).", None),
    ("zim_archive_messages_total", COUNTER, "Messages this process wrote to the archive (new to it).", None),
    ("zim_archive_failures_total", COUNTER, "Archive writes that failed (PostgreSQL down or refusing); "
     "what they held stays queued and is written again.", None),
    ("zim_archive_reads_total", COUNTER, "History pages read from the archive (older than the first tier "
     "holds).", None),
    ("zim_archive_restores_total", COUNTER, "Conversations a node looked up in the archive because Redis "
     "had no seq for them (lost, or new while Redis does not hold the archive's generation marker).", None),
)

LAG_LOG_OVER = 5.0      # seconds of lag past which the log says so ...
LAG_LOG_EVERY = 10.0    # ... this often while it lasts

log = logging.getLogger("zim.archive")


class ArchiveStats:
    """Plain numbers kept where the archiving happens; ``figures()`` for
    ``zim.metrics.families_from_counts(ARCHIVE_FAMILIES, ...)``."""

    __slots__ = ("link_up", "lag_seconds", "pending", "messages", "failures", "reads", "restores")

    def __init__(self) -> None:
        self.link_up = False
        self.lag_seconds = 0.0
        self.pending = 0
        self.messages = 0
        self.failures = 0
        self.reads = 0
        self.restores = 0

    def figures(self) -> dict[str, float]:
        return {"zim_archive_link_up": int(self.link_up), "zim_archive_lag_seconds": self.lag_seconds,
                "zim_archive_pending": self.pending, "zim_archive_messages_total": self.messages,
                "zim_archive_failures_total": self.failures, "zim_archive_reads_total": self.reads,
                "zim_archive_restores_total": self.restores}


class LagLog:
    """Says in the log when the archive lags: every LAG_LOG_EVERY seconds while
    the lag is over LAG_LOG_OVER seconds, and once when it has drained."""

    __slots__ = ("_logged_at",)

    def __init__(self) -> None:
        self._logged_at: float | None = None    # when it last spoke of the lag (None: not lagging)

    def observe(self, stats: ArchiveStats, now: float, pending: str, link: str) -> None:
        """``now``: monotonic seconds; ``pending``: what waits (e.g. "messages wait");
        ``link``: the link's state in words."""
        if stats.lag_seconds > LAG_LOG_OVER:
            if self._logged_at is None or now - self._logged_at >= LAG_LOG_EVERY:
                self._logged_at = now
                log.warning("archive lag %.0f s, %d %s: %s", stats.lag_seconds, stats.pending, pending, link)
        elif self._logged_at is not None and stats.pending == 0:
            self._logged_at = None
            log.info("archive lag drained: everything is in PostgreSQL")
