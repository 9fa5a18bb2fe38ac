"""Retention: delete a study's spool files once its results were dispatched and the retention time passed.

Only studies whose every job reached dispatched (or had no destination) qualify, and studies no rule
matched; failed and dead-letter jobs keep their study so `ainode requeue` can still run or send them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from node.audit import AuditLog
from node.receive.spool import Spool, remove_files
from node.store import Store

log = logging.getLogger("ainode.retention")


class Purger:
    def __init__(self, store: Store, audit: AuditLog, spool: Spool, results_dir: Path,
                 retention_hours: float, interval_s: float) -> None:
        self.store = store
        self.audit = audit
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.retention_s = retention_hours * 3600
        self.interval_s = interval_s
        self._next = 0.0

    def tick(self, now: float | None = None) -> int:
        """Purge what is due, at most once per interval. Returns the number of studies purged."""
        now = time.time() if now is None else now
        if now < self._next:
            return 0
        self._next = now + self.interval_s
        cutoff = now - self.retention_s
        purged = 0
        for study_uid in self.store.purgeable_studies(cutoff):
            paths = self.store.purge_study(study_uid, cutoff)
            if not paths:
                continue
            files = self.spool.remove(paths)
            results = remove_files(self.store.result_paths(study_uid), self.results_dir)
            self.audit.append("study-purged", study_uid=study_uid, instances=len(paths), files_removed=files,
                              result_files_removed=results, retention_hours=self.retention_s / 3600)
            log.info("study purged instances=%d result_files=%d", len(paths), results)
            purged += 1
        return purged
