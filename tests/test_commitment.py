"""Storage Commitment against a real Orthanc: "dispatched" only once the PACS reports the objects committed.

Orthanc answers an N-ACTION at once and reports (N-EVENT-REPORT) later, from a job, on a new association
to the AE title it knows as a modality: the node's SCP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import node.dispatch.dispatcher as dispatcher_module
from node.audit import AuditLog
from node.config.schema import Destination, NodeSection
from node.dispatch import Dispatcher
from node.dispatch.commitment import CommitmentError, record_report, request_commitment
from node.receive import Spool, StoreSCP
from node.store import DispatchItem, DispatchState, InstanceMeta, JobState, NewJob, Store
from node.store.models import CommitmentState, Dispatch
from node.synth import write_chest_ct
from tests.support.net import free_port
from tests.support.orthanc import OrthancServer
from tests.support.pipeline import events, lung_config, result_instances, status
from tests.support.wait import wait_until

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def tiny_result(path: Path, study_uid: str) -> Dataset:
    """A small Secondary Capture in `study_uid`, standing in for a result the node built."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SC-TEST", "Test^Commitment", "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return ds


class Rig:
    """The node's store, audit log, SCP and dispatcher in this process, with one job's result to send."""

    def __init__(self, tmp: Path, orthanc, **dest) -> None:
        self.store = Store(f"sqlite:///{tmp / 'ainode.db'}")
        self.audit = AuditLog(tmp / "audit.jsonl", node_ae="AINODE")
        self.scp = StoreSCP(NodeSection(ae_title="AINODE", host="127.0.0.1", port=free_port()), Spool(tmp / "spool"),
                            self.store, self.audit)
        self.dest = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port, timeout_s=5,
                                storage_commitment=True, backoff_initial_s=0.5, **dest)
        self.dispatcher = Dispatcher(self.store, self.audit, {"pacs": self.dest}, "AINODE")
        study = generate_uid()
        self.result = tiny_result(tmp / "result.dcm", study)
        self.store.add_instance(InstanceMeta(
            sop_instance_uid=generate_uid(), sop_class_uid=SC, series_uid=generate_uid(), study_uid=study,
            transfer_syntax=ExplicitVRLittleEndian, path="-", size_bytes=0, calling_ae="TEST"))
        self.store.mark_complete(study, "forced", time.time())
        [self.job_id] = self.store.route(study, [NewJob("r", "p", "routine", [], ["pacs"])])
        self.store.claim_job()
        self.store.job_results_built(self.job_id, "1", "", {}, [DispatchItem(
            "pacs", "SC", SC, str(self.result.SOPInstanceUID), str(tmp / "result.dcm"))])
        self.scp.start()

    def dispatch(self) -> Dispatch:
        with self.store.session() as s:
            return s.query(Dispatch).one()

    def events(self, name: str) -> list[dict]:
        return [r for r in map(json.loads, self.audit.path.read_text().splitlines()) if r["event"] == name]

    def close(self) -> None:
        self.scp.stop()
        self.audit.close()
        self.store.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc for this module (each test registers the node as it needs), stopped at its end."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc"), aet="ORTHANC") as o:
        yield o


@pytest.fixture
def rig(tmp_path, orthanc):
    made: list[Rig] = []

    def make(**dest) -> Rig:
        r = Rig(tmp_path, orthanc, **dest)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def answered(store: Store, txn: str) -> bool:
    return store.commitment_state(txn) != CommitmentState.WAITING


def test_failure_report_resends_then_commits(rig, orthanc, monkeypatch):
    r = rig(max_attempts=3)
    orthanc.add_modality("ainode", "AINODE", "127.0.0.1", r.scp.port)
    uid = str(r.result.SOPInstanceUID)
    real = dispatcher_module.request_commitment

    def pacs_loses_it_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(dispatcher_module, "request_commitment", real)
        # The PACS loses the instance between the C-STORE and its commitment lookup.
        orthanc.client.delete(f"instances/{orthanc.client.lookup(uid, 'Instance')[0]}")
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatcher_module, "request_commitment", pacs_loses_it_first)
    t0 = time.time()
    r.dispatcher.tick(t0)  # C-STORE, N-ACTION; a report that comes within a second is applied at once
    [req] = r.events("commitment-requested")
    txn = req["transaction_uid"]
    assert txn.startswith("2.25.") and req["sop_instance_uids"] == [uid] and req["job_ids"] == [r.job_id]
    wait_until(lambda: answered(r.store, txn), 20, "Orthanc's failure report at the node's SCP")
    r.dispatcher.tick(t0)  # applies the report if not yet: back to pending, one attempt used, resend not due
    d = r.dispatch()
    assert d.state == DispatchState.PENDING and d.attempts == 1 and "0x0112" in d.last_error
    assert f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}" in d.last_error
    [failed] = r.events("commitment-failed")
    assert failed["failed"][0]["sop_instance_uid"] == uid and failed["resent"] == [uid]
    assert r.store.get_commitment(txn).reported_by == f"{orthanc.aet}@127.0.0.1"

    r.dispatcher.tick(t0 + 1)  # after the backoff: sent again, asked again; Orthanc holds it now
    txn2 = r.events("commitment-requested")[-1]["transaction_uid"]
    assert txn2 != txn
    wait_until(lambda: answered(r.store, txn2), 20, "the second report")
    r.dispatcher.tick(t0 + 1)
    d = r.dispatch()
    assert d.state == DispatchState.SENT and d.attempts == 2
    assert r.store.get_job(r.job_id).state == JobState.DISPATCHED
    [ok] = r.events("commitment-confirmed")
    assert ok["transaction_uid"] == txn2 and ok["sop_instance_uids"] == [uid]
    assert r.store.get_commitment(txn2).state == CommitmentState.COMMITTED


