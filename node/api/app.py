"""The FastAPI app: JSON status endpoints, requeue, the audit log (admin), /metrics and the IT page.

Every request is audited (`api-access`: user, role, method, path, status; never the query string, which
could hold patient data). The node process is the only writer of the store and the audit log, and this
app runs inside it: reads use the Store's sessions, a requeue is a store request like `ainode requeue`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPBasic, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from node.api.auth import Authenticator, Principal
from node.api.queries import Views, day_ago
from node.audit import AuditLog
from node.config.schema import NodeConfig
from node.metrics import NodeMetrics
from node.monitor.drift import current_alerts
from node.monitor.records import FeedbackError, job_findings, record_feedback
from node.store import JobState, Store

log = logging.getLogger("ainode.api")
PAGE = Path(__file__).with_name("page.html")
PUBLIC = {"/openapi.json"}  # the schema only: no data
MAX_ID = 2**63 - 1  # the store's integer keys (SQLite, PostgreSQL bigint)

_bearer = HTTPBearer(auto_error=False, description="A token from api.tokens")
_basic = HTTPBasic(auto_error=False, realm="ainode", description="A user from api.basic")


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _models_in_use(cfg: NodeConfig) -> list[Any]:
    from node.models.lock import models_in_use

    try:
        return models_in_use(cfg)
    except Exception as exc:  # noqa: BLE001 - the node verified them at start; the list is informative
        log.warning("models in use not listed: %s", exc)
        return []


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: Literal["accept", "reject", "correct"]
    value: float | None = Field(None, description="The corrected value (verdict correct)")


def create_app(cfg: NodeConfig, store: Store, audit: AuditLog, auth: Authenticator,
               metrics: NodeMetrics) -> FastAPI:
    views = Views(store, audit.path)
    models = _models_in_use(cfg)
    destination_names = [*cfg.destinations, *cfg.dicomweb, *cfg.ris, *cfg.fhir]
    app = FastAPI(title="ainode", version="1", docs_url=None, redoc_url=None,
                  description="Status of the DICOM AI node: studies, jobs, destinations, plugins, models. "
                              "Bearer token or basic auth; the audit log and requeue need the admin role.")

    @app.middleware("http")
    async def audit_access(request: Request, call_next):  # type: ignore[no-untyped-def]
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if request.url.path not in PUBLIC:
                principal: Principal | None = getattr(request.state, "principal", None)
                audit.append("api-access", "success" if status < 400 else "failure",
                             user=principal.user if principal else getattr(request.state, "tried_user", None),
                             role=principal.role if principal else None, method=request.method,
                             path=request.url.path[:200], status=status,
                             peer_ip=request.client.host if request.client else None)

    def viewer(request: Request, _b=Depends(_bearer), _u=Depends(_basic)) -> Principal:  # type: ignore[no-untyped-def]
        attempt = auth.check(request.headers.get("authorization"))
        request.state.tried_user = attempt.user
        if attempt.principal is None:
            raise HTTPException(401, "authentication required: a bearer token from api.tokens or a user "
                                     "from api.basic", headers={"WWW-Authenticate": 'Basic realm="ainode"'})
        request.state.principal = attempt.principal
        return attempt.principal

    def admin(p: Principal = Depends(viewer)) -> Principal:
        if p.role != "admin":
            raise HTTPException(403, f"user {p.user} has role {p.role}; this needs the admin role")
        return p

    @app.get("/api/studies", tags=["studies"])
    def studies(state: str | None = None, since: datetime | None = Query(None, description="first arrival from"),
                until: datetime | None = Query(None, description="first arrival until"),
                modality: str | None = None, rule: str | None = None,
                job_state: str | None = Query(None, description="with a job in this state, e.g. dead-letter"),
                limit: int = Query(100, ge=1, le=1000), _: Principal = Depends(viewer)) -> list[dict]:
        """Studies, newest first, with their jobs and per-stage times; filters combine."""
        return views.studies(state=state, since=_epoch(since), until=_epoch(until), modality=modality,
                             rule=rule, job_state=job_state, limit=limit)

    @app.get("/api/studies/{study_uid}", tags=["studies"])
    def study(study_uid: str, _: Principal = Depends(viewer)) -> dict:
        row = views.study(study_uid)
        if row is None:
            raise HTTPException(404, "no such study on this node")
        return row

    @app.get("/api/studies/{study_uid}/timeline", tags=["studies"])
    def timeline(study_uid: str, _: Principal = Depends(viewer)) -> dict:
        """Every state change of the study with timestamps (store timestamps and its audit records)."""
        row = views.timeline(study_uid)
        if row is None:
            raise HTTPException(404, "no such study on this node")
        return row

    @app.get("/api/jobs", tags=["jobs"])
    def jobs(state: str | None = None, plugin: str | None = None, limit: int = Query(100, ge=1, le=1000),
             _: Principal = Depends(viewer)) -> list[dict]:
        return views.jobs(state=state, plugin=plugin, limit=limit)

    @app.get("/api/queue", tags=["jobs"])
    def queue(_: Principal = Depends(viewer)) -> dict:
        return views.queue()

    @app.post("/api/jobs/{job_id}/requeue", tags=["jobs"], status_code=202)
    def requeue(job_id: int = PathParam(ge=1, le=MAX_ID), p: Principal = Depends(admin)) -> dict:
        """Send a dead-letter job's results again or run a failed job again (the node audits the requeue)."""
        job = store.get_job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} on this node")
        if job.state not in (JobState.DEAD_LETTER, JobState.FAILED):
            raise HTTPException(409, f"job {job_id} is {job.state}; only failed and dead-letter jobs can be requeued")
        request_id = store.add_request("requeue", job_id=job_id, requested_by=f"api:{p.user}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the maintenance loop carries it out within a second
            req = store.get_request(request_id)
            if req is not None and req.handled_at is not None:
                return {"request_id": request_id, "outcome": req.outcome}
            time.sleep(0.1)
        return {"request_id": request_id, "outcome": None}

    @app.get("/api/problems", tags=["jobs"])
    def problems(_: Principal = Depends(viewer)) -> list[dict]:
        """Failed jobs and dead-letter dispatches, newest first."""
        return views.problems()

    @app.get("/api/destinations", tags=["destinations"])
    def destinations(_: Principal = Depends(viewer)) -> list[dict]:
        return views.destinations(destination_names)

    def plugin_rows() -> list[dict]:
        stats = views.plugin_stats()
        names = list(dict.fromkeys([*cfg.plugins, *(r.plugin for r in cfg.rules), *stats]))
        empty = {"jobs": {}, "finished": 0, "latency_mean_s": None, "latency_p95_s": None, "last_finished_at": None}
        return [{"name": n, "enabled": cfg.plugins[n].enabled if n in cfg.plugins else True,
                 "rules": [r.name for r in cfg.rules if r.plugin == n], **stats.get(n, empty)} for n in names]

    def model_rows() -> list[dict]:
        locked = views.model_versions()
        recent = views.plugin_stats(since=day_ago())
        out = []
        for m in models:
            s = recent.get(m.plugin, {"jobs": {}, "latency_mean_s": None})
            failed = s["jobs"].get(JobState.FAILED, 0)
            ended = sum(n for st, n in s["jobs"].items() if st not in (JobState.QUEUED, JobState.RUNNING))
            lock = locked.get((m.model, m.version))
            health = "unused" if not ended else ("ok" if failed / ended < 0.2 else "failing")
            out.append({"model": m.model, "version": m.version, "plugin": m.plugin, "locked": lock is not None,
                        "digest": lock["digest"] if lock else None,
                        "first_used_at": lock["first_used_at"] if lock else None,
                        "jobs_24h": ended, "failed_24h": failed, "latency_mean_s_24h": s["latency_mean_s"],
                        "health": health})
        return out

    @app.get("/api/plugins", tags=["plugins"])
    def plugins(_: Principal = Depends(viewer)) -> list[dict]:
        """Per plugin: jobs per state and the latency of finished jobs."""
        return plugin_rows()

    @app.get("/api/models", tags=["models"])
    def models_(_: Principal = Depends(viewer)) -> list[dict]:
        """Model versions in use, their lock (digest at first use) and health over the last 24 h."""
        return model_rows()

    @app.get("/api/audit", tags=["audit"])
    def audit_log(event: str | None = None, study_uid: str | None = None, since_seq: int = Query(0, ge=0, le=MAX_ID),
                  limit: int = Query(200, ge=1, le=5000), _: Principal = Depends(admin)) -> list[dict]:
        """Audit records (admin only), oldest first; the last `limit` that match."""
        return views.audit_records(event=event, study_uid=study_uid, since_seq=since_seq, limit=limit)

    def drift_alerts() -> list[dict]:
        return [a.as_dict() for a in current_alerts(store, cfg.monitoring)]

    @app.get("/api/alerts", tags=["models"])
    def alerts(_: Principal = Depends(viewer)) -> list[dict]:
        """Model outputs drifting from their baseline, per model version, scanner and metric."""
        return drift_alerts()

    @app.get("/api/jobs/{job_id}/findings", tags=["feedback"])
    def findings(job_id: int = PathParam(ge=1, le=MAX_ID), _: Principal = Depends(viewer)) -> list[dict]:
        """A job's findings, numbered from 1 as feedback refers to them."""
        return [{"number": f.number, "tracking_id": f.tracking_id, "finding_type": f.finding_type,
                 "confidence": f.confidence, "measurements": f.measurements} for f in job_findings(store, job_id)]

    @app.post("/api/jobs/{job_id}/findings/{number}/feedback", tags=["feedback"], status_code=201)
    def feedback(body: FeedbackIn, job_id: int = PathParam(ge=1, le=MAX_ID),
                 number: int = PathParam(ge=1, le=MAX_ID), p: Principal = Depends(viewer)) -> dict:
        """A radiologist's verdict on one finding: accept, reject, or correct (with the corrected value)."""
        try:
            rec = record_feedback(store, job_id, number, body.verdict, body.value, reviewer=f"api:{p.user}")
        except FeedbackError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"id": rec.id, "job_id": job_id, "finding": number, "verdict": rec.verdict, "model": rec.model}

    @app.get("/api/overview", tags=["page"])
    def overview(p: Principal = Depends(viewer)) -> dict:
        """Everything the IT page shows, in one request (one audit record per refresh)."""
        return {"user": p.user, "role": p.role, "queue": views.queue(), "studies": views.studies(limit=50),
                "problems": views.problems(), "destinations": views.destinations(destination_names),
                "plugins": plugin_rows(), "models": model_rows(), "alerts": drift_alerts()}

    @app.get("/metrics", tags=["metrics"], response_class=Response)
    def prometheus(_: Principal = Depends(viewer)) -> Response:
        metrics.set_drift_alerts(drift_alerts())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    def page(_: Principal = Depends(viewer)) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
