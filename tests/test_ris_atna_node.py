"""The running node sends an HL7 ORU^R01 per finished job to a RIS (MLLP, ACKed) and its audit records as
DICOM PS3.15 audit messages to a syslog receiver (IHE ATNA). Loopback listeners started by the test."""

import xml.etree.ElementTree as ET

from pydicom import dcmread

from node.synth import write_chest_ct
from tests.support.mllp_listener import MllpListener
from tests.support.pipeline import events, query, send
from tests.support.syslog_listener import SyslogListener
from tests.support.wait import wait_until


def _segments(message: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for seg in message.replace("\n", "\r").split("\r"):
        if seg:
            fields = seg.split("|")
            out.setdefault(fields[0], []).append(fields)
    return out


def _sr_numbers(path: str) -> list[float]:
    values = []

    def walk(items):  # noqa: ANN001
        for item in items:
            if item.ValueType == "NUM":
                values.append(float(item.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dcmread(path).ContentSequence)
    return values


def test_oru_reaches_the_ris_acked_and_audit_goes_to_the_atna_repository(tmp_path, node_factory):
    with MllpListener("AA") as ris, MllpListener("AE", text="unknown order") as bad_ris, \
            SyslogListener() as arr:
        node = node_factory({
            "assemble": {"quiet_period_s": 1.0},
            "ris": {"ris": {"host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS"},
                    "bad_ris": {"host": "127.0.0.1", "port": bad_ris.port, "max_attempts": 5}},
            "atna": {"host": "127.0.0.1", "port": arr.port, "transport": "tcp"},
            "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung",
                       "destinations": ["ris", "bad_ris"]}],
        })
        ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0, seed=3)
        send(node, ct.files)
        wait_until(lambda: len(events(node, "report-sent")) == 1 and
                   query(node, "select count(*) from dispatches where state = 'dead-letter'")[0][0] == 1,
                   120, "the ORU to be ACKed and the rejected one dead-lettered")

        (message,) = ris.messages
        seg = _segments(message)
        accession = str(dcmread(ct.files[0]).AccessionNumber)
        assert seg["MSH"][0][8] == "ORU^R01^ORU_R01" and seg["MSH"][0][4] == "RIS"
        assert accession in seg["OBR"][0][3] or accession in seg["ORC"][0][3]
        assert seg["PID"][0][3].startswith(str(dcmread(ct.files[0]).PatientID))
        ((sr_path,),) = query(node, "select path from dispatches where destination = 'ris'")
        numbers = sorted(float(f[5]) for f in seg["OBX"] if f[2] == "NM")
        assert numbers and numbers == sorted(_sr_numbers(sr_path))
        sent = events(node, "report-sent")[0]
        assert sent["kind"] == "ORU" and sent["ack"].startswith("AA")

        # AE (application error) is not retried: one attempt, then dead-letter, kept for `ainode requeue`.
        assert len(bad_ris.messages) == 1
        ((attempts, error),) = query(node, "select attempts, last_error from dispatches where destination='bad_ris'")
        assert attempts == 1 and "unknown order" in error

        assert node.stop() == 0
        msgs = arr.wait_for(1, timeout=5)
        ids = [ET.fromstring(m.text.lstrip("\ufeff")).find("EventIdentification/EventID").get("csd-code")
               for m in msgs]
        assert "110100" in ids  # application start/stop
        assert "110104" in ids  # instances received, results reported
        assert "110103" in ids  # the plugin's access to the study
        patient = str(dcmread(ct.files[0]).PatientID)
        assert any(patient in m.text for m in msgs)  # the ATNA record names the patient, as it must
        assert not ris.errors and not arr.errors
