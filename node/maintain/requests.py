"""Carries out operator requests left in the store by the CLI (`ainode requeue`), and audits them."""

from __future__ import annotations

import logging

from node.audit import AuditLog
from node.store import Store

log = logging.getLogger("ainode.requests")


class RequestHandler:
    def __init__(self, store: Store, audit: AuditLog) -> None:
        self.store = store
        self.audit = audit

    def tick(self) -> int:
        handled = 0
        for req in self.store.pending_requests():
            if req.action != "requeue":
                continue
            outcome = self.store.requeue(req.id)
            if outcome is None:  # another node sharing the store handled it first
                continue
            self.audit.append("requeue", request_id=req.id, requested_by=req.requested_by,
                              job_id=req.job_id, study_uid=req.study_uid, **outcome)
            log.info("requeue request_id=%d resent=%d rerun=%d skipped=%d", req.id, len(outcome["resent"]),
                     len(outcome["rerun"]), len(outcome["skipped"]))
            handled += 1
        return handled
