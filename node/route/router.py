"""Turns complete studies into queued jobs (or 'no rule matched')."""

from __future__ import annotations

import logging
from typing import Sequence

from node.audit import AuditLog
from node.config.schema import Rule
from node.route.rules import SeriesFacts, StudyFacts, evaluate_all
from node.store import Store, StudyState

log = logging.getLogger("ainode.route")


class Router:
    def __init__(self, store: Store, audit: AuditLog, rules: Sequence[Rule]) -> None:
        self.store = store
        self.audit = audit
        self.rules = list(rules)

    def facts(self, study_uid: str) -> StudyFacts | None:
        st = self.store.get_study(study_uid)
        if st is None:
            return None
        series = [
            SeriesFacts(s.series_uid, s.modality, s.body_part, s.description, s.slice_thickness, s.instance_count)
            for s in self.store.series_of(study_uid)
        ]
        return StudyFacts(study_uid, st.calling_ae, st.study_description, series)

    def route_pending(self) -> int:
        """Route every complete study; also picks up those left complete by a crash."""
        n = 0
        for study_uid in self.store.studies_in_state(StudyState.COMPLETE):
            self.route(study_uid)
            n += 1
        return n

    def route(self, study_uid: str) -> list[int]:
        facts = self.facts(study_uid)
        if facts is None:
            return []
        ev = evaluate_all(self.rules, facts)
        matches = ev.matches
        job_ids = self.store.route(study_uid, [job for _, job in matches])
        if not matches:
            self.audit.append("no-rule-matched", study_uid=study_uid,
                              series=len(facts.series), rules_evaluated=len(self.rules),
                              not_matched=ev.not_matched or None)
            log.info("no rule matched study_uid=%s", study_uid)
        elif ev.missing_required:
            # Other rules fired; say why these (which selected a series) did not, or nobody will know.
            self.audit.append("rules-not-matched", study_uid=study_uid, not_matched=ev.missing_required)
        for name, why in ev.missing_required.items():
            log.info("rule not matched study_uid=%s rule=%s reason=%s", study_uid, name, why)
        for (rule, job), job_id in zip(matches, job_ids):
            self.audit.append("rule-matched", study_uid=study_uid, rule=rule.name, plugin=rule.plugin,
                              priority=rule.priority, series_uid=job.series_uids[0], job_id=job_id,
                              destinations=job.destinations)
            log.info("rule matched study_uid=%s rule=%s job_id=%d", study_uid, rule.name, job_id)
        return job_ids
