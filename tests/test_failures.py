"""A destination that is down ends in 'dead-letter' after its attempts; a plugin error fails only its job."""

import subprocess

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from node.synth import write_chest_ct
from tests.support.net import free_port
from tests.support.wait import wait_until


def soft_tissue_series(template_files, out_dir, n=30):
    """A CT series with no air inside the body: the lung plugin must refuse it."""
    out_dir.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k, f in enumerate(template_files[:n]):
        ds = pydicom.dcmread(f)
        stored = np.full((ds.Rows, ds.Columns),
                         (40 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope), dtype=ds.pixel_array.dtype)
        ds.PixelData = stored.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(out_dir / f"{k:04d}.dcm")
        ds.save_as(paths[-1])
    return study, paths


def test_destination_down_fails_after_attempts_and_plugin_error_fails_only_its_job(tmp_path, node_factory):
    dead_port = free_port()  # nothing listens here
    node = node_factory({
        "assemble": {"quiet_period_s": 1.0},
        "destinations": {"pacs": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": dead_port,
                                  "max_attempts": 2, "backoff_initial_s": 0.2, "timeout_s": 2}},
        "rules": [{"name": "lung", "series": {"modality": "CT", "min_instances": 20}, "plugin": "ct_lung",
                   "destinations": ["pacs"]}],
    })
    good = write_chest_ct(tmp_path / "good", slices=60, slice_thickness=5.0)
    bad_study, bad_files = soft_tissue_series(good.files, tmp_path / "bad")
    for files in (bad_files, good.files):
        r = subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def ended():
        return sum(1 for r in node.audit_records() if r["event"] == "job-end") == 2 and any(
            r["event"] == "send-failed" and r.get("final") for r in node.audit_records())

    wait_until(ended, 120, "both jobs to end and the sends to give up")
    recs = node.audit_records()
    failed_job = [r for r in recs if r["event"] == "job-end" and r["outcome"] == "failure"]
    assert len(failed_job) == 1 and failed_job[0]["study_uid"] == bad_study
    assert "ValueError" in failed_job[0]["error"]
    sends = [r for r in recs if r["event"] == "send-failed"]
    assert {r["attempt"] for r in sends} == {1, 2}  # max_attempts, then no more
    assert all(r["study_uid"] == good.study_uid for r in sends)

    status = node.cli("status", "--config", str(node.config_path)).stdout
    assert status.count("state=failed") == 1 and status.count("state=dead-letter") == 1, status
    assert "cannot connect to NOBODY" in status and "ValueError" in status
    assert node.proc.poll() is None  # still serving
    assert node.stop() == 0
