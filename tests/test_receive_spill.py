"""A data set past node.receive_to_disk_mb is received into its spool file as it arrives, not into memory
(node/receive/spill.py), and is kept byte for byte as sent; one refused or cut off leaves no file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tracemalloc

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid
from pynetdicom import _config

from node.audit import AuditLog
from node.config.schema import NodeSection
from node.receive.scp import StoreSCP
from node.receive.spill import RESERVE_STEP, SpillFile
from node.receive.spool import Spool
from node.store import Store
from tests.support.net import free_port

SIDE = 4096  # 4096 x 4096 x 16 bits: a 32 MB data set, 32 times node.receive_to_disk_mb


@pytest.fixture
def start(tmp_path, monkeypatch):
    """Starts a receiver in this process, with storage.min_free_mb `below_free_mb` under the free space now
    (None: 0); each is stopped at the test's end."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as node/logs.py sets it: no DIMSE listeners
    started: list[StoreSCP] = []

    def receiver(below_free_mb: int | None = None) -> StoreSCP:
        store = Store(f"sqlite:///{tmp_path / 'ainode.db'}")
        audit = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE")
        cfg = NodeSection(ae_title="AINODE", host="127.0.0.1", port=free_port(), receive_to_disk_mb=1,
                          max_dataset_mb=100)
        spool = Spool(tmp_path / "spool")
        min_free_mb = 0 if below_free_mb is None else shutil.disk_usage(spool.root).free // 2**20 - below_free_mb
        scp = StoreSCP(cfg, spool, store, audit, min_free_mb=min_free_mb)
        started.append(scp)
        scp.start()
        return scp

    yield receiver
    for scp in started:
        scp.stop()
        scp.audit.close()
        scp.store.close()


@pytest.fixture
def scp(start):
    return start()


def large(tmp_path, name: str, **values) -> tuple[pydicom.Dataset, bytes]:  # type: ignore[no-untyped-def]
    """A 32 MB CT image saved as `name`, and the file's bytes."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = SIDE
    ds.PixelData = bytes(range(256)) * (SIDE * SIDE * 2 // 256)
    del ds[0xFFFCFFFC]  # Data Set Trailing Padding, which storescu leaves out
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return ds, path.read_bytes()


def data_set(part10: bytes) -> bytes:
    """A file's data set: after the preamble, DICM and the File Meta Information (its group length says where)."""
    return part10[144 + int.from_bytes(part10[140:144], "little"):]


