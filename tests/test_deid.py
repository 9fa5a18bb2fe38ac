"""De-identification for external destinations (PS3.15 Basic Profile, keyed) and re-identification of results.

The acceptance check: a de-identified copy carries no original patient name, ID, birth date or UID in
any element (sequences, private tags and substrings of longer strings included), and a result built on
the de-identified series, once re-identified, lands in the original study of a real Orthanc.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from node.deid import (BurnedInAnnotationError, DeidentificationError, Deidentifier, DeidKeyError, DeidSettings,
                       PseudonymMap, load_key)
from node.plugin_api import Code, Finding, Measurement, PluginResult
from node.results import AlgorithmInfo, build_results, validate_with_dciodvfy
from node.synth import write_chest_ct
from tests.conftest import require
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.timeout(120)

KEY = b"0123456789abcdef0123456789abcdef-test-key"
OTHER_KEY = b"fedcba9876543210fedcba9876543210-other-key"
NAME, PID, BIRTH = "Zhangsan^Weiming^Q=张三^伟明", "HOSP-77123", "19600101"
OTHER_PID = "MRN-555001"
CREATOR = "ACME HOSPITAL PACS"
NODULE, DIAMETER, MM = Code("27925004", "SCT", "Nodule"), Code("81827009", "SCT", "Diameter"), Code("mm", "UCUM", "mm")


def settings(**kw) -> DeidSettings:
    return DeidSettings(key_env="AINODE_TEST_DEID_KEY", **kw)


def nasty(ds: Dataset, k: int, sop_uids: list[str]) -> Dataset:
    """Identity hidden where a naive anonymizer does not look: private tags, sequences, free text."""
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    block = ds.private_block(0x0009, CREATOR, create=True)
    block.add_new(0x01, "LO", f"patient {NAME} id {PID}")
    block.add_new(0x02, "UI", study)
    nested = Dataset()
    nested.PatientID = PID
    block.add_new(0x03, "SQ", [nested])
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = study
    ds.ReferencedStudySequence = [ref_study]
    request = Dataset()
    request.AccessionNumber = ds.AccessionNumber
    request.StudyInstanceUID = study
    request.RequestedProcedureID = PID
    ds.RequestAttributesSequence = [request]
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = OTHER_PID, "OLD-HIS"
    ds.OtherPatientIDsSequence = [other]
    ds.OtherPatientIDs = OTHER_PID
    ref_series = Dataset()  # not in Table E.1-1: kept, but its UIDs must still be replaced
    ref_series.SeriesInstanceUID = series
    ref_series.StudyInstanceUID = study
    ds.ReferencedSeriesSequence = [ref_series]
    if k:
        source = Dataset()
        source.ReferencedSOPClassUID = CTImageStorage
        source.ReferencedSOPInstanceUID = sop_uids[k - 1]
        ds.SourceImageSequence = [source]
    ds.ImageComments = f"{NAME} born {BIRTH}"
    ds.AdmittingDate = "20260110"
    ds.PatientAge = "066Y"
    ds.InstanceCreationDate = "20260115"
    ds.BurnedInAnnotation = "NO"
    return ds


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict:
    """The original study (10 slices, with nasty content) on disk, and what identifies it."""
    root = tmp_path_factory.mktemp("deid")
    r = write_chest_ct(root / "synth", slices=10, rows=32, cols=32, patient_id=PID, patient_name="Zhangsan^Weiming^Q")
    originals = [pydicom.dcmread(p) for p in r.files]
    sop_uids = [str(ds.SOPInstanceUID) for ds in originals]
    files = []
    for k, ds in enumerate(originals):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the ideographic name group
        ds.PatientName = NAME
        ds.PatientBirthTime = "083000"
        nasty(ds, k, sop_uids)
        ds.PatientBirthDate = BIRTH
        path = root / "orig" / f"CT{k:03d}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    datasets = [pydicom.dcmread(p) for p in files]
    uids = {str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID),
            str(datasets[0].FrameOfReferenceUID), *sop_uids}
    return {"root": root, "files": files, "datasets": datasets, "uids": uids,
            "accession": str(datasets[0].AccessionNumber)}


def deidentifier(root: Path, key: bytes = KEY, db: str = "store.db", **kw) -> Deidentifier:
    return Deidentifier(settings(**kw), key, PseudonymMap.open_sqlite(root / db))


def every_element(ds: Dataset, path: str = ""):
    """(path, element) of every element at every depth, file meta included: the test's own walk."""
    if getattr(ds, "file_meta", None) is not None and not path:
        yield from every_element(ds.file_meta, "meta>")
    for elem in ds:
        here = f"{path}{elem.tag}"
        yield here, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from every_element(item, f"{here}[{i}]>")


