"""dciodvfy in the background: each run keeps its own verdict, the same lines as a blocking run, and a
cancelled run leaves no process behind; a job's objects are all validated before it returns them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from node.config.schema import PluginSection
from node.results.validate import start_dciodvfy, validate_with_dciodvfy
from node.run.job_process import JobError, JobSpec, PluginCache, execute_job
from node.synth import write_chest_ct


def blocking_errors(path: Path) -> list[str]:
    """What the node computed before validation ran in the background."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def ct(tmp_path):
    return write_chest_ct(tmp_path / "ct", slices=24, rows=64, cols=64, pixel_spacing=5.6, seed=7)


def test_concurrent_runs_keep_their_own_verdicts(ct, tmp_path):
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(ct.files[0])
    del ds.Modality, ds.ImagePositionPatient  # type 1 attributes of the CT Image IOD
    ds.save_as(bad, enforce_file_format=True)
    good, broken = start_dciodvfy(ct.files[1]), start_dciodvfy(bad)
    errors = broken.errors()
    assert errors and all(e.startswith("Error") for e in errors)
    assert errors == blocking_errors(bad) == validate_with_dciodvfy(bad)
    assert good.errors() == [] == blocking_errors(ct.files[1])


def test_cancel_stops_the_run(ct):
    run = start_dciodvfy(ct.files[0])
    run.cancel()
    assert run._proc.poll() is not None


def test_job_validates_every_object_and_times_validation_apart(ct, tmp_path):
    series_uid = pydicom.dcmread(ct.files[0], stop_before_pixels=True).SeriesInstanceUID
    spec = JobSpec(job_id=1, study_uid=ct.study_uid, plugin="ct_lung", series={series_uid: [str(f) for f in ct.files]},
                   temp_dir=str(tmp_path), validate=True)
    out = execute_job(spec, PluginCache({"ct_lung": PluginSection()}, None, "cpu"), lambda _stage: None)
    assert [f.kind for f in out.files] == ["SEG", "SR"]
    assert {"build_s", "validate_s"} <= set(out.timings)
    for f in out.files:
        assert blocking_errors(Path(f.temp_path)) == []


@pytest.mark.filterwarnings("ignore:The value length")
def test_an_invalid_object_fails_the_job_and_leaves_no_files(ct, tmp_path):
    for f in ct.files:  # a value too long for its VR (LO, 64): copied into the SEG and the SR
        ds = pydicom.dcmread(f)
        ds.PatientID = "P" * 70
        ds.save_as(f, enforce_file_format=True)
    series_uid = pydicom.dcmread(ct.files[0], stop_before_pixels=True).SeriesInstanceUID
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spec = JobSpec(job_id=2, study_uid=ct.study_uid, plugin="ct_lung", series={series_uid: [str(f) for f in ct.files]},
                   temp_dir=str(out_dir), validate=True)
    with pytest.raises(JobError, match=r"^SEG \S+ failed IOD validation: Error"):
        execute_job(spec, PluginCache({"ct_lung": PluginSection()}, None, "cpu"), lambda _stage: None)
    assert list(out_dir.iterdir()) == []  # the SEG and SR written meanwhile are removed