def storescu(scp: StoreSCP, path) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen(["storescu", "-v", "-aec", "AINODE", "127.0.0.1", str(scp.port), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(scp: StoreSCP) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in scp.audit.path.read_text().splitlines()]


def test_a_large_data_set_is_kept_as_sent_without_being_held_in_memory(scp, tmp_path):
    ds, sent = large(tmp_path, "large.dcm")
    tracemalloc.start()
    try:
        out = storescu(scp, tmp_path / "large.dcm").communicate(timeout=120)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "Received Store Response (Success)" in out, out
    stored = list(scp.spool.root.rglob("*.dcm"))
    assert len(stored) == 1 and scp.store.has_instance(str(ds.SOPInstanceUID))
    kept = stored[0].read_bytes()
    assert data_set(kept) == data_set(sent)  # byte for byte
    assert pydicom.dcmread(stored[0]).file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert peak < 8 * 2**20, peak  # held in memory it would be 32 MB, and more while the BytesIO grew
    assert not list(scp.spool.tmp.iterdir())
    assert [e["event"] for e in events(scp)].count("instance-stored") == 1


def test_a_deflated_data_set_that_inflates_past_the_size_is_checked_from_disk(scp, tmp_path):
    """A few hundred kB deflated, 32 MB inflated: the header check reads the inflated data set from a
    temp file, not from memory, and the instance is kept as sent (deflated)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, _ = large(tmp_path, "plain.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    sent = (tmp_path / "deflated.dcm").read_bytes()
    assert len(sent) < 2**20
    tracemalloc.start()
    try:
        out = subprocess.run(["storescu", "-v", "-xd", "-aec", "AINODE", "127.0.0.1", str(scp.port),
                              str(tmp_path / "deflated.dcm")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=120).stdout
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "Received Store Response (Success)" in out, out
    stored = list(scp.spool.root.rglob("*.dcm"))
    assert len(stored) == 1 and data_set(stored[0].read_bytes()) == data_set(sent)
    assert peak < 16 * 2**20, peak  # inflated in memory it would be 32 MB
    assert not list(scp.spool.tmp.iterdir())


def test_a_large_data_set_that_is_refused_leaves_no_file(scp, tmp_path):
    """Refused by the header check (its pixel data is short of what Rows and Columns say), after it went to disk."""
    ds, _ = large(tmp_path, "short.dcm", Columns=SIDE + 2)
    out = storescu(scp, tmp_path / "short.dcm").communicate(timeout=120)[0]
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in out, out
    assert not scp.store.has_instance(str(ds.SOPInstanceUID))
    assert not list(scp.spool.root.rglob("*.dcm")) and not list(scp.spool.tmp.iterdir())


def test_a_large_data_set_cut_off_by_its_sender_leaves_no_file(scp, tmp_path):
    """storescu killed while its data set is on the way: the partial spill file goes when the connection does."""
    _, sent = large(tmp_path, "cut.dcm")
    sender = storescu(scp, tmp_path / "cut.dcm")
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 4 * 2**20 for p in scp.spool.tmp.glob("*.part")):
            assert time.monotonic() < deadline and sender.poll() is None, "no spill file grew"
            time.sleep(0.001)
        sender.send_signal(signal.SIGKILL)
    finally:
        sender.kill()
        sender.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while list(scp.spool.tmp.iterdir()):
        assert time.monotonic() < deadline, list(scp.spool.tmp.iterdir())
        time.sleep(0.05)
    assert not list(scp.spool.root.rglob("*.dcm"))
    assert "instance-stored" not in [e["event"] for e in events(scp)]


def test_a_large_data_set_is_stopped_before_it_takes_the_room_storage_min_free_mb_keeps(start, tmp_path):
    scp = start(below_free_mb=8)  # the first 16 MB the spill file asks for are refused
    ds, _ = large(tmp_path, "large.dcm")
    out = storescu(scp, tmp_path / "large.dcm").communicate(timeout=120)[0]
    assert "Received Store Response (Refused: OutOfResources)" in out, out
    refused = [e for e in events(scp) if e["event"] == "instance-refused"]
    assert len(refused) == 1 and "spool disk below storage.min_free_mb" in refused[0]["reason"], refused
    assert not scp.store.has_instance(str(ds.SOPInstanceUID))
    assert not list(scp.spool.root.rglob("*.dcm")) and not list(scp.spool.tmp.iterdir())


def test_a_deflated_data_set_is_not_inflated_into_the_room_storage_min_free_mb_keeps(start, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, _ = large(tmp_path, "plain.dcm")
    side = 8192  # 128 MB inflated; the margin below leaves other tests' files on the same disk room too
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (side * side * 2 // 256)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    del ds.PixelData
    (tmp_path / "plain.dcm").unlink()
    os.sync()  # the free space the receiver starts from stays what it is during the send
    scp = start(below_free_mb=96)  # room for the deflated bytes (under 2 MB), not for what they inflate to
    out = subprocess.run(["storescu", "-v", "-xd", "-aec", "AINODE", "127.0.0.1", str(scp.port),
                          str(tmp_path / "deflated.dcm")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=120).stdout
    assert "Received Store Response (Refused: OutOfResources)" in out, out
    refused = [e for e in events(scp) if e["event"] == "instance-refused"]
    assert len(refused) == 1 and refused[0]["reason"] == ("cannot inflate the deflated data set in the spool: "
                                                          "spool disk below storage.min_free_mb"), refused
    assert not scp.store.has_instance(str(ds.SOPInstanceUID))
    assert not list(scp.spool.root.rglob("*.dcm")) and not list(scp.spool.tmp.iterdir())


def test_a_spill_file_asks_for_room_ahead_of_its_writes_a_step_at_a_time(tmp_path):
    asked: list[int] = []
    spill = SpillFile(tmp_path / "a.part", os.open(tmp_path / "a.part", os.O_RDWR | os.O_CREAT), b"M" * 10,
                      asked.append)
    spill.write(b"x" * (RESERVE_STEP - 10))  # fills the first step
    spill.write(b"y")
    spill.write(b"z" * (3 * RESERVE_STEP))  # one write larger than a step: asked for at once
    assert asked == [RESERVE_STEP, RESERVE_STEP, 3 * RESERVE_STEP - RESERVE_STEP + 1]
    spill.close()
    assert not list(tmp_path.iterdir())
