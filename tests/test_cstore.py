"""The C-STORE SCU sends result files as they are written: pynetdicom streams the data set from the file and
never decodes it (a 300-slice SEG cost about 0.8 s a send to decode and encode again)."""

from __future__ import annotations

from pathlib import Path

import pynetdicom.association

from node.config.schema import Destination
from node.dispatch.cstore import Outgoing, send_files
from node.synth import write_chest_ct


def test_files_reach_the_pacs_without_being_decoded(tmp_path, orthanc, monkeypatch):
    ct = write_chest_ct(tmp_path / "ct", slices=10, rows=32, cols=32, pixel_spacing=10.0, seed=2)
    files = [Outgoing(f"uid-{i}", "", Path(p)) for i, p in enumerate(ct.files)]

    def no_decoding(*_a, **_kw):
        raise AssertionError("pynetdicom decoded a file it should have streamed")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    dest = Destination(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    assert send_files(dest, "AINODE", files) == {f.sop_instance_uid: None for f in files}
    study = orthanc.find_study(ct.study_uid)
    [series] = orthanc.series_of_study(study)
    assert len(orthanc.instances_of_series(series["ID"])) == 10