def test_no_report_asks_again_then_dead_letters(rig, orthanc):
    r = rig(max_attempts=2, commitment_timeout_s=5)
    orthanc.add_modality("ainode", "AINODE", "127.0.0.1", free_port())  # nobody listens there: no report
    t0 = time.time()
    r.dispatcher.tick(t0)
    assert r.dispatch().state == DispatchState.SENT_UNCOMMITTED  # sent, but not dispatched
    assert r.store.get_job(r.job_id).state == JobState.RESULTS_BUILT
    r.dispatcher.tick(t0 + 1)  # not overdue yet
    assert len(r.events("commitment-requested")) == 1

    r.dispatcher.tick(t0 + 6)  # overdue: a new transaction
    first, second = r.events("commitment-requested")
    assert second["attempt"] == 2 and second["replaces"] == first["transaction_uid"]
    assert r.store.get_commitment(first["transaction_uid"]).state == CommitmentState.EXPIRED

    r.dispatcher.tick(t0 + 12)  # out of attempts
    d = r.dispatch()
    assert d.state == DispatchState.DEAD_LETTER and d.attempts == 1  # sent once, never committed
    assert "no storage commitment report" in d.last_error and "AE 'AINODE'" in d.last_error
    job = r.store.get_job(r.job_id)
    assert job.state == JobState.DEAD_LETTER and "storage commitment" in job.error
    [gave_up] = r.events("commitment-failed")
    assert gave_up["final"] is True and gave_up["transaction_uid"] == second["transaction_uid"]


def test_orthanc_refuses_an_ae_it_does_not_know(tmp_path, orthanc):
    dest = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port, timeout_s=5,
                       storage_commitment=True)
    with pytest.raises(CommitmentError) as err:
        request_commitment(dest, "STRANGER", "2.25.1", [(SC, "1.2.3")], on_report=lambda e: (0, None))
    assert f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}" in str(err.value) and "STRANGER" in str(err.value)


def test_report_for_unknown_transaction_is_acknowledged(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")

    class Request:
        AffectedSOPClassUID = "1.2.840.10008.1.20.1"

    class Event:
        request, event_type = Request, 1
        event_information = Dataset()

    Event.event_information.TransactionUID = "2.25.42"
    assert record_report(store, Event, "PACS@127.0.0.1") == (0, None)
    Event.event_information = Dataset()
    assert record_report(store, Event, "PACS@127.0.0.1")[0] == 0x0115  # no Transaction UID
    store.close()


def test_node_dispatched_only_after_orthanc_commits(tmp_path, orthanc, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    orthanc.upload_files(ct.files)
    node = node_factory({**lung_config(orthanc, storage_commitment=True, commitment_timeout_s=3),
                         "node": {"allowed_calling_aes": [orthanc.aet]}})
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    orthanc.send_study_to_modality("ainode", orthanc.find_study(ct.study_uid))
    # Orthanc's reports now go nowhere: the results land in the PACS but are not yet its responsibility.
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", free_port())
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 120, "SEG and SR in Orthanc")
    wait_until(lambda: events(node, "commitment-requested"), 10, "the commitment request")
    out = status(node)
    assert "sent-uncommitted=2" in out and "state=results-built" in out, out

    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)  # reachable again
    wait_until(lambda: "state=dispatched" in status(node), 30, "dispatched after the commitment")
    requests = events(node, "commitment-requested")
    [confirmed] = events(node, "commitment-confirmed")
    assert len(requests) >= 2 and confirmed["transaction_uid"] == requests[-1]["transaction_uid"]
    sent = {r["sop_instance_uid"] for r in events(node, "object-sent")}
    assert len(sent) == 2 and set(confirmed["sop_instance_uids"]) == sent
    assert confirmed["reported_by"] == f"{orthanc.aet}@127.0.0.1" and confirmed["study_uid"] == ct.study_uid
    assert confirmed["seq"] > max(r["seq"] for r in events(node, "object-sent"))
    assert "sent=2" in status(node)
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
    assert node.stop() == 0


def test_destination_fields_default_off():
    d = Destination(ae_title="PACS", host="h", port=104)
    assert d.storage_commitment is False and d.commitment_timeout_s == 600
    with pytest.raises(ValueError):
        Destination(ae_title="PACS", host="h", port=104, commitment_timeout_s=0)
