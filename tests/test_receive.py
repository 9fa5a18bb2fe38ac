"""The SCP as a real subprocess, driven by DCMTK clients."""

import subprocess
from pathlib import Path

import pydicom
import pydicom.data
from pynetdicom.sop_class import _STORAGE_CLASSES

from node.store import Store
from tests.support.wait import wait_until
from tests.conftest import require

# storescu sends a file as it is only when told to propose that transfer syntax.
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
STORAGE = set(_STORAGE_CLASSES.values())


def storescu(node, files, aet="STORESCU", extra=()):
    require("storescu", "dcmtk")
    return subprocess.run(["storescu", *extra, "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def bundled_storage_files():
    """pydicom's bundled test files that declare a storage SOP class (in the data set or file meta)."""
    out = []
    for f in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*")):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        if sop_class in STORAGE:
            ts = str(meta.get("TransferSyntaxUID", "")) if meta else ""
            out.append((f, ds.get("SOPInstanceUID"), sop_class, ts))
    return out


def test_echo(node_factory):
    node = node_factory()
    require("echoscu", "dcmtk")
    r = subprocess.run(["echoscu", "-aet", "ECHO", "-aec", "AINODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_every_bundled_pydicom_file_is_stored_or_refused_with_status_and_audit(node_factory):
    node = node_factory({"assemble": {"quiet_period_s": 3600}})
    files = bundled_storage_files()
    assert len(files) > 50
    outcomes = {"stored": 0, "refused": 0, "not-sendable": 0}
    for f, sop_uid, sop_class, ts in files:
        flag = STORESCU_TS_FLAG.get(ts, "-x=")
        r = storescu(node, [f], extra=[flag, "-R", "-v"])
        out = r.stdout + r.stderr
        if "missing SOP class (or instance) in file" in out or "unable to convert dataset" in out:
            # storescu itself could not read or send the file: nothing reached the node.
            outcomes["not-sendable"] += 1
            continue
        if r.returncode == 0:
            stored = [x for x in node.audit_records() if x["event"] in ("instance-stored", "instance-duplicate")
                      and x.get("sop_instance_uid") == str(sop_uid)]
            assert stored, f"{f.name}: storescu succeeded but no stored/duplicate audit record"
            outcomes["stored"] += 1
        else:
            def refusals():
                return [x for x in node.audit_records()
                        if x["event"] in ("instance-refused", "presentation-context-refused")
                        and (x.get("sop_instance_uid") == str(sop_uid) or sop_class in x.get("sop_classes", []))]
            # pynetdicom raises EVT_ACCEPTED (where a refused context is audited) after the A-ASSOCIATE-AC
            # went out, so storescu can exit before the record is written: wait for it briefly.
            wait_until(refusals, 5, f"{f.name}: refused ({out.strip().splitlines()[-1]}) without an audit record",
                       interval=0.05)
            # The sender saw why: a failure status in the C-STORE response, or the context refused.
            assert ("Received Store Response (Failed" in out or "Received Store Response (Error" in out
                    or "No Acceptable Presentation Contexts" in out or "No presentation context" in out), out
            outcomes["refused"] += 1
        assert node.proc.poll() is None, f"node died on {f.name}"
    # The node still serves after all of that.
    r = storescu(node, [pydicom.data.get_testdata_file("CT_small.dcm")])
    assert r.returncode == 0, r.stderr
    assert outcomes["stored"] > 40, outcomes
    assert outcomes["refused"] > 0, outcomes
    assert node.stop() == 0


def test_calling_ae_not_allowed_is_rejected_and_audited(node_factory):
    node = node_factory({"node": {"allowed_calling_aes": ["ORTHANC"]}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    r = storescu(node, [f], aet="INTRUDER")
    assert r.returncode != 0
    assert "Association Rejected" in r.stdout + r.stderr
    rejected = [x for x in node.audit_records() if x["event"] == "association-rejected"]
    assert rejected and rejected[-1]["calling_ae"] == "INTRUDER"
    assert "allowed_calling_aes" in rejected[-1]["reason"]
    assert storescu(node, [f], aet="ORTHANC").returncode == 0


def test_ip_not_allowed_is_rejected_and_audited(node_factory):
    node = node_factory({"node": {"allowed_ips": ["10.0.0.0/8"]}})
    r = storescu(node, [pydicom.data.get_testdata_file("CT_small.dcm")])
    assert r.returncode != 0
    rejected = [x for x in node.audit_records() if x["event"] == "association-rejected"]
    assert rejected and rejected[-1]["peer_ip"] == "127.0.0.1"


def test_duplicate_is_stored_once_and_audited(node_factory):
    node = node_factory({"assemble": {"quiet_period_s": 3600}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    assert storescu(node, [f]).returncode == 0
    assert storescu(node, [f]).returncode == 0
    events = [x["event"] for x in node.audit_records()]
    assert events.count("instance-stored") == 1 and events.count("instance-duplicate") == 1
    uid = str(pydicom.dcmread(f).SOPInstanceUID)
    files = list((node.var / "spool").rglob(f"{uid}.*.dcm"))
    assert len(files) == 1
    assert files[0].read_bytes()[128:132] == b"DICM"
    assert not list((node.var / "spool" / ".tmp").iterdir())  # the repeat's temp file is deleted


def test_write_failure_answers_out_of_resources_never_success(node_factory):
    node = node_factory({"assemble": {"quiet_period_s": 3600}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(f)
    # A file where the study folder should be: the spool write fails for real.
    (node.var / "spool" / str(ds.StudyInstanceUID)).write_text("in the way")
    r = storescu(node, [f], extra=["-v"])
    assert r.returncode != 0
    assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
    refused = [x for x in node.audit_records() if x["event"] == "instance-refused"]
    assert refused and refused[-1]["status"] == "0xA700"
    store = Store(f"sqlite:///{node.var / 'ainode.db'}")
    assert not store.has_instance(str(ds.SOPInstanceUID))
    store.close()


def test_temp_file_that_cannot_be_created_answers_out_of_resources(node_factory):
    node = node_factory({"assemble": {"quiet_period_s": 3600}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    tmp = node.var / "spool" / ".tmp"
    tmp.rmdir()
    tmp.write_text("in the way")  # a file where the temp folder should be: opening a temp file fails
    r = storescu(node, [f], extra=["-v"])
    assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
    refused = [x for x in node.audit_records() if x["event"] == "instance-refused"]
    assert refused and refused[-1]["status"] == "0xA700" and "spool write failed" in refused[-1]["reason"]
    assert not list((node.var / "spool").rglob("*.dcm"))


def test_sigterm_exits_cleanly(node_factory):
    # Stopped as soon as it listens: its worker processes (and theirs) are still starting.
    node = node_factory()
    assert node.stop() == 0
    events = [x["event"] for x in node.audit_records()]
    assert events[-1] == "node-stop"
    assert "Traceback" not in node.log_path.read_text(), node.log_path.read_text()


def test_below_free_space_threshold_answers_out_of_resources_and_keeps_nothing(node_factory):
    node = node_factory({"storage": {"min_free_mb": 10**9}, "assemble": {"quiet_period_s": 3600}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    r = storescu(node, [f], extra=["-v"])
    assert r.returncode != 0
    assert "Refused: OutOfResources" in r.stdout + r.stderr
    refused = [x for x in node.audit_records() if x["event"] == "instance-refused"]
    assert refused and "min_free_mb" in refused[-1]["reason"]
    assert not [p for p in (node.var / "spool").rglob("*") if p.is_file()]  # nothing half-stored
    store = Store(f"sqlite:///{node.var / 'ainode.db'}")
    assert not store.has_instance(str(pydicom.dcmread(f).SOPInstanceUID))
    store.close()
    assert node.proc.poll() is None


def test_beyond_max_associations_is_rejected_transiently_and_audited(node_factory):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory({"node": {"max_associations": 1}})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    try:
        assert held.is_established
        r = storescu(node, [pydicom.data.get_testdata_file("CT_small.dcm")])
        assert r.returncode != 0 and "Rejected Transient" in r.stdout + r.stderr, r.stderr
        rejected = [x for x in node.audit_records() if x["event"] == "association-rejected"]
        assert rejected and "max_associations" in rejected[-1]["reason"]
    finally:
        held.release()
        ae.shutdown()
    assert storescu(node, [pydicom.data.get_testdata_file("CT_small.dcm")]).returncode == 0


def test_dataset_over_max_size_is_refused_and_audited(node_factory):
    node = node_factory({"node": {"max_dataset_mb": 0.01}, "assemble": {"quiet_period_s": 3600}})
    f = pydicom.data.get_testdata_file("CT_small.dcm")  # ~39 KB
    r = storescu(node, [f], extra=["-v"])
    assert r.returncode != 0 and "Refused: OutOfResources" in r.stdout + r.stderr
    refused = [x for x in node.audit_records() if x["event"] == "instance-refused"]
    assert refused and "max_dataset_mb" in refused[-1]["reason"]
    assert not [p for p in (node.var / "spool").rglob("*") if p.is_file()]
