"""Priors: a rule's `priors:` fetches the patient's earlier study of the same modality from a PACS (C-FIND +
C-GET) and hands it to the plugin as `StudyInput.priors`.

The integration test runs a real Orthanc as the PACS, holding the current study, one prior of the same
patient, one too old to count and another patient's study; the node (a subprocess) receives the current
study from it and runs three rules: priors from Orthanc, and priors from a PACS that is down, with
`required: false` (runs without) and `required: true` (fails).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from node.audit import AuditLog
from node.config.load import ConfigError, load_config
from node.config.schema import PluginSection, Source
from node.priors.config import PriorsSpec
from node.priors.fetch import SeriesSink
from node.priors.retrieve import PriorRetriever
from node.run.job_process import JobSpec, PluginCache, execute_job, load_input
from node.synth import write_chest_ct
from tests.support.net import free_port
from tests.support.pipeline import events, query, send
from tests.support.wait import wait_until

PROBE = {"entry": "tests.plugins.prior_probe:PriorProbePlugin"}
TODAY = "20260115"  # write_chest_ct's StudyDate


def ct(tmp_path: Path, name: str, patient_id: str, seed: int, study_date: str = TODAY):
    """12 slices of 64×64, with its StudyDate (and series dates) set to `study_date`."""
    r = write_chest_ct(tmp_path / name, slices=12, rows=64, cols=64, pixel_spacing=5.6, seed=seed,
                       patient_id=patient_id)
    if study_date != TODAY:
        for f in r.files:
            ds = dcmread(f)
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
            ds.save_as(f)
    return r


def jobs(node, study_uid: str) -> dict[str, tuple]:
    """rule -> (state, summary, error, timings) of the study's jobs, once all three have ended."""
    rows = query(node, "SELECT rule, state, summary, error, timings FROM jobs WHERE study_uid = ?", study_uid)
    if len(rows) < 3 or any(r[1] in ("queued", "running") for r in rows):
        return {}
    return {r[0]: (r[1], r[2], r[3], json.loads(r[4] or "{}")) for r in rows}


def job_start(node, study_uid: str, rule: str) -> dict:
    return next(r for r in events(node, "job-start") if r["study_uid"] == study_uid and r["rule"] == rule)


def test_prior_fetched_and_handed_to_plugin(tmp_path, orthanc, node_factory, test_plugins):
    current = ct(tmp_path, "current", "PRIOR-P1", seed=1)
    prior = ct(tmp_path, "prior", "PRIOR-P1", seed=2, study_date="20240110")
    ct(tmp_path, "old", "PRIOR-P1", seed=3, study_date="20100501")  # beyond max_age_days
    ct(tmp_path, "other", "PRIOR-P2", seed=4, study_date="20250101")  # another patient
    lone = ct(tmp_path, "lone", "PRIOR-P3", seed=5)  # a patient with no earlier study
    for name in ("current", "prior", "old", "other", "lone"):
        orthanc.upload_files(sorted((tmp_path / name).glob("*.dcm")))

    down = free_port()  # nothing listens there: a PACS that is down
    rule = {"series": {"modality": "CT"}}
    node = node_factory({
        "sources": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                    "down": {"ae_title": "DOWNPACS", "host": "127.0.0.1", "port": down, "query": False,
                             "timeout_s": 2}},
        "plugins": {"probe": PROBE, "probe_optional": PROBE, "probe_required": PROBE},
        "rules": [{**rule, "name": "with-prior", "plugin": "probe",
                   "priors": {"source": "pacs", "count": 2, "max_age_days": 3650}},
                  {**rule, "name": "pacs-down", "plugin": "probe_optional", "priors": {"source": "down"}},
                  {**rule, "name": "pacs-down-required", "plugin": "probe_required",
                   "priors": {"source": "down", "required": True}}],
    })
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)  # the PACS must know its querier

    send(node, current.files, calling="ORTHANC")
    done = wait_until(lambda: jobs(node, current.study_uid), 60, "the current study's three jobs")

    # The one prior in range, of the same patient, is fetched and handed to the plugin.
    state, summary, error, timings = done["with-prior"]
    assert state == "done-no-destination", error
    assert summary == f"priors=1 {prior.study_uid}/{prior.series_uid}:12:20240110"
    assert timings["prior_studies"] == 1 and timings["prior_instances"] == 12
    fetches = [r for r in events(node, "prior-fetched") if r["study_uid"] == current.study_uid]
    [fetched] = [r for r in fetches if r["outcome"] == "success"]
    assert [r["source_ae"] for r in fetches if r["outcome"] == "failure"] == ["DOWNPACS", "DOWNPACS"]
    assert fetched["prior_study_uid"] == prior.study_uid and fetched["instances"] == 12
    assert fetched["source_ae"] == "ORTHANC" and fetched["series_uids"] == [prior.series_uid]
    assert job_start(node, current.study_uid, "with-prior")["priors"] == [prior.study_uid]
    # A PACS that is down: the job runs without priors, or fails when they are required.
    state, summary, error, _ = done["pacs-down"]
    assert state == "done-no-destination" and summary == "priors=0", error
    assert f"DOWNPACS@127.0.0.1:{down}" in job_start(node, current.study_uid, "pacs-down")["priors_missing"]
    state, summary, error, _ = done["pacs-down-required"]
    assert state == "failed" and "priors required" in error and f"127.0.0.1:{down}" in error
    # Each job's priors folder is gone once it ended; the prior never became a study of the node.
    assert not list((node.var / "spool" / ".priors").glob("*"))
    assert not query(node, "SELECT 1 FROM studies WHERE study_uid = ?", prior.study_uid)

    # A patient with no earlier study: the plugin gets none, the job succeeds.
    send(node, lone.files, calling="ORTHANC")
    done = wait_until(lambda: jobs(node, lone.study_uid), 60, "the lone study's jobs")
    state, summary, error, _ = done["with-prior"]
    assert state == "done-no-destination" and summary == "priors=0", error
    assert "no earlier CT study" in job_start(node, lone.study_uid, "with-prior")["priors_missing"]
    assert not [r for r in events(node, "prior-fetched") if r["study_uid"] == lone.study_uid
                and r["source"] == "pacs"]


