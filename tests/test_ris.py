"""RIS output: HL7 v2.5 ORU^R01 over MLLP (plain and TLS) and FHIR R4, from a real result SR.

Servers are real loopback listeners on free ports (tests/support), each stopped by the test that started
it. Certificates come from a throwaway CA that the tests make with the openssl CLI.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.plugin_api import Code, Finding, Measurement, PluginResult, Segment, Segmentation
from node.results import AlgorithmInfo, build_results
from node.results.sr import build_sr
from node.ris import (FhirDestination, RisDestination, RisSendError, build_bundle, build_oru, read_report,
                      send_fhir, send_oru)
from node.ris.mllp import parse_ack
from tests.support.http_listener import HttpListener
from tests.support.mllp_listener import MllpListener
from tests.support.net import free_port

LUNG, LEFT = Code("39607008", "SCT", "Lung"), Code("44029006", "SCT", "Left lung")
NODULE, RUL = Code("27925004", "SCT", "Nodule"), Code("45653009", "SCT", "Upper lobe of right lung")
VOLUME, ML = Code("118565006", "SCT", "Volume"), Code("mL", "UCUM", "milliliter")
DIAMETER, MM = Code("81827009", "SCT", "Diameter"), Code("mm", "UCUM", "millimeter")
ANAT = Code("91723000", "SCT", "Anatomical Structure")
PATIENT_NAME = "O|Brien&Co^Jöhn~X"  # HL7 delimiters in free text: hl7apy must escape them
ACCESSION = "ACC-2026-0042"


def tiny_ct(n: int = 4, size: int = 16) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, "PID42", "19700101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", ACCESSION, "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 1, k + 1
        ds.Manufacturer = "TEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(-k * 2.5)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
        ds.PositionReferenceIndicator = ""
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        out.append(ds)
    return out


def findings(series_uid: str, n: int, size: int) -> PluginResult:
    mask = np.zeros((n, size, size), bool)
    mask[1:3, 4:12, 4:12] = True
    return PluginResult(
        findings=[
            Finding("left-lung", LUNG, [Measurement(VOLUME, 1234.5, ML)], finding_site=LEFT,
                    segment_label="left_lung", confidence=0.93),
            Finding("nodule-1", NODULE, [Measurement(DIAMETER, 6.2, MM), Measurement(VOLUME, 0.12, ML)],
                    finding_site=RUL, confidence=0.71),
        ],
        segmentations=[Segmentation(series_uid, [Segment("left_lung", mask, ANAT, LEFT)])],
    )


@pytest.fixture(scope="module")
def sr_path(tmp_path_factory) -> Path:
    """A result SR as the node builds it (build_results), written as the job process writes it."""
    src = tiny_ct()
    series = src[0].SeriesInstanceUID
    objs = build_results(findings(series, len(src), src[0].Rows), {series: src},
                         AlgorithmInfo("ct_lung", "1.0.0", "lung-unet", "2.1", "ab" * 32))
    sr = next(o for o in objs if o.kind == "SR").dataset
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def sr_measurements(path: Path) -> list[tuple[str, Decimal, str]]:
    """(concept code, value, unit) of every NUM in the SR, read independently of node.ris."""
    def walk(items):
        for item in items or []:
            yield item
            yield from walk(item.get("ContentSequence"))
    out = []
    for item in walk(dcmread(path).ContentSequence):
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            out.append((item.ConceptNameCodeSequence[0].CodeValue, Decimal(str(mv.NumericValue)),
                        mv.MeasurementUnitsCodeSequence[0].CodeValue))
    return out


def ris(port: int, **kw) -> RisDestination:
    return RisDestination(host="127.0.0.1", port=port, sending_facility="RADIOLOGY", receiving_application="RIS",
                          receiving_facility="HOSP", timeout_s=kw.pop("timeout_s", 3.0), **kw)


def obx_rows(er7: str) -> list[list[str]]:
    return [s.split("|") for s in er7.split("\r") if s.startswith("OBX|")]


# --- the message --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oru(sr_path) -> str:
    return build_oru(read_report(sr_path), ris(1), "CTRL-1").to_er7()


def test_oru_carries_patient_order_and_the_srs_measurements(sr_path, oru):
    sr = dcmread(sr_path)
    er7 = oru
    msg = parse_message(er7, find_groups=False)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_10.value == "CTRL-1"
    assert msg.msh.msh_12.to_er7() == "2.5" and msg.msh.msh_5.to_er7() == "RIS"
    assert msg.pid.pid_3.cx_1.value == "PID42"
    assert msg.pid.pid_7.to_er7() == "19700101" and msg.pid.pid_8.to_er7() == "F"
    assert msg.orc.orc_2.to_er7() == msg.orc.orc_3.to_er7() == ACCESSION
    assert msg.obr.obr_2.to_er7() == msg.obr.obr_3.to_er7() == ACCESSION
    assert msg.obr.obr_4.to_er7() == "418023006^Computed tomography of chest^SCT"
    assert msg.obr.obr_7.to_er7() == "20260101120000" and msg.obr.obr_25.to_er7() == "P"  # unverified AI result

    rows = obx_rows(er7)
    assert [r[1] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]  # OBX-1 set ids
    numeric = [(r[3].split("^")[0], Decimal(r[5]), r[6].split("^")[0]) for r in rows if r[2] == "NM"]
    assert sorted(numeric) == sorted(sr_measurements(sr_path))
    assert all(r[6].endswith("^UCUM") for r in rows if r[2] == "NM")
    # grouped by finding: OBX-4 is the finding's number; its confidence is OBX-9 on the finding's OBX
    by_sub = {}
    for r in rows:
        by_sub.setdefault(r[4], []).append(r)
    assert {(r[3].split("^")[0], r[5]) for r in by_sub["2"] if r[2] == "NM"} == {
        ("81827009", "6.2"), ("118565006", "0.12"), ("111012", "71.0")}
    finding2 = next(r for r in by_sub["2"] if r[3].startswith("121071^"))
    assert finding2[5] == "27925004^Nodule^SCT" and finding2[9] == "0.71"
    assert any(r[3].startswith("363698007^") and r[5] == "45653009^Upper lobe of right lung^SCT" for r in by_sub["2"])
    assert any(r[3].startswith("112039^") and r[5] == "nodule-1" for r in by_sub["2"])
    # document level: the SR's UIDs, so the RIS can link to the PACS object, and the algorithm
    uids = {r[3].split("^")[0]: r[5].split("^")[1] for r in by_sub[""] if r[2] == "HD"}
    assert uids == {"110180": sr.StudyInstanceUID, "112002": sr.SeriesInstanceUID,
                    "SOPInstanceUID": sr.SOPInstanceUID}
    algo = next(r[5] for r in by_sub[""] if r[2] == "TX")
    assert "ct_lung 1.0.0" in algo and "lung-unet 2.1" in algo and "NOT FOR CLINICAL USE" not in algo
    assert all(r[11] == "P" for r in rows)


def test_oru_is_a_valid_v25_oru_r01(oru):
    """hl7apy's strict validation: message structure, segment order, required fields, datatypes."""
    assert parse_message(oru, validation_level=VALIDATION_LEVEL.STRICT).validate()


