"""bench/large_instances.py: the instances it sends are what it says, each new to the node."""

from __future__ import annotations

import pydicom

from bench.large_instances import make_instances


def test_the_instances_are_of_the_size_asked_with_uids_of_their_own(tmp_path):
    files = make_instances(tmp_path, 2, 3)
    sizes = [f.stat().st_size for f in files]
    assert all(2 * 2**20 * 0.95 < s < 2 * 2**20 * 1.05 for s in sizes), sizes
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({str(h.SOPInstanceUID) for h in headers}) == 3
    assert len({str(h.StudyInstanceUID) for h in headers}) == 1
    ds = pydicom.dcmread(files[0])
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 2 and 0xFFFCFFFC not in ds
