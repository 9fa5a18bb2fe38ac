"""The node's periodic monitoring task: raise and clear drift alerts, audit radiologist feedback.

Runs in the node's maintenance loop (node/service.py), the audit log's only writer. Logs carry the
model, scanner and metric only, never patient data.
"""

from __future__ import annotations

import logging
import time

from node.audit import AuditLog
from node.monitor.config import MonitoringSection
from node.monitor.drift import MetricDrift, current_alerts
from node.monitor.records import mark_audited, unaudited_feedback
from node.store import Store

log = logging.getLogger("ainode.monitor")


class DriftWatch:
    def __init__(self, store: Store, audit: AuditLog, cfg: MonitoringSection) -> None:
        self.store, self.audit, self.cfg = store, audit, cfg
        self._next = 0.0
        self.active: dict[tuple[str, str, str], MetricDrift] = {}

    def tick(self) -> None:
        self._audit_feedback()
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.cfg.check_interval_s
        alerts = {(a.model, a.scanner, a.metric): a for a in current_alerts(self.store, self.cfg)}
        for key, a in alerts.items():
            if key not in self.active:
                log.warning("model drift model=%s scanner=%s metric=%s ks=%.3f relative_change=%s "
                            "baseline_mean=%s window_mean=%s", a.model, a.scanner, a.metric, a.ks,
                            a.relative_change, a.baseline_mean, a.window_mean)
                self.audit.append("model-drift", "alert", **a.as_dict())
        for key in set(self.active) - set(alerts):
            a = self.active[key]
            log.info("model drift cleared model=%s scanner=%s metric=%s", a.model, a.scanner, a.metric)
            self.audit.append("model-drift", "cleared", model=a.model, scanner=a.scanner, metric=a.metric)
        self.active = alerts

    def _audit_feedback(self) -> None:
        rows = unaudited_feedback(self.store)
        for fb, study_uid in rows:
            self.audit.append("radiologist-feedback", study_uid=study_uid, job_id=fb.job_id,
                              finding=fb.finding_number, verdict=fb.verdict, value=fb.value, reviewer=fb.reviewer)
        if rows:
            mark_audited(self.store, [fb.id for fb, _ in rows])