def test_free_text_delimiters_are_escaped(oru):
    er7 = oru
    pid = next(s for s in er7.split("\r") if s.startswith("PID|"))
    assert pid.split("|")[5] == r"O\F\Brien\T\Co^Jöhn\R\X"  # DICOM ^ stays the name's component separator
    assert len(pid.split("|")) == 9  # no field split by the name's '|'
    assert parse_message(er7, find_groups=False).pid.pid_5.xpn_2.to_er7() == r"Jöhn\R\X"


def test_not_for_clinical_use_is_said_where_the_sr_says_so(tmp_path):
    src = tiny_ct()
    sr = build_sr([Finding("n1", NODULE, [Measurement(DIAMETER, 4.0, MM)], finding_site=RUL)],
                  {src[0].SeriesInstanceUID: src}, {}, name="ct_nodule", version="0.1.0",
                  observer_uid=generate_uid(), tracking_uid=lambda t: generate_uid(), series_uid=generate_uid(),
                  sop_uid=generate_uid(), manufacturer="AINODE", device_serial="t",
                  parameters={"model_name": "nodule-net", "model_version": "0.1.0", "not_for_clinical_use": "true"})
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    er7 = build_oru(read_report(tmp_path / "sr.dcm"), ris(1), "CTRL-3").to_er7()
    algo = next(r[5] for r in obx_rows(er7) if r[2] == "TX")
    assert "ct_nodule 0.1.0, model nodule-net 0.1.0" in algo and "NOT FOR CLINICAL USE" in algo


