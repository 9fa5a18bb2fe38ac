"""The receiver's own Part-10 prefix and header reading give what pynetdicom and pydicom give."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from node.receive.part10 import PREAMBLE, part10_prefix, read_header
from node.synth import write_chest_ct

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.1", "9", "1." + "2" * 62,
                                 "2.25.123456789012345678901234567890123456789"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_prefix_is_the_file_meta_pynetdicom_writes(uid, ts):
    expected = PREAMBLE + encode_file_meta(create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(uid),
                                                            transfer_syntax=UID(ts)))
    assert part10_prefix(CT, uid, ts) == expected
    assert part10_prefix(CT, uid, ts) == expected  # from the cached template too
    assert dcmread(BytesIO(expected)).file_meta.MediaStorageSOPInstanceUID == uid


def test_prefix_of_a_malformed_request_uid_is_still_made():
    uid = "1.2.abc"
    expected = PREAMBLE + encode_file_meta(create_file_meta(sop_class_uid=UID(CT), sop_instance_uid=UID(uid),
                                                            transfer_syntax=UID(ExplicitVRLittleEndian)))
    assert part10_prefix(CT, uid, ExplicitVRLittleEndian) == expected


def data_set_bytes(ds, ts: UID) -> bytes:
    """`ds` written as a file in `ts` by pydicom, less its preamble and File Meta Information."""
    ds.file_meta.TransferSyntaxUID = ts
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    whole = buf.getvalue()
    group_length = int.from_bytes(whole[140:144], "little")  # (0002,0000) UL, right after DICM
    return whole[144 + group_length:]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_header_read_from_the_data_set_equals_dcmread(tmp_path, ts):
    path = write_chest_ct(tmp_path / "ct", slices=10, rows=32, cols=32).files[4]
    got = read_header(data_set_bytes(dcmread(path), UID(ts)), UID(ts))
    want = dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in got
    assert [e.tag for e in got] == [e.tag for e in want]
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Rows", "Columns",
                    "SliceThickness", "ImagePositionPatient"):
        assert got[keyword].value == want[keyword].value, keyword
