"""Store operations of model monitoring: job outputs, shadow agreement and radiologist feedback.

Functions on a `Store` (not methods of it) so node/store/db.py stays small; writes take the store's
write lock like its own methods do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.store import Store
from node.store.models import (FindingFeedback, FindingStats, Job, JobOutputStats, ShadowAgreement)

VERDICTS = ("accept", "reject", "correct")


class FeedbackError(ValueError):
    """A feedback request names a job or finding the store does not hold, or an invalid verdict."""


def add_output_rows(s: Session, job: Job, output: dict, shadow: bool, now: float) -> None:
    """The job's output statistics (node/monitor/stats.py), inside the caller's transaction; a job run again
    (`ainode requeue`) replaces its earlier findings."""
    s.execute(delete(FindingStats).where(FindingStats.job_id == job.id))
    s.merge(JobOutputStats(job_id=job.id, study_uid=job.study_uid, rule=job.rule, plugin=job.plugin,
                           model=output["model"], scanner=output["scanner"], shadow=int(shadow),
                           finding_count=output["finding_count"], recorded_at=now))
    for n, f in enumerate(output["findings"], 1):
        s.merge(FindingStats(job_id=job.id, number=n, tracking_id=f["tracking_id"][:64],
                             finding_type=f["finding_type"][:64], confidence=f["confidence"],
                             measurements=f["measurements"]))


def _measurements(s: Session, job_id: int) -> dict[tuple[str, str], float]:
    """{(tracking id, concept): value} of a job's findings."""
    out = {}
    for f in s.scalars(select(FindingStats).where(FindingStats.job_id == job_id)):
        for m in f.measurements:
            out[(f.tracking_id, m["concept"])] = float(m["value"])
    return out


def compare(primary: dict[tuple[str, str], float], shadow: dict[tuple[str, str], float]) -> list[dict]:
    """Per measurement present in either job: both values, the absolute and relative difference."""
    rows = []
    for key in sorted(set(primary) | set(shadow)):
        a, b = primary.get(key), shadow.get(key)
        row = {"finding": key[0], "concept": key[1], "primary": a, "shadow": b}
        if a is not None and b is not None:
            row["abs_diff"] = round(abs(b - a), 4)
            row["rel_diff"] = round(abs(b - a) / abs(a), 4) if a else None
        rows.append(row)
    return rows


def record_agreements(store: Store, job_id: int, shadow_of: dict[str, str]) -> list[ShadowAgreement]:
    """After job `job_id` stored its outputs: record agreement for each shadow/primary pair it completes.

    `shadow_of` maps a shadow rule to its primary rule. Pairs are jobs of the same study."""
    made = []
    with store._write, store.session() as s, s.begin():
        out = s.get(JobOutputStats, job_id)
        if out is None:
            return []
        pairs: list[tuple[JobOutputStats, JobOutputStats]] = []
        others = list(s.scalars(select(JobOutputStats).where(JobOutputStats.study_uid == out.study_uid,
                                                             JobOutputStats.job_id != job_id)))
        for o in others:
            if shadow_of.get(out.rule) == o.rule:
                pairs.append((o, out))
            elif shadow_of.get(o.rule) == out.rule:
                pairs.append((out, o))
        now = time.time()
        for primary, shadow in pairs:
            if s.get(ShadowAgreement, shadow.job_id) is not None:
                continue
            rows = compare(_measurements(s, primary.job_id), _measurements(s, shadow.job_id))
            absd = [r["abs_diff"] for r in rows if r.get("abs_diff") is not None]
            reld = [r["rel_diff"] for r in rows if r.get("rel_diff") is not None]
            a = ShadowAgreement(shadow_job_id=shadow.job_id, primary_job_id=primary.job_id,
                                study_uid=out.study_uid, shadow_model=shadow.model, primary_model=primary.model,
                                counts_equal=int(primary.finding_count == shadow.finding_count),
                                max_abs_diff=max(absd) if absd else None, max_rel_diff=max(reld) if reld else None,
                                details=rows, recorded_at=now)
            s.add(a)
            made.append(a)
    return made


