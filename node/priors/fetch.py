"""C-GET of prior series into a job's folder, over the association the C-FIND used.

Each instance the PACS sends is checked against what was asked for (patient, study, series) before it is
kept: a PACS that sends another patient's image must not put it in front of a plugin. Files are written
to a temp name and renamed, so a half-written file is never read; they are not fsynced, since the folder
is a per-job cache, deleted when the job ends and at start-up, and a job cut off by a crash fetches again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET

from node.assemble.find import _quiesce_reactor
from node.config.schema import Source
from node.priors.association import PriorError, status_of, where
from node.receive.spool import check_uid

log = logging.getLogger("ainode.priors")

_CHECKED = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


class SeriesSink:
    """The C-STORE handler of the association: keeps the instances of the series being fetched."""

    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id
        self._lock = threading.Lock()
        self._target: tuple[str, str, Path] | None = None  # study UID, series UID, folder
        self.files: list[str] = []
        self.rejected = 0

    def expect(self, study_uid: str, series_uid: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._target, self.files, self.rejected = (study_uid, series_uid, folder), [], 0

    def __call__(self, event: evt.Event) -> int:
        with self._lock:
            target = self._target
        if target is None:
            return 0xC001  # not fetching: refuse
        data = event.encoded_dataset()
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_CHECKED)
            sop = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        except Exception:  # noqa: BLE001 - an unreadable instance (or a bad UID) is refused, not fatal
            return self._reject("unreadable header or SOPInstanceUID")
        if (str(ds.get("PatientID") or "") != self.patient_id or str(ds.get("StudyInstanceUID")) != target[0]
                or str(ds.get("SeriesInstanceUID")) != target[1]):
            return self._reject("patient, study or series differs from the one asked for")
        path = target[2] / f"{sop}.dcm"
        tmp = path.with_suffix(".part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("cannot write a prior instance folder=%s error=%s", target[2], exc.strerror)
            return 0xA700
        with self._lock:
            self.files.append(str(path))
        return 0x0000

    def _reject(self, why: str) -> int:
        with self._lock:
            self.rejected += 1
        log.warning("prior instance refused: %s", why)
        return 0xC000


def get_series(assoc: Association, src: Source, sink: SeriesSink, study_uid: str, series_uid: str,
               folder: Path, deadline: float, cancelled: Callable[[], bool] = lambda: False) -> list[str]:
    """C-GET one series into `folder`; the paths of the instances kept. Raises PriorError naming the PACS.
    Past `deadline` (time.monotonic) or once `cancelled()` (the node is stopping), the association is aborted."""
    sink.expect(study_uid, series_uid, folder)
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    final: Dataset | None = None
    _quiesce_reactor(assoc)  # else pynetdicom's reactor can take (and drop) the first response
    for status, _ident in assoc.send_c_get(q, STUDY_ROOT_GET):
        code = status_of(status)
        if code is None:
            raise PriorError(f"no C-GET response from {where(src)} within {src.timeout_s:g}s, or it closed the "
                             "association: check the PACS allows our AE title to retrieve (C-GET)")
        if code not in (0xFF00, 0xFF01):
            final = status
        if time.monotonic() > deadline or cancelled():
            assoc.abort()
            raise PriorError("the node is stopping" if cancelled() else
                             f"fetching priors from {where(src)} took longer than rules.*.priors.timeout_s")
    code = status_of(final)
    if code not in (0x0000, 0xB000):
        raise PriorError(f"{where(src)} answered C-GET with status 0x{code or 0:04X}")
    if code == 0xB000 or sink.rejected:
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
        log.warning("prior series fetched in part source=%s kept=%d failed=%d refused=%d", src.ae_title,
                    len(sink.files), failed, sink.rejected)
    return list(sink.files)
