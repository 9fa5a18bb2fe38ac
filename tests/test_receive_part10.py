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


def _plain_elements(ts) -> list[tuple[int, str, bytes]]:  # type: ignore[no-untyped-def]
    """A CT header's identity UIDs and pixel description, plainly encoded, and 8 bytes of pixel data."""
    import struct

    e = "<" if ts.is_little_endian else ">"
    us = lambda v: struct.pack(f"{e}H", v)  # noqa: E731
    return [(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x00080018, "UI", b"1.2.3.4\x00"),
            (0x0020000D, "UI", b"1.2.3.1\x00"), (0x0020000E, "UI", b"1.2.3.2\x00"),
            (0x00280002, "US", us(1)), (0x00280010, "US", us(2)), (0x00280011, "US", us(2)),
            (0x00280100, "US", us(16)), (0x7FE00010, "OW", b"\x00" * 8)]


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
    from pydicom.dataelem import RawDataElement

    from node.receive import checks
    from node.receive.part10 import read_header

    elements = _plain_elements(ts)
    body = _encoded_header(elements, ts)
    ds = read_header(body, ts)
    assert checks.identity(ds) == ("1.2.3.4", "1.2.3.1", "1.2.3.2", "1.2.840.10008.5.1.4.1.1.2")
    checks.check_pixel_data(ds, checks.scan(body, ts, 2**20), ts)
    assert all(isinstance(ds.get_item(tag), RawDataElement) for tag, _, _ in elements[:-1])  # read_header stops at the pixel data


def _variant(path, name: str):  # type: ignore[no-untyped-def]
    """The chest CT slice at `path`, changed as `name` says."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dcmread(path)
    if name == "utf-8":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientID, ds.StudyDescription, ds.SeriesDescription = "Ünï-1", "Thorax 胸部", "Lunge ä"
    elif name == "latin-1":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription, ds.BodyPartExamined = "Lunge äöü", "CHEST"
    elif name == "empty and wrong":
        ds.PatientID = ""
        ds.add_new(0x00080060, "US", 5)  # Modality sent as a number
        ds.add_new(0x00180050, "DS", None)  # SliceThickness empty
        ds.AccessionNumber = "A\\B"  # two values
    elif name == "not a number":  # SliceThickness "abc", PatientID with VR US: written as raw bytes
        from pydicom.dataelem import RawDataElement
        from pydicom.tag import Tag

        ds._dict[Tag(0x00180050)] = RawDataElement(Tag(0x00180050), "DS", 4, b"abc ", 0, False, True)
        ds._dict[Tag(0x00100020)] = RawDataElement(Tag(0x00100020), "US", 2, b"\x05\x00", 0, False, True)
    elif name in ("sequence", "sequence of defined length"):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT, "1.2.3.4.5"
        ds.ReferencedImageSequence = Sequence([item])
        ds["ReferencedImageSequence"].is_undefined_length = name == "sequence"
    return ds


def _receive_outcome(ds, scanned, ts):  # type: ignore[no-untyped-def]
    """What the receiver makes of a header: identity, pixel check, dropped attributes, the store row."""
    from node.receive import checks
    from node.receive.header import instance_meta

    out = [_outcome(checks.identity, ds), _outcome(checks.check_pixel_data, ds, scanned, ts)]
    out.append(checks.drop_unreadable_metadata(ds))
    if not isinstance(out[0], str):
        out.append(instance_meta(ds, path="p", size=1, transfer_syntax=str(ts), calling_ae="X", checked=out[0]))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("name", ["plain", "utf-8", "latin-1", "empty and wrong", "not a number", "sequence",
                                  "sequence of defined length"])
def test_the_header_taken_from_the_scan_reads_as_pydicoms_does(tmp_path, ts, name):
    """read_header given checks.scan's result builds only checks.HEADER_KEYWORDS' raw elements from the positions
    the scan found; everything the receiver makes of them must be what it makes of pydicom's own read."""
    from node.receive import checks
    from node.receive.part10 import header_of

    path = write_chest_ct(tmp_path / "ct", slices=10, rows=32, cols=32).files[4]
    body = data_set_bytes(_variant(path, name), UID(ts))
    scanned = checks.scan(body, UID(ts), 2**24)
    minimal = read_header(body, UID(ts), scanned)
    assert header_of(scanned, UID(ts)) is not None  # the scan's path, not the fallback
    assert len(minimal) <= len(checks.HEADER_KEYWORDS) < len(read_header(body, UID(ts)))
    assert _receive_outcome(minimal, scanned, UID(ts)) == _receive_outcome(read_header(body, UID(ts)), scanned, UID(ts))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_header_attribute_after_the_pixel_data_or_of_undefined_length_takes_pydicoms_reader(ts):
    """pydicom's reader stops at the pixel data and reads an undefined length up to its delimiter: where an
    attribute the receiver reads is sent so, the header is read by pydicom, and the outcome is the same."""
    import struct

    from node.receive import checks
    from node.receive.part10 import header_of

    base = _plain_elements(ts)
    patient_id = _encoded_header([(0x00100020, "LO", b"LATE")], ts)
    after = _encoded_header(base, ts) + patient_id  # out of order: after the pixel data
    twice = _encoded_header(base + [(0x00100020, "LO", b"EARLY ")], ts) + patient_id
    for body in (after, twice):
        scanned = checks.scan(body, ts, 2**20)
        assert header_of(scanned, ts) is None
        assert (_receive_outcome(read_header(body, ts, scanned), scanned, ts)
                == _receive_outcome(read_header(body, ts), scanned, ts))
    if ts.is_implicit_VR:  # (0010,0020) of undefined length, holding no item
        undefined = (_encoded_header(base[:4], ts) + struct.pack("<HHL", 0x0010, 0x0020, 0xFFFFFFFF)
                     + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _encoded_header(base[4:], ts))
        scanned = checks.scan(undefined, ts, 2**20)
        assert header_of(scanned, ts) is None
        assert (_receive_outcome(read_header(undefined, ts, scanned), scanned, ts)
                == _receive_outcome(read_header(undefined, ts), scanned, ts))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("charset", [None, b"ISO_IR 100", b"ISO_IR 192", b"\\ISO 2022 IR 87"])
