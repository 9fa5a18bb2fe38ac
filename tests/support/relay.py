"""A PACS front for crash tests: forwards each object to Orthanc, then stalls before answering one.

The sender sees no response for that object while the PACS already holds it, which is the moment a
crash makes a re-send necessary: the test kills the sender there.
"""

from __future__ import annotations

import threading

from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.support.net import free_port

CLASSES = (SegmentationStorage, Comprehensive3DSRStorage)
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class StallingRelay:
    def __init__(self, orthanc, *, aet: str = "RELAY", stall_on: int = 1) -> None:
        self.orthanc, self.aet, self.stall_on = orthanc, aet, stall_on
        self.port = free_port()
        self.received = 0
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        fwd = AE(ae_title=self.aet)
        for uid in CLASSES:
            fwd.add_requested_context(uid, SYNTAXES)
        assoc = fwd.associate("127.0.0.1", self.orthanc.dicom_port, ae_title=self.orthanc.aet)
        if not assoc.is_established:
            return 0xA700
        status = assoc.send_c_store(ds)
        assoc.release()
        self.received += 1
        if self.received == self.stall_on and not self.stalled.is_set():
            self.stalled.set()
            self._release.wait(60)  # the sender is killed meanwhile; its socket is gone
        return int(status.Status) if status else 0xA700

    def __enter__(self) -> "StallingRelay":
        ae = AE(ae_title=self.aet)
        for uid in CLASSES:
            ae.add_supported_context(uid, SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
