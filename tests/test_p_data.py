"""node/receive/p_data.py: P-DATA-TF PDUs handed straight to DIMSE, and every other case left to pynetdicom."""

from __future__ import annotations

import struct
import threading

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage

import node.receive.scp  # noqa: F401 - installs p_data on import
from node.receive import dul_io, p_data
from tests.support.net import free_port


def _pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", 2 + len(fragment), context_id, control) + fragment


def test_a_body_splits_into_its_pdvs_as_views_of_the_one_buffer():
    body = bytearray(_pdv(1, 0x03, b"command") + _pdv(3, 0x02, b"data set"))
    pdvs = p_data.pdv_list(memoryview(body))
    assert [(cid, bytes(v)) for cid, v in pdvs] == [(1, b"\x03command"), (3, b"\x02data set")]
    assert all(isinstance(v, memoryview) and v.obj is body for _, v in pdvs)
    assert p_data.pdv_list(memoryview(b"")) == []


@pytest.mark.parametrize("body", [
    _pdv(1, 0x03, b"abc")[:-1],  # the value runs past the PDU
    b"\x00\x00\x00",  # an item header cut short
    struct.pack(">LB", 1, 1),  # no message control header
])
def test_a_malformed_body_is_refused(body):
    with pytest.raises(p_data.MalformedPDU):
        p_data.pdv_list(memoryview(body))


def _ct(rows: int = 256) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", rows, rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture(autouse=True)
def _no_standard_handlers(monkeypatch):  # type: ignore[no-untyped-def]
    """As the node runs pynetdicom (node/logs.py): without its debug-logging handlers, which listen for PDUs."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


class _Acceptor:
    """A pynetdicom C-STORE acceptor (with the node's patches) that keeps what it was sent."""

    def __init__(self, max_pdu: int, extra_handlers=()) -> None:  # type: ignore[no-untyped-def]
        self.stored: list[bytes] = []
        self.aborted = threading.Event()
        ae = AE(ae_title="PDATA_SCP")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.maximum_pdu_size = max_pdu

        def on_store(event):  # type: ignore[no-untyped-def]
            self.stored.append(event.encoded_dataset(include_meta=False))
            return 0x0000

        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, on_store), (evt.EVT_ABORTED, lambda e: self.aborted.set()), *extra_handlers])

    def associate(self):  # type: ignore[no-untyped-def]
        scu = AE(ae_title="PDATA_SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", self.port, ae_title="PDATA_SCP")
        assert assoc.is_established
        return assoc


def _encoded(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_a_data_set_in_many_pdus_arrives_whole(monkeypatch):  # type: ignore[no-untyped-def]
    split: list[int] = []
    inner = p_data.pdv_list
    monkeypatch.setattr(p_data, "pdv_list", lambda body: split.append(len(body)) or inner(body))
    rx = _Acceptor(max_pdu=16384)  # 128 KB of pixels: 9 PDUs
    try:
        assoc = rx.associate()
        sent = [_ct(), _ct()]
        for ds in sent:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert rx.stored == [_encoded(ds) for ds in sent]
        assert len(split) >= 2 * 10  # each command and data set PDU took the direct path
    finally:
        rx.server.shutdown()


def test_a_listener_for_pdus_gets_pynetdicoms_path():
    seen: list[int] = []
    rx = _Acceptor(max_pdu=16384, extra_handlers=[
        (evt.EVT_PDU_RECV, lambda e: seen.append(len(e.pdu)) if isinstance(e.pdu, P_DATA_TF) else None)])
    try:
        assoc = rx.associate()
        ds = _ct()
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert rx.stored == [_encoded(ds)]
        assert len(seen) >= 9  # every P-DATA-TF was decoded by pynetdicom, for the listener
    finally:
        rx.server.shutdown()


def test_a_malformed_p_data_pdu_aborts_the_association():
    rx = _Acceptor(max_pdu=16384)
    try:
        assoc = rx.associate()
        cid = assoc.accepted_contexts[0].context_id
        item = struct.pack(">LBB", 50, cid, 0x03) + b"short"  # announces 50 bytes, holds 6
        assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0x00, len(item)) + item)
        assert rx.aborted.wait(5)  # Evt19 in Sta6: the acceptor sends an A-ABORT (AA-8)
        assert not rx.stored
    finally:
        assoc.abort()
        rx.server.shutdown()


