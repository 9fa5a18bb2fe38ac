"""Read-only views of the store for the API and the IT page; no patient names or IDs leave here."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from node.store import Store
from node.store.models import PRIORITY, Dispatch, Job, JobState, ModelVersion, Series, Study

PRIORITY_NAME = {v: k for k, v in PRIORITY.items()}
TERMINAL = (JobState.DISPATCHED, JobState.DONE_LOCAL, JobState.FAILED, JobState.DEAD_LETTER)
# audit fields a status view never shows: patient data and the chain's own bookkeeping
HIDDEN_FIELDS = {"patient_id", "patient_name", "prev", "hash", "node"}
NOT_TIMELINE = {"instance-stored", "api-access"}  # one per instance / request: summarised, not listed


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 3)


def job_row(j: Job, dispatch_counts: dict[str, int] | None = None, last_sent: float | None = None) -> dict:
    timings = j.timings or {}
    stages = {k: v for k, v in timings.items() if k.endswith("_s") and isinstance(v, (int, float))}
    return {
        "id": j.id, "study_uid": j.study_uid, "rule": j.rule, "plugin": j.plugin,
        "plugin_version": j.plugin_version, "priority": PRIORITY_NAME.get(j.priority, str(j.priority)),
        "state": j.state, "attempts": j.attempts, "error": j.error, "destinations": list(j.destinations or []),
        "created_at": _r(j.created_at), "started_at": _r(j.started_at), "finished_at": _r(j.finished_at),
        "queue_wait_s": _span(j.created_at, j.started_at), "stages_s": stages,
        "dispatch_s": _span(j.started_at + timings["total_s"] if j.started_at and "total_s" in timings else None,
                            last_sent),
        "dispatch_counts": dispatch_counts or {},
    }


def _study_row(st: Study, modalities: list[str], jobs: list[dict]) -> dict:
    return {
        "study_uid": st.study_uid, "state": st.state, "calling_ae": st.calling_ae,
        "instances": st.instance_count, "modalities": modalities,
        "first_received_at": _r(st.first_received_at), "last_received_at": _r(st.last_received_at),
        "completed_at": _r(st.completed_at), "completion_reason": st.completion_reason, "routed_at": _r(st.routed_at),
        "receive_s": _span(st.first_received_at, st.last_received_at),
        "complete_wait_s": _span(st.last_received_at, st.completed_at),
        "route_s": _span(st.completed_at, st.routed_at),
        "jobs": jobs,
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")


def _store_events(study: dict) -> list[dict]:
    """The state changes the store timestamps: the same story as the audit records, from the other source."""
    marks = [("first-instance", study["first_received_at"], {}), ("last-instance", study["last_received_at"], {}),
             ("complete", study["completed_at"], {"reason": study["completion_reason"]}),
             ("routed", study["routed_at"], {})]
    for j in study["jobs"]:
        ids = {"job_id": j["id"], "plugin": j["plugin"]}
        marks += [("job-queued", j["created_at"], ids), ("job-started", j["started_at"], ids),
                  (f"job-{j['state']}", j["finished_at"], ids)]
    return [{"ts": _iso(t), "event": name, "outcome": None, "source": "store", "seq": None, "details": d}
            for name, t, d in marks if t is not None]


class Views:
    def __init__(self, store: Store, audit_path: Path) -> None:
        self.store = store
        self.audit_path = audit_path

    def _jobs_of(self, s, study_uids: list[str]) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
        if not study_uids:
            return {}
        jobs = list(s.scalars(select(Job).where(Job.study_uid.in_(study_uids)).order_by(Job.id)))
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        last: dict[int, float] = {}
        ids = [j.id for j in jobs]
        if ids:
            for job_id, state, n, sent in s.execute(
                    select(Dispatch.job_id, Dispatch.state, func.count(), func.max(Dispatch.sent_at))
                    .where(Dispatch.job_id.in_(ids)).group_by(Dispatch.job_id, Dispatch.state)):
                counts[job_id][state] = n
                if sent is not None:
                    last[job_id] = max(sent, last.get(job_id, 0.0))
        out: dict[str, list[dict]] = defaultdict(list)
        for j in jobs:
            out[j.study_uid].append(job_row(j, counts[j.id], last.get(j.id)))
        return out

    def studies(self, *, state: str | None = None, since: float | None = None, until: float | None = None,
                modality: str | None = None, rule: str | None = None, job_state: str | None = None,
                limit: int = 100) -> list[dict]:
        """Newest first. `since`/`until` bound the first instance's arrival (epoch seconds)."""
        with self.store.session() as s:
            q = select(Study)
            if state:
                q = q.where(Study.state == state)
            if since is not None:
                q = q.where(Study.first_received_at >= since)
            if until is not None:
                q = q.where(Study.first_received_at <= until)
            if modality:
                q = q.where(Study.study_uid.in_(select(Series.study_uid).where(Series.modality == modality.upper())))
            if rule:
                q = q.where(Study.study_uid.in_(select(Job.study_uid).where(Job.rule == rule)))
            if job_state:
                q = q.where(Study.study_uid.in_(select(Job.study_uid).where(Job.state == job_state)))
            studies = list(s.scalars(q.order_by(Study.first_received_at.desc()).limit(limit)))
            uids = [st.study_uid for st in studies]
            mods: dict[str, set[str]] = defaultdict(set)
            if uids:
                for uid, mod in s.execute(select(Series.study_uid, Series.modality).where(Series.study_uid.in_(uids))):
                    if mod:
                        mods[uid].add(mod)
            jobs = self._jobs_of(s, uids)
            return [_study_row(st, sorted(mods[st.study_uid]), jobs.get(st.study_uid, [])) for st in studies]

    def study(self, study_uid: str) -> dict | None:
        with self.store.session() as s:
            st = s.get(Study, study_uid)
            if st is None:
                return None
            mods = sorted({m for m in s.scalars(select(Series.modality).where(Series.study_uid == study_uid)) if m})
            return _study_row(st, mods, self._jobs_of(s, [study_uid]).get(study_uid, []))

    def audit_records(self, *, study_uid: str | None = None, event: str | None = None, since_seq: int = 0,
                      limit: int | None = None, hide: set[str] | frozenset = frozenset()) -> list[dict]:
        """Records in file order. Scans the log: fine for a status view, not for analytics."""
        out: list[dict] = []
        if not self.audit_path.exists():
            return out
        with open(self.audit_path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec.get("seq", 0) <= since_seq or (event and rec.get("event") != event) \
                        or (study_uid and rec.get("study_uid") != study_uid):
                    continue
                out.append({k: v for k, v in rec.items() if k not in hide})
        return out[-limit:] if limit else out

    def timeline(self, study_uid: str) -> dict | None:
        """Every state change of a study, oldest first: the store's timestamps and the study's audit records."""
        study = self.study(study_uid)
        if study is None:
            return None
        recs = self.audit_records(study_uid=study_uid, hide=HIDDEN_FIELDS)
        stored = [r for r in recs if r["event"] == "instance-stored"]
        events = [{"ts": r["ts"], "event": r["event"], "outcome": r["outcome"],
                   "source": "audit", "seq": r["seq"],
                   "details": {k: v for k, v in r.items() if k not in {"ts", "event", "outcome", "seq", "study_uid"}}}
                  for r in recs if r["event"] not in NOT_TIMELINE]
        events += _store_events(study)
        events.sort(key=lambda e: (e["ts"], e["source"] != "store"))
        return {"study": study, "instances_stored": len(stored),
                "first_instance_ts": stored[0]["ts"] if stored else None,
                "last_instance_ts": stored[-1]["ts"] if stored else None,
                "events": events}

    def jobs(self, *, state: str | None = None, plugin: str | None = None, limit: int = 100) -> list[dict]:
        with self.store.session() as s:
            q = select(Job)
            if state:
                q = q.where(Job.state == state)
            if plugin:
                q = q.where(Job.plugin == plugin)
            jobs = list(s.scalars(q.order_by(Job.id.desc()).limit(limit)))
            by_study = self._jobs_of(s, sorted({j.study_uid for j in jobs}))
            rows = {r["id"]: r for rows in by_study.values() for r in rows}
            return [rows[j.id] for j in jobs]

    def queue(self) -> dict[str, Any]:
        with self.store.session() as s:
            depth = {name: 0 for name in PRIORITY}
            for prio, n in s.execute(select(Job.priority, func.count()).where(Job.state == JobState.QUEUED)
                                     .group_by(Job.priority)):
                depth[PRIORITY_NAME.get(prio, str(prio))] = n
            running = s.scalar(select(func.count()).where(Job.state == JobState.RUNNING)) or 0
        return {"queued": depth, "running": running}

    def problems(self, limit: int = 100) -> list[dict]:
        """Failed jobs and jobs with dead-letter dispatches: what the requeue button is for."""
        with self.store.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.state.in_((JobState.FAILED, JobState.DEAD_LETTER)))
                                  .order_by(Job.id.desc()).limit(limit)))
            out = []
            for j in jobs:
                dead = list(s.execute(select(Dispatch.destination, Dispatch.kind, Dispatch.last_error)
                                      .where(Dispatch.job_id == j.id, Dispatch.state == "dead-letter")))
                out.append({"job_id": j.id, "study_uid": j.study_uid, "plugin": j.plugin, "state": j.state,
                            "error": j.error, "dead_letter": [{"destination": d, "kind": k, "error": e}
                                                             for d, k, e in dead]})
            return out

    def destinations(self, names: list[str]) -> list[dict]:
        """Dispatch states per destination (configured ones first, then any others in the store)."""
        with self.store.session() as s:
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            last: dict[str, float] = {}
            for dest, state, n, sent in s.execute(
                    select(Dispatch.destination, Dispatch.state, func.count(), func.max(Dispatch.sent_at))
                    .group_by(Dispatch.destination, Dispatch.state)):
                counts[dest][state] = n
                if sent is not None:
                    last[dest] = max(sent, last.get(dest, 0.0))
        all_names = list(dict.fromkeys([*names, *sorted(counts)]))
        return [{"name": n, "configured": n in names, "dispatch_counts": counts.get(n, {}),
                 "last_sent_at": _r(last.get(n))} for n in all_names]

    def plugin_stats(self, since: float | None = None) -> dict[str, dict]:
        """Per plugin: jobs per state and latency (total_s) of finished jobs."""
        with self.store.session() as s:
            q = select(Job.plugin, Job.state, Job.timings, Job.finished_at)
            if since is not None:
                q = q.where(Job.created_at >= since)
            rows = list(s.execute(q))
        out: dict[str, dict] = {}
        for plugin, state, timings, finished in rows:
            p = out.setdefault(plugin, {"jobs": {}, "latencies": [], "last_finished_at": None})
            p["jobs"][state] = p["jobs"].get(state, 0) + 1
            total = (timings or {}).get("total_s")
            if state in (JobState.DISPATCHED, JobState.DONE_LOCAL, JobState.RESULTS_BUILT) and total is not None:
                p["latencies"].append(float(total))
            if finished is not None:
                p["last_finished_at"] = max(finished, p["last_finished_at"] or 0.0)
        for p in out.values():
            lat = sorted(p.pop("latencies"))
            p["finished"] = len(lat)
            p["latency_mean_s"] = round(sum(lat) / len(lat), 3) if lat else None
            p["latency_p95_s"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None
            p["last_finished_at"] = _r(p["last_finished_at"])
        return out

    def model_versions(self) -> dict[tuple[str, str], dict]:
        with self.store.session() as s:
            return {(m.name, m.version): {"digest": m.digest, "first_used_at": _r(m.first_used_at)}
                    for m in s.scalars(select(ModelVersion))}


def day_ago() -> float:
    return time.time() - 86400
