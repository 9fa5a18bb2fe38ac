"""node/receive/spool.py: folders removed by another process, the free-space figure, file names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple

import pytest

from node.receive import spool as spool_module
from node.receive.spool import Spool


def test_a_folder_another_process_purged_is_made_again(tmp_path):
    """A receive process and the node process each have a Spool on the same root. Once the node process's
    retention had removed a series folder, the receive process still took it for existing: every later
    instance of that series failed its rename (refused, 0xA700) until the receive process restarted."""
    receiver, purger = Spool(tmp_path), Spool(tmp_path)
    first = receiver.instance_path("1.2", "1.3", "1.4")
    receiver.write_durable(first, b"first")
    assert purger.remove([str(first)]) == 1
    assert not first.parent.exists()
    again = receiver.instance_path("1.2", "1.3", "1.5")
    receiver.write_durable(again, b"again")
    assert again.read_bytes() == b"again"
    assert not list(receiver.tmp.glob("*.part"))


def test_a_missing_temp_file_is_still_an_error(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(FileNotFoundError):
        spool.publish(spool.temp_path(), spool.instance_path("1.2", "1.3", "1.4"))


def test_remembered_folders_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "KNOWN_DIRS_MAX", 3)
    spool = Spool(tmp_path)
    for i in range(10):
        spool.write_durable(spool.instance_path("1.2", f"1.3.{i}", "1.4"), b"x")
        assert len(spool._known_dirs) <= 3


Usage = namedtuple("Usage", "total used free")


def test_free_space_is_asked_once_a_second_and_fresh_before_a_refusal(tmp_path, monkeypatch):
    asked = []
    free = [10_000]

    def disk_usage(path):  # type: ignore[no-untyped-def]
        asked.append(path)
        return Usage(0, 0, free[0])

    clock = [100.0]
    monkeypatch.setattr(spool_module.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(spool_module.time, "monotonic", lambda: clock[0])
    spool = Spool(tmp_path)
    assert spool.free_bytes(1000, keep=0) == 10_000 and len(asked) == 1
    assert spool.free_bytes(1000, keep=0) == 9_000 and len(asked) == 1  # the first file taken off
    assert spool.free_bytes(1000, keep=0) == 8_000 and len(asked) == 1
    free[0] = 7_000  # another process wrote meanwhile: seen within the second
    clock[0] += spool_module.FREE_SPACE_MAX_AGE_S
    assert spool.free_bytes(1000, keep=0) == 7_000 and len(asked) == 2
    # The cache would leave less than `keep`: the disk is asked before the caller refuses.
    free[0] = 50_000
    assert spool.free_bytes(1000, keep=6_000) == 50_000 and len(asked) == 3
    assert spool.free_bytes(1000, keep=0) == 49_000 and len(asked) == 3


def test_names_differ_between_processes_forked_from_one(tmp_path):
    """`random` reseeds in a forked child, so a receive process forked from the node names its files apart."""
    code = ("import os, sys; from pathlib import Path; from node.receive.spool import Spool; "
            "s = Spool(Path(sys.argv[1])); r, w = os.pipe(); pid = os.fork()\n"
            "if pid == 0:\n    os.write(w, s.temp_path().name.encode()); os._exit(0)\n"
            "os.waitpid(pid, 0); print(os.read(r, 100).decode(), s.temp_path().name)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    child, parent = out.stdout.split()
    assert child != parent and child.endswith(".part")
