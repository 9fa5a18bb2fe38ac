"""Model monitoring on a real node: per-job output stats, drift per scanner, radiologist feedback, shadow mode."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from node.synth import write_chest_ct
from tests.support.pipeline import events, query, result_instances, send
from tests.support.wait import wait_until

SMALL = {"slices": 24, "rows": 96, "cols": 96, "pixel_spacing": 3.5, "slice_thickness": 5.0}
SCANNER_B = {"Manufacturer": "OTHERVENDOR", "ManufacturerModelName": "Scan B", "StationName": "CTB1"}
HU_OFFSET_B = 450  # lungs at about -400 HU instead of -850: ct_lung's -400 HU threshold loses their rim


def study(root: Path, seed: int, scanner: dict | None = None, hu_offset: float = 0) -> list[Path]:
    """A small synthetic chest CT; scanner B's headers and an HU offset (RescaleIntercept) when given."""
    out = root / f"study{seed}"
    write_chest_ct(out, seed=seed, patient_id=f"MON{seed:04d}", **SMALL)
    files = sorted(out.glob("*.dcm"))
    if scanner or hu_offset:
        for f in files:
            ds = pydicom.dcmread(f)
            for tag, value in (scanner or {}).items():
                setattr(ds, tag, value)
            ds.RescaleIntercept = f"{float(ds.RescaleIntercept) + hu_offset:g}"
            ds.save_as(f)
    return files


def jobs_done(node, n: int) -> bool:
    return query(node, "SELECT count(*) FROM job_outputs")[0][0] >= n


def test_drift_alert_for_shifted_scanner_only_and_feedback(node_factory, tmp_path):
    node = node_factory({
        "assemble": {"quiet_period_s": 0.5},
        "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung"}],
        "monitoring": {"baseline_studies": 3, "window_studies": 2, "min_samples": 2, "ks_threshold": 0.9,
                       "min_relative_change": 0.05, "check_interval_s": 0.3},
    })
    for seed in range(5):  # scanner A: the baseline (3) and A's own window (2)
        send(node, study(tmp_path, seed))
    wait_until(lambda: jobs_done(node, 5), 90, "5 scanner-A jobs with recorded outputs")
    for seed in (10, 11):
        send(node, study(tmp_path, seed, SCANNER_B, HU_OFFSET_B))
    wait_until(lambda: jobs_done(node, 7), 60, "2 scanner-B jobs with recorded outputs")

    rows = query(node, "SELECT job_id, model, scanner, finding_count, shadow FROM job_outputs ORDER BY job_id")
    assert [r[3] for r in rows] == [3] * 7
    assert {r[1] for r in rows} == {"ct_lung:1.0.0"}
    assert [r[2] for r in rows] == ["AINODE-SYNTH / ainode synth / SYNTHCT1"] * 5 + ["OTHERVENDOR / Scan B / CTB1"] * 2
    found = query(node, "SELECT tracking_id, measurements FROM findings WHERE job_id = ? ORDER BY number", rows[0][0])
    assert [t for t, _ in found] == ["left-lung", "right-lung", "total-lung"]
    m = json.loads(found[2][1])[0]
    assert m["concept"] == "Volume" and m["unit"] == "mL" and m["value"] > 500

    alerts = wait_until(lambda: [e for e in events(node, "model-drift") if e["outcome"] == "alert"], 20,
                        "a model-drift audit record")
    assert {a["scanner"] for a in alerts} == {"OTHERVENDOR / Scan B / CTB1"}
    total = next(a for a in alerts if a["metric"] == "total-lung Volume [mL]")
    assert total["ks"] == 1.0 and total["relative_change"] < -0.05 and total["model"] == "ct_lung:1.0.0"
    assert "model drift model=ct_lung:1.0.0 scanner=OTHERVENDOR / Scan B / CTB1" in node.log_path.read_text()

    cfg = str(node.config_path)
    report = json.loads(node.cli("monitor", "--config", cfg, "--json").stdout)
    by_scanner = {(d["scanner"], d["metric"]): d for d in report["drift"]}
    assert not by_scanner[("AINODE-SYNTH / ainode synth / SYNTHCT1", "total-lung Volume [mL]")]["alert"]
    assert by_scanner[("OTHERVENDOR / Scan B / CTB1", "total-lung Volume [mL]")]["alert"]
    assert {a["scanner"] for a in report["alerts"]} == {"OTHERVENDOR / Scan B / CTB1"}

    # Radiologist feedback: numbered findings, accept/correct, refused for a finding that does not exist.
    job = rows[0][0]
    listing = node.cli("monitor", "--config", cfg, "--job", str(job)).stdout
    assert "total-lung" in listing and "Volume" in listing
    ok = node.cli("feedback", "--config", cfg, "--job", str(job), "--finding", "3", "--verdict", "accept")
    assert ok.returncode == 0, ok.stderr
    ok = node.cli("feedback", "--config", cfg, "--job", str(job), "--finding", "1", "--verdict", "correct",
                  "--value", "650", "--by", "dr-x")
    assert ok.returncode == 0, ok.stderr
    bad = node.cli("feedback", "--config", cfg, "--job", str(job), "--finding", "9", "--verdict", "reject")
    assert bad.returncode == 2 and "no finding 9" in bad.stderr
    bad = node.cli("feedback", "--config", cfg, "--job", str(job), "--finding", "1", "--verdict", "correct")
    assert bad.returncode == 2 and "--value" in bad.stderr
    report = json.loads(node.cli("monitor", "--config", cfg, "--json").stdout)
    assert report["feedback"] == [{"model": "ct_lung:1.0.0", "accept": 1, "reject": 0, "correct": 1, "total": 2,
                                   "agreement_rate": 0.5}]
    fb = wait_until(lambda: len(e := events(node, "radiologist-feedback")) == 2 and e, 10, "2 feedback audit records")
    assert [(f["finding"], f["verdict"], f.get("value")) for f in fb] == [(3, "accept", None), (1, "correct", 650.0)]
    text = node.cli("monitor", "--config", cfg).stdout
    assert "DRIFT ALERTS: " in text and "agreement_rate" in text


