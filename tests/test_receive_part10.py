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


def _encoded_header(elements: list[tuple[int, str, bytes]], ts) -> bytes:  # type: ignore[no-untyped-def]
    """Data set bytes with these (tag, VR, value) elements, written by hand so that any value can be sent."""
    import struct

    little = ts.is_little_endian
    e = "<" if little else ">"
    out = b""
    for tag, vr, value in sorted(elements):
        head = struct.pack(f"{e}HH", tag >> 16, tag & 0xFFFF)
        if ts.is_implicit_VR:
            out += head + struct.pack(f"{e}L", len(value)) + value
        elif vr in ("OB", "OW"):
            out += head + vr.encode() + b"\x00\x00" + struct.pack(f"{e}L", len(value)) + value
        else:
            out += head + vr.encode() + struct.pack(f"{e}H", len(value)) + value
    return out


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    from node.receive import checks

    try:
        return fn(*args)
    except (checks.CannotUnderstand, checks.DoesNotMatch) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("sop_uid", [b"1.2.3.4", b"1.2.3.4\x00", b"1.2.3.4 ", b" 1.2.3.4", b"1.2.3\\4.5",
                                     b"1.2.3\\", b"", b"1.2.a", b"\xe91.2", b"1." + b"2" * 70])
@pytest.mark.parametrize("rows", [b"\x00\x02", b"\x00", b"", b"\x00\x02\x00\x02"])
def test_uids_and_pixel_integers_read_from_the_bytes_match_pydicoms_conversion(ts, sop_uid, rows):
    """identity() and check_pixel_data() decode UI and US values straight from the received bytes (checks.py
    raw_ui, raw_us); with every element converted by pydicom first they take pydicom's path. Both must
    give the same UIDs, or refuse with the same reason."""
    import struct

    from pydicom.dataelem import RawDataElement

    from node.receive import checks
    from node.receive.part10 import read_header

    e = "<" if ts.is_little_endian else ">"
    us = lambda v: struct.pack(f"{e}H", v)  # noqa: E731
    rows_value = rows if len(rows) != 2 else us(struct.unpack(">H", rows)[0])
    elements = [(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x00080018, "UI", sop_uid),
                (0x0020000D, "UI", b"1.2.3.1"), (0x0020000E, "UI", b"1.2.3.2\x00"),
                (0x00280002, "US", us(1)), (0x00280010, "US", rows_value), (0x00280011, "US", us(2)),
                (0x00280100, "US", us(16)), (0x7FE00010, "OW", b"\x00" * 8)]
    body = _encoded_header(elements, ts)
    scanned = checks.scan(body, ts, 2**20)
    raw = read_header(body, ts)
    converted = read_header(body, ts)
    for tag in list(converted.keys()):  # converted by pydicom: identity and _int take pydicom's path for them
        try:
            converted[tag]
        except Exception:  # noqa: BLE001 - left raw; checks converts it again (and refuses it) either way
            pass
    assert any(isinstance(raw.get_item(t), RawDataElement) for t in raw.keys())
    assert _outcome(checks.identity, raw) == _outcome(checks.identity, converted)
    assert (_outcome(checks.check_pixel_data, raw, scanned, ts)
            == _outcome(checks.check_pixel_data, converted, scanned, ts))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_identity_and_pixel_check_leave_plain_uids_and_integers_unconverted(ts):
    """The common case takes the bytes path: no element identity() or check_pixel_data() reads is converted."""
    import struct

    from pydicom.dataelem import RawDataElement

    from node.receive import checks
    from node.receive.part10 import read_header

    e = "<" if ts.is_little_endian else ">"
    us = lambda v: struct.pack(f"{e}H", v)  # noqa: E731
    elements = [(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x00080018, "UI", b"1.2.3.4\x00"),
                (0x0020000D, "UI", b"1.2.3.1\x00"), (0x0020000E, "UI", b"1.2.3.2\x00"),
                (0x00280002, "US", us(1)), (0x00280010, "US", us(2)), (0x00280011, "US", us(2)),
                (0x00280100, "US", us(16)), (0x7FE00010, "OW", b"\x00" * 8)]
    body = _encoded_header(elements, ts)
    ds = read_header(body, ts)
    assert checks.identity(ds) == ("1.2.3.4", "1.2.3.1", "1.2.3.2", "1.2.840.10008.5.1.4.1.1.2")
    checks.check_pixel_data(ds, checks.scan(body, ts, 2**20), ts)
    assert all(isinstance(ds.get_item(tag), RawDataElement) for tag, _, _ in elements[:-1])  # read_header stops at the pixel data
