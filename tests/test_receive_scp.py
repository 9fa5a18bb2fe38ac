"""The receiver in this process: how it spends the GIL around a C-STORE."""

from __future__ import annotations

import gc
import json
import subprocess
import threading

import pydicom
import pydicom.data
import pytest

from node.audit import AuditLog
from node.config.schema import NodeSection
from node.receive.scp import StoreSCP
from node.receive.spool import Spool
from node.store import Store
from tests.support.net import free_port


@pytest.fixture
def scp(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'ainode.db'}")
    audit = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE")
    scp = StoreSCP(NodeSection(ae_title="AINODE", host="127.0.0.1", port=free_port()), Spool(tmp_path / "spool"),
                   store, audit)
    scp.start()
    yield scp
    scp.stop()
    audit.close()
    store.close()


def send(scp: StoreSCP, path) -> str:
    r = subprocess.run(["storescu", "-v", "-aec", "AINODE", "127.0.0.1", str(scp.port), str(path)],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "beside-another-store"])
def test_check_thread_follows_the_load_and_the_outcome_does_not(scp, tmp_path, busy):
    """The header check runs beside the durable write when it is the only C-STORE, after it when others
    run: either way a good instance is kept, a bad one refused, and no temp file is left."""
    threads: list[str] = []
    check = scp._check

    def recording(*args):
        threads.append(threading.current_thread().name)
        return check(*args)

    scp._check = recording
    if busy:
        scp._storing = 1  # as if another association's C-STORE were running now
    good = pydicom.data.get_testdata_file("CT_small.dcm")
    bad_ds = pydicom.dcmread(good)
    bad_ds.SOPInstanceUID = bad_ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    bad_ds.PixelData = bad_ds.PixelData[:-2]  # shorter than Rows x Columns x BitsAllocated say
    bad = tmp_path / "bad.dcm"
    bad_ds.save_as(bad)

    assert "Refused" not in send(scp, good)
    out = send(scp, bad)
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in out, out

    on_checker = [name.startswith("store-check") for name in threads]
    assert on_checker == [not busy, not busy]
    assert scp.store.has_instance(str(pydicom.dcmread(good).SOPInstanceUID))
    assert not scp.store.has_instance(str(bad_ds.SOPInstanceUID))
    assert len(list(scp.spool.root.rglob("*.dcm"))) == 1
    assert not list(scp.spool.tmp.iterdir())
    events = [json.loads(line)["event"] for line in scp.audit.path.read_text().splitlines()]
    assert events.count("instance-stored") == 1 and events.count("instance-refused") == 1


def test_start_up_objects_are_left_out_of_pynetdicoms_periodic_collections(scp):
    """pynetdicom's server calls gc.collect() every 30 s; over a node's start-up heap that held the GIL 120 ms."""
    assert gc.get_freeze_count() > 10_000


def test_a_durable_write_of_several_chunks_gives_them_in_order_across_short_writes(tmp_path, monkeypatch):
    """The receiver writes the file meta group and the data set as received with one writev (node/receive/
    spool.py finish_temp): not joined first, and a short write goes on where it stopped."""
    import os

    spool = Spool(tmp_path / "spool")
    chunks = [b"M" * 300, b"", bytes(range(256)) * 40]
    calls = []
    writev = os.writev

    def short(fd, buffers):  # type: ignore[no-untyped-def] - at most 1000 bytes a call
        calls.append(sum(len(b) for b in buffers))
        left, out = 1000, []
        for b in buffers:
            out.append(bytes(b[:left]))
            left -= len(out[-1])
        return writev(fd, out)

    monkeypatch.setattr(os, "writev", short)
    tmp = spool.finish_temp(*spool.open_temp(), *chunks)
    assert tmp.read_bytes() == b"".join(chunks)
    assert len(calls) == 11 and calls[0] == 300 + 10240
