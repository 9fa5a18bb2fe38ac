"""Declares studies complete: by evidence from the sending PACS, else after a quiet period, or when forced.

The quiet period is both the fallback (no queryable source, PACS down, counts never match) and the
upper bound: a study quiet for `quiet_period_s` is complete whatever its PACS says.
The quiet period counts from when the node last opened its port, never from before: a sender cut off
by a crash or a restart resends, and a half-received study must not complete in the meantime.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from node.assemble.evidence import EvidenceChecker
from node.audit import AuditLog
from node.config.schema import Source
from node.store import Store
from node.store.models import CompletionReason

log = logging.getLogger("ainode.assemble")

QUIET_PERIOD = CompletionReason.QUIET_PERIOD
FORCE_ACTION = "complete"  # operator request action (store.add_request) carried out here


class Assembler:
    def __init__(self, store: Store, audit: AuditLog, quiet_period_s: float, *,
                 sources: Mapping[str, Source] | None = None, node_ae: str = "AINODE",
                 evidence_check_s: float = 0.4, evidence_min_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time, on_complete: Callable[[], None] | None = None) -> None:
        """`on_complete` is called (from a query thread) when counts complete a study, so the caller can tick
        at once instead of at its next poll."""
        self.store = store
        self.audit = audit
        self.quiet_period_s = quiet_period_s
        self.evidence_check_s = evidence_check_s
        self.clock = clock
        self.open_since = clock()  # the service moves this to when its SCP starts accepting
        self._released: set[str] = set()  # studies whose sender has just released its association
        self._released_lock = threading.Lock()
        queryable = {name: s for name, s in (sources or {}).items() if s.query}
        self.evidence = EvidenceChecker(store, audit, queryable, node_ae, evidence_check_s,
                                        evidence_min_interval_s, clock=clock,
                                        on_complete=on_complete) if queryable else None

    def sender_done(self, study_uids: set[str]) -> None:
        """A sender released the association that carried these studies: a PACS pushing a study sends it
        whole and then releases, so its counts are worth asking for at once, without waiting for
        `evidence_check_s` of quiet. Only a hint: the checks and limits of evidence.py still apply."""
        if self.evidence:
            with self._released_lock:
                self._released |= study_uids

    def tick(self, now: float | None = None) -> list[str]:
        """Complete what can be completed now; return the UIDs of studies completed since the last tick."""
        now = self.clock() if now is None else now
        done = self.evidence.drain() if self.evidence else []
        with self._released_lock:
            released, self._released = self._released, set()
        quiet_cutoff = now - self.quiet_period_s
        look_back = max(quiet_cutoff, now - self.evidence_check_s) if self.evidence else quiet_cutoff
        quiet_since_open = self.open_since <= quiet_cutoff  # senders cut off by a restart had time to resend
        if self.evidence:
            receiving = self.store.receiving_studies(None)
            self.evidence.retain({st.study_uid for st in receiving})
            receiving = [st for st in receiving if st.last_received_at <= look_back or st.study_uid in released]
        else:
            receiving = self.store.receiving_studies(look_back)
        for st in receiving:
            if st.last_received_at <= quiet_cutoff and quiet_since_open:
                if self._complete_quiet(st.study_uid, quiet_cutoff):
                    done.append(st.study_uid)
            elif self.evidence:
                self.evidence.consider(st)
        done.extend(self._forced())
        return done

    def _complete_quiet(self, study_uid: str, cutoff: float) -> bool:
        if not self.store.mark_complete(study_uid, QUIET_PERIOD, cutoff):
            return False
        why_not = self.evidence.forget(study_uid) if self.evidence else None
        st = self.store.get_study(study_uid)
        self.audit.append("study-complete", study_uid=study_uid, reason=QUIET_PERIOD,
                          instances=st.instance_count if st else None, revision=st.revision if st else None,
                          evidence=why_not)
        log.info("study complete study_uid=%s reason=%s", study_uid, QUIET_PERIOD)
        return True

    def _forced(self) -> list[str]:
        """Operator requests to complete a study now (they are left in the store, like requeue requests)."""
        done = []
        for req in self.store.pending_requests():
            if req.action != FORCE_ACTION:
                continue
            outcome = self.store.force_complete(req.id)
            if outcome is None:  # another node sharing the store handled it first
                continue
            if not outcome["completed"]:
                self.audit.append("study-complete", "failure", study_uid=req.study_uid, request_id=req.id,
                                  requested_by=req.requested_by, reason=CompletionReason.FORCED,
                                  error=outcome["why"])
                continue
            if self.evidence:
                self.evidence.forget(req.study_uid)
            self.audit.append("study-complete", study_uid=req.study_uid, reason=CompletionReason.FORCED,
                              request_id=req.id, requested_by=req.requested_by,
                              instances=outcome["instances"], revision=outcome["revision"])
            log.info("study complete study_uid=%s reason=%s request_id=%d", req.study_uid,
                     CompletionReason.FORCED, req.id)
            done.append(req.study_uid)
        return done

    def close(self) -> None:
        if self.evidence:
            self.evidence.close()
