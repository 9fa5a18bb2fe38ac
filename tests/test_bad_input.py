"""Malformed input to the C-STORE SCP: each bad data set gets its stated DIMSE status, an audit record,
and leaves nothing in the spool or the store; the node keeps serving. Then a hypothesis fuzz run.

One node serves the whole module (configured with node.max_dataset_mb = 1 so the size limit can be hit
with small data). Data sets are sent as raw bytes over pynetdicom's DIMSE layer (`send_raw`), because
pynetdicom's `send_c_store` and DCMTK's storescu both re-encode, or refuse to read, what is broken.

Status choices (PS3.4 B.2.3), as node/receive/checks.py applies them:
  0xC000 cannot understand: the bytes do not decode (truncated, not DICOM, unknown VR), or a UID the node
         files by is missing, unsafe, or sent with a VR it cannot be read as (also a critical pixel
         attribute sent with a VR that is not an integer: its value cannot be understood).
  0xA900 data set does not match SOP class: it decodes but contradicts itself or the request (SOP
         instance UID differs from the request, pixel data length differs from its description, pixel
         data without Rows/Columns).
  0xA700 out of resources: larger than node.max_dataset_mb, also once inflated.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import time
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
    UID,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from bench.backlog import peak_rss_kb
from node.synth import write_chest_ct
from tests.conftest import require
from tests.support.node_proc import NodeProcess
from tests.support.wait import wait_until

# The test itself sets invalid UIDs on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")

PATIENT_ID, PATIENT_NAME = "PID-SECRET-4711", "Secret^Patient"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.99.1"  # no such storage class: refused at negotiation
SUCCESS, CANNOT_UNDERSTAND, DATA_SET_MISMATCH, OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA900, 0xA700
SEND_CONTEXTS = [(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, ImplicitVRLittleEndian),
                 (CTImageStorage, DeflatedExplicitVRLittleEndian), (CTImageStorage, RLELossless),
                 (SecondaryCaptureImageStorage, ExplicitVRLittleEndian)]


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("bad-input"),
                    {"node": {"max_dataset_mb": 1}, "assemble": {"quiet_period_s": 3600}})
    try:
        yield n.start()
    finally:
        try:
            n.stop()
        finally:
            n.kill()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Dataset:
    """One valid 64×64 CT slice (Explicit VR Little Endian)."""
    ct = write_chest_ct(tmp_path_factory.mktemp("ct"), slices=10, rows=64, cols=64,
                        patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    return pydicom.dcmread(ct.files[0])


# ---- sending raw bytes ----------------------------------------------------------------------------


@contextmanager
def association(node: NodeProcess, contexts=SEND_CONTEXTS, ae_title: str = "BADSENDER"):
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def send_raw(assoc, raw: bytes, rq_uid: str, sop_class: str = CTImageStorage,
             ts: str = ExplicitVRLittleEndian) -> tuple[int | None, str]:
    """A C-STORE whose data set is `raw`, byte for byte; (status, error comment), status None without a response.

    Mirrors Association.send_c_store of pynetdicom 3.0 minus its encoding. An empty `raw` still goes out as
    one empty last fragment (pynetdicom would send no fragment at all and leave the peer waiting).
    """
    cx = next(c for c in assoc.accepted_contexts
              if c.abstract_syntax == sop_class and c.transfer_syntax[0] == ts)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = rq_uid
    req.Priority = 2
    req.DataSet = BytesIO(raw)
    assoc._reactor_checkpoint.clear()  # as send_c_store: keep the reactor off the response
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        if not raw:
            empty = P_DATA()
            empty.presentation_data_value_list.append((cx.context_id, b"\x02"))  # last data set fragment, no bytes
            assoc.dul.send_pdu(empty)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None, ""
    return int(rsp.Status), str(getattr(rsp, "ErrorComment", "") or "")


def echo_ok(node: NodeProcess) -> bool:
    with association(node, contexts=[]) as assoc:
        return int(assoc.send_c_echo().Status) == SUCCESS


# ---- building bad bytes ---------------------------------------------------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, with whatever VR and value it is given."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def enc(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    ts = UID(ts)
    return encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def splice(ds: Dataset, replacements: dict[int, bytes]) -> bytes:
    """`ds` encoded (Explicit VR LE) with the elements in `replacements` replaced by those bytes, in tag order."""
    parts = []
    for tag in sorted(set(ds.keys()) | set(replacements)):
        if tag in replacements:
            parts.append(replacements[tag])
        else:
            one = Dataset()
            one.add(ds[tag])
            parts.append(enc(one))
    return b"".join(parts)


def without(ds: Dataset, *keywords: str) -> Dataset:
    ds = deepcopy(ds)
    for k in keywords:
        del ds[k]
    return ds


def with_values(ds: Dataset, **values) -> Dataset:
    ds = deepcopy(ds)
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def position(raw: bytes, tag: int) -> int:
    """Byte offset of element `tag` in Explicit VR LE bytes."""
    at = raw.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
    assert at >= 0
    return at


def odd_sized_secondary_capture() -> Dataset:
    """3×3 8-bit pixels: 9 bytes, padded to 10 on the wire, as PS3.5 8.1.1 requires."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(9))
    ds["PixelData"].VR = "OB"
    return ds


