"""node/run/decode_pool.py: decode processes hand their slices back through a memory file of their own, not
through the pipe, and leave nothing behind (no descriptor, nothing in /dev/shm)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pydicom
import pytest

from node.run import decode_pool
from node.run.decode_pool import SharedFile, decode_files
from node.synth import write_chest_ct


@pytest.fixture(scope="module")
def j2k_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("j2k")
    return [str(f) for f in sorted(write_chest_ct(out, slices=24, rows=96, cols=80,
                                                   transfer_syntax="JPEG2000Lossless").files)]


def _mapped_from_a_file(arr: np.ndarray) -> bool:
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return isinstance(base, mmap.mmap)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _described(fds: set[str]) -> dict[str, str]:
    out = {}
    for fd in fds:
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            pass
    return out


def test_slices_come_back_through_a_memory_file_as_pydicom_decodes_them(j2k_files):
    shm = set(os.listdir("/dev/shm"))
    out = decode_files(j2k_files, processes=3)
    assert all(_mapped_from_a_file(a) for a in out)
    for arr, f in zip(out, j2k_files):
        expected = pydicom.dcmread(f).pixel_array
        assert arr.dtype == expected.dtype and arr.shape == (96, 80) and np.array_equal(arr, expected)
    out[0][0, 0] += 1  # writable, and private to this process
    del out, arr
    assert _memory_files() == 0  # the memory files are closed once their slices are let go
    assert set(os.listdir("/dev/shm")) <= shm


def test_without_memory_files_the_slices_come_through_the_pipe(j2k_files, monkeypatch):
    monkeypatch.setattr(SharedFile, "create", classmethod(lambda cls: None))
    out = decode_files(j2k_files, processes=2)
    assert not any(_mapped_from_a_file(a) for a in out)
    assert all(np.array_equal(a, pydicom.dcmread(f).pixel_array) for a, f in zip(out, j2k_files))


def test_a_file_that_cannot_be_mapped_is_read_instead(j2k_files, monkeypatch):
    def no_mapping(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(decode_pool.mmap, "mmap", no_mapping)
    out = decode_files(j2k_files, processes=2)
    assert all(np.array_equal(a, pydicom.dcmread(f).pixel_array) for a, f in zip(out, j2k_files))


def _memory_files() -> int:
    return sum("memfd:ainode-decode" in target for target in _described(_open_fds()).values())


def test_a_series_holds_one_descriptor_per_decode_process_while_its_slices_live(j2k_files):
    before = _memory_files()
    out = decode_files(j2k_files, processes=3)
    assert _memory_files() - before == 3  # one mapping each, however many slices
    del out
    assert _memory_files() == before
