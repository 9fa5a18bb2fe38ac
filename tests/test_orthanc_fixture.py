"""The test PACS itself: a real Orthanc that starts, stores, sends, and stops without leftovers."""

import io
import os
import signal
import socket
import subprocess
import time

import pydicom
import pydicom.data
import pytest

from tests.conftest import require
from tests.support.net import free_port, wait_for_port
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.timeout(60)

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_orthanc_starts_stores_registers_and_stops(tmp_path):
    require("echoscu", "dcmtk")
    require("storescu", "dcmtk")
    ds = pydicom.dcmread(CT)
    with OrthancServer(tmp_path / "o") as o:
        assert o.client.get_system()["DicomAet"] == "ORTHANC"
        r = subprocess.run(["echoscu", "-aet", "TEST", "-aec", o.aet, "127.0.0.1", str(o.dicom_port)],
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["storescu", "-aet", "TEST", "-aec", o.aet, "127.0.0.1", str(o.dicom_port), CT],
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr

        study = o.find_study(str(ds.StudyInstanceUID))
        assert study is not None
        assert o.find_study("1.2.3.4.5.6.7.8.9") is None
        series = o.series_of_study(study)
        assert [s["MainDicomTags"]["Modality"] for s in series] == ["CT"]
        assert series[0]["MainDicomTags"]["SeriesInstanceUID"] == ds.SeriesInstanceUID
        [inst] = o.instances_of_series(series[0]["ID"])
        back = pydicom.dcmread(io.BytesIO(o.get_instance_file(inst["ID"])))
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.pixel_array.shape == (128, 128)

        # A re-sent object with the same SOP Instance UID replaces the old one (OverwriteInstances).
        ds.SeriesDescription = "replaced"
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed)
        assert o.upload_files([changed]) == [inst["ID"]]
        back = pydicom.dcmread(io.BytesIO(o.get_instance_file(inst["ID"])))
        assert back.SeriesDescription == "replaced"
        assert o.statistics()["CountInstances"] == 1

        o.add_modality("ainode", "AINODE", "127.0.0.1", 11112)
        assert "ainode" in o.client.modalities.get_all_ids()
        assert o.client.modalities.get_configuration("ainode")["AET"] == "AINODE"
        proc, ports = o.proc, (o.dicom_port, o.http_port)
        assert not any(port_is_free(p) for p in ports)

    assert proc.poll() is not None and not o.running
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the whole process group is gone
    assert all(port_is_free(p) for p in ports)


def test_orthanc_sends_a_study_to_a_modality_registered_at_runtime(tmp_path):
    """The path the node is fed by: PUT /modalities/{name}, then POST /modalities/{name}/store."""
    require("storescp", "dcmtk")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-aet", "RECEIVER", "-od", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for_port("127.0.0.1", port, 10), "storescp did not listen"
        with OrthancServer(tmp_path / "o") as o:
            [inst] = o.upload_files([CT])
            study = o.find_study(str(pydicom.dcmread(CT).StudyInstanceUID))
            o.add_modality("rx", "RECEIVER", "127.0.0.1", port)
            assert o.client.post("modalities/rx/echo", json={}).status_code == 200
            o.send_study_to_modality("rx", study)  # synchronous: returns once stored
            files = list(out.iterdir())
            assert len(files) == 1
            assert pydicom.dcmread(files[0]).SOPInstanceUID == pydicom.dcmread(CT).SOPInstanceUID

            job = o.send_study_to_modality("rx", study, synchronous=False)
            for _ in range(100):
                if o.job_state(job) in ("Success", "Failure"):
                    break
                time.sleep(0.1)
            assert o.job_state(job) == "Success"
    finally:
        os.killpg(scp.pid, signal.SIGTERM)
        scp.wait(10)