def test_an_sr_without_accession_number_is_refused_naming_the_tag(sr_path, tmp_path):
    ds = dcmread(sr_path)
    ds.AccessionNumber = ""
    ds.save_as(tmp_path / "noacc.dcm", enforce_file_format=True)
    with pytest.raises(RisSendError, match=r"\(0008,0050\)") as err:
        read_report(tmp_path / "noacc.dcm")
    assert not err.value.retryable
    with pytest.raises(RisSendError, match="does not exist") as err:
        send_oru(ris(1), tmp_path / "gone.dcm", control_id="C")
    assert not err.value.retryable


# --- MLLP ---------------------------------------------------------------------------------------------


def test_oru_over_mllp_is_acked_and_logs_no_patient_data(sr_path, caplog):
    caplog.set_level(logging.DEBUG, logger="node.ris")
    with MllpListener("AA", text="stored") as rl:
        summary = send_oru(ris(rl.port), sr_path, control_id="AIN17")
    assert summary == "AA AIN17: stored"
    assert len(rl.messages) == 1
    received = rl.messages[0]
    assert received.startswith("MSH|^~\\&|AINODE|RADIOLOGY|RIS|HOSP|")
    assert f"|{ACCESSION}|" in next(s for s in received.split("\r") if s.startswith("OBR|"))
    values = sorted(Decimal(r[5]) for r in obx_rows(received) if r[2] == "NM")
    assert values == sorted(v for _, v, _ in sr_measurements(sr_path))
    assert "AIN17" in caplog.text and "PID42" not in caplog.text and "Brien" not in caplog.text


def test_application_error_is_not_retryable_and_says_why(sr_path):
    with MllpListener("AE", text="Unknown order|ACC for patient PID42") as rl:
        with pytest.raises(RisSendError) as err:
            send_oru(ris(rl.port), sr_path, control_id="AIN18")
    assert not err.value.retryable
    assert f"127.0.0.1:{rl.port}" in str(err.value)
    assert "Unknown order|ACC for patient <patient>" in str(err.value)  # MSA-3, unescaped; no patient ID (logged)


def test_application_reject_is_retryable(sr_path):
    with MllpListener("AR", text="queue full") as rl:
        with pytest.raises(RisSendError, match="queue full") as err:
            send_oru(ris(rl.port), sr_path, control_id="AIN19")
    assert err.value.retryable


def test_no_ack_times_out_retryably(sr_path):
    with MllpListener("silent") as rl:
        # The listener never answers: without the timeout this would hang (until pytest's own timeout).
        with pytest.raises(RisSendError, match=rf"127\.0\.0\.1:{rl.port}: no ACK within 0\.3 s") as err:
            send_oru(ris(rl.port, timeout_s=0.3), sr_path, control_id="AIN20")
    assert err.value.retryable and len(rl.messages) == 1


def test_refused_connection_is_retryable_and_names_the_port(sr_path):
    port = free_port()  # nothing listens there
    with pytest.raises(RisSendError, match=rf"127\.0\.0\.1:{port} refused the connection") as err:
        send_oru(ris(port), sr_path, control_id="AIN21")
    assert err.value.retryable


