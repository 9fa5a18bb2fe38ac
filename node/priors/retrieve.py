"""One job's priors, end to end: read the current study's header, find the patient's earlier studies on
the rule's source, fetch their image series into `<spool>/.priors/job-<id>/`, audit each fetch.

It runs in the node process (the worker thread that claimed the job), before the job goes to its worker
process: the node holds the audit log (its only writer) and the config's sources, and the worker process
stays free of network I/O. A PACS error never escapes as an exception: the outcome says what is missing
and why, and the caller decides (spec.required) whether the job runs without priors or fails.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from pydicom import dcmread

from node.audit import AuditLog
from node.config.schema import Source
from node.priors.association import PriorError, open_association, where
from node.priors.config import PriorsSpec
from node.priors.fetch import SeriesSink, get_series
from node.priors.find import CurrentStudy, find_image_series, find_prior_studies

log = logging.getLogger("ainode.priors")

_HEADER = ["StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "Modality"]
_WILDCARDS = set("*?\\")


@dataclass
class PriorsOutcome:
    series: dict[str, list[str]] = field(default_factory=dict)  # series UID -> files, newest study first
    studies: list[dict] = field(default_factory=list)  # per prior study: UID, date, series, instances
    missing: str | None = None  # why the plugin gets no priors
    error: bool = False  # missing because of the PACS (not because the patient has no earlier study)
    fetch_s: float = 0.0

    def audit_fields(self) -> dict:
        """For the job-start record."""
        if self.studies:
            return {"priors": [s["study_uid"] for s in self.studies]}
        return {"priors_missing": self.missing}

    def timings(self) -> dict[str, float]:
        return {"priors_fetch_s": round(self.fetch_s, 3), "prior_studies": len(self.studies),
                "prior_instances": sum(s["instances"] for s in self.studies)}


def current_study(path: str) -> CurrentStudy:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER)
    return CurrentStudy(study_uid=str(ds.get("StudyInstanceUID") or ""),
                        patient_id=str(ds.get("PatientID") or "").strip(),
                        study_date=str(ds.get("StudyDate") or ""), study_time=str(ds.get("StudyTime") or ""),
                        modality=str(ds.get("Modality") or "").upper())


class PriorRetriever:
    def __init__(self, root: Path, sources: Mapping[str, Source], node_ae: str, audit: AuditLog) -> None:
        self.root = Path(root)
        self.sources = dict(sources)
        self.node_ae = node_ae
        self.audit = audit

    def folder(self, job_id: int) -> Path:
        return self.root / f"job-{job_id}"

    def clear(self) -> None:
        """Remove every job's priors (at start-up: folders a crash left behind; no job is running yet)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def release(self, job_id: int) -> None:
        """Remove a job's priors once the job has ended."""
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def retrieve(self, job_id: int, study_uid: str, first_instance: str, spec: PriorsSpec,
                 cancelled: Callable[[], bool] = lambda: False) -> PriorsOutcome:
        """Find and fetch; `first_instance` (a spool file of the job) says whose priors and of what modality."""
        t0 = time.monotonic()
        out = PriorsOutcome()
        src = self.sources.get(spec.source)
        try:
            current = current_study(first_instance)
        except Exception as exc:  # noqa: BLE001 - a spool file that cannot be read is the job's own error
            out.missing = f"cannot read the study's header: {type(exc).__name__}"
            return out
        if src is None:
            out.missing, out.error = f"source '{spec.source}' is not configured under sources", True
        elif not current.patient_id:
            out.missing = "the study has no PatientID to search priors by"
        elif _WILDCARDS & set(current.patient_id):
            out.missing = "the PatientID holds C-FIND wildcard characters (* ? \\); not searched"
        else:
            try:
                self._fetch(job_id, study_uid, current, src, spec, out, t0 + spec.timeout_s, cancelled)
            except Exception as exc:  # noqa: BLE001 - a PACS or disk error must not leave the job claimed
                self.release(job_id)
                out.series, out.studies = {}, []
                out.missing = str(exc) if isinstance(exc, PriorError) else f"{type(exc).__name__}: {exc}"
                out.error = True
                log.warning("priors not fetched job_id=%d source=%s: %s", job_id, spec.source, out.missing)
                self.audit.append("prior-fetched", "failure", study_uid=study_uid, job_id=job_id, source=spec.source,
                                  source_ae=src.ae_title, error=out.missing[:500])
        out.fetch_s = time.monotonic() - t0
        return out

    def _fetch(self, job_id: int, study_uid: str, current: CurrentStudy, src: Source, spec: PriorsSpec,
               out: PriorsOutcome, deadline: float, cancelled: Callable[[], bool]) -> None:
        sink = SeriesSink(current.patient_id)
        with open_association(src, self.node_ae, sink) as assoc:
            candidates = find_prior_studies(assoc, src, current, spec)
            for prior in candidates:
                if len(out.studies) >= spec.count:
                    break
                series = find_image_series(assoc, src, prior.study_uid,
                                           current.modality if spec.same_modality else None)
                fetched: dict[str, list[str]] = {}
                for s in series:
                    files = get_series(assoc, src, sink, prior.study_uid, s.series_uid,
                                       self.folder(job_id) / prior.study_uid / s.series_uid, deadline, cancelled)
                    if files:
                        fetched[s.series_uid] = files
                if series and not fetched:
                    raise PriorError(f"{where(src)} sent none of the instances of a prior study over C-GET: check "
                                     "that it may send to our AE title (C-GET storage sub-operations)")
                if not fetched:
                    continue
                n = sum(map(len, fetched.values()))
                out.series.update(fetched)
                out.studies.append({"study_uid": prior.study_uid, "study_date": prior.study_date,
                                    "series": len(fetched), "instances": n})
                self.audit.append("prior-fetched", study_uid=study_uid, job_id=job_id,
                                  prior_study_uid=prior.study_uid, series_uids=list(fetched), instances=n,
                                  source=spec.source, source_ae=src.ae_title)
                log.info("prior fetched job_id=%d prior_study=%s series=%d instances=%d source=%s", job_id,
                         prior.study_uid, len(fetched), n, src.ae_title)
        if not out.studies:
            out.missing = (f"no earlier {current.modality + ' ' if spec.same_modality else ''}study of the "
                           f"patient on {src.ae_title}" + (f" within {spec.max_age_days} days"
                                                          if spec.max_age_days else ""))