def nested_sequences(depth: int) -> bytes:
    """An undefined-length sequence item nested `depth` deep (ReferencedImageSequence in itself)."""
    seq_open = (struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF))
    seq_close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return seq_open * depth + seq_close * depth


@dataclass
class Case:
    """`build(base)` returns (data set bytes, request SOP instance UID); status is the answer expected."""

    build: Callable[[Dataset], tuple[bytes, str]]
    status: int
    reason: str  # a piece of the audited reason
    sop_class: str = CTImageStorage
    ts: str = ExplicitVRLittleEndian


def fresh(ds: Dataset) -> Dataset:
    """A copy with its own SOP instance UID, so no case is a duplicate of another."""
    return with_values(ds, SOPInstanceUID=generate_uid())


def crafted(**elements: tuple[str, bytes]) -> Callable[[Dataset], tuple[bytes, str]]:
    """Elements sent with the VR and value bytes given, whatever the dictionary says."""
    def build(b: Dataset) -> tuple[bytes, str]:
        ds = fresh(b)
        tags = {int(Tag(k)): element(int(Tag(k)), vr, value) for k, (vr, value) in elements.items()}
        return splice(ds, tags), str(ds.SOPInstanceUID)
    return build


def uids(rq_uid: str | None = None, **values: str) -> Callable[[Dataset], tuple[bytes, str]]:
    """UID attributes set to `values`; the request names `rq_uid` (default: the data set's SOPInstanceUID)."""
    def build(b: Dataset) -> tuple[bytes, str]:
        ds = with_values(fresh(b), **values)
        return enc(ds), rq_uid or str(ds.SOPInstanceUID)
    return build


def missing(*keywords: str) -> Callable[[Dataset], tuple[bytes, str]]:
    def build(b: Dataset) -> tuple[bytes, str]:
        ds = fresh(b)
        return enc(without(ds, *keywords)), str(ds.SOPInstanceUID)
    return build


def pixel_bytes(n: int) -> Callable[[Dataset], tuple[bytes, str]]:
    def build(b: Dataset) -> tuple[bytes, str]:
        ds = fresh(b)
        ds.PixelData = (ds.PixelData * 2)[:n]
        return enc(ds), str(ds.SOPInstanceUID)
    return build


def pixel_element(value: bytes) -> Callable[[Dataset], tuple[bytes, str]]:
    """PixelData replaced by `value`, an encoded Explicit VR LE element (so usable with RLE Lossless too)."""
    def build(b: Dataset) -> tuple[bytes, str]:
        ds = fresh(b)
        return enc(without(ds, "PixelData")) + value, str(ds.SOPInstanceUID)
    return build


ENCAPSULATED_EMPTY = (struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
                      + struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # basic offset table, empty
                      + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
ENCAPSULATED_ONE = (ENCAPSULATED_EMPTY[:-8] + struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"\0\0\0\0"
                    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))


def oversized(b: Dataset) -> tuple[bytes, str]:
    ds = with_values(fresh(b), Rows=800, Columns=800)
    ds.PixelData = bytes(800 * 800 * 2)  # 1.28 MB > node.max_dataset_mb = 1
    return enc(ds), str(ds.SOPInstanceUID)