def test_ack_for_another_message_is_not_taken_as_success(sr_path):
    with MllpListener("wrong-id") as rl:
        with pytest.raises(RisSendError, match="SOMEONE-ELSE") as err:
            send_oru(ris(rl.port), sr_path, control_id="AIN22")
    assert err.value.retryable


@pytest.mark.parametrize("ack, expected", [
    ("MSH|^~\\&|RIS|H|AINODE|F|20260101||ACK|1|P|2.3.1\rMSA|AA|C1|ok \\T\\ done\r", ("AA", "C1", "ok & done")),
    ("MSH|^~\\&|RIS|H|AINODE|F|20260101||ACK|1|P|\nMSA|CA|C1\n", ("CA", "C1", "")),  # no version, LF ends
    ("MSH|^~\\&|RIS|H|AINODE|F|20260101||ACK|1|P|2.5\rMSA|AE|C1\rERR||||E||||Unknown patient\r",
     ("AE", "C1", "Unknown patient")),  # ERR-8 where MSA-3 is empty
    ("MSH|^~\\&|RIS|H|AINODE|F|20260101||ACK|1|P|2.5\rMSA|AE|C1\rERR|||207^Application internal error^HL70357|E\r",
     ("AE", "C1", "Application internal error")),
])
def test_acks_of_any_v2_version_are_understood(ack, expected):
    got = parse_ack(ack.encode(), "h:1")
    assert (got.code, got.control_id, got.text) == expected
    with pytest.raises(RisSendError, match="not an HL7 ACK") as err:
        parse_ack(b"HTTP/1.1 400 Bad Request\r\n", "h:1")
    assert err.value.retryable


def test_bad_control_id_is_refused_before_sending(sr_path):
    with pytest.raises(RisSendError, match="MSH-10") as err:
        send_oru(ris(1), sr_path, control_id="x" * 21)
    assert not err.value.retryable


# --- TLS ----------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=ainode test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\nbasicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
                                   "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A test CA with a server certificate for 127.0.0.1 and a client certificate; and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    return d


def server_context(pki: Path, require_client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client_cert:
        ctx.load_verify_locations(pki / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_oru_over_mutual_tls_with_a_test_ca(sr_path, pki):
    tls = {"ca_file": pki / "ca.pem", "cert_file": pki / "client.pem", "key_file": pki / "client.key"}
    with MllpListener("AA", ssl_context=server_context(pki)) as rl:
        assert send_oru(ris(rl.port, tls=tls), sr_path, control_id="AIN30") == "AA AIN30"
    assert len(rl.messages) == 1 and not rl.errors


def test_tls_with_the_wrong_ca_fails_without_retry(sr_path, pki):
    with MllpListener("AA", ssl_context=server_context(pki, require_client_cert=False)) as rl:
        with pytest.raises(RisSendError, match="certificate does not verify") as err:
            send_oru(ris(rl.port, tls={"ca_file": pki / "other-ca.pem"}), sr_path, control_id="AIN31")
    assert not err.value.retryable and rl.messages == []
    assert f"127.0.0.1:{rl.port}" in str(err.value) and "tls.ca_file" in str(err.value)


# --- FHIR ---------------------------------------------------------------------------------------------


def test_fhir_transaction_bundle_is_posted_with_the_token(sr_path, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    answer = {"resourceType": "Bundle", "type": "transaction-response",
              "entry": [{"response": {"status": "201 Created", "location": "DiagnosticReport/7/_history/1"}}]}
    with HttpListener(200, answer) as api:
        summary = send_fhir(FhirDestination(base_url=api.url, token_file=token_file, timeout_s=3), sr_path)
    assert summary == "HTTP 200: DiagnosticReport/7/_history/1"
    (req,) = api.requests
    assert req.path == "/fhir" and req.headers["Authorization"] == "Bearer s3cret"
    assert req.headers["Content-Type"] == "application/fhir+json"
    bundle = req.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    resources = [e["resource"] for e in bundle["entry"]]
    (dr,) = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    obs = [r for r in resources if r["resourceType"] == "Observation"]
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": ACCESSION} in dr["identifier"]
    assert dr["subject"] == {"identifier": {"value": "PID42"}} and dr["status"] == "preliminary"
    assert dr["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "418023006",
                                       "display": "Computed tomography of chest"}
    assert len(dr["result"]) == len(obs) == len(sr_measurements(sr_path))
    got = sorted((o["code"]["coding"][0]["code"], Decimal(str(o["valueQuantity"]["value"])),
                  o["valueQuantity"]["code"]) for o in obs)
    assert got == sorted(sr_measurements(sr_path))
    assert all(o["valueQuantity"]["system"] == "http://unitsofmeasure.org" for o in obs)
    assert "Brien" not in req.body.decode()  # FHIR gets the patient by identifier only


def test_fhir_bundle_is_the_same_on_a_resend(sr_path):
    """Deterministic ids + conditional create: a resend after a lost response does not duplicate."""
    a, b = (build_bundle(read_report(sr_path)) for _ in range(2))
    assert [e["fullUrl"] for e in a["entry"]] == [e["fullUrl"] for e in b["entry"]]
    assert all(e["request"]["ifNoneExist"] for e in a["entry"])


@pytest.mark.parametrize("status, retryable", [(400, False), (401, False), (503, True), (429, True)])
def test_fhir_http_errors(sr_path, status, retryable):
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "diagnostics": "nope: no Patient PID42"}]}
    with HttpListener(status, outcome) as api:
        with pytest.raises(RisSendError, match=f"HTTP {status}.*nope: no Patient <patient>") as err:
            send_fhir(FhirDestination(base_url=api.url, token="t", timeout_s=3), sr_path)
    assert err.value.retryable is retryable and api.url in str(err.value)