def _stub_dul(sock):  # type: ignore[no-untyped-def]
    import queue
    from types import SimpleNamespace

    from node.receive import dul_io

    transport = SimpleNamespace(socket=sock)
    transport.recv = lambda n: dul_io.recv(transport, n)
    return SimpleNamespace(socket=transport, _kill_thread=False, to_provider_queue=queue.Queue(),
                           event_queue=queue.Queue(), state_machine=SimpleNamespace(current_state="Sta6"),
                           assoc=SimpleNamespace(get_handlers=lambda e: []))


def test_the_next_header_is_taken_only_when_it_is_already_there():
    import socket
    import time

    a, b = socket.socketpair()
    try:
        dul = _stub_dul(a)
        assert p_data._waiting_header(dul) is None  # nothing sent: back to the reactor loop, at once
        b.sendall(b"\x04\x00\x00\x00\x00\x10rest")
        assert p_data._waiting_header(dul) == b"\x04\x00\x00\x00\x00\x10"
        assert a.recv(4) == b"rest"
        b.sendall(b"\x04\x00\x00")  # a header cut in two: the rest is waited for
        threading.Timer(0.1, lambda: b.sendall(b"\x00\x00\x02")).start()
        t0 = time.monotonic()
        assert p_data._waiting_header(dul) == b"\x04\x00\x00\x00\x00\x02"
        assert time.monotonic() - t0 < 5
        b.sendall(b"\x04\x00\x00\x00\x00\x02")
        dul.to_provider_queue.put("a primitive to send")  # the loop has work: it goes first
        assert p_data._waiting_header(dul) is None
        dul.to_provider_queue.get()
        dul.event_queue.put("Evt12")
        assert p_data._waiting_header(dul) is None
        dul.event_queue.get()
        a.settimeout(5)  # with a timeout, Python would poll before the non-blocking read
        assert p_data._waiting_header(dul) is None
        a.settimeout(None)
        assert p_data._waiting_header(dul) == b"\x04\x00\x00\x00\x00\x02"
        b.close()
        assert p_data._waiting_header(dul) is None  # closed: the loop's own read reports it (Evt17)
    finally:
        a.close()


def test_a_release_right_behind_a_request_is_read_with_it(monkeypatch):  # type: ignore[no-untyped-def]
    """A C-ECHO-RQ and an A-RELEASE-RQ in one write: the A-RELEASE-RQ is read as the PDU after the P-DATA
    (_waiting_header) and still queued for the state machine; the acceptor answers the echo and releases."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.pdu import A_RELEASE_RQ
    from pynetdicom.sop_class import Verification

    taken: list[int] = []
    inner = p_data._waiting_header

    def noting(dul):  # type: ignore[no-untyped-def]
        head = inner(dul)
        if head:
            taken.append(head[0])
        return head

    monkeypatch.setattr(p_data, "_waiting_header", noting)
    echoed, released = threading.Event(), threading.Event()
    ae = AE(ae_title="PDATA_SCP")
    ae.add_supported_context(Verification, ImplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_ECHO, lambda e: echoed.set() or 0x0000), (evt.EVT_RELEASED, lambda e: released.set())])
    try:
        scu = AE(ae_title="PDATA_SCU")
        scu.add_requested_context(Verification, ImplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="PDATA_SCP")
        assert assoc.is_established
        rq = C_ECHO()
        rq.MessageID, rq.AffectedSOPClassUID = 1, Verification
        msg = C_ECHO_RQ()
        msg.primitive_to_message(rq)
        pdus = [P_DATA_TF(p).encode() for p in msg.encode_msg(assoc.accepted_contexts[0].context_id, 16384)]
        assoc.dul.socket.send(b"".join(pdus) + A_RELEASE_RQ().encode())
        assert echoed.wait(5) and released.wait(5)
        assert 0x05 in taken  # the A-RELEASE-RQ came in as the PDU after the echo's
        assoc.abort()
    finally:
        server.shutdown()


def test_a_header_read_ahead_with_the_last_body_is_taken_first():
    import socket

    a, b = socket.socketpair()
    try:
        dul = _stub_dul(a)
        b.sendall(b"body" + b"\x04\x00\x00\x00\x00\x04" + b"next")
        assert dul.socket.recv(4) == b"body"  # and the next header with it (dul_io.recv)
        assert dul_io.ahead(dul.socket) == 6
        assert p_data._waiting_header(dul) == b"\x04\x00\x00\x00\x00\x04"
        assert dul_io.ahead(dul.socket) == 0
        assert a.recv(4) == b"next"  # nothing else was read
    finally:
        a.close()
        b.close()