@pytest.mark.parametrize("value", [b"CT", b"CT ", b" CT", b"", b"  ", b"A\\B", b"\xe9t\xe9", b"ABC\x00", b"1.5",
                                   b"abc", b"\x1b$B", b"a\tb", b"~[]"])
def test_text_read_from_the_bytes_matches_pydicoms_conversion(ts, charset, value):
    """drop_unreadable_metadata() and the store row (header._text) decode plain text values straight from the
    received bytes (checks.raw_text); pydicom converts the rest. Both must keep or drop the same attributes
    and give the same row."""
    from pydicom.dataelem import RawDataElement

    from node.receive import checks
    from node.receive.header import instance_meta

    padded = value + b" " * (len(value) % 2)
    elements = [(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x00080018, "UI", b"1.2.3.4\x00"),
                (0x0020000D, "UI", b"1.2.3.1\x00"), (0x0020000E, "UI", b"1.2.3.2\x00"),
                (0x00080050, "SH", padded), (0x00080060, "CS", padded), (0x0008103E, "LO", padded),
                (0x00100020, "US", padded or b"\x00\x00"),  # PatientID sent with a VR not its own
                (0x00180050, "DS", padded)]
    if charset is not None:
        elements.append((0x00080005, "CS", charset + b" " * (len(charset) % 2)))
    body = _encoded_header(elements, ts)
    scanned = checks.scan(body, ts, 2**20)
    raw, converted = read_header(body, ts, scanned), read_header(body, ts)
    for tag in list(converted.keys()):
        try:
            converted[tag]
        except Exception:  # noqa: BLE001 - left raw: dropped either way
            pass
    assert any(isinstance(raw.get_item(t), RawDataElement) for t in raw.keys())
    ids = checks.identity(raw)
    assert checks.drop_unreadable_metadata(raw) == checks.drop_unreadable_metadata(converted)
    meta = [instance_meta(ds, path="p", size=1, transfer_syntax=str(ts), calling_ae="X", checked=ids)
            for ds in (raw, converted)]
    assert meta[0] == meta[1]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_store_rows_plain_text_is_read_without_converting_it(ts):
    """The common case takes the bytes path (checks.raw_text): drop_unreadable_metadata() and the store row
    leave plain text attributes unconverted, and the row holds their stripped values."""
    from pydicom.dataelem import RawDataElement

    from node.receive import checks
    from node.receive.header import instance_meta

    text = [(0x00080050, "SH", b"ACC1  "), (0x00080060, "CS", b"CT"), (0x0008103E, "LO", b"Lung 1.0\x00"),
            (0x00100020, "LO", b"PAT-7 "), (0x00180050, "DS", b"1.25")]
    body = _encoded_header(_plain_elements(ts) + text, ts)
    ds = read_header(body, ts, checks.scan(body, ts, 2**20))
    ids = checks.identity(ds)
    assert checks.drop_unreadable_metadata(ds) == []
    meta = instance_meta(ds, path="p", size=1, transfer_syntax=str(ts), calling_ae="X", checked=ids)
    assert (meta.accession_number, meta.modality, meta.series_description, meta.patient_id,
            meta.slice_thickness) == ("ACC1", "CT", "Lung 1.0", "PAT-7", 1.25)
    assert all(isinstance(ds.get_item(tag), RawDataElement) for tag, _, _ in text)


