"""One association to the PACS for a job's priors: C-FIND and C-GET, with the PACS's C-STORE sub-operations
coming back over the same association (we take the SCP role for image storage).

C-GET rather than C-MOVE: the PACS needs no route back to the node (no AE/host/port entry for a move
destination) and, above all, the prior never enters the node's receive → assemble → route path, so it
cannot complete as a "new" study, fire rules or be dispatched to; it lands only in the job's folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom import sop_class as sc
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND,
    StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET,
)

from node.assemble.find import _no_nagle
from node.config.schema import Source
from node.receive.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES

# Priors are image series: SEG and SR (the node's own earlier results among them) are not asked for.
_NOT_IMAGES = {sc.SegmentationStorage, sc.BasicTextSRStorage, sc.EnhancedSRStorage, sc.ComprehensiveSRStorage,
               sc.Comprehensive3DSRStorage}
IMAGE_CLASSES = [uid for uid in STORAGE_CLASSES if uid not in _NOT_IMAGES]
# Uncompressed first: most PACS store them so, and then send them as stored, without transcoding.
_SYNTAXES = sorted(TRANSFER_SYNTAXES, key=lambda ts: ts.is_compressed)


class PriorError(Exception):
    """Priors could not be asked for or fetched. `unreachable`: no association at all (the PACS is down)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def where(src: Source) -> str:
    return f"{src.ae_title}@{src.host}:{src.port}"


@contextmanager
def open_association(src: Source, calling_ae: str, on_store: Callable[[evt.Event], int]) -> Iterator[Association]:
    """An established association to `src`; `on_store` handles each C-STORE sub-operation of a C-GET."""
    ae = AE(ae_title=src.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = src.timeout_s
    ae.maximum_pdu_size = 0
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.add_requested_context(STUDY_ROOT_GET)
    for uid in IMAGE_CLASSES:
        ae.add_requested_context(uid, _SYNTAXES)
    roles = [build_role(uid, scp_role=True) for uid in IMAGE_CLASSES]
    try:
        assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PriorError(f"{where(src)} rejected the association from '{ae.ae_title}': register that "
                                 "AE title in the PACS as a modality allowed to query and retrieve (C-FIND, C-GET)")
            raise PriorError(f"cannot connect to {where(src)}: is the PACS running and the port right?",
                             unreachable=True)
        _no_nagle(assoc)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()


def status_of(status: Dataset | None) -> int | None:
    """The response's status code; None when there was no response (timeout, association closed)."""
    return getattr(status, "Status", None)