def as_strings(elem) -> list[str]:
    v = elem.value
    if v is None or elem.VR == "SQ" or elem.tag == 0x7FE00010:
        return []
    if isinstance(v, (bytes, bytearray)):
        return [bytes(v).decode("latin-1")]
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    return [str(v)]


def assert_no_identity(ds: Dataset, forbidden: set[str]) -> None:
    for path, elem in every_element(ds):
        for s in as_strings(elem):
            for f in forbidden:
                assert f.lower() not in s.lower(), f"original value left in {path}"


def forbidden_values(ct: dict) -> set[str]:
    name_parts = {p for group in NAME.split("=") for p in group.split("^") if len(p) >= (4 if p.isascii() else 2)}
    return {NAME, *name_parts, PID, OTHER_PID, BIRTH, ct["accession"], *ct["uids"]}


@pytest.fixture(scope="module")
def deid(ct) -> tuple[Deidentifier, list[Dataset]]:
    d = deidentifier(ct["root"])
    return d, [d.deidentify(ds) for ds in ct["datasets"]]


def test_no_original_identity_anywhere(ct, deid, tmp_path):
    _, out = deid
    forbidden = forbidden_values(ct)
    for k, ds in enumerate(out):
        assert_no_identity(ds, forbidden)
        # and as it would be sent: the file's bytes, read back and walked again
        path = tmp_path / f"deid{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        assert not [f for f in forbidden if f.encode() in raw]  # UTF-8 (ISO_IR 192), and ASCII
        assert_no_identity(pydicom.dcmread(path), forbidden)
        assert not [e for _, e in every_element(ds) if e.tag.is_private], "private tags left"
        assert ds.PatientIdentityRemoved == "YES"
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "OtherPatientIDsSequence" not in ds and "ImageComments" not in ds and "ReferencedStudySequence" not in ds
        assert not ds.PatientBirthDate and "PatientBirthTime" not in ds
        assert ds.PatientID.startswith("AINODE-") and ds.PatientName == ds.PatientID + "^"  # family name only
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # the originals are untouched
    assert ct["datasets"][0].PatientID == PID


def test_series_stays_one_series_with_consistent_references(ct, deid):
    _, out = deid
    assert len({ds.StudyInstanceUID for ds in out}) == 1
    assert len({ds.SeriesInstanceUID for ds in out}) == 1
    assert len({ds.FrameOfReferenceUID for ds in out}) == 1
    assert len({ds.SOPInstanceUID for ds in out}) == len(out)
    assert all(len(ds.SOPInstanceUID) <= 64 and ds.SOPInstanceUID.startswith("2.25.") for ds in out)
    for k in range(1, len(out)):
        assert out[k].SourceImageSequence[0].ReferencedSOPInstanceUID == out[k - 1].SOPInstanceUID
        assert out[k].ReferencedSeriesSequence[0].SeriesInstanceUID == out[k].SeriesInstanceUID
    # dates moved back by one per-patient offset, so intervals survive
    assert out[0].StudyDate < "20260115" and out[0].AdmittingDate < out[0].StudyDate


