"""The running node sends a study de-identified to an external (cloud second-read) destination and puts the
service's returned result, re-identified, into the original study in the hospital PACS."""

import io

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pydicom.dataset import Dataset

from node.synth import write_chest_ct
from tests.support.orthanc import OrthancServer
from tests.support.pipeline import events, send
from tests.support.wait import wait_until
from tests.test_deid import assert_no_identity, service_sr


def _instances(orthanc) -> list[Dataset]:
    out = []
    for study in orthanc.client.studies.get_all_ids():
        for series in orthanc.series_of_study(study):
            for inst in orthanc.instances_of_series(series["ID"]):
                out.append(dcmread(io.BytesIO(orthanc.get_instance_file(inst["ID"]))))
    return out


def _store(node, ds: Dataset, calling: str) -> int:
    """C-STORE one data set as the external service would (storescu does not propose Comprehensive 3D SR)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_external_destination_gets_no_identity_and_the_returned_result_lands_in_the_original_study(
        tmp_path, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=12, rows=64, cols=64, pixel_spacing=5.6, seed=4)
    originals = [dcmread(p) for p in ct.files]
    for ds, path in zip(originals, ct.files):  # identity where a careless copy would keep it
        block = ds.private_block(0x0011, "HOSPITAL RIS", create=True)
        block.add_new(0x01, "LO", f"{ds.PatientName} {ds.PatientID}")
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", ds.StudyInstanceUID
        ds.ReferencedStudySequence = [ref]
        ds.save_as(path)
    first = originals[0]
    forbidden = {str(first.PatientID), str(first.PatientName.family_name), str(first.PatientBirthDate),
                 str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.AccessionNumber),
                 *(str(ds.SOPInstanceUID) for ds in originals)}
    key = tmp_path / "deid.key"
    key.write_bytes(b"k" * 48)

    with OrthancServer(tmp_path / "cloud", aet="CLOUD") as cloud, OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        pacs.upload_files(ct.files)  # the hospital PACS holds the original study
        node = node_factory({
            "assemble": {"quiet_period_s": 1.0},
            "deid": {"key_file": str(key)},
            "destinations": {
                "cloud": {"ae_title": "CLOUD", "host": "127.0.0.1", "port": cloud.dicom_port, "external": True,
                          "return_ae_titles": ["CLOUD"], "return_to": ["pacs"]},
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}},
            "rules": [{"name": "second-read", "series": {"modality": "CT"}, "plugin": "forward",
                       "destinations": ["cloud"]}],
        })
        send(node, ct.files)
        wait_until(lambda: len(events(node, "object-sent")) == len(ct.files), 60, "the copies to reach the cloud")

        copies = _instances(cloud)
        assert len(copies) == len(ct.files)
        for ds in copies:
            assert ds.PatientIdentityRemoved == "YES"
            assert_no_identity(ds, forbidden)  # every element, sequences and private tags included

        # The service answers with its own SR on the pseudonymous series.
        assert _store(node, service_sr(copies), "CLOUD") == 0x0000
        wait_until(lambda: any(r.get("kind") == "RET" for r in events(node, "object-sent")), 60,
                   "the re-identified result to reach the PACS")

        study = pacs.find_study(str(first.StudyInstanceUID))
        mods = {s["MainDicomTags"].get("Modality") for s in pacs.series_of_study(study)}
        assert mods == {"CT", "SR"}  # in the original study, beside the original images
        back = next(ds for ds in _instances(pacs) if ds.Modality == "SR")
        assert back.PatientID == first.PatientID and back.StudyInstanceUID == first.StudyInstanceUID
        (ret,) = events(node, "result-returned")
        assert ret["outcome"] == "success" and ret["forwarded_to"] == ["pacs"]
        # The node did not take the returned SR for a new study to process.
        assert [r["rule"] for r in events(node, "rule-matched")] == ["second-read"]

        # Something the node never sent out is refused, not re-identified into some study.
        stranger = write_chest_ct(tmp_path / "stranger", slices=10, rows=32, cols=32, seed=9)
        assert _store(node, dcmread(stranger.files[0]), "CLOUD") == 0xA900
        (refused,) = events(node, "instance-refused")
        assert "study not known to this node" in refused["reason"]
        assert node.stop() == 0
