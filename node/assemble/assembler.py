"""Study completion by quiet period: no new instance for `quiet_period_s`."""

from __future__ import annotations

import logging
import time

from node.audit import AuditLog
from node.store import Store

log = logging.getLogger("ainode.assemble")

QUIET_PERIOD = "quiet-period"


class Assembler:
    def __init__(self, store: Store, audit: AuditLog, quiet_period_s: float) -> None:
        self.store = store
        self.audit = audit
        self.quiet_period_s = quiet_period_s

    def tick(self, now: float | None = None) -> list[str]:
        """Declare complete every study that has been quiet long enough; return their UIDs."""
        now = time.time() if now is None else now
        cutoff = now - self.quiet_period_s
        done = []
        for study_uid in self.store.quiet_studies(cutoff):
            if self.store.mark_complete(study_uid, QUIET_PERIOD, cutoff):
                st = self.store.get_study(study_uid)
                self.audit.append("study-complete", study_uid=study_uid, reason=QUIET_PERIOD,
                                  instances=st.instance_count if st else None,
                                  revision=st.revision if st else None)
                log.info("study complete study_uid=%s reason=%s", study_uid, QUIET_PERIOD)
                done.append(study_uid)
        return done
