"""A study goes PACS → node → SR + SEG back into the same study in PACS (a real Orthanc)."""

import io
import json
import time

import pydicom

from node.results.validate import validate_with_dciodvfy
from node.synth import write_chest_ct
from tests.support.wait import wait_until

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def node_config(orthanc, **rule_overrides):
    rule = {"name": "chest-ct-lung", "series": {"modality": "CT", "body_part": ["CHEST"], "min_instances": 50},
            "plugin": "ct_lung", "destinations": ["pacs"]}
    rule.update(rule_overrides)
    return {
        "node": {"allowed_calling_aes": ["ORTHANC"]},
        "assemble": {"quiet_period_s": 2.0},
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                  "backoff_initial_s": 0.5}},
        "rules": [rule],
    }


def modalities_in(orthanc, orthanc_study_id):
    return sorted(s["MainDicomTags"].get("Modality", "") for s in orthanc.series_of_study(orthanc_study_id))


def instance_datasets(orthanc, orthanc_study_id, modality):
    out = []
    for s in orthanc.series_of_study(orthanc_study_id):
        if s["MainDicomTags"].get("Modality") == modality:
            for inst in orthanc.instances_of_series(s["ID"]):
                out.append(pydicom.dcmread(io.BytesIO(orthanc.get_instance_file(inst["ID"]))))
    return out


def volumes_by_site(sr):
    """{finding site meaning: volume in mL} from the TID 1500 measurement groups."""
    out = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Measurement Group":
                site, vol, unit = None, None, None
                for c in item.ContentSequence:
                    cname = c.ConceptNameCodeSequence[0].CodeMeaning
                    if cname == "Finding Site":
                        site = c.ConceptCodeSequence[0].CodeMeaning
                    if c.ValueType == "NUM" and cname == "Volume":
                        mv = c.MeasuredValueSequence[0]
                        vol, unit = float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue
                assert unit == "mL"
                out[site] = vol
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def test_study_from_pacs_gets_sr_and_seg_back_in_the_same_study(tmp_path, orthanc, node_factory):
    synth = write_chest_ct(tmp_path / "ct", slices=110, slice_thickness=2.5)
    orthanc.upload_files(synth.files)
    study_id = orthanc.find_study(synth.study_uid)
    assert study_id and modalities_in(orthanc, study_id) == ["CT"]

    node = node_factory(node_config(orthanc))
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    orthanc.send_study_to_modality("ainode", study_id)

    wait_until(lambda: modalities_in(orthanc, study_id) == ["CT", "SEG", "SR"], 180, "SEG and SR in Orthanc")

    [sr] = instance_datasets(orthanc, study_id, "SR")
    [seg] = instance_datasets(orthanc, study_id, "SEG")
    ct0 = pydicom.dcmread(synth.files[0])
    for obj in (sr, seg):
        assert obj.StudyInstanceUID == synth.study_uid
        assert obj.PatientID == ct0.PatientID and obj.PatientName == ct0.PatientName
    assert seg.SOPClassUID == SEG_CLASS and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left_lung", "right_lung"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == synth.series_uid
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR

    truth = json.loads(synth.truth_path.read_text())
    vols = volumes_by_site(sr)
    assert abs(vols["Left lung"] - truth["left_lung_ml"]) / truth["left_lung_ml"] < 0.03, (vols, truth)
    assert abs(vols["Right lung"] - truth["right_lung_ml"]) / truth["right_lung_ml"] < 0.03, (vols, truth)
    assert abs(vols["Lung"] - truth["total_lung_ml"]) / truth["total_lung_ml"] < 0.03, (vols, truth)

    # Every object the node made validates, as received by the PACS.
    for obj, name in ((sr, "sr.dcm"), (seg, "seg.dcm")):
        path = tmp_path / name
        obj.save_as(path, enforce_file_format=True)
        assert validate_with_dciodvfy(path) == [], name

    # The whole trail is in the audit log and the chain verifies.
    events = [r["event"] for r in node.audit_records()]
    for e in ("association-accepted", "instance-stored", "study-complete", "rule-matched",
              "job-start", "job-end", "object-sent"):
        assert e in events, e
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
    status = node.cli("status", "--config", str(node.config_path))
    assert "state=dispatched" in status.stdout and "ct_lung" in status.stdout, status.stdout

    assert node.stop() == 0


def test_rule_that_matches_nothing_sends_nothing(tmp_path, orthanc, node_factory):
    synth = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    orthanc.upload_files(synth.files)
    study_id = orthanc.find_study(synth.study_uid)
    node = node_factory(node_config(orthanc, series={"modality": "MR"}))
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    orthanc.send_study_to_modality("ainode", study_id)
    wait_until(lambda: any(r["event"] == "no-rule-matched" for r in node.audit_records()), 60, "no-rule-matched")
    time.sleep(2)  # anything wrongly sent would have arrived by now
    assert modalities_in(orthanc, study_id) == ["CT"]
    assert not any(r["event"] in ("job-start", "object-sent") for r in node.audit_records())
    assert "no-rule-matched" in node.cli("status", "--config", str(node.config_path)).stdout
