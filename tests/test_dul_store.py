"""node/receive/dul_store.py: a C-STORE request served on the DUL thread that read it; every other case
left to the association thread."""

from __future__ import annotations

import threading

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.association import Association
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import CTImageStorage, Verification

import node.receive.scp  # noqa: F401 - installs p_data and dul_store on import
from node.receive import dul_store
from tests.support.net import free_port


@pytest.fixture(autouse=True)
def _no_standard_handlers(monkeypatch):  # type: ignore[no-untyped-def]
    """As the node runs pynetdicom (node/logs.py): without its debug-logging handlers, which listen for PDUs."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


def _ct() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", 64, 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class _Acceptor:
    """A pynetdicom acceptor with the node's patches that notes which thread ran each handler."""

    def __init__(self, on_store=None, extra_handlers=()) -> None:  # type: ignore[no-untyped-def]
        self.threads: list[str] = []
        self.echo_threads: list[str] = []
        self.aborted = threading.Event()
        self.released = threading.Event()
        ae = AE(ae_title="DULSTORE_SCP")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(Verification)

        def stored(event):  # type: ignore[no-untyped-def]
            self.threads.append(_kind(threading.current_thread()))
            return on_store(event) if on_store else 0x0000

        def echoed(event):  # type: ignore[no-untyped-def]
            self.echo_threads.append(_kind(threading.current_thread()))
            return 0x0000

        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, stored), (evt.EVT_C_ECHO, echoed),
            (evt.EVT_ABORTED, lambda e: self.aborted.set()), (evt.EVT_RELEASED, lambda e: self.released.set()),
            *extra_handlers])

    def associate(self):  # type: ignore[no-untyped-def]
        scu = AE(ae_title="DULSTORE_SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", self.port, ae_title="DULSTORE_SCP")
        assert assoc.is_established
        return assoc


def _kind(thread: threading.Thread) -> str:
    if isinstance(thread, DULServiceProvider):
        return "dul"
    if isinstance(thread, Association):
        return "association"
    return type(thread).__name__


def test_c_stores_are_served_on_the_dul_thread_and_other_messages_on_the_association_thread():
    rx = _Acceptor()
    try:
        assoc = rx.associate()
        for _ in range(3):
            assert assoc.send_c_store(_ct()).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(_ct()).Status == 0x0000
        assoc.release()
        assert rx.released.wait(5)
        assert rx.threads == ["dul"] * 4
        assert rx.echo_threads == ["association"]
    finally:
        rx.server.shutdown()


def test_a_listener_for_pdus_keeps_the_association_thread():
    """p_data's own path is not taken (a listener sees the PDUs), so nothing is served on the DUL thread."""
    rx = _Acceptor(extra_handlers=[(evt.EVT_PDU_RECV, lambda e: None)])
    try:
        assoc = rx.associate()
        assert assoc.send_c_store(_ct()).Status == 0x0000
        assoc.release()
        assert rx.threads == ["association"]
    finally:
        rx.server.shutdown()


def test_a_handler_that_raises_answers_0xc211_and_the_association_goes_on():
    calls = []

    def on_store(event):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("handler failed")
        return 0x0000

    rx = _Acceptor(on_store=on_store)
    try:
        assoc = rx.associate()
        assert assoc.send_c_store(_ct()).Status == 0xC211  # as pynetdicom answers on the association thread
        assert assoc.send_c_store(_ct()).Status == 0x0000
        assoc.release()
        assert rx.released.wait(5)
        assert rx.threads == ["dul", "dul"]
    finally:
        rx.server.shutdown()


def test_an_error_outside_the_handler_aborts_without_hanging_the_dul_thread(monkeypatch):  # type: ignore
    """pynetdicom's _serve_request aborts and waits for the DUL thread to stop: on that thread it would spin
    for ever. Here the abort is not waited for, the sender sees it, and the acceptor's threads end."""
    def broken(self, req, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("service class failed")

    monkeypatch.setattr(StorageServiceClass, "SCP", broken)
    rx = _Acceptor()
    try:
        assoc = rx.associate()
        assoc.send_c_store(_ct())  # answered by no C-STORE-RSP: the acceptor aborts
        assert rx.aborted.wait(5)
        for _ in range(100):
            if not assoc.is_established:
                break
            threading.Event().wait(0.05)
        assert assoc.is_aborted
        for _ in range(100):  # the acceptor's association and DUL threads end
            if not rx.server.active_associations:
                break
            threading.Event().wait(0.05)
        assert not rx.server.active_associations
    finally:
        rx.server.shutdown()


def test_a_message_waiting_for_the_association_thread_keeps_its_place():
    """A C-STORE completed while an earlier message still waits on the queue goes behind it."""
    from io import BytesIO
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 2
    request.DataSet = BytesIO(b"a data set")
    messages = dul_store.MessageQueue()
    checkpoint = threading.Event()
    checkpoint.set()
    assoc = SimpleNamespace(is_acceptor=True, is_established=True, _sent_release=False, _kill=False,
                            _reactor_checkpoint=checkpoint, dimse=SimpleNamespace(msg_queue=messages),
                            _accepted_cx={1: "context"}, acceptor=SimpleNamespace(accepted_common_extended={}))
    assert dul_store._servable(assoc, 1, request) == "context"
    messages.put((1, "an earlier message"))
    assert dul_store._servable(assoc, 1, request) is None
    messages.get()
    checkpoint.clear()  # another thread has paused the loop to send on the association
    assert dul_store._servable(assoc, 1, request) is None
    checkpoint.set()
    assert dul_store._servable(assoc, 3, request) is None  # a context not accepted: the association thread aborts
    assoc.is_acceptor = False
    assert dul_store._servable(assoc, 1, request) is None
    assoc.is_acceptor = True
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0
    assert dul_store._servable(assoc, 1, response) is None


def test_the_queue_holds_only_while_asked_and_only_one_message():
    messages = dul_store.MessageQueue()
    messages.put("a")
    messages.holding = True
    messages.put("b")
    messages.put("c")
    messages.holding = False
    assert messages.held == "b"
    assert [messages.get_nowait(), messages.get_nowait()] == ["a", "c"]


def test_a_handler_longer_than_the_network_timeout_is_not_cut_short():
    """On the association thread a handler kept that thread from looking at the network idle timer; on the DUL
    thread the association thread is free, and must not release the association while the handler runs."""
    import time

    rx = _Acceptor(on_store=lambda event: time.sleep(1.5) or 0x0000)
    rx.server.ae.network_timeout = 0.5  # the associations it accepts from now on
    try:
        scu_assoc = rx.associate()
        assert scu_assoc.send_c_store(_ct()).Status == 0x0000
        assert scu_assoc.is_established and not rx.released.is_set()
        scu_assoc.release()
        assert rx.threads == ["dul"]
    finally:
        rx.server.shutdown()
