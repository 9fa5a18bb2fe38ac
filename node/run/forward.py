"""The built-in `forward` rule action (node.config.schema.FORWARD): send the matched series itself to the
rule's destinations.

A destination marked `external` (e.g. a cloud second-read service) gets de-identified copies (node/deid:
PS3.15 Basic Profile, keyed pseudonyms, the map committed before any copy exists); the others get the
received files as they are. The copies are written durably into the job's results folder before their
dispatch rows, so a retry resends the same bytes and retention removes them with the study. It runs in
the node process (a CPU worker thread), because the pseudonym map is written to the node's store, whose
only writer the node process is.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Mapping

from pydicom import dcmread

from node.config.schema import Destination
from node.deid import Deidentifier, DeidentificationError
from node.receive.spool import Spool
from node.store import DispatchItem, Store
from node.store.models import Job

log = logging.getLogger("ainode.run")



class ForwardError(Exception):
    pass


class Forwarder:
    def __init__(self, store: Store, spool: Spool, results_dir: Path, destinations: Mapping[str, Destination],
                 deidentifier: Deidentifier | None) -> None:
        self.store = store
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.destinations = destinations
        self.deidentifier = deidentifier

    def build(self, job: Job) -> tuple[list[DispatchItem], str, dict[str, float]]:
        """Dispatch items (and de-identified copies) for the job's series; raises ForwardError naming what
        is wrong, never a patient value."""
        t0 = time.perf_counter()
        instances = [i for uid in job.series_uids for i in self.store.instances_of(uid)]
        items: list[DispatchItem] = []
        copies = 0
        for dest in job.destinations:
            cfg = self.destinations.get(dest)
            if cfg is not None and cfg.external:
                if self.deidentifier is None:
                    raise ForwardError(f"destination '{dest}' is external but the config has no deid: section; "
                                       "nothing was sent")
                for inst in instances:
                    items.append(self._deidentified(job, dest, inst.path))
                    copies += 1
            else:
                items += [DispatchItem(dest, "FWD", inst.sop_class_uid, inst.sop_instance_uid, inst.path)
                          for inst in instances]
        summary = (f"forwarded {len(instances)} instance(s) to {', '.join(job.destinations)}"
                   + (f" ({copies} de-identified copies)" if copies else ""))
        return items, summary, {"forward_s": round(time.perf_counter() - t0, 3)}

    def _deidentified(self, job: Job, dest: str, path: str) -> DispatchItem:
        try:
            out = self.deidentifier.deidentify(dcmread(path))  # type: ignore[union-attr]
        except DeidentificationError as exc:
            raise ForwardError(f"de-identification refused an instance of series {job.series_uids[0]}: {exc}; "
                               f"nothing was sent to '{dest}'") from None
        target = self.results_dir / job.study_uid / f"job-{job.id}" / dest / f"{out.SOPInstanceUID}.dcm"
        with tempfile.NamedTemporaryFile(dir=self.spool.tmp, suffix=".part", delete=False) as f:
            tmp = Path(f.name)
        try:
            out.save_as(tmp, enforce_file_format=True)
            self.spool.commit(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return DispatchItem(dest, "FWD", str(out.SOPClassUID), str(out.SOPInstanceUID), str(target))