def test_pseudonyms_are_stable_per_key_and_differ_across_keys(ct, deid):
    d, out = deid
    again = d.deidentify(ct["datasets"][3])
    assert (again.SOPInstanceUID, again.PatientID, again.AccessionNumber, again.StudyDate) == \
           (out[3].SOPInstanceUID, out[3].PatientID, out[3].AccessionNumber, out[3].StudyDate)
    other = deidentifier(ct["root"], OTHER_KEY, db="other.db").deidentify(ct["datasets"][3])
    assert other.SOPInstanceUID != out[3].SOPInstanceUID
    assert other.PatientID != out[3].PatientID and other.AccessionNumber != out[3].AccessionNumber
    # durable: a new map on the same file knows the study
    fresh = PseudonymMap.open_sqlite(ct["root"] / "store.db")
    assert fresh.original_study(out[0].StudyInstanceUID) == ct["datasets"][0].StudyInstanceUID


def test_options_retain_uids_full_dates_characteristics_and_safe_private(ct):
    src = ct["datasets"][2]
    d = deidentifier(ct["root"], db="opts.db", retain_uids=True, retain_dates=True,
                     retain_patient_characteristics=True,
                     safe_private=[{"creator": CREATOR, "group": 0x0009, "element": 0x02}])
    out = d.deidentify(src)
    assert out.SOPInstanceUID == src.SOPInstanceUID and out.StudyDate == src.StudyDate
    assert out.PatientAge == "066Y" and not out.PatientBirthDate and out.PatientID != PID
    assert out.private_block(0x0009, CREATOR)[0x02].value == src.StudyInstanceUID
    assert (0x0009, 0x1001) not in out.private_block(0x0009, CREATOR).dataset
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == \
           ["113100", "113110", "113106", "113108", "113111"]
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert_no_identity(out, {NAME, PID, OTHER_PID, BIRTH, ct["accession"]})


def test_safe_private_uid_is_keyed_and_retained_uids_still_come_home(ct):
    src = ct["datasets"][4]
    safe = [{"creator": CREATOR, "group": 0x0009, "element": 0x02}]
    out = deidentifier(ct["root"], db="safe.db", safe_private=safe).deidentify(src)
    assert out.private_block(0x0009, CREATOR)[0x02].value == out.StudyInstanceUID != src.StudyInstanceUID
    kept = deidentifier(ct["root"], db="kept.db", retain_uids=True)
    copy_ = kept.deidentify(src)
    back = kept.reidentify(copy_)
    assert back is not None and back.StudyInstanceUID == src.StudyInstanceUID and back.PatientID == PID


def test_map_lives_in_the_node_store(ct, tmp_path):
    from sqlalchemy import inspect

    from node.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        d = Deidentifier(settings(), KEY, PseudonymMap(store.engine))
        out = d.deidentify(ct["datasets"][5])
        assert {"studies", "jobs", "pseudonyms"} <= set(inspect(store.engine).get_table_names())
        assert PseudonymMap(store.engine).original_study(out.StudyInstanceUID) == ct["datasets"][5].StudyInstanceUID
    finally:
        store.close()


def test_without_date_options_dates_follow_the_table(ct):
    out = deidentifier(ct["root"], db="nodates.db", shift_dates=False).deidentify(ct["datasets"][1])
    assert not out.StudyDate and "SeriesDate" not in out and not out.ContentDate  # Z, X/D, Z/D
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]


def test_burned_in_annotation_is_refused(ct):
    d = deidentifier(ct["root"], db="burned.db")
    ds = pydicom.dcmread(ct["files"][0])
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError, match=r"\(0028,0301\) BurnedInAnnotation is YES"):
        d.deidentify(ds)
    del ds.BurnedInAnnotation
    ds.Modality = "US"
    with pytest.raises(BurnedInAnnotationError, match="absent on a US image"):
        d.deidentify(ds)


