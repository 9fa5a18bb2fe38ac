"""The start-up reconciler repairs what a crash can leave between the spool, the results and the store."""

import shutil
import time

from pydicom import dcmread

from node.maintain import reconcile
from node.receive.header import instance_meta
from node.receive.spool import Spool, scratch_prefix
from node.store import NewJob, Store
from node.synth import write_chest_ct


def put(spool, store, src, index=True):
    """Copy a file into the spool as the receiver would; index it unless a crash came first."""
    ds = dcmread(src, stop_before_pixels=True)
    dest = spool.instance_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    if index:
        store.add_instance(instance_meta(ds, path=str(dest), size=dest.stat().st_size,
                                         transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="PACS"))
    return dest


def test_reconcile_fixes_and_reports_each_kind_of_leftover(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    spool, results = Spool(tmp_path / "spool"), tmp_path / "results"
    a = write_chest_ct(tmp_path / "a", slices=10, rows=64, cols=64, seed=1)
    b = write_chest_ct(tmp_path / "b", slices=10, rows=64, cols=64, seed=2)

    indexed = put(spool, store, a.files[0])
    put(spool, store, a.files[1])
    put(spool, store, a.files[2]).unlink()  # a row whose file is gone
    orphan = put(spool, store, a.files[3], index=False)  # written durably, crash before its row
    copy = put(spool, store, a.files[0], index=False)  # a second copy of an indexed instance
    (spool.tmp / "cut-off.part").write_bytes(b"half a file")
    scratch = spool.tmp / f"{scratch_prefix(7)}x1y2"  # a plugin's scratch folder, its job cut off
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "input.nii").write_bytes(b"voxels")
    junk = orphan.parent / "1.2.3.junk.dcm"
    junk.write_bytes(b"not DICOM")

    # Study b was purged, but the crash came before its files were deleted.
    b_paths = [put(spool, store, f) for f in b.files[:2]]
    store.mark_complete(b.study_uid, "quiet-period", time.time())
    store.route(b.study_uid, [])
    assert sorted(store.purge_study(b.study_uid, time.time() + 1)) == sorted(map(str, b_paths))

    # Study a's job was cut off mid-build: its results folder holds a file of a job that runs again.
    store.mark_complete(a.study_uid, "quiet-period", time.time())
    [job_id] = store.route(a.study_uid, [NewJob("r", "ct_lung", "routine", [a.series_uid], [])])
    stale = results / a.study_uid / f"job-{job_id}" / "SEG-1.2.3.dcm"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")

    report = reconcile(store, spool, results)
    assert report.partial_files_removed == 2 and not scratch.exists()
    assert report.orphans_indexed == 1 and store.has_instance(str(dcmread(a.files[3]).SOPInstanceUID))
    assert report.duplicate_copies_removed == 1 and not copy.exists() and indexed.exists()
    assert report.purge_leftovers_removed == 2 and not any(p.exists() for p in b_paths)
    assert report.quarantined == ["1.2.3.junk.dcm: InvalidDicomError"]
    assert (spool.root / ".quarantine" / junk.name).exists()  # moved aside, not deleted
    assert report.missing_instance_files == 1
    assert report.stale_result_files_removed == 1 and not stale.exists()
    assert report.fixed() == 8

    again = reconcile(store, spool, results)  # idempotent: nothing left to fix
    assert again.fixed() == 0 and again.missing_instance_files == 1
    store.close()
