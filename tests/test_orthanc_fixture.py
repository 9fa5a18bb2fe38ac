"""The test PACS itself: a real Orthanc that starts, stores, and stops without leftovers."""

import socket
import subprocess

import pydicom.data

from tests.conftest import require
from tests.support.orthanc import OrthancServer


def test_orthanc_starts_stores_registers_and_stops(tmp_path):
    require("storescu", "dcmtk")
    f = pydicom.data.get_testdata_file("CT_small.dcm")
    with OrthancServer(tmp_path / "o") as o:
        r = subprocess.run(["echoscu", "-aec", o.aet, "127.0.0.1", str(o.dicom_port)], capture_output=True, timeout=30)
        assert r.returncode == 0
        r = subprocess.run(["storescu", "-aec", o.aet, "127.0.0.1", str(o.dicom_port), f], capture_output=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        study = o.find_study(str(pydicom.dcmread(f).StudyInstanceUID))
        assert study and [s["MainDicomTags"]["Modality"] for s in o.series_of_study(study)] == ["CT"]
        o.add_modality("ainode", "AINODE", "127.0.0.1", 11112)
        assert "ainode" in o.client.modalities.get_all_ids()
        proc = o.proc
    assert proc.poll() is not None
    for port in (o.dicom_port, o.http_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # nothing listens any more