def test_shadow_sends_nothing_and_records_agreement(node_factory, orthanc, tmp_path):
    node = node_factory({
        "assemble": {"quiet_period_s": 0.5},
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                  "timeout_s": 5}},
        "plugins": {"ct_lung": {}, "ct_lung_v2": {"entry": "plugins.ct_lung.plugin:CtLungPlugin",
                                                  "options": {"pool": 4}}},
        "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]},
                  {"name": "lung-v2", "series": {"modality": "CT"}, "plugin": "ct_lung_v2", "shadow_of": "lung"}],
    })
    files = study(tmp_path, 0)
    uid = pydicom.dcmread(files[0]).StudyInstanceUID
    send(node, files)
    agreement = wait_until(lambda: query(node, "SELECT shadow_job_id, primary_job_id, shadow_model, primary_model, "
                                               "counts_equal, max_rel_diff FROM shadow_agreements"), 60,
                           "a shadow agreement row")
    jobs = dict(query(node, "SELECT rule, id FROM jobs"))
    assert agreement[0][:5] == (jobs["lung-v2"], jobs["lung"], "ct_lung_v2:1.0.0", "ct_lung:1.0.0", 1)
    assert agreement[0][5] is not None and agreement[0][5] < 0.2
    wait_until(lambda: query(node, "SELECT state FROM jobs WHERE rule = 'lung'") == [("dispatched",)], 30,
               "the primary job dispatched")
    assert query(node, "SELECT DISTINCT job_id FROM dispatches") == [(jobs["lung"],)]
    assert query(node, "SELECT state FROM jobs WHERE rule = 'lung-v2'") == [("done-no-destination",)]
    assert result_instances(orthanc, uid) == {"SEG": 1, "SR": 1}  # the primary's only
    assert query(node, "SELECT shadow FROM job_outputs ORDER BY job_id") == [(0,), (1,)]
    ends = {e["job_id"]: e for e in events(node, "job-end")}
    assert ends[jobs["lung-v2"]]["shadow_of"] == "lung" and "shadow_of" not in ends[jobs["lung"]]
    assert events(node, "shadow-agreement")[0]["counts_equal"] is True
    report = json.loads(node.cli("monitor", "--config", str(node.config_path), "--json").stdout)
    assert report["shadow"][0]["shadow_model"] == "ct_lung_v2:1.0.0" and report["shadow"][0]["studies"] == 1
    assert report["shadow"][0]["count_agreement"] == 1.0
