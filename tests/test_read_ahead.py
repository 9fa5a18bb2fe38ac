"""Files of an arriving study are read by an idle worker, and the job takes them instead of reading again."""

import os
import subprocess
import threading
import time

import numpy as np
import pytest

from node.config.schema import Rule
from node.route.rules import could_take
from node.run.read_ahead import ReadAhead
from node.run.series_loader import load_series, read_file, read_file_decoded
from node.store import InstanceMeta
from node.synth import write_chest_ct
from tests.support.pipeline import send
from tests.support.wait import wait_until


def _meta(**kw) -> InstanceMeta:
    base = dict(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="1.2.3",
                study_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1", path="/x.dcm", size_bytes=1,
                calling_ae="CT1", modality="CT", body_part="CHEST", series_description="Lung 1mm",
                slice_thickness=1.0)
    base.update(kw)
    return InstanceMeta(**base)


def test_could_take_names_the_plugins_whose_rules_could_take_the_series():
    rules = [Rule(name="lung", series={"modality": "CT", "body_part": ["CHEST"], "min_instances": 50},
                  plugin="ct_lung"),
             Rule(name="thin", series={"modality": "CT", "slice_thickness": [0.5, 1.5]}, plugin="ct_nodule"),
             Rule(name="from-mr", study={"calling_ae": ["MR1"]}, plugin="mr_thing"),
             Rule(name="fwd", plugin="forward")]
    assert could_take(rules, _meta()) == {"ct_lung", "ct_nodule"}  # min_instances: not known while arriving
    assert could_take(rules, _meta(slice_thickness=5.0)) == {"ct_lung"}
    assert could_take(rules, _meta(modality="MR", calling_ae="MR1")) == {"mr_thing"}
    assert could_take(rules, _meta(modality="SR", body_part=None)) == frozenset()


def test_read_ahead_reads_when_idle_keeps_to_its_budget_and_gives_each_file_once(tmp_path):
    files = {}
    for name in "abcdef":
        files[name] = tmp_path / name
        files[name].write_bytes(b"x" * 1000)
    p = {k: str(v) for k, v in files.items()}
    gate = threading.Event()
    gate.set()

    def read(path):
        gate.wait()
        return (path, None)

    ahead = ReadAhead(budget_bytes=3 * 1000, read=read)
    ahead.pause()
    ahead.add([p["a"], p["b"]])
    time.sleep(0.2)
    assert ahead.holds(p.values()) == 0  # paused: a job runs
    ahead.resume()
    wait_until(lambda: ahead.holds([p["a"], p["b"]]) == 2, 5, "two files read")
    assert ahead.take(p["a"]) == (p["a"], None) and ahead.take(p["a"]) is None
    ahead.add([p["c"], p["d"], p["e"]])
    wait_until(lambda: ahead.holds([p["c"], p["d"], p["e"]]) == 3, 5, "three more read")
    assert ahead.holds([p["b"]]) == 0 and ahead.held_bytes == 3000  # the oldest dropped for the budget
    gate.clear()
    ahead.add([p["f"]])
    time.sleep(0.1)
    assert ahead.take(p["f"]) is None  # taken while being read: the job reads it itself
    gate.set()
    time.sleep(0.2)
    assert ahead.holds([p["f"]]) == 0  # and the read under way is not kept