def deflate_bomb(b: Dataset) -> tuple[bytes, str]:
    ds = with_values(fresh(b), Rows=1024, Columns=1024)
    ds.PixelData = bytes(1024 * 1024 * 2)  # 2 MB of zeros: a few kB deflated
    raw = enc(ds, DeflatedExplicitVRLittleEndian)
    assert len(raw) < 100_000
    return raw, str(ds.SOPInstanceUID)


def deflate_cut(b: Dataset) -> tuple[bytes, str]:
    ds = fresh(b)
    raw = enc(ds, DeflatedExplicitVRLittleEndian)
    return raw[: len(raw) // 2], str(ds.SOPInstanceUID)


def truncated_mid_element(b: Dataset) -> tuple[bytes, str]:
    ds = fresh(b)
    raw = enc(ds)
    return raw[:position(raw, 0x0020000E) + 12], str(ds.SOPInstanceUID)  # inside the SeriesInstanceUID value


def truncated_mid_header(b: Dataset) -> tuple[bytes, str]:
    ds = fresh(b)
    raw = enc(ds)
    return raw[:position(raw, 0x00200013) + 5], str(ds.SOPInstanceUID)  # inside the InstanceNumber header


def truncated_in_pixel_data(b: Dataset) -> tuple[bytes, str]:
    ds = fresh(b)
    raw = enc(ds)
    return raw[:position(raw, 0x7FE00010) + 12 + 4000], str(ds.SOPInstanceUID)  # 4,000 of 8,192 pixel bytes


def not_dicom(b: Dataset) -> tuple[bytes, str]:
    return b"%PDF-1.4 this is a report, not an image\n" * 50, generate_uid()


def empty(b: Dataset) -> tuple[bytes, str]:
    return b"", generate_uid()


def sop_uid_as_us(b: Dataset) -> tuple[bytes, str]:
    # Read leniently, US 0x0102 is the number 258: digits only, so it would pass for a UID and even match a
    # request that names "258". The VR is what gives it away.
    ds = fresh(b)
    return splice(ds, {0x00080018: element(0x00080018, "US", struct.pack("<H", 258))}), "258"


def sop_uid_differs(b: Dataset) -> tuple[bytes, str]:
    return enc(fresh(b)), generate_uid()


def nested_too_deep(b: Dataset) -> tuple[bytes, str]:
    ds = fresh(b)
    return splice(ds, {0x00081140: nested_sequences(40)}), str(ds.SOPInstanceUID)


# Rows 64 × Columns 64 × 1 sample × 16 bits = 8,192 bytes.
REFUSED: dict[str, Case] = {
    # -- 0xC000: cannot be decoded --
    # A cut anywhere is structural: an element announces more bytes than arrive. pydicom reads such a data set
    # without an error (the last value just comes back short), so checks.scan walks every header.
    "truncated-mid-element": Case(truncated_mid_element, CANNOT_UNDERSTAND, "ends inside the value of (0020,000E)"),
    "truncated-mid-header": Case(truncated_mid_header, CANNOT_UNDERSTAND, "ends inside an element header"),
    # Cut inside the pixel data: still a cut (0xC000), not a pixel length mismatch (0xA900): the element's own
    # header says 8,192 bytes and its value stops at 4,000.
    "truncated-in-pixel-data": Case(truncated_in_pixel_data, CANNOT_UNDERSTAND,
                                    "ends inside the value of (7FE0,0010)"),
    "deflated-stream-cut": Case(deflate_cut, CANNOT_UNDERSTAND, "deflated", ts=DeflatedExplicitVRLittleEndian),
    "not-dicom-at-all": Case(not_dicom, CANNOT_UNDERSTAND, "unknown VR"),
    "unknown-explicit-vr": Case(crafted(StudyDescription=("XX", b"ABCD")), CANNOT_UNDERSTAND, "unknown VR"),
    "sequences-nested-40-deep": Case(nested_too_deep, CANNOT_UNDERSTAND, "nested deeper than 32"),
    # Critical attributes sent with a VR that cannot be read as what they are.
    "rows-as-text": Case(crafted(Rows=("LO", b"abc ")), CANNOT_UNDERSTAND, "Rows is encoded with VR LO"),
    "rows-three-bytes": Case(crafted(Rows=("US", b"\x40\x00\x00")), CANNOT_UNDERSTAND, "Rows cannot be decoded"),
    "sop-instance-uid-as-US": Case(sop_uid_as_us, CANNOT_UNDERSTAND,
                                   "SOPInstanceUID (0008,0018) is encoded with VR US"),
    # -- 0xC000: the UIDs the node files an instance by: missing or not usable as a file name --
    "empty-data-set": Case(empty, CANNOT_UNDERSTAND, "SOPInstanceUID (0008,0018) is missing"),
    "missing-sop-instance-uid": Case(missing("SOPInstanceUID"), CANNOT_UNDERSTAND,
                                     "SOPInstanceUID (0008,0018) is missing"),
    "missing-study-instance-uid": Case(missing("StudyInstanceUID"), CANNOT_UNDERSTAND,
                                       "StudyInstanceUID (0020,000D) is missing"),
    "missing-series-instance-uid": Case(missing("SeriesInstanceUID"), CANNOT_UNDERSTAND,
                                        "SeriesInstanceUID (0020,000E) is missing"),
    "missing-sop-class-uid": Case(missing("SOPClassUID"), CANNOT_UNDERSTAND, "SOPClassUID (0008,0016) is missing"),
    "sop-uid-path-traversal": Case(uids(SOPInstanceUID="../../etc"), CANNOT_UNDERSTAND,
                                   "SOPInstanceUID (0008,0018) is not a valid UID"),
    "study-uid-with-slash": Case(uids(StudyInstanceUID="1.2/3"), CANNOT_UNDERSTAND,
                                 "StudyInstanceUID (0020,000D) is not a valid UID"),
    "series-uid-65-chars": Case(uids(SeriesInstanceUID="1." + "2" * 63), CANNOT_UNDERSTAND,
                                "SeriesInstanceUID (0020,000E) is not a valid UID (65"),
    "sop-uid-with-letters": Case(uids(SOPInstanceUID="1.2.840.abc"), CANNOT_UNDERSTAND,
                                 "SOPInstanceUID (0008,0018) is not a valid UID"),
    "study-uid-two-values": Case(uids(StudyInstanceUID=["1.2.3", "1.2.4"]), CANNOT_UNDERSTAND, "not a single UID"),
    # -- 0xA900: decodes, but does not match itself or the request --
    "sop-uid-differs-from-request": Case(sop_uid_differs, DATA_SET_MISMATCH, "differs from the C-STORE request"),
    "pixel-data-short": Case(pixel_bytes(8192 - 128), DATA_SET_MISMATCH, "pixel data is 8064 bytes"),
    "pixel-data-long": Case(pixel_bytes(8192 + 2), DATA_SET_MISMATCH, "pixel data is 8194 bytes"),
    # One byte over is padding only when the expected length is odd; 8,192 is even.
    "pixel-data-one-over-even": Case(pixel_element(element(0x7FE00010, "OW", bytes(8193))), DATA_SET_MISMATCH,
                                     "pixel data is 8193 bytes"),
    "rows-missing-with-pixel-data": Case(missing("Rows"), DATA_SET_MISMATCH, "Rows is missing"),
    "columns-missing-with-pixel-data": Case(missing("Columns"), DATA_SET_MISMATCH, "Columns is missing"),
    "native-pixel-data-encapsulated": Case(pixel_element(ENCAPSULATED_ONE), DATA_SET_MISMATCH, "undefined length"),
    "encapsulated-without-fragment": Case(pixel_element(ENCAPSULATED_EMPTY), DATA_SET_MISMATCH,
                                          "no fragment", ts=RLELossless),
    # -- 0xA700: too large to take --
    "larger-than-max-dataset-mb": Case(oversized, OUT_OF_RESOURCES, "larger than node.max_dataset_mb"),
    "deflate-bomb": Case(deflate_bomb, OUT_OF_RESOURCES, "inflated data set larger", ts=DeflatedExplicitVRLittleEndian),
}


# ---- helpers on the node's state ------------------------------------------------------------------

RECEIVE_EVENTS = ("instance-stored", "instance-duplicate", "instance-refused")


def receive_records(node: NodeProcess) -> list[dict]:
    return [r for r in node.audit_records() if r["event"] in RECEIVE_EVENTS]


def spool_files(node: NodeProcess) -> set[Path]:
    spool = node.var / "spool"
    return {p for p in spool.rglob("*") if p.is_file() and ".tmp" not in p.relative_to(spool).parts}


def partials(node: NodeProcess) -> list[Path]:
    return list((node.var / "spool" / ".tmp").glob("*"))


def _query(node: NodeProcess, sql: str, *args) -> tuple | None:
    db = sqlite3.connect(f"file:{node.var / 'ainode.db'}?mode=ro", uri=True)  # read-only beside the node
    try:
        return db.execute(sql, args).fetchone()
    finally:
        db.close()


def instance_row(node: NodeProcess, sop_uid: str) -> tuple | None:
    return _query(node, "SELECT path, series_uid, study_uid FROM instances WHERE sop_instance_uid = ?", sop_uid)


def instance_count(node: NodeProcess) -> int:
    return _query(node, "SELECT count(*) FROM instances")[0]


# ---- the cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_data_set_is_refused_audited_and_leaves_nothing(node, base, name):
    case = REFUSED[name]
    raw, rq_uid = case.build(base)
    files_before, rows_before, records_before = spool_files(node), instance_count(node), len(receive_records(node))
    with association(node) as assoc:
        status, comment = send_raw(assoc, raw, rq_uid, case.sop_class, case.ts)
    assert status == case.status, f"{name}: got 0x{status or 0:04X} ({comment}), expected 0x{case.status:04X}"
    new = receive_records(node)[records_before:]
    assert [r["event"] for r in new] == ["instance-refused"], new
    assert new[0]["status"] == f"0x{case.status:04X}"
    assert case.reason in new[0]["reason"], new[0]["reason"]
    assert comment == new[0]["reason"][:64]  # the sender sees why, in the response's Error Comment
    assert spool_files(node) == files_before and not partials(node)
    assert instance_row(node, rq_uid) is None and instance_count(node) == rows_before
    assert node.proc.poll() is None and echo_ok(node)


def test_a_data_set_far_past_the_limit_is_refused_without_being_held_in_memory(node, base):
    """A sender that sends 100 MB to a node that takes at most 1 MB: refused 0xA700 once it has all arrived
    (the association goes on), and no process of the node held it (store_request.CappedDataSet)."""
    ds = with_values(fresh(base), Rows=5000, Columns=10000)
    ds.PixelData = bytes(5000 * 10000 * 2)
    raw, rq_uid = enc(ds), str(ds.SOPInstanceUID)
    del ds
    before = _settled_peak_rss_kb(node.proc.pid)
    with association(node) as assoc:
        status, comment = send_raw(assoc, raw, rq_uid)
        assert status == OUT_OF_RESOURCES and "larger than node.max_dataset_mb (95 MB)" in comment, comment
        assert assoc.send_c_echo().Status == SUCCESS
    after = peak_rss_kb(node.proc.pid)
    grown = {p: (after[p] - before[p]) // 1024 for p in after if p in before}  # MB; receivers are all there before
    assert max(grown.values()) < 40, grown  # 100 MB held would show as about 100


def _settled_peak_rss_kb(pid: int, quiet_s: float = 2.0, timeout_s: float = 90.0) -> dict[int, int]:
    """peak_rss_kb once no process of the node has started or grown for `quiet_s`: a worker still warming
    (torch, the plugins, its SR process importing highdicom) would otherwise count as the receiver's growth."""
    last, since = peak_rss_kb(pid), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        now = peak_rss_kb(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_wrong_vr_on_descriptive_attributes_is_accepted_but_not_indexed(node, base):
    """PatientID sent as IS and SliceThickness as a 3-byte FD: the instance is stored as received.

    Accepted, because neither attribute decides where or whether the instance is kept, and a PACS that
    sent it has already accepted it: refusing would lose the image over a description. The store row just
    lacks those values (the file keeps the bytes as sent). Converting the PatientID anyway would have put
    it into the node's log through pydicom's "Invalid value for VR IS" warning.
    """
    ds = fresh(base)
    raw = splice(ds, {0x00100020: element(0x00100020, "IS", PATIENT_ID.encode() + b" "),
                      0x00180050: element(0x00180050, "FD", b"abc")})
    with association(node) as assoc:
        status, comment = send_raw(assoc, raw, str(ds.SOPInstanceUID))
    assert status == SUCCESS, comment
    stored = [r for r in receive_records(node) if r.get("sop_instance_uid") == ds.SOPInstanceUID]
    assert [r["event"] for r in stored] == ["instance-stored"]
    assert stored[0].get("patient_id") is None
    row = instance_row(node, str(ds.SOPInstanceUID))
    assert row and Path(row[0]).read_bytes().endswith(raw)  # kept byte for byte after the file meta
    assert PATIENT_ID not in (node.var.parent / "node.log").read_text()


def test_odd_pixel_length_with_one_padding_byte_is_accepted(node):
    """3×3 8-bit pixels are 9 bytes; on the wire a value has an even length, so 10 is right (PS3.5 8.1.1)."""
    ds = odd_sized_secondary_capture()
    raw = enc(ds)
    assert struct.unpack_from("<L", raw, position(raw, 0x7FE00010) + 8)[0] == 10
    with association(node) as assoc:
        status, comment = send_raw(assoc, raw, str(ds.SOPInstanceUID), SecondaryCaptureImageStorage)
    assert status == SUCCESS, comment
    assert instance_row(node, str(ds.SOPInstanceUID))


def test_encapsulated_pixel_data_with_a_fragment_passes_the_pixel_check(node, base):
    """The control for "encapsulated-without-fragment": the same data set with one fragment is stored.

    The node does not decompress on receive, so a fragment that is not valid RLE is not its concern here.
    """
    raw, rq_uid = pixel_element(ENCAPSULATED_ONE)(base)
    with association(node) as assoc:
        status, comment = send_raw(assoc, raw, rq_uid, ts=RLELossless)
    assert status == SUCCESS, comment


def test_unsupported_sop_class_from_storescu_is_refused_at_negotiation(node, base, tmp_path):
    """RT Plan is not a class the node takes: the presentation context is rejected, storescu says so."""
    require("storescu", "dcmtk")
    ds = with_values(fresh(base), SOPClassUID=RTPlanStorage, Modality="RTPLAN")
    del ds.PixelData
    ds.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "plan.dcm"
    ds.save_as(path, enforce_file_format=True)
    r = subprocess.run(["storescu", "-R", "-v", "-aet", "PLANNER", "-aec", node.ae_title, "127.0.0.1",
                        str(node.port), str(path)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "No Acceptable Presentation Contexts" in out or "No presentation context" in out, out
    # storescu may exit before the node's association thread has written the record: wait for it.
    refused = wait_until(lambda: [x for x in node.audit_records() if x["event"] == "presentation-context-refused"
                                  and x["calling_ae"] == "PLANNER"], 10, "the refusal's audit record")
    assert refused[-1]["sop_classes"] == [RTPlanStorage]
    assert instance_row(node, str(ds.SOPInstanceUID)) is None
    assert echo_ok(node)


def test_private_sop_class_is_refused_at_negotiation(node, base):
    with association(node, contexts=[(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)], ae_title="PRIVATE") as assoc:
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [PRIVATE_SOP_CLASS]
        ds = with_values(fresh(base), SOPClassUID=PRIVATE_SOP_CLASS)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ds)
    refused = [x for x in node.audit_records() if x["event"] == "presentation-context-refused"
               and x["calling_ae"] == "PRIVATE"]
    assert refused and refused[-1]["sop_classes"] == [PRIVATE_SOP_CLASS]


# ---- fuzzing ----------------------------------------------------------------------------------------

FUZZ_ROOT = "1.2.826.0.1.3680043.9.7433.2"  # request UIDs: one per mutant, never a duplicate
FUZZ_EXAMPLES = int(os.environ.get("AINODE_FUZZ_EXAMPLES", "80"))  # more for a longer hunt; same seed
SOME_VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "FD", "FL", "IS", "LO", "OB", "OW", "PN", "SH", "SQ", "SS",
            "UI", "UL", "UN", "US", "UT"]


@st.composite
def mutants(draw, base: Dataset, uid: str) -> tuple[bytes, str]:
    """The base slice with SOPInstanceUID `uid`, then damaged one of three ways; (bytes, transfer syntax)."""
    ds = with_values(base, SOPInstanceUID=uid)
    kind = draw(st.sampled_from(["bytes", "bytes", "delete", "value"]))
    ts = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])) if kind != "value" \
        else ExplicitVRLittleEndian
    keywords = [e.keyword for e in ds if e.keyword]
    if kind == "delete":
        for k in draw(st.lists(st.sampled_from(keywords), min_size=1, max_size=4, unique=True)):
            del ds[k]
        return enc(ds, ts), ts
    if kind == "value":
        replaced = {}
        for k in draw(st.lists(st.sampled_from(keywords), min_size=1, max_size=3, unique=True)):
            vr = draw(st.sampled_from([ds[k].VR, *SOME_VRS]))
            value = draw(st.binary(max_size=24) | st.text("0123456789.-\\ abcX/", max_size=24).map(str.encode))
            replaced[int(Tag(k))] = element(int(Tag(k)), vr, value)
        return splice(ds, replaced), ts
    raw = bytearray(enc(ds, ts))
    header_end = raw.find(b"\xe0\x7f\x10\x00") + 12  # most damage goes where the structure is
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, header_end) | st.integers(0, max(len(raw) - 1, 0)))
        op = draw(st.sampled_from(["flip", "flip", "cut", "insert", "drop"]))
        if op == "flip" and at < len(raw):
            raw[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "drop":
            del raw[at:at + draw(st.integers(1, 16))]
    return bytes(raw), ts


def test_fuzzed_data_sets_always_get_an_answer_and_nothing_half_stored(node, base):
    sent: dict[str, int] = {}
    counter = iter(range(10**6))
    start = time.monotonic()
    records_before = len(receive_records(node))
    with association(node) as assoc:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def send_one(data):
            uid = f"{FUZZ_ROOT}.1{next(counter):06d}"  # one length for all: the draws must not depend on it
            raw, ts = data.draw(mutants(base, uid))
            status, comment = send_raw(assoc, raw, uid, ts=ts)
            assert status is not None, "no C-STORE response"
            # Only the statuses the SCP means to give: 0xC211 would be an exception in its handler.
            assert status in (SUCCESS, CANNOT_UNDERSTAND, DATA_SET_MISMATCH, OUT_OF_RESOURCES), \
                f"0x{status:04X} {comment}"
            sent[uid] = status

        send_one()
        assert assoc.is_established  # the node never dropped the association
    assert node.proc.poll() is None and echo_ok(node)
    assert not partials(node)
    for uid, status in sent.items():
        row = instance_row(node, uid)
        if status == SUCCESS:
            assert row and Path(row[0]).is_file(), f"{uid} answered Success but is not stored"
        else:
            assert row is None, f"{uid} refused (0x{status:04X}) but has a store row"
    assert len(receive_records(node)) - records_before == len(sent)  # one audit record per C-STORE
    statuses = set(sent.values())
    assert SUCCESS in statuses and statuses & {CANNOT_UNDERSTAND, DATA_SET_MISMATCH}, statuses
    assert time.monotonic() - start < 90 * FUZZ_EXAMPLES / 80


def test_node_still_stores_a_valid_instance_and_logged_no_patient_data(node, base):
    """Runs last: after everything above, a valid slice is stored, and the log never held patient data."""
    ds = fresh(base)
    with association(node) as assoc:
        status, comment = send_raw(assoc, enc(ds), str(ds.SOPInstanceUID))
    assert status == SUCCESS, comment
    row = instance_row(node, str(ds.SOPInstanceUID))
    assert row and Path(row[0]).is_file()
    log = (node.var.parent / "node.log").read_text()
    assert PATIENT_ID not in log and "Secret" not in log
    assert "Traceback" not in log