def test_a_text_attribute_of_several_values_is_stored_as_dicom_writes_them():
    """Two accession numbers (a sender's error) are kept as 'A\\B', the way DICOM encodes and a PACS shows
    them, not as Python's text of a list; a number of several values is no number."""
    from pydicom.dataset import Dataset

    from node.receive.header import instance_meta

    ds = Dataset()
    ds.AccessionNumber, ds.Modality, ds.SliceThickness = ["A1 ", "B2"], ["CT", "PT"], ["1.0", "2.0"]
    meta = instance_meta(ds, path="p", size=1, transfer_syntax="1.2.840.10008.1.2.1", calling_ae="X",
                         checked=("1.2.3", "1.2.4", "1.2.5", "1.2.840.10008.5.1.4.1.1.2"))
    assert (meta.accession_number, meta.modality, meta.slice_thickness) == ("A1\\B2", "CT\\PT", None)


def _deflate(body: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


@pytest.mark.parametrize("pixel_mb", [1, 40])
def test_a_deflated_data_set_past_the_size_inflates_into_a_temp_file(tmp_path, pixel_mb):
    """Past inflate_to_disk_above the inflated data set is not held in memory: the scan reads it through a map
    of a spill file, finds the same elements, and the header reads as from memory; nothing is left."""
    import tracemalloc

    from node.receive import checks
    from node.receive.spill import SpillFile
    from node.receive.spool import Spool

    ts = UID(DeflatedExplicitVRLittleEndian)
    plain = _encoded_header(_plain_elements(ts)[:-1] + [(0x7FE00010, "OW", bytes(pixel_mb * 2**20))], ts)
    body = _deflate(plain)
    spool = Spool(tmp_path / "spool")
    tracemalloc.start()
    scanned = checks.scan(body, ts, 2**30, inflate_to_disk_above=2**20 // 2,
                          open_spill=lambda: SpillFile(*spool.open_spill(), b""))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    in_memory = checks.scan(body, ts, 2**30)
    assert dict(scanned) == dict(in_memory) and len(scanned.body) == len(plain)
    assert not isinstance(scanned.body, bytes) and scanned.body[:] == plain  # a map, of the same bytes
    assert peak < 3 * checks.INFLATE_STEP + 2**20  # a piece at a time (zlib holds twice one), not the whole
    assert list(spool.tmp.iterdir()) == []  # deleted once mapped (after a crash, start-up removes it)
    ids = ("SOPInstanceUID", "StudyInstanceUID", "Rows")
    header, reference = read_header(body, ts, scanned), read_header(plain, UID(ExplicitVRLittleEndian))
    assert [header.get(k) for k in ids] == [reference.get(k) for k in ids]


def test_the_header_fallback_reads_only_up_to_the_pixel_data():
    """Where read_header needs pydicom's reader (here an attribute after the pixel data), it is given the bytes
    before the pixel data, not a copy of the whole data set, and reads what it read before."""
    from node.receive import checks
    from node.receive.part10 import header_of

    ts = UID(ExplicitVRLittleEndian)
    body = _encoded_header(_plain_elements(ts), ts) + _encoded_header([(0x00100020, "LO", b"LATE")], ts)

    class Counted(bytes):  # how many bytes the fallback takes from the body
        taken = 0

        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            got = bytes.__getitem__(self, key)
            if isinstance(key, slice):
                Counted.taken = max(Counted.taken, len(got))
            return got

    scanned = checks.scan(body, ts, 2**20)
    assert header_of(scanned, ts) is None
    scanned.body = Counted(body)
    got = read_header(body, ts, scanned)
    assert Counted.taken < len(body) - 8  # not the pixel data's 8 bytes, nor the element after them
    assert got == read_header(body, ts)