def shadow_report(store: Store) -> list[dict]:
    """Per (shadow model, primary model): studies compared, share with equal finding counts, mean/max difference."""
    groups: dict[tuple[str, str], list[ShadowAgreement]] = {}
    with store.session() as s:
        for a in s.scalars(select(ShadowAgreement).order_by(ShadowAgreement.shadow_job_id)):
            groups.setdefault((a.shadow_model, a.primary_model), []).append(a)
    out = []
    for (shadow, primary), rows in groups.items():
        rel = [r.max_rel_diff for r in rows if r.max_rel_diff is not None]
        out.append({"shadow_model": shadow, "primary_model": primary, "studies": len(rows),
                    "count_agreement": round(sum(r.counts_equal for r in rows) / len(rows), 3),
                    "mean_max_rel_diff": round(sum(rel) / len(rel), 4) if rel else None,
                    "max_rel_diff": max(rel) if rel else None})
    return out


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    job_id: int
    finding_number: int
    verdict: str
    value: float | None
    model: str


def record_feedback(store: Store, job_id: int, finding_number: int, verdict: str, value: float | None = None,
                    reviewer: str | None = None) -> FeedbackRecord:
    """Store a radiologist's verdict on finding `finding_number` (1-based, as `ainode monitor --job` lists)
    of job `job_id`. The CLI and the HTTP API call this; the node audits it (radiologist-feedback)."""
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if verdict == "correct" and value is None:
        raise FeedbackError("verdict 'correct' needs the corrected value (--value)")
    with store._write, store.session() as s, s.begin():
        out = s.get(JobOutputStats, job_id)
        if out is None:
            raise FeedbackError(f"job {job_id} has no recorded outputs (not run yet, failed, or not a plugin job)")
        if s.get(FindingStats, (job_id, finding_number)) is None:
            raise FeedbackError(f"job {job_id} has {out.finding_count} finding(s); there is no finding "
                                f"{finding_number} (findings are numbered from 1)")
        fb = FindingFeedback(job_id=job_id, finding_number=finding_number, verdict=verdict, value=value,
                             reviewer=reviewer, recorded_at=time.time())
        s.add(fb)
        s.flush()
        return FeedbackRecord(fb.id, job_id, finding_number, verdict, value, out.model)


def unaudited_feedback(store: Store) -> list[tuple[FindingFeedback, str]]:
    """Feedback rows the node has not audited yet, with their job's study UID."""
    with store.session() as s:
        rows = s.execute(select(FindingFeedback, JobOutputStats.study_uid)
                         .join(JobOutputStats, JobOutputStats.job_id == FindingFeedback.job_id)
                         .where(FindingFeedback.audited_at.is_(None)).order_by(FindingFeedback.id)).all()
        return [(fb, uid) for fb, uid in rows]


def mark_audited(store: Store, ids: Sequence[int]) -> None:
    with store._write, store.session() as s, s.begin():
        for fb in s.scalars(select(FindingFeedback).where(FindingFeedback.id.in_(list(ids)))):
            fb.audited_at = time.time()


def feedback_report(store: Store) -> list[dict]:
    """Per model version: verdicts and the agreement rate (accepted / all verdicts)."""
    counts: dict[str, dict[str, int]] = {}
    with store.session() as s:
        rows = s.execute(select(JobOutputStats.model, FindingFeedback.verdict)
                         .join(JobOutputStats, JobOutputStats.job_id == FindingFeedback.job_id)).all()
    for model, verdict in rows:
        c = counts.setdefault(model, dict.fromkeys(VERDICTS, 0))
        c[verdict] += 1
    return [{"model": m, **c, "total": sum(c.values()), "agreement_rate": round(c["accept"] / sum(c.values()), 3)}
            for m, c in sorted(counts.items())]


def job_findings(store: Store, job_id: int) -> list[FindingStats]:
    with store.session() as s:
        return list(s.scalars(select(FindingStats).where(FindingStats.job_id == job_id)
                              .order_by(FindingStats.number)))
