"""Results coming back from an external service: re-identified, then sent on to the PACS.

An object whose sender is an external destination's `return_ae_titles` does not enter the normal
receive → assemble → route path (it would reopen the study and run its plugins again). It is mapped back
to the original patient and study through the pseudonym map, written durably into the results folder of
the study's forward job, and queued for that destination's `return_to` PACS. An object of a study the
node never de-identified is refused (0xA900), so an external service cannot inject into other studies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Mapping

from pydicom import dcmread

from node.audit import AuditLog
from node.config.schema import Destination
from node.deid.pseudonyms import PseudonymMap
from node.deid.reidentify import reidentify
from node.receive.spool import Spool
from node.store import DispatchItem, Store

log = logging.getLogger("ainode.deid")


@dataclass(frozen=True)
class Returned:
    status: int  # 0x0000 stored and queued; 0xA900 not ours; 0xA700 cannot store
    reason: str = ""


class ReturnedResults:
    def __init__(self, store: Store, audit: AuditLog, spool: Spool, results_dir: Path,
                 destinations: Mapping[str, Destination], pseudonyms: PseudonymMap) -> None:
        self.store = store
        self.audit = audit
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.pseudonyms = pseudonyms
        self.by_ae = {ae.upper(): (name, d) for name, d in destinations.items() if d.external
                      for ae in d.return_ae_titles}

    def handles(self, calling_ae: str) -> bool:
        return calling_ae.upper() in self.by_ae

    def receive(self, encoded: bytes, calling_ae: str, peer_ip: str | None) -> Returned:
        name, dest = self.by_ae[calling_ae.upper()]
        back = reidentify(dcmread(BytesIO(encoded)), self.pseudonyms)
        if back is None:
            reason = "study not known to this node (it did not send it out de-identified)"
            self.audit.append("result-returned", "failure", calling_ae=calling_ae, peer_ip=peer_ip,
                              destination=name, reason=reason)
            return Returned(0xA900, reason)
        study_uid, sop_uid = str(back.StudyInstanceUID), str(back.SOPInstanceUID)
        job_id = self.store.forward_job_for(study_uid, name)
        if job_id is None:
            reason = f"no forward job of this study to '{name}' in the store"
            self.audit.append("result-returned", "failure", calling_ae=calling_ae, peer_ip=peer_ip,
                              destination=name, study_uid=study_uid, reason=reason)
            return Returned(0xA900, reason)
        buf = BytesIO()
        back.save_as(buf, enforce_file_format=True)
        path = self.results_dir / study_uid / f"job-{job_id}" / "returned" / f"{sop_uid}.dcm"
        try:
            self.spool.write_durable(path, buf.getvalue())
        except OSError as exc:
            return Returned(0xA700, f"cannot store the returned result: {exc.strerror}")
        items = [DispatchItem(to, "RET", str(back.SOPClassUID), sop_uid, str(path)) for to in dest.return_to]
        self.store.add_dispatches(job_id, items)
        self.audit.append("result-returned", calling_ae=calling_ae, peer_ip=peer_ip, destination=name,
                          study_uid=study_uid, patient_id=str(back.get("PatientID", "")) or None,
                          sop_instance_uid=sop_uid, sop_class_uid=str(back.SOPClassUID), job_id=job_id,
                          forwarded_to=list(dest.return_to))
        log.info("returned result re-identified from=%s job_id=%d forwarded_to=%s", calling_ae, job_id,
                 ",".join(dest.return_to))
        return Returned(0x0000)