def test_wildcard_patient_id_is_not_searched(tmp_path):
    """A PatientID with C-FIND wildcards would match other patients' studies: no query is made at all."""
    r = write_chest_ct(tmp_path / "ct", slices=10, rows=16, cols=16, patient_id="SMITH*")
    src = Source(ae_title="PACS", host="127.0.0.1", port=free_port())
    audit = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE")
    try:
        out = PriorRetriever(tmp_path / "priors", {"pacs": src}, "AINODE", audit).retrieve(
            1, r.study_uid, str(r.files[0]), PriorsSpec(source="pacs", required=True))
    finally:
        audit.close()
    assert not out.error and not out.series and "wildcard" in out.missing


class _Stored:
    """A C-STORE sub-operation's event, as far as SeriesSink reads it."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()

    def encoded_dataset(self) -> bytes:
        return self.data


def test_sink_refuses_instances_not_asked_for(tmp_path):
    """A PACS that sends another patient's (or another series') image must not put it before a plugin."""
    mine, other = ct(tmp_path, "mine", "PRIOR-P1", seed=2), ct(tmp_path, "other", "PRIOR-P2", seed=4)
    sink = SeriesSink("PRIOR-P1")
    sink.expect(mine.study_uid, mine.series_uid, tmp_path / "priors")
    assert sink(_Stored(other.files[0])) == 0xC000 and sink.rejected == 1
    assert sink(_Stored(mine.files[0])) == 0x0000
    assert sink.files == [str(tmp_path / "priors" / f"{dcmread(mine.files[0]).SOPInstanceUID}.dcm")]
    assert [p.name for p in (tmp_path / "priors").iterdir()] == [Path(sink.files[0]).name]  # no temp files


def test_prefetched_job_still_gets_its_priors(tmp_path):
    """The next job's input is prefetched before its priors are fetched: they are loaded when it runs. A prior
    series that cannot be read as a volume is left out; the job goes on."""
    current, prior = ct(tmp_path, "current", "PRIOR-P1", seed=1), ct(tmp_path, "prior", "PRIOR-P1", seed=2)
    (tmp_path / "junk.dcm").write_bytes(b"not DICOM")
    plugins = PluginCache({"probe": PluginSection(**PROBE)})
    spec = JobSpec(job_id=1, study_uid=current.study_uid, plugin="probe",
                   series={current.series_uid: list(map(str, current.files))}, temp_dir=str(tmp_path),
                   validate=False, priors={prior.series_uid: list(map(str, prior.files)),
                                           "1.2.3": [str(tmp_path / "junk.dcm")]})
    prefetched = load_input(JobSpec(**{**spec.__dict__, "priors": {}}), plugins.get("probe"))
    out = execute_job(spec, plugins, lambda _stage: None, prefetched)
    assert out.summary == f"priors=1 {prior.study_uid}/{prior.series_uid}:12:{TODAY}"


def test_config_priors_source_must_exist(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps({"plugins": {"probe": PROBE}, "sources": {"pacs": {
        "ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "rules": [{"name": "r", "plugin": "probe", "priors": {"source": "pcas"}}]}))
    with pytest.raises(ConfigError, match=r"rules\.0\.priors\.source: unknown source 'pcas' "
                                          r"\(defined under sources: pacs\)"):
        load_config(path)
    path.write_text(json.dumps({"plugins": {"probe": PROBE},
                                "rules": [{"name": "r", "plugin": "probe", "priors": {"source": "x", "count": 9}}]}))
    with pytest.raises(ConfigError, match=r"rules\.0\.priors\.count: .*less than or equal to 5"):
        load_config(path)
