"""The SR built in a second process while the SEG is built (node/results/sr_process.py): the same SR as one
built in the job's own process, errors that are the SR's own still fail the job, and a dead process only
means the SR is built in the job's process instead."""

import copy
import os
import signal

import pydicom
import pytest

from node.plugin_api import Finding, Measurement, PluginResult
from node.results import AlgorithmInfo, build_results, iod_lookup, validate_with_dciodvfy
from node.results.sr_process import SrProcess
from tests.support.shm import named_semaphores
from tests.test_results import LUNG, ML, VOLUME, headers_only, result_for, small_ct

ALGO = AlgorithmInfo("ct_lung", "1.0.0", model_name="unet", model_version="7")
CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def warm(proc: SrProcess) -> SrProcess:
    assert proc.wait_ready(120)
    return proc


@pytest.fixture(scope="module")
def sr_process():
    proc = warm(SrProcess())
    yield proc
    proc.close()


def _without_clock(ds):
    ds = copy.deepcopy(ds)
    for keyword in CLOCK:
        ds.pop(keyword, None)
    for item in ds.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return ds


def test_the_sr_from_the_process_equals_the_one_built_in_place(sr_process, tmp_path):
    src = small_ct()
    sources = {src[0].SeriesInstanceUID: headers_only(src)}
    order = []
    here = build_results(result_for(src), sources, ALGO)
    there = build_results(result_for(src), sources, ALGO, sr_builder=sr_process,
                          on_built=lambda o: order.append(o.kind))
    assert order == ["SEG", "SR"]
    assert [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in here] == \
           [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in there]
    assert _without_clock(here[1].dataset) == _without_clock(there[1].dataset)
    path = tmp_path / "sr.dcm"
    there[1].dataset.save_as(path, enforce_file_format=True)
    assert validate_with_dciodvfy(path) == []


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
def test_headers_read_from_files_give_the_same_sr_through_the_process(sr_process, tmp_path, syntax):
    """As a job's headers are: read from the spool, their elements still raw. The process gets the cited
    ones as read, and the SR is the one built in place, for explicit and implicit VR files alike."""
    from node.run.series_loader import read_file

    src = small_ct()
    for k, ds in enumerate(src):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
    headers = [read_file(tmp_path / f"{k}.dcm")[0] for k in range(len(src))]
    assert isinstance(headers[5].get_item(pydicom.tag.Tag("SOPInstanceUID")), pydicom.dataelem.RawDataElement)
    sources = {src[0].SeriesInstanceUID: headers}
    here = build_results(result_for(src), sources, ALGO)
    there = build_results(result_for(src), sources, ALGO, sr_builder=sr_process)
    assert _without_clock(here[1].dataset) == _without_clock(there[1].dataset)
    cited = {i.ReferencedSOPInstanceUID for e in there[1].dataset.CurrentRequestedProcedureEvidenceSequence
             for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert {str(ds.SOPInstanceUID) for ds in src} <= cited


def test_the_process_writes_the_sr_itself_when_given_its_file(sr_process, tmp_path):
    src = small_ct()
    sources = {src[0].SeriesInstanceUID: headers_only(src)}
    here = build_results(result_for(src), sources, ALGO)
    files = {}
    there = build_results(result_for(src), sources, ALGO, sr_builder=sr_process,
                          sr_file=lambda uid: files.setdefault(uid, tmp_path / f"{uid}.part"))
    sr = there[1]
    assert sr.kind == "SR" and sr.dataset is None and sr.path == files[sr.sop_instance_uid]
    assert (sr.sop_class_uid, sr.sop_instance_uid, sr.series_instance_uid) == \
           (here[1].sop_class_uid, here[1].sop_instance_uid, here[1].series_instance_uid)
    here[1].dataset.save_as(tmp_path / "here.dcm", enforce_file_format=True)
    assert _without_clock(pydicom.dcmread(sr.path)) == _without_clock(pydicom.dcmread(tmp_path / "here.dcm"))
    assert validate_with_dciodvfy(sr.path) == []


def test_a_failed_seg_build_leaves_no_sr_file_behind(sr_process, tmp_path, monkeypatch):
    src = small_ct()
    sources = {src[0].SeriesInstanceUID: headers_only(src)}

    def broken(*a, **kw):
        raise RuntimeError("SEG build failed")

    monkeypatch.setattr("node.results.build.build_seg", broken)
    with pytest.raises(RuntimeError, match="SEG build failed"):
        build_results(result_for(src), sources, ALGO, sr_builder=sr_process, sr_file=lambda uid: tmp_path / "sr.part")
    assert list(tmp_path.iterdir()) == []


def test_an_error_of_the_sr_itself_still_fails_the_build(sr_process):
    src = small_ct()
    res = result_for(src)
    bad = PluginResult(findings=[Finding("x", LUNG, [Measurement(VOLUME, 1.0, ML)], segment_label="nope")],
                       segmentations=res.segmentations)
    with pytest.raises(ValueError, match="segment 'nope'"):
        build_results(bad, {src[0].SeriesInstanceUID: headers_only(src)}, ALGO, sr_builder=sr_process)


def test_a_dead_sr_process_means_the_sr_is_built_in_place():
    proc = warm(SrProcess())
    try:
        first = proc.pid
        assert first not in (None, os.getpid())
        os.kill(first, signal.SIGKILL)  # the process a kernel OOM kill would take
        src = small_ct()
        objs = build_results(result_for(src), {src[0].SeriesInstanceUID: headers_only(src)}, ALGO, sr_builder=proc)
        assert [o.kind for o in objs] == ["SEG", "SR"]
        # and the next job has a working process again, once it has started
        warm(proc)
        objs = build_results(result_for(src), {src[0].SeriesInstanceUID: headers_only(src)}, ALGO, sr_builder=proc)
        assert [o.kind for o in objs] == ["SEG", "SR"]
        assert proc.pid not in (None, first, os.getpid())
    finally:
        proc.close()


def test_a_reply_nobody_waited_for_is_not_handed_to_the_next_sr(sr_process):
    src = small_ct()
    sources = {src[0].SeriesInstanceUID: headers_only(src)}

    def twice(args, path):  # a first request whose reply is never collected, then the real one
        sr_process({**args, "sop_uid": "1.2.826.0.1.3680043.8.498.1"}, path)
        return sr_process(args, path)

    here = build_results(result_for(src), sources, ALGO)
    there = build_results(result_for(src), sources, ALGO, sr_builder=twice)
    assert there[1].sop_instance_uid == here[1].sop_instance_uid
    assert there[1].dataset.SOPInstanceUID == here[1].sop_instance_uid


def test_the_process_uses_no_named_semaphores():
    """A worker killed mid-job (past run.shutdown_grace_s) must leave nothing for the resource tracker to
    warn about, and a node killed outright nothing in /dev/shm."""
    before = named_semaphores(os.getpid())
    proc = warm(SrProcess())
    try:
        assert named_semaphores(proc.pid) == set()
        assert named_semaphores(os.getpid()) == before
    finally:
        proc.close(wait=True)
    assert proc.pid is None


def test_a_job_never_waits_for_the_process_to_start(monkeypatch):
    proc = SrProcess()
    try:
        monkeypatch.setattr(proc, "warm", lambda: False)  # as in the seconds after a worker starts
        submitted = []
        monkeypatch.setattr(proc, "_send", lambda *a: submitted.append(a))
        src = small_ct()
        objs = build_results(result_for(src), {src[0].SeriesInstanceUID: headers_only(src)}, ALGO, sr_builder=proc)
        assert [o.kind for o in objs] == ["SEG", "SR"] and submitted == []  # built in place
    finally:
        monkeypatch.undo()
        proc.close()


def test_a_worker_reads_highdicom_s_tables_before_its_first_job():
    from highdicom import _standard_utils

    from node.run.job_process import PluginCache

    tables = (_standard_utils.get_sop_class_iod_map, _standard_utils.get_iod_module_map,
              _standard_utils.get_module_attribute_map)
    for table in tables:
        table.cache_clear()
    PluginCache({}).preload(["ct_lung"])
    assert all(table.cache_info().currsize == 1 for table in tables)


def test_the_iod_look_up_cache_answers_as_highdicom_does():
    from highdicom import _standard_utils

    assert _standard_utils.is_attribute_in_iod is iod_lookup.is_attribute_in_iod
    for attribute, sop_class in [("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.2"),
                                 ("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.66.4"),
                                 ("ContentDate", "1.2.840.10008.5.1.4.1.1.88.34")]:
        assert iod_lookup.is_attribute_in_iod(attribute, sop_class) == iod_lookup._uncached(attribute, sop_class)
    assert iod_lookup.is_attribute_in_iod("PixelData", "1.2.840.10008.5.1.4.1.1.2", ["IconImageSequence"]) == \
        iod_lookup._uncached("PixelData", "1.2.840.10008.5.1.4.1.1.2", ["IconImageSequence"])
