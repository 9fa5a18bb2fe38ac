"""bench/gpu_decode.py: the codestreams it hands nvImageCodec, and its CPU figures on a machine without a GPU
(bench/device/gpu_check.sh runs it where there is one)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from bench.gpu_decode import codestreams, main
from node.synth import write_chest_ct

torch = pytest.importorskip("torch")


def test_codestreams_decode_to_the_stored_values(tmp_path):
    import openjpeg

    files = sorted(write_chest_ct(tmp_path, slices=10, rows=64, cols=64, transfer_syntax="JPEG2000Lossless").files)
    streams, dtype = codestreams(files)
    assert len(streams) == 10 and dtype == np.int16
    for f, s in zip(files, streams):
        assert np.array_equal(openjpeg.decode(s).view(dtype), pydicom.dcmread(f).pixel_array)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine measures nvImageCodec instead")
def test_without_a_gpu_it_prints_the_cpu_figures_and_says_why_not_the_gpu(capsys):
    assert main(["--slices", "10", "--repeat", "1", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU, the node now: decode_files, 2 process(es)" in out
    assert "GPU (nvImageCodec): not measured: torch sees no CUDA device" in out