def test_identity_in_an_attribute_the_table_keeps_is_refused(ct):
    d = deidentifier(ct["root"], db="leak.db")
    ds = pydicom.dcmread(ct["files"][0])
    ds.ManufacturerModelName = f"scanner of {PID}"  # not in Table E.1-1: kept, so the final check must catch it
    with pytest.raises(DeidentificationError, match=r"patient ID in \(0008,1090\) ManufacturerModelName") as err:
        d.deidentify(ds)
    assert PID not in str(err.value)


def test_key_is_loaded_from_env_or_file_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("AINODE_TEST_DEID_KEY", "short")
    with pytest.raises(DeidKeyError, match="AINODE_TEST_DEID_KEY holds 5 bytes") as err:
        load_key(settings())
    assert "short" not in str(err.value)
    (tmp_path / "k").write_bytes(KEY + b"\n")
    assert load_key(DeidSettings(key_file=tmp_path / "k")) == KEY
    with pytest.raises(ValueError, match="exactly one of key_file, key_env"):
        DeidSettings(key_file=tmp_path / "k", key_env="X")


def service_sr(series: list[Dataset]) -> Dataset:
    """The external service's own SR on the (de-identified) series it got, built with the node's builder."""
    headers = []
    for ds in series:
        h = Dataset(ds)
        del h.PixelData
        headers.append(h)
    result = PluginResult(findings=[Finding("nodule-1", NODULE, [Measurement(DIAMETER, 7.5, MM)], confidence=0.8)])
    (sr_obj,) = build_results(result, {series[0].SeriesInstanceUID: headers}, AlgorithmInfo("second_read", "1.0"))
    return sr_obj.dataset


def test_result_from_the_external_service_is_reidentified_into_the_original_study(ct, deid, tmp_path):
    require("dciodvfy", "dicom3tools")
    d, out = deid
    sr = service_sr(out)
    assert sr.StudyInstanceUID == out[0].StudyInstanceUID and sr.PatientID == out[0].PatientID

    back = d.reidentify(sr)
    orig = ct["datasets"][0]
    assert back is not None
    assert back.StudyInstanceUID == orig.StudyInstanceUID
    assert (back.PatientID, str(back.PatientName), back.PatientBirthDate, back.AccessionNumber) == \
           (PID, NAME, BIRTH, ct["accession"])
    assert (back.StudyDate, back.StudyTime, back.PatientSex, back.StudyDescription) == \
           (orig.StudyDate, orig.StudyTime, orig.PatientSex, orig.StudyDescription)
    assert "PatientIdentityRemoved" not in back
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == orig.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == orig.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence} == \
           {str(ds.SOPInstanceUID) for ds in ct["datasets"]}
    pseudo_uids = {str(ds.SOPInstanceUID) for ds in out} | {out[0].SeriesInstanceUID, out[0].StudyInstanceUID}
    assert_no_identity(back, pseudo_uids | {out[0].PatientID, out[0].AccessionNumber})
    assert back.SOPInstanceUID == sr.SOPInstanceUID  # the service's own object keeps its own UID

    # An object whose study the node never de-identified is not ours.
    assert d.reidentify(ct["datasets"][0]) is None

    path = tmp_path / "sr.dcm"
    back.save_as(path, enforce_file_format=True)
    errors = validate_with_dciodvfy(path)
    assert errors == [], errors

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        orthanc.upload_files(ct["files"])
        orthanc.upload_files([path])
        study = orthanc.find_study(orig.StudyInstanceUID)
        assert study is not None
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in orthanc.series_of_study(study))
        assert modalities == ["CT", "SR"]
        assert orthanc.statistics()["CountStudies"] == 1 and orthanc.statistics()["CountPatients"] == 1
        info = orthanc.client.get_json(f"studies/{study}")
        assert info["PatientMainDicomTags"]["PatientID"] == PID