def test_fhir_timeout_and_refusal_are_retryable(sr_path):
    with HttpListener(200, delay_s=5) as api:
        with pytest.raises(RisSendError) as err:
            send_fhir(FhirDestination(base_url=api.url, timeout_s=0.3), sr_path)
    assert err.value.retryable and api.url in str(err.value)
    url = f"http://127.0.0.1:{free_port()}/fhir"
    with pytest.raises(RisSendError, match="cannot be reached") as err:
        send_fhir(FhirDestination(base_url=url, timeout_s=1), sr_path)
    assert err.value.retryable


def test_fhir_over_https_with_the_test_ca(sr_path, pki):
    with HttpListener(201, {}, ssl_context=server_context(pki, require_client_cert=False)) as api:
        assert send_fhir(FhirDestination(base_url=api.url, ca_file=pki / "ca.pem", timeout_s=3), sr_path) == "HTTP 201"
        with pytest.raises(RisSendError, match="does not verify") as err:
            send_fhir(FhirDestination(base_url=api.url, ca_file=pki / "other-ca.pem", timeout_s=3), sr_path)
    assert not err.value.retryable


# --- config -------------------------------------------------------------------------------------------


def test_config_models():
    d = RisDestination.model_validate({"host": "ris.example.org", "port": 2575, "receiving_application": "RIS",
                                       "tls": {"ca_file": "/etc/ainode/ris-ca.pem"}})
    assert d.sending_application == "AINODE" and d.max_attempts == 5 and d.tls.cert_file is None
    for bad in ({"host": "h", "port": 2575, "typo": 1}, {"host": "h", "port": 0},
                {"host": "h", "port": 1, "sending_facility": "A|B"},
                {"host": "h", "port": 1, "tls": {"cert_file": "c.pem"}}):
        with pytest.raises(ValidationError):
            RisDestination.model_validate(bad)
    f = FhirDestination(base_url="https://fhir.example.org/r4/", token="abc")
    assert f.base_url == "https://fhir.example.org/r4" and "abc" not in repr(f)
    with pytest.raises(ValidationError, match="at most one"):
        FhirDestination(base_url="https://x", token="a", token_env="T")
    with pytest.raises(ValidationError):
        FhirDestination(base_url="ftp://x")