def test_a_file_larger_than_the_budget_is_not_read_ahead(tmp_path):
    """A 2 GB tomosynthesis instance would be read (and decoded) whole only to be dropped at once."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"x" * 1000)
    large.write_bytes(b"x" * 5000)
    read: list[str] = []
    ahead = ReadAhead(budget_bytes=4000, read=lambda path: read.append(path) or (path, None))
    ahead.add([str(large), str(small)])
    wait_until(lambda: ahead.holds([str(small)]) == 1, 5, "the small file read")
    assert read == [str(small)] and ahead.take(str(large)) is None


def test_reading_ahead_runs_at_the_lowest_priority_and_the_caller_keeps_its_own(tmp_path):
    seen = []
    (tmp_path / "x.dcm").write_bytes(b"x")

    def read(path: str) -> tuple:  # runs on the reading thread
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return (None, None)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ahead = ReadAhead(budget_bytes=2**20, read=read)
    ahead.add([str(tmp_path / "x.dcm")])
    wait_until(lambda: seen, 10, "the file read ahead")
    # nice 19: it takes only the CPU that receivers and jobs leave (read_ahead.py says what 10 cost)
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread only


def test_load_series_takes_files_read_ahead_and_gives_the_same_volume(tmp_path):
    ct = write_chest_ct(tmp_path, slices=12)
    plain, plain_headers = load_series(ct.files)
    ahead = ReadAhead(budget_bytes=2**30, read=read_file)
    ahead.add([str(p) for p in ct.files[:8]])
    wait_until(lambda: ahead.holds(map(str, ct.files)) == 8, 10, "eight files read ahead")
    vol, headers = load_series(ct.files, ahead)
    assert ahead.hits == 8 and ahead.holds(map(str, ct.files)) == 0
    assert np.array_equal(vol.pixels, plain.pixels) and vol.sop_instance_uids == plain.sop_instance_uids
    assert [h.SOPInstanceUID for h in headers] == [h.SOPInstanceUID for h in plain_headers]


def test_read_ahead_budget_counts_decoded_pixels_not_the_compressed_file(tmp_path):
    ct = write_chest_ct(tmp_path, slices=10, rows=64, cols=64, transfer_syntax="JPEG2000Lossless")
    decoded = 64 * 64 * 2
    assert all(p.stat().st_size < decoded for p in ct.files)
    ahead = ReadAhead(budget_bytes=3 * decoded, read=read_file_decoded)
    ahead.add([str(p) for p in ct.files[:5]])
    wait_until(lambda: ahead.holds(map(str, ct.files[2:5])) == 3, 10, "the last three read ahead")
    assert ahead.held_bytes == 3 * decoded and ahead.holds(map(str, ct.files)) == 3  # the first two dropped
    vol, _ = load_series(ct.files, ahead)
    assert np.array_equal(vol.pixels, load_series(ct.files)[0].pixels)


def test_an_idle_worker_reads_the_study_while_it_arrives(tmp_path, node_factory):
    """A real node: the job of a study sent to an idle node finds (nearly) all of its files read. The read-ahead
    thread runs at nice 19, so on a host loaded by other tests it may need more than 1 s for 40 files: the
    quiet period here is 3 s (a failure in a full run on 2 cores, 2026-12-05)."""
    node = node_factory({"assemble": {"quiet_period_s": 3.0},
                         "rules": [{"name": "lung", "series": {"modality": "CT", "min_instances": 30},
                                    "plugin": "ct_lung"},
                                   {"name": "mr-only", "series": {"modality": "MR"}, "plugin": "ct_lung"}]})
    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0)
    # The node hands files only to a warm worker (as it starts jobs only on one).
    wait_until(lambda: "worker ready" in node.log_path.read_text(), 120, "the worker to be warm")
    send(node, ct.files)

    def job_end():
        return next((r for r in node.audit_records() if r["event"] == "job-end"), None)

    end = wait_until(job_end, 120, "the job to end")
    assert end["outcome"] == "success", end
    assert end["timings"].get("read_ahead_files", 0) >= 30, end["timings"]  # the last few may come late
    assert node.stop() == 0


def test_a_worker_decodes_a_jpeg2000_series_in_processes(tmp_path, node_factory):
    """A real node, read-ahead off: the job decodes the compressed series in decoding processes started from
    its worker (daemonic: without an SR process nothing else clears the flag; forkserver), without falling
    back to decoding in the worker."""
    node = node_factory({"assemble": {"quiet_period_s": 1.0}, "run": {"read_ahead_mb": 0, "sr_process": False},
                         "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung"}]})
    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0, transfer_syntax="JPEG2000Lossless")
    wait_until(lambda: "worker ready" in node.log_path.read_text(), 120, "the worker to be warm")
    r = subprocess.run(["storescu", "-xv", "-aec", node.ae_title, "127.0.0.1", str(node.port),  # -xv: JPEG 2000
                        *map(str, ct.files)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def job_end():
        return next((r for r in node.audit_records() if r["event"] == "job-end"), None)

    end = wait_until(job_end, 180, "the job to end")
    assert end["outcome"] == "success", end
    assert "read_ahead_files" not in end["timings"]
    log = node.log_path.read_text()
    assert "decode process" not in log and "Traceback" not in log, log[-3000:]
    assert node.stop() == 0


def test_files_are_held_while_the_receive_can_use_every_cpu_and_dropped_once_their_job_starts():
    """WorkerPool's hand-over: with as many associations as CPUs, reading ahead would take CPU the receive can
    use (bench/receive_rate.py, 4 associations on 2 CPUs); and a study whose job started is read by that job."""
    from collections import OrderedDict, deque
    from types import SimpleNamespace

    from node.run.worker import READ_AHEAD_QUEUE, WorkerPool

    pool = WorkerPool.__new__(WorkerPool)  # only the hand-over and its bookkeeping
    pool._lock, pool._busy, pool._ahead_slot = threading.Lock(), set(), OrderedDict()
    pool._ahead = [deque(maxlen=READ_AHEAD_QUEUE)]
    pool.slots = [SimpleNamespace(may_run=lambda plugin: True)]
    pool.could_take = lambda meta: frozenset({"ct_lung"})
    pool._cpus = 2
    associations = {"n": 2}
    pool.receiving = lambda: associations["n"]
    handed: list[list[str]] = []
    worker = SimpleNamespace(read_ahead=handed.append)

    pool.arrived(_meta(path="/a1", study_uid="A"))
    pool.arrived(_meta(path="/b1", study_uid="B"))
    pool._hand_over(0, worker)
    assert handed == []  # held: 2 associations on 2 CPUs
    associations["n"] = 1
    pool.arrived(_meta(path="/a2", study_uid="A"))
    pool._forget("A")  # A's job started
    pool._hand_over(0, worker)
    assert handed == [["/b1"]]
    pool._hand_over(0, worker)
    assert handed == [["/b1"]]  # each file once


def test_a_compressed_file_that_decodes_past_the_budget_is_left_to_the_job(tmp_path, monkeypatch):
    """A multi-frame RLE instance of a few kB that decodes to 80 kB, against a 20 kB budget: not decoded
    ahead (a multi-frame JPEG 2000 of 100 MB can decode to GBs in a worker that no job limit watches yet)."""
    import functools

    import pydicom
    from pydicom.uid import RLELossless

    import node.run.series_loader as loader

    ds = pydicom.dcmread(write_chest_ct(tmp_path / "ct", slices=10, rows=64, cols=64).files[0])
    frames = np.zeros((10, 64, 64), np.int16)
    ds.NumberOfFrames = 10
    ds.compress(RLELossless, frames)
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 20_000 < loader.decoded_bytes(ds) == frames.nbytes
    decoded: list[str] = []
    real_pixels_of = loader.pixels_of
    monkeypatch.setattr(loader, "pixels_of", lambda d, p: decoded.append(p) or real_pixels_of(d, p))
    with pytest.raises(loader.TooLargeToDecode, match="decodes to 81920 bytes, more than 20000"):
        loader.read_file_decoded(path, max_bytes=20_000)
    assert decoded == []
    returned: list[str] = []

    def read(p: str) -> tuple:  # as the worker's read-ahead reads (plugin_process), noting when it is done
        try:
            return functools.partial(loader.read_file_decoded, max_bytes=20_000)(p)
        finally:
            returned.append(p)

    ahead = ReadAhead(budget_bytes=20_000, read=read)
    ahead.add([str(path)])
    wait_until(lambda: returned, 10, "the read-ahead to pass the file")
    assert ahead.holds([str(path)]) == 0 and ahead.held_bytes == 0 and decoded == []
    _, pixels = loader.read_file_decoded(path, max_bytes=frames.nbytes)  # within its budget: decoded
    assert pixels.shape == (10, 64, 64) and decoded == [str(path)]
