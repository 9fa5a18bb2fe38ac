"""HTTP API of a running node: auth failures, the audit of API reads, filters, timeline, /metrics, schemathesis."""

import os
import re
import subprocess
import sys
from datetime import datetime

import pytest

from node.synth import write_chest_ct
from tests.support.api import ADMIN_TOKEN, IT_PASSWORD, VIEWER_TOKEN, api_config, base_url, basic, bearer, call
from tests.support.pipeline import events, lung_config, send, status
from tests.support.wait import wait_until


def _ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["ts"]).timestamp()


def _metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(sel)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$",
                  text, re.M)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return float(m.group(1))


def test_api_auth_audit_filters_timeline_metrics(tmp_path, orthanc, node_factory, monkeypatch):
    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0)
    cfg = lung_config(orthanc)
    cfg["rules"].append({"name": "nodule-mr", "series": {"modality": "MR"}, "plugin": "ct_nodule"})  # locks a model
    cfg["plugins"] = {"ct_lung": {}, "ct_nodule": {}}
    node = node_factory({**cfg, "api": api_config(monkeypatch)})
    url = base_url(node)
    send(node, ct.files)
    wait_until(lambda: "state=dispatched" in status(node), 120, "the study to be dispatched")
    admin, viewer = bearer(ADMIN_TOKEN), bearer(VIEWER_TOKEN)

    # auth failures
    s, body, hdrs = call(f"{url}/api/studies")
    assert s == 401 and "Basic" in hdrs["www-authenticate"]
    assert call(f"{url}/api/studies", bearer("wrong"))[0] == 401
    assert call(f"{url}/api/studies", basic("it", "wrong"))[0] == 401
    assert call(f"{url}/metrics")[0] == 401
    s, body, _ = call(f"{url}/api/audit", viewer)
    assert s == 403 and "admin role" in body["detail"]
    assert call(f"{url}/api/jobs/1/requeue", viewer, method="POST")[0] == 403
    assert call(f"{url}/api/studies", basic("it", IT_PASSWORD))[0] == 200

    # studies and filters
    s, rows, _ = call(f"{url}/api/studies", viewer)
    assert s == 200 and [r["study_uid"] for r in rows] == [ct.study_uid]
    st = rows[0]
    assert st["state"] == "routed" and st["modalities"] == ["CT"] and st["instances"] == 40
    assert "patient_id" not in st and st["completion_reason"] == "quiet-period"
    [job] = st["jobs"]
    assert job["state"] == "dispatched" and job["plugin"] == "ct_lung" and job["dispatch_counts"] == {"sent": 2}
    assert job["stages_s"]["plugin_s"] > 0 and job["queue_wait_s"] is not None
    for query, expected in [("state=routed", 1), ("state=receiving", 0), ("modality=CT", 1), ("modality=MR", 0),
                            ("rule=lung", 1), ("rule=other", 0),
                            ("job_state=dispatched", 1), ("job_state=dead-letter", 0), ("state=routed&modality=CT", 1), ("since=2000-01-01T00:00:00", 1),
                            ("since=2999-01-01T00:00:00", 0), ("until=2000-01-01T00:00:00", 0)]:
        s, rows, _ = call(f"{url}/api/studies?{query}", viewer)
        assert s == 200 and len(rows) == expected, query
    assert call(f"{url}/api/studies?since=yesterday", viewer)[0] == 422

    # one study's timeline: store timestamps and its audit records, in order
    s, tl, _ = call(f"{url}/api/studies/{ct.study_uid}/timeline", viewer)
    assert s == 200 and tl["instances_stored"] == 40
    names = [e["event"] for e in tl["events"]]
    for a, b in [("first-instance", "study-complete"), ("study-complete", "rule-matched"), ("job-queued", "job-start"),
                 ("job-start", "job-end"), ("job-end", "object-sent"), ("object-sent", "job-dispatched")]:
        assert a in names and b in names and names.index(a) < names.index(b), names
    assert all("patient_id" not in e["details"] for e in tl["events"])
    assert {e["source"] for e in tl["events"]} == {"audit", "store"}
    assert call(f"{url}/api/studies/1.2.3.4/timeline", viewer)[0] == 404

    s, jobs, _ = call(f"{url}/api/jobs?state=dispatched", viewer)
    assert [j["id"] for j in jobs] == [job["id"]]
    s, dests, _ = call(f"{url}/api/destinations", viewer)
    assert dests == [{"name": "pacs", "configured": True, "dispatch_counts": {"sent": 2},
                      "last_sent_at": dests[0]["last_sent_at"]}]
    s, plugins, _ = call(f"{url}/api/plugins", viewer)
    [lung] = [p for p in plugins if p["name"] == "ct_lung"]
    assert lung["jobs"] == {"dispatched": 1} and lung["finished"] == 1 and lung["latency_mean_s"] > 0
    s, models, _ = call(f"{url}/api/models", viewer)
    [nodule] = models
    assert nodule["model"] == "ct_nodule" and nodule["version"] == "0.1.0" and nodule["plugin"] == "ct_nodule"
    assert nodule["locked"] and len(nodule["digest"]) == 64 and nodule["health"] == "unused"
    s, body, _ = call(f"{url}/api/jobs/{job['id']}/requeue", admin, method="POST")
    assert s == 409 and "dispatched" in body["detail"]

    # /metrics after the study went through
    s, text, _ = call(f"{url}/metrics", viewer)
    assert s == 200
    assert _metric(text, "ainode_instances_received_total", calling_ae="STORESCU") == 40
    stored_bytes = sum(r["bytes"] for r in events(node, "instance-stored"))
    assert stored_bytes > 40 * 100_000
    assert _metric(text, "ainode_received_bytes_total", calling_ae="STORESCU") == stored_bytes
    assert _metric(text, "ainode_associations_total", outcome="accepted") >= 1
    assert _metric(text, "ainode_studies_completed_total", reason="quiet-period") == 1
    assert _metric(text, "ainode_job_stage_seconds_count", plugin="ct_lung", stage="plugin") == 1
    assert _metric(text, "ainode_job_stage_seconds_count", plugin="ct_lung", stage="total") == 1
    assert _metric(text, "ainode_dispatch_success_total", destination="pacs") == 2
    # the SEG's delivery, timed from the study's completion and from its last image, as the audit records say
    [done] = [r for r in events(node, "study-complete") if r["outcome"] == "success"]
    [sent] = [r for r in events(node, "object-sent") if r["kind"] == "SEG"]
    last = max(_ts(r) for r in events(node, "instance-stored"))
    seg = dict(destination="pacs", kind="SEG")  # labels in the order /metrics prints them (sorted)
    assert _metric(text, "ainode_result_latency_seconds_sum", **seg, since="complete") == pytest.approx(
        _ts(sent) - _ts(done), abs=1e-3)
    assert _metric(text, "ainode_result_latency_seconds_sum", **seg, since="last_image") == pytest.approx(
        _ts(sent) - last, abs=1e-3)
    assert _metric(text, "ainode_result_latency_seconds_count", **seg, since="last_image") == 1
    assert _metric(text, "ainode_queue_depth", priority="stat") == 0
    assert _metric(text, "ainode_queue_depth", priority="routine") == 0

    # the audit log: admin only; every access above is in it, without query strings
    s, recs, _ = call(f"{url}/api/audit?event=api-access&limit=5000", admin)
    assert s == 200
    by = [(r.get("user"), r.get("role"), r["method"], r["path"], r["status"]) for r in recs]
    assert (None, None, "GET", "/api/studies", 401) in by
    assert ("it", None, "GET", "/api/studies", 401) in by  # a known user with a wrong password
    assert ("dash", "viewer", "GET", "/api/audit", 403) in by
    assert ("dash", "viewer", "POST", "/api/jobs/1/requeue", 403) in by
    assert ("it", "admin", "GET", "/api/studies", 200) in by
    assert ("dash", "viewer", "GET", "/metrics", 200) in by
    fields = {"seq", "ts", "event", "outcome", "node", "user", "role", "method", "path", "status", "peer_ip", "prev",
              "hash"}
    assert all("?" not in r["path"] and set(r) <= fields for r in recs)  # no query values
    assert sum(1 for b in by if b[3] == "/api/studies" and b[4] == 200) >= 10

    # radiologist feedback on a finding, and drift alerts (none: one study, no baseline yet)
    s, found, _ = call(f"{url}/api/jobs/1/findings", viewer)
    assert s == 200 and [f["number"] for f in found][:1] == [1] and found[0]["measurements"]
    s, fb, _ = call(f"{url}/api/jobs/1/findings/1/feedback", viewer, "POST", {"verdict": "correct", "value": 2.5})
    assert s == 201 and fb["verdict"] == "correct" and fb["model"] == "ct_lung:1.0.0"
    s, err, _ = call(f"{url}/api/jobs/1/findings/99/feedback", viewer, "POST", {"verdict": "accept"})
    assert s == 422 and "there is no finding 99" in err["detail"]
    assert call(f"{url}/api/jobs/1/findings/1/feedback", viewer, "POST", {"verdict": "maybe"})[0] == 422
    assert call(f"{url}/api/alerts", viewer)[:2] == (200, [])
    assert "# HELP ainode_model_drift_alert " in call(f"{url}/metrics", viewer)[1]

    # schemathesis over the OpenAPI schema, authenticated as admin: no server errors
    s, schema, _ = call(f"{url}/openapi.json")
    assert s == 200 and "/api/studies/{study_uid}/timeline" in schema["paths"]
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
                        "--checks", "not_a_server_error", "--max-examples", "10", "--seed", "1", "--phases", "examples,coverage,fuzzing",
                        "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "--request-timeout", "30"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
    assert node.stop() == 0
    assert events(node, "node-stop")[-1]["clean"] is True
