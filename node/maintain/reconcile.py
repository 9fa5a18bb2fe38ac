"""Start-up reconciliation of the spool and results folders against the store.

A crash can leave: a temp file of a write that never finished; a durable spool file whose store
row was never committed (the sender got no Success and will send again, but the file is good);
a file of a study whose purge was cut off; result files of a job that was cut off mid-build.
Each is fixed here and counted, so IT can see in the audit log what a crash left behind.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import dcmread

from node.receive.header import instance_meta
from node.receive.spool import Spool, remove_files
from node.store import JobState, Store, StudyState

log = logging.getLogger("ainode.reconcile")


@dataclass
class ReconcileReport:
    partial_files_removed: int = 0
    orphans_indexed: int = 0  # durable files without a row: indexed, the data is good
    duplicate_copies_removed: int = 0  # a second file of an instance already indexed
    purge_leftovers_removed: int = 0  # files of a purged study whose deletion was cut off
    quarantined: list[str] = field(default_factory=list)  # unreadable files, moved aside, not deleted
    missing_instance_files: int = 0  # rows whose file is gone: cannot be fixed here
    stale_result_files_removed: int = 0  # results of jobs that will run again
    missing_result_files: list[int] = field(default_factory=list)  # dispatch ids whose file is gone

    def fixed(self) -> int:
        return (self.partial_files_removed + self.orphans_indexed + self.duplicate_copies_removed
                + self.purge_leftovers_removed + len(self.quarantined) + self.stale_result_files_removed)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}


def reconcile(store: Store, spool: Spool, results_dir: Path) -> ReconcileReport:
    report = ReconcileReport(partial_files_removed=spool.remove_partials())
    _reconcile_spool(store, spool, report)
    _reconcile_results(store, Path(results_dir), report)
    if report.fixed() or report.missing_instance_files or report.missing_result_files:
        log.warning("reconciled spool and store %s", report.as_dict())
    return report


def _reconcile_spool(store: Store, spool: Spool, report: ReconcileReport) -> None:
    indexed = store.instance_paths()
    held = set(indexed.values())
    states = store.study_states()
    leftovers = []
    for path in spool.instance_files():
        if str(path) in indexed:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = instance_meta(ds, path=str(path), size=path.stat().st_size,
                                 transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae=None)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is moved aside
            dest = spool.root / ".quarantine" / path.name
            dest.parent.mkdir(exist_ok=True)
            shutil.move(path, dest)
            report.quarantined.append(f"{path.name}: {type(exc).__name__}")
            continue
        if meta.sop_instance_uid in held:
            leftovers.append(str(path))
            report.duplicate_copies_removed += 1
        elif states.get(meta.study_uid) == StudyState.PURGED:
            leftovers.append(str(path))
            report.purge_leftovers_removed += 1
        elif store.add_instance(meta):
            held.add(meta.sop_instance_uid)
            report.orphans_indexed += 1
    remove_files(leftovers, spool.root)
    report.missing_instance_files = sum(1 for p in indexed if not Path(p).exists())


def _reconcile_results(store: Store, results_dir: Path, report: ReconcileReport) -> None:
    jobs = store.job_states()
    stale = []
    for job_dir in results_dir.glob("*/job-*"):
        try:
            job_id = int(job_dir.name.removeprefix("job-"))
        except ValueError:
            continue
        if jobs.get(job_id) in (JobState.QUEUED, JobState.RUNNING, None):
            stale += [str(p) for p in job_dir.iterdir() if p.is_file()]
    report.stale_result_files_removed = remove_files(stale, results_dir)
    report.missing_result_files = [d for d, p in store.unsent_dispatch_paths() if not Path(p).exists()]
